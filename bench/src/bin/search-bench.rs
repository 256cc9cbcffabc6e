//! Times the pattern search on the CPU: `layers` x `heads` synthetic heads (planted vertical,
//! slash, grid, block and dense structure in turn) of `seq` tokens and head dim `dim`.
//!
//!     cargo run --release -p weft-bench --bin search-cpu -- --layers 1 --heads 32 --seq 16384 --dim 128

use std::time::Instant;

use clap::Parser;
use weft_autotune::search::{candidates, choose_by_recall, evaluate_layer, sample_rows};
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
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
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
    let total = Instant::now();
    let mut all = Vec::new();
    for l in 0..a.layers {
        let (q, k) = planted_qk(&plants, a.seq, a.dim, 16.0, l as u64);
        let t = Instant::now();
        all.extend(evaluate_layer(l, &q, &k, &cands, true, &rows, &|| {})?);
        println!("layer {l}: {:.1} s for {} heads", t.elapsed().as_secs_f64(), a.heads);
    }
    let chosen = choose_by_recall(&all, &cands, 0.95);
    let secs = total.elapsed().as_secs_f64();
    println!("{} heads in {secs:.1} s ({:.2} s per head)", chosen.len(), secs / chosen.len() as f64);
    let fams: Vec<&str> = chosen.iter().take(10).map(|c| c.family.as_str()).collect();
    println!("first choices: {fams:?}");
    Ok(())
}
