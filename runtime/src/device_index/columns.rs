//! Vertical-vector indexes built on the device (`index_columns.cuh`): the columns
//! `vertical_vector(keep = ...)` chooses per query group, equal to the CPU builder's, through the
//! plan's column rules.

use std::time::Instant;

use cudarc::driver::CudaSlice;
use weft_codegen::abi::{
    BudgetParams, ColumnsParams, KstatsParams, PoolParams, ScoreParams, SelectParams, ThresholdParams, VvExactParams,
};
use weft_codegen::plan::ColumnPlan;
use weft_codegen::{
    entry, index_module, pool_ctas, vv_score_shared_bytes, vv_select_shared_bytes, DType, INDEX_MAX_SHARED,
    VV_COLLECT_MAX, VV_TWO_CTA_SHARED,
};
use weft_dsl::Budget;

use super::{
    alloc_lists, check_build_inputs, list_len, scan, upload, usage, DeviceCsr, DeviceRules, IndexBuild, KernelTimer,
    NoLines, VvStrategy, BUDGET_MAX_BYTES, SCORE_BYTES,
};
use crate::launch::Args;
use crate::{driver, AttnShape, DeviceIndex, Error, Gpu};

/// A vertical-vector plan on the device.
struct ColumnPlanCopy {
    cand_lo: CudaSlice<u32>,
    cand_hi: CudaSlice<u32>,
    rules: DeviceRules,
    /// The skeleton's block lists (copied into each index built).
    skeleton: DeviceCsr,
}

impl Gpu {
    /// Builds the index of `plan` for Q `[hq, nq, d]` and K `[hkv, nk, d]` (bf16, on the
    /// device): the index `weft_patterns::build_index` builds for the same inputs, mask ids
    /// numbered as in `plan.skeleton.masks` (generate the attention kernel with those).
    pub fn build_vv_index(
        &self,
        plan: &ColumnPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        self.build_vv_index_with(plan, shape, dtype, q, k, VvStrategy::Auto)
    }

    /// [`Gpu::build_vv_index`] with a chosen strategy.
    pub fn build_vv_index_with(
        &self,
        plan: &ColumnPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        strategy: VvStrategy,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let started = Instant::now();
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        check_build_inputs(&plan.shape, shape, dtype, q, k)?;
        let base_smem = vv_select_shared_bytes(d as u32, nk, 0);
        if base_smem > INDEX_MAX_SHARED as usize {
            return Err(usage(format!("{nk} keys are more than GPU index building takes (about 1.2 million)")));
        }
        // Two strategies (the same keys either way):
        // - list: a sampled threshold per group, then one scoring pass that keeps only the keys
        //   above it (about keep + 16 sqrt(keep) + 256 per group; room for 25% more), selected
        //   in shared memory. Nothing of size groups x keys is stored.
        // - dense (keep too large for the list to fit shared memory): every approximate score is
        //   stored, and the selection reads them (collecting into shared memory when two CTAs
        //   still fit on an SM: with one, its memory-bound passes lose more than they save).
        // Threshold and top-p budgets: a `budget` pass counts what each group keeps (exact
        // scores where the bounds leave it open), then `select` chooses that many as for top_k,
        // into a bitmap per group (the counts are not known before). They score densely: the
        // budget reads every score. Their scores must rank as the dots do.
        let top_k = match plan.budget {
            Budget::TopK(n) => Some(n as usize),
            _ if plan.shape.scale <= 0.0 || plan.shape.scale.is_nan() => {
                return Err(usage(format!(
                    "GPU index building takes threshold and top_p budgets with a positive scale, not {}",
                    plan.shape.scale
                )))
            }
            _ => None,
        };
        let top_p = matches!(plan.budget, Budget::TopP(_));
        // Bytes per stored (group, key) score: the approximate f32, and for top_p also the
        // exact f64 score and the fixed-point weight.
        let pair_bytes = if top_p { 16 } else { 4 };
        let keep = top_k.unwrap_or(nk).min(nk) as f64;
        let want = ((1.25 * (keep + 32.0 * keep.sqrt() + 512.0)) as usize).next_multiple_of(256);
        let fits = want <= VV_COLLECT_MAX && vv_select_shared_bytes(d as u32, nk, want) <= INDEX_MAX_SHARED as usize;
        // Keys a budgeted select collects: as many as two CTAs per SM leave room for.
        let base_two = vv_select_shared_bytes(d as u32, nk, 0);
        let budget_collect = (VV_TWO_CTA_SHARED.saturating_sub(base_two) / 8).min(VV_COLLECT_MAX) / 256 * 256;
        // (list mode, keys held in shared memory, list length in global memory)
        let (list_mode, collect, list_cap) = match strategy {
            VvStrategy::List { .. } if top_k.is_none() => {
                return Err(usage("threshold and top_p budgets score densely; use VvStrategy::Auto or Dense"))
            }
            _ if top_k.is_none() => (false, budget_collect, 1),
            VvStrategy::Auto | VvStrategy::List { capacity: None } if fits => (true, want, 2 * want),
            VvStrategy::List { capacity: Some(c) } if c / 2 <= want => (true, c / 2, c.max(1)),
            VvStrategy::List { .. } => {
                return Err(usage(format!(
                    "lists of {want} keys per group do not fit shared memory; use VvStrategy::Auto"
                )))
            }
            _ if vv_select_shared_bytes(d as u32, nk, want) <= VV_TWO_CTA_SHARED => (false, want, 1),
            _ => (false, 0, 1),
        };
        let strategy_name = if list_mode { "list" } else { "dense" };
        let select_smem = vv_select_shared_bytes(d as u32, nk, collect);
        let (collect_i, list_cap_i) = (collect as i32, list_cap as i32);
        // Sample columns: one run of 32 keys per 512 (some past nk in the last block).
        let samples = nk.div_ceil(512) * 32;
        let samples_i = samples as i32;
        let kernel = index_module(d as u32)?;
        let m = self.load_module(kernel, &entry::VERTICAL_VECTOR)?;

        let s = &self.stream;
        let up = "uploading the index plan";
        let alloc = "allocating index-building buffers";
        let (groups, q_blocks) = (plan.groups, plan.shape.q_blocks());
        let rows = hq * q_blocks;
        // Chosen keys per group: a list of top_k, or (cap 0) a bitmap of `words` words.
        let words = nk.div_ceil(32);
        let (cap, chosen_len) = match top_k {
            Some(n) => (n.min(nk).max(1), n.min(nk).max(1)),
            None => (0, words),
        };
        if top_k.is_none() {
            // The budgets hold every (group, key) score of at least one head at once, and a
            // bitmap per group for every head.
            let need = groups * nk * pair_bytes + hq * groups * words * 4;
            if need > BUDGET_MAX_BYTES {
                return Err(usage(format!(
                    "GPU index building for {} over {nq} queries and {nk} keys needs {:.1} GiB of scratch (at \
                     most {} GiB); use top_k, larger query groups, or build this index on the CPU",
                    plan.budget,
                    need as f64 / (1u64 << 30) as f64,
                    BUDGET_MAX_BYTES >> 30
                )));
            }
        }
        let copy = self.plan_copy(plan.shape.id, || {
            let sk = &plan.skeleton;
            Ok(ColumnPlanCopy {
                cand_lo: upload(s, &plan.cand_lo, up)?,
                cand_hi: upload(s, &plan.cand_hi, up)?,
                rules: DeviceRules::upload(s, &plan.rules, up)?,
                skeleton: (
                    upload(s, &sk.block_ptr, up)?,
                    upload(s, &sk.block_idx, up)?,
                    upload(s, &sk.block_mask, up)?,
                ),
            })
        })?;
        let (cand_lo, cand_hi) = (&copy.cand_lo, &copy.cand_hi);
        let DeviceRules { ptr: rule_ptr, c0: rule_c0, c1: rule_c1, code: rule_code, codes } = &copy.rules;

        // Safety (the unsafe allocations here): pool writes every pooled element, kstats every
        // key's maximum, select each group's chosen keys up to the count the column pass reads,
        // and the emission each list entry below its count before select reads it; buffers
        // that atomics or partial writes fill are cleared.
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pooled = unsafe { s.alloc::<f32>(hq * groups * d) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pq_hi = unsafe { s.alloc::<u16>(hq * groups * d) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pq_lo = unsafe { s.alloc::<u16>(hq * groups * d) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut pq_l1 = unsafe { s.alloc::<f32>(hq * groups) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut kinf = unsafe { s.alloc::<f32>(hkv * nk) }.map_err(driver(alloc))?;
        let mut kmax = s.alloc_zeros::<u32>(hkv).map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut chosen = unsafe { s.alloc::<u32>(hq * groups * chosen_len) }.map_err(driver(alloc))?;
        let mut chosen_count = s.alloc_zeros::<i32>(hq * groups).map_err(driver(alloc))?;
        // [largest exact-ranking code, groups on the slow path, groups ranked exactly]
        let mut status = s.alloc_zeros::<i32>(3).map_err(driver(alloc))?;
        let mut row_count = s.alloc_zeros::<u32>(rows.max(1)).map_err(driver(alloc))?;
        let mut col_ptr = s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?;
        // Scores held at once: dense stores groups x keys per head, list only the sample.
        let head_pairs = groups * if list_mode { samples } else { nk };
        let chunk = (SCORE_BYTES / (head_pairs * pair_bytes).max(1)).clamp(1, hq);
        let mut approx = s.alloc_zeros::<f32>(chunk * head_pairs).map_err(driver(alloc))?;
        let pairs = if top_p { chunk * head_pairs } else { 1 };
        // Safety: vv_exact writes every pair's exact score, and the budget pass each
        // candidate's weight, before they are read.
        let mut exact = unsafe { s.alloc::<f64>(pairs) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut weights = unsafe { s.alloc::<u32>(pairs) }.map_err(driver(alloc))?;
        let mut best = s.alloc_zeros::<u64>(if top_p { chunk * groups } else { 1 }).map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut keep_count =
            unsafe { s.alloc::<u32>(if top_k.is_none() { hq * groups } else { 1 }) }.map_err(driver(alloc))?;
        // (mode, argument) of the budget pass: threshold(t) takes ln t, top_p(p) takes p.
        let (budget_mode, budget_arg) = match plan.budget {
            Budget::Threshold(t) => (0i32, t.ln()),
            Budget::TopP(p) => (1i32, p),
            Budget::TopK(_) => (-1, 0.0),
        };
        let lists = if list_mode { hq * groups } else { 1 };
        let mut thresh = s.alloc_zeros::<f32>(2 * lists).map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut list_key = unsafe { s.alloc::<u32>(lists * list_cap) }.map_err(driver(alloc))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut list_val = unsafe { s.alloc::<f32>(lists * list_cap) }.map_err(driver(alloc))?;
        let mut list_count = s.alloc_zeros::<u32>(lists).map_err(driver(alloc))?;
        let mut list_high = s.alloc_zeros::<u32>(lists).map_err(driver(alloc))?;
        let (nq_i, nk_i, hq_i, hkv_i) = (nq as i32, nk as i32, hq as i32, hkv as i32);
        let (groups_i, q_block_i, cap_i, top_k_i) =
            (groups as i32, plan.q_block as i32, cap as i32, top_k.unwrap_or(0).min(i32::MAX as usize) as i32);
        let per_head = i32::from(plan.shape.per_head);
        let scale = plan.shape.scale;
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): each address comes from the launch's `Args`, and each
        // buffer was allocated above (or checked) with the length the entry indexes.
        let t0 = timer.start()?;
        let mut a = Args::new(s);
        let params = PoolParams {
            q: a.r(q),
            nq: nq_i,
            q_block: q_block_i,
            groups: groups_i,
            pooled: a.w(&mut pooled),
            pq_hi: a.w(&mut pq_hi),
            pq_lo: a.w(&mut pq_lo),
            pq_l1: a.w(&mut pq_l1),
        };
        // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
        unsafe { m.launch(s, &entry::POOL, [pool_ctas(groups, d as u32), hq, 1], 0, params, a) }?;
        timer.mark("pool", t0)?;
        let t0 = timer.start()?;
        let mut a = Args::new(s);
        let params = KstatsParams { k: a.r(k), nk: nk_i, kinf: a.w(&mut kinf), kmax_bits: a.w(&mut kmax) };
        // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
        unsafe { m.launch(s, &entry::KSTATS, [nk, hkv, 1], 0, params, a) }?;
        timer.mark("kstats", t0)?;
        let score_smem = vv_score_shared_bytes(d as u32);
        let (dense_mode, sample_mode, emit_mode) = (0i32, 1i32, 2i32);
        let select_mode = i32::from(list_mode);
        for h0 in (0..hq).step_by(chunk) {
            let hc = chunk.min(hq - h0);
            let h0_i = h0 as i32;
            // One scoring launch: `mode` over `cols` columns.
            macro_rules! score {
                ($mode:expr, $cols:expr) => {{
                    let (mode, cols): (i32, usize) = ($mode, $cols);
                    let mut a = Args::new(s);
                    let params = ScoreParams {
                        pq_hi: a.r(&pq_hi),
                        pq_lo: a.r(&pq_lo),
                        k: a.r(k),
                        approx: a.w(&mut approx),
                        h0: h0_i,
                        hq: hq_i,
                        hkv: hkv_i,
                        groups: groups_i,
                        nk: nk_i,
                        mode,
                        cols: cols as i32,
                        cand_lo: a.r(cand_lo),
                        cand_hi: a.r(cand_hi),
                        per_head,
                        thresh: a.r(&thresh),
                        list_key: a.w(&mut list_key),
                        list_val: a.w(&mut list_val),
                        list_count: a.w(&mut list_count),
                        list_high: a.w(&mut list_high),
                        list_cap: list_cap_i,
                    };
                    // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                    unsafe { m.launch(s, &entry::SCORE, [groups, cols, hc], score_smem, params, a) }?;
                }};
            }
            let t0 = timer.start()?;
            if list_mode {
                score!(sample_mode, samples);
                timer.mark("sample score", t0)?;
                let t0 = timer.start()?;
                let mut a = Args::new(s);
                let params = ThresholdParams {
                    sample: a.r(&approx),
                    samples: samples_i,
                    pq_l1: a.r(&pq_l1),
                    kmax_bits: a.r(&kmax),
                    cand_lo: a.r(cand_lo),
                    cand_hi: a.r(cand_hi),
                    per_head,
                    h0: h0_i,
                    hq: hq_i,
                    hkv: hkv_i,
                    groups: groups_i,
                    top_k: top_k_i,
                    thresh: a.w(&mut thresh),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::THRESHOLD, [groups, hc, 1], 0, params, a) }?;
                timer.mark("threshold", t0)?;
                let t0 = timer.start()?;
                score!(emit_mode, nk);
                timer.mark("emit score", t0)?;
            } else {
                score!(dense_mode, nk);
                timer.mark("score", t0)?;
            }
            if top_p {
                let t0 = timer.start()?;
                s.memset_zeros(&mut best).map_err(driver("clearing the best scores"))?;
                let mut a = Args::new(s);
                let params = VvExactParams {
                    pooled: a.r(&pooled),
                    k: a.r(k),
                    groups: groups_i,
                    nk: nk_i,
                    hq: hq_i,
                    hkv: hkv_i,
                    h0: h0_i,
                    cand_lo: a.r(cand_lo),
                    cand_hi: a.r(cand_hi),
                    per_head,
                    scale,
                    exact: a.w(&mut exact),
                    best: a.w(&mut best),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::VV_EXACT, [nk, groups, hc], 0, params, a) }?;
                timer.mark("exact", t0)?;
            }
            if top_k.is_none() {
                let t0 = timer.start()?;
                let mut a = Args::new(s);
                let params = BudgetParams {
                    approx: a.r(&approx),
                    pooled: a.r(&pooled),
                    pq_l1: a.r(&pq_l1),
                    k: a.r(k),
                    kinf: a.r(&kinf),
                    kmax_bits: a.r(&kmax),
                    cand_lo: a.r(cand_lo),
                    cand_hi: a.r(cand_hi),
                    per_head,
                    h0: h0_i,
                    hq: hq_i,
                    hkv: hkv_i,
                    groups: groups_i,
                    nk: nk_i,
                    scale,
                    mode: budget_mode,
                    arg: budget_arg,
                    exact: a.r(&exact),
                    best: a.r(&best),
                    weights: a.w(&mut weights),
                    keep_out: a.w(&mut keep_count),
                };
                // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
                unsafe { m.launch(s, &entry::BUDGET, [groups, hc, 1], 0, params, a) }?;
                timer.mark("budget", t0)?;
            }
            let t0 = timer.start()?;
            let mut a = Args::new(s);
            let params = SelectParams {
                approx: a.r(&approx),
                pooled: a.r(&pooled),
                pq_l1: a.r(&pq_l1),
                k: a.r(k),
                kinf: a.r(&kinf),
                kmax_bits: a.r(&kmax),
                cand_lo: a.r(cand_lo),
                cand_hi: a.r(cand_hi),
                per_head,
                h0: h0_i,
                hq: hq_i,
                hkv: hkv_i,
                groups: groups_i,
                nk: nk_i,
                top_k: top_k_i,
                // Budgets pass their counts; top_k none.
                keep_in: if top_k.is_none() { a.r(&keep_count) } else { 0 },
                scale,
                cap: cap_i,
                collect_cap: collect_i,
                mode: select_mode,
                list_key: a.r(&list_key),
                list_val: a.r(&list_val),
                list_count: a.r(&list_count),
                list_high: a.r(&list_high),
                list_cap: list_cap_i,
                chosen: a.w(&mut chosen),
                chosen_count: a.w(&mut chosen_count),
                status: a.w(&mut status),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::SELECT, [groups, hc, 1], select_smem as u32, params, a) }?;
            timer.mark("select", t0)?;
        }
        let no_tiles = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let no_lines = NoLines::new(s)?;
        let words_i = if top_k.is_none() { words as i32 } else { 0 };
        let columns_pass = |pass: i32,
                            row_count: &mut CudaSlice<u32>,
                            col_ptr: &CudaSlice<u32>,
                            col_idx: &mut CudaSlice<u32>,
                            col_mask: &mut CudaSlice<u16>|
         -> Result<(), Error> {
            let lines = no_lines.args();
            let mut a = Args::new(s);
            let params = ColumnsParams {
                chosen: a.r(&chosen),
                chosen_count: a.r(&chosen_count),
                cap: cap_i,
                words: words_i,
                rule_ptr: a.r(rule_ptr),
                rule_c0: a.r(rule_c0),
                rule_c1: a.r(rule_c1),
                rule_code: a.r(rule_code),
                codes: a.r(codes),
                per_head,
                hq: hq_i,
                q_blocks: q_blocks as i32,
                block_m: plan.shape.block_m as i32,
                q_block: q_block_i,
                groups: groups_i,
                pass,
                // No slash tiles here (tile_words = 0), and no row lines.
                tiles: a.r(&no_tiles),
                tile_block: 1,
                tile_groups: 1,
                tile_words: 0,
                line_phase: a.r(lines.phase),
                line_stride: lines.stride,
                line_len: lines.len,
                line_rule_base: lines.rule_base,
                line_codes: a.r(lines.codes),
                row_count: a.w(row_count),
                col_ptr: a.r(col_ptr),
                col_idx: a.w(col_idx),
                col_mask: a.w(col_mask),
            };
            // Safety: every address comes from `a`, each buffer sized for this entry as allocated above.
            unsafe { m.launch(s, &entry::COLUMNS, [rows.max(1), 1, 1], 0, params, a) }
        };
        let mut none_idx = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let mut none_mask = s.alloc_zeros::<u16>(1).map_err(driver(alloc))?;
        let t0 = timer.start()?;
        columns_pass(0, &mut row_count, &col_ptr, &mut none_idx, &mut none_mask)?;
        scan(s, &m, &row_count, rows, &mut col_ptr)?;
        timer.mark("count+scan", t0)?;

        let (len, sized_by_read) = list_len(s, plan.column_bound(), &col_ptr)?;
        let (mut col_idx, mut col_mask) = alloc_lists(s, len)?;
        let t0 = timer.start()?;
        columns_pass(1, &mut row_count, &col_ptr, &mut col_idx, &mut col_mask)?;
        timer.mark("write", t0)?;

        let copy_of = "copying the index skeleton";
        let (sk_ptr, sk_idx, sk_mask) = &copy.skeleton;
        let blocks = (
            s.clone_dtod(sk_ptr).map_err(driver(copy_of))?,
            s.clone_dtod(sk_idx).map_err(driver(copy_of))?,
            s.clone_dtod(sk_mask).map_err(driver(copy_of))?,
        );
        let index =
            self.single_index(shape, (plan.shape.block_m, plan.shape.block_n), blocks, (col_ptr, col_idx, col_mask))?;
        let capacity = (plan.skeleton.block_idx.len(), len);
        let build = IndexBuild::new(timer, started, Some(status), chunk, strategy_name, (sized_by_read, capacity));
        Ok((index, build))
    }
}
