//! Split-KV tuning of decode steps over a paged KV cache ([`weft_runtime::PagedKvCache`]).
//!
//! A step's tunable is how many CTAs split each (sequence, query head)'s kept tokens: the
//! right count depends on the batch (few sequences need many splits to fill the GPU) and the
//! context. Every count of [`crate::decode::SPLITS`] and the automatic choice are timed on a cache of the
//! bucket's shape (every sequence holding the same random tokens); the fastest whose output
//! for the first sequence matches the CPU reference (Quest's pages chosen by
//! `weft_patterns::retrieval`, attention over them) is stored under
//! [`weft_runtime::paged_tune_key`], where [`weft_runtime::Runtime::paged_splits`] finds it.
//! The page size is not tuned: a retrieval pattern's unit fixes it (`unit = page(n)`), and a
//! serving engine fixes it for dense steps.

use std::time::Instant;

use weft_cache::Db;
use weft_codegen::DType;
use weft_dsl::{builder::full, Pattern, PatternExpr, Retrieval, Unit};
use weft_patterns::retrieval::{kept_for_row, units};
use weft_patterns::{dense_attention, Tensor};
use weft_runtime::{Gpu, PagedShape};

use crate::decode::{split_record, time_splits, verified_winner, DecodeTuneResult};
use crate::tune::{relative_error, rounded};
use crate::Error;

/// One (pattern, shape bucket) of paged decode to tune.
#[derive(Clone, Copy, Debug)]
pub struct PagedTuneRequest<'a> {
    /// A Quest retrieval pattern (`retrieval(unit = page(n), score = min_max, ...)`), or
    /// `full()` for dense steps.
    pub pattern: &'a Pattern,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Tokens per sequence.
    pub keys: usize,
    pub head_dim: u32,
    pub dtype: DType,
    /// Tokens per page of a dense step's cache (a retrieval pattern's unit gives its own).
    pub page_size: usize,
}

/// The retrieval of a paged step (`None`: dense) and its page size, or why `pattern` is not
/// one the paged decode runs.
pub fn paged_step_of(pattern: &Pattern, dense_page_size: usize) -> Result<(Option<Retrieval>, usize), Error> {
    match &pattern.expr {
        PatternExpr::Retrieval(r) => match r.unit {
            Unit::Page(n) => Ok((Some(r.clone()), n as usize)),
            _ => Err(Error::Search(format!(
                "`{}`: the paged decode retrieves pages (unit = page(n)), not {:?}",
                pattern.name, r.unit
            ))),
        },
        _ if pattern.canonical().expr == full() => Ok((None, dense_page_size)),
        _ => Err(Error::Search(format!(
            "`{}`: a paged decode step is a retrieval pattern or full(), not `{}`",
            pattern.name, pattern.expr
        ))),
    }
}

/// Tunes the split count of `req` on `gpu`; stores the winner in `db` when given.
pub fn tune_paged(
    gpu: &Gpu,
    db: Option<&Db>,
    req: &PagedTuneRequest<'_>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<DecodeTuneResult, Error> {
    let start = Instant::now();
    let (retrieval, page_size) = paged_step_of(req.pattern, req.page_size)?;
    let (b, hq, hkv, n, d) = (req.batch, req.heads, req.kv_heads, req.keys, req.head_dim as usize);
    if b == 0 || hq == 0 || hkv == 0 || hq % hkv != 0 || n == 0 {
        return Err(Error::Search(format!("bad shape: {b} sequences, {hq} heads on {hkv} key heads, {n} keys")));
    }
    let shape =
        PagedShape { batch: b, hq, hkv, head_dim: d, page_size, max_pages: n.div_ceil(page_size), dtype: req.dtype };
    let mut cache = gpu.paged_cache(shape)?;
    // Inputs rounded to the dtype, so the CPU reference sees what the GPU sees.
    let (k, kb) = rounded(Tensor::random(hkv, n, d, 32), req.dtype);
    let (v, vb) = rounded(Tensor::random(hkv, n, d, 33), req.dtype);
    let (q, qb) = rounded(Tensor::random(b * hq, 1, d, 31), req.dtype);
    let s = gpu.stream();
    let (kd, vd, qd) = (s.clone_htod(&kb)?, s.clone_htod(&vb)?, s.clone_htod(&qb)?);
    for seq in 0..b {
        cache.fill(gpu, seq, &kd, &vd, n)?;
    }
    let mut out = s.alloc_zeros::<u16>(b * hq * d)?;
    let mut lse = s.alloc_zeros::<f32>(b * hq)?;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let r = retrieval.as_ref();

    let timings = time_splits(s, progress, |splits| {
        cache.decode_step(gpu, &qd, &mut out, &mut lse, r, scale, splits).map_err(Error::from)
    })?;

    // The first sequence's rows on the CPU: the kept tokens per head, attention over them.
    let q0 = Tensor::new(hq, 1, d, q.data[..hq * d].to_vec())?;
    let kept: Vec<Vec<u32>> = (0..hq)
        .map(|h| match r {
            None => (0..n as u32).collect(),
            Some(r) => {
                let kv = h / (hq / hkv);
                let (u, c) = units(r, &k, kv);
                kept_for_row(r, q0.row(h, 0), &k, kv, &u, &c, n, f64::from(scale))
            }
        })
        .collect();
    let want = dense_attention(|h, _, t| kept[h].binary_search(&(t as u32)).is_ok(), &q0, &k, &v, f64::from(scale))?;
    let (best_splits, best_ms, verified_error) = verified_winner(&timings, req.dtype, progress, |splits| {
        let mut o = s.clone_htod(&vec![0xffffu16; b * hq * d])?;
        let mut l = s.clone_htod(&vec![f32::NAN; b * hq])?;
        cache.decode_step(gpu, &qd, &mut o, &mut l, r, scale, splits)?;
        Ok(relative_error(&req.dtype.decode(&s.clone_dtoh(&o)?[..hq * d]), &want.out.data))
    })?;
    let record = split_record(&timings, best_splits, best_ms, format!("paged page_size={page_size}"));
    if let Some(db) = db {
        let tc = gpu.toolchain()?;
        db.put_tuning(
            &weft_runtime::paged_tune_key(tc, req.pattern, b, n, req.head_dim, req.dtype, hq / hkv),
            &record,
        )?;
    }
    let auto_ms = record.default_ms;
    Ok(DecodeTuneResult {
        best_splits,
        best_ms,
        auto_ms,
        timings,
        verified_error,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_steps_are_quest_pages_or_full() {
        let parse = |s: &str| weft_dsl::parse_pattern_str("p", s).unwrap();
        let (r, page) = paged_step_of(&parse("retrieval(unit = page(32), keep = top_k(8))"), 16).unwrap();
        assert!(r.is_some() && page == 32);
        let (r, page) = paged_step_of(&Pattern::new("dense", full()), 16).unwrap();
        assert!(r.is_none() && page == 16);
        let tokens = parse("retrieval(unit = token, score = quantized(4), keep = top_k(8))");
        assert!(paged_step_of(&tokens, 16).unwrap_err().to_string().contains("page"));
        assert!(paged_step_of(&parse("causal"), 16).unwrap_err().to_string().contains("retrieval pattern or full()"));
    }
}
