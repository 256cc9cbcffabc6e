//! Ring partitioning (MTraining): the sequence split over `W` workers; at step `s` worker `w`
//! holds the K/V shard of worker `(w - s) mod W`, computes partial attention of its queries
//! against it with log-sum-exp, and the `W` partials merge exactly.

use weft_dsl::builder::lit;
use weft_dsl::{IntExpr, Pred, RingLayout};

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

/// [`worker_of`] as an integer expression of a position, for a sequence of `n` tokens.
pub fn worker_expr(layout: RingLayout, pos: IntExpr, n: usize, workers: usize) -> IntExpr {
    let (w, n) = (workers.max(1) as i64, n.max(1) as i64);
    match layout {
        RingLayout::Contiguous => (pos * lit(w)) / n,
        RingLayout::ZigZag => {
            let chunk = (pos * lit(2 * w)) / n;
            chunk.clone().min(lit(2 * w - 1) - chunk)
        }
        RingLayout::Striped(s) => (pos / i64::from(s.max(1))) % w,
    }
}

/// The pairs computed at ring step `step`: the key's worker holds the shard the query's worker
/// sees then, `(worker(k) + step) % W == worker(q)`.
pub fn step_predicate(layout: RingLayout, workers: usize, step: usize, nq: usize, nk: usize) -> Pred {
    let wq = worker_expr(layout, weft_dsl::builder::q(), nq, workers);
    let wk = worker_expr(layout, weft_dsl::builder::k(), nk, workers);
    ((wk + lit(step as i64)) % workers.max(1) as i64).eq(wq)
}

/// The index of ring step `step`: the pairs of `ix` whose key lies in that step's shard. The
/// steps partition `ix`; each runs as an ordinary attention launch giving a partial output
/// and log-sum-exp, and [`crate::reference::merge`] (or the GPU merge kernel) combines them.
pub fn step_index(ix: &SparseIndex, layout: RingLayout, workers: usize, step: usize) -> Result<SparseIndex, Error> {
    if ix.permutation.is_some() {
        return Err(Error::Layout("ring steps of a permuted index are not supported yet".into()));
    }
    if workers == 0 {
        return Err(Error::Shape("a ring needs at least one worker".into()));
    }
    ix.restrict(&step_predicate(layout, workers, step, ix.nq, ix.nk))
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
