//! `weft autotune`.

use anyhow::{bail, Context, Result};
use weft::dsl::Pattern;

use super::args::AutotuneArgs;
use super::{load_pattern, MAX_SEQ};

pub(crate) fn autotune(args: AutotuneArgs) -> Result<()> {
    use weft::autotune::tune::{tune, TuneRequest};
    let dtypes: Vec<weft::codegen::DType> = args.dtype.iter().map(|d| d.parse()).collect::<Result<_, _>>()?;
    if let Some(s) = args.seq.iter().find(|s| **s == 0 || **s > MAX_SEQ) {
        bail!("--seq must be between 1 and {MAX_SEQ}, got {s}");
    }
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    let db = args.db.open()?;
    // The patterns: one given, or every distinct one a search chose for a model.
    let patterns: Vec<Pattern> = match (&args.pattern, &args.from_search) {
        (Some(p), _) => vec![load_pattern(p)?],
        (None, Some(model)) => {
            let Some((db, path)) = &db else { bail!("--from-search reads the database: drop --no-db") };
            let mut found: Vec<Pattern> = Vec::new();
            for (key, rec) in db.search_results(model)? {
                let p: Pattern = serde_json::from_value(rec.pattern).with_context(|| {
                    format!("the search result of layer {} head {} does not hold a pattern", key.layer, key.head)
                })?;
                if !found.iter().any(|f| f.hash() == p.hash()) {
                    found.push(p);
                }
            }
            if found.is_empty() {
                bail!(
                    "no search results for model `{model}` in {} (run `weft search --model {model}` first)",
                    path.display()
                );
            }
            found
        }
        (None, None) => bail!("give a PATTERN or --from-search MODEL"),
    };
    for p in &patterns {
        p.validate()?;
    }
    let gpu = weft::runtime::Gpu::open(0).context(
        "autotune times kernels on an NVIDIA GPU; without one, `weft compile` shows what a config costs in registers and shared memory",
    )?;
    let mut summary = Vec::new();
    for pattern in &patterns {
        for &seq in &args.seq {
            for &head_dim in &args.head_dim {
                for &dtype in &dtypes {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.enable_steady_tick(std::time::Duration::from_millis(200));
                    bar.set_prefix(format!("{} n={seq} d={head_dim} {}", pattern.name, dtype.name()));
                    let report = |m: &str| bar.set_message(m.to_string());
                    if !args.batch.is_empty() {
                        for &batch in &args.batch {
                            let req = weft::autotune::paged::PagedTuneRequest {
                                pattern,
                                batch,
                                heads: args.heads,
                                kv_heads,
                                keys: seq,
                                head_dim,
                                dtype,
                                page_size: args.page_size,
                            };
                            bar.set_prefix(format!("{} paged b={batch} n={seq} d={head_dim}", pattern.name));
                            let r =
                                weft::autotune::paged::tune_paged(&gpu, db.as_ref().map(|(d, _)| d), &req, &report)?;
                            summary.push(format!(
                                "{:<24} b={batch:<4} n={seq:<7} d={head_dim:<3} {:<5} paged splits={:<4} {}",
                                pattern.name,
                                dtype.name(),
                                r.best_splits,
                                split_outcome(&r)
                            ));
                        }
                        bar.finish_and_clear();
                        continue;
                    }
                    if pattern.expr.contains_retrieval() {
                        // Decode: one query per sequence over `seq` cached keys; the split count is tuned.
                        let req = weft::autotune::decode::DecodeTuneRequest {
                            pattern,
                            heads: args.heads,
                            kv_heads,
                            keys: seq,
                            head_dim,
                            dtype,
                        };
                        let r = weft::autotune::decode::tune_decode(&gpu, db.as_ref().map(|(d, _)| d), &req, &report)?;
                        bar.finish_and_clear();
                        println!(
                            "{} (decode) on {}, {} heads ({} kv), one query over {seq} keys, head dim {head_dim}, {}",
                            pattern.name,
                            gpu.name,
                            args.heads,
                            kv_heads,
                            dtype.name()
                        );
                        println!("{:<14} {:>10}", "splits", "median ms");
                        for (splits, t) in &r.timings {
                            let name = if *splits == 0 { "auto".to_string() } else { splits.to_string() };
                            println!("{name:<14} {:>10}", t.map_or("-".into(), |m| format!("{m:.4}")));
                        }
                        summary.push(format!(
                            "{:<24} n={seq:<6} d={head_dim:<3} {:<5} decode splits={:<24} {}",
                            pattern.name,
                            dtype.name(),
                            r.best_splits,
                            split_outcome(&r)
                        ));
                        continue;
                    }
                    let req = TuneRequest {
                        pattern,
                        heads: args.heads,
                        kv_heads,
                        seq,
                        head_dim,
                        dtype,
                        head: args.head,
                        wgmma: if args.wgmma {
                            Some(true)
                        } else if args.no_wgmma {
                            Some(false)
                        } else {
                            None
                        },
                    };
                    let r = tune(&gpu, db.as_ref().map(|(d, _)| d), &req, &report)?;
                    bar.finish_and_clear();
                    println!(
                        "{} on {} ({}), {} heads ({} kv) x {seq} tokens, head dim {head_dim}, {}",
                        pattern.name,
                        gpu.name,
                        gpu.arch.name(),
                        args.heads,
                        kv_heads,
                        dtype.name()
                    );
                    println!("{:<62} {:>10} {:>9}  note", "config", "median ms", "TFLOP/s");
                    for t in &r.timings {
                        let (ms, tf) = match t.median_ms {
                            Some(m) => (format!("{m:.3}"), format!("{:.0}", r.flops / (m * 1e-3) / 1e12)),
                            None => ("-".into(), "-".into()),
                        };
                        println!("{:<62} {ms:>10} {tf:>9}  {}", t.config.to_string(), t.note);
                    }
                    let gain = r.default_ms.map_or("default pruned".to_string(), |d| format!("{:.2}x", d / r.best_ms));
                    summary.push(format!(
                        "{:<24} n={seq:<6} d={head_dim:<3} {:<5} {:<34} {:>8.3} ms {:>5.0} TFLOP/s  gain {gain}  error {:.1e}  {:.1} s",
                        pattern.name,
                        dtype.name(),
                        format!("{}x{}/{} {}-stage", r.best.block_m, r.best.block_n, r.best.warp_rows, r.best.stages),
                        r.best_ms,
                        r.flops / (r.best_ms * 1e-3) / 1e12,
                        r.verified_error,
                        r.seconds
                    ));
                }
            }
        }
    }
    println!("\nsummary (best config as block_m x block_n / rows per warp and pipeline stages; gain over the default config):");
    for line in &summary {
        println!("  {line}");
    }
    if let Some((_, path)) = &db {
        println!("stored in {}", path.display());
    }
    Ok(())
}

/// A split-count tune's time, gain over the automatic choice, error and duration, for the
/// summary.
fn split_outcome(r: &weft::autotune::decode::DecodeTuneResult) -> String {
    let gain = r.auto_ms.map_or("auto failed".to_string(), |a| format!("{:.2}x", a / r.best_ms));
    format!("{:>8.4} ms  gain {gain} over auto  error {:.1e}  {:.1} s", r.best_ms, r.verified_error, r.seconds)
}
