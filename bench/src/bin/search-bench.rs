//! Times the pattern search: `layers` x `heads` synthetic heads (planted vertical, slash,
//! grid, block and dense structure in turn) of `seq` tokens and head dim `dim`, with recall
//! computed on the CPU or (`--gpu`) by generated kernels on GPU 0. With `--compare`, both run
//! on every layer and the largest recall difference is printed.
//!
//!     cargo run --release -p weft-bench --bin search-bench -- --layers 1 --heads 32 --seq 16384 --dim 128

use std::time::Instant;

use clap::Parser;
use weft_autotune::search::{candidates, choose_by_recall, evaluate_layer_on, sample_rows, Backend};
use weft_patterns::synthetic::{planted_qk, Plant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 16384)]
    seq: usize,
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Recall on the GPU.
    #[arg(long)]
    gpu: bool,
    /// Run the CPU and the GPU on every layer and compare their scores.
    #[arg(long)]
    compare: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // WEFT_LOG=debug prints each candidate's index-building and GPU times.
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let plants: Vec<Plant> = (0..a.heads)
        .map(|h| match h % 5 {
            0 => Plant::Vertical(vec![7, a.seq / 3, a.seq / 2, a.seq - 9]),
            1 => Plant::Slashes(vec![300, a.seq / 4]),
            2 => Plant::Grid { stride: 32, phase: 3 },
            3 => Plant::Blocks { size: 64 },
            _ => Plant::Dense,
        })
        .collect();
    let cands = candidates(a.seq, true);
    let rows = sample_rows(a.seq);
    let threads = rayon::current_num_threads();
    println!("{} candidates, {} sampled rows per head, {threads} threads", cands.len(), rows.len());
    let gpu = if a.gpu || a.compare { Some(weft_runtime::Gpu::open(0)?) } else { None };
    let backend = gpu.as_ref().map_or(Backend::Cpu, Backend::Gpu);
    println!("recall on the {}", if gpu.is_some() { "GPU" } else { "CPU" });
    let total = Instant::now();
    let mut all = Vec::new();
    for l in 0..a.layers {
        let (mut q, mut k) = planted_qk(&plants, a.seq, a.dim, 16.0, l as u64);
        // bf16 values, so the CPU and the GPU see the same inputs.
        for t in [&mut q, &mut k] {
            t.data = weft_codegen::DType::Bf16.decode(&weft_codegen::DType::Bf16.encode(&t.data));
        }
        let t = Instant::now();
        let scores = evaluate_layer_on(backend, l, &q, &k, &cands, true, &rows, &|| {})?;
        println!("layer {l}: {:.1} s for {} heads", t.elapsed().as_secs_f64(), a.heads);
        if a.compare {
            let t = Instant::now();
            let cpu = evaluate_layer_on(Backend::Cpu, l, &q, &k, &cands, true, &rows, &|| {})?;
            let (mut recall, mut density) = (0f64, 0f64);
            for (g, c) in scores.iter().zip(&cpu) {
                for (gs, cs) in g.scores.iter().zip(&c.scores) {
                    recall = recall.max((gs.recall - cs.recall).abs());
                    density = density.max((gs.density - cs.density).abs());
                }
            }
            println!(
                "layer {l}: CPU {:.1} s; GPU vs CPU over {} heads x {} candidates: max |recall diff| {recall:.2e}, max |density diff| {density:.2e}",
                t.elapsed().as_secs_f64(),
                a.heads,
                cands.len()
            );
        }
        all.extend(scores);
    }
    let chosen = choose_by_recall(&all, &cands, 0.95);
    let secs = total.elapsed().as_secs_f64();
    println!("{} heads in {secs:.1} s ({:.2} s per head)", chosen.len(), secs / chosen.len() as f64);
    let fams: Vec<&str> = chosen.iter().take(10).map(|c| c.family.as_str()).collect();
    println!("first choices: {fams:?}");
    Ok(())
}
