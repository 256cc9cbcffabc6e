//! `index-bench`: end-to-end sparse attention on the GPU: the index built on the device from Q
//! and K, then sparse attention over it.
//!
//! Patterns: `vertical_vector(q_block = 128, keep = top_k(n), sink = 64, local = 64)`
//! (`Gpu::build_vv_index`) and `block(128 x 128, keep = top_k(n))` (`Gpu::build_block_index`),
//! non-causal, with n a share of the keys (`--keep`); and `causal & vertical_slash(vertical =
//! top_k(v), slash = top_k(s))` (`Gpu::build_vs_index`, `--vs v:s`); `--vv-budget` adds the
//! vertical-vector pattern with a threshold or top_p budget, `--grid` a grid
//! (`causal & grid(stride, lines, sink = 64)` for each of `--grid-lines`, phase estimated on
//! the GPU). B = 1, H = 32, D = 128,
//! bf16. Prints, per
//! sequence length and share: the CPU plan's time (static, once per shape), the device index
//! build (median of `--reps`, host wall clock from the call until it completed), the attention
//! (CUDA events, median), their sum, and both queued back to back with one wait at the end
//! (host wall clock, median: what a layer call costs, launch gaps included); and the build on
//! the stream alone (CUDA events around it, no per-kernel events: the GPU time it adds, timed
//! as the attention is). Compare with torch's flash backend on dense attention
//! from `bench/run.sh` in the same run.

use anyhow::Result;
use clap::Parser;
use rayon::prelude::*;
use weft_codegen::plan::{BlockPlan, ColumnPlan, SlashPlan};
use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::builder::*;
use weft_dsl::Pattern;
use weft_patterns::IndexOptions;
use weft_runtime::timing::time_calls;
use weft_runtime::{AttnShape, DeviceIndex, Gpu, GpuOptions, IndexBuild, IndexBuildReport};

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
    /// Other vertical-vector budgets, as in the DSL (`threshold(0.9)`, `top_p(0.5)`): the
    /// same pattern as `--keep`'s with that budget.
    #[arg(long, value_delimiter = ';')]
    vv_budget: Vec<String>,
    /// Grid strides: `causal & grid(stride, lines, sink = 64)`, its phase estimated per head
    /// from the last 64 queries (`Gpu::build_vs_index`).
    #[arg(long, value_delimiter = ',')]
    grid: Vec<u32>,
    /// The lines of `--grid`'s grids: `cols`, `rows` or `both` (one run each).
    #[arg(long, value_delimiter = ',', default_values_t = ["cols".to_string(), "both".to_string()])]
    grid_lines: Vec<String>,
    /// Vertical-slash budgets `verticals:slashes` (causal, 64 x 64 tiles, last 64 queries).
    #[arg(long, value_delimiter = ',', default_values_t = ["1024:64".to_string()])]
    vs: Vec<String>,
    /// Keys per block of the vertical-vector indexes (64 or 128): the width of their gathered
    /// column tiles, and the attention kernel's block_n.
    #[arg(long, default_value_t = 64)]
    vv_block_n: usize,
    /// Run the attention on the Hopper path (wgmma, sm_90a, with the producer warpgroup at 128
    /// rows) where the index's tiles allow it (64 or 128 rows and keys).
    #[arg(long)]
    wgmma: bool,
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
    Ok(time_calls(stream, 3, reps, |_| launch(), |_| false)?)
}

fn median(v: Vec<f64>) -> f64 {
    weft_runtime::timing::median(&v).unwrap_or(f64::NAN)
}

/// The device buffers of one sequence length.
struct Inputs {
    q: cudarc::driver::CudaSlice<u16>,
    k: cudarc::driver::CudaSlice<u16>,
    v: cudarc::driver::CudaSlice<u16>,
    out: cudarc::driver::CudaSlice<u16>,
    lse: cudarc::driver::CudaSlice<f32>,
    shape: AttnShape,
    scale: f64,
}

/// One measured case: medians of the index builds (host wall clock from the call until
/// `finish` saw it complete, and the part spent queueing it), of the attention over the last
/// index, of the pipelined pair (build and attention queued back to back, one wait at the
/// end: what a layer call costs), its density, and the first and last build reports.
struct Measured {
    build: f64,
    /// The build on the stream: CUDA events before and after it, without the per-kernel events
    /// (the GPU time it adds in front of the attention, measured as the attention is).
    stream_build: f64,
    enqueue: f64,
    attention: f64,
    pipelined: f64,
    density: f64,
    first: IndexBuildReport,
    last: IndexBuildReport,
    /// The attention kernel's config.
    config: KernelConfig,
}

impl Measured {
    fn kernels(&self) -> String {
        self.last.kernel_ms.iter().map(|(k, ms)| format!("{k} {ms:.3} ms")).collect::<Vec<_>>().join(", ")
    }

    /// The pipelined time and how the build was sized, for the printed lines.
    fn pipeline(&self) -> String {
        let sizing =
            if self.first.sized_by_read { "sized by a read of the total" } else { "sized by the plan's bound" };
        format!(
            "index on the stream (CUDA events)={:.3} ms = {:.1}% of the attention; index+attention queued together, one wait={:.3} ms (index queued in {:.3} ms; lists {sizing}, capacity {:?}; attention [{}])",
            self.stream_build,
            100.0 * self.stream_build / self.attention,
            self.pipelined,
            self.enqueue,
            self.first.capacity,
            self.config
        )
    }
}

type Built = Result<(DeviceIndex, IndexBuild), weft_runtime::Error>;

/// Builds the index once (warm-up: loads the kernels), then `reps` timed builds, then times
/// the attention over the last index with a kernel for `masks` and `(block_m, block_n)`
/// (`--wgmma`: the Hopper path where the tiles allow), then `reps` pipelined builds and
/// attentions.
fn measure(
    gpu: &Gpu,
    x: &mut Inputs,
    args: &Args,
    pattern: &Pattern,
    masks: &[weft_dsl::Pred],
    blocks: (usize, usize),
    build: impl Fn(&Inputs) -> Built,
) -> Result<Measured> {
    let reps = args.reps;
    let (mut dix, b) = build(x)?;
    let first = b.finish(&dix)?;
    let (mut builds, mut enqueues, mut last) = (Vec::new(), Vec::new(), first.clone());
    for _ in 0..reps {
        let (ix, b) = build(x)?;
        let r = b.finish(&ix)?;
        builds.push(r.total_ms);
        enqueues.push(r.enqueue_ms);
        last = r;
        dix = ix;
    }
    let mut config = KernelConfig::for_blocks(blocks.0, blocks.1, D as u32, DType::Bf16);
    let hopper = config.hopper();
    if args.wgmma && hopper.validate().is_ok() {
        config = hopper;
    }
    let kernel = emit(&KernelSpec { pattern, masks, permutation: None, config })?;
    let attn = {
        let Inputs { q, k, v, out, lse, shape, scale } = &mut *x;
        time_attention(gpu.stream(), reps, || {
            gpu.attention(&kernel, &config, &dix, *shape, q, k, v, out, lse, *scale as f32)
        })?
    };
    // (Without per-kernel events: what a layer call queues.)
    gpu.set_options(GpuOptions { time_index_kernels: false, ..gpu.options() });
    let mut built = Vec::new();
    let stream_builds = time_calls(
        gpu.stream(),
        0,
        reps,
        |_| -> Result<()> {
            built.push(build(x)?);
            Ok(())
        },
        |_| false,
    )?;
    for (ix, b) in built {
        b.finish(&ix)?;
    }
    let mut pipelined = Vec::new();
    for _ in 0..reps {
        let t = std::time::Instant::now();
        let (ix, _) = build(x)?;
        let Inputs { q, k, v, out, lse, shape, scale } = &mut *x;
        gpu.attention(&kernel, &config, &ix, *shape, q, k, v, out, lse, *scale as f32)?;
        gpu.stream().synchronize()?;
        pipelined.push(t.elapsed().as_secs_f64() * 1e3);
    }
    gpu.set_options(GpuOptions { time_index_kernels: true, ..gpu.options() });
    let (shape, n) = (x.shape, x.shape.nq as f64);
    let density = dix.to_host(gpu)?.pairs() as f64 / (shape.hq as f64 * n * n);
    Ok(Measured {
        build: median(builds),
        stream_build: median(stream_builds),
        enqueue: median(enqueues),
        attention: median(attn),
        pipelined: median(pipelined),
        density,
        first,
        last,
        config,
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("WEFT_LOG")).init();
    let args = Args::parse();
    anyhow::ensure!(matches!(args.vv_block_n, 64 | 128), "--vv-block-n must be 64 or 128, got {}", args.vv_block_n);
    let gpu = Gpu::open(0)?;
    gpu.set_options(GpuOptions { time_index_kernels: true, ..gpu.options() });
    let s = gpu.stream().clone();
    let h = args.heads;
    eprintln!("GPU: {} ({} SMs)", gpu.name, gpu.sm_count);
    for &n in &args.seq {
        let words = h * n * D;
        let mut x = Inputs {
            q: s.clone_htod(&random_bf16(words, 1 + n as u64))?,
            k: s.clone_htod(&random_bf16(words, 2 + n as u64))?,
            v: s.clone_htod(&random_bf16(words, 3 + n as u64))?,
            out: s.alloc_zeros::<u16>(words)?,
            lse: s.alloc_zeros::<f32>(h * n)?,
            shape: AttnShape { hq: h, hkv: h, nq: n, nk: n, head_dim: D },
            scale: 1.0 / (D as f64).sqrt(),
        };
        let (shape, scale) = (x.shape, x.scale);
        let totals = |m: &Measured| (m.build + m.attention, 100.0 * m.build / m.attention);
        // A vertical-vector pattern (128-query groups, 128 x --vv-block-n blocks) and a vertical-slash or
        // grid one (its own blocks): plan on the CPU (timed), then measure.
        let vv_opts = IndexOptions {
            block_m: Some(128),
            block_n: Some(args.vv_block_n),
            scale: Some(scale),
            ..Default::default()
        };
        let run_vv = |x: &mut Inputs, pattern: &Pattern| -> Result<(Measured, f64)> {
            let t = std::time::Instant::now();
            let plan = ColumnPlan::new(&pattern.expr, h, n, n, &vv_opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            let m = measure(&gpu, x, &args, pattern, &plan.skeleton.masks, (128, args.vv_block_n), |x| {
                gpu.build_vv_index(&plan, shape, DType::Bf16, &x.q, &x.k)
            })?;
            Ok((m, plan_ms))
        };
        let run_slash = |x: &mut Inputs, pattern: &Pattern| -> Result<(Measured, f64, (usize, usize))> {
            let opts = IndexOptions { scale: Some(scale), ..Default::default() };
            let t = std::time::Instant::now();
            let plan = SlashPlan::new(&pattern.expr, h, n, n, &opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            let blocks = (plan.shape.block_m, plan.shape.block_n);
            let m = measure(&gpu, x, &args, pattern, &plan.masks, blocks, |x| {
                gpu.build_vs_index(&plan, shape, DType::Bf16, &x.q, &x.k)
            })?;
            Ok((m, plan_ms, blocks))
        };
        for &share in &args.keep {
            let keep = ((share * n as f64).round() as u32).max(1);
            let expr = vertical_vector().q_block(128).keep(top_k(keep)).sink(64).local(64);
            let pattern = Pattern::new(format!("vv-top{keep}"), weft_dsl::PatternExpr::from(expr));
            let (m, plan_ms) = run_vv(&mut x, &pattern)?;
            let (total, share_pct) = totals(&m);
            println!(
                "vv-e2e N={n:<6} top_k={keep:<5} (128 x {} blocks) density={:.4} plan={plan_ms:.0} ms (CPU, once per shape) \
                 index={:.3} ms ({} strategy, {} groups on the slow path, {} ranked exactly; columns {}; {} heads per score chunk) \
                 attention={:.3} ms total={total:.3} ms index/attention={share_pct:.1}%\n    {}\n    kernels (last build): {}",
                args.vv_block_n,
                m.density,
                m.build,
                m.first.strategy,
                m.first.slow_groups,
                m.first.exact_groups,
                m.first.columns,
                m.first.chunk_heads,
                m.attention,
                m.pipeline(),
                m.kernels()
            );
            // Block top-k over 128 x 128 blocks at the same share.
            let kblocks = n.div_ceil(128);
            let keep_blocks = ((share * kblocks as f64).round() as u32).max(1);
            let pattern = Pattern::new(
                format!("block-top{keep_blocks}"),
                weft_dsl::PatternExpr::from(block().block_q(128).block_k(128).keep(top_k(keep_blocks))),
            );
            let t = std::time::Instant::now();
            // The index in the pattern's own 128 x 128 blocks (the Hopper path's widest tile).
            let block_opts = IndexOptions { block_n: Some(128), ..vv_opts.clone() };
            let plan = BlockPlan::new(&pattern.expr, h, n, n, &block_opts)?;
            let plan_ms = t.elapsed().as_secs_f64() * 1e3;
            let m = measure(&gpu, &mut x, &args, &pattern, &plan.masks, (128, 128), |x| {
                gpu.build_block_index(&plan, shape, DType::Bf16, &x.q, &x.k)
            })?;
            let (total, share_pct) = totals(&m);
            println!(
                "block-e2e N={n:<6} top_k={keep_blocks:<4} (128 x 128 blocks) density={:.4} plan={plan_ms:.0} ms \
                 index={:.3} ms attention={:.3} ms total={total:.3} ms index/attention={share_pct:.1}%\n    {}\n    kernels (last build): {}",
                m.density,
                m.build,
                m.attention,
                m.pipeline(),
                m.kernels()
            );
        }
        for budget in &args.vv_budget {
            let src = format!("vertical_vector(q_block = 128, keep = {budget}, sink = 64, local = 64)");
            let pattern = weft_dsl::parse_pattern_str("vv-budget", &src)?;
            let (m, plan_ms) = run_vv(&mut x, &pattern)?;
            let (total, share_pct) = totals(&m);
            println!(
                "vv-e2e N={n:<6} keep={budget} (128 x {} blocks) density={:.4} plan={plan_ms:.0} ms index={:.3} ms ({} heads per score \
                 chunk; columns {}) attention={:.3} ms total={total:.3} ms index/attention={share_pct:.1}%\n    \
                 {}\n    kernels (last build): {}",
                args.vv_block_n,
                m.density,
                m.build,
                m.first.chunk_heads,
                m.first.columns,
                m.attention,
                m.pipeline(),
                m.kernels()
            );
        }
        for (&stride, lines_name) in args.grid.iter().flat_map(|s| args.grid_lines.iter().map(move |l| (s, l))) {
            let lines = match lines_name.as_str() {
                "cols" => weft_dsl::GridLines::Cols,
                "rows" => weft_dsl::GridLines::Rows,
                "both" => weft_dsl::GridLines::Both,
                other => anyhow::bail!("--grid-lines takes cols, rows or both, got {other}"),
            };
            let expr = causal() & grid(stride).lines(lines).sink(64);
            let pattern = Pattern::new(format!("grid-{stride}-{lines_name}"), expr);
            let (m, plan_ms, _) = run_slash(&mut x, &pattern)?;
            let (total, share_pct) = totals(&m);
            println!(
                "grid-e2e N={n:<6} stride={stride} (causal, {lines_name} lines, sink 64) density={:.4} plan={plan_ms:.0} ms \
                 index={:.3} ms attention={:.3} ms total={total:.3} ms index/attention={share_pct:.1}%\n    {}\n    kernels (last build): {}",
                m.density,
                m.build,
                m.attention,
                m.pipeline(),
                m.kernels()
            );
        }
        for budgets in &args.vs {
            let parsed =
                budgets.split_once(':').and_then(|(v, s)| Some((v.parse::<u32>().ok()?, s.parse::<u32>().ok()?)));
            let Some((nv, ns)) = parsed else { anyhow::bail!("--vs takes verticals:slashes, got {budgets}") };
            let pattern =
                Pattern::new(format!("vs-{nv}-{ns}"), causal() & vertical_slash().vertical(top_k(nv)).slash(top_k(ns)));
            let (m, plan_ms, (bm, bn)) = run_slash(&mut x, &pattern)?;
            let (total, share_pct) = totals(&m);
            println!(
                "vs-e2e N={n:<6} verticals={nv} slashes={ns} (causal, {bm}x{bn} blocks) density={:.4} plan={plan_ms:.0} ms \
                 index={:.3} ms attention={:.3} ms total={total:.3} ms index/attention={share_pct:.1}%\n    {}\n    kernels (last build): {}",
                m.density,
                m.build,
                m.attention,
                m.pipeline(),
                m.kernels()
            );
        }
    }
    Ok(())
}
