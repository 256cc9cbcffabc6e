//! Budgets: which candidates a dynamic selection keeps, given their scores (logits).

use weft_dsl::Budget;

/// Orders candidates best first: higher score, then lower id. NaN ranks last.
fn ranked(candidates: &[(u32, f64)]) -> Vec<(u32, f64)> {
    let mut v: Vec<(u32, f64)> =
        candidates.iter().map(|&(i, s)| (i, if s.is_nan() { f64::NEG_INFINITY } else { s })).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The ids a budget keeps among `candidates` (id, logit), sorted by id.
///
/// - `top_k(n)`: the `n` best (all if fewer);
/// - `top_p(p)`: the fewest best whose softmax mass reaches `p` (at least one; the weights
///   `exp(logit - best)` by [`crate::repro::exp`], summed best first, so GPU builders agree);
/// - `threshold(t)`: every candidate with logit `>= best + ln t`.
pub fn select(candidates: &[(u32, f64)], budget: Budget) -> Vec<u32> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let r = ranked(candidates);
    let max = r[0].1;
    let keep = match budget {
        Budget::TopK(n) => (n as usize).min(r.len()),
        Budget::TopP(p) => top_p_count(r.iter().map(|(_, s)| crate::repro::exp(s - max)).collect(), p),
        Budget::Threshold(t) => r.iter().take_while(|(_, s)| *s >= max + t.ln()).count().max(1),
    };
    kept_ids(&r, keep)
}

/// The ids a budget keeps among `candidates` (id, mass), masses non-negative (a softmax's
/// probabilities summed, as vertical-slash estimates them), sorted by id. The same budgets as
/// [`select`] with the masses as weights rather than logits, so that no logarithm enters the
/// ranking (GPU builders reproduce it exactly):
/// - `top_k(n)`: the `n` heaviest (ties to the lower id);
/// - `top_p(p)`: the fewest heaviest whose mass reaches `p` of the total (at least one);
/// - `threshold(t)`: every candidate with mass `>= t x` the heaviest (at least one).
///
/// Candidates of zero mass are never kept.
pub fn select_mass(candidates: &[(u32, f64)], budget: Budget) -> Vec<u32> {
    let positive: Vec<(u32, f64)> = candidates.iter().copied().filter(|c| c.1 > 0.0).collect();
    if positive.is_empty() {
        return Vec::new();
    }
    let r = ranked(&positive);
    let max = r[0].1;
    let keep = match budget {
        Budget::TopK(n) => (n as usize).min(r.len()),
        Budget::TopP(p) => top_p_count(r.iter().map(|(_, m)| *m).collect(), p),
        Budget::Threshold(t) => r.iter().take_while(|(_, m)| *m >= t * max).count().max(1),
    };
    kept_ids(&r, keep)
}

/// How many of `weights` (best first) reach `p` of their total, at least one.
fn top_p_count(weights: Vec<f64>, p: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let mut n = 0;
    for w in &weights {
        acc += w;
        n += 1;
        // A relative epsilon so that top_p(1.0) keeps what rounding would drop.
        if acc >= p * total * (1.0 - 1e-12) {
            break;
        }
    }
    n
}

/// The ids of the first `keep` of `ranked`, sorted.
fn kept_ids(ranked: &[(u32, f64)], keep: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = ranked[..keep].iter().map(|(i, _)| *i).collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        let c = [(0, 1.0), (1, 3.0), (2, 2.0), (3, 3.0)];
        assert_eq!(select(&c, Budget::TopK(2)), vec![1, 3]);
        assert_eq!(select(&c, Budget::TopK(9)), vec![0, 1, 2, 3]);
        // softmax of [3, 3, 2, 1]: 0.3995, 0.3995, 0.1470, 0.0541
        assert_eq!(select(&c, Budget::TopP(0.75)), vec![1, 3]);
        assert_eq!(select(&c, Budget::TopP(0.9)), vec![1, 2, 3]);
        assert_eq!(select(&c, Budget::TopP(1.0)), vec![0, 1, 2, 3]);
        assert_eq!(select(&c, Budget::Threshold((-1.5f64).exp())), vec![1, 2, 3]);
        assert_eq!(select(&c, Budget::Threshold(1.0)), vec![1, 3]);
        assert!(select(&[], Budget::TopK(3)).is_empty());
    }

    #[test]
    fn mass_budgets() {
        let c = [(0, 0.1), (1, 0.4), (2, 0.0), (3, 0.2), (4, 0.4)];
        assert_eq!(select_mass(&c, Budget::TopK(2)), vec![1, 4]);
        assert_eq!(select_mass(&c, Budget::TopK(9)), vec![0, 1, 3, 4]);
        assert_eq!(select_mass(&c, Budget::TopP(0.7)), vec![1, 4]);
        assert_eq!(select_mass(&c, Budget::TopP(0.9)), vec![1, 3, 4]);
        assert_eq!(select_mass(&c, Budget::Threshold(0.5)), vec![1, 3, 4]);
        assert!(select_mass(&[(0, 0.0)], Budget::TopK(3)).is_empty());
    }
}
