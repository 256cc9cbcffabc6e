//! A grid's row lines with an estimated phase, in a GPU plan (see [`LineCodes`]).
//!
//! The CPU builder writes row lines per query block as `T_r` ([`RowLines::tile_mask`]): the
//! rows at offset `r` (modulo the stride) in the block, `r` following from the phase. A plan
//! does not know the phase, so it gives every entry a code for every offset `r < len`.
//! Building the index once per offset would cost `len` builds. Instead, each entry's coverage
//! is folded once with the row lines as a placeholder mask `X` (the fold the CPU builder
//! does, so the CPU's mask text at offset `r` is that coverage with `T_r` for `X`), and then
//! settled per offset from per-row states: on a line row the coverage is the one with `X`
//! true, on the other rows the one with `X` false. Entries whose coverage does not involve
//! `X` keep one code; entries whose coverage is `X` alone (most of a line's blocks) have a
//! vector that depends only on the block's rows.
//!
//! Where the row lines' offset is decided for a whole block (no line row in it, or every row
//! a line row), the CPU builder folds `X` as false or true instead: the plan does the same,
//! through the `off` and `on` nodes.

use std::collections::HashMap;

use weft_dsl::{Pred, Var};

use super::{check_mask_count, entry_code, BlockEntries, ColumnRules, LineCodes, DROP, PER_COLUMN};
use crate::families::{Node, RowLines};
use crate::index::{and, cov, settle, Cov, MaskTable};
use crate::interval::{decide, decide_exact, Region};
use crate::{Error, FULL};

/// One slot node per pattern variant, each with every column chosen and no slash tile kept:
/// the row lines a placeholder (`sym`), on no row (`off`) or on every row (`on`).
pub(super) struct Lines<'a> {
    pub stride: usize,
    pub bm: usize,
    pub bn: usize,
    pub nq: usize,
    pub nk: usize,
    pub sym: &'a [Node],
    pub off: &'a [Node],
    pub on: &'a [Node],
    /// Whether the grid has column lines (without them no column rule is read).
    pub cols: bool,
}

/// A query block of the index, with the interval analysis's verdict on each offset's rows
/// (`Some(false)`: no line row in the block, `Some(true)`: every row is one), as the CPU
/// builder's coverage of [`RowLines`] decides them.
struct Tile {
    h: usize,
    q0: usize,
    rows: usize,
    states: Vec<Option<bool>>,
}

/// A coverage with the placeholder, ready to settle at any offset.
enum Form {
    /// Without the placeholder: one code.
    Fixed(u16),
    /// With it: the coverage's predicate and, per row of the block, the verdict on its keys
    /// with `X` false (`off`) and true (`on`), how many rows `off` decides each way, and the
    /// predicate's mask ids per offset so far (from [`Codes`]' cache).
    Symbolic { p: Pred, off: Vec<Option<bool>>, on: Vec<Option<bool>>, off_count: [usize; 2], ids: Vec<Option<u16>> },
}

/// What the codes of a plan's row lines are interned into, with caches.
pub(super) struct Codes<'t> {
    pub table: &'t mut MaskTable,
    pub lines: &'t mut LineCodes,
    /// `T_r` for each offset.
    tile_masks: Vec<Pred>,
    /// Mask ids of a symbolic predicate at each offset (most predicates recur in every row).
    at: HashMap<Pred, Vec<Option<u16>>>,
    /// Whether a line code's masks read `k`.
    reads_k: HashMap<u32, bool>,
}

impl<'t> Codes<'t> {
    pub(super) fn new(table: &'t mut MaskTable, lines: &'t mut LineCodes, bm: usize) -> Codes<'t> {
        let tile_masks = (0..lines.len).map(|r| RowLines::tile_mask(lines.stride, bm, r)).collect();
        Codes { table, lines, tile_masks, at: HashMap::new(), reads_k: HashMap::new() }
    }

    /// The cached mask ids of symbolic predicate `p` per offset.
    fn ids(&self, p: &Pred) -> Vec<Option<u16>> {
        self.at.get(p).cloned().unwrap_or_else(|| vec![None; self.tile_masks.len()])
    }

    /// Keeps the ids a form found (once per form, not per offset: hashing predicates is
    /// what a plan's row lines spend most time on).
    fn keep_ids(&mut self, form: Option<Form>) {
        if let Some(Form::Symbolic { p, ids, .. }) = form {
            if self.at.get(&p) != Some(&ids) {
                self.at.insert(p, ids);
            }
        }
    }

    fn settled(&mut self, c: Cov, r: &Region) -> Result<u16, Error> {
        entry_code(settle(c, r), self.table)
    }

    /// Whether line code `code`'s masks read `k`.
    fn reads_k(&mut self, code: u32) -> bool {
        let (lines, table) = (&*self.lines, &*self.table);
        *self.reads_k.entry(code).or_insert_with(|| {
            (0..lines.len).any(|r| match lines.resolve(code, r) {
                FULL | DROP => false,
                id => table.masks[id as usize].uses(Var::K),
            })
        })
    }
}

fn has_placeholder(p: &Pred, x: &Pred) -> bool {
    p == x
        || match p {
            Pred::And(a, b) | Pred::Or(a, b) => has_placeholder(a, x) || has_placeholder(b, x),
            Pred::Not(a) => has_placeholder(a, x),
            _ => false,
        }
}

fn substitute(p: &Pred, x: &Pred, with: &Pred) -> Pred {
    if p == x {
        return with.clone();
    }
    match p {
        Pred::And(a, b) => Pred::And(Box::new(substitute(a, x, with)), Box::new(substitute(b, x, with))),
        Pred::Or(a, b) => Pred::Or(Box::new(substitute(a, x, with)), Box::new(substitute(b, x, with))),
        Pred::Not(a) => Pred::Not(Box::new(substitute(a, x, with))),
        other => other.clone(),
    }
}

/// Whether a coverage is the same on every key of a region (its mask does not read `k`).
fn key_free(c: &Cov) -> bool {
    !matches!(c, Cov::Mask(p) if p.uses(Var::K))
}

/// The coverage a column gets beyond its block's entry `block` (a code): what the CPU
/// builder's column pass computes.
fn beyond(here: Cov, block: u16, table: &MaskTable) -> Cov {
    match block {
        FULL => Cov::None,
        DROP => here,
        id => and(here, Cov::Mask(!table.masks[id as usize].clone())),
    }
}

impl Lines<'_> {
    fn len(&self) -> usize {
        self.stride.min(self.bm)
    }

    fn region(&self, h: usize, (q0, q1): (usize, usize), (k0, k1): (usize, usize)) -> Region {
        Region::new(h, (q0, q1), (k0, k1), (self.nq, self.nk))
    }

    fn tile(&self, h: usize, qb: usize, codes: &Codes<'_>) -> Tile {
        let q0 = qb * self.bm;
        let q1 = (q0 + self.bm).min(self.nq);
        let r = self.region(h, (q0, q1), (0, self.nk));
        Tile { h, q0, rows: q1 - q0, states: codes.tile_masks.iter().map(|t| decide(t, &r)).collect() }
    }

    /// The rows of the tile at offset `r`: its line rows.
    fn line_rows(&self, tile: &Tile, r: usize) -> std::iter::StepBy<std::ops::Range<usize>> {
        (r..tile.rows).step_by(self.stride)
    }

    /// `c` (folded with the placeholder) over the tile's rows and keys `keys`, ready to settle.
    fn form(&self, c: Cov, tile: &Tile, keys: (usize, usize), codes: &mut Codes<'_>) -> Result<Form, Error> {
        let x = RowLines::placeholder();
        Ok(match c {
            Cov::Mask(p) if has_placeholder(&p, &x) => {
                let states = |b: bool| -> Vec<Option<bool>> {
                    if p == x {
                        return vec![Some(b); tile.rows];
                    }
                    let pb = substitute(&p, &x, &Pred::Const(b));
                    (0..tile.rows)
                        .map(|t| {
                            let row = self.region(tile.h, (tile.q0 + t, tile.q0 + t + 1), keys);
                            // One key: one evaluation.
                            if keys.1 - keys.0 == 1 {
                                Some(row.eval(&pb, row.q0, row.k0))
                            } else {
                                decide_exact(&pb, &row)
                            }
                        })
                        .collect()
                };
                let off = states(false);
                let count = |b| off.iter().filter(|s| **s == Some(b)).count();
                let off_count = [count(false), count(true)];
                let ids = codes.ids(&p);
                Form::Symbolic { off, on: states(true), p, off_count, ids }
            }
            c => Form::Fixed(codes.settled(c, &self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys))?),
        })
    }

    /// The code of `form` at offset `r`, where the interval analysis leaves the rows mixed:
    /// the CPU's settle of its predicate with `T_r`, from the rows' verdicts (line rows
    /// `on`, the others `off`).
    fn settle_at(&self, form: &mut Form, tile: &Tile, r: usize, codes: &mut Codes<'_>) -> Result<u16, Error> {
        let Form::Symbolic { p, off, on, off_count, ids } = form else {
            let Form::Fixed(code) = form else { unreachable!() };
            return Ok(*code);
        };
        let mut count = *off_count;
        for t in self.line_rows(tile, r) {
            for (s, d) in [(off[t], -1isize), (on[t], 1)] {
                if let Some(b) = s {
                    count[b as usize] = (count[b as usize] as isize + d) as usize;
                }
            }
        }
        if count[1] == tile.rows {
            Ok(FULL)
        } else if count[0] == tile.rows {
            Ok(DROP)
        } else if let Some(id) = ids[r] {
            Ok(id)
        } else {
            let id = codes.table.intern(substitute(p, &RowLines::placeholder(), &codes.tile_masks[r]))?;
            ids[r] = Some(id);
            Ok(id)
        }
    }

    /// One code per offset for a coverage whose three variants `cover(node)` gives.
    fn vector(
        &self,
        tile: &Tile,
        keys: (usize, usize),
        cover: &dyn Fn(&Node) -> Cov,
        codes: &mut Codes<'_>,
    ) -> Result<Vec<u16>, Error> {
        let mut form = self.form(cover(&self.sym[tile.h]), tile, keys, codes)?;
        let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys);
        let mut decided = [None, None];
        let v = (0..self.len())
            .map(|r| match tile.states[r] {
                None => self.settle_at(&mut form, tile, r, codes),
                Some(b) => {
                    if decided[b as usize].is_none() {
                        let node = if b { &self.on[tile.h] } else { &self.off[tile.h] };
                        decided[b as usize] = Some(codes.settled(cover(node), &region)?);
                    }
                    Ok(decided[b as usize].unwrap_or(DROP))
                }
            })
            .collect();
        codes.keep_ids(Some(form));
        v
    }

    /// The line code of every block entry (`entries` holds every block any offset keeps,
    /// slot rows `slots x q_blocks`).
    pub(super) fn block_codes(&self, entries: &BlockEntries, codes: &mut Codes<'_>) -> Result<Vec<u32>, Error> {
        let q_blocks = self.nq.div_ceil(self.bm);
        let mut out = Vec::with_capacity(entries.kb.len());
        for row in 0..entries.ptr.len() - 1 {
            let tile = self.tile(row / q_blocks, row % q_blocks, codes);
            // The vector of a coverage that is the placeholder alone depends on the tile only.
            let mut lines_alone = None;
            for e in entries.ptr[row] as usize..entries.ptr[row + 1] as usize {
                let kb = entries.kb[e] as usize;
                let keys = (kb * self.bn, ((kb + 1) * self.bn).min(self.nk));
                let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys);
                let cover = |n: &Node| cov(n, &region, None);
                let alone = tile.states.iter().all(Option::is_none)
                    && cover(&self.sym[tile.h]) == Cov::Mask(RowLines::placeholder());
                let code = match lines_alone {
                    Some(code) if alone => code,
                    _ => {
                        let v = self.vector(&tile, keys, &cover, codes)?;
                        let code = codes.lines.intern(v);
                        if alone {
                            lines_alone = Some(code);
                        }
                        code
                    }
                };
                out.push(code);
            }
            check_mask_count(codes.table)?;
        }
        Ok(out)
    }

    /// Appends to `rules` the column rules of query blocks holding line rows, one row per
    /// slot row of `entries` (whose line codes are `block_codes`).
    pub(super) fn column_rules(
        &self,
        entries: &BlockEntries,
        block_codes: &[u32],
        rules: &mut ColumnRules,
        codes: &mut Codes<'_>,
    ) -> Result<(), Error> {
        let q_blocks = self.nq.div_ceil(self.bm);
        let nkb = self.nk.div_ceil(self.bn);
        for row in 0..entries.ptr.len() - 1 {
            let (mut runs, mut per_key) = (Vec::new(), Vec::new());
            if !self.cols {
                rules.push_row(runs, per_key);
                continue;
            }
            let tile = self.tile(row / q_blocks, row % q_blocks, codes);
            let (e0, e1) = (entries.ptr[row] as usize, entries.ptr[row + 1] as usize);
            let (kbs, row_codes) = (&entries.kb[e0..e1], &block_codes[e0..e1]);
            // Key-block ranges, halved until one code serves the range (in key order).
            let mut stack = vec![(0usize, nkb)];
            while let Some((b0, b1)) = stack.pop() {
                let (k0, k1) = (b0 * self.bn, (b1 * self.bn).min(self.nk));
                let (i0, i1) =
                    (kbs.partition_point(|&b| (b as usize) < b0), kbs.partition_point(|&b| (b as usize) < b1));
                // The block code of the whole range, when it is one (DROP: no entry).
                let block = if i0 == i1 {
                    Some(u32::from(DROP))
                } else if i1 - i0 == b1 - b0 && row_codes[i0..i1].iter().all(|c| *c == row_codes[i0]) {
                    Some(row_codes[i0])
                } else {
                    None
                };
                if let Some(block) = block.filter(|b| !codes.reads_k(*b)) {
                    let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), (k0, k1));
                    let here = |n: &Node| cov(n, &region, Some(k0));
                    if [&self.sym, &self.off, &self.on].iter().all(|nodes| key_free(&here(&nodes[tile.h]))) {
                        // Every key of the range settles as its first does.
                        let code = self.column_code(&tile, (block, &self.block_sym(&tile, b0)), (k0, k0 + 1), codes)?;
                        if code != u32::from(FULL) {
                            runs.push((k0 as u32, k1 as u32, code));
                        }
                        continue;
                    }
                }
                if b1 - b0 > 1 {
                    let mid = (b0 + b1) / 2;
                    stack.push((mid, b1));
                    stack.push((b0, mid));
                    continue;
                }
                let block = (if i0 == i1 { u32::from(DROP) } else { row_codes[i0] }, &self.block_sym(&tile, b0));
                let keys: Vec<u32> =
                    (k0..k1).map(|c| self.column_code(&tile, block, (c, c + 1), codes)).collect::<Result<_, _>>()?;
                if keys.iter().all(|c| *c == keys[0]) {
                    if keys[0] != u32::from(FULL) {
                        runs.push((k0 as u32, k1 as u32, keys[0]));
                    }
                } else {
                    runs.push((k0 as u32, k1 as u32, PER_COLUMN + per_key.len() as u32));
                    per_key.extend(keys);
                }
            }
            check_mask_count(codes.table)?;
            rules.push_row(runs, per_key);
        }
        Ok(())
    }

    /// Key block `kb`'s coverage with the placeholder: its entry's mask at an offset is this
    /// with `T_r`.
    fn block_sym(&self, tile: &Tile, kb: usize) -> Cov {
        let keys = (kb * self.bn, ((kb + 1) * self.bn).min(self.nk));
        cov(&self.sym[tile.h], &self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys), None)
    }

    /// The line code of a chosen column at key `key.0` (of a range every key of which
    /// settles alike) in a block whose entry has line code `block.0` and coverage `block.1`
    /// ([`Lines::block_sym`]).
    fn column_code(
        &self,
        tile: &Tile,
        (block, block_sym): (u32, &Cov),
        key: (usize, usize),
        codes: &mut Codes<'_>,
    ) -> Result<u32, Error> {
        let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), key);
        let here = |n: &Node| cov(n, &region, Some(key.0));
        let here_sym = here(&self.sym[tile.h]);
        // Forms of the two coverages a column can have where the rows are mixed: with no
        // block entry there, and beyond a masked entry.
        let (mut alone, mut beyond_mask) = (None, None);
        let v = (0..self.len())
            .map(|r| {
                let b = codes.lines.resolve(block, r);
                match tile.states[r] {
                    Some(on) => {
                        let here = here(if on { &self.on[tile.h] } else { &self.off[tile.h] });
                        let c = beyond(here, b, codes.table);
                        codes.settled(c, &region)
                    }
                    None if b == FULL => Ok(DROP),
                    None => {
                        let (slot, c) = if b == DROP {
                            (&mut alone, here_sym.clone())
                        } else {
                            let Cov::Mask(p) = block_sym else {
                                return Err(Error::Layout("internal: a masked entry without a mask".into()));
                            };
                            (&mut beyond_mask, and(here_sym.clone(), Cov::Mask(!p.clone())))
                        };
                        if slot.is_none() {
                            *slot = Some(self.form(c, tile, key, codes)?);
                        }
                        let form = slot.as_mut().ok_or_else(|| Error::Layout("internal: no form".into()))?;
                        self.settle_at(form, tile, r, codes)
                    }
                }
            })
            .collect::<Result<Vec<u16>, Error>>();
        codes.keep_ids(alone);
        codes.keep_ids(beyond_mask);
        Ok(codes.lines.intern(v?))
    }
}
