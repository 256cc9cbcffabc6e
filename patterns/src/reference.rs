//! Reference attention: exact `softmax(Q K^T * scale) V` over the pairs an index (or a mask)
//! keeps, accumulated in f64. Kernels are checked against this.
//!
//! A row that keeps no key has output 0 and log-sum-exp `-inf`; kernels must do the same.

use rayon::prelude::*;

use crate::index::SparseIndex;
use crate::tensor::{check_qkv, dot, Tensor};
use crate::Error;

/// Output `[hq, nq, dv]` and natural-log log-sum-exp of the scaled scores per row (`[hq * nq]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub out: Tensor,
    pub lse: Vec<f64>,
}

/// One row's result over some key set: the normalized output and its log-sum-exp.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    pub out: Vec<f64>,
    pub lse: f64,
}

/// Attention of one query row over `keys` (token indices into `k`/`v` head `kv`).
pub fn attend_row(qrow: &[f32], keys: &[usize], k: &Tensor, v: &Tensor, kv: usize, scale: f64) -> Partial {
    let mut out = vec![0f64; v.dim];
    if keys.is_empty() {
        return Partial { out, lse: f64::NEG_INFINITY };
    }
    let s: Vec<f64> = keys.iter().map(|&t| scale * dot(qrow, k.row(kv, t))).collect();
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for (&t, si) in keys.iter().zip(&s) {
        let p = (si - max).exp();
        sum += p;
        for (o, x) in out.iter_mut().zip(v.row(kv, t)) {
            *o += p * f64::from(*x);
        }
    }
    out.iter_mut().for_each(|o| *o /= sum);
    Partial { out, lse: max + sum.ln() }
}

/// Exact merge of partial results over disjoint key sets (the ring merge).
pub fn merge(parts: &[Partial], dv: usize) -> Partial {
    let lse_max = parts.iter().map(|p| p.lse).fold(f64::NEG_INFINITY, f64::max);
    if lse_max == f64::NEG_INFINITY {
        return Partial { out: vec![0.0; dv], lse: f64::NEG_INFINITY };
    }
    let weights: Vec<f64> = parts.iter().map(|p| (p.lse - lse_max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0f64; dv];
    for (p, w) in parts.iter().zip(&weights) {
        if *w > 0.0 {
            for (o, x) in out.iter_mut().zip(&p.out) {
                *o += w / total * x;
            }
        }
    }
    Partial { out, lse: lse_max + total.ln() }
}

pub(crate) fn check_index(ix: &SparseIndex, q: &Tensor, k: &Tensor) -> Result<(), Error> {
    if ix.heads != q.heads || ix.nq != q.tokens || ix.nk != k.tokens {
        return Err(Error::Shape(format!(
            "the index was built for {} heads x {} queries x {} keys, but q is [{}, {}, _] and k has {} tokens",
            ix.heads, ix.nq, ix.nk, q.heads, q.tokens, k.tokens
        )));
    }
    Ok(())
}

/// Collects per-row partials of every head into an [`Attention`].
pub(crate) fn assemble(heads: usize, nq: usize, dv: usize, row: impl Fn(usize, usize) -> Partial + Sync) -> Attention {
    let rows: Vec<Vec<Partial>> = (0..heads).into_par_iter().map(|h| (0..nq).map(|t| row(h, t)).collect()).collect();
    let mut out = Tensor::zeros(heads, nq, dv);
    let mut lse = vec![0f64; heads * nq];
    for (h, rs) in rows.into_iter().enumerate() {
        for (t, p) in rs.into_iter().enumerate() {
            for (o, x) in out.row_mut(h, t).iter_mut().zip(&p.out) {
                *o = *x as f32;
            }
            lse[h * nq + t] = p.lse;
        }
    }
    Attention { out, lse }
}

/// Token indices of the keys the index keeps for query token `t` of head `h`.
pub fn kept_keys(ix: &SparseIndex, h: usize, t: usize) -> Vec<usize> {
    let mut keys = Vec::new();
    ix.for_each_key(h, ix.q_pos(t), |kpos| keys.push(ix.k_token(kpos)));
    keys
}

/// Attention over the pairs of `ix`; rows are tokens in their original order.
pub fn attention(ix: &SparseIndex, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Attention, Error> {
    let group = check_qkv(q, k, Some(v))?;
    check_index(ix, q, k)?;
    Ok(assemble(q.heads, q.tokens, v.dim, |h, t| attend_row(q.row(h, t), &kept_keys(ix, h, t), k, v, h / group, scale)))
}

/// Naive attention over every pair for which `mask(head, q, k)` holds (token coordinates).
pub fn dense_attention(
    mask: impl Fn(usize, usize, usize) -> bool + Sync,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Attention, Error> {
    let group = check_qkv(q, k, Some(v))?;
    Ok(assemble(q.heads, q.tokens, v.dim, |h, t| {
        let keys: Vec<usize> = (0..k.tokens).filter(|&j| mask(h, t, j)).collect();
        attend_row(q.row(h, t), &keys, k, v, h / group, scale)
    }))
}
