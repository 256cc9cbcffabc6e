//! The block top-k / top-p / threshold plan ([`BlockPlan`]).

use super::*;

/// The static part of a block top-k index built on the GPU: a pattern whose only dynamic part
/// is one `block(keep = top_k(n) | top_p(p) | threshold(t))`. Per index row, every key block
/// the row can have with its codes when its pattern block is chosen or not ([`BlockEntries`]);
/// per query group, which pattern key blocks the selection ranks.
#[derive(Clone, Debug)]
pub struct BlockPlan {
    pub shape: PlanShape,
    /// The pattern's blocks: query rows per group and keys per pattern key block.
    pub block_q: usize,
    pub block_k: usize,
    pub groups: usize,
    /// Pattern key blocks.
    pub kblocks: usize,
    pub budget: Budget,
    /// `allowed[(slot * groups + g) * words + w]`: bit `kb % 32` of word `kb / 32` is set when
    /// pattern key block `kb` is a candidate of group `g` (`words = ceil(kblocks / 32)`).
    pub allowed: Vec<u32>,
    /// The possible key blocks of each row, with their codes when chosen or not.
    pub entries: BlockEntries,
    /// The mask table the codes index (generate the attention kernel with it).
    pub masks: Vec<Pred>,
}

/// Whether `e` is a block leaf chosen by a budget (the block plan's dynamic leaf).
fn is_budget_block(e: &PatternExpr) -> bool {
    matches!(e, PatternExpr::Block(b) if matches!(b.keep, weft_dsl::BlockKeep::Budget(_)))
}

/// Every key block an index row can have, with its codes when its pattern block is chosen or
/// not: the block part of a [`BlockPlan`] and a [`SlashPlan`].
#[derive(Clone, Debug, Default)]
pub struct BlockEntries {
    /// `ptr[r]..ptr[r + 1]`: the entries of row `r = slot * q_blocks + qb`, ascending.
    pub ptr: Vec<u32>,
    /// The index key block of each entry, and the pattern key block it lies in.
    pub kb: Vec<u32>,
    pub pattern_kb: Vec<u32>,
    /// The entry's code when its pattern block is chosen (`code_sel`) and when it is not
    /// (`code_not`): `FULL`, a mask id, or `DROP` for no entry.
    pub code_sel: Vec<u16>,
    pub code_not: Vec<u16>,
    /// In a plan with row lines, the entry's line code in a query block that holds line rows
    /// (see [`LineCodes`]); empty otherwise.
    pub code_line: Vec<u32>,
}

impl BlockEntries {
    /// Block entries an index over every head of `shape` holds at most: every entry the plan
    /// allows in each row (GPU builders allocate their block lists at this bound, before any
    /// count is known).
    pub fn bound(&self, shape: &PlanShape) -> usize {
        self.ptr.last().map_or(0, |&n| n as usize) * (shape.heads / shape.slots())
    }

    /// Appends rule row `row`'s block entries to `ix` (its last row), given which pattern key
    /// blocks are chosen and, in a query block holding row lines, their offset: what the
    /// GPU's `block_rows` writes, on the CPU.
    pub(super) fn push_row(
        &self,
        row: usize,
        chosen: impl Fn(u32) -> bool,
        line: Option<(&LineCodes, usize)>,
        ix: &mut SparseIndex,
    ) {
        for e in self.ptr[row] as usize..self.ptr[row + 1] as usize {
            let code = match line {
                Some((lines, r)) => lines.resolve(self.code_line[e], r),
                None if chosen(self.pattern_kb[e]) => self.code_sel[e],
                None => self.code_not[e],
            };
            if code != DROP {
                ix.block_idx.push(self.kb[e]);
                ix.block_mask.push(code);
            }
        }
    }
}

/// The block entries of each row of `all` (the index with every dynamic block chosen) and
/// `none` (none chosen), both without columns; pattern key blocks hold `bk` keys. Codes of
/// `all` keep its mask ids (`table` starts from its masks); those of `none` are interned.
pub(super) fn block_entries(
    all: &SparseIndex,
    none: &SparseIndex,
    bn: usize,
    bk: usize,
    table: &mut MaskTable,
) -> Result<BlockEntries, Error> {
    let mut out = BlockEntries { ptr: vec![0], ..BlockEntries::default() };
    for row in 0..all.block_ptr.len() - 1 {
        let (a0, a1) = (all.block_ptr[row] as usize, all.block_ptr[row + 1] as usize);
        let (n0, n1) = (none.block_ptr[row] as usize, none.block_ptr[row + 1] as usize);
        let none_kbs = &none.block_idx[n0..n1];
        for i in a0..a1 {
            let kb = all.block_idx[i];
            let not = match none_kbs.binary_search(&kb) {
                Ok(j) => match none.block_mask[n0 + j] {
                    FULL => FULL,
                    id => table.intern(none.masks[id as usize].clone())?,
                },
                Err(_) => DROP,
            };
            out.kb.push(kb);
            out.pattern_kb.push(kb * bn as u32 / bk as u32);
            out.code_sel.push(all.block_mask[i]);
            out.code_not.push(not);
        }
        if none_kbs.iter().any(|kb| all.block_idx[a0..a1].binary_search(kb).is_err()) {
            return Err(Error::Layout("a block the unchosen pattern keeps is missing when chosen".into()));
        }
        out.ptr.push(out.kb.len() as u32);
    }
    Ok(out)
}

impl BlockPlan {
    /// Plans `pattern` for `heads` query heads, `nq` queries and `nk` keys.
    pub fn new(
        pattern: &PatternExpr,
        heads: usize,
        nq: usize,
        nk: usize,
        opts: &IndexOptions,
    ) -> Result<BlockPlan, Error> {
        let mut found = None;
        let supports = "one block(keep = top_k(n) | top_p(p) | threshold(t))";
        find_leaf(pattern, &Pred::Const(true), supports, &block_leaf, &mut found)?;
        let Some((blk, ctx)) = found else {
            return Err(Error::Layout("the pattern has no block selection: nothing to build on the GPU".into()));
        };
        let weft_dsl::BlockKeep::Budget(budget) = blk.keep else { unreachable!("block_leaf takes budgets only") };
        let start = static_start(pattern, heads, nq, nk, opts, &|_| None)?;
        let (bq, bk) = (blk.block_q as usize, blk.block_k as usize);
        let (groups, kblocks) = (nq.div_ceil(bq), nk.div_ceil(bk));
        let slots = start.nodes.len();
        let index_with = |chosen: bool| {
            let with = Node::Static(Pred::Const(chosen));
            start.index(start.nodes.iter().map(|n| replace_leaf(pattern, n, &is_budget_block, &with)).collect())
        };
        let (all, none) = (index_with(true)?, index_with(false)?);
        let mut table = MaskTable::with_masks(&all.masks);
        let entries = block_entries(&all, &none, start.bn, bk, &mut table)?;
        check_mask_count(&table)?;
        // Candidates: the pattern key blocks the context allows for some pair (as the CPU
        // selection filters them).
        let words = kblocks.div_ceil(32);
        let mut allowed = vec![0u32; slots * groups * words];
        for h in 0..slots {
            for g in 0..groups {
                let (q0, q1) = (g * bq, ((g + 1) * bq).min(nq));
                for kb in 0..kblocks {
                    let r = Region::new(h, (q0, q1), (kb * bk, ((kb + 1) * bk).min(nk)), (nq, nk));
                    if decide(&ctx, &r) != Some(false) {
                        allowed[(h * groups + g) * words + kb / 32] |= 1 << (kb % 32);
                    }
                }
            }
        }
        Ok(BlockPlan {
            shape: start.shape(heads),
            block_q: bq,
            block_k: bk,
            groups,
            kblocks,
            budget,
            allowed,
            entries,
            masks: table.into_masks(),
        })
    }

    /// The index for chosen pattern blocks `chosen[h][g]` (pattern key blocks, ascending): what
    /// the GPU's last step writes, on the CPU.
    pub fn assemble(&self, chosen: &[Vec<Vec<u32>>]) -> Result<SparseIndex, Error> {
        let shape = &self.shape;
        if chosen.len() != shape.heads || chosen.iter().any(|h| h.len() != self.groups) {
            return Err(Error::Shape(format!(
                "chosen blocks for {} heads x {} groups expected",
                shape.heads, self.groups
            )));
        }
        let mut ix = shape.empty_index();
        ix.masks = self.masks.clone();
        for (h, groups) in chosen.iter().enumerate() {
            for qb in 0..shape.q_blocks() {
                let g = qb * shape.block_m / self.block_q;
                let row = shape.slot(h) * shape.q_blocks() + qb;
                self.entries.push_row(row, |pkb| groups[g].binary_search(&pkb).is_ok(), None, &mut ix);
                ix.block_ptr.push(ix.block_idx.len() as u32);
                ix.col_ptr.push(0);
            }
        }
        Ok(ix)
    }

    /// The pattern key blocks the CPU selection chooses for `q` and `k` (`chosen[h][g]`).
    pub fn choose_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<Vec<Vec<Vec<u32>>>, Error> {
        self.shape.check(q, k)?;
        let resolved = self.shape.resolve(pattern, q, k)?;
        resolved
            .nodes
            .iter()
            .map(|n| {
                let sel = dynamic_block_sel(pattern, n)
                    .ok_or_else(|| Error::Layout("internal: no block selection resolved".into()))?;
                Ok((0..self.groups)
                    .map(|g| (0..self.kblocks as u32).filter(|&kb| sel.selected(g, kb as usize)).collect())
                    .collect())
            })
            .collect()
    }
}
