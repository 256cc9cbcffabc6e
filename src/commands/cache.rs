//! `weft cache`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::args::CacheAction;

fn summary(e: &weft::cache::Entry) -> String {
    let v = &e.value["value"];
    match e.tree.as_str() {
        "kernels" => format!(
            "{} ({} bytes CUBIN, {} threads)",
            v["name"].as_str().unwrap_or("?"),
            v["cubin"].as_array().map_or(0, Vec::len),
            v["threads"]
        ),
        "tuning" => format!("best {} ms (default {} ms), config {}", v["best_ms"], v["default_ms"], v["best"]),
        "search" => format!("recall {}, density {}", v["recall"], v["density"]),
        _ => String::new(),
    }
}

pub(crate) fn cache(db: Option<PathBuf>, action: CacheAction) -> Result<()> {
    use weft::cache::{Db, Entry, Error as CacheError};
    let path = super::args::db_path(db)?;
    if let CacheAction::Clear = action {
        // A database that cannot be read, on opening or while clearing, is deleted: it only
        // caches what autotune and search can make again.
        let cleared = Db::open(&path).and_then(|db| db.clear());
        return match cleared {
            Ok(n) => {
                println!("removed {n} entries from {}", path.display());
                Ok(())
            }
            Err(CacheError::Corrupt { .. }) => {
                Db::destroy(&path)?;
                println!("deleted the unreadable database {}", path.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
    }
    let db = Db::open(&path)?;
    match action {
        CacheAction::Ls => {
            let entries = db.entries()?;
            println!("{}: {} entries", path.display(), entries.len());
            for e in &entries {
                println!("{:<8} {}  {}", e.tree, e.key, summary(e));
            }
        }
        CacheAction::Show { key } => {
            let found: Vec<Entry> = db.entries()?.into_iter().filter(|e| e.key.contains(&key)).collect();
            if found.is_empty() {
                bail!("no entry of {} has a key containing `{key}` (see `weft cache ls`)", path.display());
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        // JSON is the only export format: `--json` is accepted and changes nothing.
        CacheAction::Export { json: _, out } => {
            let text = serde_json::to_string_pretty(&db.entries()?)?;
            match out {
                Some(f) => {
                    std::fs::write(&f, text).with_context(|| format!("cannot write {}", f.display()))?;
                    println!("exported {} to {}", path.display(), f.display());
                }
                None => println!("{text}"),
            }
        }
        CacheAction::Import { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let entries: Vec<Entry> = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a `weft cache export` file", file.display()))?;
            let report = db.import(&entries)?;
            println!(
                "imported {} entries into {}, rejected {}",
                report.imported,
                path.display(),
                report.rejected.len()
            );
            for (key, why) in report.rejected.iter().take(20) {
                println!("rejected {key}: {why}");
            }
            if report.rejected.len() > 20 {
                println!("... and {} more rejected", report.rejected.len() - 20);
            }
            if !report.rejected.is_empty() {
                bail!("{} of {} entries were not imported (see above)", report.rejected.len(), entries.len());
            }
        }
        CacheAction::Verify => {
            let current = weft::runtime::Gpu::open(0).ok().and_then(|g| g.toolchain().ok());
            let v = db.verify(current.as_ref())?;
            println!("{}: {} entries checked", path.display(), v.checked);
            for (tree, key, why) in &v.corrupt {
                println!("corrupt  {tree}/{key}: {why}");
            }
            match &current {
                Some(tc) => {
                    for (tree, key) in &v.stale {
                        println!("stale    {tree}/{key}: made by another GPU or toolchain, will be re-tuned");
                    }
                    println!(
                        "current toolchain: {} sm_{} driver {} NVRTC {}.{}",
                        tc.gpu_name, tc.sm, tc.driver_version, tc.nvrtc_version.0, tc.nvrtc_version.1
                    );
                }
                None => println!(
                    "no GPU here: staleness (another GPU, driver, NVRTC or codegen) is checked on a GPU machine"
                ),
            }
            if !v.corrupt.is_empty() {
                bail!("{} corrupt entries; `weft cache clear` resets the database", v.corrupt.len());
            }
        }
        CacheAction::Clear => {}
    }
    Ok(())
}
