//! The sparse index: one format for the CPU reference and every GPU kernel.
//!
//! See the crate documentation for the picture. In short: per head and query block of
//! `block_m` rows, a CSR list of key blocks of `block_n` keys, each either full or partial,
//! and a CSR list of single key columns outside those blocks' pairs. A partial block or a
//! column carries a mask id: the index of a static predicate in [`SparseIndex::masks`] that
//! the kernel evaluates per pair; full entries skip it.
//!
//! The builder evaluates the resolved pattern ([`Node`]) on each block symbolically: static
//! leaves by interval analysis (true, false, or "mask"), dynamic leaves by their selection.
//! A result that is still a mask is checked pair by pair once, so full blocks are marked full
//! and empty ones dropped even when intervals cannot prove it.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weft_dsl::{Env, PatternExpr, Permutation, Pred, Var};

use crate::families::{resolve, ColSel, Estimates, HeadInputs, Node};
use crate::interval::{decide, decide_exact, Region};
use crate::permute;
use crate::tensor::{check_qkv, Tensor};
use crate::Error;

/// Largest `block_m` or `block_n` an index may use.
pub const MAX_BLOCK: usize = 1024;

/// Mask id of an entry that needs no predicate.
pub const FULL: u16 = u16::MAX;

/// The sparse index of a pattern over one input (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseIndex {
    /// Query heads.
    pub heads: usize,
    /// Queries and keys.
    pub nq: usize,
    pub nk: usize,
    /// Rows per query block and keys per key block.
    pub block_m: usize,
    pub block_n: usize,
    /// When set, positions are in permuted order: index row `i` is token
    /// `permute::inverse(p, i, nq)`, index key `j` is token `permute::inverse(p, j, nk)`.
    pub permutation: Option<Permutation>,
    /// Residual predicates of partial entries, over index positions.
    pub masks: Vec<Pred>,
    /// `block_ptr[r]..block_ptr[r + 1]`: the key blocks of row `r = head * q_blocks + qb`.
    pub block_ptr: Vec<u32>,
    pub block_idx: Vec<u32>,
    pub block_mask: Vec<u16>,
    /// `col_ptr[r]..col_ptr[r + 1]`: the extra key columns of row `r`, ascending.
    pub col_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub col_mask: Vec<u16>,
}

/// Block sizes and scale for [`build_index`]; `None` picks the pattern's natural choice.
#[derive(Clone, Debug, Default)]
pub struct IndexOptions {
    /// Rows per query block (default: the finest query granularity of the pattern, or 64).
    pub block_m: Option<usize>,
    /// Keys per key block (default: the finest key granularity of the pattern, or 64).
    pub block_n: Option<usize>,
    /// Softmax scale (default `1 / sqrt(head_dim)`).
    pub scale: Option<f64>,
    /// Build only these query rows (index positions); the other rows stay empty. For
    /// estimates on sampled rows (pattern search): selections are made only where needed.
    pub rows: Option<Vec<usize>>,
    /// Estimates shared with other builds over the same Q and K (see [`Estimates`]).
    pub estimates: Option<std::sync::Arc<Estimates>>,
}

/// The most (head, query block, key block) pairs an index may cover. Each can become an entry
/// of 6 bytes; dense and causal indexes keep all or half of them, so this admits causal over
/// 32 heads at 512k tokens in 128 x 128 blocks (and at 256k in 64 x 64) while refusing
/// one-token blocks at 64k or dense 64 x 64 blocks at 4M, which would need tens of GiB.
pub const MAX_TILES: usize = 1 << 31;

/// A pattern resolved for an input: every dynamic choice made, per head.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub nodes: Vec<Node>,
    pub permutation: Option<Permutation>,
    pub heads: usize,
    pub nq: usize,
    pub nk: usize,
    pub block_m: usize,
    pub block_n: usize,
    pub scale: f64,
    /// `wanted[q]`: whether query row `q` was built (all rows when `None`).
    pub wanted: Option<Vec<bool>>,
}

fn granularity(e: &PatternExpr, qs: &mut Vec<usize>, ks: &mut Vec<usize>) {
    match e {
        PatternExpr::Block(b) => {
            qs.push(b.block_q as usize);
            ks.push(b.block_k as usize);
        }
        PatternExpr::VerticalVector(v) => qs.push(v.q_block as usize),
        PatternExpr::VerticalSlash(v) => {
            qs.push(v.block as usize);
            ks.push(v.block as usize);
        }
        PatternExpr::Retrieval(_) => qs.push(1),
        PatternExpr::Union(items) | PatternExpr::Intersect(items) => items.iter().for_each(|i| granularity(i, qs, ks)),
        PatternExpr::Permuted { inner, .. } | PatternExpr::Ring { inner, .. } => granularity(inner, qs, ks),
        PatternExpr::Static(_) | PatternExpr::Grid(_) => {}
    }
}

/// The block sizes an index of `e` uses: each must divide every granularity of the pattern,
/// so a block never straddles two selection units.
pub fn layout(e: &PatternExpr, opts: &IndexOptions) -> Result<(usize, usize), Error> {
    let (mut qs, mut ks) = (Vec::new(), Vec::new());
    granularity(e, &mut qs, &mut ks);
    let bm = opts.block_m.unwrap_or_else(|| qs.iter().copied().min().unwrap_or(64));
    let bn = opts.block_n.unwrap_or_else(|| ks.iter().copied().min().unwrap_or(64));
    if bm == 0 || bn == 0 || bm > MAX_BLOCK || bn > MAX_BLOCK {
        return Err(Error::Layout(format!("block sizes must be between 1 and {MAX_BLOCK}, got {bm} x {bn}")));
    }
    if let Some(g) = qs.iter().find(|g| **g % bm != 0) {
        return Err(Error::Layout(format!(
            "block_m = {bm} does not divide the pattern's query granularity {g}; use a divisor of {g}"
        )));
    }
    if let Some(g) = ks.iter().find(|g| **g % bn != 0) {
        return Err(Error::Layout(format!(
            "block_n = {bn} does not divide the pattern's key granularity {g}; use a divisor of {g}"
        )));
    }
    Ok((bm, bn))
}

/// Makes every dynamic choice of `pattern` for inputs `q` `[hq, nq, d]` and `k` `[hkv, nk, d]`.
pub fn resolve_pattern(pattern: &PatternExpr, q: &Tensor, k: &Tensor, opts: &IndexOptions) -> Result<Resolved, Error> {
    weft_dsl::validate::validate(pattern).map_err(|e| Error::Pattern(weft_dsl::Error::Invalid(e)))?;
    let group = check_qkv(q, k, None)?;
    q.check_finite("q")?;
    k.check_finite("k")?;
    let (bm, bn) = layout(pattern, opts)?;
    let scale = opts.scale.unwrap_or(1.0 / (q.dim as f64).sqrt());
    // The ring changes the schedule, not the pairs.
    let mut expr = pattern;
    if let PatternExpr::Ring { inner, .. } = expr {
        expr = inner;
    }
    let (permutation, expr) = match expr {
        PatternExpr::Permuted { permutation, inner } => (Some(*permutation), &**inner),
        other => (None, other),
    };
    // The CPU builder may copy: kernels apply the same permutation while loading.
    let (pq, pk);
    let (q, k) = match permutation {
        Some(p) => {
            pq = q.gather_tokens(|i| permute::inverse(p, i, q.tokens));
            pk = k.gather_tokens(|i| permute::inverse(p, i, k.tokens));
            (&pq, &pk)
        }
        None => (q, k),
    };
    let wanted = match &opts.rows {
        None => None,
        Some(rows) => {
            let mut w = vec![false; q.tokens];
            for &r in rows {
                *w.get_mut(r).ok_or_else(|| Error::Shape(format!("row {r} is past the {} queries", q.tokens)))? = true;
            }
            Some(w)
        }
    };
    let nodes = (0..q.heads)
        .into_par_iter()
        .map(|h| {
            let inp = HeadInputs {
                q,
                k,
                h,
                kv: h / group,
                scale,
                block_m: bm,
                wanted: wanted.as_deref(),
                // Permuted builds work on temporary copies whose addresses may repeat.
                estimates: if permutation.is_none() { opts.estimates.as_deref() } else { None },
            };
            resolve(expr, &inp, &Pred::Const(true))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Resolved {
        nodes,
        permutation,
        heads: q.heads,
        nq: q.tokens,
        nk: k.tokens,
        block_m: bm,
        block_n: bn,
        scale,
        wanted,
    })
}

/// Builds the sparse index of `pattern` for `q` and `k`.
pub fn build_index(pattern: &PatternExpr, q: &Tensor, k: &Tensor, opts: &IndexOptions) -> Result<SparseIndex, Error> {
    resolve_pattern(pattern, q, k, opts)?.index()
}

/// What a node keeps of a region: nothing, everything, or the keys of a predicate (the
/// coverage analysis the index builders share with the GPU plans in weft-codegen).
#[derive(Clone, Debug, PartialEq)]
pub enum Cov {
    None,
    All,
    Mask(Pred),
}

fn or(a: Cov, b: Cov) -> Cov {
    match (a, b) {
        (Cov::All, _) | (_, Cov::All) => Cov::All,
        (Cov::None, x) | (x, Cov::None) => x,
        (Cov::Mask(a), Cov::Mask(b)) => Cov::Mask(a.or(b)),
    }
}

/// The intersection of two coverages.
pub fn and(a: Cov, b: Cov) -> Cov {
    match (a, b) {
        (Cov::None, _) | (_, Cov::None) => Cov::None,
        (Cov::All, x) | (x, Cov::All) => x,
        (Cov::Mask(a), Cov::Mask(b)) => Cov::Mask(a.and(b)),
    }
}

/// What `node` keeps of region `r`; `col` is set in the column pass (a one-key region).
pub fn cov(node: &Node, r: &Region, col: Option<usize>) -> Cov {
    let all_or_none = |b: bool| if b { Cov::All } else { Cov::None };
    match node {
        Node::Static(p) => match decide(p, r) {
            Some(b) => all_or_none(b),
            None => Cov::Mask(p.clone()),
        },
        Node::Blocks(b) => all_or_none(b.selected(r.q0 as usize / b.bq, r.k0 as usize / b.bk)),
        Node::Columns(c) => all_or_none(col.is_some_and(|col| c.selected(r.q0 as usize, col))),
        Node::RowLines(l) => {
            let p = l.pred_over(r.q0 as usize, r.q1 as usize);
            match l.phase.and_then(|_| decide(&p, r)) {
                Some(b) => all_or_none(b),
                None => Cov::Mask(p),
            }
        }
        Node::Union(items) => items.iter().map(|n| cov(n, r, col)).fold(Cov::None, or),
        Node::Intersect(items) => items.iter().map(|n| cov(n, r, col)).fold(Cov::All, and),
    }
}

/// An index entry: a full block (or column) or one masked by a predicate.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Full,
    Mask(Pred),
}

/// Settles a coverage on its region: full, empty (`None`) or a predicate that is mixed there.
pub fn settle(c: Cov, r: &Region) -> Option<Entry> {
    match c {
        Cov::None => None,
        Cov::All => Some(Entry::Full),
        Cov::Mask(p) => match decide_exact(&p, r) {
            Some(true) => Some(Entry::Full),
            Some(false) => None,
            None => Some(Entry::Mask(p)),
        },
    }
}

/// Replaces every column selection of `n` with one that chooses every key: what a chosen
/// column's coverage is, whichever it is.
pub fn choose_all(n: &Node, nq: usize, nk: usize) -> Node {
    match n {
        Node::Columns(_) => Node::Columns(ColSel { bq: nq.max(1), cols: vec![(0..nk as u32).collect()] }),
        Node::Union(items) => Node::Union(items.iter().map(|i| choose_all(i, nq, nk)).collect()),
        Node::Intersect(items) => Node::Intersect(items.iter().map(|i| choose_all(i, nq, nk)).collect()),
        other => other.clone(),
    }
}

type Row = (Vec<(u32, Entry)>, Vec<(u32, Entry)>);

/// A masked entry by (mask id, query rows, keys), half-open ranges.
type EntryKey = (u16, (usize, usize), (usize, usize));

/// An index's mask predicates, each stored once, with ids below [`FULL`].
#[derive(Default)]
pub struct MaskTable {
    masks: Vec<Pred>,
    ids: HashMap<Pred, u16>,
}

impl MaskTable {
    /// A table holding `masks` (ids in their order).
    pub fn with_masks(masks: &[Pred]) -> MaskTable {
        let mut t = MaskTable::default();
        for m in masks {
            // Existing tables are below the limit already.
            let _ = t.intern(m.clone());
        }
        t
    }

    /// The id of `p` if the table holds it.
    pub fn get(&self, p: &Pred) -> Option<u16> {
        self.ids.get(p).copied()
    }

    /// The id of `p`, added when the table does not hold it yet.
    pub fn intern(&mut self, p: Pred) -> Result<u16, Error> {
        if let Some(id) = self.ids.get(&p) {
            return Ok(*id);
        }
        let id = u16::try_from(self.masks.len())
            .ok()
            .filter(|id| *id < FULL)
            .ok_or_else(|| Error::Layout("more than 65534 distinct partial-block predicates".into()))?;
        self.ids.insert(p.clone(), id);
        self.masks.push(p);
        Ok(id)
    }

    /// The masks by id.
    pub fn masks(&self) -> &[Pred] {
        &self.masks
    }

    /// The masks by id, for an index's mask list.
    pub fn into_masks(self) -> Vec<Pred> {
        self.masks
    }

    fn entry(&mut self, e: Entry) -> Result<u16, Error> {
        match e {
            Entry::Full => Ok(FULL),
            Entry::Mask(p) => self.intern(p),
        }
    }
}

impl Resolved {
    fn region(&self, h: usize, q0: usize, q1: usize, k0: usize, k1: usize) -> Region {
        Region::new(h, (q0, q1), (k0, k1), (self.nq, self.nk))
    }

    fn head_rows(&self, h: usize) -> Vec<Row> {
        let node = &self.nodes[h];
        let (bm, bn) = (self.block_m, self.block_n);
        let nkb = self.nk.div_ceil(bn);
        let sels = node.column_sels();
        let selects_blocks = node.has_block_sels();
        let choose_all = (sels.len() == 1 && !selects_blocks).then(|| choose_all(node, self.nq, self.nk));
        (0..self.nq.div_ceil(bm))
            .map(|qb| {
                let (q0, q1) = (qb * bm, ((qb + 1) * bm).min(self.nq));
                if let Some(w) = &self.wanted {
                    if !w[q0..q1].iter().any(|x| *x) {
                        return (Vec::new(), Vec::new());
                    }
                }
                let block_entry = |kb: usize| {
                    let r = self.region(h, q0, q1, kb * bn, ((kb + 1) * bn).min(self.nk));
                    settle(cov(node, &r, None), &r).map(|e| (kb as u32, e))
                };
                let blocks: Vec<(u32, Entry)> = if selects_blocks {
                    (0..nkb).filter_map(block_entry).collect()
                } else {
                    // Without block selections a node's coverage of a range of key blocks is
                    // decided by interval analysis on the whole range: ranges are halved until
                    // decided, so a row costs about (its boundaries x log blocks) evaluations
                    // plus its entries, with the same result as block by block.
                    let mut out = Vec::new();
                    let mut stack = vec![(0usize, nkb)];
                    while let Some((b0, b1)) = stack.pop() {
                        if b1 - b0 == 1 {
                            out.extend(block_entry(b0));
                            continue;
                        }
                        let r = self.region(h, q0, q1, b0 * bn, (b1 * bn).min(self.nk));
                        match cov(node, &r, None) {
                            Cov::None => {}
                            Cov::All => out.extend((b0..b1).map(|kb| (kb as u32, Entry::Full))),
                            Cov::Mask(_) => {
                                let mid = (b0 + b1) / 2;
                                stack.push((mid, b1));
                                stack.push((b0, mid));
                            }
                        }
                    }
                    out
                };
                // One selection's columns are already ascending: read in place (a grid of
                // stride 1 chooses every key of every row).
                let merged: Vec<u32>;
                let cands: &[u32] = match sels.as_slice() {
                    [one] if one.columns_for_row(q0).is_sorted_by(|a, b| a < b) => one.columns_for_row(q0),
                    _ => {
                        let mut all: Vec<u32> =
                            sels.iter().flat_map(|s| s.columns_for_row(q0).iter().copied()).collect();
                        all.sort_unstable();
                        all.dedup();
                        merged = all;
                        &merged
                    }
                };
                // Full block entries before each position of `blocks`: a key range wholly inside
                // full blocks adds no column.
                let full_before: Vec<usize> = std::iter::once(0)
                    .chain(blocks.iter().scan(0, |n, (_, e)| {
                        *n += usize::from(*e == Entry::Full);
                        Some(*n)
                    }))
                    .collect();
                let all_full = |k0: usize, k1: usize| {
                    let (b0, b1) = (k0 / bn, k1.div_ceil(bn));
                    let i0 = blocks.partition_point(|e| (e.0 as usize) < b0);
                    let i1 = blocks.partition_point(|e| (e.0 as usize) < b1);
                    k0 % bn == 0 && (k1 % bn == 0 || k1 == self.nk) && full_before[i1] - full_before[i0] == b1 - b0
                };
                // A column inside a masked block entry whose mask never reads the key ends
                // the same way in every such block of this row: settled once per mask.
                let mut settled: Vec<(Pred, Option<Entry>)> = Vec::new();
                // What column `c` adds to the row's blocks; `here`: its own coverage, when
                // already known.
                let mut col_entry = |c: u32, here: Option<Cov>| {
                    let r = self.region(h, q0, q1, c as usize, c as usize + 1);
                    let kb = c as usize / bn;
                    let block = blocks.binary_search_by_key(&(kb as u32), |e| e.0).ok().map(|i| &blocks[i].1);
                    let here = || here.clone().unwrap_or_else(|| cov(node, &r, Some(c as usize)));
                    // Only what the block entry of this key does not already compute.
                    match block {
                        None => settle(here(), &r),
                        Some(Entry::Full) => None,
                        Some(Entry::Mask(pb)) => {
                            let here = here();
                            if here == Cov::All && !pb.uses(Var::K) {
                                if let Some((_, e)) = settled.iter().find(|(p, _)| p == pb) {
                                    return e.clone().map(|e| (c, e));
                                }
                                let e = settle(Cov::Mask(!pb.clone()), &r);
                                settled.push((pb.clone(), e.clone()));
                                return e.map(|e| (c, e));
                            }
                            settle(and(here, Cov::Mask(!pb.clone())), &r)
                        }
                    }
                    .map(|e| (c, e))
                };
                let cols = match &choose_all {
                    // One column selection and no block selections: the coverage of a chosen
                    // column is the node's with every column chosen, which interval analysis
                    // decides for whole ranges of keys (halved until decided), so a row costs
                    // about its boundaries x log keys evaluations rather than one per column.
                    Some(all) => {
                        let mut out = Vec::with_capacity(cands.len());
                        let mut stack = vec![(0usize, cands.len(), 0usize, self.nk)];
                        while let Some((i0, i1, k0, k1)) = stack.pop() {
                            if i0 == i1 {
                                continue;
                            }
                            if i1 - i0 > 2 && k1 - k0 > 1 {
                                if all_full(k0, k1) {
                                    continue;
                                }
                                match cov(all, &self.region(h, q0, q1, k0, k1), Some(k0)) {
                                    Cov::None => continue,
                                    Cov::All => {
                                        out.extend(cands[i0..i1].iter().filter_map(|&c| col_entry(c, Some(Cov::All))));
                                        continue;
                                    }
                                    Cov::Mask(_) => {}
                                }
                                // Halves split at a block boundary where one lies inside, so
                                // that runs of full blocks are skipped whole.
                                let mid = match (k0 + k1) / 2 / bn * bn {
                                    m if m > k0 => m,
                                    _ => (k0 + k1) / 2,
                                };
                                let im = i0 + cands[i0..i1].partition_point(|&c| (c as usize) < mid);
                                stack.push((im, i1, mid, k1));
                                stack.push((i0, im, k0, mid));
                            } else {
                                out.extend(cands[i0..i1].iter().filter_map(|&c| col_entry(c, None)));
                            }
                        }
                        out
                    }
                    None => cands.iter().filter_map(|&c| col_entry(c, None)).collect(),
                };
                (blocks, cols)
            })
            .collect()
    }

    /// Compresses the resolved pattern into the shared index format.
    pub fn index(&self) -> Result<SparseIndex, Error> {
        // Bounded before building: every (head, query block, key block) may become an entry.
        let tiles =
            (self.heads as u128) * (self.nq.div_ceil(self.block_m) as u128) * (self.nk.div_ceil(self.block_n) as u128);
        if tiles > MAX_TILES as u128 {
            return Err(Error::Layout(format!(
                "{} heads x {} x {} tokens in {} x {} blocks make {tiles} block pairs, over the {MAX_TILES} an index \
                 may hold; use larger blocks or fewer tokens",
                self.heads, self.nq, self.nk, self.block_m, self.block_n
            )));
        }
        let per_head: Vec<Vec<Row>> = (0..self.heads).into_par_iter().map(|h| self.head_rows(h)).collect();
        let mut table = MaskTable::default();
        let too_big = || Error::Layout("the index has more than 2^32 entries; use larger blocks".into());
        let mut ix = SparseIndex {
            permutation: self.permutation,
            ..SparseIndex::empty(self.heads, self.nq, self.nk, self.block_m, self.block_n)
        };
        for rows in per_head {
            for (blocks, cols) in rows {
                for (kb, e) in blocks {
                    ix.block_idx.push(kb);
                    ix.block_mask.push(table.entry(e)?);
                }
                for (c, e) in cols {
                    ix.col_idx.push(c);
                    ix.col_mask.push(table.entry(e)?);
                }
                ix.block_ptr.push(u32::try_from(ix.block_idx.len()).map_err(|_| too_big())?);
                ix.col_ptr.push(u32::try_from(ix.col_idx.len()).map_err(|_| too_big())?);
            }
        }
        ix.masks = table.masks;
        Ok(ix)
    }

    /// Membership of a pair in index coordinates, straight from the selections.
    pub fn contains(&self, h: usize, q: usize, k: usize) -> bool {
        let env = Env { q: q as i64, k: k as i64, h: h as i64, nq: self.nq as i64, nk: self.nk as i64 };
        self.nodes[h].contains(q, k, &env)
    }

    /// Membership in token (original) coordinates.
    pub fn contains_token(&self, h: usize, q: usize, k: usize) -> bool {
        match self.permutation {
            Some(p) => self.contains(h, permute::forward(p, q, self.nq), permute::forward(p, k, self.nk)),
            None => self.contains(h, q, k),
        }
    }
}

impl SparseIndex {
    /// An index of `heads` x `nq` x `nk` with no rows yet (for builders that append rows).
    pub fn empty(heads: usize, nq: usize, nk: usize, block_m: usize, block_n: usize) -> SparseIndex {
        SparseIndex {
            heads,
            nq,
            nk,
            block_m,
            block_n,
            permutation: None,
            masks: Vec::new(),
            block_ptr: vec![0],
            block_idx: Vec::new(),
            block_mask: Vec::new(),
            col_ptr: vec![0],
            col_idx: Vec::new(),
            col_mask: Vec::new(),
        }
    }

    /// Query blocks per head.
    pub fn q_blocks(&self) -> usize {
        self.nq.div_ceil(self.block_m)
    }

    fn row(&self, h: usize, qb: usize) -> usize {
        h * self.q_blocks() + qb
    }

    /// `(key block, mask id)` entries of a row.
    pub fn blocks(&self, h: usize, qb: usize) -> impl Iterator<Item = (usize, u16)> + '_ {
        let r = self.row(h, qb);
        let (a, b) = (self.block_ptr[r] as usize, self.block_ptr[r + 1] as usize);
        self.block_idx[a..b].iter().zip(&self.block_mask[a..b]).map(|(k, m)| (*k as usize, *m))
    }

    /// `(key column, mask id)` entries of a row.
    pub fn columns(&self, h: usize, qb: usize) -> impl Iterator<Item = (usize, u16)> + '_ {
        let r = self.row(h, qb);
        let (a, b) = (self.col_ptr[r] as usize, self.col_ptr[r + 1] as usize);
        self.col_idx[a..b].iter().zip(&self.col_mask[a..b]).map(|(k, m)| (*k as usize, *m))
    }

    fn passes(&self, mask: u16, h: usize, q: usize, k: usize) -> bool {
        mask == FULL
            || self.masks.get(mask as usize).is_some_and(|p| {
                p.eval(&Env { q: q as i64, k: k as i64, h: h as i64, nq: self.nq as i64, nk: self.nk as i64 })
            })
    }

    /// Calls `f(k)` for every key of index row `q` (index coordinates), each once.
    pub fn for_each_key(&self, h: usize, q: usize, mut f: impl FnMut(usize)) {
        let qb = q / self.block_m;
        for (kb, m) in self.blocks(h, qb) {
            let keys = kb * self.block_n..((kb + 1) * self.block_n).min(self.nk);
            // Within one row a mask is often decided for the whole block (a causal mask away
            // from the diagonal, a row line): only the others are checked key by key.
            let whole = match self.masks.get(m as usize) {
                _ if m == FULL => Some(true),
                Some(p) => decide(p, &Region::new(h, (q, q + 1), (keys.start, keys.end), (self.nq, self.nk))),
                None => Some(false),
            };
            match whole {
                Some(true) => keys.for_each(&mut f),
                Some(false) => {}
                None => keys.filter(|&k| self.passes(m, h, q, k)).for_each(&mut f),
            }
        }
        for (c, m) in self.columns(h, qb) {
            if self.passes(m, h, q, c) {
                f(c)
            }
        }
    }

    /// How many keys index row `q` of head `h` computes (index coordinates): what
    /// [`SparseIndex::for_each_key`] would visit, with full blocks counted by their width.
    pub fn row_len(&self, h: usize, q: usize) -> usize {
        let qb = q / self.block_m;
        let mut n = 0;
        for (kb, m) in self.blocks(h, qb) {
            let keys = (kb * self.block_n, ((kb + 1) * self.block_n).min(self.nk));
            n += self.count(m, h, (q, q + 1), keys);
        }
        n += self.columns(h, qb).map(|(c, m)| self.count(m, h, (q, q + 1), (c, c + 1))).sum::<u64>();
        n as usize
    }

    /// Pairs of rows `qs` x keys `ks` (half-open, index coordinates) that mask `m` passes at
    /// head `h`: whole regions where intervals decide the mask, pair by pair only near its
    /// edges.
    fn count(&self, m: u16, h: usize, qs: (usize, usize), ks: (usize, usize)) -> u64 {
        let r = crate::interval::Region::new(h, qs, ks, (self.nq, self.nk));
        if m == FULL {
            return r.pairs();
        }
        self.masks.get(m as usize).map_or(0, |p| crate::interval::count(p, &r))
    }

    /// Whether the index computes pair `(q, k)` of head `h` (index coordinates).
    pub fn contains(&self, h: usize, q: usize, k: usize) -> bool {
        let qb = q / self.block_m;
        let kb = k / self.block_n;
        self.blocks(h, qb).any(|(b, m)| b == kb && self.passes(m, h, q, k))
            || self.columns(h, qb).any(|(c, m)| c == k && self.passes(m, h, q, k))
    }

    /// Pairs computed for head `h`.
    pub fn head_pairs(&self, h: usize) -> u64 {
        self.pairs_of(h, &mut HashMap::new())
    }

    /// Pairs computed for each head: [`SparseIndex::head_pairs`] of every head, with the
    /// counts of masked entries that do not depend on the head (a causal or local boundary,
    /// the same in every head) made once.
    pub fn pairs_per_head(&self) -> Vec<u64> {
        let mut counted = HashMap::new();
        (0..self.heads).map(|h| self.pairs_of(h, &mut counted)).collect()
    }

    /// Head `h`'s pairs; `counted` remembers the counts of head-independent masked entries
    /// by (mask, rows, keys).
    fn pairs_of(&self, h: usize, counted: &mut HashMap<EntryKey, u64>) -> u64 {
        // A mask that never reads the key passes the same rows of a query block whichever
        // keys an entry covers: counted once per (query block, mask), then multiplied.
        let q_only: Vec<bool> = self.masks.iter().map(|p| !p.uses(Var::K)).collect();
        let any_head: Vec<bool> = self.masks.iter().map(|p| !p.uses(Var::H)).collect();
        let mut rows_passing: HashMap<u16, u64> = HashMap::new();
        let mut n = 0u64;
        for qb in 0..self.q_blocks() {
            let qs = (qb * self.block_m, ((qb + 1) * self.block_m).min(self.nq));
            rows_passing.clear();
            let entries = self
                .blocks(h, qb)
                .map(|(kb, m)| (m, (kb * self.block_n, ((kb + 1) * self.block_n).min(self.nk))))
                .chain(self.columns(h, qb).map(|(c, m)| (m, (c, c + 1))));
            for (m, ks) in entries {
                n += if m == FULL {
                    ((qs.1 - qs.0) * (ks.1 - ks.0)) as u64
                } else if q_only.get(m as usize).copied().unwrap_or(false) {
                    let rows = *rows_passing.entry(m).or_insert_with(|| self.count(m, h, qs, (ks.0, ks.0 + 1)));
                    rows * (ks.1 - ks.0) as u64
                } else if any_head.get(m as usize).copied().unwrap_or(false) {
                    *counted.entry((m, qs, ks)).or_insert_with(|| self.count(m, h, qs, ks))
                } else {
                    self.count(m, h, qs, ks)
                };
            }
        }
        n
    }

    /// Pairs computed, over all heads.
    pub fn pairs(&self) -> u64 {
        (0..self.heads).into_par_iter().map(|h| self.head_pairs(h)).sum()
    }

    /// Share of head `h`'s `nq * nk` pairs that the index computes.
    pub fn head_density(&self, h: usize) -> f64 {
        self.head_pairs(h) as f64 / (self.nq as f64 * self.nk as f64)
    }

    /// Share of all `heads * nq * nk` pairs that the index computes.
    pub fn density(&self) -> f64 {
        self.pairs() as f64 / (self.heads as f64 * self.nq as f64 * self.nk as f64)
    }

    /// Entry counts: (full blocks, partial blocks, columns).
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        let full = self.block_mask.iter().filter(|m| **m == FULL).count();
        (full, self.block_mask.len() - full, self.col_idx.len())
    }

    /// Index position of token `t` on the query axis.
    pub fn q_pos(&self, t: usize) -> usize {
        self.permutation.map_or(t, |p| permute::forward(p, t, self.nq))
    }

    /// Index position of token `t` on the key axis.
    pub fn k_pos(&self, t: usize) -> usize {
        self.permutation.map_or(t, |p| permute::forward(p, t, self.nk))
    }

    /// Token at index position `i` of the query axis.
    pub fn q_token(&self, i: usize) -> usize {
        self.permutation.map_or(i, |p| permute::inverse(p, i, self.nq))
    }

    /// Token at index position `i` of the key axis.
    pub fn k_token(&self, i: usize) -> usize {
        self.permutation.map_or(i, |p| permute::inverse(p, i, self.nk))
    }

    /// One index over the heads `parts` name, in that order: head `i` of the result is head
    /// `parts[i].1` of index `parts[i].0`, with its mask ids moved into one shared table.
    /// A predicate that reads the head `h` gets that head's number fixed in, so the result
    /// computes exactly the pairs of its sources.
    ///
    /// This is how heads that use different patterns share one kernel launch: each pattern's
    /// index is built over the layer's heads, and the heads one kernel serves are gathered.
    /// Every part must have the same shape, block sizes and permutation.
    pub fn gather_heads(parts: &[(&SparseIndex, usize)]) -> Result<SparseIndex, Error> {
        let (first, _) = parts.first().ok_or_else(|| Error::Shape("gathering no heads".into()))?;
        let mut out = SparseIndex {
            permutation: first.permutation,
            ..SparseIndex::empty(parts.len(), first.nq, first.nk, first.block_m, first.block_n)
        };
        let mut table = MaskTable::default();
        for (ix, h) in parts {
            if (ix.nq, ix.nk, ix.block_m, ix.block_n, ix.permutation)
                != (out.nq, out.nk, out.block_m, out.block_n, out.permutation)
            {
                return Err(Error::Shape(format!(
                    "gathering heads of indexes over {} x {} with {} x {} blocks and permutation {:?} and over {} x {} with {} x {}, {:?}",
                    ix.nq, ix.nk, ix.block_m, ix.block_n, ix.permutation, out.nq, out.nk, out.block_m, out.block_n, out.permutation
                )));
            }
            if *h >= ix.heads {
                return Err(Error::Shape(format!("head {h} of an index with {} heads", ix.heads)));
            }
            // Only the masks this head's entries use enter the shared table.
            let mut remap: Vec<Option<u16>> = vec![None; ix.masks.len()];
            let mut map = |m: u16| -> Result<u16, Error> {
                if m == FULL {
                    return Ok(FULL);
                }
                let slot = remap
                    .get_mut(m as usize)
                    .ok_or_else(|| Error::Layout(format!("mask id {m} is not in the table")))?;
                if let Some(id) = slot {
                    return Ok(*id);
                }
                let p = &ix.masks[m as usize];
                let id = table.intern(if p.uses(Var::H) { p.with_var(Var::H, *h as i64) } else { p.clone() })?;
                *slot = Some(id);
                Ok(id)
            };
            for qb in 0..ix.q_blocks() {
                for (kb, m) in ix.blocks(*h, qb) {
                    out.block_idx.push(kb as u32);
                    out.block_mask.push(map(m)?);
                }
                for (c, m) in ix.columns(*h, qb) {
                    out.col_idx.push(c as u32);
                    out.col_mask.push(map(m)?);
                }
                let len = |n: usize| {
                    u32::try_from(n).map_err(|_| Error::Layout("the index is too large for 32-bit offsets".into()))
                };
                out.block_ptr.push(len(out.block_idx.len())?);
                out.col_ptr.push(len(out.col_idx.len())?);
            }
        }
        out.masks = table.masks;
        Ok(out)
    }

    /// The pairs of this index that also satisfy `p` (a static predicate over index
    /// positions): entries where `p` is all-true stay as they are, those where it is false
    /// go, the rest carry `mask && p`.
    pub fn restrict(&self, p: &Pred) -> Result<SparseIndex, Error> {
        let mut table = MaskTable::with_masks(&self.masks);
        let mut out = SparseIndex {
            permutation: self.permutation,
            ..SparseIndex::empty(self.heads, self.nq, self.nk, self.block_m, self.block_n)
        };
        let region = |h: usize, q0: usize, q1: usize, k0: usize, k1: usize| {
            Region::new(h, (q0, q1), (k0, k1), (self.nq, self.nk))
        };
        // The entry's pairs that satisfy `p`: None (drop), or the new mask id.
        let mut narrow = |m: u16, r: &Region| -> Result<Option<u16>, Error> {
            match decide(p, r) {
                Some(false) => return Ok(None),
                Some(true) => return Ok(Some(m)),
                None => {}
            }
            let combined = if m == FULL { p.clone() } else { self.masks[m as usize].clone().and(p.clone()) };
            match decide_exact(&combined, r) {
                Some(true) => Ok(Some(FULL)),
                Some(false) => Ok(None),
                None => table.intern(combined).map(Some),
            }
        };
        for h in 0..self.heads {
            for qb in 0..self.q_blocks() {
                let (q0, q1) = (qb * self.block_m, ((qb + 1) * self.block_m).min(self.nq));
                for (kb, m) in self.blocks(h, qb) {
                    let r = region(h, q0, q1, kb * self.block_n, ((kb + 1) * self.block_n).min(self.nk));
                    if let Some(m) = narrow(m, &r)? {
                        out.block_idx.push(kb as u32);
                        out.block_mask.push(m);
                    }
                }
                for (c, m) in self.columns(h, qb) {
                    if let Some(m) = narrow(m, &region(h, q0, q1, c, c + 1))? {
                        out.col_idx.push(c as u32);
                        out.col_mask.push(m);
                    }
                }
                out.block_ptr.push(out.block_idx.len() as u32);
                out.col_ptr.push(out.col_idx.len() as u32);
            }
        }
        out.masks = table.masks;
        Ok(out)
    }

    /// Whether the index computes the pair of tokens `(q, k)` (original coordinates).
    pub fn contains_token(&self, h: usize, q: usize, k: usize) -> bool {
        self.contains(h, self.q_pos(q), self.k_pos(k))
    }
}

/// The indexes of a packed batch of sequences (cu_seqlens style), concatenated.
///
/// Q is `[heads, total_q, d]` with sequence `b` at tokens `seq_q[b]..seq_q[b + 1]` (K and V
/// likewise with `seq_k`). Rows are ordered by sequence, then head, then query block: the rows
/// of sequence `b` start at `heads * seq_qb[b]`. Key blocks, columns and mask predicates use
/// positions local to the sequence (and its own `nq`, `nk`); the mask table is shared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchIndex {
    pub heads: usize,
    pub block_m: usize,
    pub block_n: usize,
    pub permutation: Option<Permutation>,
    pub masks: Vec<Pred>,
    pub block_ptr: Vec<u32>,
    pub block_idx: Vec<u32>,
    pub block_mask: Vec<u16>,
    pub col_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub col_mask: Vec<u16>,
    /// Cumulative query tokens, key tokens and query blocks: `batch + 1` entries from 0.
    pub seq_q: Vec<i32>,
    pub seq_k: Vec<i32>,
    pub seq_qb: Vec<i32>,
}

impl BatchIndex {
    /// Concatenates per-sequence indexes (same heads, block sizes and permutation).
    pub fn concat(parts: &[SparseIndex]) -> Result<BatchIndex, Error> {
        let first = parts.first().ok_or_else(|| Error::Shape("a batch needs at least one sequence".into()))?;
        let mut out = BatchIndex {
            heads: first.heads,
            block_m: first.block_m,
            block_n: first.block_n,
            permutation: first.permutation,
            masks: Vec::new(),
            block_ptr: vec![0],
            block_idx: Vec::new(),
            block_mask: Vec::new(),
            col_ptr: vec![0],
            col_idx: Vec::new(),
            col_mask: Vec::new(),
            seq_q: vec![0],
            seq_k: vec![0],
            seq_qb: vec![0],
        };
        let mut table = MaskTable::default();
        let too_big = || Error::Layout("the batch is too large for 32-bit offsets".into());
        for (b, ix) in parts.iter().enumerate() {
            if (ix.heads, ix.block_m, ix.block_n, ix.permutation)
                != (out.heads, out.block_m, out.block_n, out.permutation)
            {
                return Err(Error::Shape(format!(
                    "sequence {b}'s index has {} heads, {} x {} blocks and permutation {:?}; sequence 0's has {}, {} x {}, {:?}",
                    ix.heads, ix.block_m, ix.block_n, ix.permutation, out.heads, out.block_m, out.block_n, out.permutation
                )));
            }
            // This sequence's mask ids in the shared table.
            let remap: Vec<u16> = ix.masks.iter().map(|m| table.intern(m.clone())).collect::<Result<_, _>>()?;
            let map = |m: u16| if m == FULL { FULL } else { remap[m as usize] };
            let (b0, c0) = (*out.block_ptr.last().unwrap_or(&0), *out.col_ptr.last().unwrap_or(&0));
            out.block_ptr.extend(ix.block_ptr[1..].iter().map(|p| p + b0));
            out.col_ptr.extend(ix.col_ptr[1..].iter().map(|p| p + c0));
            out.block_idx.extend_from_slice(&ix.block_idx);
            out.block_mask.extend(ix.block_mask.iter().map(|m| map(*m)));
            out.col_idx.extend_from_slice(&ix.col_idx);
            out.col_mask.extend(ix.col_mask.iter().map(|m| map(*m)));
            let last = |v: &Vec<i32>| *v.last().unwrap_or(&0);
            let next = |v: &Vec<i32>, add: usize| {
                i32::try_from(add).ok().and_then(|a| last(v).checked_add(a)).ok_or_else(too_big)
            };
            let (sq, sk, sqb) = (next(&out.seq_q, ix.nq)?, next(&out.seq_k, ix.nk)?, next(&out.seq_qb, ix.q_blocks())?);
            out.seq_q.push(sq);
            out.seq_k.push(sk);
            out.seq_qb.push(sqb);
        }
        if out.block_idx.len() > u32::MAX as usize || out.col_idx.len() > u32::MAX as usize {
            return Err(too_big());
        }
        out.masks = table.masks;
        Ok(out)
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.seq_q.len() - 1
    }

    /// The index of a single sequence, as a batch of one.
    pub fn single(ix: &SparseIndex) -> Result<BatchIndex, Error> {
        BatchIndex::concat(std::slice::from_ref(ix))
    }
}
