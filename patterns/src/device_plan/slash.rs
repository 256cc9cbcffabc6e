//! The static part of a vertical-slash index built on the GPU (and of a grid of column lines,
//! whose phase the same estimate chooses).
//!
//! `vertical_slash` chooses, per head, key columns (verticals, the same for every query group)
//! and diagonals (slashes, each keeping the `block x block` tiles it crosses), from the softmax
//! mass of the last `last_q` queries. Given those two lists everything else is static, and a
//! [`SlashPlan`] holds it:
//! - which keys each estimated row may attend to (the enclosing predicates), as bits;
//! - per index row, every key block the row can have with its code when its slash tile is
//!   chosen or not (as a [`BlockPlan`](super::BlockPlan) has them);
//! - per index row, the column rules of a vertical whose tile no slash keeps (as a
//!   [`ColumnPlan`](super::ColumnPlan) has them). A vertical inside a kept tile adds nothing
//!   (the tile computes its pairs): the plan checks that for the pattern, and patterns where
//!   it does not hold are built on the CPU.
//!
//! A `grid(lines = cols)` with an estimated phase is the same with no slashes: its verticals
//! are every `stride`-th key from the phase, the in-frame position whose column mass (folded
//! modulo the stride) is heaviest. Row lines are not planned: their masks would depend on the
//! phase, so the attention kernel (whose mask table is part of its key) would too.

use rayon::prelude::*;
use weft_dsl::{Budget, Env, Grid, GridLines, PatternExpr, Pred};

use super::{
    block_entries, check_mask_count, column_rules, find_leaf, next_plan_id, replace_leaf, static_start, BlockEntries,
    ColumnRules, Leaf, DROP,
};
use crate::families::{
    grid_phase, grid_rows_and_sink, slash_blocks, vertical_slash_choice, ColSel, HeadInputs, Node, GRID_LAST_Q,
};
use crate::index::MaskTable;
use crate::interval::{decide, Region};
use crate::{Error, IndexOptions, SparseIndex, Tensor};

/// The static part of a vertical-slash index (see the module docs).
#[derive(Clone, Debug)]
pub struct SlashPlan {
    /// Names this plan's contents for caches of its device copy (a clone shares it). Plans
    /// are built once and only read: do not change a plan's fields after [`SlashPlan::new`].
    pub id: u64,
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    pub block_m: usize,
    pub block_n: usize,
    /// The pattern's tile: query rows per group and keys per pattern key block.
    pub block: usize,
    pub groups: usize,
    pub kblocks: usize,
    /// Estimated rows: the last `last` queries.
    pub last: usize,
    /// How verticals are chosen, and slashes kept (`top_k(n)`; 0 for a grid).
    pub verticals: Verticals,
    pub slash_k: usize,
    pub scale: f64,
    /// Whether anything differs per head (slot = head) or not (slot 0).
    pub per_head: bool,
    /// `allowed[(slot * last + r) * words + k / 32]`, bit `k % 32`: estimated row `nq - last +
    /// r` may attend to key `k` (`words = ceil(nk / 32)`).
    pub allowed: Vec<u32>,
    /// Per index row, its possible key blocks and their codes when the tile holding them (their
    /// pattern key block) is kept or not.
    pub entries: BlockEntries,
    /// What a vertical whose tile is not kept becomes in each row.
    pub rules: ColumnRules,
    /// The mask table the codes index (generate the attention kernel with it).
    pub masks: Vec<Pred>,
}

/// How a [`SlashPlan`]'s verticals are chosen from the column masses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verticals {
    /// The `n` heaviest keys (`vertical_slash`).
    TopK(usize),
    /// Every `stride`-th key from `phase`, or when that is `None` from the heaviest in-frame
    /// position (`grid`).
    Grid { stride: usize, phase: Option<usize> },
}

/// One head's choice: its verticals (keys) and slashes (diagonal numbers), each ascending.
pub type SlashChoice = (Vec<u32>, Vec<u32>);

/// The leaves of a vertical-slash plan (the target is the leaf itself: a vertical_slash or a
/// grid).
fn vs_leaf(e: &PatternExpr) -> Leaf<'_, PatternExpr> {
    match e {
        PatternExpr::Static(_) => Leaf::Static,
        PatternExpr::Block(b) if matches!(b.keep, weft_dsl::BlockKeep::Where(_)) => Leaf::Static,
        PatternExpr::Grid(g) if g.phase.is_some() && g.lines == GridLines::Rows => Leaf::Static,
        PatternExpr::VerticalSlash(v) if matches!((v.vertical, v.slash), (Budget::TopK(_), Budget::TopK(_))) => {
            Leaf::Target(e)
        }
        PatternExpr::Grid(g) if g.lines == GridLines::Cols || g.phase.is_some() => Leaf::Target(e),
        PatternExpr::VerticalSlash(_) => Leaf::Unsupported("a vertical_slash with a top_p or threshold budget"),
        PatternExpr::Grid(_) => Leaf::Unsupported("a grid with row lines and an estimated phase"),
        PatternExpr::Block(_) => Leaf::Unsupported("a block selection"),
        PatternExpr::VerticalVector(_) => Leaf::Unsupported("a vertical_vector selection"),
        _ => Leaf::Unsupported("a retrieval selection"),
    }
}

const SUPPORTS: &str =
    "one vertical_slash(vertical = top_k(n), slash = top_k(m)) or one grid (column lines, or a given phase)";

/// The leaf's node with the given choice: no verticals (or every key) and no tiles (or all),
/// plus a grid's static parts (its sink, and its row lines when the phase is given).
fn vs_node(columns: bool, tiles: bool, nq: usize, nk: usize, grid: Option<&Grid>) -> Node {
    let cols = if columns { (0..nk as u32).collect() } else { Vec::new() };
    let mut items = vec![Node::Columns(ColSel { bq: nq.max(1), cols: vec![cols] }), Node::Static(Pred::Const(tiles))];
    if let Some(g) = grid {
        // A planned grid with row lines has a given phase (vs_leaf); without rows the phase
        // only places the columns, which are the choice here.
        items.extend(grid_rows_and_sink(g, g.phase.unwrap_or(0) as usize));
    }
    Node::Union(items)
}

/// The plan's leaf, found in `pattern`, with the predicate around it.
fn target(pattern: &PatternExpr) -> Result<(&PatternExpr, Pred), Error> {
    let mut found = None;
    find_leaf(pattern, &Pred::Const(true), SUPPORTS, &vs_leaf, &mut found)?;
    found.ok_or_else(|| {
        Error::Layout("the pattern has no vertical_slash or estimated grid: nothing to build on the GPU".into())
    })
}

impl SlashPlan {
    /// Plans `pattern` for `heads` query heads, `nq` queries and `nk` keys.
    pub fn new(
        pattern: &PatternExpr,
        heads: usize,
        nq: usize,
        nk: usize,
        opts: &IndexOptions,
    ) -> Result<SlashPlan, Error> {
        let (leaf, ctx) = target(pattern)?;
        // (verticals, slashes kept, the pattern's tile, rows estimated from, the grid)
        let (verticals, slash_k, b, last_q, grid) = match leaf {
            PatternExpr::VerticalSlash(vs) => {
                let (Budget::TopK(v), Budget::TopK(s)) = (vs.vertical, vs.slash) else {
                    unreachable!("vs_leaf takes top_k budgets only")
                };
                (Verticals::TopK(v as usize), s as usize, vs.block as usize, vs.last_q as usize, None)
            }
            PatternExpr::Grid(g) => {
                // No slashes: the tile size only shapes the (never kept) tile entries.
                let verticals = Verticals::Grid { stride: g.stride as usize, phase: g.phase.map(|p| p as usize) };
                (verticals, 0, 64, GRID_LAST_Q, Some(g))
            }
            _ => unreachable!("vs_leaf targets vertical_slash and grid leaves only"),
        };
        let is_target = |e: &PatternExpr| std::ptr::eq(e, leaf);
        let placeholder = vs_node(false, false, nq, nk, grid);
        let fix = |e: &PatternExpr| is_target(e).then(|| placeholder.clone());
        let start = static_start(pattern, heads, nq, nk, opts, &fix)?;
        let slots = start.nodes.len();
        let variant = |columns: bool, tiles: bool| -> Vec<Node> {
            let with = vs_node(columns, tiles, nq, nk, grid);
            start.nodes.iter().map(|n| replace_leaf(pattern, n, &is_target, &with)).collect()
        };
        let (tiles, none) = (start.index(variant(false, true))?, start.index(variant(false, false))?);
        let (bm, bn, scale, per_head) = (start.bm, start.bn, start.scale, start.per_head);
        let mut table = MaskTable::from(&tiles.masks);
        let entries = block_entries(&tiles, &none, bn, b, &mut table)?;
        let rules = column_rules(&variant(true, false), &none, &mut table, nq, nk, bm, bn)?;
        check_mask_count(&table)?;
        // A vertical inside a kept tile must add nothing, in every row.
        let inside = column_rules(&variant(true, true), &tiles, &mut MaskTable::from(&tiles.masks), nq, nk, bm, bn)?;
        let q_blocks = nq.div_ceil(bm);
        for row in 0..slots * q_blocks {
            let (lo, hi) = (inside.ptr[row] as usize, inside.ptr[row + 1] as usize);
            let all_dropped =
                hi - lo == 1 && (inside.c0[lo], inside.c1[lo], inside.code[lo]) == (0, nk as u32, u32::from(DROP));
            if !all_dropped {
                return Err(Error::Layout(format!(
                    "in query block {} a vertical inside a slash's tile adds pairs the tile does not compute; GPU \
                     index building needs the tiles to cover them (build this pattern's index on the CPU)",
                    row % q_blocks
                )));
            }
        }

        // The keys each estimated row may attend to, by interval analysis on key ranges.
        let last = last_q.min(nq);
        let words = nk.div_ceil(32);
        let allowed: Vec<u32> = (0..slots * last)
            .into_par_iter()
            .flat_map_iter(|sr| {
                let (h, r) = (sr / last, nq - last + sr % last);
                let mut bits = vec![0u32; words];
                let region = |k0: usize, k1: usize| Region::new(h, (r, r + 1), (k0, k1), (nq, nk));
                let mut stack = vec![(0usize, nk)];
                while let Some((k0, k1)) = stack.pop() {
                    let keep = match decide(&ctx, &region(k0, k1)) {
                        Some(b) => b,
                        None if k1 - k0 == 1 => {
                            ctx.eval(&Env { q: r as i64, k: k0 as i64, h: h as i64, nq: nq as i64, nk: nk as i64 })
                        }
                        None => {
                            let mid = (k0 + k1) / 2;
                            stack.push((mid, k1));
                            stack.push((k0, mid));
                            continue;
                        }
                    };
                    if keep {
                        for k in k0..k1 {
                            bits[k / 32] |= 1 << (k % 32);
                        }
                    }
                }
                bits
            })
            .collect();
        Ok(SlashPlan {
            id: next_plan_id(),
            heads,
            nq,
            nk,
            block_m: bm,
            block_n: bn,
            block: b,
            groups: nq.div_ceil(b),
            kblocks: nk.div_ceil(b),
            last,
            verticals,
            slash_k,
            scale,
            per_head,
            allowed,
            entries,
            rules,
            masks: table.masks,
        })
    }

    /// Query-block rows of the index.
    pub fn q_blocks(&self) -> usize {
        self.nq.div_ceil(self.block_m)
    }

    /// The index for each head's chosen `(verticals, slashes)` (ascending): what the GPU's last
    /// step writes, on the CPU.
    pub fn assemble(&self, chosen: &[SlashChoice]) -> Result<SparseIndex, Error> {
        if chosen.len() != self.heads {
            return Err(Error::Shape(format!("choices for {} heads expected, got {}", self.heads, chosen.len())));
        }
        let mut ix = SparseIndex::empty(self.heads, self.nq, self.nk, self.block_m, self.block_n);
        ix.masks = self.masks.clone();
        for (h, (verticals, slashes)) in chosen.iter().enumerate() {
            let tiles = slash_blocks(slashes, self.block, self.nq, self.nk);
            let slot = if self.per_head { h } else { 0 };
            for qb in 0..self.q_blocks() {
                let g = qb * self.block_m / self.block;
                let row = slot * self.q_blocks() + qb;
                self.entries.push_row(row, |pkb| tiles.selected(g, pkb as usize), &mut ix);
                for &c in verticals {
                    if tiles.selected(g, c as usize / self.block) {
                        continue;
                    }
                    let code = self.rules.code(row, c);
                    if code != DROP {
                        ix.col_idx.push(c);
                        ix.col_mask.push(code);
                    }
                }
                ix.block_ptr.push(ix.block_idx.len() as u32);
                ix.col_ptr.push(ix.col_idx.len() as u32);
            }
        }
        Ok(ix)
    }

    /// The `(verticals, slashes)` the CPU builder chooses per head for `q` and `k`: what the
    /// GPU's selection must reproduce.
    pub fn choose_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<Vec<SlashChoice>, Error> {
        let (leaf, ctx) = target(pattern)?;
        super::check_plan_shape((self.heads, self.nq, self.nk), q, k)?;
        let group = crate::tensor::check_qkv(q, k, None)?;
        q.check_finite("q")?;
        k.check_finite("k")?;
        Ok((0..q.heads)
            .into_par_iter()
            .map(|h| {
                let inp = HeadInputs { q, k, h, kv: h / group, scale: self.scale, wanted: None, estimates: None };
                match leaf {
                    PatternExpr::VerticalSlash(vs) => vertical_slash_choice(vs, &inp, &ctx),
                    PatternExpr::Grid(g) => {
                        let phase = grid_phase(g, &inp, &ctx);
                        ((phase..self.nk).step_by(g.stride as usize).map(|c| c as u32).collect(), Vec::new())
                    }
                    _ => unreachable!("vs_leaf targets vertical_slash and grid leaves only"),
                }
            })
            .collect())
    }
}
