//! `weft search` over a captured Q/K file: every layer's heads scored against the candidate
//! patterns, then one choice per head (by recall target or by mean density budget). The CLI
//! and the Python package both run it; printing and storing are the caller's.

use std::path::Path;

use weft_autotune::search::{
    candidates, choose_by_budget, choose_by_recall, evaluate_layer_on, exact_scores, sample_rows, Backend, Candidate,
    Choice,
};

use crate::Error;

/// How to choose.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// The recall each head must reach (used when `budget` is `None`).
    pub target_recall: f64,
    /// A mean density to spend where it buys the most recall, instead of a recall target.
    pub budget: Option<f64>,
    /// Causal attention (decoders); `false` for encoders and video models.
    pub causal: bool,
    /// Compute recall on the CPU even when a GPU is present.
    pub cpu: bool,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions { target_recall: 0.95, budget: None, causal: true, cpu: false }
    }
}

impl SearchOptions {
    fn check(&self) -> Result<(), Error> {
        let t = self.target_recall;
        if !(t > 0.0 && t <= 1.0) {
            return Err(Error::Usage(format!(
                "the target recall (--target-recall, target_recall=) must be in (0, 1], got {t}"
            )));
        }
        if let Some(b) = self.budget {
            if !(b > 0.0 && b <= 1.0) {
                return Err(Error::Usage(format!(
                    "the budget (--budget, budget=) is a mean density in (0, 1], got {b}"
                )));
            }
        }
        Ok(())
    }
}

/// What a search chose, and over what.
#[derive(Clone, Debug)]
pub struct SearchOutcome {
    pub choices: Vec<Choice>,
    pub layers: usize,
    pub candidates: usize,
    /// Query rows per head that recall was measured on (density is counted over all rows).
    pub rows_per_head: usize,
    /// Query rows per head in the file.
    pub rows_total: usize,
    /// Where recall was computed ("the CPU", or the GPU's name).
    pub backend: String,
}

/// Progress of a search: candidate indexes evaluated so far, of `total`.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub layer: usize,
    pub done: usize,
    pub total: usize,
}

/// Runs the search over every layer of the Q/K file at `path`; `progress` is called after
/// each candidate index (from the threads that build them).
pub fn run(path: &Path, opts: &SearchOptions, progress: &(dyn Fn(Progress) + Sync)) -> Result<SearchOutcome, Error> {
    opts.check()?;
    let layers = crate::qk::layers(path)?;
    let gpu = if opts.cpu {
        None
    } else {
        match weft_runtime::Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::info!(error = %e, "no GPU for the search; recall on the CPU");
                None
            }
        }
    };
    let mut backend = gpu.as_ref().map_or(Backend::Cpu, Backend::Gpu);
    let mut all = Vec::new();
    let mut cands = Vec::new();
    let (mut rows_per_head, mut rows_total) = (0, 0);
    // Counted and reported under one lock, so that reports arrive in order from any thread.
    let done = std::sync::Mutex::new(0usize);
    for (li, layer) in layers.iter().enumerate() {
        let (q, k) = crate::qk::load(path, *layer)?;
        if matches!(backend, Backend::Gpu(_)) && ![64, 128, 256].contains(&q.dim) {
            tracing::warn!(head_dim = q.dim, "no GPU kernel for this head dim; recall on the CPU");
            backend = Backend::Cpu;
        }
        if cands.is_empty() {
            cands = candidates(k.tokens, opts.causal);
        }
        // A GPU measures every row (recall exact); the CPU samples them.
        let rows = match backend {
            Backend::Gpu(_) => (0..q.tokens).collect(),
            Backend::Cpu => sample_rows(q.tokens),
        };
        (rows_per_head, rows_total) = (rows.len(), q.tokens);
        let total = layers.len() * cands.len();
        let tick = || {
            let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
            *done += 1;
            progress(Progress { layer: li, done: *done, total });
        };
        all.extend(evaluate_layer_on(backend, layer.unwrap_or(0), &q, &k, &cands, opts.causal, &rows, &tick)?);
    }
    let choices = match opts.budget {
        Some(b) => choose_by_budget(&all, &cands, b)?,
        None => choose_by_recall(&all, &cands, opts.target_recall),
    };
    let backend = match (backend, &gpu) {
        (Backend::Gpu(_), Some(g)) => g.name.clone(),
        _ => "the CPU".to_string(),
    };
    Ok(SearchOutcome { choices, layers: layers.len(), candidates: cands.len(), rows_per_head, rows_total, backend })
}

/// A choice measured exactly: recall and density over every row of its head.
#[derive(Clone, Debug)]
pub struct Verified {
    pub choice: Choice,
    pub exact_recall: f64,
    pub exact_density: f64,
}

/// Measures every choice on every row of the Q/K file at `path` (on the CPU): what a search's
/// estimates are checked against. `progress` is called once per layer measured.
pub fn verify(
    path: &Path,
    choices: &[Choice],
    causal: bool,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<Verified>, Error> {
    let layers = crate::qk::layers(path)?;
    let mut out = Vec::with_capacity(choices.len());
    for (li, layer) in layers.iter().enumerate() {
        let here: Vec<&Choice> = choices.iter().filter(|c| c.layer == layer.unwrap_or(0)).collect();
        if here.is_empty() {
            continue;
        }
        let (q, k) = crate::qk::load(path, *layer)?;
        // The layer's distinct patterns, each index built once; each head measured on its own.
        let mut cands: Vec<Candidate> = Vec::new();
        let mut own = vec![usize::MAX; q.heads];
        for c in &here {
            let ci = match cands.iter().position(|x| x.pattern == c.pattern) {
                Some(i) => i,
                None => {
                    cands.push(Candidate { family: c.family.clone(), pattern: c.pattern.clone() });
                    cands.len() - 1
                }
            };
            match own.get_mut(c.head) {
                Some(slot) => *slot = ci,
                None => {
                    return Err(Error::Usage(format!(
                        "layer {} has {} heads in {}, no head {}",
                        c.layer,
                        q.heads,
                        path.display(),
                        c.head
                    )))
                }
            }
        }
        if let Some(h) = own.iter().position(|&c| c == usize::MAX) {
            return Err(Error::Usage(format!("no choice for layer {} head {h} to verify", layer.unwrap_or(0))));
        }
        let scores = exact_scores(&q, &k, &cands, &own, causal)?;
        for c in here {
            let s = &scores[c.head];
            out.push(Verified { choice: c.clone(), exact_recall: s.recall, exact_density: s.density });
        }
        progress(Progress { layer: li, done: li + 1, total: layers.len() });
    }
    Ok(out)
}
