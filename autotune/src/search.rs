//! Offline per-head pattern search: which pattern each head of a model should use.
//!
//! For every layer and head of captured Q/K, every candidate pattern (each dynamic family over
//! a parameter grid, each with the sink and a local band, plus a sliding window and dense) is
//! scored by **density** (share of the universe's pairs computed: causal pairs for a causal
//! model) and **recall** (share of the full softmax mass kept). Then either
//! - [`choose_by_recall`]: per head, the cheapest candidate reaching a target recall; or
//! - [`choose_by_budget`]: under a mean density budget over all heads, the choice that
//!   maximises mean recall, by a multiple-choice knapsack over each head's recall-density
//!   points (as VecAttention allocates its budget).
//!
//! **Density is exact**: each candidate's index is built over every row and its pairs counted
//! (a causal mask's edge by interval analysis, not pair by pair), over the universe's pairs.
//! Fixed-width patterns (windows, top-k columns and blocks) cost relatively more on short rows
//! and grids less, so any sample of rows would misprice one family against another.
//!
//! **Recall is estimated on sampled rows** ([`sample_rows`]): one row drawn from each of
//! [`SAMPLED_ROWS`] equal strata of the whole causal range, never the last [`ESTIMATE_ROWS`]
//! queries that vertical-slash and grid candidates pick their keys from (those rows would
//! flatter exactly the candidates that read them). Each row's full softmax is computed once
//! per head and shared by all candidates. Each score carries the estimate's standard error,
//! and [`choose_by_recall`] asks `recall - RECALL_MARGIN_SE x se >= target`, so that heads stay
//! at the target on exact recall. On a GPU backend every row is measured: recall is exact.
//! `tests/search.rs` compares both with exact values; `weft search --verify` does it on real
//! captures.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weft_dsl::builder::*;
use weft_dsl::{Pattern, PatternExpr};
use weft_patterns::{resolve_pattern, IndexOptions, Tensor, Universe};

use crate::Error;

/// A candidate pattern and the family it stands for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub family: String,
    pub pattern: Pattern,
}

/// The candidate grid for sequences of `n` tokens.
pub fn candidates(n: usize, is_causal: bool) -> Vec<Candidate> {
    let base = || sink(64) | local(64);
    let frac = |f: f64, of: usize| ((f * of as f64).round() as u32).max(1);
    let mut out: Vec<(String, String, PatternExpr)> = vec![("dense".into(), "dense".into(), full())];
    for w in [128u32, 256, 512, 1024, 2048, 4096] {
        if (w as usize) < n {
            out.push(("local".into(), format!("local-{w}"), sink(64) | local(w)));
        }
    }
    let nb = n.div_ceil(64);
    for f in [0.02, 0.05, 0.1, 0.2, 0.4] {
        let k = frac(f, nb);
        out.push(("block".into(), format!("block-top{k}"), base() | block().keep(top_k(k))));
    }
    for f in [0.01, 0.02, 0.05, 0.1, 0.2] {
        let c = frac(f, n);
        out.push((
            "vertical_vector".into(),
            format!("vv-top{c}"),
            vertical_vector().keep(top_k(c)).sink(64).local(64).into(),
        ));
    }
    if is_causal {
        for (v, s) in [(16u32, 2u32), (32, 4), (64, 8), (128, 16), (256, 32)] {
            let v = v.min(n as u32);
            out.push((
                "vertical_slash".into(),
                format!("vs-{v}-{s}"),
                base() | vertical_slash().vertical(top_k(v)).slash(top_k(s)),
            ));
        }
    }
    for stride in [8u32, 16, 32, 64, 128, 256] {
        if (stride as usize) * 2 <= n {
            out.push(("grid".into(), format!("grid-{stride}"), base() | grid(stride)));
        }
    }
    out.into_iter()
        .map(|(family, name, e)| {
            let e = if is_causal { causal() & e } else { e };
            Candidate { family, pattern: Pattern::new(name, e) }
        })
        .collect()
}

/// Query rows recall is estimated on (one per stratum).
pub const SAMPLED_ROWS: usize = 512;
/// The last queries, which vertical-slash and grid candidates estimate their keys from: never
/// sampled for recall (at least as many as any candidate's `last_q`).
pub const ESTIMATE_ROWS: usize = 64;
/// Standard errors of the recall estimate a choice must clear the target by.
pub const RECALL_MARGIN_SE: f64 = 3.0;

/// The rows recall is estimated on: the range before the last [`ESTIMATE_ROWS`] queries cut
/// into [`SAMPLED_ROWS`] equal strata, one row drawn from each (a fixed hash of the stratum
/// and `nq`, so searches repeat). All rows of that range when there are no more than
/// [`SAMPLED_ROWS`]; every row when the sequence is too short to leave any out.
pub fn sample_rows(nq: usize) -> Vec<usize> {
    let range = if nq > 2 * ESTIMATE_ROWS { nq - ESTIMATE_ROWS } else { nq };
    if range <= SAMPLED_ROWS {
        return (0..range).collect();
    }
    (0..SAMPLED_ROWS)
        .map(|i| {
            let (a, b) = (i * range / SAMPLED_ROWS, (i + 1) * range / SAMPLED_ROWS);
            a + (splitmix((nq as u64) << 32 | i as u64) % (b - a) as u64) as usize
        })
        .collect()
}

/// SplitMix64's output function: a well-mixed fixed hash of `x`.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `a . b` in f32 with eight independent accumulators (vectorizes; recall needs no f64 here,
/// the softmax below normalizes in f64).
fn dot32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// One candidate's score on one head.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub candidate: usize,
    /// Exact: pairs kept over the universe's pairs (causal pairs for a causal model).
    pub density: f64,
    /// Mean share of each row's softmax mass kept, over the sampled rows.
    pub recall: f64,
    /// Standard error of `recall` (0 when every row was measured).
    #[serde(default)]
    pub recall_se: f64,
}

/// Mean and standard error of `n` per-row recalls drawn from `population` rows (with the
/// finite-population correction: no error once every row is measured).
fn mean_se(sum: f64, sum_sq: f64, n: usize, population: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 0.0);
    }
    let nf = n as f64;
    let mean = sum / nf;
    if n < 2 || n >= population {
        return (mean, 0.0);
    }
    let var = ((sum_sq - nf * mean * mean) / (nf - 1.0)).max(0.0);
    (mean, (var / nf * (1.0 - nf / population as f64)).sqrt())
}

/// Exact density of every head of `ix`: its pairs over `universe` pairs.
fn densities(ix: &weft_patterns::SparseIndex, universe: u64) -> Vec<f64> {
    ix.pairs_per_head().into_iter().map(|p| p as f64 / universe.max(1) as f64).collect()
}

/// All candidates' scores on one head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadScores {
    pub layer: usize,
    pub head: usize,
    pub scores: Vec<Score>,
}

/// Where recall is computed: the softmax mass each candidate keeps.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    /// Rayon across heads: each sampled row's softmax once per head, then each candidate's
    /// kept keys summed.
    Cpu,
    /// Generated attention kernels: one launch per candidate over the sampled rows gives each
    /// row's log-sum-exp over the kept keys, and the recall of a row is
    /// `exp(lse_kept - lse_universe)`. Inputs are rounded to bf16 on the device. Head dims
    /// 64, 128 and 256.
    Gpu(&'a weft_runtime::Gpu),
}

/// Scores every candidate on every head of one layer. `rows`: the query rows recall is
/// measured on (see [`sample_rows`]; density is always exact); `progress` is called after each
/// candidate's indexes are built. The indexes are built on the CPU either way; `backend`
/// computes the recall.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_layer_on(
    backend: Backend<'_>,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    cands: &[Candidate],
    causal: bool,
    rows: &[usize],
    progress: &(dyn Fn() + Sync),
) -> Result<Vec<HeadScores>, Error> {
    let group = weft_patterns::tensor::check_qkv(q, k, None)?;
    let (indexes, density) = build_candidates(q, k, cands, causal, progress)?;
    if let Backend::Gpu(gpu) = backend {
        return gpu_scores(gpu, layer, q, k, cands, &indexes, &density, causal, rows);
    }
    let all: Vec<&weft_patterns::SparseIndex> = indexes.iter().collect();
    let out = (0..q.heads)
        .into_par_iter()
        .map(|h| {
            let scores = row_mass_sums(q, k, h / group, h, causal, rows, &all)
                .into_iter()
                .enumerate()
                .map(|(ci, (sum, sum_sq))| {
                    let (recall, recall_se) = mean_se(sum, sum_sq, rows.len(), q.tokens);
                    Score { candidate: ci, density: density[ci][h], recall, recall_se }
                })
                .collect();
            HeadScores { layer, head: h, scores }
        })
        .collect();
    Ok(out)
}

/// Every head measured exactly, over all its rows, on its own candidate `cands[own[h]]`: what
/// a search's estimates are checked against (on the CPU).
pub fn exact_scores(
    q: &Tensor,
    k: &Tensor,
    cands: &[Candidate],
    own: &[usize],
    causal: bool,
) -> Result<Vec<Score>, Error> {
    let group = weft_patterns::tensor::check_qkv(q, k, None)?;
    if own.len() != q.heads || own.iter().any(|&c| c >= cands.len()) {
        return Err(Error::Search(format!("{} heads need one candidate each among {}", q.heads, cands.len())));
    }
    let (indexes, density) = build_candidates(q, k, cands, causal, &|| {})?;
    let rows: Vec<usize> = (0..q.tokens).collect();
    Ok((0..q.heads)
        .into_par_iter()
        .map(|h| {
            let ci = own[h];
            let (sum, sum_sq) = row_mass_sums(q, k, h / group, h, causal, &rows, &[&indexes[ci]])[0];
            let (recall, recall_se) = mean_se(sum, sum_sq, rows.len(), q.tokens);
            Score { candidate: ci, density: density[ci][h], recall, recall_se }
        })
        .collect())
}

/// Every candidate's index over all rows (concurrently), with its exact density per head.
fn build_candidates(
    q: &Tensor,
    k: &Tensor,
    cands: &[Candidate],
    causal: bool,
    progress: &(dyn Fn() + Sync),
) -> Result<(Vec<weft_patterns::SparseIndex>, Vec<Vec<f64>>), Error> {
    let (nq, nk) = (q.tokens, k.tokens);
    let scale = 1.0 / (q.dim as f64).sqrt();
    // One set of estimates for all candidates: vertical-slash and grid candidates read the
    // same last-query softmax mass, vertical vectors of every budget the same column scores.
    let estimates = Some(std::sync::Arc::new(weft_patterns::Estimates::default()));
    // Every row is built: density is counted over all of them.
    let opts = IndexOptions { scale: Some(scale), estimates, ..Default::default() };
    // Keys each row sees (its universe) summed over all rows: density's denominator.
    let universe = universe(causal).pairs(nq, nk);
    // Candidates build concurrently (and each build over heads): one build of 32 heads does
    // not fill a machine with many cores.
    Ok(cands
        .par_iter()
        .map(|c| {
            let started = std::time::Instant::now();
            let ix = resolve_pattern(&c.pattern.expr, q, k, &opts)?.index()?;
            let built = started.elapsed().as_secs_f64() * 1e3;
            let density = densities(&ix, universe);
            tracing::debug!(candidate = %c.pattern.name, ms = built, density_ms = started.elapsed().as_secs_f64() * 1e3 - built, "index built");
            progress();
            Ok((ix, density))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .unzip())
}

/// Keys query row `t` sees: all `nk`, or under causality those at or before its position.
fn visible(causal: bool, t: usize, nq: usize, nk: usize) -> usize {
    universe(causal).keys(t, nq, nk)
}

fn universe(causal: bool) -> Universe {
    if causal {
        Universe::Causal
    } else {
        Universe::All
    }
}

/// For query head `h` (key head `kv`), over `rows`: per index, the sum and the sum of squares
/// of each row's kept share of its softmax mass. Row by row: the softmax over the row's
/// universe once, then every index's kept mass (memory for one row, however many rows).
fn row_mass_sums(
    q: &Tensor,
    k: &Tensor,
    kv: usize,
    h: usize,
    causal: bool,
    rows: &[usize],
    indexes: &[&weft_patterns::SparseIndex],
) -> Vec<(f64, f64)> {
    let scale = 1.0 / (q.dim as f64).sqrt();
    let mut sums = vec![(0f64, 0f64); indexes.len()];
    let mut probs: Vec<f32> = Vec::new();
    for &t in rows {
        let n = visible(causal, t, q.tokens, k.tokens);
        let logits: Vec<f64> = (0..n).map(|j| scale * f64::from(dot32(q.row(h, t), k.row(kv, j)))).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = logits.iter().map(|s| (s - max).exp()).sum();
        probs.clear();
        probs.extend(logits.iter().map(|s| ((s - max).exp() / total) as f32));
        for (ix, sum) in indexes.iter().zip(&mut sums) {
            let mut mass = 0f64;
            ix.for_each_key(h, t, |j| mass += probs.get(j).map_or(0.0, |p| f64::from(*p)));
            sum.0 += mass;
            sum.1 += mass * mass;
        }
    }
    sums
}

/// [`Backend::Gpu`]'s scores: each candidate's index runs through its generated kernel, and
/// so does the universe (dense or causal), whose log-sum-exp is each row's full softmax mass;
/// recall is read off the rows in `rows`. `density[c][h]`: exact densities.
#[allow(clippy::too_many_arguments)]
fn gpu_scores(
    gpu: &weft_runtime::Gpu,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    cands: &[Candidate],
    indexes: &[weft_patterns::SparseIndex],
    density: &[Vec<f64>],
    causal: bool,
    rows: &[usize],
) -> Result<Vec<HeadScores>, Error> {
    let scale = 1.0 / (q.dim as f64).sqrt();
    use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
    let d = q.dim;
    if ![64, 128, 256].contains(&d) {
        return Err(Error::Search(format!("GPU recall needs head dim 64, 128 or 256, not {d}; use the CPU")));
    }
    let (hq, nq, nk) = (q.heads, q.tokens, k.tokens);
    let shape = weft_runtime::AttnShape { hq, hkv: k.heads, nq, nk, head_dim: d };
    let s = gpu.stream();
    let up = |t: &Tensor| s.clone_htod(&DType::Bf16.encode(&t.data));
    let (qd, kd) = (up(q)?, up(k)?);
    let mut out = s.alloc_zeros::<u16>(hq * nq * d)?;
    let mut lse = s.alloc_zeros::<f32>(hq * nq)?;
    let universe = Pattern::new("universe", if causal { weft_dsl::builder::causal() } else { full() });
    let opts = IndexOptions { scale: Some(scale), ..Default::default() };
    let uix = resolve_pattern(&universe.expr, q, k, &opts)?.index()?;
    // Every kernel first, so the new ones compile in parallel (a candidate whose predicates
    // depend on the data, such as a grid's phase per head, gets a new kernel per layer).
    let kernel = |pattern: &Pattern, ix: &weft_patterns::SparseIndex| {
        let config = KernelConfig::for_blocks(ix.block_m, ix.block_n, d as u32, DType::Bf16);
        emit(&KernelSpec { pattern, masks: &ix.masks, permutation: ix.permutation, config })
            .map(|k| (k, config))
            .map_err(Error::from)
    };
    let kernels: Vec<_> = std::iter::once(kernel(&universe, &uix))
        .chain(cands.iter().zip(indexes).map(|(c, ix)| kernel(&c.pattern, ix)))
        .collect::<Result<_, _>>()?;
    gpu.load_all(&kernels.iter().map(|(k, _)| k).collect::<Vec<_>>())?;
    // Each row's log-sum-exp over the keys of `ix` (V is K: the output is not used).
    let mut run = |i: usize, ix: &weft_patterns::SparseIndex| -> Result<Vec<f32>, Error> {
        let (kernel, config) = &kernels[i];
        let dix = gpu.upload_index(ix)?;
        gpu.attention(kernel, config, &dix, shape, &qd, &kd, &kd, &mut out, &mut lse, scale as f32)?;
        s.clone_dtoh(&lse).map_err(Error::from)
    };
    let lse_universe = run(0, &uix)?;
    let mut scores: Vec<Vec<Score>> = vec![Vec::with_capacity(cands.len()); hq];
    for (ci, (c, ix)) in cands.iter().zip(indexes).enumerate() {
        let started = std::time::Instant::now();
        let lse_kept = run(ci + 1, ix)?;
        tracing::debug!(candidate = %c.pattern.name, ms = started.elapsed().as_secs_f64() * 1e3, "GPU recall launch");
        let per_head: Vec<Score> = (0..hq)
            .into_par_iter()
            .map(|h| {
                let (mut sum, mut sum_sq) = (0f64, 0f64);
                for &t in rows {
                    let (a, u) = (lse_kept[h * nq + t], lse_universe[h * nq + t]);
                    if a.is_finite() && u.is_finite() {
                        let mass = (f64::from(a) - f64::from(u)).exp().min(1.0);
                        sum += mass;
                        sum_sq += mass * mass;
                    }
                }
                let (recall, recall_se) = mean_se(sum, sum_sq, rows.len(), nq);
                Score { candidate: ci, density: density[ci][h], recall, recall_se }
            })
            .collect();
        for (h, sc) in per_head.into_iter().enumerate() {
            scores[h].push(sc);
        }
    }
    Ok(scores.into_iter().enumerate().map(|(head, scores)| HeadScores { layer, head, scores }).collect())
}

/// The pattern chosen for one head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub layer: usize,
    pub head: usize,
    pub family: String,
    pub pattern: Pattern,
    /// Exact share of the universe's pairs computed.
    pub density: f64,
    /// Estimated recall, and its standard error.
    pub recall: f64,
    #[serde(default)]
    pub recall_se: f64,
}

fn choice(h: &HeadScores, s: &Score, cands: &[Candidate]) -> Choice {
    let c = &cands[s.candidate];
    Choice {
        layer: h.layer,
        head: h.head,
        family: c.family.clone(),
        pattern: c.pattern.clone(),
        density: s.density,
        recall: s.recall,
        recall_se: s.recall_se,
    }
}

/// Above this density a sparse kernel saves nothing over dense attention: such candidates are
/// never chosen over `dense` by [`choose_by_recall`].
pub const MAX_SPARSE_DENSITY: f64 = 0.8;

/// Per head, the lowest-density candidate whose recall reaches `target` by a margin of
/// [`RECALL_MARGIN_SE`] standard errors of its estimate; dense when none does at a density
/// below [`MAX_SPARSE_DENSITY`].
pub fn choose_by_recall(heads: &[HeadScores], cands: &[Candidate], target: f64) -> Vec<Choice> {
    heads
        .iter()
        .map(|h| {
            let is_dense = |s: &&Score| cands[s.candidate].family == "dense";
            let best = h
                .scores
                .iter()
                .filter(|s| {
                    s.recall - RECALL_MARGIN_SE * s.recall_se >= target
                        && (s.density <= MAX_SPARSE_DENSITY || is_dense(s))
                })
                .min_by(|a, b| a.density.total_cmp(&b.density).then(b.recall.total_cmp(&a.recall)))
                .or_else(|| h.scores.iter().find(is_dense))
                .or_else(|| h.scores.iter().max_by(|a, b| a.recall.total_cmp(&b.recall)));
            match best {
                Some(s) => choice(h, s, cands),
                None => Choice {
                    layer: h.layer,
                    head: h.head,
                    family: "dense".into(),
                    pattern: Pattern::new("dense", full()),
                    density: 1.0,
                    recall: 1.0,
                    recall_se: 0.0,
                },
            }
        })
        .collect()
}

/// Density resolution of the budget knapsack (buckets per head): each head's cost is rounded
/// up to 1/1000, so that a budget is spent to within about 0.05% of density per head...
const BUCKETS: usize = 1000;
/// ...or as coarse as 1/200 where the finer table would not fit [`MAX_KNAPSACK_CELLS`].
const MIN_BUCKETS: usize = 200;

/// Under a mean density of at most `budget` over all heads, the choice of one candidate per
/// head that maximises mean recall: a multiple-choice knapsack by dynamic programming over
/// densities discretised to 1/1000 (1/200 for many heads; rounded up, so the budget holds).
///
/// The table holds heads x (budget x heads x buckets) cells: past [`MAX_KNAPSACK_CELLS`] at
/// 1/200 (about 1,300 heads at budget 1) the choice is made by Lagrangian relaxation instead
/// ([`choose_by_price`]), whose memory is linear in the heads.
pub fn choose_by_budget(heads: &[HeadScores], cands: &[Candidate], budget: f64) -> Result<Vec<Choice>, Error> {
    let n = heads.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let cells = |buckets: usize| {
        let cap = (budget.clamp(0.0, 1.0) * (n * buckets) as f64).floor() as usize;
        ((n as u128) * (cap as u128 + 1), cap)
    };
    let Some(buckets) = [BUCKETS, 500, MIN_BUCKETS].into_iter().find(|&b| cells(b).0 <= MAX_KNAPSACK_CELLS as u128)
    else {
        return choose_by_price(heads, cands, budget);
    };
    let cap = cells(buckets).1;
    let cost = |d: f64| (d * buckets as f64).ceil() as usize;
    // best[c] = max total recall using total cost c over the heads so far; back pointers.
    let neg = f64::NEG_INFINITY;
    let mut best = vec![neg; cap + 1];
    best[0] = 0.0;
    let mut picks: Vec<Vec<(usize, usize)>> = Vec::with_capacity(n); // per head, per cost: (score idx, prev cost)
    for h in heads {
        let mut next = vec![neg; cap + 1];
        let mut pick = vec![(usize::MAX, 0usize); cap + 1];
        for (si, s) in h.scores.iter().enumerate() {
            let w = cost(s.density);
            if w > cap {
                continue;
            }
            for c in 0..=cap - w {
                if best[c] == neg {
                    continue;
                }
                let v = best[c] + s.recall;
                if v > next[c + w] {
                    next[c + w] = v;
                    pick[c + w] = (si, c);
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    let end = (0..=cap)
        .filter(|c| best[*c] > neg)
        .max_by(|a, b| best[*a].total_cmp(&best[*b]))
        .ok_or_else(|| Error::Search(format!("no choice fits a mean density budget of {budget}; raise --budget")))?;
    let mut out = vec![None; n];
    let mut c = end;
    for i in (0..n).rev() {
        let (si, prev) = picks[i][c];
        out[i] = Some(choice(&heads[i], &heads[i].scores[si], cands));
        c = prev;
    }
    Ok(out.into_iter().flatten().collect())
}

/// The most cells (16 bytes each) the budget knapsack's table may take: 512 MiB.
pub const MAX_KNAPSACK_CELLS: usize = 1 << 25;

/// Under a mean density budget, the choice per head maximising `recall - price x density`, at
/// the lowest price whose choices fit the budget (bisection; optimal among the choices on the
/// upper convex hull of each head's (density, recall) points), then the budget left spent on
/// the upgrades with the most recall per density. Memory linear in the heads.
pub fn choose_by_price(heads: &[HeadScores], cands: &[Candidate], budget: f64) -> Result<Vec<Choice>, Error> {
    let limit = budget.clamp(0.0, 1.0) * heads.len() as f64;
    // Each head's pick at `price`; ties go to the lower density.
    let pick = |price: f64| -> Vec<usize> {
        heads
            .iter()
            .map(|h| {
                let value = |s: &Score| s.recall - price * s.density;
                (0..h.scores.len())
                    .max_by(|&a, &b| {
                        let (sa, sb) = (&h.scores[a], &h.scores[b]);
                        value(sa).total_cmp(&value(sb)).then(sb.density.total_cmp(&sa.density))
                    })
                    .unwrap_or(usize::MAX)
            })
            .collect()
    };
    let total = |picks: &[usize]| -> f64 {
        heads.iter().zip(picks).map(|(h, &i)| h.scores.get(i).map_or(f64::INFINITY, |s| s.density)).sum()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut best = pick(lo);
    if total(&best) > limit {
        // Raise the price until the picks fit (or it is clear that nothing does).
        while total(&pick(hi)) > limit && hi < 1e12 {
            hi *= 2.0;
        }
        best = pick(hi);
        if total(&best) > limit {
            return Err(Error::Search(format!("no choice fits a mean density budget of {budget}; raise --budget")));
        }
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            let p = pick(mid);
            if total(&p) <= limit {
                (hi, best) = (mid, p);
            } else {
                lo = mid;
            }
        }
    }
    // The price leaves part of the budget unspent: spend it on the upgrades that buy the most
    // recall per density, one at a time.
    let mut left = limit - total(&best);
    for _ in 0..heads.len() {
        let mut upgrade: Option<(f64, usize, usize)> = None;
        for (hi, (h, &cur)) in heads.iter().zip(&best).enumerate() {
            let now = &h.scores[cur];
            for (si, s) in h.scores.iter().enumerate() {
                let (gain, cost) = (s.recall - now.recall, s.density - now.density);
                if gain > 0.0 && cost <= left {
                    let rate = if cost > 0.0 { gain / cost } else { f64::INFINITY };
                    if upgrade.is_none_or(|(r, _, _)| rate > r) {
                        upgrade = Some((rate, hi, si));
                    }
                }
            }
        }
        let Some((_, hi, si)) = upgrade else { break };
        left -= heads[hi].scores[si].density - heads[hi].scores[best[hi]].density;
        best[hi] = si;
    }
    Ok(heads.iter().zip(best).map(|(h, i)| choice(h, &h.scores[i], cands)).collect())
}

/// What one layer's heads chose.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    pub layer: usize,
    /// Families with their head counts, most frequent first.
    pub families: Vec<(String, usize)>,
    pub mean_density: f64,
    pub mean_recall: f64,
}

/// Per-layer summary of a search.
pub fn summarize(choices: &[Choice]) -> Vec<LayerSummary> {
    let mut layers: Vec<usize> = choices.iter().map(|c| c.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    layers
        .into_iter()
        .map(|l| {
            let cs: Vec<&Choice> = choices.iter().filter(|c| c.layer == l).collect();
            let mut fams: Vec<(String, usize)> = Vec::new();
            for c in &cs {
                match fams.iter_mut().find(|f| f.0 == c.family) {
                    Some(f) => f.1 += 1,
                    None => fams.push((c.family.clone(), 1)),
                }
            }
            fams.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let n = cs.len().max(1) as f64;
            LayerSummary {
                layer: l,
                families: fams,
                mean_density: cs.iter().map(|c| c.density).sum::<f64>() / n,
                mean_recall: cs.iter().map(|c| c.recall).sum::<f64>() / n,
            }
        })
        .collect()
}
