//! Split-KV tuning of the decode kernel (retrieval patterns).
//!
//! Decode is memory-bound and has one query per sequence, so its only tunable is how many
//! CTAs split each row's kept keys (`splits`): too few leave SMs idle, too many add partials
//! for the merge kernel to combine. Every candidate count, and the runtime's automatic choice
//! (`splits = 0`), is timed with CUDA events on the bucket's shape; the fastest whose output
//! matches the CPU reference is stored as a tuning record whose `best` is `{"splits": n}`.

use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use weft_cache::{Db, TuneRecord};
use weft_codegen::{emit_decode, emit_merge, DType, DecodeSpec, Partial};
use weft_dsl::Pattern;
use weft_patterns::{attention, build_index, IndexOptions, Tensor};
use weft_runtime::timing::{median as median_of, time_calls};
use weft_runtime::{AttnShape, Gpu};

use crate::tune::{relative_error, rounded};
use crate::Error;

/// Split counts tried; 0 is the runtime's automatic choice (enough CTAs to fill the GPU).
pub const SPLITS: [usize; 8] = [0, 1, 2, 4, 8, 16, 32, 64];

/// Timed runs per split count (after two warm-ups); the median is kept.
const REPS: usize = 10;

/// One (retrieval pattern, shape bucket) to tune.
#[derive(Clone, Copy, Debug)]
pub struct DecodeTuneRequest<'a> {
    pub pattern: &'a Pattern,
    pub heads: usize,
    pub kv_heads: usize,
    /// Keys in the cache (the bucket's sequence length).
    pub keys: usize,
    pub head_dim: u32,
    pub dtype: DType,
}

/// The outcome of a decode tune.
#[derive(Clone, Debug)]
pub struct DecodeTuneResult {
    pub best_splits: usize,
    pub best_ms: f64,
    /// The automatic choice's time.
    pub auto_ms: Option<f64>,
    /// Every split count with its median time (`None` when it failed).
    pub timings: Vec<(usize, Option<f64>)>,
    /// Relative error of the winner's output against the CPU reference.
    pub verified_error: f64,
    pub seconds: f64,
}

/// Tunes the split count of `req` on `gpu`; stores the winner in `db` when given.
pub fn tune_decode(
    gpu: &Gpu,
    db: Option<&Db>,
    req: &DecodeTuneRequest<'_>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<DecodeTuneResult, Error> {
    let start = Instant::now();
    if !req.pattern.expr.contains_retrieval() {
        return Err(Error::Search(format!("`{}` has no retrieval operator: tune it as attention", req.pattern.name)));
    }
    if req.heads == 0 || req.kv_heads == 0 || req.heads % req.kv_heads != 0 || req.keys == 0 {
        return Err(Error::Search(format!(
            "bad shape: {} heads on {} key heads, {} keys",
            req.heads, req.kv_heads, req.keys
        )));
    }
    let (hq, hkv, nk, d) = (req.heads, req.kv_heads, req.keys, req.head_dim as usize);
    // Inputs rounded to the dtype, so the CPU reference sees what the GPU sees.
    let (q, qb) = rounded(Tensor::random(hq, 1, d, 21), req.dtype);
    let (k, kb) = rounded(Tensor::random(hkv, nk, d, 22), req.dtype);
    let (v, vb) = rounded(Tensor::random(hkv, nk, d, 23), req.dtype);
    let ix = build_index(&req.pattern.expr, &q, &k, &IndexOptions::default())?;
    let spec = DecodeSpec {
        pattern: req.pattern,
        masks: &ix.masks,
        permutation: ix.permutation,
        block_n: ix.block_n as u32,
        head_dim: req.head_dim,
        dtype: req.dtype,
    };
    let kernel = emit_decode(&spec)?;
    let merge = emit_merge(req.head_dim, req.dtype, Partial::F32)?;
    gpu.load_all(&[&kernel, &merge])?;
    let s = gpu.stream();
    let dix = gpu.upload_index(&ix)?;
    let (qd, kd, vd) = (s.clone_htod(&qb)?, s.clone_htod(&kb)?, s.clone_htod(&vb)?);
    let mut out = s.alloc_zeros::<u16>(hq * d)?;
    let mut lse = s.alloc_zeros::<f32>(hq)?;
    let shape = AttnShape { hq, hkv, nq: 1, nk, head_dim: d };
    let scale = 1.0 / (d as f64).sqrt();
    let run = |splits: usize, out: &mut CudaSlice<u16>, lse: &mut CudaSlice<f32>| {
        gpu.decode(&kernel, &merge, &dix, shape, &qd, &kd, &vd, out, lse, scale as f32, splits).map_err(Error::from)
    };

    let timings = time_splits(s, progress, |splits| run(splits, &mut out, &mut lse))?;
    let want = attention(&ix, &q, &k, &v, scale)?;
    let (best_splits, best_ms, verified_error) = verified_winner(&timings, req.dtype, progress, |splits| {
        let mut o = s.clone_htod(&vec![0xffffu16; hq * d])?;
        let mut l = s.clone_htod(&vec![f32::NAN; hq])?;
        run(splits, &mut o, &mut l)?;
        Ok(relative_error(&req.dtype.decode(&s.clone_dtoh(&o)?), &want.out.data))
    })?;
    let record = split_record(&timings, best_splits, best_ms, kernel.key.clone());
    if let Some(db) = db {
        let tc = gpu.toolchain()?;
        db.put_tuning(&weft_runtime::tune_key(tc, req.pattern, None, nk, req.head_dim, req.dtype, hq / hkv), &record)?;
    }
    Ok(DecodeTuneResult {
        best_splits,
        best_ms,
        auto_ms: record.default_ms,
        timings,
        verified_error,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Times `step` at every count of [`SPLITS`] ([`REPS`] CUDA-event timed runs after two
/// warm-ups; the median, `None` where it failed), reporting each to `progress`.
pub(crate) fn time_splits(
    s: &CudaStream,
    progress: &(dyn Fn(&str) + Sync),
    mut step: impl FnMut(usize) -> Result<(), Error>,
) -> Result<Vec<(usize, Option<f64>)>, Error> {
    let mut timings = Vec::new();
    for splits in SPLITS {
        let (times, failed) = match time_calls(s, 2, REPS, |_| step(splits), |_| false) {
            Ok(times) => (times, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let median = median_of(&times);
        progress(&match (median, &failed) {
            (Some(m), _) => format!("splits {splits}: {m:.4} ms"),
            (None, Some(e)) => format!("splits {splits}: failed: {e}"),
            (None, None) => format!("splits {splits}: no time"),
        });
        timings.push((splits, median));
    }
    Ok(timings)
}

/// The fastest split count whose output's relative error (`error_of`, a fresh run into
/// poisoned buffers) is within `dtype`'s reference tolerance: (splits, its time, its error).
pub(crate) fn verified_winner(
    timings: &[(usize, Option<f64>)],
    dtype: DType,
    progress: &(dyn Fn(&str) + Sync),
    mut error_of: impl FnMut(usize) -> Result<f64, Error>,
) -> Result<(usize, f64, f64), Error> {
    let mut order: Vec<(usize, f64)> = timings.iter().filter_map(|(s, t)| t.map(|t| (*s, t))).collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (splits, ms) in order {
        let err = error_of(splits)?;
        if err < dtype.reference_tolerance() {
            return Ok((splits, ms, err));
        }
        progress(&format!("splits {splits}: failed the reference check (error {err:.2e}); not stored"));
    }
    Err(Error::Search("no split count both ran and passed the reference check".into()))
}

/// The tuning record of a split-count tune won by `best` in `best_ms` (the automatic choice's
/// time as the default's).
pub(crate) fn split_record(timings: &[(usize, Option<f64>)], best: usize, best_ms: f64, kernel: String) -> TuneRecord {
    TuneRecord {
        best: serde_json::json!({ "splits": best }),
        best_ms,
        default_ms: timings.iter().find(|(s, _)| *s == 0).and_then(|(_, t)| *t),
        timings: timings.iter().map(|(s, t)| (serde_json::json!({ "splits": s }), *t)).collect(),
        kernel,
        created: weft_cache::timestamp(),
    }
}
