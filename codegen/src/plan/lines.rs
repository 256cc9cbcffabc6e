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
//!
//! Rows are computed in parallel, in chunks of consecutive rows, each chunk with its new masks
//! numbered locally in the order it meets them; then, chunk by chunk in order, the new masks
//! enter the plan's table. That gives the ids a single pass in row order would give, so plans
//! (and the kernels generated from their mask tables) do not depend on the thread count.

use std::collections::HashMap;

use rayon::prelude::*;
use weft_dsl::{Pred, Var};

use super::{check_mask_count, BlockEntries, ColumnRules, Entry, LineCodes, DROP, PER_COLUMN};
use weft_patterns::families::{Node, RowLines};
use weft_patterns::index::{and, cov, settle, Cov, MaskTable};
use weft_patterns::interval::{decide, decide_exact, Region};
use weft_patterns::Error;
use weft_patterns::FULL;

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
    Fixed(u32),
    /// With it: the coverage's predicate and, per row of the block, the verdict on its keys
    /// with `X` false (`off`) and true (`on`), how many rows `off` decides each way, and the
    /// predicate's codes per offset so far (from the chunk's cache).
    Symbolic { p: Pred, off: Vec<Option<bool>>, on: Vec<Option<bool>>, off_count: [usize; 2], ids: Vec<Option<u32>> },
}

/// Codes of a chunk before its new masks have ids: below `LOCAL` an entry code (`DROP`,
/// `FULL`, or the id of a mask already in the plan's table), from `LOCAL` on the chunk's new
/// mask `code - LOCAL`.
const LOCAL: u32 = 0x1_0000;

/// A line code before the chunk's masks have ids: one code, or the chunk's vector `i`; in a
/// rule row, a run may instead point at the row's per-key codes from `offset` on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowLine {
    Code(u32),
    Vector(usize),
    PerKey(u32),
}

/// Rows per parallel task (they share caches: most forms recur from row to row).
const CHUNK_ROWS: usize = 32;

/// One chunk of rows' work, on its own thread: the plan's table and line codes so far (read
/// only), the masks and vectors the chunk adds, and caches.
struct ChunkCodes<'g> {
    table: &'g MaskTable,
    lines: &'g LineCodes,
    tile_masks: &'g [Pred],
    new: Vec<Pred>,
    new_ids: HashMap<Pred, u32>,
    vectors: Vec<Vec<u32>>,
    vector_ids: HashMap<Vec<u32>, usize>,
    /// Codes of a symbolic predicate at each offset (most forms recur from row to row).
    at: HashMap<Pred, Vec<Option<u32>>>,
    /// Whether a line code's masks read `k`.
    reads_k: HashMap<u32, bool>,
}

/// What a chunk adds, for [`Interner::finish`], with its rows' results.
struct ChunkOut<T> {
    new: Vec<Pred>,
    vectors: Vec<Vec<u32>>,
    result: T,
}

impl<'g> ChunkCodes<'g> {
    fn new(table: &'g MaskTable, lines: &'g LineCodes, tile_masks: &'g [Pred]) -> ChunkCodes<'g> {
        ChunkCodes {
            table,
            lines,
            tile_masks,
            new: Vec::new(),
            new_ids: HashMap::new(),
            vectors: Vec::new(),
            vector_ids: HashMap::new(),
            at: HashMap::new(),
            reads_k: HashMap::new(),
        }
    }

    fn intern(&mut self, p: Pred) -> u32 {
        if let Some(id) = self.table.get(&p) {
            return u32::from(id);
        }
        if let Some(code) = self.new_ids.get(&p) {
            return *code;
        }
        let code = LOCAL + self.new.len() as u32;
        self.new_ids.insert(p.clone(), code);
        self.new.push(p);
        code
    }

    fn settled(&mut self, c: Cov, r: &Region) -> u32 {
        match settle(c, r) {
            None => u32::from(DROP),
            Some(Entry::Full) => u32::from(FULL),
            Some(Entry::Mask(p)) => self.intern(p),
        }
    }

    /// The mask of a code already in the plan's table.
    fn mask(&self, id: u16) -> &Pred {
        &self.table.masks()[id as usize]
    }

    /// The line code of one code per offset: the code when they are all one, else a vector.
    fn line(&mut self, v: Vec<u32>) -> RowLine {
        if v.iter().all(|c| *c == v[0]) {
            return RowLine::Code(v[0]);
        }
        if let Some(i) = self.vector_ids.get(&v) {
            return RowLine::Vector(*i);
        }
        let i = self.vectors.len();
        self.vector_ids.insert(v.clone(), i);
        self.vectors.push(v);
        RowLine::Vector(i)
    }

    /// Whether line code `code` (in the plan's line codes) has a mask that reads `k`.
    fn reads_k(&mut self, code: u32) -> bool {
        let (lines, table) = (self.lines, self.table);
        *self.reads_k.entry(code).or_insert_with(|| {
            (0..lines.len).any(|r| match lines.resolve(code, r) {
                FULL | DROP => false,
                id => table.masks()[id as usize].uses(Var::K),
            })
        })
    }

    fn out<T>(self, result: T) -> ChunkOut<T> {
        ChunkOut { new: self.new, vectors: self.vectors, result }
    }
}

/// Takes rows' results into the plan's table and line codes, in row order.
struct Interner<'t> {
    table: &'t mut MaskTable,
    lines: &'t mut LineCodes,
}

/// A chunk's codes in the plan's numbering: its new masks' ids, its vectors' line codes.
struct Remap {
    ids: Vec<u16>,
    vectors: Vec<u32>,
}

impl Remap {
    fn code(&self, c: u32) -> u16 {
        if c >= LOCAL {
            self.ids[(c - LOCAL) as usize]
        } else {
            c as u16
        }
    }

    /// The line code (or, for `PerKey`, the run code) in the plan's numbering.
    fn line(&self, l: RowLine) -> u32 {
        match l {
            RowLine::Code(c) => u32::from(self.code(c)),
            RowLine::Vector(i) => self.vectors[i],
            RowLine::PerKey(offset) => PER_COLUMN + offset,
        }
    }
}

impl Interner<'_> {
    /// Interns a chunk's new masks and vectors (in the order its rows met them).
    fn finish<T>(&mut self, row: ChunkOut<T>) -> Result<(T, Remap), Error> {
        let ids: Vec<u16> = row.new.into_iter().map(|p| self.table.intern(p)).collect::<Result<_, _>>()?;
        check_mask_count(self.table)?;
        let mut remap = Remap { ids, vectors: Vec::new() };
        remap.vectors = row
            .vectors
            .iter()
            .map(|v| self.lines.intern(v.iter().map(|c| remap.code(*c)).collect()))
            .collect::<Result<_, _>>()?;
        Ok((row.result, remap))
    }
}

/// Rows `0..rows` in chunks of [`CHUNK_ROWS`].
fn chunks(rows: usize) -> Vec<std::ops::Range<usize>> {
    (0..rows).step_by(CHUNK_ROWS).map(|r0| r0..(r0 + CHUNK_ROWS).min(rows)).collect()
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

impl Lines<'_> {
    fn len(&self) -> usize {
        self.stride.min(self.bm)
    }

    fn q_blocks(&self) -> usize {
        self.nq.div_ceil(self.bm)
    }

    fn region(&self, h: usize, (q0, q1): (usize, usize), (k0, k1): (usize, usize)) -> Region {
        Region::new(h, (q0, q1), (k0, k1), (self.nq, self.nk))
    }

    fn tile_masks(&self) -> Vec<Pred> {
        (0..self.len()).map(|r| RowLines::tile_mask(self.stride, self.bm, r)).collect()
    }

    /// Rule row `row` (`slot * q_blocks + qb`) as a tile.
    fn tile(&self, row: usize, tile_masks: &[Pred]) -> Tile {
        let (h, qb) = (row / self.q_blocks(), row % self.q_blocks());
        let q0 = qb * self.bm;
        let q1 = (q0 + self.bm).min(self.nq);
        let r = self.region(h, (q0, q1), (0, self.nk));
        Tile { h, q0, rows: q1 - q0, states: tile_masks.iter().map(|t| decide(t, &r)).collect() }
    }

    /// `c` (folded with the placeholder) over the tile's rows and keys `keys`, ready to settle.
    fn form(&self, c: Cov, tile: &Tile, keys: (usize, usize), codes: &mut ChunkCodes<'_>) -> Form {
        let x = RowLines::placeholder();
        match c {
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
                let ids = codes.at.get(&p).cloned().unwrap_or_else(|| vec![None; self.len()]);
                Form::Symbolic { off, on: states(true), p, off_count, ids }
            }
            c => Form::Fixed(codes.settled(c, &self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys))),
        }
    }

    /// Keeps the codes a form found in the chunk's cache.
    fn keep_ids(form: Option<Form>, codes: &mut ChunkCodes<'_>) {
        if let Some(Form::Symbolic { p, ids, .. }) = form {
            if codes.at.get(&p) != Some(&ids) {
                codes.at.insert(p, ids);
            }
        }
    }

    /// The code of `form` at offset `r`, where the interval analysis leaves the rows mixed:
    /// the CPU's settle of its predicate with `T_r`, from the rows' verdicts (line rows
    /// `on`, the others `off`).
    fn settle_at(&self, form: &mut Form, tile: &Tile, r: usize, codes: &mut ChunkCodes<'_>) -> u32 {
        let (p, off, on, off_count, ids) = match form {
            Form::Fixed(code) => return *code,
            Form::Symbolic { p, off, on, off_count, ids } => (p, off, on, off_count, ids),
        };
        let mut count = *off_count;
        for t in (r..tile.rows).step_by(self.stride) {
            for (s, d) in [(off[t], -1isize), (on[t], 1)] {
                if let Some(b) = s {
                    count[b as usize] = (count[b as usize] as isize + d) as usize;
                }
            }
        }
        if count[1] == tile.rows {
            u32::from(FULL)
        } else if count[0] == tile.rows {
            u32::from(DROP)
        } else if let Some(id) = ids[r] {
            id
        } else {
            let id = codes.intern(substitute(p, &RowLines::placeholder(), &codes.tile_masks[r]));
            ids[r] = Some(id);
            id
        }
    }

    /// One code per offset for a coverage whose variants `cover(node)` gives; `sym` is its
    /// variant with the placeholder (`cover(&self.sym[h])`, which callers have at hand).
    fn vector(
        &self,
        tile: &Tile,
        keys: (usize, usize),
        sym: Cov,
        cover: &dyn Fn(&Node) -> Cov,
        codes: &mut ChunkCodes<'_>,
    ) -> Vec<u32> {
        let mut form = self.form(sym, tile, keys, codes);
        let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys);
        let mut decided = [None, None];
        let v = (0..self.len())
            .map(|r| match tile.states[r] {
                None => self.settle_at(&mut form, tile, r, codes),
                Some(b) => *decided[b as usize].get_or_insert_with(|| {
                    codes.settled(cover(if b { &self.on[tile.h] } else { &self.off[tile.h] }), &region)
                }),
            })
            .collect();
        Self::keep_ids(Some(form), codes);
        v
    }

    /// `row(r, codes)` for every rule row `0..rows`, in parallel chunks; then each chunk's new
    /// masks and vectors interned in order, and `take(result, remap)` called per row in order.
    fn per_row<T: Send>(
        &self,
        rows: usize,
        (table, lines): (&mut MaskTable, &mut LineCodes),
        row: impl Fn(usize, &mut ChunkCodes<'_>) -> T + Sync,
        mut take: impl FnMut(T, &Remap) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let tile_masks = self.tile_masks();
        let chunks: Vec<ChunkOut<Vec<T>>> = chunks(rows)
            .into_par_iter()
            .map(|rows| {
                let mut codes = ChunkCodes::new(table, lines, &tile_masks);
                let out = rows.map(|r| row(r, &mut codes)).collect();
                codes.out(out)
            })
            .collect();
        let mut interner = Interner { table, lines };
        for chunk in chunks {
            let (results, remap) = interner.finish(chunk)?;
            for result in results {
                take(result, &remap)?;
            }
        }
        Ok(())
    }

    /// The line code of every block entry (`entries` holds every block any offset keeps,
    /// slot rows `slots x q_blocks`).
    pub(super) fn block_codes(
        &self,
        entries: &BlockEntries,
        table: &mut MaskTable,
        lines: &mut LineCodes,
    ) -> Result<Vec<u32>, Error> {
        let mut out = Vec::with_capacity(entries.kb.len());
        self.per_row(
            entries.ptr.len() - 1,
            (table, lines),
            |row, codes| self.row_block_codes(row, entries, codes),
            |row, remap| {
                out.extend(row.into_iter().map(|l| remap.line(l)));
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// One row's block line codes.
    fn row_block_codes(&self, row: usize, entries: &BlockEntries, codes: &mut ChunkCodes<'_>) -> Vec<RowLine> {
        let tile = self.tile(row, codes.tile_masks);
        // The vector of a coverage that is the placeholder alone depends on the tile only.
        let mut lines_alone = None;
        (entries.ptr[row] as usize..entries.ptr[row + 1] as usize)
            .map(|e| {
                let kb = entries.kb[e] as usize;
                let keys = (kb * self.bn, ((kb + 1) * self.bn).min(self.nk));
                let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys);
                let cover = |n: &Node| cov(n, &region, None);
                let sym = cover(&self.sym[tile.h]);
                let alone = tile.states.iter().all(Option::is_none) && sym == Cov::Mask(RowLines::placeholder());
                match lines_alone {
                    Some(code) if alone => code,
                    _ => {
                        let v = self.vector(&tile, keys, sym, &cover, codes);
                        let code = codes.line(v);
                        if alone {
                            lines_alone = Some(code);
                        }
                        code
                    }
                }
            })
            .collect()
    }

    /// Appends to `rules` the column rules of query blocks holding line rows, one row per
    /// slot row of `entries` (whose line codes are `block_codes`).
    pub(super) fn column_rules(
        &self,
        entries: &BlockEntries,
        block_codes: &[u32],
        rules: &mut ColumnRules,
        table: &mut MaskTable,
        lines: &mut LineCodes,
    ) -> Result<(), Error> {
        self.per_row(
            entries.ptr.len() - 1,
            (table, lines),
            |row, codes| if self.cols { self.row_rules(row, entries, block_codes, codes) } else { Default::default() },
            |(runs, per_key), remap| {
                let runs = runs.into_iter().map(|(c0, c1, l)| (c0, c1, remap.line(l))).collect();
                rules.push_row(runs, per_key.into_iter().map(|l| remap.line(l)).collect())
            },
        )
    }

    /// One row's column rules: runs of keys with a line code (a `RowLine::PerKey(offset)` run
    /// points into the row's per-key codes).
    fn row_rules(
        &self,
        row: usize,
        entries: &BlockEntries,
        block_codes: &[u32],
        codes: &mut ChunkCodes<'_>,
    ) -> (Vec<(u32, u32, RowLine)>, Vec<RowLine>) {
        let (mut runs, mut per_key) = (Vec::new(), Vec::new());
        let nkb = self.nk.div_ceil(self.bn);
        let tile = self.tile(row, codes.tile_masks);
        let (e0, e1) = (entries.ptr[row] as usize, entries.ptr[row + 1] as usize);
        let (kbs, row_codes) = (&entries.kb[e0..e1], &block_codes[e0..e1]);
        let full = |l: &RowLine| matches!(l, RowLine::Code(c) if *c == u32::from(FULL));
        // Key-block ranges, halved until one code serves the range (in key order).
        let mut stack = vec![(0usize, nkb)];
        while let Some((b0, b1)) = stack.pop() {
            let (k0, k1) = (b0 * self.bn, (b1 * self.bn).min(self.nk));
            let (i0, i1) = (kbs.partition_point(|&b| (b as usize) < b0), kbs.partition_point(|&b| (b as usize) < b1));
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
                    let code = self.column_code(&tile, (block, &self.block_sym(&tile, b0)), (k0, k0 + 1), codes);
                    if !full(&code) {
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
            let keys: Vec<RowLine> = (k0..k1).map(|c| self.column_code(&tile, block, (c, c + 1), codes)).collect();
            if keys.iter().all(|c| *c == keys[0]) {
                if !full(&keys[0]) {
                    runs.push((k0 as u32, k1 as u32, keys[0]));
                }
            } else {
                runs.push((k0 as u32, k1 as u32, RowLine::PerKey(per_key.len() as u32)));
                per_key.extend(keys);
            }
        }
        (runs, per_key)
    }

    /// Key block `kb`'s coverage with the placeholder: its entry's mask at an offset is this
    /// with `T_r`.
    fn block_sym(&self, tile: &Tile, kb: usize) -> Cov {
        let keys = (kb * self.bn, ((kb + 1) * self.bn).min(self.nk));
        cov(&self.sym[tile.h], &self.region(tile.h, (tile.q0, tile.q0 + tile.rows), keys), None)
    }

    /// The line code of a chosen column at key `key.0` (of a range every key of which
    /// settles alike) in a block whose entry has line code `block.0` (in the plan's line
    /// codes) and coverage `block.1` ([`Lines::block_sym`]).
    fn column_code(
        &self,
        tile: &Tile,
        (block, block_sym): (u32, &Cov),
        key: (usize, usize),
        codes: &mut ChunkCodes<'_>,
    ) -> RowLine {
        let region = self.region(tile.h, (tile.q0, tile.q0 + tile.rows), key);
        let here = |n: &Node| cov(n, &region, Some(key.0));
        let here_sym = here(&self.sym[tile.h]);
        // Forms of the two coverages a column can have where the rows are mixed: with no
        // block entry there, and beyond a masked entry.
        let (mut alone, mut beyond_mask) = (None, None);
        let v = (0..self.len())
            .map(|r| {
                let b = codes.lines.resolve(block, r);
                // What the column adds beyond its block's entry (the CPU builder's column
                // pass): nothing past a full entry, and past a masked one what its mask leaves.
                match tile.states[r] {
                    _ if b == FULL => u32::from(DROP),
                    Some(on) => {
                        let here = here(if on { &self.on[tile.h] } else { &self.off[tile.h] });
                        let c = if b == DROP { here } else { and(here, Cov::Mask(!codes.mask(b).clone())) };
                        codes.settled(c, &region)
                    }
                    None => {
                        // (The coverage is folded only when its form is not known yet: most
                        // offsets find it.)
                        let (slot, beyond) = match block_sym {
                            _ if b == DROP => (&mut alone, None),
                            Cov::Mask(p) => (&mut beyond_mask, Some(p)),
                            // (A masked entry whose coverage is not a mask cannot occur: settle
                            // keeps masks only. Should it, the CPU's formula, directly.)
                            _ => {
                                let here = match &here_sym {
                                    Cov::Mask(p) => {
                                        Cov::Mask(substitute(p, &RowLines::placeholder(), &codes.tile_masks[r]))
                                    }
                                    c => c.clone(),
                                };
                                return codes.settled(and(here, Cov::Mask(!codes.mask(b).clone())), &region);
                            }
                        };
                        let form = slot.get_or_insert_with(|| {
                            let c = match beyond {
                                None => here_sym.clone(),
                                Some(p) => and(here_sym.clone(), Cov::Mask(!p.clone())),
                            };
                            self.form(c, tile, key, codes)
                        });
                        self.settle_at(form, tile, r, codes)
                    }
                }
            })
            .collect();
        Self::keep_ids(alone, codes);
        Self::keep_ids(beyond_mask, codes);
        codes.line(v)
    }
}
