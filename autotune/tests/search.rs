//! Pattern search on synthetic heads with planted structure: the search finds the planted
//! family, the budget mode beats a uniform density and spends its budget, density is exact,
//! and the heads chosen for a recall target reach it on exact recall.

use weft_autotune::search::*;
use weft_patterns::synthetic::{planted_qk, Plant};
use weft_patterns::{build_index, recall, IndexOptions, Universe};

const N: usize = 2048;
const D: usize = 64;

/// (plant, families that count as recovering it).
fn heads() -> Vec<(Plant, &'static [&'static str])> {
    vec![
        (Plant::Vertical(vec![3, 400, 401, 1000, 1500, 1800, 1801, 2000]), &["vertical_vector", "vertical_slash"]),
        (Plant::Vertical(vec![10, 20, 30, 1200]), &["vertical_vector", "vertical_slash"]),
        (Plant::Slashes(vec![150, 600, 1100]), &["vertical_slash", "block"]),
        (Plant::Slashes(vec![300, 900]), &["vertical_slash", "block"]),
        (Plant::Grid { stride: 16, phase: 5 }, &["grid"]),
        (Plant::Grid { stride: 32, phase: 9 }, &["grid"]),
        (Plant::Blocks { size: 64 }, &["block"]),
        (Plant::Blocks { size: 64 }, &["block"]),
        (Plant::Dense, &["dense"]),
        (Plant::Dense, &["dense"]),
    ]
}

fn scored() -> (Vec<Candidate>, Vec<HeadScores>, weft_patterns::Tensor, weft_patterns::Tensor) {
    let plants: Vec<Plant> = heads().into_iter().map(|h| h.0).collect();
    let (q, k) = planted_qk(&plants, N, D, 16.0, 42);
    let cands = candidates(N, true);
    let rows = sample_rows(N);
    let scores = evaluate_layer_on(Backend::Cpu, 0, &q, &k, &cands, true, &rows, &|| {}).unwrap();
    (cands, scores, q, k)
}

#[test]
fn target_recall_recovers_the_planted_families() {
    let (cands, scores, _, _) = scored();
    let chosen = choose_by_recall(&scores, &cands, 0.95);
    let mut hits = 0;
    for (c, (plant, want)) in chosen.iter().zip(heads()) {
        let ok = want.contains(&c.family.as_str());
        println!(
            "{} head {}: planted {:?} -> {} ({}) density {:.3} recall {:.3}",
            if ok { "ok  " } else { "MISS" },
            c.head,
            plant,
            c.family,
            c.pattern.name,
            c.density,
            c.recall
        );
        hits += usize::from(ok);
        assert!(c.recall >= 0.95 || c.family == "dense");
        // A grid is priced by what it computes on every row: planted grids choose it.
        if matches!(plant, Plant::Grid { .. }) {
            assert_eq!(c.family, "grid", "head {}", c.head);
        }
    }
    assert!(hits * 10 >= chosen.len() * 9, "recovered {hits} of {}", chosen.len());
}

#[test]
fn budget_mode_beats_a_uniform_density_and_spends_the_budget() {
    let (cands, scores, _, _) = scored();
    for budget in [0.15, 0.3] {
        let chosen = choose_by_budget(&scores, &cands, budget).unwrap();
        let mean_density = chosen.iter().map(|c| c.density).sum::<f64>() / chosen.len() as f64;
        let mean_recall = chosen.iter().map(|c| c.recall).sum::<f64>() / chosen.len() as f64;
        // Densities are exact, so this is what the kernels will compute.
        assert!(mean_density <= budget + 1e-9, "{mean_density} over {budget}");
        assert!(mean_density >= 0.98 * budget, "{mean_density} leaves more than 2% of {budget} unspent");
        // Uniform: every head at the same density, its best candidate within it.
        let uniform = scores
            .iter()
            .map(|h| h.scores.iter().filter(|s| s.density <= budget).map(|s| s.recall).fold(0.0, f64::max))
            .sum::<f64>()
            / scores.len() as f64;
        println!(
            "budget {budget}: knapsack mean recall {mean_recall:.3} at density {mean_density:.4}; uniform {uniform:.3}"
        );
        assert!(mean_recall > uniform, "{mean_recall} <= {uniform}");
    }
}

#[test]
fn density_is_exact_and_chosen_heads_reach_the_target_on_exact_recall() {
    let (cands, scores, q, k) = scored();
    let scale = 1.0 / (D as f64).sqrt();
    let causal_pairs = (N * (N + 1) / 2) as f64;
    let exact = |ci: usize| {
        let ix = build_index(&cands[ci].pattern.expr, &q, &k, &IndexOptions::default()).unwrap();
        let r = recall(&ix, &q, &k, scale, Universe::Causal, None).unwrap().per_head;
        let d: Vec<f64> = (0..q.heads).map(|h| ix.head_pairs(h) as f64 / causal_pairs).collect();
        (r, d)
    };
    // Density: equal to the full index's pairs over the causal pairs, for every family.
    let (mut sum, mut n, mut worst) = (0.0, 0, 0f64);
    for ci in [1usize, 7, 12, 17, 22, cands.len() - 1] {
        let (r, d) = exact(ci);
        for h in 0..q.heads {
            let s = &scores[h].scores[ci];
            assert!(
                (s.density - d[h]).abs() < 1e-12,
                "{} head {h}: {} vs exact {}",
                cands[ci].pattern.name,
                s.density,
                d[h]
            );
            let err = s.recall - r[h];
            // The estimate's own error bar covers its error (4 standard errors, or 0.01).
            assert!(
                err.abs() <= (4.0 * s.recall_se).max(0.01),
                "{} head {h}: {} +- {} vs {}",
                cands[ci].pattern.name,
                s.recall,
                s.recall_se,
                r[h]
            );
            sum += err.abs();
            n += 1;
            worst = worst.max(err.abs());
        }
    }
    println!("|sampled - exact| recall over {n} (candidate, head) pairs: mean {:.4}, worst {worst:.4}", sum / n as f64);
    for target in [0.9, 0.95] {
        for c in choose_by_recall(&scores, &cands, target) {
            let ci = cands.iter().position(|x| x.pattern == c.pattern).unwrap();
            let (r, d) = exact(ci);
            println!(
                "target {target} head {}: {} sampled {:.4} +- {:.4} exact {:.4}",
                c.head, c.pattern.name, c.recall, c.recall_se, r[c.head]
            );
            assert!(r[c.head] >= target, "target {target} head {}: exact recall {}", c.head, r[c.head]);
            assert!((c.density - d[c.head]).abs() < 1e-12);
        }
    }
}

#[test]
fn sample_rows_are_stratified_over_the_range_before_the_estimates() {
    for nq in [1000usize, 2048, 16384, 131_072] {
        let rows = sample_rows(nq);
        let range = nq - ESTIMATE_ROWS;
        assert_eq!(rows.len(), SAMPLED_ROWS);
        // One row per stratum, ascending, none among the last ESTIMATE_ROWS queries.
        for (i, &r) in rows.iter().enumerate() {
            assert!(
                r >= i * range / SAMPLED_ROWS && r < (i + 1) * range / SAMPLED_ROWS,
                "nq {nq} stratum {i}: row {r}"
            );
        }
        assert_eq!(sample_rows(nq), rows, "the same rows every time");
    }
    assert_eq!(sample_rows(100), (0..100).collect::<Vec<_>>());
    assert_eq!(sample_rows(300), (0..236).collect::<Vec<_>>());
}

#[test]
fn an_infeasible_budget_is_an_error() {
    let (cands, scores, _, _) = scored();
    let e = choose_by_budget(&scores, &cands, 0.001).unwrap_err().to_string();
    assert!(e.contains("raise --budget"), "{e}");
    assert!(choose_by_budget(&[], &cands, 0.1).unwrap().is_empty());
}

#[test]
fn budgets_over_thousands_of_heads_are_priced_not_tabled() {
    let (cands, scores, _, _) = scored();
    // 3,000 heads: the knapsack table would take tens of GiB at budget 1.
    let many: Vec<HeadScores> = (0..3000)
        .map(|i| HeadScores { layer: i / scores.len(), head: i % scores.len(), ..scores[i % scores.len()].clone() })
        .collect();
    for budget in [0.15, 0.3, 1.0] {
        let n = many.len() as f64;
        let big = choose_by_budget(&many, &cands, budget).unwrap();
        let density = big.iter().map(|c| c.density).sum::<f64>() / n;
        let recall = big.iter().map(|c| c.recall).sum::<f64>() / n;
        assert!(density <= budget + 1e-9, "{density} over {budget}");
        // As good as the table's answer on the distinct heads (the table rounds densities up).
        let small = choose_by_budget(&scores, &cands, budget).unwrap();
        let small_recall = small.iter().map(|c| c.recall).sum::<f64>() / small.len() as f64;
        println!("budget {budget}: priced recall {recall:.4} at density {density:.4}; table {small_recall:.4}");
        assert!(recall >= small_recall - 0.005, "{recall} vs {small_recall}");
    }
    let e = choose_by_price(&many, &cands, 0.0001).unwrap_err().to_string();
    assert!(e.contains("raise --budget"), "{e}");
}
