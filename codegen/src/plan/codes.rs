//! The encoding the GPU builders read: entry codes of column rules and row lines (`DROP`,
//! `PER_COLUMN`, `PER_LINE`), emitted as constants into the index module's generated config
//! (`index.rs`), and the run tables that use them.

use weft_patterns::Error;
use weft_patterns::FULL;

/// Entry code of a chosen column that the row's blocks already compute (or that the pattern
/// excludes there): it gets no column entry.
pub const DROP: u16 = 0xfffe;

/// Rule codes from this up to [`PER_LINE`] are offsets (`code - PER_COLUMN`) into
/// [`ColumnRules::codes`]: one code per key of the run.
pub const PER_COLUMN: u32 = 0x1_0000;

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
    pub(super) fn push_row(&mut self, runs: Vec<(u32, u32, u32)>, codes: Vec<u32>) -> Result<(), Error> {
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
/// ([`weft_patterns::families::RowLines::tile_offset`]). When `r < len` (the block may hold line
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
    pub(super) interned: std::collections::HashMap<Vec<u16>, u32>,
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
        Some(weft_patterns::families::RowLines::tile_offset(self.stride, phase, q0)).filter(|r| *r < self.len)
    }

    /// The line code of one code per offset: the code itself when they are all one, else a
    /// vector (each distinct vector stored once).
    pub(super) fn intern(&mut self, v: Vec<u16>) -> Result<u32, Error> {
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
