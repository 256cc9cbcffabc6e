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
/// - `top_p(p)`: the fewest best whose softmax mass reaches `p` (at least one). The weights
///   are `exp(logit - best)` by [`crate::repro::exp`] in fixed point ([`top_p_weight`]:
///   multiples of 2^-31, rounded down, of the argument rounded down to 2^-20), so that their
///   sums are exact and do not depend on the order of summation: GPU builders sum them in
///   parallel and agree bit for bit. A candidate whose weight is below 2^-31 of the best's
///   counts as no mass;
/// - `threshold(t)`: every candidate with logit `>= best + ln t`.
pub fn select(candidates: &[(u32, f64)], budget: Budget) -> Vec<u32> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let r = ranked(candidates);
    let max = r[0].1;
    let keep = match budget {
        Budget::TopK(n) => (n as usize).min(r.len()),
        Budget::TopP(p) => top_p_fixed(&r.iter().map(|(_, s)| top_p_weight(s - max)).collect::<Vec<_>>(), p),
        Budget::Threshold(t) => r.iter().take_while(|(_, s)| *s >= max + t.ln()).count().max(1),
    };
    kept_ids(&r, keep)
}

/// One for a `top_p` weight in fixed point: weights are integers in `0..=TOP_P_ONE`.
pub const TOP_P_ONE: u64 = 1 << 31;

/// Steps per unit of logit in a `top_p` weight's argument.
pub const TOP_P_STEPS: f64 = (1u64 << 20) as f64;

/// The fixed-point weight of a candidate `below` (<= 0) under the best's logit:
/// `floor(exp(x) * 2^31)` with [`crate::repro::exp`], where `x` is `below` rounded down to a
/// multiple of 2^-20, and 0 below -23 (where `exp(x) * 2^31 < 1` anyway) or for NaN.
///
/// Rounding the argument first makes the weight a function of an integer in a finite range,
/// over which a test checks that it never decreases: so a higher logit never weighs less, and
/// summing weights in order of weight (as the GPU does) is summing them in order of logit. A
/// sum over up to 2^22 candidates is exact in a u64 and in an f64.
pub fn top_p_weight(below: f64) -> u64 {
    // Scaling by powers of two is exact: floor sees the exact value both times.
    let k = (below * TOP_P_STEPS).floor();
    if k.is_nan() || k < -23.0 * TOP_P_STEPS {
        return 0;
    }
    (crate::repro::exp(k * (1.0 / TOP_P_STEPS)) * TOP_P_ONE as f64).floor() as u64
}

/// How many of the fixed-point `weights` (best first) reach `p` of their total, at least one:
/// the running sum (exact) compared with `p x total x (1 - 1e-12)` in f64, the relative
/// epsilon so that `top_p(1.0)` keeps every candidate of non-zero weight.
fn top_p_fixed(weights: &[u64], p: f64) -> usize {
    let total: u64 = weights.iter().sum();
    let goal = p * total as f64 * (1.0 - 1e-12);
    let mut acc = 0u64;
    let mut n = 0;
    for w in weights {
        acc += *w;
        n += 1;
        if acc as f64 >= goal {
            break;
        }
    }
    n.max(1)
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

    /// Every weight argument from -23 to 0 (2^20 steps per unit): the weight never decreases.
    /// With the weights 0 below, this proves top_p's weights monotone in the logit.
    #[test]
    fn top_p_weights_never_decrease() {
        let first = (-23.0 * TOP_P_STEPS) as i64;
        assert_eq!(top_p_weight(first as f64 / TOP_P_STEPS), 0);
        let mut prev = 0;
        for k in first..=0 {
            let w = top_p_weight(k as f64 / TOP_P_STEPS);
            assert!(w >= prev, "weight {w} at step {k} is below {prev} one step lower");
            prev = w;
        }
        assert_eq!(prev, TOP_P_ONE);
    }

    #[test]
    fn top_p_weights_are_fixed_point() {
        assert_eq!(top_p_weight(0.0), TOP_P_ONE);
        assert_eq!(top_p_weight(-1.0), (crate::repro::exp(-1.0) * TOP_P_ONE as f64).floor() as u64);
        // The argument is rounded down to 2^-20.
        assert_eq!(top_p_weight(-0.3), top_p_weight((-0.3 * TOP_P_STEPS).floor() / TOP_P_STEPS));
        assert_eq!(top_p_weight(f64::NEG_INFINITY), 0);
        // Below 2^-31 of the best: no mass, so top_p(1.0) does not keep it.
        assert_eq!(top_p_weight(-22.0), 0);
        let c = [(0, 0.0), (1, -30.0), (2, -0.5)];
        assert_eq!(select(&c, Budget::TopP(1.0)), vec![0, 2]);
        assert_eq!(select(&[(7, f64::NAN)], Budget::TopP(0.5)), vec![7]);
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
