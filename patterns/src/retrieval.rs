//! Retrieval operators for decode (Quest, RetroInfer, ParisKV): per query token, score the
//! KV units, keep a budget of them, always keep the sink and recent tokens.
//!
//! Definitions the GPU operators must match:
//! - a query row `q` sees keys `k <= q + nk - nq` (decode: the last query sees every key);
//! - units are fixed on the whole key axis: pages of `n` consecutive tokens, single tokens,
//!   or k-means clusters ([`clusters`]); a unit is a candidate for row `q` when it has a
//!   visible token outside the always-kept sink (`k < sink`) and recent (`k > last - recent`)
//!   tokens, and a kept unit contributes its visible tokens;
//! - scores: `min_max` is Quest's bound `sum_d max(q_d * min_d, q_d * max_d)` over the page's
//!   elementwise key minimum and maximum; `centroid` is `q . c`; `quantized(b)` is `q . k'`
//!   with `k'` the key quantized per token to `b` bits ([`quantize`]), a page scoring its best
//!   token;
//! - the budget ranks `scale * score` (ties: lower unit first) exactly as the other families;
//! - `per = kv_head`: the query heads of a KV head choose together, a unit ranking by the
//!   largest of their `scale * score` (the first head's, then `f64::max` with each next
//!   head's), and every one of them keeps what the group keeps.

use weft_dsl::{Budget, Per, Pred, Retrieval, Score, Unit};

use crate::select::select;
use crate::selection::ColSel;
use crate::tensor::{dot, Tensor};

/// Lloyd iterations of the deterministic k-means behind `cluster(n)` units.
pub const KMEANS_ITERS: usize = 8;

/// `b`-bit symmetric per-token quantization, dequantized: `round(x / s) * s` with
/// `s = max|x| / (2^(b-1) - 1)`, clamped to the code range; 1 bit keeps the sign at the mean
/// magnitude.
pub fn quantize(row: &[f32], bits: u32) -> Vec<f32> {
    if bits <= 1 {
        let mean = row.iter().map(|x| x.abs()).sum::<f32>() / row.len().max(1) as f32;
        return row.iter().map(|x| if *x >= 0.0 { mean } else { -mean }).collect();
    }
    let levels = ((1u32 << (bits - 1)) - 1) as f32;
    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        return vec![0.0; row.len()];
    }
    let s = max / levels;
    row.iter().map(|x| (x / s).round().clamp(-levels, levels) * s).collect()
}

/// Deterministic k-means over the keys of one head: `ceil(nk / size)` clusters started at
/// evenly spaced keys, [`KMEANS_ITERS`] Lloyd steps with squared L2 distance (ties: lower
/// cluster), empty clusters keep their centroid. Returns (assignment per key, centroids).
pub fn clusters(k: &Tensor, head: usize, size: usize) -> (Vec<usize>, Vec<Vec<f64>>) {
    let nk = k.tokens;
    if size <= 1 && nk > 0 {
        return singletons(k, head);
    }
    lloyd(k, head, size)
}

/// [`clusters`] by its definition.
fn lloyd(k: &Tensor, head: usize, size: usize) -> (Vec<usize>, Vec<Vec<f64>>) {
    let nk = k.tokens;
    let n = nk.div_ceil(size.max(1)).max(1);
    let mut cent: Vec<Vec<f64>> =
        (0..n).map(|c| k.row(head, c * nk / n).iter().map(|x| f64::from(*x)).collect()).collect();
    let mut assign = vec![0usize; nk];
    for _ in 0..KMEANS_ITERS {
        for (t, a) in assign.iter_mut().enumerate() {
            let row = k.row(head, t);
            let mut best = (f64::INFINITY, 0);
            for (c, ce) in cent.iter().enumerate() {
                let d: f64 = row.iter().zip(ce).map(|(x, y)| (f64::from(*x) - y).powi(2)).sum();
                if d < best.0 {
                    best = (d, c);
                }
            }
            *a = best.1;
        }
        let mut sum = vec![vec![0f64; k.dim]; n];
        let mut count = vec![0usize; n];
        for (t, &a) in assign.iter().enumerate() {
            count[a] += 1;
            for (s, x) in sum[a].iter_mut().zip(k.row(head, t)) {
                *s += f64::from(*x);
            }
        }
        for c in 0..n {
            if count[c] > 0 {
                cent[c] = sum[c].iter().map(|s| s / count[c] as f64).collect();
            }
        }
    }
    (assign, cent)
}

/// [`clusters`] of size 1 without its quadratic steps, with the same result: every key starts
/// as its own centroid, so each key is nearest (distance 0) to the first key equal to it, and
/// those centroids never move.
fn singletons(k: &Tensor, head: usize) -> (Vec<usize>, Vec<Vec<f64>>) {
    let nk = k.tokens;
    let mut first: std::collections::HashMap<Vec<u32>, usize> = std::collections::HashMap::new();
    // Equal values, equal bits: -0.0 is counted as 0.0 (adding 0.0 turns it into 0.0).
    let assign = (0..nk)
        .map(|t| *first.entry(k.row(head, t).iter().map(|x| (x + 0.0).to_bits()).collect()).or_insert(t))
        .collect();
    let cent = (0..nk).map(|t| k.row(head, t).iter().map(|x| f64::from(*x)).collect()).collect();
    (assign, cent)
}

/// The units of a key axis: the tokens of each unit, sorted.
pub fn units(r: &Retrieval, k: &Tensor, head: usize) -> (Vec<Vec<usize>>, Vec<Vec<f64>>) {
    let nk = k.tokens;
    match r.unit {
        Unit::Token => ((0..nk).map(|t| vec![t]).collect(), Vec::new()),
        Unit::Page(n) => {
            let n = n as usize;
            ((0..nk.div_ceil(n)).map(|p| (p * n..((p + 1) * n).min(nk)).collect()).collect(), Vec::new())
        }
        Unit::Cluster(size) => {
            let (assign, cent) = clusters(k, head, size as usize);
            let mut members = vec![Vec::new(); cent.len()];
            for (t, a) in assign.into_iter().enumerate() {
                members[a].push(t);
            }
            (members, cent)
        }
    }
}

/// The score of one unit for query row `qrow` (before `scale`). A zero score is +0.0: the
/// ranking (`total_cmp`) would put -0.0 below it, and which sign a sum of zeros takes depends
/// on the order of its terms (the GPU's paged retrieval agrees only up to that).
pub fn unit_score(
    score: Score,
    qrow: &[f32],
    k: &Tensor,
    head: usize,
    tokens: &[usize],
    centroid: Option<&[f64]>,
) -> f64 {
    let s = match score {
        Score::MinMax => (0..k.dim)
            .map(|d| {
                let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                for &t in tokens {
                    let x = f64::from(k.row(head, t)[d]);
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                let qd = f64::from(qrow[d]);
                (qd * lo).max(qd * hi)
            })
            .sum(),
        Score::Centroid => {
            centroid.map_or(f64::NEG_INFINITY, |c| qrow.iter().zip(c).map(|(a, b)| f64::from(*a) * b).sum())
        }
        Score::Quantized(bits) => {
            tokens.iter().map(|&t| dot(qrow, &quantize(k.row(head, t), bits))).fold(f64::NEG_INFINITY, f64::max)
        }
    };
    s + 0.0
}

/// Kept keys of one query row, sorted.
#[allow(clippy::too_many_arguments)]
pub fn kept_for_row(
    r: &Retrieval,
    qrow: &[f32],
    k: &Tensor,
    head: usize,
    units: &[Vec<usize>],
    centroids: &[Vec<f64>],
    visible: usize,
    scale: f64,
) -> Vec<u32> {
    kept_for_rows(r, &[qrow], k, head, units, centroids, visible, scale)
}

/// Kept keys of query rows that choose together (the query heads of KV head `head` at one
/// position, `per = kv_head`; a single row otherwise), sorted: a unit ranks by the largest of
/// the rows' `scale * score`, the first row's then `f64::max` with each next one's.
#[allow(clippy::too_many_arguments)]
pub fn kept_for_rows(
    r: &Retrieval,
    qrows: &[&[f32]],
    k: &Tensor,
    head: usize,
    units: &[Vec<usize>],
    centroids: &[Vec<f64>],
    visible: usize,
    scale: f64,
) -> Vec<u32> {
    if visible == 0 || qrows.is_empty() {
        return Vec::new();
    }
    let sink = (r.sink as usize).min(visible);
    let recent_from = visible.saturating_sub(r.recent as usize).max(sink);
    let forced = |t: usize| t < sink || t >= recent_from;
    let cands: Vec<(u32, f64)> = units
        .iter()
        .enumerate()
        .filter(|(_, toks)| toks.iter().any(|&t| t < visible && !forced(t)))
        .map(|(u, toks)| {
            let c = centroids.get(u).map(Vec::as_slice);
            let of = |q: &[f32]| scale * unit_score(r.score, q, k, head, toks, c);
            (u as u32, qrows[1..].iter().fold(of(qrows[0]), |best, q| best.max(of(q))))
        })
        .collect();
    let budget: Budget = r.budget;
    let mut keep = vec![false; visible];
    for t in (0..sink).chain(recent_from..visible) {
        keep[t] = true;
    }
    for u in select(&cands, budget) {
        for &t in &units[u as usize] {
            if t < visible {
                keep[t] = true;
            }
        }
    }
    keep.iter().enumerate().filter(|(_, k)| **k).map(|(t, _)| t as u32).collect()
}

/// The retrieval selection of one head: one column list per query row. Units are chosen over
/// the causally visible keys whatever the intersection context `_ctx` (the documented exception
/// to the rule in the crate doc: units are scored whole, as a cache keeps them); the context's
/// predicates mask the kept keys afterwards.
pub(crate) fn select_head(
    r: &Retrieval,
    (q, k): (&Tensor, &Tensor),
    (h, kv): (usize, usize),
    scale: f64,
    wanted: Option<&[bool]>,
    _ctx: &Pred,
) -> ColSel {
    let (nq, nk) = (q.tokens, k.tokens);
    let (units, cents) = units(r, k, kv);
    // The heads whose rows choose together: this one, or its KV head's.
    let heads = match r.per {
        Per::QueryHead => h..h + 1,
        Per::KvHead => {
            let group = (q.heads / k.heads.max(1)).max(1);
            kv * group..(kv + 1) * group
        }
    };
    let cols = (0..nq)
        .map(|row| {
            if !wanted.is_none_or(|w| w[row]) {
                return Vec::new();
            }
            let visible = crate::metrics::Universe::Causal.keys(row, nq, nk);
            let rows: Vec<&[f32]> = heads.clone().map(|g| q.row(g, row)).collect();
            kept_for_rows(r, &rows, k, kv, &units, &cents, visible, scale)
        })
        .collect();
    ColSel { bq: 1, cols }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singleton_clusters_equal_their_definition() {
        let mut k = Tensor::random(2, 300, 8, 3);
        // Duplicate keys (the later ones join the first) and a negative zero.
        for t in [40usize, 41, 299] {
            let row: Vec<f32> = k.row(1, 7).to_vec();
            k.data[(300 + t) * 8..(300 + t + 1) * 8].copy_from_slice(&row);
        }
        k.data[(300 + 50) * 8..(300 + 51) * 8].copy_from_slice(&[0.0; 8]);
        k.data[(300 + 60) * 8..(300 + 61) * 8].copy_from_slice(&[-0.0; 8]);
        for head in 0..2 {
            assert_eq!(singletons(&k, head), lloyd(&k, head, 1), "head {head}");
        }
    }

    /// `per = kv_head`: the heads of a group keep one set, the top units by the largest of
    /// their scaled scores (checked by sorting), and with one query head per KV head the
    /// choice is each head's own.
    #[test]
    fn heads_that_share_a_kv_head_choose_together_by_their_best_score() {
        let (d, nk) = (16usize, 500usize);
        let k = Tensor::random(2, nk, d, 7);
        let q = Tensor::random(8, 1, d, 8);
        let scale = 0.25;
        for (score, unit) in [(Score::MinMax, Unit::Page(16)), (Score::Quantized(4), Unit::Page(16))] {
            let r = Retrieval { unit, score, budget: Budget::TopK(5), sink: 4, recent: 20, per: Per::KvHead };
            let ix =
                crate::build_index(&weft_dsl::PatternExpr::Retrieval(r.clone()), &q, &k, &Default::default()).unwrap();
            for kv in 0..2 {
                let (u, c) = units(&r, &k, kv);
                let rows: Vec<&[f32]> = (4 * kv..4 * kv + 4).map(|h| q.row(h, 0)).collect();
                let group = kept_for_rows(&r, &rows, &k, kv, &u, &c, nk, scale);
                // By sorting: candidates (not only sink or recent), best first, lower unit on ties.
                let mut ranked: Vec<(usize, f64)> = (0..u.len())
                    .filter(|&i| u[i].iter().any(|&t| t >= 4 && t < nk - 20))
                    .map(|i| {
                        let best = rows
                            .iter()
                            .map(|q| scale * unit_score(score, q, &k, kv, &u[i], None))
                            .fold(f64::NEG_INFINITY, f64::max);
                        (i, best)
                    })
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut want: Vec<u32> = (0..4).chain(nk - 20..nk).map(|t| t as u32).collect();
                for (i, _) in &ranked[..5] {
                    want.extend(u[*i].iter().map(|&t| t as u32));
                }
                want.sort_unstable();
                want.dedup();
                assert_eq!(group, want, "{score:?} kv head {kv}");
                // Every head of the group keeps it in the index (one query row, nk keys).
                for h in 4 * kv..4 * kv + 4 {
                    let kept: Vec<u32> = (0..nk as u32).filter(|&t| ix.contains_token(h, 0, t as usize)).collect();
                    assert_eq!(kept, group, "{score:?} head {h}");
                }
            }
            // One query head per KV head: each head's own choice.
            let q2 = Tensor::random(2, 1, d, 9);
            for h in 0..2 {
                let (u, c) = units(&r, &k, h);
                let own = Retrieval { per: Per::QueryHead, ..r.clone() };
                assert_eq!(
                    kept_for_rows(&r, &[q2.row(h, 0)], &k, h, &u, &c, nk, scale),
                    kept_for_row(&own, q2.row(h, 0), &k, h, &u, &c, nk, scale)
                );
            }
        }
    }
}
