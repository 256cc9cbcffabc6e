//! What a head's dynamic selection keeps: columns per query group ([`ColSel`]) or blocks
//! ([`BlockSel`]). Plain data shared by the families' builders and retrieval.

/// Key columns kept per group of `bq` query rows.
#[derive(Clone, Debug, PartialEq)]
pub struct ColSel {
    pub bq: usize,
    /// Sorted columns of each query group.
    pub cols: Vec<Vec<u32>>,
}

impl ColSel {
    /// The columns of the group holding query row `q`.
    pub fn columns_for_row(&self, q: usize) -> &[u32] {
        self.cols.get(q / self.bq).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Whether column `c` is kept for query row `q`.
    pub fn selected(&self, q: usize, c: usize) -> bool {
        self.columns_for_row(q).binary_search(&(c as u32)).is_ok()
    }
}

/// Blocks kept at `bq x bk` granularity.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSel {
    pub bq: usize,
    pub bk: usize,
    pub nkb: usize,
    /// `keep[qb * nkb + kb]`.
    pub keep: Vec<bool>,
}

impl BlockSel {
    /// Whether block `(qb, kb)` is kept.
    pub fn selected(&self, qb: usize, kb: usize) -> bool {
        kb < self.nkb && self.keep.get(qb * self.nkb + kb).copied().unwrap_or(false)
    }
}
