//! Plans for building indexes on the GPU: [`ColumnPlan`] (vertical-vector), [`BlockPlan`]
//! (block top-k / top-p / threshold) and [`SlashPlan`] (vertical-slash and grids; a grid's row
//! lines at an estimated phase take codes per offset in the query block, [`LineCodes`]). The
//! vertical-vector plan is described here; the others follow the same idea.
//!
//! In a pattern whose only dynamic part is one `vertical_vector` (any budget), everything
//! but the chosen columns is static: the key blocks (sink, local band, causal edges and any
//! other predicate) do not depend on Q and K, and neither does what a chosen column becomes in
//! the index (a full entry, a masked one, or nothing because a block already computes it).
//! A [`ColumnPlan`] computes that static part once per shape on the CPU:
//! - the *skeleton*: the index with no columns chosen (its blocks and masks);
//! - per query group, the range of candidate columns the selection ranks (sink excluded,
//!   and only keys the enclosing predicates allow, as the CPU selection does);
//! - per index row, *column rules*: runs of keys with the entry code a chosen column there
//!   gets (`DROP`, [`FULL`] or a mask id), so the GPU turns a group's chosen columns into
//!   the row's column list with a binary search per column.
//!
//! The GPU then only scores, selects and compresses (`weft-runtime`'s device index builder),
//! and the result is the index [`weft_patterns::build_index`] builds: [`ColumnPlan::assemble`] is the
//! CPU mirror of that last step, and the tests check it against `build_index` pair for pair.
//!
//! The plans live in codegen because what they hold is the GPU builders' input: arrays in the
//! encoding the index module's kernels read ([`DROP`], [`PER_COLUMN`], [`PER_LINE`], emitted
//! into the module's config from these constants). What an entry covers is weft-patterns'
//! (its coverage analysis: [`weft_patterns::index::cov`], [`weft_patterns::index::settle`]),
//! which stays the oracle the plans are checked against.

mod blocks;
mod codes;
mod columns;
mod lines;
mod slash;

use rayon::prelude::*;
use weft_dsl::{Budget, GridLines, PatternExpr, Pred, Var, VerticalVector};

use blocks::block_entries;
pub use blocks::{BlockEntries, BlockPlan};
pub use codes::{ColumnRules, LineCodes, DROP, PER_COLUMN, PER_LINE};
use columns::column_rules;
pub use columns::ColumnPlan;
pub use slash::{SlashChoice, SlashPlan, Verticals};
use weft_patterns::families::{resolve, HeadInputs, Node};
use weft_patterns::index::{and, choose_all, cov, layout, settle, Cov, Entry, MaskTable};
use weft_patterns::interval::{decide, Region};
use weft_patterns::Error;
use weft_patterns::{IndexOptions, SparseIndex, Tensor, FULL};

/// A fresh plan id (see [`ColumnPlan::id`]).
fn next_plan_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What every plan records of its shape and identity.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanShape {
    /// Names the plan's contents for caches of its device copy (a clone shares it). Plans are
    /// built once and only read: do not change a plan's fields after it is made.
    pub id: u64,
    /// Query heads, queries and keys.
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    /// The index's rows per query block and keys per key block.
    pub block_m: usize,
    pub block_n: usize,
    pub scale: f64,
    /// Whether the plan's static parts differ per head (the pattern reads `h`): then each head
    /// has its own slot of rows and candidates, otherwise every head reads slot 0.
    pub per_head: bool,
}

impl PlanShape {
    /// Query-block rows of the index.
    pub fn q_blocks(&self) -> usize {
        self.nq.div_ceil(self.block_m)
    }

    /// The slot head `h` reads.
    pub fn slot(&self, h: usize) -> usize {
        if self.per_head {
            h
        } else {
            0
        }
    }

    /// Slots: one per head, or one for all.
    pub fn slots(&self) -> usize {
        if self.per_head {
            self.heads
        } else {
            1
        }
    }

    /// An index of this shape with no entries.
    fn empty_index(&self) -> SparseIndex {
        SparseIndex::empty(self.heads, self.nq, self.nk, self.block_m, self.block_n)
    }

    /// Why inputs of `heads` query heads, `nq` queries and `nk` keys do not fit the plan, if
    /// they do not (the CPU plans and the GPU builders check inputs with it).
    pub fn mismatch(&self, heads: usize, nq: usize, nk: usize) -> Option<String> {
        ((heads, nq, nk) != (self.heads, self.nq, self.nk)).then(|| {
            format!(
                "the plan is for {} heads x {} queries x {} keys, the inputs are {heads} x {nq} x {nk}",
                self.heads, self.nq, self.nk
            )
        })
    }

    /// Checks that `q` and `k` have the plan's shape.
    fn check(&self, q: &Tensor, k: &Tensor) -> Result<(), Error> {
        self.mismatch(q.heads, q.tokens, k.tokens).map_or(Ok(()), |why| Err(Error::Shape(why)))
    }

    /// `pattern` resolved on the CPU for `q` and `k` with the plan's blocks and scale.
    fn resolve(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<weft_patterns::Resolved, Error> {
        let opts = IndexOptions {
            block_m: Some(self.block_m),
            block_n: Some(self.block_n),
            scale: Some(self.scale),
            ..Default::default()
        };
        weft_patterns::resolve_pattern(pattern, q, k, &opts)
    }
}

/// What a leaf of a pattern is to one plan's search.
enum Leaf<'a, T> {
    /// Static: part of the skeleton.
    Static,
    /// The one dynamic leaf the plan builds on the GPU.
    Target(&'a T),
    /// Something the plan cannot build (named for the error).
    Unsupported(&'static str),
}

/// The single target leaf of `e` (as `classify` sees leaves) and the predicate of its
/// enclosing intersections, if every other leaf is static. `supports` names what the plan
/// takes, for the error.
fn find_leaf<'a, T>(
    e: &'a PatternExpr,
    ctx: &Pred,
    supports: &str,
    classify: &dyn Fn(&'a PatternExpr) -> Leaf<'a, T>,
    found: &mut Option<(&'a T, Pred)>,
) -> Result<(), Error> {
    let unsupported = |what: &str| {
        Err(Error::Layout(format!(
            "GPU index building supports {supports} with static predicates around it; this pattern has \
             {what}: build its index on the CPU"
        )))
    };
    match e {
        PatternExpr::Union(items) => items.iter().try_for_each(|i| find_leaf(i, ctx, supports, classify, found)),
        PatternExpr::Intersect(items) => {
            let mut inner = ctx.clone();
            for item in items {
                if let PatternExpr::Static(p) = item {
                    inner = inner.and(p.clone());
                }
            }
            items.iter().try_for_each(|i| find_leaf(i, &inner, supports, classify, found))
        }
        PatternExpr::Permuted { .. } => unsupported("a permutation"),
        PatternExpr::Ring { .. } => unsupported("a ring schedule"),
        leaf => match classify(leaf) {
            Leaf::Static => Ok(()),
            Leaf::Unsupported(what) => unsupported(what),
            Leaf::Target(_) if found.is_some() => unsupported("two dynamic selections"),
            Leaf::Target(t) => {
                *found = Some((t, ctx.clone()));
                Ok(())
            }
        },
    }
}

/// The leaves of a vertical-vector plan.
fn vv_leaf(e: &PatternExpr) -> Leaf<'_, VerticalVector> {
    match e {
        PatternExpr::Static(_) => Leaf::Static,
        PatternExpr::Block(b) if matches!(b.keep, weft_dsl::BlockKeep::Where(_)) => Leaf::Static,
        PatternExpr::VerticalVector(v) => Leaf::Target(v),
        PatternExpr::Grid(g) if g.phase.is_some() && g.lines == GridLines::Rows => Leaf::Static,
        PatternExpr::Block(_) => Leaf::Unsupported("a block top-k selection"),
        PatternExpr::VerticalSlash(_) => Leaf::Unsupported("a vertical_slash selection"),
        PatternExpr::Grid(_) => Leaf::Unsupported("a grid with column lines or an estimated phase"),
        _ => Leaf::Unsupported("a retrieval selection"),
    }
}

/// The leaves of a block plan.
fn block_leaf(e: &PatternExpr) -> Leaf<'_, weft_dsl::Block> {
    match e {
        PatternExpr::Static(_) => Leaf::Static,
        PatternExpr::Block(b) => match b.keep {
            weft_dsl::BlockKeep::Where(_) => Leaf::Static,
            weft_dsl::BlockKeep::Budget(_) => Leaf::Target(b),
        },
        PatternExpr::Grid(g) if g.phase.is_some() && g.lines == GridLines::Rows => Leaf::Static,
        PatternExpr::VerticalVector(_) => Leaf::Unsupported("a vertical_vector selection"),
        PatternExpr::VerticalSlash(_) => Leaf::Unsupported("a vertical_slash selection"),
        PatternExpr::Grid(_) => Leaf::Unsupported("a grid with column lines or an estimated phase"),
        _ => Leaf::Unsupported("a retrieval selection"),
    }
}

fn preds_use_h(e: &PatternExpr) -> bool {
    match e {
        PatternExpr::Static(p) => p.uses(Var::H),
        PatternExpr::Block(b) => match &b.keep {
            weft_dsl::BlockKeep::Where(p) => p.uses(Var::H),
            _ => false,
        },
        PatternExpr::Union(items) | PatternExpr::Intersect(items) => items.iter().any(preds_use_h),
        _ => false,
    }
}

/// What a chosen column in a run of keys becomes.
enum RunEntries {
    /// Nothing (the row's blocks compute it already, or the pattern excludes it).
    Drop,
    /// Per key: nothing, a full entry, or a masked one.
    PerColumn(Vec<Option<Entry>>),
}

/// Keys `c0..c1` of one row and what a chosen column there becomes.
type KeyRun = (u32, u32, RunEntries);

/// What every plan starts from: the pattern checked, its block sizes and scale, whether it
/// reads the head, and each slot's resolved tree with no row selected (shapes only: resolution
/// then reads no data).
struct StaticStart {
    nq: usize,
    nk: usize,
    bm: usize,
    bn: usize,
    scale: f64,
    per_head: bool,
    nodes: Vec<Node>,
}

impl StaticStart {
    /// The shape of a plan for `heads` heads made from this start, with a fresh id.
    fn shape(&self, heads: usize) -> PlanShape {
        PlanShape {
            id: next_plan_id(),
            heads,
            nq: self.nq,
            nk: self.nk,
            block_m: self.bm,
            block_n: self.bn,
            scale: self.scale,
            per_head: self.per_head,
        }
    }

    /// The index of `nodes` (one per slot, static: their choices fixed) at the plan's shape and
    /// block sizes: skeletons and the chosen / unchosen variants plans compare.
    fn index(&self, nodes: Vec<Node>) -> Result<SparseIndex, Error> {
        weft_patterns::Resolved {
            heads: nodes.len(),
            nodes,
            permutation: None,
            nq: self.nq,
            nk: self.nk,
            block_m: self.bm,
            block_n: self.bn,
            scale: self.scale,
            wanted: None,
        }
        .index()
    }
}

/// Mask ids of a GPU-built index must stay below [`DROP`].
fn check_mask_count(table: &MaskTable) -> Result<(), Error> {
    if table.masks().len() > DROP as usize {
        return Err(Error::Layout("more than 65534 distinct masks in a GPU-built index".into()));
    }
    Ok(())
}

fn static_start(
    pattern: &PatternExpr,
    heads: usize,
    nq: usize,
    nk: usize,
    opts: &IndexOptions,
    fix: &dyn Fn(&PatternExpr) -> Option<Node>,
) -> Result<StaticStart, Error> {
    weft_dsl::validate::validate(pattern).map_err(|e| Error::Pattern(weft_dsl::Error::Invalid(e)))?;
    if heads == 0 || nq == 0 || nk == 0 {
        return Err(Error::Shape(format!("empty input: {heads} heads, {nq} queries, {nk} keys")));
    }
    if nk > u32::MAX as usize / 2 {
        return Err(Error::Shape(format!("{nk} keys: GPU index building takes at most 2^31")));
    }
    let (bm, bn) = layout(pattern, opts)?;
    let scale = opts.scale.unwrap_or(f64::NAN);
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(Error::Shape(format!("GPU index building needs a positive finite scale, got {scale}")));
    }
    let per_head = preds_use_h(pattern);
    let slots = if per_head { heads } else { 1 };
    let shape_only = |n: usize| Tensor { heads, tokens: n, dim: 0, data: Vec::new() };
    let (q, k) = (shape_only(nq), shape_only(nk));
    let wanted = vec![false; nq];
    let nodes = (0..slots)
        .map(|h| {
            let inp = HeadInputs { q: &q, k: &k, h, kv: h, scale, block_m: bm, wanted: Some(&wanted), estimates: None };
            resolve_fixed(pattern, &inp, &Pred::Const(true), fix)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StaticStart { nq, nk, bm, bn, scale, per_head, nodes })
}

/// `e` resolved as [`resolve`] does, except that leaves `fix` answers for become its node
/// (estimates that would read data the shape-only inputs do not have).
fn resolve_fixed(
    e: &PatternExpr,
    inp: &HeadInputs<'_>,
    ctx: &Pred,
    fix: &dyn Fn(&PatternExpr) -> Option<Node>,
) -> Result<Node, Error> {
    if let Some(n) = fix(e) {
        return Ok(n);
    }
    Ok(match e {
        PatternExpr::Union(items) => {
            Node::Union(items.iter().map(|i| resolve_fixed(i, inp, ctx, fix)).collect::<Result<_, _>>()?)
        }
        PatternExpr::Intersect(items) => {
            let mut inner = ctx.clone();
            for item in items {
                if let PatternExpr::Static(p) = item {
                    inner = inner.and(p.clone());
                }
            }
            Node::Intersect(items.iter().map(|i| resolve_fixed(i, inp, &inner, fix)).collect::<Result<_, _>>()?)
        }
        leaf => resolve(leaf, inp, ctx)?,
    })
}

/// `node` (resolved from `e`) with the node of every leaf `target` picks replaced by `with`.
fn replace_leaf(e: &PatternExpr, node: &Node, target: &dyn Fn(&PatternExpr) -> bool, with: &Node) -> Node {
    match (e, node) {
        (leaf, _) if target(leaf) => with.clone(),
        (PatternExpr::Union(es), Node::Union(ns)) => {
            Node::Union(es.iter().zip(ns).map(|(e, n)| replace_leaf(e, n, target, with)).collect())
        }
        (PatternExpr::Intersect(es), Node::Intersect(ns)) => {
            Node::Intersect(es.iter().zip(ns).map(|(e, n)| replace_leaf(e, n, target, with)).collect())
        }
        _ => node.clone(),
    }
}

/// Per index row, runs of keys with the entry code a chosen column there gets (see
/// [`ColumnRules`]), for slot nodes `alls` in which every column is chosen, over the slot rows
/// of `skeleton` (the index without columns). Mask ids are interned into `table`.
#[allow(clippy::too_many_arguments)]
/// The plan of whichever GPU builder takes a pattern (tried in this order: vertical vectors,
/// blocks, vertical-slash).
#[derive(Clone, Debug)]
pub enum AnyPlan {
    Columns(ColumnPlan),
    Blocks(BlockPlan),
    Slashes(SlashPlan),
}

impl AnyPlan {
    /// Plans `pattern` with the first builder that takes it; the error gives each builder's
    /// reason for refusing it.
    pub fn new(
        pattern: &PatternExpr,
        heads: usize,
        nq: usize,
        nk: usize,
        opts: &IndexOptions,
    ) -> Result<AnyPlan, Error> {
        let columns = match ColumnPlan::new(pattern, heads, nq, nk, opts) {
            Ok(p) => return Ok(AnyPlan::Columns(p)),
            Err(e) => e,
        };
        let blocks = match BlockPlan::new(pattern, heads, nq, nk, opts) {
            Ok(p) => return Ok(AnyPlan::Blocks(p)),
            Err(e) => e,
        };
        match SlashPlan::new(pattern, heads, nq, nk, opts) {
            Ok(p) => Ok(AnyPlan::Slashes(p)),
            Err(slashes) => Err(Error::Layout(format!(
                "no GPU index builder takes this pattern (vertical vectors: {columns}; blocks: {blocks}; \
                 vertical-slash: {slashes})"
            ))),
        }
    }

    /// The mask table every index of this plan uses (kernels for it are generated with it).
    pub fn masks(&self) -> &[Pred] {
        match self {
            AnyPlan::Columns(p) => &p.skeleton.masks,
            AnyPlan::Blocks(p) => &p.masks,
            AnyPlan::Slashes(p) => &p.masks,
        }
    }

    /// The index of `pattern` for `q` and `k` built on the CPU through the plan: the same
    /// entries as [`weft_patterns::build_index`], numbered with the plan's mask table, which is what
    /// a GPU build of the same plan returns.
    pub fn index_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<SparseIndex, Error> {
        match self {
            AnyPlan::Columns(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
            AnyPlan::Blocks(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
            AnyPlan::Slashes(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
        }
    }
}

/// [`weft_patterns::build_index`], numbering masks as a GPU build would when a GPU builder takes the
/// pattern (so that a kernel generated for one index serves the other: mask tables are part
/// of kernel keys); otherwise `build_index` itself. The scale defaults to `1 / sqrt(d)`.
pub fn planned_index(pattern: &PatternExpr, q: &Tensor, k: &Tensor, opts: &IndexOptions) -> Result<SparseIndex, Error> {
    let scale = opts.scale.unwrap_or(1.0 / (q.dim.max(1) as f64).sqrt());
    let opts_scaled = IndexOptions { scale: Some(scale), ..opts.clone() };
    if opts.rows.is_none() {
        if let Ok(plan) = AnyPlan::new(pattern, q.heads, q.tokens, k.tokens, &opts_scaled) {
            return plan.index_on_cpu(pattern, q, k);
        }
    }
    weft_patterns::build_index(pattern, q, k, &opts_scaled)
}

/// The selection of the dynamic block leaf of `e` in its resolved node.
fn dynamic_block_sel<'a>(e: &PatternExpr, node: &'a Node) -> Option<&'a weft_patterns::families::BlockSel> {
    match (e, node) {
        (PatternExpr::Block(b), Node::Blocks(sel)) if matches!(b.keep, weft_dsl::BlockKeep::Budget(_)) => Some(sel),
        (PatternExpr::Union(es), Node::Union(ns)) | (PatternExpr::Intersect(es), Node::Intersect(ns)) => {
            es.iter().zip(ns).find_map(|(e, n)| dynamic_block_sel(e, n))
        }
        _ => None,
    }
}

/// The first difference between two indexes, comparing mask predicates rather than mask
/// ids (two builders may number the same masks differently); `None` when they are the same.
pub fn index_difference(a: &SparseIndex, b: &SparseIndex) -> Option<String> {
    if (a.heads, a.nq, a.nk, a.block_m, a.block_n) != (b.heads, b.nq, b.nk, b.block_m, b.block_n) {
        return Some("shapes differ".into());
    }
    let mask = |ix: &SparseIndex, id: u16| if id == FULL { None } else { ix.masks.get(id as usize).cloned() };
    for (name, pa, pb) in [("block_ptr", &a.block_ptr, &b.block_ptr), ("col_ptr", &a.col_ptr, &b.col_ptr)] {
        if pa != pb {
            let i = pa.iter().zip(pb.iter()).position(|(x, y)| x != y).unwrap_or(pa.len().min(pb.len()));
            return Some(format!("{name} differs first at row {}", i.saturating_sub(1)));
        }
    }
    for (name, ia, ib, ma, mb) in [
        ("block", &a.block_idx, &b.block_idx, &a.block_mask, &b.block_mask),
        ("column", &a.col_idx, &b.col_idx, &a.col_mask, &b.col_mask),
    ] {
        if ia != ib {
            let i = ia.iter().zip(ib.iter()).position(|(x, y)| x != y).unwrap_or(0);
            return Some(format!("{name} entry {i}: {:?} vs {:?}", ia.get(i), ib.get(i)));
        }
        for (i, (x, y)) in ma.iter().zip(mb.iter()).enumerate() {
            if mask(a, *x) != mask(b, *y) {
                return Some(format!("{name} entry {i} (key {}): mask {:?} vs {:?}", ia[i], mask(a, *x), mask(b, *y)));
            }
        }
    }
    None
}
