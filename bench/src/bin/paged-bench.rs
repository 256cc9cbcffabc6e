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
//! bandwidth) and its speedup over the dense step. Times are CUDA-event medians of `--reps`
//! steps after a warm-up; a step is `retrieve` + `attend` + the merge (dense: `attend` + merge).

use anyhow::{Context, Result};
use clap::Parser;
use weft_codegen::DType;
use weft_dsl::{Budget, Retrieval, Score, Unit};
use weft_runtime::timing::{median, time_calls};
use weft_runtime::{Gpu, PagedShape};

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
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gpu = Gpu::open(0).context("opening the GPU")?;
    let s = gpu.stream().clone();
    let d = 128usize;
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
        "{}, bf16, hq={} hkv={} d={d} page={}, Quest top_k {:.1}% of pages, sink 64, recent 64; copy {copy_gbs:.0} GB/s (read + write, {} MiB)",
        gpu.arch.name(),
        args.heads,
        args.kv_heads,
        args.page,
        args.keep * 100.0,
        args.copy_mib
    );
    println!("| batch | context | dense ms | dense GB/s | of copy | Quest ms | Quest floor ms | of floor | speedup |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &ctx in &args.context {
        let pages = ctx.div_ceil(args.page);
        let kv_src = {
            let x: Vec<u16> = (0..args.kv_heads * ctx * d)
                .map(|i| DType::Bf16.encode(&[((i * 7919) % 2001) as f32 / 1000.0 - 1.0])[0])
                .collect();
            s.clone_htod(&x)?
        };
        for &batch in &args.batch {
            let cache_bytes = (batch * pages * args.page * args.kv_heads * d * 2 * 2) as f64;
            if cache_bytes / (1u64 << 30) as f64 > args.max_gib {
                println!(
                    "| {batch} | {ctx} | skipped: {:.0} GiB of cache |  |  |  |  |  |  |",
                    cache_bytes / (1u64 << 30) as f64
                );
                continue;
            }
            let shape = PagedShape {
                batch,
                hq: args.heads,
                hkv: args.kv_heads,
                head_dim: d,
                page_size: args.page,
                max_pages: pages,
                dtype: DType::Bf16,
            };
            let mut cache = gpu.paged_cache(shape)?;
            for b in 0..batch {
                cache.fill(&gpu, b, &kv_src, &kv_src, ctx)?;
            }
            let q: Vec<u16> = (0..batch * args.heads * d)
                .map(|i| DType::Bf16.encode(&[((i * 31) % 17) as f32 / 8.0 - 1.0])[0])
                .collect();
            let q = s.clone_htod(&q)?;
            let mut out = s.alloc_zeros::<u16>(batch * args.heads * d)?;
            let mut lse = s.alloc_zeros::<f32>(batch * args.heads)?;
            let scale = 1.0 / (d as f32).sqrt();
            let mut step = |r: Option<&Retrieval>| -> Result<f64> {
                let t = time_calls::<weft_runtime::Error>(
                    &s,
                    3,
                    args.reps,
                    |_| cache.decode_step(&gpu, &q, &mut out, &mut lse, r, scale, args.splits),
                    |_| false,
                )?;
                Ok(median(&t).unwrap_or(f64::NAN))
            };
            let dense_ms = step(None)?;
            let kept_pages = ((pages as f64 * args.keep).round() as usize).max(1);
            let quest = Retrieval {
                unit: Unit::Page(args.page as u32),
                score: Score::MinMax,
                budget: Budget::TopK(kept_pages as u32),
                sink: 64,
                recent: 64,
            };
            let quest_ms = step(Some(&quest))?;
            let kv_bytes = (batch * ctx * args.kv_heads * d * 2 * 2) as f64;
            let dense_gbs = kv_bytes / (dense_ms * 1e-3) / 1e9;
            // Quest's floor: per query head, its KV head's page minima and maxima, and the kept
            // tokens' K and V (kept pages, sink and recent), at the copy bandwidth.
            let kept_tokens = (kept_pages * args.page + 128).min(ctx);
            let floor_bytes =
                (batch * args.heads) as f64 * ((pages * d * 2 * 2) as f64 + (kept_tokens * d * 2 * 2) as f64);
            let floor_ms = floor_bytes / (copy_gbs * 1e9) * 1e3;
            println!(
                "| {batch} | {ctx} | {dense_ms:.3} | {dense_gbs:.0} | {:.0}% | {quest_ms:.3} | {floor_ms:.3} | {:.2}x | {:.1}x |",
                100.0 * dense_gbs / copy_gbs,
                quest_ms / floor_ms,
                dense_ms / quest_ms
            );
        }
    }
    Ok(())
}
