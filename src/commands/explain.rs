//! `weft explain` and `weft mask`, and the synthetic or captured (--qk) input they share.

use std::path::Path;

use anyhow::{bail, Context, Result};
use weft::analysis::{AnalysisOptions, Report, UniverseChoice};
use weft::dsl::Pattern;
use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{Tensor, Universe};

use super::args::{InputArgs, Synthetic, UniverseArg};
use super::MAX_SEQ;

/// Largest side of a block-map picture.
const MAX_PX: usize = 16384;

pub(crate) struct Input {
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) description: String,
}

fn synthetic_plants(heads: usize, n: usize, d: usize) -> Vec<Plant> {
    (0..heads)
        .map(|h| match h % 4 {
            0 => Plant::Vertical((0..8).map(|i| (i * 997 + 13) % n.max(1)).collect()),
            1 => Plant::Diagonal(d.min(64)),
            2 => Plant::Grid { stride: 16.min(d), phase: 5 },
            _ => Plant::Dense,
        })
        .collect()
}

pub(crate) fn make_input(args: &InputArgs, pattern: &Pattern) -> Result<Input> {
    if let Some(path) = &args.qk {
        let (q, k) = weft::qk::load(path, args.layer)?;
        let description = format!(
            "{}: q [{}, {}, {}], k [{}, {}, {}]",
            path.display(),
            q.heads,
            q.tokens,
            q.dim,
            k.heads,
            k.tokens,
            k.dim
        );
        // A file is as bounded as synthetic input: its lengths pass the same checks.
        check_pairs(q.heads, q.tokens, k.tokens)?;
        return Ok(Input { q, k, description });
    }
    let n = args.seq;
    let nq = args.queries.unwrap_or(if pattern.expr.contains_retrieval() { 1 } else { n });
    let kvh = args.kv_heads.unwrap_or(args.heads);
    if n == 0 || nq == 0 || args.heads == 0 || kvh == 0 || args.head_dim == 0 {
        bail!("--seq, --queries, --heads, --kv-heads and --head-dim must be at least 1");
    }
    if args.heads % kvh != 0 {
        bail!("--kv-heads {kvh} must divide --heads {}", args.heads);
    }
    if nq > n {
        bail!("--queries {nq} is larger than --seq {n}: queries are the last tokens of the sequence");
    }
    if n > MAX_SEQ {
        bail!("--seq {n} is over {MAX_SEQ} tokens, more than the CPU reference handles here");
    }
    check_pairs(args.heads, nq, n)?;
    // Planted inputs hold Q and K of every head over all tokens, then the K heads kept.
    let floats = (args.head_dim as u128) * (n as u128) * (2 * args.heads as u128 + kvh as u128);
    if floats * 4 > MAX_INPUT_BYTES as u128 {
        bail!(
            "synthetic Q/K of {} heads x {n} tokens x head dim {} need {:.1} GiB (at most {} GiB here); lower --heads, \
             --seq or --head-dim",
            args.heads,
            args.head_dim,
            (floats * 4) as f64 / (1u64 << 30) as f64,
            MAX_INPUT_BYTES >> 30
        );
    }
    let (q, k, what) = match args.synthetic {
        Synthetic::Planted => {
            let plants = synthetic_plants(args.heads, n, args.head_dim);
            let (q_all, k_all) = planted_qk(&plants, n, args.head_dim, 8.0, args.seed);
            // Queries are the last nq tokens; K/V heads are the first of each GQA group.
            let q = q_all.slice_tokens(n - nq, n);
            let group = args.heads / kvh;
            let mut k = Tensor::zeros(kvh, n, args.head_dim);
            for h in 0..kvh {
                for t in 0..n {
                    k.row_mut(h, t).copy_from_slice(k_all.row(h * group, t));
                }
            }
            (q, k, "synthetic planted Q/K (vertical, diagonal, grid, dense heads)")
        }
        Synthetic::Random => (
            Tensor::random(args.heads, nq, args.head_dim, args.seed),
            Tensor::random(kvh, n, args.head_dim, args.seed + 1),
            "synthetic Gaussian Q/K",
        ),
    };
    let description = format!(
        "{what}: {} query heads, {kvh} kv heads, {nq} queries x {n} keys, head dim {}, seed {}",
        args.heads, args.head_dim, args.seed
    );
    Ok(Input { q, k, description })
}

/// The most memory synthetic Q/K may take.
const MAX_INPUT_BYTES: usize = 4 << 30;

/// The CPU reference walks every (head, query, key) pair: refuse problems past 2^36 pairs.
fn check_pairs(heads: usize, nq: usize, nk: usize) -> Result<()> {
    if nk > MAX_SEQ {
        bail!("{nk} tokens are over {MAX_SEQ}, more than the CPU reference handles here");
    }
    if (nq as u128) * (nk as u128) * (heads as u128) > 1 << 36 {
        bail!("{heads} heads x {nq} x {nk} pairs is too large for the CPU reference; lower --seq or --heads");
    }
    Ok(())
}

pub(crate) fn analyse(pattern: &Pattern, input: &Input, args: &InputArgs) -> Result<Report> {
    let universe = match args.universe {
        UniverseArg::Auto => UniverseChoice::Auto,
        UniverseArg::All => UniverseChoice::All,
        UniverseArg::Causal => UniverseChoice::Causal,
    };
    let opts =
        AnalysisOptions { block_m: args.block_m, block_n: args.block_n, universe, recall_rows: args.recall_rows };
    // Long inputs take a while (an index over every row, then recall): a spinner on a terminal
    // says what is running, from the first second.
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!(
        "building the index of {} over {} x {} tokens, then measuring recall",
        pattern.name, input.q.tokens, input.k.tokens
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let r = weft::analysis::analyse(pattern, &input.q, &input.k, &opts);
    spinner.finish_and_clear();
    Ok(r?)
}

pub(crate) fn explain(pattern: &Pattern, args: &InputArgs, json: bool) -> Result<()> {
    let valid = pattern.validate();
    if let (true, Err(e)) = (json, &valid) {
        println!("{}", serde_json::to_string_pretty(&weft::analysis::invalid_json(pattern, e))?);
        bail!("the pattern is invalid");
    }
    if !json {
        println!("pattern   {}", pattern.name);
        println!("text      {pattern}");
        println!("canonical {}", pattern.canonical());
        println!("hash      {}", pattern.hash());
        match &valid {
            Ok(()) => println!("valid     yes"),
            Err(e) => {
                println!("valid     no");
                return Err(anyhow::anyhow!("{e}"));
            }
        }
    }
    let input = make_input(args, pattern)?;
    let r = analyse(pattern, &input, args)?;
    let (full, partial, cols) = r.index.entry_counts();
    if json {
        let out = r.to_json(pattern, &input.description);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("ir        {}", serde_json::to_string(&pattern.expr)?);
    println!("input     {}", input.description);
    println!("layout    block_m = {}, block_n = {}", r.index.block_m, r.index.block_n);
    println!(
        "index     built in {:.1} ms: {full} full blocks, {partial} partial blocks, {cols} columns, {} mask predicate(s)",
        r.build_ms,
        r.index.masks.len()
    );
    for (i, m) in r.index.masks.iter().enumerate() {
        println!("  mask {i}  {m}");
    }
    if r.row_lines.iter().any(|ls| !ls.is_empty()) {
        // Row-line masks name the line rows' offset in their query block, not the phase.
        let phases: Vec<String> = r
            .row_lines
            .iter()
            .map(|ls| ls.iter().map(|(s, p)| format!("{p} of {s}")).collect::<Vec<_>>().join(" + "))
            .collect();
        println!(
            "row lines q % stride == phase, phase estimated per head: {} (masks `q % {} == r` name a line row's offset in its query block)",
            phases.join(", "),
            r.index.block_m
        );
    }
    if r.universe == Universe::All {
        println!(
            "density   {:.2}% of all pairs (per head: {})",
            100.0 * r.density,
            r.density_per_head.iter().map(|d| format!("{:.1}%", 100.0 * d)).collect::<Vec<_>>().join(", ")
        );
    } else {
        // The share `weft search` reports, then the share of every pair.
        println!(
            "density   {:.2}% of causal pairs, {:.2}% of all pairs (per head, of causal pairs: {})",
            100.0 * r.universe_density(),
            100.0 * r.density,
            r.universe_density_per_head.iter().map(|d| format!("{:.1}%", 100.0 * d)).collect::<Vec<_>>().join(", ")
        );
    }
    println!(
        "recall    {:.2}% mean, {:.2}% worst row, of the {} softmax mass ({} rows per head; per head: {})",
        100.0 * r.recall.mean,
        100.0 * r.recall.min,
        match r.universe {
            Universe::All => "bidirectional",
            Universe::Causal => "causal",
        },
        r.recall.rows,
        r.recall.per_head.iter().map(|d| format!("{:.1}%", 100.0 * d)).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

pub(crate) fn mask(
    pattern: &Pattern,
    args: &InputArgs,
    head: usize,
    png: Option<&Path>,
    npy: Option<&Path>,
    px: usize,
) -> Result<()> {
    if png.is_none() && npy.is_none() {
        bail!("nothing to write: give --png FILE and/or --npy FILE");
    }
    if px == 0 || px > MAX_PX {
        bail!("--px must be between 1 and {MAX_PX}, got {px}");
    }
    let input = make_input(args, pattern)?;
    if head >= input.q.heads {
        bail!("--head {head} is out of range: the input has {} query heads", input.q.heads);
    }
    if npy.is_some() && input.q.tokens.max(input.k.tokens) > 8192 {
        bail!(
            "--npy writes a dense [queries, keys] mask and is limited to 8192 tokens; use --png for longer sequences"
        );
    }
    let r = analyse(pattern, &input, args)?;
    let slice = &r.index;
    if let Some(path) = png {
        let (w, h, rgb) = weft::viz::block_map(slice, head, px);
        weft::viz::write_png(path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} ({w} x {h} px): head {head} of `{}`", path.display(), pattern.name);
        println!("legend: {}", weft::viz::LEGEND);
        if r.index.permutation.is_some() {
            println!("axes are permuted positions (the order the kernel iterates)");
        }
    }
    if let Some(path) = npy {
        let m = weft::viz::dense_mask(slice, head);
        weft::viz::write_npy_bool(path, slice.nq, slice.nk, &m)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} (bool [{}, {}], token order)", path.display(), slice.nq, slice.nk);
    }
    let density = match r.universe {
        Universe::All => format!("{:.2}% of all pairs", 100.0 * r.density_per_head[head]),
        Universe::Causal => format!(
            "{:.2}% of causal pairs, {:.2}% of all pairs",
            100.0 * r.universe_density_per_head[head],
            100.0 * r.density_per_head[head]
        ),
    };
    println!("head {head}: density {density}, recall {:.2}%", 100.0 * r.recall.per_head[head]);
    Ok(())
}
