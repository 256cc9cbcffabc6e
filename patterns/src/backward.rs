//! Reference gradients of attention over the pairs an index (or a mask) keeps: dQ, dK and dV
//! of `L = sum(dO * O)` for a given dO, in f64 — the oracle of backward kernels.
//!
//! Per query row with kept keys `j`: `P_j = exp(scale * q . k_j - lse)`, `O = sum_j P_j v_j`,
//! `D = dO . O`, `dS_j = P_j (dO . v_j - D)`; then `dQ = scale * sum_j dS_j k_j`,
//! `dK_j += scale * dS_j q` and `dV_j += P_j dO`. Under GQA a key/value head's gradients sum
//! over the query heads that share it. A row that keeps no key contributes nothing.
//!
//! [`ring_attention_backward`] computes the same as a ring of workers would: each query's
//! worker recomputes `P_j = exp(scale * q . k_j - lse)` from the forward's log-sum-exp for the
//! keys of the shard visiting at each step, adds to its dQ, and adds to the dK and dV that
//! travel with the shard back to its owner.

use rayon::prelude::*;

use weft_dsl::RingLayout;

use crate::index::SparseIndex;
use crate::reference::{check_index, kept_keys};
use crate::ring::{shard_at_step, worker_of};
use crate::tensor::{check_qkv, dot, Tensor};
use crate::Error;

/// Gradients in f64, each in its input's layout: `dq` `[hq, nq, d]`, `dk` `[hkv, nk, d]`,
/// `dv` `[hkv, nk, dv]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// The gradients of attention over the pairs of `ix` (rows are tokens in their original
/// order), for output gradient `dout` `[hq, nq, dv]`.
pub fn attention_backward(
    ix: &SparseIndex,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<Gradients, Error> {
    check_index(ix, q, k)?;
    backward(|h, t| kept_keys(ix, h, t), |_, _, keys| vec![keys.to_vec()], q, k, v, dout, scale)
}

/// [`attention_backward`] as a ring of `workers` computes it (`layout` assigns tokens to
/// workers): per query, one pass per ring step over the keys of the shard visiting its worker,
/// with `P` recomputed from the whole row's log-sum-exp. Equal to [`attention_backward`] up to
/// rounding (the sums run step by step).
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_backward(
    ix: &SparseIndex,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    scale: f64,
    workers: usize,
    layout: RingLayout,
) -> Result<Gradients, Error> {
    check_index(ix, q, k)?;
    if workers == 0 {
        return Err(Error::Shape("a ring needs at least one worker".into()));
    }
    let (nq, nk) = (q.tokens, k.tokens);
    let steps = |_h: usize, t: usize, keys: &[usize]| -> Vec<Vec<usize>> {
        let w = worker_of(layout, t, nq, workers);
        (0..workers)
            .map(|s| {
                let shard = shard_at_step(w, s, workers);
                keys.iter().copied().filter(|&j| worker_of(layout, j, nk, workers) == shard).collect()
            })
            .collect()
    };
    backward(|h, t| kept_keys(ix, h, t), steps, q, k, v, dout, scale)
}

/// The gradients of attention over every pair for which `mask(head, q, k)` holds.
pub fn dense_attention_backward(
    mask: impl Fn(usize, usize, usize) -> bool + Sync,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<Gradients, Error> {
    let keys_of = |h, t| (0..k.tokens).filter(|&j| mask(h, t, j)).collect();
    backward(keys_of, |_, _, keys| vec![keys.to_vec()], q, k, v, dout, scale)
}

/// The gradients over the keys `keys_of(head, query)` keeps, each row's keys taken in the
/// groups `steps_of(head, query, keys)` gives (one group, or a ring's steps), `P` from the row's
/// log-sum-exp over all of them.
fn backward(
    keys_of: impl Fn(usize, usize) -> Vec<usize> + Sync,
    steps_of: impl Fn(usize, usize, &[usize]) -> Vec<Vec<usize>> + Sync,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<Gradients, Error> {
    let group = check_qkv(q, k, Some(v))?;
    if (dout.heads, dout.tokens, dout.dim) != (q.heads, q.tokens, v.dim) {
        return Err(Error::Shape(format!(
            "dO must be [{}, {}, {}] like the output, got [{}, {}, {}]",
            q.heads, q.tokens, v.dim, dout.heads, dout.tokens, dout.dim
        )));
    }
    let (d, dvd, nq, nk) = (q.dim, v.dim, q.tokens, k.tokens);
    // One key/value head at a time (its query heads in order), so that its dK and dV sum
    // without sharing: (dQ rows of its query heads, dK, dV).
    type Part = (Vec<f64>, Vec<f64>, Vec<f64>);
    let parts: Vec<Part> = (0..k.heads)
        .into_par_iter()
        .map(|kv| {
            let mut dq = vec![0f64; group * nq * d];
            let mut dk = vec![0f64; nk * d];
            let mut dv = vec![0f64; nk * dvd];
            for g in 0..group {
                let h = kv * group + g;
                for t in 0..nq {
                    let keys = keys_of(h, t);
                    if keys.is_empty() {
                        continue;
                    }
                    let qrow = q.row(h, t);
                    let score = |j: usize| scale * dot(qrow, k.row(kv, j));
                    // The forward's row: its log-sum-exp and output, then D = dO . O.
                    let s: Vec<f64> = keys.iter().map(|&j| score(j)).collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    let go: Vec<f64> = dout.row(h, t).iter().map(|x| f64::from(*x)).collect();
                    let mut o = vec![0f64; dvd];
                    for (&j, sj) in keys.iter().zip(&s) {
                        let pj = (sj - lse).exp();
                        for (oi, x) in o.iter_mut().zip(v.row(kv, j)) {
                            *oi += pj * f64::from(*x);
                        }
                    }
                    let big_d: f64 = go.iter().zip(&o).map(|(a, b)| a * b).sum();
                    let dq_row = &mut dq[(g * nq + t) * d..(g * nq + t + 1) * d];
                    for step in steps_of(h, t, &keys) {
                        for j in step {
                            let pj = (score(j) - lse).exp();
                            let dp: f64 = go.iter().zip(v.row(kv, j)).map(|(a, b)| a * f64::from(*b)).sum();
                            let ds = pj * (dp - big_d);
                            for (x, kx) in dq_row.iter_mut().zip(k.row(kv, j)) {
                                *x += scale * ds * f64::from(*kx);
                            }
                            for (x, qx) in dk[j * d..(j + 1) * d].iter_mut().zip(qrow) {
                                *x += scale * ds * f64::from(*qx);
                            }
                            for (x, gx) in dv[j * dvd..(j + 1) * dvd].iter_mut().zip(&go) {
                                *x += pj * gx;
                            }
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut grads = Gradients { dq: Vec::with_capacity(q.data.len()), dk: Vec::new(), dv: Vec::new() };
    for (dq, dk, dv) in parts {
        grads.dq.extend(dq);
        grads.dk.extend(dk);
        grads.dv.extend(dv);
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attend_row;

    /// `sum(dO * O)` in f64 over `mask`.
    fn loss(mask: &dyn Fn(usize, usize, usize) -> bool, q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor) -> f64 {
        let group = q.heads / k.heads;
        let mut l = 0.0;
        for h in 0..q.heads {
            for t in 0..q.tokens {
                let keys: Vec<usize> = (0..k.tokens).filter(|&j| mask(h, t, j)).collect();
                let o = attend_row(q.row(h, t), &keys, k, v, h / group, 0.7).out;
                l += o.iter().zip(dout.row(h, t)).map(|(a, b)| a * f64::from(*b)).sum::<f64>();
            }
        }
        l
    }

    #[test]
    fn gradients_match_central_differences_with_gqa_and_an_empty_row() {
        let (q, k, v) = (Tensor::random(4, 5, 3, 1), Tensor::random(2, 7, 3, 2), Tensor::random(2, 7, 2, 3));
        let dout = Tensor::random(4, 5, 2, 4);
        // Causal with a shifted diagonal, a head-dependent hole, and row 0 of head 3 empty.
        let mask = |h: usize, t: usize, j: usize| j <= t + 2 && (h + j) % 3 != 0 && !(h == 3 && t == 0);
        let g = dense_attention_backward(mask, &q, &k, &v, &dout, 0.7).unwrap();
        // Steps exact in f32 for inputs of magnitude below 4.
        let step = 1.0 / 1024.0;
        let check = |which: &str, data: &[f32], grad: &[f64], set: &dyn Fn(usize, f32) -> (Tensor, Tensor, Tensor)| {
            for i in 0..data.len() {
                let (qp, kp, vp) = set(i, data[i] + step);
                let (qm, km, vm) = set(i, data[i] - step);
                let fd =
                    (loss(&mask, &qp, &kp, &vp, &dout) - loss(&mask, &qm, &km, &vm, &dout)) / (2.0 * f64::from(step));
                assert!((fd - grad[i]).abs() < 1e-5 * (1.0 + fd.abs()), "d{which}[{i}]: {} vs {fd}", grad[i]);
            }
        };
        let with = |t: &Tensor, i: usize, x: f32| {
            let mut t = t.clone();
            t.data[i] = x;
            t
        };
        check("q", &q.data, &g.dq, &|i, x| (with(&q, i, x), k.clone(), v.clone()));
        check("k", &k.data, &g.dk, &|i, x| (q.clone(), with(&k, i, x), v.clone()));
        check("v", &v.data, &g.dv, &|i, x| (q.clone(), k.clone(), with(&v, i, x)));
        // The empty row has no gradient.
        assert!(g.dq[(3 * 5) * 3..(3 * 5 + 1) * 3].iter().all(|x| *x == 0.0));
    }

    #[test]
    fn gqa_gradients_are_the_sums_over_each_group_of_expanded_heads() {
        let (q, k, v) = (Tensor::random(4, 9, 8, 5), Tensor::random(2, 11, 8, 6), Tensor::random(2, 11, 8, 7));
        let dout = Tensor::random(4, 9, 8, 8);
        let mask = |h: usize, t: usize, j: usize| j <= t + 2 + h;
        let g = dense_attention_backward(mask, &q, &k, &v, &dout, 0.3).unwrap();
        let expand = |x: &Tensor| {
            let mut e = Tensor::zeros(4, x.tokens, x.dim);
            for h in 0..4 {
                for t in 0..x.tokens {
                    e.row_mut(h, t).copy_from_slice(x.row(h / 2, t));
                }
            }
            e
        };
        let m = dense_attention_backward(mask, &q, &expand(&k), &expand(&v), &dout, 0.3).unwrap();
        assert_eq!(g.dq, m.dq);
        let per_head = 11 * 8;
        for kv in 0..2 {
            for i in 0..per_head {
                let sum = m.dk[2 * kv * per_head + i] + m.dk[(2 * kv + 1) * per_head + i];
                assert!((g.dk[kv * per_head + i] - sum).abs() < 1e-12, "dk");
                let sum = m.dv[2 * kv * per_head + i] + m.dv[(2 * kv + 1) * per_head + i];
                assert!((g.dv[kv * per_head + i] - sum).abs() < 1e-12, "dv");
            }
        }
    }

    #[test]
    fn ring_backward_steps_sum_to_one_workers_gradients() {
        use weft_dsl::builder::*;
        let (q, k, v) =
            (Tensor::random(4, 200, 16, 21), Tensor::random(2, 200, 16, 22), Tensor::random(2, 200, 16, 23));
        let dout = Tensor::random(4, 200, 16, 24);
        let opts = crate::IndexOptions { block_m: Some(32), block_n: Some(32), ..Default::default() };
        let ix = crate::build_index(&(causal() & (sink(8) | window(50))), &q, &k, &opts).unwrap();
        let one = attention_backward(&ix, &q, &k, &v, &dout, 0.25).unwrap();
        for (workers, layout) in [(1, RingLayout::Contiguous), (2, RingLayout::ZigZag), (4, RingLayout::Striped(16))] {
            let ring = ring_attention_backward(&ix, &q, &k, &v, &dout, 0.25, workers, layout).unwrap();
            for (name, a, b) in [("dq", &ring.dq, &one.dq), ("dk", &ring.dk, &one.dk), ("dv", &ring.dv, &one.dv)] {
                let worst = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f64, f64::max);
                assert!(worst < 1e-12, "{workers} workers {layout:?}: {name} off by {worst:e}");
            }
            if workers == 1 {
                assert_eq!(ring, one, "one worker is the plain backward");
            }
        }
        assert!(ring_attention_backward(&ix, &q, &k, &v, &dout, 0.25, 0, RingLayout::Contiguous).is_err());
    }

    #[test]
    fn an_index_and_its_dense_mask_give_the_same_gradients() {
        use weft_dsl::builder::*;
        let (q, k, v) = (Tensor::random(4, 130, 16, 9), Tensor::random(2, 150, 16, 10), Tensor::random(2, 150, 16, 11));
        let dout = Tensor::random(4, 130, 16, 12);
        let pattern = causal() & (sink(4) | window(40));
        let opts = crate::IndexOptions { block_m: Some(32), block_n: Some(32), ..Default::default() };
        let ix = crate::build_index(&pattern, &q, &k, &opts).unwrap();
        let g = attention_backward(&ix, &q, &k, &v, &dout, 0.25).unwrap();
        let keys: Vec<Vec<Vec<usize>>> = (0..4).map(|h| (0..130).map(|t| kept_keys(&ix, h, t)).collect()).collect();
        let m = dense_attention_backward(|h, t, j| keys[h][t].contains(&j), &q, &k, &v, &dout, 0.25).unwrap();
        assert_eq!(g, m);
        let bad = Tensor::random(4, 130, 8, 1);
        assert!(attention_backward(&ix, &q, &k, &v, &bad, 0.25).unwrap_err().to_string().contains("dO must be"));
    }
}
