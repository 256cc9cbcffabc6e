//! The key-major view of a [`SparseIndex`]: what the dK/dV pass of a backward kernel walks.
//! A CTA of that pass owns one key block (or one gathered key column) of one head and needs
//! every query block whose rows attend to it, with the entry's mask — the transpose of the
//! forward index's rows. Gathered columns get their own lists: one column is often kept by
//! many query blocks (the vertical-vector families), and its gradient sums over all of them.
//!
//! This is the definition a GPU transpose (a counting sort of the forward entries) must
//! reproduce entry for entry.

use crate::index::SparseIndex;

/// The transpose of a [`SparseIndex`]'s entries, in CSR form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMajor {
    /// Query heads, query blocks and key blocks of the forward index; keys.
    pub heads: usize,
    pub q_blocks: usize,
    pub k_blocks: usize,
    pub nk: usize,
    /// `block_ptr[r]..block_ptr[r + 1]` for `r = head * k_blocks + kb`: the query blocks whose
    /// rows hold key block `kb` (ascending) and the entry's mask id.
    pub block_ptr: Vec<u32>,
    pub block_qb: Vec<u32>,
    pub block_mask: Vec<u16>,
    /// `col_ptr[r]..col_ptr[r + 1]` for `r = head * nk + key`: the query blocks whose column
    /// lists hold `key` (ascending) and the entry's mask id.
    pub col_ptr: Vec<u32>,
    pub col_qb: Vec<u32>,
    pub col_mask: Vec<u16>,
}

impl SparseIndex {
    /// The key-major view of this index (see the module docs).
    pub fn key_major(&self) -> KeyMajor {
        let (q_blocks, k_blocks) = (self.q_blocks(), self.nk.div_ceil(self.block_n));
        let transpose = |slots: usize, entries: &dyn Fn(usize, usize) -> Vec<(usize, u16)>| {
            // Count per (head, slot), then fill in query-block order (rows are visited in
            // ascending order, so each list comes out ascending).
            let mut ptr = vec![0u32; self.heads * slots + 1];
            for h in 0..self.heads {
                for qb in 0..q_blocks {
                    for (s, _) in entries(h, qb) {
                        ptr[h * slots + s + 1] += 1;
                    }
                }
            }
            for i in 1..ptr.len() {
                ptr[i] += ptr[i - 1];
            }
            let total = ptr[ptr.len() - 1] as usize;
            let (mut qbs, mut masks) = (vec![0u32; total], vec![0u16; total]);
            let mut next: Vec<u32> = ptr[..ptr.len() - 1].to_vec();
            for h in 0..self.heads {
                for qb in 0..q_blocks {
                    for (s, m) in entries(h, qb) {
                        let at = &mut next[h * slots + s];
                        qbs[*at as usize] = qb as u32;
                        masks[*at as usize] = m;
                        *at += 1;
                    }
                }
            }
            (ptr, qbs, masks)
        };
        let (block_ptr, block_qb, block_mask) = transpose(k_blocks, &|h, qb| self.blocks(h, qb).collect());
        let (col_ptr, col_qb, col_mask) = transpose(self.nk, &|h, qb| self.columns(h, qb).collect());
        KeyMajor {
            heads: self.heads,
            q_blocks,
            k_blocks,
            nk: self.nk,
            block_ptr,
            block_qb,
            block_mask,
            col_ptr,
            col_qb,
            col_mask,
        }
    }
}

impl KeyMajor {
    /// `(query block, mask id)` entries of key block `kb` of head `h`.
    pub fn blocks(&self, h: usize, kb: usize) -> impl Iterator<Item = (usize, u16)> + '_ {
        let r = h * self.k_blocks + kb;
        let (a, b) = (self.block_ptr[r] as usize, self.block_ptr[r + 1] as usize);
        self.block_qb[a..b].iter().zip(&self.block_mask[a..b]).map(|(q, m)| (*q as usize, *m))
    }

    /// `(query block, mask id)` entries of gathered key column `key` of head `h`.
    pub fn columns(&self, h: usize, key: usize) -> impl Iterator<Item = (usize, u16)> + '_ {
        let r = h * self.nk + key;
        let (a, b) = (self.col_ptr[r] as usize, self.col_ptr[r + 1] as usize);
        self.col_qb[a..b].iter().zip(&self.col_mask[a..b]).map(|(q, m)| (*q as usize, *m))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use weft_dsl::builder::*;

    use crate::{build_index, IndexOptions, Tensor};

    #[test]
    fn the_key_major_view_holds_the_forward_entries_transposed() {
        let (q, k) = (Tensor::random(4, 333, 16, 1), Tensor::random(2, 300, 16, 2));
        let vv = vertical_vector().q_block(64).keep(top_k(20)).sink(4).local(16);
        let opts = IndexOptions { block_m: Some(64), block_n: Some(32), ..Default::default() };
        let patterns: [weft_dsl::PatternExpr; 3] = [
            causal() & (sink(8) | window(50)),
            causal() & weft_dsl::PatternExpr::from(vv),
            block().keep(top_k(3)).into(),
        ];
        for pattern in patterns {
            let ix = build_index(&pattern, &q, &k, &opts).unwrap();
            let km = ix.key_major();
            let (mut fwd_b, mut fwd_c, mut km_b, mut km_c) =
                (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
            for h in 0..ix.heads {
                for qb in 0..ix.q_blocks() {
                    fwd_b.extend(ix.blocks(h, qb).map(|(kb, m)| (h, qb, kb, m)));
                    fwd_c.extend(ix.columns(h, qb).map(|(c, m)| (h, qb, c, m)));
                }
                for kb in 0..km.k_blocks {
                    let qbs: Vec<usize> = km.blocks(h, kb).map(|(qb, _)| qb).collect();
                    assert!(qbs.windows(2).all(|w| w[0] < w[1]), "ascending query blocks");
                    km_b.extend(km.blocks(h, kb).map(|(qb, m)| (h, qb, kb, m)));
                }
                for c in 0..km.nk {
                    km_c.extend(km.columns(h, c).map(|(qb, m)| (h, qb, c, m)));
                }
            }
            assert_eq!(fwd_b, km_b, "{pattern}");
            assert_eq!(fwd_c, km_c, "{pattern}");
            assert_eq!(km.block_qb.len(), ix.block_idx.len());
            assert_eq!(km.col_qb.len(), ix.col_idx.len());
            // The vertical-vector pattern exercises the column lists.
            assert!(!format!("{pattern}").contains("vertical_vector") || !ix.col_idx.is_empty(), "{pattern}");
        }
    }
}
