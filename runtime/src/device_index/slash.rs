//! Vertical-slash indexes built on the device (see `index_slash.cuh` for the method).
//!
//! The estimate is exact (f64, the CPU builder's operations in its order), so the index is the
//! one `weft_patterns::build_index` builds, with no bounds and no fallback. It costs
//! `last x nk x d` f64 multiply-adds per head (the CPU builder's arithmetic cannot use the
//! tensor cores), plus a few passes over `last x nk` doubles.

use std::time::Instant;

use cudarc::driver::CudaSlice;
use weft_codegen::abi::{
    ColumnsParams, GridSelectParams, VsExpParams, VsInvParams, VsLogitsParams, VsMassParams, VsSelectParams,
    VsTilesParams,
};
use weft_codegen::plan::{SlashPlan, Verticals};
use weft_codegen::{entry, index_module, vs_mass_shared_bytes, DType, INDEX_MAX_SHARED};

use super::{
    alloc_lists, check_build_inputs, list_len, scan, upload, usage, DeviceEntries, DeviceRules, IndexBuild,
    KernelTimer, LineArgs, SCORE_BYTES,
};
use crate::launch::Args;
use crate::{driver, AttnShape, DeviceIndex, Error, Gpu};

impl Gpu {
    /// Builds the index of a vertical-slash `plan` for Q `[hq, nq, d]` and K `[hkv, nk, d]`
    /// (bf16, on the device): the index `weft_patterns::build_index` builds for the same inputs,
    /// mask ids indexing `plan.masks`. The build is only queued (see [`IndexBuild`]).
    pub fn build_vs_index(
        &self,
        plan: &SlashPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let started = Instant::now();
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        check_build_inputs(&plan.shape, shape, dtype, q, k)?;
        let last = plan.last;
        // (last_q is at most 4096 by validation; this guards plans built by hand.)
        if vs_mass_shared_bytes(last) > INDEX_MAX_SHARED as usize {
            return Err(usage(format!("last_q = {last} is more than GPU vertical-slash building takes")));
        }
        if nq + nk > i32::MAX as usize {
            return Err(usage(format!("{nq} queries and {nk} keys: GPU index building takes fewer than 2^31")));
        }
        let kernel = index_module(d as u32)?;
        let m = self.load_module(kernel, &entry::SLASH)?;
        let s = &self.stream;
        let (up, alloc) = ("uploading the vertical-slash plan", "allocating vertical-slash index buffers");
        let q_blocks = plan.shape.q_blocks();
        let rows = hq * q_blocks;
        let (groups, kblocks) = (plan.groups, plan.kblocks);
        let words = kblocks.div_ceil(32);
        let chunks = nk.div_ceil(weft_patterns::repro::SUM_CHUNK);
        // Verticals per head at most: top_k's n, or a grid's ceil(nk / stride) lines.
        let vk = plan.max_verticals();
        let sk = plan.slash_k.clamp(1, nq + nk);
        // A grid with a given phase needs no estimate.
        let estimate = !matches!(plan.verticals, Verticals::Grid { phase: Some(_), .. });
        let copy = self.plan_copy(plan.shape.id, || {
            Ok((
                upload(s, &plan.allowed, up)?,
                DeviceEntries::upload(s, &plan.entries, up)?,
                DeviceRules::upload(s, &plan.rules, up)?,
                upload(s, &plan.lines.codes, up)?,
            ))
        })?;
        let (allowed, entries, rules) = (&copy.0, &copy.1, &copy.2);
        // Weights of `chunk` heads at once (last x nk doubles each).
        let per_head = (last * nk * 8).max(1);
        let chunk = (SCORE_BYTES / per_head).clamp(1, hq);
        // Safety: the kernels write every element of these before any is read (weights and
        // partial sums per chunk, masses per head, lists up to their counts, tiles, counts and
        // pointers per row), so they need no clearing.
        let fresh = |n: usize| unsafe { s.alloc::<f64>(n.max(1)) }.map_err(driver(alloc));
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let fresh32 = |n: usize| unsafe { s.alloc::<u32>(n.max(1)) }.map_err(driver(alloc));
        // The estimate's buffers (none for a grid with a given phase; no diagonal masses for
        // any grid).
        let (est, slashes) = (usize::from(estimate), usize::from(matches!(plan.verticals, Verticals::TopK(_))));
        let mut weights = fresh(est * chunk * last * nk)?;
        let mut partial = fresh(est * chunk * last * chunks)?;
        let mut inv = fresh(est * chunk * last)?;
        let mut vert = fresh(est * hq * nk)?;
        let mut slash = fresh(slashes * hq * (nq + nk))?;
        let mut rowmax = s.alloc_zeros::<u64>((est * chunk * last).max(1)).map_err(driver(alloc))?;
        let (mut vlist, mut slist, mut tiles) = (fresh32(hq * vk)?, fresh32(hq * sk)?, fresh32(hq * groups * words)?);
        let mut counts = s.alloc_zeros::<i32>(2 * hq).map_err(driver(alloc))?;
        // Each head's grid phase (row lines' offsets follow from it).
        let mut phases = s.alloc_zeros::<i32>(hq).map_err(driver(alloc))?;
        let (mut block_count, mut col_count) = (fresh32(rows)?, fresh32(rows)?);
        let (mut block_ptr, mut col_ptr) = (fresh32(rows + 1)?, fresh32(rows + 1)?);

        let (nq_i, nk_i, hq_i, hkv_i, last_i) = (nq as i32, nk as i32, hq as i32, hkv as i32, last as i32);
        let (vk_i, sk_i, block_i, groups_i, kblocks_i) =
            (vk as i32, sk as i32, plan.block as i32, groups as i32, kblocks as i32);
        let per_head_i = i32::from(plan.shape.per_head);
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): each address comes from the launch's `Args`, and each
        // buffer has the length the entry indexes.
        for h0 in (0..hq).step_by(chunk).filter(|_| estimate) {
            let hc = chunk.min(hq - h0);
            let h0_i = h0 as i32;
            s.memset_zeros(&mut rowmax).map_err(driver("clearing row maxima"))?;
            let t0 = timer.start()?;
            let mut a = Args::new(s);
            let params = VsLogitsParams {
                q: a.r(q),
                k: a.r(k),
                nq: nq_i,
                nk: nk_i,
                hq: hq_i,
                hkv: hkv_i,
                h0: h0_i,
                last: last_i,
                allowed: a.r(allowed),
                per_head: per_head_i,
                scale: plan.shape.scale,
                logits: a.w(&mut weights),
                rowmax: a.w(&mut rowmax),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::VS_LOGITS, [nk, last, hc], 0, params, a) }?;
            timer.mark("logits", t0)?;
            let t0 = timer.start()?;
            let mut a = Args::new(s);
            let params = VsExpParams {
                weights: a.w(&mut weights),
                rowmax: a.r(&rowmax),
                nk: nk_i,
                last: last_i,
                partial: a.w(&mut partial),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::VS_EXP, [nk, last, hc], 0, params, a) }?;
            timer.mark("exp", t0)?;
            let t0 = timer.start()?;
            let mut a = Args::new(s);
            let params = VsInvParams { partial: a.r(&partial), nk: nk_i, last: last_i, inv: a.w(&mut inv) };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::VS_INV, [hc, 1, 1], 0, params, a) }?;
            let mut a = Args::new(s);
            let params = VsMassParams {
                weights: a.r(&weights),
                inv_rows: a.r(&inv),
                nq: nq_i,
                nk: nk_i,
                last: last_i,
                h0: h0_i,
                slashes: slashes as i32,
                vert: a.w(&mut vert),
                slash: a.w(&mut slash),
            };
            let diagonals_or_keys = if slashes > 0 { nq + nk } else { nk };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe {
                m.launch(s, &entry::VS_MASS, [diagonals_or_keys, hc, 1], vs_mass_shared_bytes(last) as u32, params, a)
            }?;
            timer.mark("mass", t0)?;
        }
        let t0 = timer.start()?;
        match plan.verticals {
            Verticals::TopK(_) => {
                let mut a = Args::new(s);
                let params = VsSelectParams {
                    vert: a.r(&vert),
                    slash: a.r(&slash),
                    nq: nq_i,
                    nk: nk_i,
                    hq: hq_i,
                    vertical_k: vk_i,
                    slash_k: sk_i,
                    vlist: a.w(&mut vlist),
                    slist: a.w(&mut slist),
                    counts: a.w(&mut counts),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::VS_SELECT, [hq, 1, 1], 0, params, a) }?;
            }
            Verticals::Grid { stride, phase, cols } => {
                let stride_i =
                    i32::try_from(stride).map_err(|_| usage(format!("grid stride {stride} is too large")))?;
                let mut a = Args::new(s);
                let params = GridSelectParams {
                    vert: a.r(&vert),
                    nk: nk_i,
                    hq: hq_i,
                    stride: stride_i,
                    phase: phase.map_or(-1, |p| p.min(nk) as i32),
                    cols: i32::from(cols),
                    cap: vk_i,
                    vlist: a.w(&mut vlist),
                    counts: a.w(&mut counts),
                    phases: a.w(&mut phases),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::GRID_SELECT, [hq, 1, 1], 0, params, a) }?;
            }
        }
        let mut a = Args::new(s);
        let params = VsTilesParams {
            slist: a.r(&slist),
            counts: a.r(&counts),
            hq: hq_i,
            slash_k: sk_i,
            nq: nq_i,
            nk: nk_i,
            block: block_i,
            groups: groups_i,
            kblocks: kblocks_i,
            tiles: a.w(&mut tiles),
        };
        // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
        unsafe { m.launch(s, &entry::VS_TILES, [groups, hq, 1], 0, params, a) }?;
        timer.mark("select", t0)?;

        let too_large = |what: &str, n: usize| usage(format!("{what} {n} is too large for GPU index building"));
        let slot_rows = plan.shape.slots() * q_blocks;
        let lines = LineArgs {
            phase: &phases,
            codes: &copy.3,
            stride: i32::try_from(plan.lines.stride.max(1)).map_err(|_| too_large("grid stride", plan.lines.stride))?,
            len: plan.lines.len as i32,
            rule_base: i32::try_from(slot_rows).map_err(|_| too_large("rule rows", slot_rows))?,
        };
        let (q_blocks_i, bm_i) = (q_blocks as i32, plan.shape.block_m as i32);
        // Both row passes: 0 counts into the counts, 1 writes at the pointers.
        let rows_pass = |pass: i32,
                         counts_out: (&mut CudaSlice<u32>, &mut CudaSlice<u32>),
                         ptrs: (&CudaSlice<u32>, &CudaSlice<u32>),
                         blocks: (&mut CudaSlice<u32>, &mut CudaSlice<u16>),
                         cols: (&mut CudaSlice<u32>, &mut CudaSlice<u16>)|
         -> Result<(), Error> {
            let dims = [per_head_i, hq_i, q_blocks_i, bm_i, block_i, groups_i, kblocks_i];
            entries.launch_rows(s, &m, &tiles, lines, dims, pass, (counts_out.0, ptrs.0, blocks.0, blocks.1))?;
            // Verticals: one list per head (a single "group" spanning every query).
            let mut a = Args::new(s);
            let params = ColumnsParams {
                chosen: a.r(&vlist),
                chosen_count: a.r(&counts),
                cap: vk_i,
                words: 0,
                rule_ptr: a.r(&rules.ptr),
                rule_c0: a.r(&rules.c0),
                rule_c1: a.r(&rules.c1),
                rule_code: a.r(&rules.code),
                codes: a.r(&rules.codes),
                per_head: per_head_i,
                hq: hq_i,
                q_blocks: q_blocks_i,
                block_m: bm_i,
                q_block: nq_i,
                groups: 1,
                pass,
                tiles: a.r(&tiles),
                tile_block: block_i,
                tile_groups: groups_i,
                tile_words: words as i32,
                line_phase: a.r(lines.phase),
                line_stride: lines.stride,
                line_len: lines.len,
                line_rule_base: lines.rule_base,
                line_codes: a.r(lines.codes),
                row_count: a.w(counts_out.1),
                col_ptr: a.r(ptrs.1),
                col_idx: a.w(cols.0),
                col_mask: a.w(cols.1),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::COLUMNS, [rows.max(1), 1, 1], 0, params, a) }
        };
        let t0 = timer.start()?;
        let (mut n_idx, mut n_mask) =
            (s.alloc_zeros::<u32>(1).map_err(driver(alloc))?, s.alloc_zeros::<u16>(1).map_err(driver(alloc))?);
        let (mut m_idx, mut m_mask) =
            (s.alloc_zeros::<u32>(1).map_err(driver(alloc))?, s.alloc_zeros::<u16>(1).map_err(driver(alloc))?);
        rows_pass(
            0,
            (&mut block_count, &mut col_count),
            (&block_ptr, &col_ptr),
            (&mut n_idx, &mut n_mask),
            (&mut m_idx, &mut m_mask),
        )?;
        for (count, ptr) in [(&block_count, &mut block_ptr), (&col_count, &mut col_ptr)] {
            scan(s, &m, count, rows, ptr)?;
        }
        timer.mark("count+scan", t0)?;
        // Lists at their bounds: a row holds at most the plan's entries of its row and one
        // column per vertical.
        let (nb, blocks_read) = list_len(s, plan.entries.bound(&plan.shape), &block_ptr)?;
        let (nc, cols_read) = list_len(s, plan.column_bound(), &col_ptr)?;
        let ((mut block_idx, mut block_mask), (mut col_idx, mut col_mask)) = (alloc_lists(s, nb)?, alloc_lists(s, nc)?);
        let t0 = timer.start()?;
        rows_pass(
            1,
            (&mut block_count, &mut col_count),
            (&block_ptr, &col_ptr),
            (&mut block_idx, &mut block_mask),
            (&mut col_idx, &mut col_mask),
        )?;
        timer.mark("write", t0)?;
        let index = self.single_index(
            shape,
            (plan.shape.block_m, plan.shape.block_n),
            (block_ptr, block_idx, block_mask),
            (col_ptr, col_idx, col_mask),
        )?;
        let sizing = (blocks_read || cols_read, (nb, nc));
        Ok((index, IndexBuild::new(timer, started, None, chunk, "vertical-slash", sizing)))
    }
}
