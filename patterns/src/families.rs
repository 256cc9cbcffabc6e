//! Dynamic selection: each family's choice of blocks or columns for one head, from Q and K.
//!
//! Resolution turns a pattern expression into a [`Node`] tree for one head, in which every
//! dynamic family has been replaced by what it selected ([`BlockSel`], [`ColSel`]) and by
//! the static predicates it always keeps (sink, local band, grid rows). The index builder and
//! the dense mask both read this tree, so they agree by construction on *what* was selected;
//! the property tests check that the compressed index agrees with the tree pair by pair.
//!
//! Selections are made over the candidates the enclosing intersection allows: in
//! `causal & block(keep = top_k(4))` the four blocks are chosen among those not entirely in
//! the future, as MInference does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use weft_dsl::builder;
use weft_dsl::*;

use crate::interval::{decide, Region};
use crate::repro;
use crate::retrieval;
use crate::select::{select, select_mass};
pub use crate::selection::{BlockSel, ColSel};
use crate::tensor::{dot, Tensor};
use crate::Error;

/// The inputs of one head's selection, in index coordinates (already permuted if the
/// pattern is permuted).
pub struct HeadInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    /// Query head.
    pub h: usize,
    /// Key/value head (`h / group` under GQA).
    pub kv: usize,
    pub scale: f64,
    /// Rows per query block of the index being built: row lines with an estimated phase are
    /// expressed per query block (see [`RowLines`]).
    pub block_m: usize,
    /// Query rows to build (`None`: all); selections for other rows are skipped.
    pub wanted: Option<&'a [bool]>,
    /// Estimates shared with other builds over the same Q and K.
    pub estimates: Option<&'a Estimates>,
}

impl HeadInputs<'_> {
    /// Whether any row of `q0..q1` is wanted.
    fn wants(&self, q0: usize, q1: usize) -> bool {
        self.wanted.is_none_or(|w| w[q0..q1.min(w.len())].iter().any(|x| *x))
    }

    fn nq(&self) -> usize {
        self.q.tokens
    }
    fn nk(&self) -> usize {
        self.k.tokens
    }
    fn region(&self, q0: usize, q1: usize, k0: usize, k1: usize) -> Region {
        Region::new(self.h, (q0, q1), (k0, k1), (self.nq(), self.nk()))
    }
    fn pooled_q(&self, q0: usize, q1: usize) -> Vec<f32> {
        pooled(self.q, self.h, q0, q1)
    }
}

fn pooled(t: &Tensor, head: usize, t0: usize, t1: usize) -> Vec<f32> {
    let mut acc = vec![0f64; t.dim];
    for i in t0..t1 {
        for (a, x) in acc.iter_mut().zip(t.row(head, i)) {
            *a += f64::from(*x);
        }
    }
    let n = (t1 - t0).max(1) as f64;
    acc.into_iter().map(|a| (a / n) as f32).collect()
}

/// A grid's row lines with an estimated phase: query rows `q % stride == phase` attend to
/// every key.
///
/// In the index, a query block's mask names the rows by their offset in the block
/// ([`RowLines::tile_mask`]: `q % block_m == r`, or `q % block_m % stride == r` for strides
/// below `block_m`), not by the phase: the same pairs, but the mask table then does not depend
/// on the phase, so GPU-built indexes can use one attention kernel whatever phase each head's
/// estimate finds. A phase given in the pattern is a static predicate instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLines {
    pub stride: usize,
    /// The phase; `None` in GPU plans, where it is not known yet (coverage is then a
    /// placeholder mask, [`RowLines::placeholder`]).
    pub phase: Option<usize>,
    pub block_m: usize,
}

impl RowLines {
    /// The line rows of a query block whose rows lie at offsets `r`, `r + stride`, ... in the
    /// block (offsets past the block's rows select nothing).
    pub fn tile_mask(stride: usize, block_m: usize, r: usize) -> Pred {
        let offset = builder::q() % block_m as i64;
        let offset = if stride >= block_m { offset } else { offset % stride as i64 };
        offset.eq(builder::lit(r as i64))
    }

    /// The offset in the query block starting at row `q0` of its first line row: line rows
    /// are `q0 + r`, `q0 + r + stride`, ... (none in the block when `r` is past its rows).
    pub fn tile_offset(stride: usize, phase: usize, q0: usize) -> usize {
        let stride = stride.max(1);
        (phase % stride + stride - q0 % stride) % stride
    }

    /// The mask that stands for a placeholder's rows in a plan's symbolic coverage; plans
    /// substitute [`RowLines::tile_mask`] for it. (A comparison of two constants, which no
    /// pattern writes: validation keeps constants far from `i64::MIN`.)
    pub fn placeholder() -> Pred {
        builder::lit(i64::MIN).eq(builder::lit(i64::MIN + 1))
    }

    /// Whether query row `q` is a line row.
    pub fn contains(&self, q: usize) -> bool {
        self.phase.is_some_and(|p| q % self.stride == p)
    }

    /// The predicate this node keeps over rows `q0..q1`: within one query block (every index
    /// region is) the block's [`RowLines::tile_mask`]; a region spanning blocks gets the
    /// phase's own predicate.
    pub fn pred_over(&self, q0: usize, q1: usize) -> Pred {
        let Some(phase) = self.phase else { return RowLines::placeholder() };
        let bm = self.block_m;
        if bm > 0 && q1 > q0 && q0 / bm == (q1 - 1) / bm {
            // The offset counts from the block's first row, wherever the region starts in it.
            RowLines::tile_mask(self.stride, bm, RowLines::tile_offset(self.stride, phase, q0 - q0 % bm))
        } else {
            (builder::q() % self.stride as i64).eq(builder::lit(phase as i64))
        }
    }
}

/// A pattern for one head with every dynamic choice made.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Static(Pred),
    Blocks(BlockSel),
    Columns(ColSel),
    RowLines(RowLines),
    Union(Vec<Node>),
    Intersect(Vec<Node>),
}

impl Node {
    /// Membership of one pair, straight from the selections (the dense definition).
    pub fn contains(&self, q: usize, k: usize, env: &Env) -> bool {
        match self {
            Node::Static(p) => p.eval(env),
            Node::Blocks(b) => b.selected(q / b.bq, k / b.bk),
            Node::Columns(c) => c.selected(q, k),
            Node::RowLines(l) => l.contains(q),
            Node::Union(items) => items.iter().any(|n| n.contains(q, k, env)),
            Node::Intersect(items) => items.iter().all(|n| n.contains(q, k, env)),
        }
    }

    /// Whether the tree selects blocks (whose coverage is per block, not per range of blocks).
    pub fn has_block_sels(&self) -> bool {
        match self {
            Node::Blocks(_) => true,
            Node::Union(items) | Node::Intersect(items) => items.iter().any(Node::has_block_sels),
            _ => false,
        }
    }

    /// Every grid row-line node in the tree (rows at an estimated phase).
    pub fn row_lines(&self) -> Vec<&RowLines> {
        match self {
            Node::RowLines(l) => vec![l],
            Node::Union(items) | Node::Intersect(items) => items.iter().flat_map(Node::row_lines).collect(),
            _ => Vec::new(),
        }
    }

    /// Every column selection in the tree.
    pub fn column_sels(&self) -> Vec<&ColSel> {
        match self {
            Node::Columns(c) => vec![c],
            Node::Union(items) | Node::Intersect(items) => items.iter().flat_map(Node::column_sels).collect(),
            _ => Vec::new(),
        }
    }
}

fn static_pred(e: PatternExpr) -> Pred {
    match e {
        PatternExpr::Static(p) => p,
        _ => Pred::Const(false),
    }
}

/// Resolves `expr` for one head; `ctx` is the static predicate of enclosing intersections.
pub fn resolve(expr: &PatternExpr, inp: &HeadInputs<'_>, ctx: &Pred) -> Result<Node, Error> {
    Ok(match expr {
        PatternExpr::Static(p) => Node::Static(p.clone()),
        PatternExpr::Union(items) => Node::Union(items.iter().map(|e| resolve(e, inp, ctx)).collect::<Result<_, _>>()?),
        PatternExpr::Intersect(items) => {
            let mut inner_ctx = ctx.clone();
            for item in items {
                if let PatternExpr::Static(p) = item {
                    inner_ctx = inner_ctx.and(p.clone());
                }
            }
            Node::Intersect(items.iter().map(|e| resolve(e, inp, &inner_ctx)).collect::<Result<_, _>>()?)
        }
        PatternExpr::Block(b) => Node::Blocks(block(b, inp, ctx)),
        PatternExpr::VerticalVector(v) => {
            let mut items = vec![Node::Columns(vertical_vector(v, inp, ctx))];
            if v.sink > 0 {
                items.push(Node::Static(static_pred(builder::sink(v.sink))));
            }
            if v.local > 0 {
                items.push(Node::Static(static_pred(builder::local(v.local))));
            }
            Node::Union(items)
        }
        PatternExpr::VerticalSlash(v) => {
            let (cols, blocks) = vertical_slash(v, inp, ctx);
            Node::Union(vec![Node::Columns(cols), Node::Blocks(blocks)])
        }
        PatternExpr::Grid(g) => grid(g, inp, ctx),
        PatternExpr::Retrieval(r) => {
            Node::Columns(retrieval::select_head(r, (inp.q, inp.k), (inp.h, inp.kv), inp.scale, inp.wanted, ctx))
        }
        PatternExpr::Permuted { .. } | PatternExpr::Ring { .. } => {
            return Err(Error::Layout(
                "permuted(...) and ring(...) must be outermost; the index builder strips them first".into(),
            ))
        }
    })
}

/// `ctx` allows at least one pair of the region.
fn allowed(ctx: &Pred, r: &Region) -> bool {
    decide(ctx, r) != Some(false)
}

fn block(b: &Block, inp: &HeadInputs<'_>, ctx: &Pred) -> BlockSel {
    let (bq, bk) = (b.block_q as usize, b.block_k as usize);
    let nqb = inp.nq().div_ceil(bq);
    let nkb = inp.nk().div_ceil(bk);
    let mut keep = vec![false; nqb * nkb];
    match &b.keep {
        BlockKeep::Where(p) => {
            for qb in 0..nqb {
                for kb in 0..nkb {
                    let env =
                        Env { q: qb as i64, k: kb as i64, h: inp.h as i64, nq: inp.nq() as i64, nk: inp.nk() as i64 };
                    keep[qb * nkb + kb] = p.eval(&env);
                }
            }
        }
        BlockKeep::Budget(budget) => {
            let pooled_k: Vec<Vec<f32>> =
                (0..nkb).map(|kb| pooled(inp.k, inp.kv, kb * bk, ((kb + 1) * bk).min(inp.nk()))).collect();
            for qb in 0..nqb {
                let (q0, q1) = (qb * bq, ((qb + 1) * bq).min(inp.nq()));
                if !inp.wants(q0, q1) {
                    continue;
                }
                let pq = inp.pooled_q(q0, q1);
                let cands: Vec<(u32, f64)> = (0..nkb)
                    .filter(|&kb| allowed(ctx, &inp.region(q0, q1, kb * bk, ((kb + 1) * bk).min(inp.nk()))))
                    .map(|kb| (kb as u32, inp.scale * dot(&pq, &pooled_k[kb])))
                    .collect();
                for kb in select(&cands, *budget) {
                    keep[qb * nkb + kb as usize] = true;
                }
            }
        }
    }
    BlockSel { bq, bk, nkb, keep }
}

fn vertical_vector(v: &VerticalVector, inp: &HeadInputs<'_>, ctx: &Pred) -> ColSel {
    let bq = v.q_block as usize;
    let scores = column_scores(v, inp, ctx);
    ColSel {
        bq,
        cols: scores.iter().map(|cands| if cands.is_empty() { Vec::new() } else { select(cands, v.keep) }).collect(),
    }
}

/// Per query group of a vertical vector: `(key, score)` of every key its context allows past
/// the sink (empty for groups no wanted row is in). Shared through the estimates by builds of
/// the whole index that differ only in their budget (a search's top-k candidates).
fn column_scores(v: &VerticalVector, inp: &HeadInputs<'_>, ctx: &Pred) -> Arc<ColumnScores> {
    let bq = v.q_block as usize;
    let compute = || {
        let groups = inp.nq().div_ceil(bq);
        let scores = (0..groups)
            .map(|g| {
                let (q0, q1) = (g * bq, ((g + 1) * bq).min(inp.nq()));
                if !inp.wants(q0, q1) {
                    return Vec::new();
                }
                let pq = inp.pooled_q(q0, q1);
                // Sink columns are always kept, so they do not compete for the budget.
                let keys: Vec<usize> =
                    (v.sink as usize..inp.nk()).filter(|&c| allowed(ctx, &inp.region(q0, q1, c, c + 1))).collect();
                // Scores with repro::dot (one accumulator, as the GPU builder's exact scores),
                // best first as `select` ranks them, so that ranking them again is one pass.
                let mut cands: Vec<(u32, f64)> =
                    keys.iter().zip(scaled_dots(inp, &pq, &keys)).map(|(&c, s)| (c as u32, s)).collect();
                cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                cands
            })
            .collect();
        Arc::new(scores)
    };
    // Only whole builds share: a row-restricted build leaves groups empty.
    let Some(est) = inp.estimates.filter(|_| inp.wanted.is_none()) else { return compute() };
    let key = (
        inp.q.data.as_ptr() as usize,
        inp.k.data.as_ptr() as usize,
        inp.h,
        ctx.to_string(),
        (bq, v.sink as usize),
        inp.scale.to_bits(),
    );
    let Ok(mut cells) = est.columns.lock() else { return compute() };
    let cell = cells.entry(key).or_default().clone();
    drop(cells);
    cell.get_or_init(compute).clone()
}

/// `scale * repro::dot(q, k_c)` for each key `c` of `keys`, in order: eight keys at a time
/// through [`repro::dots`] (the same sums as one at a time, with the CPU's pipeline full).
fn scaled_dots(inp: &HeadInputs<'_>, q: &[f32], keys: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(keys.len());
    for batch in keys.chunks(8) {
        if let Ok(ks) = <[usize; 8]>::try_from(batch) {
            out.extend(repro::dots::<8>(q, ks.map(|c| inp.k.row(inp.kv, c))).map(|dot| inp.scale * dot));
        } else {
            out.extend(batch.iter().map(|&c| inp.scale * repro::dot(q, inp.k.row(inp.kv, c))));
        }
    }
    out
}

/// The softmax mass of one head's last queries (over the keys a context allows), summed per
/// key column (`vert[k]`) and per diagonal (`slash[r + nk - k]`): what vertical-slash and grid
/// selections estimate from.
#[derive(Debug)]
pub struct LastRowsMass {
    pub vert: Vec<f64>,
    pub slash: Vec<f64>,
}

/// Estimates shared by several index builds over the same Q and K: a pattern search builds
/// every candidate over one layer, and all vertical-slash and grid candidates read the same
/// last-query softmax mass, computed once per (head, context, rows) here instead of once per
/// candidate. Pass one through [`crate::IndexOptions::estimates`]; entries are keyed by the
/// tensors' addresses too, so a cache used with other tensors computes afresh.
#[derive(Debug, Default)]
pub struct Estimates {
    /// One cell per key, filled once: concurrent builds wait for the first instead of
    /// computing the same mass again.
    mass: Mutex<HashMap<EstimateKey, Arc<OnceLock<Arc<LastRowsMass>>>>>,
    /// Vertical vectors' column scores per query group, for whole builds.
    columns: Mutex<HashMap<ColumnKey, Arc<OnceLock<Arc<ColumnScores>>>>>,
}

/// (Q address, K address, head, context predicate, last rows, scale bits).
type EstimateKey = (usize, usize, usize, String, usize, u64);
/// Per query group, `(key, score)` best first.
type ColumnScores = Vec<Vec<(u32, f64)>>;
/// (Q address, K address, head, context predicate, (q_block, sink), scale bits).
type ColumnKey = (usize, usize, usize, String, (usize, usize), u64);

/// [`LastRowsMass`] of `inp`'s head, from the shared estimates when there are some.
fn last_rows_mass(inp: &HeadInputs<'_>, ctx: &Pred, last: usize) -> Arc<LastRowsMass> {
    let compute = || {
        let (nq, nk) = (inp.nq(), inp.nk());
        let mut m = LastRowsMass { vert: vec![0f64; nk], slash: vec![0f64; nq + nk] };
        last_rows_attention(inp, ctx, last, |r, k, p| {
            m.vert[k] += p;
            m.slash[r + nk - k] += p;
        });
        Arc::new(m)
    };
    let Some(est) = inp.estimates else { return compute() };
    let key =
        (inp.q.data.as_ptr() as usize, inp.k.data.as_ptr() as usize, inp.h, ctx.to_string(), last, inp.scale.to_bits());
    let Ok(mut cells) = est.mass.lock() else { return compute() };
    let cell = cells.entry(key).or_default().clone();
    drop(cells);
    // Filled outside the map's lock: heads resolve in parallel, each with its own keys.
    cell.get_or_init(compute).clone()
}

/// Softmax rows of the last `last` queries over the keys `ctx` allows; calls `f(row, key, p)`
/// for rows in ascending order, keys ascending within a row. The arithmetic is the GPU
/// builder's ([`crate::repro`]): [`repro::dot`], [`repro::exp`], the row total summed in chunks
/// of keys (a key `ctx` excludes adds nothing to its chunk), and `p = weight * (1 / total)`.
pub(crate) fn last_rows_attention(inp: &HeadInputs<'_>, ctx: &Pred, last: usize, mut f: impl FnMut(usize, usize, f64)) {
    let (nq, nk) = (inp.nq(), inp.nk());
    for r in nq - last.min(nq)..nq {
        let env = |k: usize| Env { q: r as i64, k: k as i64, h: inp.h as i64, nq: nq as i64, nk: nk as i64 };
        let q = inp.q.row(inp.h, r);
        // Dots only for the keys the context allows, eight at a time.
        let allowed: Vec<usize> = (0..nk).filter(|&k| ctx.eval(&env(k))).collect();
        let mut logits: Vec<Option<f64>> = vec![None; nk];
        for (&k, s) in allowed.iter().zip(scaled_dots(inp, q, &allowed)) {
            logits[k] = Some(s);
        }
        let Some(max) = logits.iter().flatten().copied().reduce(f64::max) else { continue };
        let weights: Vec<f64> = logits.iter().map(|s| s.map_or(0.0, |s| repro::exp(s - max))).collect();
        let inv = 1.0 / repro::chunked_sum(&weights);
        for (k, s) in logits.iter().enumerate() {
            if s.is_some() {
                f(r, k, weights[k] * inv);
            }
        }
    }
}

/// The verticals and slashes (diagonal numbers) a vertical-slash leaf chooses for one head.
pub fn vertical_slash_choice(v: &VerticalSlash, inp: &HeadInputs<'_>, ctx: &Pred) -> (Vec<u32>, Vec<u32>) {
    let mass = last_rows_mass(inp, ctx, v.last_q as usize);
    let ids = |m: &[f64]| m.iter().enumerate().map(|(i, m)| (i as u32, *m)).collect::<Vec<_>>();
    (select_mass(&ids(&mass.vert), v.vertical), select_mass(&ids(&mass.slash), v.slash))
}

/// The `block x block` tiles chosen slashes keep, for `nq` queries and `nk` keys.
///
/// Diagonal of (r, k) is numbered i = r + nk - k, in 1..nq + nk; i = nq is the causal main
/// diagonal (k = r + nk - nq) and larger i lie further in the past.
pub fn slash_blocks(slashes: &[u32], block: usize, nq: usize, nk: usize) -> BlockSel {
    let b = block;
    let groups = nq.div_ceil(b);
    let nkb = nk.div_ceil(b);
    let mut keep = vec![false; groups * nkb];
    for g in 0..groups {
        let (q0, q1) = (g * b, ((g + 1) * b).min(nq));
        for &i in slashes {
            // Row q meets diagonal i at key q + nk - i.
            let lo = (q0 + nk).saturating_sub(i as usize);
            let hi = (q1 - 1 + nk).checked_sub(i as usize).map(|x| x.min(nk - 1));
            if let Some(hi) = hi {
                if lo <= hi {
                    for kb in lo / b..=hi / b {
                        keep[g * nkb + kb] = true;
                    }
                }
            }
        }
    }
    BlockSel { bq: b, bk: b, nkb, keep }
}

fn vertical_slash(v: &VerticalSlash, inp: &HeadInputs<'_>, ctx: &Pred) -> (ColSel, BlockSel) {
    let (nq, nk) = (inp.nq(), inp.nk());
    let (verticals, slashes) = vertical_slash_choice(v, inp, ctx);
    let b = v.block as usize;
    (ColSel { bq: b, cols: vec![verticals; nq.div_ceil(b)] }, slash_blocks(&slashes, b, nq, nk))
}

/// Query rows a grid estimates its phase from (the last ones).
pub const GRID_LAST_Q: usize = 64;

/// A grid's phase for one head: the given one, or the heaviest in-frame position of the last
/// [`GRID_LAST_Q`] queries' column mass, folded modulo the stride in key order (ties go to
/// the lowest position).
pub fn grid_phase(g: &Grid, inp: &HeadInputs<'_>, ctx: &Pred) -> usize {
    let stride = g.stride as usize;
    g.phase.map(|p| p as usize).unwrap_or_else(|| {
        let mut mass = vec![0f64; stride];
        for (k, m) in last_rows_mass(inp, ctx, GRID_LAST_Q).vert.iter().enumerate() {
            mass[k % stride] += m;
        }
        let mut best = 0;
        for (i, m) in mass.iter().enumerate() {
            if *m > mass[best] {
                best = i;
            }
        }
        best
    })
}

fn grid(g: &Grid, inp: &HeadInputs<'_>, ctx: &Pred) -> Node {
    let stride = g.stride as usize;
    let phase = grid_phase(g, inp, ctx);
    let mut items = Vec::new();
    if matches!(g.lines, GridLines::Cols | GridLines::Both) {
        let cols: Vec<u32> = (phase..inp.nk()).step_by(stride).map(|c| c as u32).collect();
        // One group spans every query.
        items.push(Node::Columns(ColSel { bq: inp.nq().max(1), cols: vec![cols] }));
    }
    items.extend(grid_rows_and_sink(g, Some(phase), inp.block_m));
    Node::Union(items)
}

/// A grid's row lines (when its lines include rows) and sink. Rows at a phase given in the
/// pattern are a static predicate; rows at an estimated phase (`estimated`, or `None` for a
/// GPU plan's placeholder) are [`RowLines`] over query blocks of `block_m` rows. GPU plans
/// build a grid's node around these.
pub fn grid_rows_and_sink(g: &Grid, estimated: Option<usize>, block_m: usize) -> Vec<Node> {
    let mut items = Vec::new();
    if matches!(g.lines, GridLines::Rows | GridLines::Both) {
        items.push(match g.phase {
            Some(p) => Node::Static((builder::q() % i64::from(g.stride)).eq(builder::lit(i64::from(p)))),
            None => Node::RowLines(RowLines { stride: g.stride as usize, phase: estimated, block_m }),
        });
    }
    if g.sink > 0 {
        items.push(Node::Static(static_pred(builder::sink(g.sink))));
    }
    items
}
