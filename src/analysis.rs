//! What `weft explain` and `weft mask` compute from a pattern and Q/K: the sparse index, its
//! density and recall. The CLI and the Python package both call this, so they give the same
//! answers.

use std::path::Path;
use std::time::Instant;

use weft_dsl::Pattern;
use weft_patterns::{self as pat, IndexOptions, SparseIndex, Tensor, Universe};

use crate::{catalog, Error};

/// Which softmax mass recall is measured against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UniverseChoice {
    /// Causal when the pattern mentions causal, a window or retrieval; else all keys.
    #[default]
    Auto,
    All,
    Causal,
}

/// Block sizes of the index and how recall is sampled.
#[derive(Clone, Debug)]
pub struct AnalysisOptions {
    /// Rows per query block (default: the pattern's own).
    pub block_m: Option<usize>,
    /// Keys per key block (default: the pattern's own).
    pub block_n: Option<usize>,
    pub universe: UniverseChoice,
    /// Query rows per head sampled for recall (0: all).
    pub recall_rows: usize,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions { block_m: None, block_n: None, universe: UniverseChoice::Auto, recall_rows: 256 }
    }
}

/// A pattern's index over one input, with its density and recall.
pub struct Report {
    pub index: SparseIndex,
    /// Per head, the (stride, phase) of each grid's row lines at an estimated phase.
    pub row_lines: Vec<Vec<(usize, usize)>>,
    pub build_ms: f64,
    /// Kept pairs over all `nq x nk` pairs.
    pub density: f64,
    /// The same per head.
    pub density_per_head: Vec<f64>,
    /// Kept pairs over the universe's pairs (causal pairs for a causal universe), per head:
    /// the density `weft search` reports.
    pub universe_density_per_head: Vec<f64>,
    pub recall: pat::Recall,
    pub universe: Universe,
    pub scale: f64,
}

/// Builds `pattern`'s index over `q` and `k` and measures it.
pub fn analyse(pattern: &Pattern, q: &Tensor, k: &Tensor, opts: &AnalysisOptions) -> Result<Report, Error> {
    let index_opts = IndexOptions { block_m: opts.block_m, block_n: opts.block_n, ..Default::default() };
    let start = Instant::now();
    let resolved = pat::resolve_pattern(&pattern.expr, q, k, &index_opts)?;
    let index = resolved.index()?;
    let build_ms = start.elapsed().as_secs_f64() * 1e3;
    let row_lines = resolved
        .nodes
        .iter()
        .map(|n| n.row_lines().iter().filter_map(|l| Some((l.stride, l.phase?))).collect())
        .collect();
    let universe = match opts.universe {
        UniverseChoice::All => Universe::All,
        UniverseChoice::Causal => Universe::Causal,
        UniverseChoice::Auto => {
            let text = pattern.to_string();
            if text.contains("causal") || text.contains("window(") || pattern.expr.contains_retrieval() {
                Universe::Causal
            } else {
                Universe::All
            }
        }
    };
    let sample = (opts.recall_rows > 0).then_some(opts.recall_rows);
    let recall = pat::recall(&index, q, k, resolved.scale, universe, sample)?;
    // Pairs counted once (a mask intervals cannot decide is counted pair by pair): both
    // densities come from them.
    let per_head = index.pairs_per_head();
    let universe_size = universe.pairs(index.nq, index.nk).max(1) as f64;
    let all_pairs = (index.heads as f64 * index.nq as f64 * index.nk as f64).max(1.0);
    let universe_density_per_head = per_head.iter().map(|&p| p as f64 / universe_size).collect();
    let head_pairs = (index.nq as f64 * index.nk as f64).max(1.0);
    Ok(Report {
        density: per_head.iter().sum::<u64>() as f64 / all_pairs,
        density_per_head: per_head.iter().map(|&p| p as f64 / head_pairs).collect(),
        universe_density_per_head,
        index,
        row_lines,
        build_ms,
        recall,
        universe,
        scale: resolved.scale,
    })
}

impl Report {
    /// Mean over heads of [`Report::universe_density_per_head`].
    pub fn universe_density(&self) -> f64 {
        let n = self.universe_density_per_head.len().max(1) as f64;
        self.universe_density_per_head.iter().sum::<f64>() / n
    }

    /// What the universe's pairs are, for messages: "causal pairs" or "all pairs".
    pub fn universe_name(&self) -> &'static str {
        match self.universe {
            Universe::All => "all pairs",
            Universe::Causal => "causal pairs",
        }
    }
}

impl Report {
    /// The document `weft explain --json` prints for a valid pattern.
    pub fn to_json(&self, pattern: &Pattern, input: &str) -> serde_json::Value {
        let (full, partial, cols) = self.index.entry_counts();
        let row_lines: Vec<Vec<serde_json::Value>> = self
            .row_lines
            .iter()
            .map(|ls| ls.iter().map(|(stride, phase)| serde_json::json!({"stride": stride, "phase": phase})).collect())
            .collect();
        serde_json::json!({
            "name": pattern.name,
            "text": pattern.to_string(),
            "hash": pattern.hash().to_hex(),
            "valid": true,
            "ir": pattern.expr,
            "input": input,
            "block_m": self.index.block_m,
            "block_n": self.index.block_n,
            "full_blocks": full, "partial_blocks": partial, "columns": cols,
            "masks": self.index.masks.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "row_lines_per_head": row_lines,
            "build_ms": self.build_ms,
            "density": self.density,
            "density_per_head": self.density_per_head,
            "density_universe": self.universe_density(),
            "density_universe_per_head": self.universe_density_per_head,
            "recall_mean": self.recall.mean, "recall_min": self.recall.min,
            "recall_per_head": self.recall.per_head,
            "recall_universe": format!("{:?}", self.universe).to_lowercase(),
            "recall_rows_per_head": self.recall.rows,
            "scale": self.scale,
        })
    }
}

/// The document `weft explain --json` prints for an invalid pattern.
pub fn invalid_json(pattern: &Pattern, error: &weft_dsl::Error) -> serde_json::Value {
    serde_json::json!({
        "name": pattern.name, "text": pattern.to_string(), "hash": pattern.hash().to_hex(),
        "valid": false, "errors": error.to_string(),
    })
}

/// A pattern from a file, a built-in name, or DSL text, as every command and the Python
/// package accept it; DSL text is named `text_name`.
///
/// A built-in name wins over a file of the same name in the working directory (write the
/// file as a path, `./causal`, to read it); an argument that looks like a path (it ends in
/// `.toml` or `.json`, or holds a `/` and no DSL operator or space) must name a readable
/// regular file, and the error says what it names instead.
pub fn load_pattern(arg: &str, text_name: &str) -> Result<Pattern, Error> {
    let path = Path::new(arg);
    let looks_like_text = arg.contains(['(', '&', '|', ' ', '<', '>', '=']) || arg == "causal" || arg == "full";
    let as_path = arg.ends_with(".toml") || arg.ends_with(".json") || (arg.contains('/') && !looks_like_text);
    if !as_path {
        if let Some(p) = catalog::builtin(arg) {
            return Ok(p);
        }
    }
    // `metadata` follows links: a loop or a dangling link is an error here.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(weft_dsl::load_pattern_file(path)?),
        Ok(m) if m.is_dir() => {
            return Err(Error::Usage(format!("`{arg}` is a directory, not a pattern file (.toml or .json)")))
        }
        Ok(_) => {
            return Err(Error::Usage(format!(
                "`{arg}` is not a regular file (a FIFO, socket or device), so it is not read as a pattern file"
            )))
        }
        Err(e) if as_path => {
            return Err(Error::Usage(match e.kind() {
                std::io::ErrorKind::NotFound => format!("pattern file `{arg}` does not exist"),
                _ => format!("cannot read pattern file `{arg}`: {e}"),
            }))
        }
        Err(_) => {}
    }
    if looks_like_text {
        return Ok(weft_dsl::parse_pattern_str(text_name, arg)?);
    }
    let names: Vec<&str> = catalog::builtins().into_iter().map(|(n, _)| n).collect();
    Err(Error::Usage(format!(
        "`{arg}` is neither a pattern file, nor a built-in pattern ({}), nor DSL text; \
         quote DSL text, e.g. \"causal & window(1024)\"",
        names.join(", ")
    )))
}
