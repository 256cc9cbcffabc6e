//! Ring partitioning (MTraining): the sequence split over `W` workers; at step `s` worker `w`
//! holds the K/V shard of worker `(w - s) mod W`, computes partial attention of its queries
//! against it with log-sum-exp, and the `W` partials merge exactly.

use weft_dsl::RingLayout;

use crate::index::SparseIndex;
use crate::reference::{assemble, attend_row, check_index, kept_keys, merge, Attention};
use crate::tensor::{check_qkv, Tensor};
use crate::Error;

/// The worker of token `t` of an `n`-token sequence.
pub fn worker_of(layout: RingLayout, t: usize, n: usize, workers: usize) -> usize {
    let w = workers.max(1);
    let n = n.max(1);
    match layout {
        RingLayout::Contiguous => t * w / n,
        RingLayout::ZigZag => {
            let chunk = t * 2 * w / n;
            if chunk < w {
                chunk
            } else {
                2 * w - 1 - chunk
            }
        }
        RingLayout::Striped(s) => (t / (s as usize).max(1)) % w,
    }
}

/// The tokens of every worker, ascending.
pub fn worker_tokens(layout: RingLayout, n: usize, workers: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); workers.max(1)];
    for t in 0..n {
        out[worker_of(layout, t, n, workers)].push(t);
    }
    out
}

/// The key shard worker `w` holds at ring step `s`.
pub fn shard_at_step(w: usize, s: usize, workers: usize) -> usize {
    (w + workers - s % workers) % workers
}

/// Attention over `ix` computed as a ring of `workers`: per query, one partial per step over
/// that step's shard, merged by log-sum-exp. Equal to [`crate::reference::attention`] up to
/// rounding.
pub fn ring_attention(
    ix: &SparseIndex,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    workers: usize,
    layout: RingLayout,
) -> Result<Attention, Error> {
    let group = check_qkv(q, k, Some(v))?;
    check_index(ix, q, k)?;
    if workers == 0 {
        return Err(Error::Shape("a ring needs at least one worker".into()));
    }
    let (nq, nk) = (q.tokens, k.tokens);
    Ok(assemble(q.heads, nq, v.dim, |h, t| {
        let w = worker_of(layout, t, nq, workers);
        let keys = kept_keys(ix, h, t);
        let parts: Vec<_> = (0..workers)
            .map(|s| {
                let shard = shard_at_step(w, s, workers);
                let mine: Vec<usize> =
                    keys.iter().copied().filter(|&j| worker_of(layout, j, nk, workers) == shard).collect();
                attend_row(q.row(h, t), &mine, k, v, h / group, scale)
            })
            .collect();
        merge(&parts, v.dim)
    }))
}
