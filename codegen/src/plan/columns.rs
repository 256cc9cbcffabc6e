//! The vertical-vector plan ([`ColumnPlan`]): see the module docs of `plan`.

use super::*;

/// The static part of a vertical-vector index (see the module docs).
#[derive(Clone, Debug)]
pub struct ColumnPlan {
    pub shape: PlanShape,
    /// Query rows per selection group (the pattern's `q_block`), and groups.
    pub q_block: usize,
    pub groups: usize,
    /// What each group keeps of its candidates (`top_k(n)`, `threshold(t)` or `top_p(p)`).
    pub budget: Budget,
    /// Candidate columns `cand_lo[s]..cand_hi[s]` of slot `s = slot * groups + g`.
    pub cand_lo: Vec<u32>,
    pub cand_hi: Vec<u32>,
    /// The index with no columns chosen; its mask table also holds every mask the rules use.
    pub skeleton: SparseIndex,
    /// What a chosen column becomes in each row.
    pub rules: ColumnRules,
}

pub(super) fn column_rules(
    alls: &[Node],
    skeleton: &SparseIndex,
    table: &mut MaskTable,
    nq: usize,
    nk: usize,
    bm: usize,
    bn: usize,
) -> Result<ColumnRules, Error> {
    let slot_skeleton = skeleton;
    let q_blocks = nq.div_ceil(bm);
    let region = |h: usize, q0: usize, q1: usize, k0: usize, k1: usize| Region::new(h, (q0, q1), (k0, k1), (nq, nk));
    let nkb = nk.div_ceil(bn);
    let mut rules = ColumnRules { ptr: vec![0], ..ColumnRules::default() };
    for (h, all) in alls.iter().enumerate() {
        let rows: Vec<Vec<KeyRun>> = (0..q_blocks)
            .into_par_iter()
            .map(|qb| {
                let (q0, q1) = (qb * bm, ((qb + 1) * bm).min(nq));
                let row = h * q_blocks + qb;
                let lo = slot_skeleton.block_ptr[row] as usize;
                let hi = slot_skeleton.block_ptr[row + 1] as usize;
                let blocks = &slot_skeleton.block_idx[lo..hi];
                let mut runs = Vec::new();
                // Key-block ranges, halved until decided (in key order: the stack pops the
                // lower half first). A range without skeleton blocks whose coverage the
                // interval analysis settles is one run, or none when it is all full; so a
                // row costs about (its boundaries x log blocks) evaluations, not one per block.
                let mut stack = vec![(0usize, nkb)];
                while let Some((b0, b1)) = stack.pop() {
                    let (k0, k1) = (b0 * bn, (b1 * bn).min(nk));
                    let first = blocks.partition_point(|&b| (b as usize) < b0);
                    let has_block = blocks.get(first).is_some_and(|&b| (b as usize) < b1);
                    if b1 - b0 > 1 {
                        if !has_block {
                            match cov(all, &region(h, q0, q1, k0, k1), Some(k0)) {
                                Cov::All => continue,
                                Cov::None => {
                                    runs.push((k0 as u32, k1 as u32, RunEntries::Drop));
                                    continue;
                                }
                                Cov::Mask(_) => {}
                            }
                        }
                        let mid = (b0 + b1) / 2;
                        stack.push((mid, b1));
                        stack.push((b0, mid));
                        continue;
                    }
                    let kb = b0;
                    let per_col =
                        |f: &dyn Fn(usize) -> Option<Entry>| RunEntries::PerColumn((k0..k1).map(f).collect::<Vec<_>>());
                    let col_cov = |c: usize| cov(all, &region(h, q0, q1, c, c + 1), Some(c));
                    let entries = match has_block.then(|| slot_skeleton.block_mask[lo + first]) {
                        Some(FULL) => RunEntries::Drop,
                        Some(id) => {
                            debug_assert_eq!(blocks[first] as usize, kb);
                            let pb = slot_skeleton.masks[id as usize].clone();
                            per_col(&|c| settle(and(col_cov(c), Cov::Mask(!pb.clone())), &region(h, q0, q1, c, c + 1)))
                        }
                        None => match cov(all, &region(h, q0, q1, k0, k1), Some(k0)) {
                            Cov::All => continue,
                            Cov::None => RunEntries::Drop,
                            Cov::Mask(_) => per_col(&|c| settle(col_cov(c), &region(h, q0, q1, c, c + 1))),
                        },
                    };
                    runs.push((k0 as u32, k1 as u32, entries));
                }
                runs
            })
            .collect();
        for runs in rows {
            let (mut out, mut codes) = (Vec::new(), Vec::new());
            for (c0, c1, entries) in runs {
                let code = match entries {
                    RunEntries::Drop => u32::from(DROP),
                    RunEntries::PerColumn(entries) => {
                        let mut ids = Vec::with_capacity(entries.len());
                        for e in entries {
                            ids.push(entry_code(e, table)?);
                        }
                        check_mask_count(table)?;
                        if ids.iter().all(|x| *x == FULL) {
                            continue;
                        }
                        if ids.iter().all(|x| *x == ids[0]) {
                            u32::from(ids[0])
                        } else {
                            let off = PER_COLUMN + codes.len() as u32;
                            codes.extend(ids.into_iter().map(u32::from));
                            off
                        }
                    }
                };
                out.push((c0, c1, code));
            }
            rules.push_row(out, codes)?;
        }
    }
    Ok(rules)
}

/// The code of a settled entry: `DROP` for none, `FULL`, or its mask's id in `table`.
fn entry_code(e: Option<Entry>, table: &mut MaskTable) -> Result<u16, Error> {
    Ok(match e {
        None => DROP,
        Some(Entry::Full) => FULL,
        Some(Entry::Mask(p)) => table.intern(p)?,
    })
}

impl ColumnPlan {
    /// Column entries an index over every head holds at most: per row, what its group can
    /// choose (top_k: the smaller of `n` and its candidates; the budgets: its candidates). GPU
    /// builders allocate their column lists at this bound, before any count is known.
    pub fn column_bound(&self) -> usize {
        let q_blocks = self.shape.q_blocks();
        (0..self.shape.heads * q_blocks)
            .map(|row| {
                let (h, qb) = (row / q_blocks, row % q_blocks);
                let slot = self.shape.slot(h) * self.groups + qb * self.shape.block_m / self.q_block;
                let cands = (self.cand_hi[slot] - self.cand_lo[slot]) as usize;
                match self.budget {
                    Budget::TopK(n) => cands.min(n as usize),
                    _ => cands,
                }
            })
            .sum()
    }

    /// Plans `pattern` for `heads` query heads, `nq` queries and `nk` keys.
    pub fn new(
        pattern: &PatternExpr,
        heads: usize,
        nq: usize,
        nk: usize,
        opts: &IndexOptions,
    ) -> Result<ColumnPlan, Error> {
        let mut found = None;
        find_leaf(pattern, &Pred::Const(true), "one vertical_vector", &vv_leaf, &mut found)?;
        let Some((vv, ctx)) = found else {
            return Err(Error::Layout("the pattern has no vertical_vector: nothing to build on the GPU".into()));
        };
        let start = static_start(pattern, heads, nq, nk, opts, &|_| None)?;
        let slot_skeleton = start.index(start.nodes.clone())?;
        let shape = start.shape(heads);
        let StaticStart { bm, bn, per_head, nodes, .. } = start;
        let q_block = vv.q_block as usize;
        let groups = nq.div_ceil(q_block);
        let slots = nodes.len();
        let q_blocks = nq.div_ceil(bm);
        let mut table = MaskTable::with_masks(&slot_skeleton.masks);
        let region =
            |h: usize, q0: usize, q1: usize, k0: usize, k1: usize| Region::new(h, (q0, q1), (k0, k1), (nq, nk));

        // Column rules, row by row.
        let alls: Vec<Node> = nodes.iter().map(|n| choose_all(n, nq, nk)).collect();
        let rules = column_rules(&alls, &slot_skeleton, &mut table, nq, nk, bm, bn)?;

        // Candidate ranges: the keys from the sink on that the context allows for some row of
        // the group (as the CPU selection filters them), which must form one range.
        let mut cand_lo = Vec::with_capacity(slots * groups);
        let mut cand_hi = Vec::with_capacity(slots * groups);
        for h in 0..slots {
            let ranges: Vec<Result<(u32, u32), Error>> = (0..groups)
                .into_par_iter()
                .map(|g| {
                    let (q0, q1) = (g * q_block, ((g + 1) * q_block).min(nq));
                    // Key ranges from the sink on, halved until the context decides them; a
                    // single key it cannot decide is a candidate (as the CPU selection has it).
                    let mut allowed = Vec::new();
                    let mut stack = vec![(vv.sink as usize, nk)];
                    while let Some((k0, k1)) = stack.pop() {
                        if k0 >= k1 {
                            continue;
                        }
                        match decide(&ctx, &region(h, q0, q1, k0, k1)) {
                            Some(false) => {}
                            Some(true) => allowed.push((k0, k1)),
                            None if k1 - k0 == 1 => allowed.push((k0, k1)),
                            None => {
                                let mid = (k0 + k1) / 2;
                                stack.push((mid, k1));
                                stack.push((k0, mid));
                            }
                        }
                    }
                    let mut merged: Vec<(usize, usize)> = Vec::new();
                    for (a, b) in allowed {
                        match merged.last_mut() {
                            Some(last) if last.1 == a => last.1 = b,
                            _ => merged.push((a, b)),
                        }
                    }
                    match merged.as_slice() {
                        [] => Ok((0, 0)),
                        [(a, b)] => Ok((*a as u32, *b as u32)),
                        _ => Err(Error::Layout(format!(
                            "query group {g}'s candidate columns are {} separate ranges; GPU index \
                             building needs one (build this pattern's index on the CPU)",
                            merged.len()
                        ))),
                    }
                })
                .collect();
            for r in ranges {
                let (a, b) = r?;
                cand_lo.push(a);
                cand_hi.push(b);
            }
        }

        // The skeleton for every head (slot 0's rows repeated when heads share them).
        let mut skeleton = SparseIndex::empty(heads, nq, nk, bm, bn);
        for h in 0..heads {
            let s = if per_head { h } else { 0 };
            for qb in 0..q_blocks {
                let row = s * q_blocks + qb;
                let (lo, hi) = (slot_skeleton.block_ptr[row] as usize, slot_skeleton.block_ptr[row + 1] as usize);
                skeleton.block_idx.extend_from_slice(&slot_skeleton.block_idx[lo..hi]);
                skeleton.block_mask.extend_from_slice(&slot_skeleton.block_mask[lo..hi]);
                skeleton.block_ptr.push(skeleton.block_idx.len() as u32);
                skeleton.col_ptr.push(0);
            }
        }
        skeleton.masks = table.into_masks();
        Ok(ColumnPlan { shape, q_block, groups, budget: vv.keep, cand_lo, cand_hi, skeleton, rules })
    }

    /// The entry code of chosen column `c` in index row `qb` of head `h`.
    pub fn code(&self, h: usize, qb: usize, c: u32) -> u16 {
        // Without row lines a line code is the entry code.
        self.rules.code(self.shape.slot(h) * self.shape.q_blocks() + qb, c) as u16
    }

    /// The index for chosen columns `chosen[h][g]` (each ascending): what the GPU's last step
    /// writes, on the CPU.
    pub fn assemble(&self, chosen: &[Vec<Vec<u32>>]) -> Result<SparseIndex, Error> {
        if chosen.len() != self.shape.heads || chosen.iter().any(|h| h.len() != self.groups) {
            return Err(Error::Shape(format!(
                "chosen columns for {} heads x {} groups expected",
                self.shape.heads, self.groups
            )));
        }
        let mut ix = self.skeleton.clone();
        ix.col_ptr = vec![0];
        for (h, groups) in chosen.iter().enumerate() {
            for qb in 0..self.shape.q_blocks() {
                let g = qb * self.shape.block_m / self.q_block;
                for &c in &groups[g] {
                    let code = self.code(h, qb, c);
                    if code != DROP {
                        ix.col_idx.push(c);
                        ix.col_mask.push(code);
                    }
                }
                ix.col_ptr.push(ix.col_idx.len() as u32);
            }
        }
        Ok(ix)
    }

    /// The columns the CPU selection chooses for `q` and `k` (`chosen[h][g]`, ascending): what
    /// the GPU's selection must reproduce.
    pub fn choose_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<Vec<Vec<Vec<u32>>>, Error> {
        self.shape.check(q, k)?;
        let resolved = self.shape.resolve(pattern, q, k)?;
        Ok(resolved
            .nodes
            .iter()
            .map(|n| {
                let sels = n.column_sels();
                (0..self.groups).map(|g| sels.first().map(|s| s.cols[g].clone()).unwrap_or_default()).collect()
            })
            .collect())
    }
}
