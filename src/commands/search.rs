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
    println!(
        "{} heads in {} layers searched in {:.1} s over {} candidates ({}; recall on {}, recall and density on {} sampled rows per head)",
        chosen.len(),
        outcome.layers,
        start.elapsed().as_secs_f64(),
        outcome.candidates,
        match args.budget {
            Some(b) => format!("mean density budget {b}"),
            None => format!("target recall {}", opts.target_recall),
        },
        outcome.backend,
        outcome.rows_per_head
    );
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
    if !args.no_db {
        let path = match &args.db {
            Some(p) => p.clone(),
            None => weft::cache::default_path()?,
        };
        let db = weft::cache::Db::open(&path)?;
        for c in &chosen {
            let key = weft::cache::SearchKey { model: model.clone(), layer: c.layer as u32, head: c.head as u32 };
            let rec = weft::cache::SearchRecord {
                pattern: serde_json::to_value(&c.pattern)?,
                recall: c.recall,
                density: c.density,
                created: weft::cache::timestamp(),
            };
            db.put_search(&key, &rec)?;
        }
        println!("stored {} choices for model `{model}` in {}", chosen.len(), path.display());
    }
    Ok(())
}
