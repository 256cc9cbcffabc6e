//! `weft search`.

use std::time::Instant;

use anyhow::{Context, Result};

use super::args::SearchArgs;

/// Colours of the families in the search map.
const FAMILY_COLOURS: [(&str, [u8; 3]); 6] = [
    ("dense", [120, 120, 120]),
    ("local", [46, 139, 87]),
    ("block", [46, 94, 170]),
    ("vertical_vector", [214, 55, 46]),
    ("vertical_slash", [230, 150, 30]),
    ("grid", [140, 80, 170]),
];

pub(crate) fn search(args: SearchArgs) -> Result<()> {
    use weft::autotune::search::*;
    let opts = weft::search::SearchOptions {
        target_recall: args.target_recall.unwrap_or(0.95),
        budget: args.budget,
        causal: !args.bidirectional,
        cpu: args.cpu,
    };
    let model = args.model.clone().unwrap_or_else(|| {
        args.qk.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} candidate indexes, layer {msg} [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |p: weft::search::Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{}", p.layer));
    };
    let outcome = weft::search::run(&args.qk, &opts, &progress)?;
    bar.finish_and_clear();
    let chosen = outcome.choices;
    let recall_rows = if outcome.rows_per_head >= outcome.rows_total {
        format!("all {} rows", outcome.rows_total)
    } else {
        format!(
            "{} sampled rows of {}, chosen {RECALL_MARGIN_SE} standard errors above the target",
            outcome.rows_per_head, outcome.rows_total
        )
    };
    println!(
        "{} heads in {} layers searched in {:.1} s over {} candidates ({}; recall on {} over {recall_rows}; density exact)",
        chosen.len(),
        outcome.layers,
        start.elapsed().as_secs_f64(),
        outcome.candidates,
        match args.budget {
            Some(b) => format!("mean density budget {b}"),
            None => format!("target recall {}", opts.target_recall),
        },
        outcome.backend,
    );
    let universe = if opts.causal { "causal pairs" } else { "all pairs" };
    println!("density: share of the {universe} computed; recall: share of the softmax mass kept (mean over rows)");
    println!("{:<6} {:<48} {:>8} {:>8}", "layer", "families", "density", "recall");
    for l in summarize(&chosen) {
        let f: Vec<String> = l.families.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        println!(
            "{:<6} {:<48} {:>7.1}% {:>7.1}%",
            l.layer,
            f.join(", "),
            100.0 * l.mean_density,
            100.0 * l.mean_recall
        );
    }
    let n = chosen.len().max(1) as f64;
    println!(
        "all    {:<48} {:>7.1}% {:>7.1}%",
        "",
        100.0 * chosen.iter().map(|c| c.density).sum::<f64>() / n,
        100.0 * chosen.iter().map(|c| c.recall).sum::<f64>() / n
    );
    if args.verify {
        verify_report(&args, &opts, &chosen)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&chosen)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.png {
        let nl = chosen.iter().map(|c| c.layer).max().unwrap_or(0) + 1;
        let nh = chosen.iter().map(|c| c.head).max().unwrap_or(0) + 1;
        let cell = 12usize;
        let (w, h) = (nl * cell, nh * cell);
        let mut rgb = vec![255u8; w * h * 3];
        for c in &chosen {
            let base = FAMILY_COLOURS.iter().find(|f| f.0 == c.family).map_or([0, 0, 0], |f| f.1);
            // Lighter for sparser heads: the colour's strength is the density (at least 25%).
            let t = c.density.clamp(0.25, 1.0);
            let col = base.map(|x| (255.0 - (255.0 - f64::from(x)) * t) as u8);
            for y in c.head * cell..(c.head + 1) * cell - 1 {
                for x in c.layer * cell..(c.layer + 1) * cell - 1 {
                    let i = (y * w + x) * 3;
                    rgb[i..i + 3].copy_from_slice(&col);
                }
            }
        }
        weft::viz::write_png(path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        let legend: Vec<String> = FAMILY_COLOURS.iter().map(|(n, c)| format!("{n} rgb{c:?}")).collect();
        println!("wrote {} (columns: layers, rows: heads; lighter = sparser): {}", path.display(), legend.join(", "));
    }
    if let Some((db, path)) = args.db.open()? {
        let records = chosen
            .iter()
            .map(|c| {
                let key = weft::cache::SearchKey { model: model.clone(), layer: c.layer as u32, head: c.head as u32 };
                let rec = weft::cache::SearchRecord {
                    pattern: serde_json::to_value(&c.pattern)?,
                    recall: c.recall,
                    density: c.density,
                    created: weft::cache::timestamp(),
                    family: c.family.clone(),
                    recall_se: c.recall_se,
                };
                Ok((key, rec))
            })
            .collect::<Result<Vec<_>>>()?;
        db.put_searches(&records)?;
        println!("stored {} choices for model `{model}` in {}", chosen.len(), path.display());
    }
    Ok(())
}

/// `--verify`: every choice measured exactly, against its estimate and the target or budget.
fn verify_report(
    args: &SearchArgs,
    opts: &weft::search::SearchOptions,
    chosen: &[weft::autotune::search::Choice],
) -> Result<()> {
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} layers measured exactly [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |p: weft::search::Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    };
    let checked = weft::search::verify(&args.qk, chosen, opts.causal, &progress)?;
    bar.finish_and_clear();
    let n = checked.len().max(1) as f64;
    let errs: Vec<f64> = checked.iter().map(|v| v.choice.recall - v.exact_recall).collect();
    let mean_density = checked.iter().map(|v| v.exact_density).sum::<f64>() / n;
    println!(
        "verified over every row in {:.1} s: recall estimate - exact: mean {:+.4}, mean |.| {:.4}, worst {:+.4}; \
         exact mean recall {:.2}%, exact mean density {:.2}%",
        start.elapsed().as_secs_f64(),
        errs.iter().sum::<f64>() / n,
        errs.iter().map(|e| e.abs()).sum::<f64>() / n,
        errs.iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap_or(0.0),
        100.0 * checked.iter().map(|v| v.exact_recall).sum::<f64>() / n,
        100.0 * mean_density,
    );
    match args.budget {
        Some(b) => println!(
            "budget {b}: exact mean density {mean_density:.4} ({:+.2}% of the budget)",
            100.0 * (mean_density - b) / b
        ),
        None => {
            let target = opts.target_recall;
            let below: Vec<_> = checked.iter().filter(|v| v.exact_recall < target).collect();
            println!("{} of {} heads below the target {target} on exact recall", below.len(), checked.len());
            for v in below {
                println!(
                    "  layer {} head {}: {} estimated {:.4} +- {:.4}, exact {:.4}",
                    v.choice.layer,
                    v.choice.head,
                    v.choice.pattern.name,
                    v.choice.recall,
                    v.choice.recall_se,
                    v.exact_recall
                );
            }
        }
    }
    Ok(())
}
