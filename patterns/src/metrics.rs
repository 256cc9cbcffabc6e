//! Density (how much is computed) and recall (how much attention mass is kept).

use rayon::prelude::*;

use crate::index::SparseIndex;
use crate::reference::{check_index, kept_keys};
use crate::tensor::{check_qkv, dot, Tensor};
use crate::Error;

/// The pairs recall is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Universe {
    /// Every key: the full softmax of bidirectional attention.
    All,
    /// Keys `k <= q + nk - nq`: the full softmax of causal attention.
    Causal,
}

impl Universe {
    fn allows(self, q: usize, k: usize, nq: usize, nk: usize) -> bool {
        match self {
            Universe::All => true,
            Universe::Causal => k + nq <= q + nk,
        }
    }

    /// How many keys query row `q` sees: all `nk`, or the first `q + nk - nq + 1` (at most
    /// `nk`) under causality.
    pub fn keys(self, q: usize, nq: usize, nk: usize) -> usize {
        match self {
            Universe::All => nk,
            Universe::Causal => (q + nk + 1).saturating_sub(nq).min(nk),
        }
    }

    /// Pairs of one head: what density is a share of.
    pub fn pairs(self, nq: usize, nk: usize) -> u64 {
        match self {
            Universe::All => nq as u64 * nk as u64,
            Universe::Causal => (0..nq).map(|q| self.keys(q, nq, nk) as u64).sum(),
        }
    }
}

/// Recall of an index: the share of the universe's softmax mass on the kept pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct Recall {
    /// Mean over the measured rows of every head.
    pub mean: f64,
    /// Worst row.
    pub min: f64,
    /// Mean per head.
    pub per_head: Vec<f64>,
    /// Rows measured per head.
    pub rows: usize,
}

/// The rows measured: all of them, or `sample` evenly spaced rows ending with the last.
pub fn sample_rows(nq: usize, sample: Option<usize>) -> Vec<usize> {
    match sample {
        Some(m) if m > 0 && m < nq => (1..=m).map(|i| i * nq / m - 1).collect(),
        _ => (0..nq).collect(),
    }
}

/// Recall of `ix` on `q`, `k` (token coordinates), over all rows or a sample of them.
pub fn recall(
    ix: &SparseIndex,
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    universe: Universe,
    sample: Option<usize>,
) -> Result<Recall, Error> {
    let group = check_qkv(q, k, None)?;
    check_index(ix, q, k)?;
    let (nq, nk) = (q.tokens, k.tokens);
    let rows = sample_rows(nq, sample);
    let per_row: Vec<Vec<f64>> = (0..q.heads)
        .into_par_iter()
        .map(|h| {
            rows.iter()
                .filter_map(|&t| {
                    let logits: Vec<(usize, f64)> = (0..nk)
                        .filter(|&j| universe.allows(t, j, nq, nk))
                        .map(|j| (j, scale * dot(q.row(h, t), k.row(h / group, j))))
                        .collect();
                    let max = logits.iter().map(|x| x.1).reduce(f64::max)?;
                    let mut w = vec![0f64; nk];
                    let mut total = 0.0;
                    for (j, s) in logits {
                        w[j] = (s - max).exp();
                        total += w[j];
                    }
                    let kept: f64 = kept_keys(ix, h, t).into_iter().map(|j| w[j]).sum();
                    Some(kept / total)
                })
                .collect()
        })
        .collect();
    let all: Vec<f64> = per_row.iter().flatten().copied().collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let min = all.iter().copied().fold(f64::INFINITY, f64::min);
    let per_head = per_row.iter().map(|r| r.iter().sum::<f64>() / r.len().max(1) as f64).collect();
    Ok(Recall { mean, min: if all.is_empty() { 0.0 } else { min }, per_head, rows: rows.len() })
}
