//! Tuning one (pattern, head, shape bucket) on the GPU.
//!
//! 1. the config space ([`crate::space::space`], plus the Hopper tiles with `wgmma`, plus the
//!    runtime's untuned default [`KernelConfig::default_for_arch`] so the gain is measured
//!    against it), pruned statically and compiled in parallel;
//! 2. every survivor timed with CUDA events on the bucket's shape: two warm-ups, then up to
//!    [`MAX_REPS`] timed runs over [`INPUT_SETS`] input sets in rotation (each larger than the
//!    L2 at the sizes tuned for); after [`EARLY_REPS`] runs a config whose median is more than
//!    [`ELIMINATE_ABOVE`] times the best so far stops (as cubecl's tuner does);
//! 3. the fastest is checked against the CPU reference on a small problem with the same
//!    config; a config that fails is never stored, the next fastest is tried;
//! 4. the winner's kernel (through the runtime's database-backed loading) and the tuning
//!    record (every timing, the default config's time) are stored.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use weft_cache::{Db, TuneRecord};
use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::Pattern;
use weft_patterns::{attention, build_index, IndexOptions, SparseIndex, Tensor};
use weft_runtime::timing::{median as median_of, time_calls};
use weft_runtime::{AttnShape, Gpu};

use crate::space::{compile_space, hopper_space, nvrtc_compiler, space, Candidate, DeviceLimits};
use crate::Error;

/// Timed runs at most per config.
pub const MAX_REPS: usize = 10;
/// Runs after which slow configs are eliminated.
pub const EARLY_REPS: usize = 3;
/// A config slower than this factor times the best median so far is eliminated.
pub const ELIMINATE_ABOVE: f64 = 1.25;
/// Input sets rotated between runs.
pub const INPUT_SETS: usize = 2;

/// What to tune.
#[derive(Clone, Debug)]
pub struct TuneRequest<'a> {
    pub pattern: &'a Pattern,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: u32,
    pub dtype: DType,
    /// The head the pattern is tuned for, when heads tune differently.
    pub head: Option<u32>,
    /// Whether to time the Hopper path's configs too ([`crate::space::hopper_space`]; sm_90
    /// GPUs only): `None` does on sm_90, where the runtime's untuned default is on that path;
    /// `Some(true)` asks for them (and says so when this GPU or head dim has none);
    /// `Some(false)` times the mma.sync space (and the default config) only.
    pub wgmma: Option<bool>,
}

/// One config's outcome.
#[derive(Clone, Debug)]
pub struct Timed {
    pub config: KernelConfig,
    /// Median of the runs made; `None` when pruned or failed (see `note`).
    pub median_ms: Option<f64>,
    pub runs: usize,
    pub note: String,
}

/// The result of a tune.
#[derive(Clone, Debug)]
pub struct TuneResult {
    pub best: KernelConfig,
    pub best_ms: f64,
    /// The runtime's untuned config's time (`None` if it was pruned or failed to run).
    pub default_ms: Option<f64>,
    pub timings: Vec<Timed>,
    /// Relative error of the winner against the CPU reference.
    pub verified_error: f64,
    /// FLOPs of one call (4 * pairs * head_dim).
    pub flops: f64,
    pub seconds: f64,
}

/// The index a config is tuned and checked on. bf16 indexes of patterns the GPU builders take
/// are numbered as a GPU build numbers them (as the runtime numbers them for bf16 layers), so
/// the tuned kernel's key (which holds the mask table) is the one the runtime asks for.
fn index_for(pattern: &Pattern, q: &Tensor, k: &Tensor, c: &KernelConfig) -> Result<SparseIndex, Error> {
    let opts =
        IndexOptions { block_m: Some(c.block_m as usize), block_n: Some(c.block_n as usize), ..Default::default() };
    if c.dtype == DType::Bf16 && !pattern.expr.is_static() {
        return Ok(weft_codegen::plan::planned_index(&pattern.expr, q, k, &opts)?);
    }
    Ok(build_index(&pattern.expr, q, k, &opts)?)
}

/// Output of `config` on a small problem against the CPU reference: relative L2 error.
fn verify(gpu: &Gpu, req: &TuneRequest<'_>, config: &KernelConfig) -> Result<f64, Error> {
    let (hq, hkv, n, d) = (2 * (req.heads / req.kv_heads).max(1), 2, req.seq.min(700), req.head_dim as usize);
    let (q, qb) = rounded(Tensor::random(hq, n, d, 11), req.dtype);
    let (k, kb) = rounded(Tensor::random(hkv, n, d, 12), req.dtype);
    let (v, vb) = rounded(Tensor::random(hkv, n, d, 13), req.dtype);
    let ix = index_for(req.pattern, &q, &k, config)?;
    let scale = 1.0 / (d as f64).sqrt();
    let want = attention(&ix, &q, &k, &v, scale)?;
    let kernel =
        emit(&KernelSpec { pattern: req.pattern, masks: &ix.masks, permutation: ix.permutation, config: *config })?;
    let s = gpu.stream();
    let dix = gpu.upload_index(&ix)?;
    let (qd, kd, vd) = (s.clone_htod(&qb)?, s.clone_htod(&kb)?, s.clone_htod(&vb)?);
    let mut out = s.clone_htod(&vec![0xffffu16; hq * n * d])?;
    let mut lse = s.clone_htod(&vec![f32::NAN; hq * n])?;
    let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
    gpu.attention(&kernel, config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32)?;
    s.synchronize()?;
    let got = req.dtype.decode(&s.clone_dtoh(&out)?);
    Ok(relative_error(&got, &want.out.data))
}

/// `t` rounded to `dtype`: the values the CPU reference uses and the words the GPU reads.
pub(crate) fn rounded(t: Tensor, dtype: DType) -> (Tensor, Vec<u16>) {
    let bits = dtype.encode(&t.data);
    (Tensor { data: dtype.decode(&bits), ..t }, bits)
}

/// Relative L2 error of a kernel's output against the reference; infinite if any output is
/// not finite (an unwritten or poisoned element).
pub(crate) fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += f64::from(g - w).powi(2);
        den += f64::from(*w).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Tunes `req` on `gpu`; stores the winner in `db` (with `gpu`'s toolchain) when given.
pub fn tune(
    gpu: &Gpu,
    db: Option<&Db>,
    req: &TuneRequest<'_>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<TuneResult, Error> {
    let start = Instant::now();
    if req.heads == 0 || req.kv_heads == 0 || req.heads % req.kv_heads != 0 || req.seq == 0 {
        return Err(Error::Search(format!(
            "bad shape: {} heads on {} key heads, {} tokens",
            req.heads, req.kv_heads, req.seq
        )));
    }
    let d = req.head_dim as usize;
    let mut configs = space(req.pattern, req.head_dim, req.dtype);
    if req.wgmma.unwrap_or(gpu.arch.sm == 90) {
        let hopper = if gpu.arch.sm == 90 { hopper_space(req.pattern, req.head_dim, req.dtype) } else { Vec::new() };
        if hopper.is_empty() && req.wgmma == Some(true) {
            progress(&format!(
                "--wgmma: no Hopper configs here (they need an sm_90 GPU, this one is {}, and head dim 64 or 128)",
                gpu.arch.name()
            ));
        }
        configs.extend(hopper);
    }
    // The runtime's untuned config is always timed, so the result says what tuning gained
    // (on sm_90 it is often a Hopper config, which the plain space leaves out).
    let default = KernelConfig::default_for_arch(&req.pattern.expr, req.head_dim, req.dtype, gpu.arch.sm)?;
    if !configs.contains(&default) {
        configs.push(default);
    }
    progress(&format!("{} configs, compiling", configs.len()));
    // Inputs of the bucket's shape, several sets to rotate through.
    let sets: Vec<(Tensor, Tensor, Tensor)> = (0..INPUT_SETS as u64)
        .map(|i| {
            (
                Tensor::random(req.heads, req.seq, d, 100 + i),
                Tensor::random(req.kv_heads, req.seq, d, 200 + i),
                Tensor::random(req.kv_heads, req.seq, d, 300 + i),
            )
        })
        .collect();
    let (q0, k0) = (&sets[0].0, &sets[0].1);
    // One index per block shape (configs differing in warps or stages share it), built once.
    let mut shapes: Vec<&KernelConfig> = configs.iter().collect();
    shapes.sort_by_key(|c| (c.block_m, c.block_n));
    shapes.dedup_by_key(|c| (c.block_m, c.block_n));
    let indexes: HashMap<(u32, u32), Result<SparseIndex, String>> = shapes
        .par_iter()
        .map(|c| ((c.block_m, c.block_n), index_for(req.pattern, q0, k0, c).map_err(|e| e.to_string())))
        .collect();
    let ix_for = |c: &KernelConfig| match indexes.get(&(c.block_m, c.block_n)) {
        Some(Ok(ix)) => Ok(ix.clone()),
        Some(Err(e)) => Err(Error::Search(e.clone())),
        None => index_for(req.pattern, q0, k0, c),
    };
    let limits = DeviceLimits::for_sm(gpu.arch.sm);
    let candidates = compile_space(req.pattern, &ix_for, &configs, &limits, nvrtc_compiler(gpu.arch));
    let s = gpu.stream();
    let mut dev_sets = Vec::new();
    for (q, k, v) in &sets {
        let up = |t: &Tensor| s.clone_htod(&req.dtype.encode(&t.data)).map_err(Error::from);
        dev_sets.push((up(q)?, up(k)?, up(v)?));
    }
    let mut out = s.alloc_zeros::<u16>(req.heads * req.seq * d)?;
    let mut lse = s.alloc_zeros::<f32>(req.heads * req.seq)?;
    let shape = AttnShape { hq: req.heads, hkv: req.kv_heads, nq: req.seq, nk: req.seq, head_dim: d };
    let scale = 1.0 / (d as f32).sqrt();
    let mut timings = Vec::new();
    let mut best_so_far = f64::INFINITY;
    // Pairs computed: the same for every layout (an index keeps exactly the pattern's pairs),
    // so counted once, on the first index built.
    let mut pairs = None;
    for cand in &candidates {
        let kept = match cand {
            Candidate::Dropped(c, why) => {
                timings.push(Timed { config: *c, median_ms: None, runs: 0, note: format!("pruned: {why:?}") });
                continue;
            }
            Candidate::Kept(k) => k,
        };
        let ix = ix_for(&kept.config)?;
        if pairs.is_none() {
            pairs = Some(ix.pairs());
        }
        gpu.load_cubin(&kept.kernel, kept.cubin.clone(), kept.ptx.clone())?;
        let dix = gpu.upload_index(&ix)?;
        // Two warm-up calls, then up to MAX_REPS timed, rotating the input sets; a config whose
        // median after EARLY_REPS is far behind the best so far stops there.
        let mut eliminated = false;
        let run = time_calls(
            s,
            2,
            MAX_REPS,
            |i| {
                let (qd, kd, vd) = &dev_sets[i % INPUT_SETS];
                gpu.attention(&kept.kernel, &kept.config, &dix, shape, qd, kd, vd, &mut out, &mut lse, scale)
            },
            |times| {
                eliminated =
                    times.len() == EARLY_REPS && median_of(times).is_some_and(|m| m > ELIMINATE_ABOVE * best_so_far);
                eliminated
            },
        );
        let (times, note) = match run {
            Ok(times) if eliminated => (times, "eliminated early".to_string()),
            Ok(times) => (times, String::new()),
            Err(e) => (Vec::new(), format!("failed: {e}")),
        };
        let median = median_of(&times);
        if let Some(m) = median {
            best_so_far = best_so_far.min(m);
        }
        progress(&format!("{}: {}", kept.config, median.map_or(note.clone(), |m| format!("{m:.3} ms"))));
        timings.push(Timed { config: kept.config, median_ms: median, runs: times.len(), note });
    }
    // Fastest first; the first that passes the reference check wins.
    let mut order: Vec<&Timed> = timings.iter().filter(|t| t.median_ms.is_some() && t.note.is_empty()).collect();
    order.sort_by(|a, b| a.median_ms.unwrap_or(f64::INFINITY).total_cmp(&b.median_ms.unwrap_or(f64::INFINITY)));
    let tol = req.dtype.reference_tolerance();
    let mut winner = None;
    for t in order {
        let err = verify(gpu, req, &t.config)?;
        if err < tol {
            winner = Some((t.clone(), err));
            break;
        }
        progress(&format!("{}: failed the reference check (error {err:.2e}); not stored", t.config));
    }
    let (best, verified_error) =
        winner.ok_or_else(|| Error::Tune("no config both ran and passed the reference check".into()))?;
    let default_ms = timings.iter().find(|t| t.config == default).and_then(|t| t.median_ms);
    let best_ms = best.median_ms.unwrap_or(f64::NAN);
    if let Some(db) = db {
        let tc = gpu.toolchain()?;
        let compiled = candidates
            .iter()
            .find_map(|c| match c {
                Candidate::Kept(k) if k.config == best.config => Some(k),
                _ => None,
            })
            .ok_or_else(|| Error::Tune("the winner's compiled kernel is missing".into()))?;
        let kernel = &compiled.kernel;
        let kernel_key =
            weft_cache::KernelKey { toolchain: tc.clone(), kernel: kernel.key.clone(), arch: gpu.arch.name() };
        let kernel_record = weft_runtime::kernel_record(kernel, &compiled.cubin, &compiled.ptx, &compiled.options);
        db.put_kernel(&kernel_key, &kernel_record)?;
        let key = weft_runtime::tune_key(
            tc,
            req.pattern,
            req.head,
            req.seq,
            req.head_dim,
            req.dtype,
            req.heads / req.kv_heads,
        );
        let cfg = |c: &KernelConfig| serde_json::to_value(c).unwrap_or_default();
        let record = TuneRecord {
            best: cfg(&best.config),
            best_ms,
            default_ms,
            timings: timings.iter().map(|t| (cfg(&t.config), t.median_ms)).collect(),
            kernel: kernel.key.clone(),
            created: weft_cache::timestamp(),
        };
        db.put_tuning(&key, &record)?;
    }
    Ok(TuneResult {
        best: best.config,
        best_ms,
        default_ms,
        timings,
        verified_error,
        flops: 4.0 * pairs.unwrap_or(0) as f64 * d as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}
