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
//! A `grid` with an estimated phase is the same with no slashes: its verticals are every
//! `stride`-th key from the phase, the in-frame position whose column mass (folded modulo the
//! stride) is heaviest. Its row lines, when it has some, are masks per query block that depend
//! on where the lines fall in the block, not on the phase ([`LineCodes`]): the plan gives each
//! entry a code per offset, and the GPU picks one per query block from the phase.

use rayon::prelude::*;
use weft_dsl::{Budget, Env, Grid, GridLines, PatternExpr, Pred};

use super::lines::Lines;
use super::{
    block_entries, check_mask_count, column_rules, find_leaf, replace_leaf, static_start, BlockEntries, ColumnRules,
    Leaf, LineCodes, PlanShape, DROP,
};
use weft_patterns::families::{
    grid_phase, grid_rows_and_sink, slash_blocks, vertical_slash_choice, ColSel, HeadInputs, Node, GRID_LAST_Q,
};
use weft_patterns::index::MaskTable;
use weft_patterns::interval::{decide, Region};
use weft_patterns::Error;
use weft_patterns::{IndexOptions, SparseIndex, Tensor};

/// The static part of a vertical-slash index (see the module docs).
#[derive(Clone, Debug)]
pub struct SlashPlan {
    pub shape: PlanShape,
    /// The pattern's tile: query rows per group and keys per pattern key block.
    pub block: usize,
    pub groups: usize,
    pub kblocks: usize,
    /// Estimated rows: the last `last` queries.
    pub last: usize,
    /// How verticals are chosen, and slashes kept (`top_k(n)`; 0 for a grid).
    pub verticals: Verticals,
    pub slash_k: usize,
    /// `allowed[(slot * last + r) * words + k / 32]`, bit `k % 32`: estimated row `nq - last +
    /// r` may attend to key `k` (`words = ceil(nk / 32)`).
    pub allowed: Vec<u32>,
    /// Per index row, its possible key blocks and their codes when the tile holding them (their
    /// pattern key block) is kept or not (a grid keeps no tile; with row lines, `code_line`
    /// holds the codes of query blocks with line rows).
    pub entries: BlockEntries,
    /// What a vertical whose tile is not kept becomes in each row; with row lines, a second
    /// set of rows (from `slots x q_blocks` on) for query blocks holding line rows.
    pub rules: ColumnRules,
    /// A grid's row lines with an estimated phase: the codes of `entries.code_line` and of the
    /// second set of rules (`len == 0` without them).
    pub lines: LineCodes,
    /// The mask table the codes index (generate the attention kernel with it).
    pub masks: Vec<Pred>,
}

/// How a [`SlashPlan`]'s verticals are chosen from the column masses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verticals {
    /// The `n` heaviest keys (`vertical_slash`).
    TopK(usize),
    /// Every `stride`-th key from `phase`, or when that is `None` from the heaviest in-frame
    /// position (`grid`); no verticals unless `cols` (a grid of row lines only).
    Grid { stride: usize, phase: Option<usize>, cols: bool },
}

/// One head's choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlashChoice {
    /// Verticals (keys) and slashes (diagonal numbers), each ascending.
    pub verticals: Vec<u32>,
    pub slashes: Vec<u32>,
    /// A grid's phase (its row lines are the queries `q % stride == phase`).
    pub phase: Option<usize>,
}

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
        PatternExpr::Grid(_) => Leaf::Target(e),
        PatternExpr::VerticalSlash(_) => Leaf::Unsupported("a vertical_slash with a top_p or threshold budget"),
        PatternExpr::Block(_) => Leaf::Unsupported("a block selection"),
        PatternExpr::VerticalVector(_) => Leaf::Unsupported("a vertical_vector selection"),
        _ => Leaf::Unsupported("a retrieval selection"),
    }
}

const SUPPORTS: &str = "one vertical_slash(vertical = top_k(n), slash = top_k(m)) or one grid";

/// Where a grid's row lines with an estimated phase are in a plan's variant of the pattern.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// On no row.
    Off,
    /// On every row.
    On,
    /// The placeholder ([`weft_patterns::families::RowLines`] without a phase).
    Placeholder,
}

/// The leaf's node with the given choice: no verticals (or every key), no tiles (or all),
/// plus a grid's row lines and sink (row lines at an estimated phase as `rows` says).
fn vs_node(columns: bool, tiles: bool, rows: Rows, (nq, nk, bm): (usize, usize, usize), grid: Option<&Grid>) -> Node {
    let cols = if columns { (0..nk as u32).collect() } else { Vec::new() };
    let mut items = vec![Node::Columns(ColSel { bq: nq.max(1), cols: vec![cols] }), Node::Static(Pred::Const(tiles))];
    if let Some(g) = grid {
        items.extend(grid_rows_and_sink(g, None, bm).into_iter().map(|n| match (n, rows) {
            (Node::RowLines(_), Rows::Off) => Node::Static(Pred::Const(false)),
            (Node::RowLines(_), Rows::On) => Node::Static(Pred::Const(true)),
            (n, _) => n,
        }));
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
    /// Verticals a head chooses at most: `n` for top_k, a grid's `ceil(nk / stride)` lines
    /// (at least 1: GPU builders size per-head lists with it).
    pub fn max_verticals(&self) -> usize {
        match self.verticals {
            Verticals::TopK(n) => n.clamp(1, self.shape.nk.max(1)),
            Verticals::Grid { stride, .. } => self.shape.nk.div_ceil(stride.max(1)).max(1),
        }
    }

    /// Column entries an index over every head holds at most: one per vertical in each row.
    pub fn column_bound(&self) -> usize {
        self.shape.heads * self.shape.q_blocks() * self.max_verticals()
    }

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
                let cols = g.lines != GridLines::Rows;
                let verticals = Verticals::Grid { stride: g.stride as usize, phase: g.phase.map(|p| p as usize), cols };
                (verticals, 0, 64, GRID_LAST_Q, Some(g))
            }
            _ => unreachable!("vs_leaf targets vertical_slash and grid leaves only"),
        };
        // Row lines at an estimated phase: codes per offset in the query block.
        let row_lines = grid.filter(|g| g.phase.is_none() && g.lines != GridLines::Cols);
        let is_target = |e: &PatternExpr| std::ptr::eq(e, leaf);
        let bm = weft_patterns::index::layout(pattern, opts)?.0;
        let shape = (nq, nk, bm);
        let placeholder = vs_node(false, false, Rows::Off, shape, grid);
        let fix = |e: &PatternExpr| is_target(e).then(|| placeholder.clone());
        let start = static_start(pattern, heads, nq, nk, opts, &fix)?;
        let slots = start.nodes.len();
        let variant = |columns: bool, tiles: bool, rows: Rows| -> Vec<Node> {
            let with = vs_node(columns, tiles, rows, shape, grid);
            start.nodes.iter().map(|n| replace_leaf(pattern, n, &is_target, &with)).collect()
        };
        // Every block an index can have: with the tiles kept, or for row lines (a grid, which
        // keeps no tiles) with lines on every row.
        let most = if row_lines.is_some() { variant(false, false, Rows::On) } else { variant(false, true, Rows::Off) };
        let (tiles, none) = (start.index(most)?, start.index(variant(false, false, Rows::Off))?);
        let bn = start.bn;
        let mut table = MaskTable::with_masks(&tiles.masks);
        let mut entries = block_entries(&tiles, &none, bn, b, &mut table)?;
        let mut rules = column_rules(&variant(true, false, Rows::Off), &none, &mut table, nq, nk, bm, bn)?;
        let mut lines = LineCodes::default();
        if let Some(g) = row_lines {
            let stride = g.stride as usize;
            lines = LineCodes { stride, len: stride.min(bm), ..LineCodes::default() };
            let (sym, off, on) = (
                variant(true, false, Rows::Placeholder),
                variant(true, false, Rows::Off),
                variant(true, false, Rows::On),
            );
            let planner =
                Lines { stride, bm, bn, nq, nk, sym: &sym, off: &off, on: &on, cols: g.lines == GridLines::Both };
            entries.code_line = planner.block_codes(&entries, &mut table, &mut lines)?;
            planner.column_rules(&entries, &entries.code_line, &mut rules, &mut table, &mut lines)?;
        }
        check_mask_count(&table)?;
        let q_blocks = nq.div_ceil(bm);
        // A vertical inside a kept tile must add nothing, in every row (grids keep no tiles).
        if grid.is_none() {
            let inside = column_rules(
                &variant(true, true, Rows::Off),
                &tiles,
                &mut MaskTable::with_masks(&tiles.masks),
                nq,
                nk,
                bm,
                bn,
            )?;
            for row in 0..slots * q_blocks {
                let (lo, hi) = (inside.ptr[row] as usize, inside.ptr[row + 1] as usize);
                let all_dropped =
                    hi - lo == 1 && (inside.c0[lo], inside.c1[lo], inside.code[lo]) == (0, nk as u32, u32::from(DROP));
                if !all_dropped {
                    return Err(Error::Layout(format!(
                        "in query block {} a vertical inside a slash's tile adds pairs the tile does not compute; \
                         GPU index building needs the tiles to cover them (build this pattern's index on the CPU)",
                        row % q_blocks
                    )));
                }
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
            shape: start.shape(heads),
            block: b,
            groups: nq.div_ceil(b),
            kblocks: nk.div_ceil(b),
            last,
            verticals,
            slash_k,
            allowed,
            entries,
            rules,
            lines,
            masks: table.into_masks(),
        })
    }

    /// The index for each head's choice (verticals, slashes, and a grid's phase, which places
    /// its row lines): what the GPU's last step writes, on the CPU.
    pub fn assemble(&self, chosen: &[SlashChoice]) -> Result<SparseIndex, Error> {
        let shape = &self.shape;
        if chosen.len() != shape.heads {
            return Err(Error::Shape(format!("choices for {} heads expected, got {}", shape.heads, chosen.len())));
        }
        let mut ix = shape.empty_index();
        ix.masks = self.masks.clone();
        // Rules of query blocks with line rows follow the others.
        let line_rows = shape.slots() * shape.q_blocks();
        for (h, choice) in chosen.iter().enumerate() {
            let tiles = slash_blocks(&choice.slashes, self.block, shape.nq, shape.nk);
            for qb in 0..shape.q_blocks() {
                let g = qb * shape.block_m / self.block;
                let row = shape.slot(h) * shape.q_blocks() + qb;
                // The offset of the query block's row lines, when it holds some.
                let r = choice.phase.and_then(|p| self.lines.offset(p, qb * shape.block_m));
                self.entries.push_row(row, |pkb| tiles.selected(g, pkb as usize), r.map(|r| (&self.lines, r)), &mut ix);
                for &c in &choice.verticals {
                    if tiles.selected(g, c as usize / self.block) {
                        continue;
                    }
                    let code = match r {
                        Some(r) => self.lines.resolve(self.rules.code(line_rows + row, c), r),
                        None => self.rules.code(row, c) as u16,
                    };
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

    /// The choice (verticals, slashes, a grid's phase) the CPU builder makes per head for `q`
    /// and `k`: what the GPU's selection must reproduce.
    pub fn choose_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<Vec<SlashChoice>, Error> {
        let (leaf, ctx) = target(pattern)?;
        self.shape.check(q, k)?;
        let group = weft_patterns::tensor::check_qkv(q, k, None)?;
        q.check_finite("q")?;
        k.check_finite("k")?;
        Ok((0..q.heads)
            .into_par_iter()
            .map(|h| {
                let inp = HeadInputs {
                    q,
                    k,
                    h,
                    kv: h / group,
                    scale: self.shape.scale,
                    block_m: self.shape.block_m,
                    wanted: None,
                    estimates: None,
                };
                match leaf {
                    PatternExpr::VerticalSlash(vs) => {
                        let (verticals, slashes) = vertical_slash_choice(vs, &inp, &ctx);
                        SlashChoice { verticals, slashes, phase: None }
                    }
                    PatternExpr::Grid(g) => {
                        let phase = grid_phase(g, &inp, &ctx);
                        let verticals = match g.lines {
                            GridLines::Rows => Vec::new(),
                            _ => (phase..self.shape.nk).step_by(g.stride as usize).map(|c| c as u32).collect(),
                        };
                        SlashChoice { verticals, slashes: Vec::new(), phase: Some(phase) }
                    }
                    _ => unreachable!("vs_leaf targets vertical_slash and grid leaves only"),
                }
            })
            .collect())
    }
}
