//! `weft-bench`: times weft's generated attention kernels on the GPU and writes the same
//! inputs and masks for `bench/peers.py`, which times torch SDPA (flash, cuDNN) and
//! FlexAttention on them in the same run (`bench/run.sh` runs both).
//!
//! Cases (B = 1, H = 32, D = 128, bf16, non-causal):
//! - `dense`: every block full;
//! - `causal`: keys up to the query (the diagonal blocks masked), on the dense case's shapes;
//! - `block-10`, `block-3`: random 128 x 128 blocks, a fixed number per query block row
//!   (the diagonal always kept), FlexAttention's "random blocks" measurement;
//! - `vv-10`, `vv-3`: vertical vectors at token granularity: per 128-query block, the first 64
//!   keys, the 64-key blocks around the diagonal, and random single key columns;
//! - `cvv-10`, `cvv-3`: the same under a causal mask, a decoder's prefill (`causal & (sink(64) |
//!   local(64) | vertical_vector(q_block = 128))`): the band's blocks up to the diagonal (the
//!   diagonal ones masked), random columns before the query block, 10% / 3% of each row's
//!   visible keys.
//!
//! Indexes are built directly (random masks, not from Q/K), so the timing is of the attention
//! kernel alone. Timing: CUDA events (CU_EVENT_DEFAULT) around each launch, 3 warm-ups, the
//! median of 20; Q/K/V are 128 MiB or more each, beyond the 60 MB L2, so no rotation is needed.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::{builder, Pattern};
use weft_patterns::{build_index, IndexOptions, SparseIndex, Tensor, FULL};
use weft_runtime::timing::time_calls;
use weft_runtime::{AttnShape, Gpu};

#[derive(Parser)]
#[command(about = "Time weft's kernels and write inputs and masks for bench/peers.py")]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [16384usize, 65536])]
    seq: Vec<usize>,
    /// Heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Cases to run (dense, causal, block-10, block-3, vv-10, vv-3, cvv-10, cvv-3).
    #[arg(long, value_delimiter = ',', default_values_t = ["dense".to_string(), "causal".into(), "block-10".into(), "block-3".into(), "vv-10".into(), "vv-3".into(), "cvv-10".into(), "cvv-3".into()])]
    cases: Vec<String>,
    /// Where to write inputs, masks and timings.
    #[arg(long, default_value = "bench-data")]
    out: PathBuf,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Kernel shapes for the dense case, as BLOCK_MxBLOCK_NxWARP_ROWS[xSTAGES][w] (the first is
    /// reported to the peers' table; the others are printed for comparison; a trailing `w` is
    /// the Hopper wgmma path, e.g. 128x128x16x2w, `wp` the same with a producer warpgroup, and
    /// `wps` with its persistent grid too).
    /// Default: 128x128x16x2wp on sm_90 (H100, H200), 128x64x32 elsewhere.
    #[arg(long, value_delimiter = ',')]
    dense_configs: Vec<String>,
    /// Kernel shape for the block cases, in the same form: 128 query rows, and 64 or 128 keys
    /// (the index lists the 128 x 128 blocks as one or two entries). Default: 128x128x16x2wp on
    /// sm_90, 128x64x32 elsewhere.
    #[arg(long)]
    sparse_config: Option<String>,
    /// Kernel shape for the vertical-vector cases (their indexes have 128 x 64 blocks).
    /// Default: 128x64x16x2wp on sm_90, 128x64x32 elsewhere.
    #[arg(long)]
    vv_config: Option<String>,
}

fn parse_config(s: &str) -> Result<KernelConfig> {
    // A trailing `w` asks for the Hopper (wgmma) path: e.g. 128x128x16x2w; `wp` for it with a
    // producer warpgroup (KernelConfig::producer), `wps` with its persistent grid as well.
    let (s, wgmma, producer, persistent) = if let Some(rest) = s.strip_suffix("wps") {
        (rest, true, true, true)
    } else if let Some(rest) = s.strip_suffix("wp") {
        (rest, true, true, false)
    } else if let Some(rest) = s.strip_suffix('w') {
        (rest, true, false, false)
    } else {
        (s, false, false, false)
    };
    let parts: Vec<u32> = s
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("BLOCK_MxBLOCK_NxWARP_ROWS[xSTAGES][w|wp|wps]")?;
    let (bm, bn, wr, stages) = match parts[..] {
        [bm, bn, wr] => (bm, bn, wr, 2),
        [bm, bn, wr, st] => (bm, bn, wr, st),
        _ => anyhow::bail!("expected BLOCK_MxBLOCK_NxWARP_ROWS[xSTAGES][w|wp|wps], got {s}"),
    };
    let c = KernelConfig {
        warp_rows: wr,
        stages,
        wgmma,
        producer,
        persistent,
        ..KernelConfig::for_blocks(bm as usize, bn as usize, D as u32, DType::Bf16)
    };
    c.validate()?;
    Ok(c)
}

const D: usize = 128;

struct Case {
    name: String,
    index: SparseIndex,
    /// Per (head, 128-query block): the kept 128-key blocks (block cases).
    blocks128: Option<Vec<Vec<u32>>>,
    /// Per 64-query block: the random columns (vv cases; the same for every head).
    columns: Option<Vec<Vec<u32>>>,
}

fn empty_index(heads: usize, n: usize) -> SparseIndex {
    SparseIndex::empty(heads, n, n, 64, 64)
}

fn push_row(ix: &mut SparseIndex, blocks: &[u32], cols: &[u32]) {
    ix.block_idx.extend_from_slice(blocks);
    ix.block_mask.extend(blocks.iter().map(|_| FULL));
    ix.col_idx.extend_from_slice(cols);
    ix.col_mask.extend(cols.iter().map(|_| FULL));
    ix.block_ptr.push(ix.block_idx.len() as u32);
    ix.col_ptr.push(ix.col_idx.len() as u32);
}

fn dense(heads: usize, n: usize, bm: usize, bn: usize) -> Case {
    let mut ix = SparseIndex { block_m: bm, block_n: bn, ..empty_index(heads, n) };
    let all: Vec<u32> = (0..n.div_ceil(bn) as u32).collect();
    for _ in 0..heads * n.div_ceil(bm) {
        push_row(&mut ix, &all, &[]);
    }
    Case { name: "dense".into(), index: ix, blocks128: None, columns: None }
}

/// Causal attention: the CPU builder's index of `causal` at these blocks for one head (a
/// static pattern: the inputs only give the shape), repeated for every head.
fn causal(heads: usize, n: usize, bm: usize, bn: usize) -> Result<Case> {
    let (q, k) = (Tensor::random(1, n, 16, 1), Tensor::random(1, n, 16, 2));
    let opts = IndexOptions { block_m: Some(bm), block_n: Some(bn), ..Default::default() };
    let one = build_index(&builder::causal(), &q, &k, &opts)?;
    let mut ix = SparseIndex { block_m: bm, block_n: bn, masks: one.masks, ..empty_index(heads, n) };
    for _ in 0..heads {
        for r in 0..n.div_ceil(bm) {
            let (b0, b1) = (one.block_ptr[r] as usize, one.block_ptr[r + 1] as usize);
            ix.block_idx.extend_from_slice(&one.block_idx[b0..b1]);
            ix.block_mask.extend_from_slice(&one.block_mask[b0..b1]);
            ix.block_ptr.push(ix.block_idx.len() as u32);
            ix.col_ptr.push(ix.col_idx.len() as u32);
        }
    }
    Ok(Case { name: "causal".into(), index: ix, blocks128: None, columns: None })
}

/// Random 128 x 128 blocks, `density` of each query block row (the diagonal always kept), as
/// an index of 128-row query blocks and `block_n`-key entries (64 or 128).
fn random_blocks(heads: usize, n: usize, density: f64, seed: u64, block_n: usize) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nb = n / 128;
    let per_row = ((density * nb as f64).round() as usize).max(1);
    let mut ix = SparseIndex { block_m: 128, block_n, ..empty_index(heads, n) };
    let per_block = (128 / block_n) as u32;
    let mut kept = Vec::new();
    for _h in 0..heads {
        for qb in 0..nb {
            let mut others: Vec<u32> = (0..nb as u32).filter(|b| *b != qb as u32).collect();
            others.shuffle(&mut rng);
            let mut row: Vec<u32> = others[..per_row - 1].to_vec();
            row.push(qb as u32);
            row.sort_unstable();
            let entries: Vec<u32> = row.iter().flat_map(|b| (0..per_block).map(move |i| per_block * b + i)).collect();
            push_row(&mut ix, &entries, &[]);
            kept.push(row);
        }
    }
    Case { name: format!("block-{}", (density * 100.0).round()), index: ix, blocks128: Some(kept), columns: None }
}

/// Vertical vectors over 128-query blocks: the sink (keys 0..64), the 64-key blocks covering
/// the diagonal band (2qb - 1, 2qb, 2qb + 1) as full blocks, and random single columns up to
/// `density` of the keys; the same columns for every head.
fn vertical_vectors(heads: usize, n: usize, density: f64, seed: u64) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nqb = n / 128;
    let nkb = (n / 64) as u32;
    let target = (density * n as f64).round() as usize;
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for qb in 0..nqb as u32 {
        let mut blocks: Vec<u32> = [0, (2 * qb).saturating_sub(1), 2 * qb, (2 * qb + 1).min(nkb - 1)].to_vec();
        blocks.sort_unstable();
        blocks.dedup();
        let want = target.saturating_sub(blocks.len() * 64);
        let mut cols = std::collections::BTreeSet::new();
        while cols.len() < want {
            let c = rng.random_range(0..n as u32);
            if !blocks.contains(&(c / 64)) {
                cols.insert(c);
            }
        }
        let cols: Vec<u32> = cols.into_iter().collect();
        rows.push((blocks, cols.clone()));
        columns.push(cols);
    }
    let mut ix = SparseIndex { block_m: 128, ..empty_index(heads, n) };
    for _h in 0..heads {
        for (blocks, cols) in &rows {
            push_row(&mut ix, blocks, cols);
        }
    }
    Case { name: format!("vv-{}", (density * 100.0).round()), index: ix, blocks128: None, columns: Some(columns) }
}

/// Causal vertical vectors over 128-query blocks: of the causal index at 128 x 64 (its diagonal
/// blocks masked), the sink block and the band's blocks (2qb - 1, 2qb, 2qb + 1) up to the
/// diagonal, and random single columns before the query block up to `density` of the row's
/// visible keys (128 qb + 128); the same for every head.
fn causal_vertical_vectors(heads: usize, n: usize, density: f64, seed: u64) -> Result<Case> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let one = causal(1, n, 128, 64)?.index;
    let mut ix = SparseIndex { block_m: 128, masks: one.masks.clone(), ..empty_index(heads, n) };
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    for qb in 0..n.div_ceil(128) {
        let (b0, b1) = (one.block_ptr[qb] as usize, one.block_ptr[qb + 1] as usize);
        let band = [0, (2 * qb as u32).saturating_sub(1), 2 * qb as u32, 2 * qb as u32 + 1];
        let kept: Vec<(u32, u16)> = (b0..b1)
            .filter(|&e| band.contains(&one.block_idx[e]))
            .map(|e| (one.block_idx[e], one.block_mask[e]))
            .collect();
        let want = ((density * (128 * qb + 128).min(n) as f64).round() as usize).saturating_sub(kept.len() * 64);
        let before = 128 * qb as u32;
        let free = (0..before).filter(|c| !band.contains(&(c / 64))).count();
        let mut cols = std::collections::BTreeSet::new();
        while cols.len() < want.min(free) {
            let c = rng.random_range(0..before.max(1));
            if c < before && !band.contains(&(c / 64)) {
                cols.insert(c);
            }
        }
        let cols: Vec<u32> = cols.into_iter().collect();
        columns.push(cols.clone());
        rows.push((kept, cols));
    }
    for _h in 0..heads {
        for (kept, cols) in &rows {
            ix.block_idx.extend(kept.iter().map(|(b, _)| *b));
            ix.block_mask.extend(kept.iter().map(|(_, m)| *m));
            ix.col_idx.extend_from_slice(cols);
            ix.col_mask.extend(cols.iter().map(|_| FULL));
            ix.block_ptr.push(ix.block_idx.len() as u32);
            ix.col_ptr.push(ix.col_idx.len() as u32);
        }
    }
    Ok(Case { name: format!("cvv-{}", (density * 100.0).round()), index: ix, blocks128: None, columns: Some(columns) })
}

/// Rows padded to the longest with 0 (key 0 is always kept: the sink), row-major.
fn write_u32(path: &Path, rows: &[Vec<u32>]) -> Result<()> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        for i in 0..width {
            f.write_all(&r.get(i).copied().unwrap_or(0).to_le_bytes())?;
        }
    }
    Ok(f.flush()?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let gpu = Gpu::open(0)?;
    eprintln!("GPU {} ({}, {} SMs)", gpu.name, gpu.arch.name(), gpu.sm_count);
    let mut results = std::fs::File::create(args.out.join("ours.jsonl"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let h = args.heads;
    // The kernels of each case, the same at every length (checked before any input is made).
    // Defaults: the fastest measured shapes for this GPU (docs/PERF.md).
    let hopper = gpu.arch.sm == 90;
    let widest = if hopper { "128x128x16x2wp" } else { "128x64x32" };
    let dense_configs =
        if args.dense_configs.is_empty() { vec![widest.to_string()] } else { args.dense_configs.clone() };
    let configs: Vec<KernelConfig> = dense_configs.iter().map(|c| parse_config(c)).collect::<Result<_>>()?;
    let sparse_config = args.sparse_config.clone().unwrap_or_else(|| widest.to_string());
    let sparse = parse_config(&sparse_config)?;
    if sparse.block_m != 128 || ![64, 128].contains(&sparse.block_n) {
        anyhow::bail!("--sparse-config: the block cases need 128 x 64 or 128 x 128 tiles, got {sparse_config}");
    }
    let vv_config =
        args.vv_config.clone().unwrap_or_else(|| (if hopper { "128x64x16x2wp" } else { "128x64x32" }).into());
    let vv = parse_config(&vv_config)?;
    if (vv.block_m, vv.block_n) != (128, 64) {
        anyhow::bail!("--vv-config: the vertical-vector indexes have 128 x 64 blocks, got {vv_config}");
    }
    let mut runs: Vec<(String, KernelConfig)> = Vec::new();
    for case_name in &args.cases {
        if case_name == "dense" || case_name == "causal" {
            // Variants first, the reported config last so its output stays in `out`.
            for c in configs.iter().skip(1) {
                runs.push((format!("{case_name}-variant"), *c));
            }
            runs.push((case_name.clone(), configs[0]));
        } else if case_name.starts_with("vv-") || case_name.starts_with("cvv-") {
            runs.push((case_name.clone(), vv));
        } else {
            runs.push((case_name.clone(), sparse));
        }
    }
    for &n in &args.seq {
        // Inputs: N(0, 1) bf16, written once per length for the peers.
        let gen = |rng: &mut rand::rngs::StdRng| -> Vec<u16> {
            (0..h * n * D)
                .map(|_| {
                    let x: f32 = rng.sample(rand_distr::StandardNormal);
                    half::bf16::from_f32(x).to_bits()
                })
                .collect()
        };
        let (q, k, v) = (gen(&mut rng), gen(&mut rng), gen(&mut rng));
        for (name, data) in [("q", &q), ("k", &k), ("v", &v)] {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(args.out.join(format!("{name}_{n}.bf16")), bytes)?;
        }
        let s = gpu.stream();
        let (qd, kd, vd) = (s.clone_htod(&q)?, s.clone_htod(&k)?, s.clone_htod(&v)?);
        let mut out = s.alloc_zeros::<u16>(h * n * D)?;
        let mut lse = s.alloc_zeros::<f32>(h * n)?;
        for (case_name, config) in &runs {
            let case = match case_name.as_str() {
                "dense" | "dense-variant" => dense(h, n, config.block_m as usize, config.block_n as usize),
                "causal" | "causal-variant" => causal(h, n, config.block_m as usize, config.block_n as usize)?,
                "block-10" => random_blocks(h, n, 0.10, n as u64, config.block_n as usize),
                "block-3" => random_blocks(h, n, 0.03, n as u64 + 1, config.block_n as usize),
                "vv-10" => vertical_vectors(h, n, 0.10, n as u64 + 2),
                "vv-3" => vertical_vectors(h, n, 0.03, n as u64 + 3),
                "cvv-10" => causal_vertical_vectors(h, n, 0.10, n as u64 + 4)?,
                "cvv-3" => causal_vertical_vectors(h, n, 0.03, n as u64 + 5)?,
                other => anyhow::bail!("unknown case `{other}`"),
            };
            let ix = &case.index;
            let pairs = ix.pairs();
            let density = pairs as f64 / (h as f64 * n as f64 * n as f64);
            // The kernel is generated as for the pattern the index stands for (the runtime
            // passes the user's pattern): vertical vectors gather columns, the rest do not.
            let vv = || builder::sink(64) | builder::local(64) | builder::vertical_vector().q_block(128);
            let expr = if case.name.starts_with("cvv") {
                builder::causal() & vv()
            } else if case.columns.is_some() {
                vv()
            } else if case.name == "causal" {
                builder::causal()
            } else {
                builder::full()
            };
            let pattern = Pattern::new(&case.name, expr);
            // (The residual predicates of partial blocks: the causal case's diagonal.)
            let masks = &case.index.masks;
            let config = *config;
            let kernel = emit(&KernelSpec { pattern: &pattern, masks, permutation: None, config })?;
            let dix = gpu.upload_index(ix)?;
            let shape = AttnShape { hq: h, hkv: h, nq: n, nk: n, head_dim: D };
            let scale = 1.0 / (D as f32).sqrt();
            let mut times = time_calls(
                s,
                3,
                args.reps,
                |_| gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale),
                |_| false,
            )?;
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let tflops = 4.0 * pairs as f64 * D as f64 / (ms * 1e-3) / 1e12;
            eprintln!(
                "weft {:<9} N={n:<6} [{config}] density={:.4} median={ms:.3} ms (min {:.3}, max {:.3}) {tflops:.0} TFLOP/s",
                case.name,
                density,
                times[0],
                times[times.len() - 1]
            );
            if case_name.ends_with("-variant") {
                continue;
            }
            writeln!(
                results,
                "{}",
                serde_json::json!({"case": case.name, "n": n, "heads": h, "density": density, "pairs": pairs,
                    "ms": ms, "ms_min": times[0], "ms_max": times[times.len()-1], "tflops": tflops})
            )?;
            // Masks for the peers, and our output of the dense case for a cross-check.
            if let Some(b) = &case.blocks128 {
                write_u32(&args.out.join(format!("{}_{n}.u32", case.name)), b)?;
            }
            if let Some(c) = &case.columns {
                write_u32(&args.out.join(format!("{}_{n}.u32", case.name)), c)?;
            }
            if case.name == "dense" && n <= 16384 {
                let o = s.clone_dtoh(&out)?;
                let bytes: Vec<u8> = o.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(args.out.join(format!("out_dense_{n}.bf16")), bytes).context("writing our output")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_case_covers_each_key_up_to_the_query_for_every_head() {
        for (n, bm, bn) in [(300, 64, 64), (1000, 128, 128), (257, 128, 64)] {
            let c = causal(3, n, bm, bn).unwrap();
            assert_eq!(c.index.pairs(), 3 * (n * (n + 1) / 2) as u64, "n={n} {bm}x{bn}");
            assert_eq!(c.index.block_ptr.len(), 3 * n.div_ceil(bm) + 1);
            assert!(!c.index.masks.is_empty(), "the diagonal blocks need the causal predicate");
        }
    }

    #[test]
    fn causal_vertical_vectors_keep_only_visible_keys_at_about_their_density() {
        let n = 4096;
        for density in [0.10, 0.03] {
            let c = causal_vertical_vectors(2, n, density, 5).unwrap();
            let ix = &c.index;
            // Every kept pair is causal: the index's pairs are the dense mask's, under causality.
            let mut visible = 0u64;
            for h in 0..2 {
                for q in 0..n {
                    for k in 0..n {
                        if ix.contains_token(h, q, k) {
                            assert!(k <= q, "density {density}: head {h} keeps ({q}, {k})");
                            visible += 1;
                        }
                    }
                }
            }
            assert_eq!(visible, ix.pairs());
            // The causal area's share: at least the target; above it where the sink and the band
            // alone (256 keys a row) exceed it, which at 4096 tokens is most rows at 3%.
            let share = ix.pairs() as f64 / (2.0 * (n * (n + 1) / 2) as f64);
            assert!(share >= 0.98 * density && share < density + 0.10, "density {density}: {share:.3}");
            // The same columns for every head, before their query block.
            let cols = c.columns.as_ref().unwrap();
            for (qb, row) in cols.iter().enumerate() {
                assert!(row.iter().all(|&c| (c as usize) < 128 * qb), "row {qb}");
            }
        }
    }
}
