//! Vertical-slash indexes built on the device (see `vs_index.cu` for the method).
//!
//! The estimate is exact (f64, the CPU builder's operations in its order), so the index is the
//! one `weft_patterns::build_index` builds, with no bounds and no fallback. It costs
//! `last x nk x d` f64 multiply-adds per head (the CPU builder's arithmetic cannot use the
//! tensor cores), plus a few passes over `last x nk` doubles.

use std::time::Instant;

use cudarc::driver::{CudaSlice, PushKernelArg};
use weft_codegen::{vs_mass_shared_bytes, DType, VS_EXP_KEYS, VS_LOGITS_KEYS, VS_LOGITS_ROWS, VV_INDEX_MAX_SHARED};
use weft_patterns::device_plan::{SlashPlan, Verticals};

use super::{
    alloc_lists, check_build_inputs, launch_cfg, list_len, upload, usage, DeviceEntries, DeviceRules, IndexBuild,
    KernelTimer, LineArgs, SCORE_BYTES,
};
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
        if vs_mass_shared_bytes(last) > VV_INDEX_MAX_SHARED as usize {
            return Err(usage(format!("last_q = {last} is more than GPU vertical-slash building takes")));
        }
        if nq + nk > i32::MAX as usize {
            return Err(usage(format!("{nq} queries and {nk} keys: GPU index building takes fewer than 2^31")));
        }
        let kernel = self.index_kernel(d as u32)?;
        let f = self.load_entries(&kernel, &weft_codegen::VS_INDEX_ENTRIES)?;
        let (f_logits, f_exp, f_inv, f_mass, f_select, f_tiles, f_rows, f_columns, f_scan, f_grid) =
            (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &f[7], &f[8], &f[9]);
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

        let launch = |what: &str| driver(format!("launching the vertical-slash index builder's {what} kernel"));
        let (nq_i, nk_i, hq_i, hkv_i, last_i) = (nq as i32, nk as i32, hq as i32, hkv as i32, last as i32);
        let (vk_i, sk_i, block_i, groups_i, kblocks_i) =
            (vk as i32, sk as i32, plan.block as i32, groups as i32, kblocks as i32);
        let per_head_i = i32::from(plan.shape.per_head);
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): argument lists match the template's signatures and each
        // buffer has the length the kernel indexes.
        for h0 in (0..hq).step_by(chunk).filter(|_| estimate) {
            let hc = chunk.min(hq - h0);
            let h0_i = h0 as i32;
            s.memset_zeros(&mut rowmax).map_err(driver("clearing row maxima"))?;
            let t0 = timer.start()?;
            let mut b = s.launch_builder(f_logits);
            b.arg(q).arg(k).arg(&nq_i).arg(&nk_i).arg(&hq_i).arg(&hkv_i).arg(&h0_i).arg(&last_i);
            b.arg(allowed).arg(&per_head_i).arg(&plan.shape.scale).arg(&mut weights).arg(&mut rowmax);
            let grid = (nk.div_ceil(VS_LOGITS_KEYS) as u32, last.div_ceil(VS_LOGITS_ROWS) as u32, hc as u32);
            unsafe { b.launch(launch_cfg(grid, 256, 0)) }.map_err(launch("vs_logits"))?;
            timer.mark("logits", t0)?;
            let t0 = timer.start()?;
            let mut b = s.launch_builder(f_exp);
            b.arg(&mut weights).arg(&rowmax).arg(&nk_i).arg(&last_i).arg(&mut partial);
            let grid = (nk.div_ceil(VS_EXP_KEYS) as u32, last as u32, hc as u32);
            unsafe { b.launch(launch_cfg(grid, 256, 0)) }.map_err(launch("vs_exp"))?;
            timer.mark("exp", t0)?;
            let t0 = timer.start()?;
            let mut b = s.launch_builder(f_inv);
            b.arg(&partial).arg(&nk_i).arg(&last_i).arg(&mut inv);
            unsafe { b.launch(launch_cfg((hc as u32, 1, 1), 256, 0)) }.map_err(launch("vs_inv"))?;
            let mut b = s.launch_builder(f_mass);
            let slashes_i = slashes as i32;
            b.arg(&weights).arg(&inv).arg(&nq_i).arg(&nk_i).arg(&last_i).arg(&h0_i).arg(&slashes_i);
            b.arg(&mut vert).arg(&mut slash);
            let grid = (if slashes > 0 { nq + nk } else { nk }.div_ceil(256) as u32, hc as u32, 1);
            unsafe { b.launch(launch_cfg(grid, 256, vs_mass_shared_bytes(last) as u32)) }.map_err(launch("vs_mass"))?;
            timer.mark("mass", t0)?;
        }
        let t0 = timer.start()?;
        match plan.verticals {
            Verticals::TopK(_) => {
                let mut b = s.launch_builder(f_select);
                b.arg(&vert).arg(&slash).arg(&nq_i).arg(&nk_i).arg(&hq_i).arg(&vk_i).arg(&sk_i);
                b.arg(&mut vlist).arg(&mut slist).arg(&mut counts);
                unsafe { b.launch(launch_cfg((hq as u32, 2, 1), 1024, 0)) }.map_err(launch("vs_select"))?;
            }
            Verticals::Grid { stride, phase, cols } => {
                let stride_i =
                    i32::try_from(stride).map_err(|_| usage(format!("grid stride {stride} is too large")))?;
                let phase_i = phase.map_or(-1, |p| p.min(nk) as i32);
                let cols_i = i32::from(cols);
                let mut b = s.launch_builder(f_grid);
                b.arg(&vert).arg(&nk_i).arg(&hq_i).arg(&stride_i).arg(&phase_i).arg(&cols_i).arg(&vk_i);
                b.arg(&mut vlist).arg(&mut counts).arg(&mut phases);
                unsafe { b.launch(launch_cfg((hq as u32, 1, 1), 1024, 0)) }.map_err(launch("grid_select"))?;
            }
        }
        let mut b = s.launch_builder(f_tiles);
        b.arg(&slist).arg(&counts).arg(&hq_i).arg(&sk_i).arg(&nq_i).arg(&nk_i).arg(&block_i);
        b.arg(&groups_i).arg(&kblocks_i).arg(&mut tiles);
        unsafe { b.launch(launch_cfg((groups as u32, hq as u32, 1), 128, 0)) }.map_err(launch("vs_tiles"))?;
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
        let (q_blocks_i, bm_i, rows_i) = (q_blocks as i32, plan.shape.block_m as i32, rows as i32);
        let row_grid = (rows.div_ceil(4).max(1) as u32, 1, 1);
        // Both row passes: 0 counts into the counts, 1 writes at the pointers.
        let rows_pass = |pass: i32,
                         counts_out: (&mut CudaSlice<u32>, &mut CudaSlice<u32>),
                         ptrs: (&CudaSlice<u32>, &CudaSlice<u32>),
                         blocks: (&mut CudaSlice<u32>, &mut CudaSlice<u16>),
                         cols: (&mut CudaSlice<u32>, &mut CudaSlice<u16>)|
         -> Result<(), Error> {
            let dims = [per_head_i, hq_i, q_blocks_i, bm_i, block_i, groups_i, kblocks_i];
            entries.launch_rows(s, f_rows, &tiles, lines, dims, pass, (counts_out.0, ptrs.0, blocks.0, blocks.1))?;
            // Verticals: one list per head (a single "group" spanning every query).
            let (one, words_i, list) = (1i32, words as i32, 0i32);
            let mut b = s.launch_builder(f_columns);
            b.arg(&vlist).arg(&counts).arg(&vk_i).arg(&list);
            b.arg(&rules.ptr).arg(&rules.c0).arg(&rules.c1).arg(&rules.code).arg(&rules.codes).arg(&per_head_i);
            b.arg(&hq_i).arg(&q_blocks_i).arg(&bm_i).arg(&nq_i).arg(&one).arg(&pass);
            b.arg(&tiles).arg(&block_i).arg(&groups_i).arg(&words_i);
            b.arg(lines.phase).arg(&lines.stride).arg(&lines.len).arg(&lines.rule_base).arg(lines.codes);
            b.arg(counts_out.1).arg(ptrs.1).arg(cols.0).arg(cols.1);
            unsafe { b.launch(launch_cfg(row_grid, 128, 0)) }.map_err(launch("columns"))?;
            Ok(())
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
            let mut b = s.launch_builder(f_scan);
            b.arg(count).arg(&rows_i).arg(ptr);
            unsafe { b.launch(launch_cfg((1, 1, 1), 1024, 0)) }.map_err(launch("scan"))?;
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
