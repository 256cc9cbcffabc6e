//! `paged-bench`: decode steps over a paged KV cache (`PagedKvCache::decode_step`), dense and
//! with Quest's pages chosen on the device, against the GPU's copy bandwidth measured in the
//! same run.
//!
//! Per batch and context (every sequence that long; bf16, `--heads` query heads over
//! `--kv-heads`, D = 128, pages of `--page` tokens): the device-to-device copy bandwidth (a
//! `--copy-mib` buffer, read + written bytes over time), the dense step (every page kept; its
//! K and V bytes over its time, and that as a share of the copy bandwidth), and the Quest step
//! (`top_k` of `--keep` of the pages, sink 64 and recent 64 tokens): its time, its floor (the
//! bytes it must read: each query head's page metadata and kept K and V, over the copy
//! bandwidth) and its speedup over the dense step; and the same with the pages chosen per KV
//! head (`per = kv_head`), whose floor reads each KV head's metadata and kept K and V once. Times are CUDA-event medians of `--reps`
//! steps after a warm-up; a step is `score` + `retrieve` + `attend` + the merge (dense: `attend`
//! + merge).

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use cudarc::driver::{CudaSlice, CudaStream};
use weft_codegen::DType;
use weft_dsl::{Budget, Retrieval, Score, Unit};
use weft_runtime::timing::{median, time_calls};
use weft_runtime::{Gpu, PagedKvCache, PagedShape};

const D: usize = 128;

#[derive(Parser)]
#[command(about = "Time decode steps over a paged KV cache, dense and with Quest's retrieval")]
struct Args {
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    batch: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = [32768usize, 131072])]
    context: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 16)]
    page: usize,
    /// Share of the pages Quest keeps (top_k).
    #[arg(long, default_value_t = 0.02)]
    keep: f64,
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Splits per (sequence, head); 0: the runtime's choice.
    #[arg(long, default_value_t = 0)]
    splits: usize,
    #[arg(long, default_value_t = 1024)]
    copy_mib: usize,
    /// Skip shapes whose cache would take more than this many GiB.
    #[arg(long, default_value_t = 60.0)]
    max_gib: f64,
    /// Also decode over caches in pinned host memory (`Gpu::paged_cache_in_host`), with no hot
    /// pages and with enough for every kept page, against the host-to-device bandwidth.
    #[arg(long)]
    host: bool,
    /// Skip host-memory caches larger than this many GiB.
    #[arg(long, default_value_t = 64.0)]
    host_max_gib: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gpu = Gpu::open(0).context("opening the GPU")?;
    let s = gpu.stream().clone();
    // The copy bandwidth: read + written bytes of a device-to-device copy.
    let n = args.copy_mib * 1024 * 1024 / 2;
    let src = s.alloc_zeros::<u16>(n)?;
    let mut dst = s.alloc_zeros::<u16>(n)?;
    let t = time_calls::<weft_runtime::Error>(
        &s,
        3,
        args.reps,
        |_| s.memcpy_dtod(&src, &mut dst).map_err(|e| weft_runtime::Error::Usage(e.to_string())),
        |_| false,
    )?;
    let copy_gbs = 2.0 * (n * 2) as f64 / (median(&t).unwrap_or(f64::NAN) * 1e-3) / 1e9;
    drop((src, dst));
    println!(
        "{}, bf16, hq={} hkv={} d={D} page={}, Quest top_k {:.1}% of pages, sink 64, recent 64; copy {copy_gbs:.0} GB/s (read + write, {} MiB)",
        gpu.arch.name(),
        args.heads,
        args.kv_heads,
        args.page,
        args.keep * 100.0,
        args.copy_mib
    );
    println!(
        "| batch | context | dense ms | dense GB/s | of copy | Quest ms | Quest floor ms | of floor | speedup | per KV head ms | its floor ms | speedup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &ctx in &args.context {
        let pages = ctx.div_ceil(args.page);
        let kv_src = kv_source(&s, &args, ctx)?;
        for &batch in &args.batch {
            let cache_gib = cache_gib(&args, batch, ctx);
            if cache_gib > args.max_gib {
                println!("| {batch} | {ctx} | skipped: {cache_gib:.0} GiB of cache |  |  |  |  |  |  |  |  |  |");
                continue;
            }
            let mut cache = gpu.paged_cache(shape(&args, batch, pages))?;
            let dense_ms = time_steps(&args, &gpu, &mut cache, &kv_src, ctx, None)?;
            let (quest, kept_pages) = quest(&args, pages);
            let quest_ms = time_steps(&args, &gpu, &mut cache, &kv_src, ctx, Some(&quest))?;
            let shared = Retrieval { per: weft_dsl::Per::KvHead, ..quest.clone() };
            let shared_ms = time_steps(&args, &gpu, &mut cache, &kv_src, ctx, Some(&shared))?;
            let kv_bytes = (batch * ctx * args.kv_heads * D * 2 * 2) as f64;
            let dense_gbs = kv_bytes / (dense_ms * 1e-3) / 1e9;
            // Quest's floor: per query head, its KV head's page minima and maxima, and the kept
            // tokens' K and V (kept pages, sink and recent), at the copy bandwidth.
            let kept_tokens = (kept_pages * args.page + 128).min(ctx);
            let floor_bytes =
                (batch * args.heads) as f64 * ((pages * D * 2 * 2) as f64 + (kept_tokens * D * 2 * 2) as f64);
            let floor_ms = floor_bytes / (copy_gbs * 1e9) * 1e3;
            // Per KV head: each KV head's page metadata and kept K and V, read once for its heads.
            let shared_floor_ms = floor_ms * args.kv_heads as f64 / args.heads as f64;
            println!(
                "| {batch} | {ctx} | {dense_ms:.3} | {dense_gbs:.0} | {:.0}% | {quest_ms:.3} | {floor_ms:.3} | {:.2}x | {:.1}x | {shared_ms:.3} | {shared_floor_ms:.3} | {:.1}x |",
                100.0 * dense_gbs / copy_gbs,
                quest_ms / floor_ms,
                dense_ms / quest_ms,
                dense_ms / shared_ms
            );
        }
    }
    if args.host {
        host_table(&args, &gpu)?;
    }
    Ok(())
}

/// One sequence's K (and V): `[kv_heads, ctx, D]` of a fixed pattern.
fn kv_source(s: &Arc<CudaStream>, args: &Args, ctx: usize) -> Result<CudaSlice<u16>> {
    let x: Vec<u16> = (0..args.kv_heads * ctx * D)
        .map(|i| DType::Bf16.encode(&[((i * 7919) % 2001) as f32 / 1000.0 - 1.0])[0])
        .collect();
    Ok(s.clone_htod(&x)?)
}

/// GiB of K and V of `batch` sequences of `ctx` tokens.
fn cache_gib(args: &Args, batch: usize, ctx: usize) -> f64 {
    let pages = ctx.div_ceil(args.page);
    (batch * pages * args.page * args.kv_heads * D * 2 * 2) as f64 / (1u64 << 30) as f64
}

fn shape(args: &Args, batch: usize, pages: usize) -> PagedShape {
    PagedShape {
        batch,
        hq: args.heads,
        hkv: args.kv_heads,
        head_dim: D,
        page_size: args.page,
        max_pages: pages,
        dtype: DType::Bf16,
    }
}

/// Quest keeping `--keep` of `pages`, and how many pages that is.
fn quest(args: &Args, pages: usize) -> (Retrieval, usize) {
    let kept_pages = ((pages as f64 * args.keep).round() as usize).max(1);
    let r = Retrieval {
        unit: Unit::Page(args.page as u32),
        score: Score::MinMax,
        budget: Budget::TopK(kept_pages as u32),
        sink: 64,
        recent: 64,
        ..Retrieval::default()
    };
    (r, kept_pages)
}

/// Fills every sequence of `cache` with `kv_src` (unless it is already `ctx` long) and returns
/// the median milliseconds of a decode step with `r`, over `--reps` steps after a warm-up.
fn time_steps(
    args: &Args,
    gpu: &Gpu,
    cache: &mut PagedKvCache,
    kv_src: &CudaSlice<u16>,
    ctx: usize,
    r: Option<&Retrieval>,
) -> Result<f64> {
    let s = gpu.stream();
    let batch = cache.shape().batch;
    for b in 0..batch {
        if cache.lens()[b] != ctx {
            cache.fill(gpu, b, kv_src, kv_src, ctx)?;
        }
    }
    let q: Vec<u16> =
        (0..batch * args.heads * D).map(|i| DType::Bf16.encode(&[((i * 31) % 17) as f32 / 8.0 - 1.0])[0]).collect();
    let q = s.clone_htod(&q)?;
    let mut out = s.alloc_zeros::<u16>(batch * args.heads * D)?;
    let mut lse = s.alloc_zeros::<f32>(batch * args.heads)?;
    let scale = 1.0 / (D as f32).sqrt();
    let t = time_calls::<weft_runtime::Error>(
        s,
        3,
        args.reps,
        |_| cache.decode_step(gpu, &q, &mut out, &mut lse, r, scale, args.splits),
        |_| false,
    )?;
    Ok(median(&t).unwrap_or(f64::NAN))
}

/// Quest steps over caches in pinned host memory: with no hot pages (every kept page crosses
/// the bus: the floor is the kept bytes over the measured host-to-device bandwidth) and with a
/// hot page for every kept one (after the first step the kept pages are on the GPU: its hit
/// rate over the timed steps, whose queries repeat).
fn host_table(args: &Args, gpu: &Gpu) -> Result<()> {
    let s = gpu.stream().clone();
    let n = 256 * 1024 * 1024 / 2;
    // Safety: the pinned buffer is only copied from (its contents do not matter).
    let src = unsafe { s.context().alloc_pinned::<u16>(n) }?;
    let mut dst = s.alloc_zeros::<u16>(n)?;
    let t = time_calls::<weft_runtime::Error>(
        &s,
        2,
        args.reps,
        |_| s.memcpy_htod(&src, &mut dst).map_err(|e| weft_runtime::Error::Usage(e.to_string())),
        |_| false,
    )?;
    let bus_gbs = (n * 2) as f64 / (median(&t).unwrap_or(f64::NAN) * 1e-3) / 1e9;
    drop((src, dst));
    println!();
    println!("KV in pinned host memory; host-to-device copy {bus_gbs:.1} GB/s (256 MiB, pinned)");
    println!("| batch | context | hot pages | Quest ms | bus floor ms | of floor | hit rate |");
    println!("|---|---|---|---|---|---|---|");
    for &ctx in &args.context {
        let pages = ctx.div_ceil(args.page);
        let kv_src = kv_source(&s, args, ctx)?;
        for &batch in &args.batch {
            let cache_gib = cache_gib(args, batch, ctx);
            if cache_gib > args.host_max_gib {
                println!("| {batch} | {ctx} | skipped: {cache_gib:.0} GiB of cache |  |  |  |  |");
                continue;
            }
            let (quest, kept_pages) = quest(args, pages);
            let kept_tokens = (kept_pages * args.page + 128).min(ctx);
            // Each query head's kept pages of its KV head, over the bus (the heads of a group
            // may keep the same pages: this counts them once per head, an upper bound).
            let bus_bytes = (batch * args.heads * kept_tokens * D * 2 * 2) as f64;
            let floor_ms = bus_bytes / (bus_gbs * 1e9) * 1e3;
            for hot in [0, batch * args.heads * (kept_pages + 10)] {
                let mut cache = gpu.paged_cache_in_host(shape(args, batch, pages), hot)?;
                let ms = time_steps(args, gpu, &mut cache, &kv_src, ctx, Some(&quest))?;
                let hit = cache.hot_stats(gpu)?.map_or(0.0, |h| h.hit_rate());
                println!(
                    "| {batch} | {ctx} | {hot} | {ms:.3} | {floor_ms:.3} | {:.2}x | {:.0}% |",
                    ms / floor_ms,
                    100.0 * hit
                );
            }
        }
    }
    Ok(())
}
