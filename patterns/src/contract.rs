//! The contract of a selection made from approximate scores.
//!
//! [`crate::select::select`] is exact: it ranks f64 logits. A GPU builder that scores in one
//! tensor-core pass (bf16 or fp16 inputs, f32 accumulation) sees every logit within some `eps`
//! of the exact one, and its choice may differ where candidates are that close. Such a choice
//! is still right if the exact budget could have made it under logits perturbed by at most
//! `eps` each; [`check_choice`] says whether it could, from the exact logits:
//! - `top_k(n)`: `min(n, candidates)` kept, and no dropped candidate more than `2 eps` above a
//!   kept one;
//! - `threshold(t)`, `t <= 1`: kept ones at least `best + ln t - 2 eps`, dropped ones below
//!   `best + ln t + 2 eps`, at least one kept; `t > 1` keeps one, within `2 eps` of the best;
//! - `top_p(p)`: the ranking condition of `top_k`, and the kept softmax share at least
//!   `p e^(-4 eps)` while without its weakest member it is below `p e^(4 eps)` (each weight,
//!   normalised, moves by at most `e^(2 eps)` either way, so a share by `e^(4 eps)`).
//!
//! With `eps = 0` the contract is the exact choice up to ties (which [`crate::select::select`]
//! breaks to the lower id). Shares get a slack of [`SHARE_SLACK`] for the fixed-point weights
//! the exact `top_p` sums.

use weft_dsl::Budget;

/// Absolute slack on softmax shares: `top_p`'s fixed-point weights are rounded down to 2^-31
/// of the best's (and weights below that count as none), so over up to ~2000 candidates its
/// shares are within 1e-6 of the real ones.
pub const SHARE_SLACK: f64 = 1e-6;

/// What a choice breaks.
#[derive(Clone, Debug, PartialEq)]
pub enum Violation {
    /// A chosen id that is not a candidate, or chosen twice.
    NotACandidate(u32),
    /// The wrong number kept (`top_k`, or none at all).
    Count { want: usize, got: usize },
    /// A dropped candidate scores more than `2 eps` above a kept one.
    Order { kept: (u32, f64), dropped: (u32, f64) },
    /// A kept candidate below a threshold's cut, or a dropped one above it (`cut` less or
    /// plus `2 eps`).
    Threshold { id: u32, logit: f64, cut: f64 },
    /// The kept softmax share is too small, or stays large enough without its weakest member.
    Share { kept: f64, without_weakest: f64, p: f64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotACandidate(id) => write!(f, "{id} is chosen twice or is not a candidate"),
            Violation::Count { want, got } => write!(f, "{got} kept, {want} expected"),
            Violation::Order { kept, dropped } => {
                write!(
                    f,
                    "dropped {} ({}) scores above kept {} ({}) by more than 2 eps",
                    dropped.0, dropped.1, kept.0, kept.1
                )
            }
            Violation::Threshold { id, logit, cut } => {
                write!(f, "{id} ({logit}) is on the wrong side of the cut {cut}")
            }
            Violation::Share { kept, without_weakest, p } => {
                write!(f, "kept share {kept}, {without_weakest} without its weakest, for top_p({p})")
            }
        }
    }
}

/// Whether `chosen` is a choice of `budget` among `candidates` (id, exact logit) that logits
/// within `eps` of these allow (see the module docs). NaN logits rank last, as in `select`.
pub fn check_choice(candidates: &[(u32, f64)], chosen: &[u32], budget: Budget, eps: f64) -> Result<(), Violation> {
    let logit = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    let mut kept: Vec<(u32, f64)> = Vec::with_capacity(chosen.len());
    let mut taken = std::collections::HashSet::with_capacity(chosen.len());
    for &id in chosen {
        let Some(&(_, s)) = candidates.iter().find(|c| c.0 == id) else { return Err(Violation::NotACandidate(id)) };
        if !taken.insert(id) {
            return Err(Violation::NotACandidate(id));
        }
        kept.push((id, logit(s)));
    }
    let dropped: Vec<(u32, f64)> =
        candidates.iter().filter(|c| !taken.contains(&c.0)).map(|&(id, s)| (id, logit(s))).collect();
    if candidates.is_empty() {
        return if chosen.is_empty() { Ok(()) } else { Err(Violation::Count { want: 0, got: chosen.len() }) };
    }
    if kept.is_empty() {
        return Err(Violation::Count { want: 1, got: 0 });
    }
    let weakest = *kept.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("kept is not empty");
    let strongest_dropped = dropped.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
    let ordered = || match strongest_dropped {
        Some(d) if d.1 > weakest.1 + 2.0 * eps => Err(Violation::Order { kept: weakest, dropped: d }),
        _ => Ok(()),
    };
    let best = candidates.iter().map(|c| logit(c.1)).fold(f64::NEG_INFINITY, f64::max);
    match budget {
        Budget::TopK(n) => {
            let want = (n as usize).min(candidates.len());
            if kept.len() != want {
                return Err(Violation::Count { want, got: kept.len() });
            }
            ordered()
        }
        Budget::Threshold(t) if t > 1.0 => {
            if kept.len() != 1 {
                return Err(Violation::Count { want: 1, got: kept.len() });
            }
            ordered()
        }
        Budget::Threshold(t) => {
            let cut = best + t.ln();
            if let Some(&(id, s)) = kept.iter().find(|k| k.1 < cut - 2.0 * eps) {
                // Unless it is the one kept because nothing reached the cut.
                if !(kept.len() == 1 && s >= best - 2.0 * eps && dropped.iter().all(|d| d.1 < cut + 2.0 * eps)) {
                    return Err(Violation::Threshold { id, logit: s, cut });
                }
            }
            match dropped.iter().find(|d| d.1 >= cut + 2.0 * eps) {
                Some(&(id, s)) => Err(Violation::Threshold { id, logit: s, cut }),
                None => Ok(()),
            }
        }
        Budget::TopP(p) => {
            ordered()?;
            if best == f64::NEG_INFINITY {
                return Ok(());
            }
            let weight = |s: f64| (s - best).exp();
            let total: f64 = candidates.iter().map(|c| weight(logit(c.1))).sum();
            let share: f64 = kept.iter().map(|k| weight(k.1)).sum::<f64>() / total;
            let without = share - weight(weakest.1) / total;
            let (lo, hi) = ((-4.0 * eps).exp(), (4.0 * eps).exp());
            if share < p.min(1.0) * lo - SHARE_SLACK || without >= p * hi + SHARE_SLACK {
                return Err(Violation::Share { kept: share, without_weakest: without, p });
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::select::select;

    fn budgets() -> impl Strategy<Value = Budget> {
        prop_oneof![
            (1u32..40).prop_map(Budget::TopK),
            (0.05f64..1.0).prop_map(Budget::TopP),
            (0.01f64..1.0).prop_map(Budget::Threshold),
            (1.5f64..3.0).prop_map(Budget::Threshold),
        ]
    }

    proptest! {
        /// The exact choice keeps the contract with no room, and a choice from logits moved by
        /// up to eps keeps it with eps.
        #[test]
        fn exact_and_perturbed_choices_keep_the_contract(
            logits in prop::collection::vec(-8.0f64..8.0, 1..60),
            noise in prop::collection::vec(-1.0f64..1.0, 60),
            budget in budgets(),
            eps in 0.0f64..0.3,
        ) {
            let exact: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, s)| (i as u32, *s)).collect();
            let chosen = select(&exact, budget);
            prop_assert_eq!(check_choice(&exact, &chosen, budget, 0.0), Ok(()));
            let seen: Vec<(u32, f64)> = exact.iter().zip(&noise).map(|(&(i, s), n)| (i, s + n * eps)).collect();
            let chosen = select(&seen, budget);
            prop_assert_eq!(check_choice(&exact, &chosen, budget, eps), Ok(()));
        }

        /// Swapping a kept candidate for a dropped one more than 2 eps below it breaks it.
        #[test]
        fn a_choice_that_skips_a_clearly_better_candidate_breaks_it(
            logits in prop::collection::vec(-8.0f64..8.0, 2..60),
            n in 1u32..30,
            eps in 0.0f64..0.3,
        ) {
            let exact: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, s)| (i as u32, *s)).collect();
            let budget = Budget::TopK(n);
            let mut chosen = select(&exact, budget);
            let best_kept = *chosen.iter().max_by(|a, b| exact[**a as usize].1.total_cmp(&exact[**b as usize].1)).unwrap();
            let worst_dropped = exact.iter().filter(|c| !chosen.contains(&c.0)).min_by(|a, b| a.1.total_cmp(&b.1)).copied();
            if let Some((d, s)) = worst_dropped {
                if exact[best_kept as usize].1 > s + 2.0 * eps {
                    chosen.retain(|c| *c != best_kept);
                    chosen.push(d);
                    prop_assert!(check_choice(&exact, &chosen, budget, eps).is_err());
                }
            }
        }
    }

    #[test]
    fn violations_name_what_is_wrong() {
        let c = [(0, 1.0), (1, 3.0), (2, 2.0), (3, 3.0)];
        assert_eq!(check_choice(&c, &[1, 3], Budget::TopK(2), 0.0), Ok(()));
        assert_eq!(check_choice(&c, &[1], Budget::TopK(2), 0.0), Err(Violation::Count { want: 2, got: 1 }));
        assert!(matches!(check_choice(&c, &[1, 9], Budget::TopK(2), 0.0), Err(Violation::NotACandidate(9))));
        assert!(matches!(check_choice(&c, &[1, 1], Budget::TopK(2), 0.0), Err(Violation::NotACandidate(1))));
        // 2.0 for 3.0: wrong exactly, allowed when logits may be off by 0.5 each.
        assert!(matches!(check_choice(&c, &[1, 2], Budget::TopK(2), 0.0), Err(Violation::Order { .. })));
        assert_eq!(check_choice(&c, &[1, 2], Budget::TopK(2), 0.5), Ok(()));
        let t = Budget::Threshold((-1.5f64).exp());
        assert_eq!(check_choice(&c, &[1, 2, 3], t, 0.0), Ok(()));
        assert!(matches!(check_choice(&c, &[1, 3], t, 0.0), Err(Violation::Threshold { id: 2, .. })));
        assert!(matches!(check_choice(&c, &[1, 3], Budget::TopP(0.9), 0.0), Err(Violation::Share { .. })));
        assert_eq!(check_choice(&c, &[1, 2, 3], Budget::TopP(0.9), 0.0), Ok(()));
        assert!(check_choice(&c, &[], Budget::TopP(0.9), 0.0).is_err());
        assert_eq!(check_choice(&[], &[], Budget::TopK(2), 0.0), Ok(()));
        assert!(Violation::Count { want: 2, got: 1 }.to_string().contains("1 kept, 2 expected"));
    }
}
