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
//! and the result is the index [`crate::build_index`] builds: [`ColumnPlan::assemble`] is the
//! CPU mirror of that last step, and the tests check it against `build_index` pair for pair.

mod lines;
mod slash;

use rayon::prelude::*;
use weft_dsl::{Budget, GridLines, PatternExpr, Pred, Var, VerticalVector};

use crate::families::{resolve, HeadInputs, Node};
use crate::index::{and, choose_all, cov, layout, settle, Cov, Entry, MaskTable};
use crate::interval::{decide, Region};
use crate::{Error, IndexOptions, SparseIndex, Tensor, FULL};
pub use slash::{SlashChoice, SlashPlan, Verticals};

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
    fn resolve(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<crate::Resolved, Error> {
        let opts = IndexOptions {
            block_m: Some(self.block_m),
            block_n: Some(self.block_n),
            scale: Some(self.scale),
            ..Default::default()
        };
        crate::resolve_pattern(pattern, q, k, &opts)
    }
}

/// Entry code of a chosen column that the row's blocks already compute (or that the pattern
/// excludes there): it gets no column entry.
pub const DROP: u16 = 0xfffe;

/// Rule codes from this up to [`PER_LINE`] are offsets (`code - PER_COLUMN`) into
/// [`ColumnRules::codes`]: one code per key of the run.
pub const PER_COLUMN: u32 = 0x1_0000;

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

/// Per index row, what a chosen column becomes: runs of keys with an entry code.
#[derive(Clone, Debug, Default)]
pub struct ColumnRules {
    /// `ptr[r]..ptr[r + 1]`: the runs of row `r = slot * q_blocks + qb`, ascending, disjoint;
    /// keys in no run get [`FULL`]. A plan with row lines appends a second set of rows, for
    /// query blocks that hold a line row (see [`LineCodes`]).
    pub ptr: Vec<u32>,
    pub c0: Vec<u32>,
    pub c1: Vec<u32>,
    /// A run's code: a line code ([`LineCodes::resolve`]: `DROP`, `FULL`, a mask id, or one
    /// code per row-line offset), or `PER_COLUMN + offset` into `codes`.
    pub code: Vec<u32>,
    /// Per-key line codes of `PER_COLUMN` runs.
    pub codes: Vec<u32>,
}

impl ColumnRules {
    /// The line code of a chosen column `c` in rule row `row` (resolve it with
    /// [`LineCodes::resolve`]; in plans without row lines it is the entry code itself).
    pub fn code(&self, row: usize, c: u32) -> u32 {
        let (lo, hi) = (self.ptr[row] as usize, self.ptr[row + 1] as usize);
        let runs = &self.c0[lo..hi];
        // The last run starting at or before c.
        let i = runs.partition_point(|c0| *c0 <= c);
        if i == 0 || c >= self.c1[lo + i - 1] {
            return u32::from(FULL);
        }
        match self.code[lo + i - 1] {
            code if (PER_COLUMN..PER_LINE).contains(&code) => {
                self.codes[(code - PER_COLUMN) as usize + (c - runs[i - 1]) as usize]
            }
            code => code,
        }
    }

    /// Appends one row of runs `(c0, c1, code)` and the per-key codes they point to (offsets
    /// relative to `codes`' start), merging adjacent runs with one code.
    fn push_row(&mut self, runs: Vec<(u32, u32, u32)>, codes: Vec<u32>) -> Result<(), Error> {
        if self.codes.len() + codes.len() >= (PER_LINE - PER_COLUMN) as usize
            || self.c0.len() + runs.len() > u32::MAX as usize
        {
            return Err(Error::Layout("too many column rules for GPU index building; use larger blocks".into()));
        }
        if self.ptr.is_empty() {
            self.ptr.push(0);
        }
        let base = self.codes.len() as u32;
        let first = self.c0.len();
        for (c0, c1, code) in runs {
            let per_column = (PER_COLUMN..PER_LINE).contains(&code);
            let code = if per_column { code + base } else { code };
            match (self.c0.len() > first).then(|| self.c0.len() - 1) {
                Some(last) if self.c1[last] == c0 && self.code[last] == code && !per_column => self.c1[last] = c1,
                _ => {
                    self.c0.push(c0);
                    self.c1.push(c1);
                    self.code.push(code);
                }
            }
        }
        self.codes.extend(codes);
        self.ptr.push(self.c0.len() as u32);
        Ok(())
    }
}

/// Line codes at or above this are offsets (`code - PER_LINE`) into [`LineCodes::codes`]:
/// one entry code per row-line offset.
pub const PER_LINE: u32 = 0x8000_0000;

/// Entry codes that depend on where a grid's row lines fall in a query block.
///
/// With an estimated phase, the line rows of the query block starting at row `q0` sit at
/// offsets `r, r + stride, ...` with `r = (phase - q0) mod stride`
/// ([`crate::families::RowLines::tile_offset`]). When `r < len` (the block may hold line
/// rows; a short last block holds none when `r` is past its rows, and its codes say so) its
/// entries take their codes from line codes: a plain entry code (below `PER_LINE`), or a
/// vector of `len` codes, one per offset, at `codes[code - PER_LINE..]`. Otherwise the block
/// has no line row and takes the codes a plan has without lines.
#[derive(Clone, Debug, Default)]
pub struct LineCodes {
    /// The grid's stride, and the offsets a vector covers: `min(stride, block_m)` (0 for a
    /// plan without row lines).
    pub stride: usize,
    pub len: usize,
    pub codes: Vec<u16>,
    interned: std::collections::HashMap<Vec<u16>, u32>,
}

impl LineCodes {
    /// The entry code of line code `code` at offset `r < len`.
    pub fn resolve(&self, code: u32, r: usize) -> u16 {
        if code >= PER_LINE {
            self.codes[(code - PER_LINE) as usize + r]
        } else {
            code as u16
        }
    }

    /// The line-row offset of the query block starting at `q0` for `phase`, when it is below
    /// `len` (then the block's codes are line codes; always `None` without row lines).
    pub fn offset(&self, phase: usize, q0: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        Some(crate::families::RowLines::tile_offset(self.stride, phase, q0)).filter(|r| *r < self.len)
    }

    /// The line code of one code per offset: the code itself when they are all one, else a
    /// vector (each distinct vector stored once).
    fn intern(&mut self, v: Vec<u16>) -> Result<u32, Error> {
        debug_assert_eq!(v.len(), self.len);
        if v.iter().all(|c| *c == v[0]) {
            return Ok(u32::from(v[0]));
        }
        if let Some(code) = self.interned.get(&v) {
            return Ok(*code);
        }
        if self.codes.len() + v.len() >= PER_LINE as usize {
            return Err(Error::Layout("too many row-line codes for GPU index building".into()));
        }
        let code = PER_LINE + self.codes.len() as u32;
        self.codes.extend_from_slice(&v);
        self.interned.insert(v, code);
        Ok(code)
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
        crate::Resolved {
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
    if table.masks.len() > DROP as usize {
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
fn column_rules(
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
        let mut table = MaskTable::from(&slot_skeleton.masks);
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
        skeleton.masks = table.masks;
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
    fn push_row(
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
fn block_entries(
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
        let mut table = MaskTable::from(&all.masks);
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
            masks: table.masks,
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
    /// entries as [`crate::build_index`], numbered with the plan's mask table, which is what
    /// a GPU build of the same plan returns.
    pub fn index_on_cpu(&self, pattern: &PatternExpr, q: &Tensor, k: &Tensor) -> Result<SparseIndex, Error> {
        match self {
            AnyPlan::Columns(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
            AnyPlan::Blocks(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
            AnyPlan::Slashes(p) => p.assemble(&p.choose_on_cpu(pattern, q, k)?),
        }
    }
}

/// [`crate::build_index`], numbering masks as a GPU build would when a GPU builder takes the
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
    crate::build_index(pattern, q, k, &opts_scaled)
}

/// The selection of the dynamic block leaf of `e` in its resolved node.
fn dynamic_block_sel<'a>(e: &PatternExpr, node: &'a Node) -> Option<&'a crate::families::BlockSel> {
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
