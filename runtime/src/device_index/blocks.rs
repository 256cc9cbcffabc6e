//! Block top-k / top-p / threshold indexes built on the device (`index_blocks.cuh`).

use std::time::Instant;

use cudarc::driver::CudaSlice;
use weft_codegen::abi::{BlockScoresParams, BlockSelectParams, BlockTopParams, PoolParams};
use weft_codegen::plan::BlockPlan;
use weft_codegen::{block_select_shared_bytes, entry, index_module, pool_ctas, DType, INDEX_MAX_SHARED};
use weft_dsl::Budget;

use super::{
    alloc_lists, check_build_inputs, list_len, scan, upload, usage, DeviceEntries, IndexBuild, KernelTimer, NoLines,
    SCORE_BYTES, TOP_CACHE_MAX_BLOCKS,
};
use crate::launch::Args;
use crate::{driver, AttnShape, DeviceIndex, Error, Gpu};

impl Gpu {
    /// Builds the index of a block top-k (top-p, threshold) `plan` for Q `[hq, nq, d]` and K
    /// `[hkv, nk, d]` (bf16, on the device): pooled query and key blocks, every candidate's
    /// score in f64 exactly as the CPU builder computes it (tiled over groups and key blocks),
    /// the selection sorted on the GPU,
    /// then the rows' block lists through the plan's codes. Mask ids index `plan.masks`.
    pub fn build_block_index(
        &self,
        plan: &BlockPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let started = Instant::now();
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        check_build_inputs(&plan.shape, shape, dtype, q, k)?;
        // (Only top_p's block_select sorts in shared memory; block_top needs none.)
        let select_smem = block_select_shared_bytes(plan.kblocks);
        if matches!(plan.budget, Budget::TopP(_)) && select_smem > INDEX_MAX_SHARED as usize {
            return Err(usage(format!("{} key blocks are more than GPU top_p block selection takes", plan.kblocks)));
        }
        // (mode, n for top_k, ln t for threshold or p for top_p)
        let (mode, top_k, budget_arg) = match plan.budget {
            Budget::TopK(n) => (0i32, n.min(i32::MAX as u32) as i32, 0f64),
            Budget::Threshold(t) => (1, 0, t.ln()),
            Budget::TopP(p) => (2, 0, p),
        };
        let kernel = index_module(d as u32)?;
        let m = self.load_module(kernel, &entry::BLOCK)?;
        let s = &self.stream;
        let (up, alloc) = ("uploading the block index plan", "allocating block index buffers");
        let (groups, kblocks, q_blocks) = (plan.groups, plan.kblocks, plan.shape.q_blocks());
        let rows = hq * q_blocks;
        let words = kblocks.div_ceil(32);
        let copy = self.plan_copy(plan.shape.id, || {
            Ok((upload(s, &plan.allowed, up)?, DeviceEntries::upload(s, &plan.entries, up)?))
        })?;
        let (allowed, entries) = (&copy.0, &copy.1);
        // Safety (the unsafe allocations here): pool writes every pooled element (and its
        // unused halves), block_select every word of each group's choice.
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pooled_q = unsafe { s.alloc::<f32>(hq * groups * d) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pooled_k = unsafe { s.alloc::<f32>(hkv * kblocks * d) }.map_err(driver(alloc))?;
        // The pool kernel also writes bf16 halves and norms, unused here.
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut scratch16 =
            unsafe { s.alloc::<u16>(2 * (hq * groups).max(hkv * kblocks) * d) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut scratch_l1 = unsafe { s.alloc::<f32>((hq * groups).max(hkv * kblocks)) }.map_err(driver(alloc))?;
        let (nq_i, nk_i, hq_i) = (nq as i32, nk as i32, hq as i32);
        let (groups_i, kblocks_i, bq_i, bk_i) =
            (groups as i32, kblocks as i32, plan.block_q as i32, plan.block_k as i32);
        let per_head = i32::from(plan.shape.per_head);
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): each address comes from the launch's `Args`, and each
        // buffer has the length the entry indexes.
        let t0 = timer.start()?;
        for (src, n, rows_per, count, heads, out) in
            [(q, nq_i, bq_i, groups_i, hq, &mut pooled_q), (k, nk_i, bk_i, kblocks_i, hkv, &mut pooled_k)]
        {
            let (mut hi, mut lo) = scratch16.split_at_mut(scratch16.len() / 2);
            let mut a = Args::new(s);
            let params = PoolParams {
                q: a.r(src),
                nq: n,
                q_block: rows_per,
                groups: count,
                pooled: a.w(out),
                pq_hi: a.w(&mut hi),
                pq_lo: a.w(&mut lo),
                pq_l1: a.w(&mut scratch_l1),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::POOL, [pool_ctas(count as usize, d as u32), heads, 1], 0, params, a) }?;
        }
        timer.mark("pool", t0)?;
        // (Allocated once the pool is queued: the GPU starts while the host allocates.)
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut chosen = unsafe { s.alloc::<u32>(hq * groups * words) }.map_err(driver(alloc))?;
        let mut row_count = s.alloc_zeros::<u32>(rows.max(1)).map_err(driver(alloc))?;
        let mut block_ptr = s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?;
        // Every (group, key block) score, for `chunk` heads at a time (a multiple of the GQA
        // group, so each chunk's query heads map to whole key heads): the kernels index from
        // the chunk's first head, so they get views that start there.
        let gqa = hq / hkv;
        let per_head_bytes = (groups * kblocks * 8).max(1);
        let chunk = ((SCORE_BYTES / per_head_bytes).clamp(1, hq) / gqa).max(1) * gqa;
        // Safety: block_scores writes every score of the chunk before block_select reads it.
        let mut scores = unsafe { s.alloc::<f64>((chunk * groups * kblocks).max(1)) }.map_err(driver(alloc))?;
        // block_top keeps each warp's row of keys (8 bytes each) and the list of those still in
        // the running (2 bytes) in shared memory when 8 rows fit in 120 KiB (up to 1536 key
        // blocks: 98304 tokens in 64-token blocks); else it rereads the scores on every pass.
        let cache_limit = self.options().block_top_cache.min(TOP_CACHE_MAX_BLOCKS);
        let top_cache = if words * 32 <= cache_limit { words * 32 } else { 0 };
        let (top_cache_i, top_smem) = (top_cache as i32, (8 * top_cache * 10) as u32);
        for h0 in (0..hq).step_by(chunk) {
            let hc = chunk.min(hq - h0);
            let (hc_i, hkv_c) = (hc as i32, (hc / gqa) as i32);
            let q_view = pooled_q.slice(h0 * groups * d..);
            let k_view = pooled_k.slice(h0 / gqa * kblocks * d..);
            let t0 = timer.start()?;
            let mut a = Args::new(s);
            let params = BlockScoresParams {
                pooled_q: a.r(&q_view),
                pooled_k: a.r(&k_view),
                hq: hc_i,
                hkv: hkv_c,
                groups: groups_i,
                kblocks: kblocks_i,
                scale: plan.shape.scale,
                scores: a.w(&mut scores),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::BLOCK_SCORES, [groups, kblocks, hc], 0, params, a) }?;
            timer.mark("score", t0)?;
            let t0 = timer.start()?;
            let allowed_view = allowed.slice(if plan.shape.per_head { h0 * groups * words } else { 0 }..);
            let mut chosen_view = chosen.slice_mut(h0 * groups * words..);
            // top_k and threshold: block_top, a radix select with a warp per group (block_select's
            // bitonic sort took 0.62 of the 1.40 ms of a 64k build, block_top 0.18); top_p needs
            // the candidates in order (its weights are summed best first): block_select.
            let mut a = Args::new(s);
            if mode != 2 {
                let params = BlockTopParams {
                    scores: a.r(&scores),
                    allowed: a.r(&allowed_view),
                    per_head,
                    groups: groups_i,
                    kblocks: kblocks_i,
                    mode,
                    top_k,
                    budget_arg,
                    chosen: a.w(&mut chosen_view),
                    cache_width: top_cache_i,
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::BLOCK_TOP, [groups, hc, 1], top_smem, params, a) }?;
            } else {
                let params = BlockSelectParams {
                    scores: a.r(&scores),
                    allowed: a.r(&allowed_view),
                    per_head,
                    groups: groups_i,
                    kblocks: kblocks_i,
                    mode,
                    top_k,
                    budget_arg,
                    chosen: a.w(&mut chosen_view),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::BLOCK_SELECT, [groups, hc, 1], select_smem as u32, params, a) }?;
            }
            timer.mark("select", t0)?;
        }
        let (q_blocks_i, bm_i) = (q_blocks as i32, plan.shape.block_m as i32);
        let dims = [per_head, hq_i, q_blocks_i, bm_i, bq_i, groups_i, kblocks_i];
        let no_lines = NoLines::new(s)?;
        let mut none_idx = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let mut none_mask = s.alloc_zeros::<u16>(1).map_err(driver(alloc))?;
        let t0 = timer.start()?;
        entries.launch_rows(
            s,
            &m,
            &chosen,
            no_lines.args(),
            dims,
            0,
            (&mut row_count, &block_ptr, &mut none_idx, &mut none_mask),
        )?;
        scan(s, &m, &row_count, rows, &mut block_ptr)?;
        timer.mark("count+scan", t0)?;
        let (len, sized_by_read) = list_len(s, plan.entries.bound(&plan.shape), &block_ptr)?;
        let (mut block_idx, mut block_mask) = alloc_lists(s, len)?;
        let t0 = timer.start()?;
        entries.launch_rows(
            s,
            &m,
            &chosen,
            no_lines.args(),
            dims,
            1,
            (&mut row_count, &block_ptr, &mut block_idx, &mut block_mask),
        )?;
        timer.mark("write", t0)?;
        let columns = (
            s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?,
            s.alloc_zeros::<u32>(1).map_err(driver(alloc))?,
            s.alloc_zeros::<u16>(1).map_err(driver(alloc))?,
        );
        let index = self.single_index(
            shape,
            (plan.shape.block_m, plan.shape.block_n),
            (block_ptr, block_idx, block_mask),
            columns,
        )?;
        let sizing = (sized_by_read, (len, 0));
        Ok((index, IndexBuild::new(timer, started, None, hq, "blocks", sizing)))
    }
}
