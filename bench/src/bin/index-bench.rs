//! `index-bench`: end-to-end sparse attention on the GPU: the index built on the device from Q
//! and K, then sparse attention over it.
//!
//! Patterns: `vertical_vector(q_block = 128, keep = top_k(n), sink = 64, local = 64)`
//! (`Gpu::build_vv_index`) and `block(128 x 128, keep = top_k(n))` (`Gpu::build_block_index`),
//! non-causal, with n a share of the keys (`--keep`); and `causal & vertical_slash(vertical =
//! top_k(v), slash = top_k(s))` (`Gpu::build_vs_index`, `--vs v:s`). B = 1, H = 32, D = 128,
//! bf16. Prints, per
//! sequence length and share: the CPU plan's time (static, once per shape), the device index
//! build (median of `--reps`, host wall clock around a synchronised call), the attention
//! (CUDA events, median), and their sum. Compare with torch's flash backend on dense attention
//! from `bench/run.sh` in the same session.

use anyhow::Result;
use clap::Parser;
use cudarc::driver::sys::CUevent_flags;
use rayon::prelude::*;
use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::builder::*;
use weft_dsl::Pattern;
use weft_patterns::device_plan::{BlockPlan, ColumnPlan, SlashPlan};
use weft_patterns::IndexOptions;
use weft_runtime::{AttnShape, Gpu};

#[derive(Parser)]
#[command(about = "Time vertical-vector index building on the GPU plus the attention over it")]
struct Args {
    #[arg(long, value_delimiter = ',', default_values_t = [16384usize, 65536])]
    seq: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Shares of the keys kept per query group (top_k = share x N).
    #[arg(long, value_delimiter = ',', default_values_t = [0.03f64, 0.10])]
    keep: Vec<f64>,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Vertical-slash budgets `verticals:slashes` (causal, 64 x 64 tiles, last 64 queries).
    #[arg(long, value_delimiter = ',', default_values_t = ["1024:64".to_string()])]
    vs: Vec<String>,
}

const D: usize = 128;

/// Random bf16 words in [-2, 2) (xorshift per chunk, in parallel: 268 M values at 64k).
fn random_bf16(len: usize, seed: u64) -> Vec<u16> {
    let mut v = vec![0u16; len];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, chunk)| {
        let mut x = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for w in chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            *w = half::bf16::from_f32(f).to_bits();
        }
    });
    v
}

/// CUDA-event times (ms) on `stream` of `reps` launches after 3 warm-ups.
fn time_attention(
    stream: &cudarc::driver::CudaStream,
    reps: usize,
    mut launch: impl FnMut() -> Result<(), weft_runtime::Error>,
) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..reps + 3 {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        launch()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        if i >= 3 {
            times.push(f64::from(start.elapsed_ms(&end)?));
        }
    }
    Ok(times)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEFT_LOG")).init();
    let args = Args::parse();
    let gpu = Gpu::open(0)?;
    let s = gpu.stream.clone();
    let h = args.heads;
    eprintln!("GPU: {} ({} SMs)", gpu.name, gpu.sm_count);
    for &n in &args.seq {
        let words = h * n * D;
        let (qd, kd, vd) = (
            s.clone_htod(&random_bf16(words, 1 + n as u64))?,
            s.clone_htod(&random_bf16(words, 2 + n as u64))?,
            s.clone_htod(&random_bf16(words, 3 + n as u64))?,
        );
        let mut out = s.alloc_zeros::<u16>(words)?;
        let mut lse = s.alloc_zeros::<f32>(h * n)?;
        let shape = AttnShape { hq: h, hkv: h, nq: n, nk: n, head_dim: D };
        let scale = 1.0 / (D as f64).sqrt();
        for &share in &args.keep {
            let keep = ((share * n as f64).round() as u32).max(1);
            let expr = vertical_vector().q_block(128).keep(top_k(keep)).sink(64).local(64);
            let pattern = Pattern::new(format!("vv-top{keep}"), weft_dsl::PatternExpr::from(expr));
            let opts = IndexOptions { block_m: Some(128), block_n: Some(64), scale: Some(scale), ..Default::default() };
            let t = std::time::Instant::now();
            let plan = ColumnPlan::new(&pattern.expr, h, n, n, &opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            // Warm-up (compiles), then timed builds.
            let (mut dix, first) = gpu.build_vv_index(&plan, shape, DType::Bf16, &qd, &kd)?;
            let mut builds = Vec::new();
            let mut selects = Vec::new();
            let mut last = first.clone();
            for _ in 0..args.reps {
                let (ix, r) = gpu.build_vv_index(&plan, shape, DType::Bf16, &qd, &kd)?;
                builds.push(r.total_ms);
                selects.push(r.select_ms);
                last = r;
                dix = ix;
            }
            let config = KernelConfig::for_blocks(128, 64, D as u32, DType::Bf16);
            let kernel =
                emit(&KernelSpec { pattern: &pattern, masks: &plan.skeleton.masks, permutation: None, config })?;
            let attn = time_attention(&s, args.reps, || {
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32)
            })?;
            let (build, select, att) = (median(builds), median(selects), median(attn));
            let ix = dix.to_host(&gpu)?;
            let density = ix.pairs() as f64 / (h as f64 * n as f64 * n as f64);
            println!(
                "vv-e2e N={n:<6} top_k={keep:<5} density={density:.4} plan={plan_ms:.0} ms (CPU, once per shape) \
                 index={build:.3} ms ({} strategy, {} groups on the slow path; to the status read {select:.3}; columns {}; {} heads per score chunk) \
                 attention={att:.3} ms total={:.3} ms index/attention={:.1}%\n    kernels (last build): {}",
                first.strategy,
                first.slow_groups,
                first.columns,
                first.chunk_heads,
                build + att,
                100.0 * build / att,
                last.kernel_ms.iter().map(|(k, ms)| format!("{k} {ms:.3} ms")).collect::<Vec<_>>().join(", ")
            );
            // Block top-k over 128 x 128 blocks at the same share.
            let kblocks = n.div_ceil(128);
            let keep_blocks = ((share * kblocks as f64).round() as u32).max(1);
            let pattern = Pattern::new(
                format!("block-top{keep_blocks}"),
                weft_dsl::PatternExpr::from(block().block_q(128).block_k(128).keep(top_k(keep_blocks))),
            );
            let t = std::time::Instant::now();
            let plan = BlockPlan::new(&pattern.expr, h, n, n, &opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            let (mut dix, _) = gpu.build_block_index(&plan, shape, DType::Bf16, &qd, &kd)?;
            let mut builds = Vec::new();
            for _ in 0..args.reps {
                let (ix, r) = gpu.build_block_index(&plan, shape, DType::Bf16, &qd, &kd)?;
                builds.push(r.total_ms);
                dix = ix;
            }
            let config = KernelConfig::for_blocks(128, 64, D as u32, DType::Bf16);
            let kernel = emit(&KernelSpec { pattern: &pattern, masks: &plan.masks, permutation: None, config })?;
            let attn = time_attention(&s, args.reps, || {
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32)
            })?;
            let (build, att) = (median(builds), median(attn));
            let density = dix.to_host(&gpu)?.pairs() as f64 / (h as f64 * n as f64 * n as f64);
            println!(
                "block-e2e N={n:<6} top_k={keep_blocks:<4} (128 x 128 blocks) density={density:.4} plan={plan_ms:.0} ms \
                 index={build:.3} ms attention={att:.3} ms total={:.3} ms index/attention={:.1}%",
                build + att,
                100.0 * build / att
            );
        }
        for budgets in &args.vs {
            let parsed =
                budgets.split_once(':').and_then(|(v, s)| Some((v.parse::<u32>().ok()?, s.parse::<u32>().ok()?)));
            let Some((nv, ns)) = parsed else { anyhow::bail!("--vs takes verticals:slashes, got {budgets}") };
            let pattern =
                Pattern::new(format!("vs-{nv}-{ns}"), causal() & vertical_slash().vertical(top_k(nv)).slash(top_k(ns)));
            let opts = IndexOptions { scale: Some(scale), ..Default::default() };
            let t = std::time::Instant::now();
            let plan = SlashPlan::new(&pattern.expr, h, n, n, &opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            let (mut dix, _) = gpu.build_vs_index(&plan, shape, DType::Bf16, &qd, &kd)?;
            let (mut builds, mut last) = (Vec::new(), None);
            for _ in 0..args.reps {
                let (ix, r) = gpu.build_vs_index(&plan, shape, DType::Bf16, &qd, &kd)?;
                builds.push(r.total_ms);
                last = Some(r);
                dix = ix;
            }
            let config = KernelConfig::for_blocks(plan.block_m, plan.block_n, D as u32, DType::Bf16);
            let kernel = emit(&KernelSpec { pattern: &pattern, masks: &plan.masks, permutation: None, config })?;
            let attn = time_attention(&s, args.reps, || {
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32)
            })?;
            let (build, att) = (median(builds), median(attn));
            let density = dix.to_host(&gpu)?.pairs() as f64 / (h as f64 * n as f64 * n as f64);
            println!(
                "vs-e2e N={n:<6} verticals={nv} slashes={ns} (causal, {}x{} blocks) density={density:.4} plan={plan_ms:.0} ms \
                 index={build:.3} ms attention={att:.3} ms total={:.3} ms index/attention={:.1}%\n    kernels (last build): {}",
                plan.block_m,
                plan.block_n,
                build + att,
                100.0 * build / att,
                last.map(|r| r.kernel_ms.iter().map(|(k, ms)| format!("{k} {ms:.3} ms")).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
