//! Each family's selection, recomputed independently from its definition.

use proptest::prelude::*;
use weft_dsl::builder::*;
use weft_dsl::*;
use weft_patterns::synthetic::{planted_qk, Plant};
use weft_patterns::*;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn mean_rows(t: &Tensor, h: usize, r: std::ops::Range<usize>) -> Vec<f32> {
    let n = r.len() as f64;
    (0..t.dim).map(|d| (r.clone().map(|i| t.row(h, i)[d] as f64).sum::<f64>() / n) as f32).collect()
}

/// Keys kept for query token `t` of head `h`, sorted.
fn kept(ix: &SparseIndex, h: usize, t: usize) -> Vec<usize> {
    let mut v = reference::kept_keys(ix, h, t);
    v.sort_unstable();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Vertical-vector with a threshold keeps exactly the columns within -ln(t) of the best
    /// pooled score, plus the sink and the local band.
    #[test]
    fn vertical_vector_threshold(nq in 1usize..200, t in 0.01f64..1.0, sink_n in 0u32..5, local_w in 0u32..9, seed in any::<u64>()) {
        let (q, k) = (Tensor::random(2, nq, 8, seed), Tensor::random(1, nq, 8, seed + 1));
        let e: PatternExpr = vertical_vector().q_block(64).keep(threshold(t)).sink(sink_n).local(local_w).into();
        let ix = build_index(&e, &q, &k, &IndexOptions::default()).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        for h in 0..2 {
            for g in 0..nq.div_ceil(64) {
                let rows = g * 64..((g + 1) * 64).min(nq);
                let pq = mean_rows(&q, h, rows.clone());
                let scores: Vec<(usize, f64)> = (sink_n as usize..nq).map(|c| (c, scale * dot(&pq, k.row(0, c)))).collect();
                let best = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                for row in rows {
                    let want: Vec<usize> = (0..nq)
                        .filter(|&c| {
                            c < sink_n as usize
                                || (row as i64 - c as i64).abs() < local_w as i64
                                || scores.iter().any(|&(i, s)| i == c && s >= best + t.ln())
                        })
                        .collect();
                    prop_assert_eq!(kept(&ix, h, row), want);
                }
            }
        }
    }

    /// Block top-k keeps the k best pooled blocks per query block, among the causal ones
    /// when intersected with causal.
    #[test]
    fn block_top_k_under_causal(n in 1usize..150, topk in 1u32..5, seed in any::<u64>()) {
        let (q, k) = (Tensor::random(1, n, 4, seed), Tensor::random(1, n, 4, seed + 7));
        let e = causal() & block().block_q(16).block_k(16).keep(top_k(topk));
        let ix = build_index(&e, &q, &k, &IndexOptions::default()).unwrap();
        let nb = n.div_ceil(16);
        for qb in 0..nb {
            let pq = mean_rows(&q, 0, qb * 16..((qb + 1) * 16).min(n));
            let mut cands: Vec<(usize, f64)> = (0..=qb)
                .map(|kb| (kb, dot(&pq, &mean_rows(&k, 0, kb * 16..((kb + 1) * 16).min(n))) * 0.5))
                .collect();
            cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut chosen: Vec<usize> = cands.iter().take(topk as usize).map(|x| x.0).collect();
            chosen.sort_unstable();
            for row in qb * 16..((qb + 1) * 16).min(n) {
                let want: Vec<usize> = chosen.iter().flat_map(|&kb| kb * 16..((kb + 1) * 16).min(n)).filter(|&c| c <= row).collect();
                prop_assert_eq!(kept(&ix, 0, row), want);
            }
        }
    }

    /// Retrieval keeps exactly the top-k units by its score plus the sink and recent tokens.
    #[test]
    fn retrieval_keeps_top_k_units(nk in 1usize..300, page in prop::sample::select(vec![4u32, 16]),
            topk in 1u32..6, sink_n in 0u32..6, recent in 0u32..20, seed in any::<u64>(),
            which in 0usize..4) {
        let (q, k) = (Tensor::random(2, 1, 8, seed), Tensor::random(1, nk, 8, seed + 3));
        let (unit, score) = match which {
            0 => (Unit::Page(page), Score::MinMax),
            1 => (Unit::Token, Score::Quantized(4)),
            2 => (Unit::Page(page), Score::Quantized(8)),
            _ => (Unit::Cluster(page), Score::Centroid),
        };
        let r = retrieval().unit(unit).score(score).budget(top_k(topk)).sink(sink_n).recent(recent);
        let ix = build_index(&r.clone().into(), &q, &k, &IndexOptions::default()).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        for h in 0..2 {
            let qrow = q.row(h, 0);
            // Units and their tokens, from the definition.
            let (units, cents) = retrieval::units(&r, &k, 0);
            let forced = |t: usize| t < sink_n as usize || t + recent as usize >= nk;
            let mut scored: Vec<(usize, f64)> = units.iter().enumerate()
                .filter(|(_, toks)| toks.iter().any(|&t| !forced(t)))
                .map(|(u, toks)| {
                    let s = match score {
                        Score::MinMax => (0..8).map(|d| {
                            let lo = toks.iter().map(|&t| k.row(0, t)[d] as f64).fold(f64::INFINITY, f64::min);
                            let hi = toks.iter().map(|&t| k.row(0, t)[d] as f64).fold(f64::NEG_INFINITY, f64::max);
                            (qrow[d] as f64 * lo).max(qrow[d] as f64 * hi)
                        }).sum::<f64>(),
                        Score::Quantized(b) => toks.iter().map(|&t| dot(qrow, &retrieval::quantize(k.row(0, t), b))).fold(f64::NEG_INFINITY, f64::max),
                        Score::Centroid => qrow.iter().zip(&cents[u]).map(|(a, c)| *a as f64 * c).sum::<f64>(),
                    };
                    (u, scale * s)
                })
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut want: Vec<usize> = (0..nk).filter(|&t| forced(t)).collect();
            for (u, _) in scored.iter().take(topk as usize) {
                want.extend(&units[*u]);
            }
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(kept(&ix, h, 0), want);
        }
    }
}

#[test]
fn quantize_is_symmetric_and_bounded() {
    let row = [0.5f32, -1.0, 0.26, 0.0];
    assert_eq!(retrieval::quantize(&row, 2), vec![1.0, -1.0, 0.0, 0.0]);
    let q8 = retrieval::quantize(&row, 8);
    for (a, b) in row.iter().zip(&q8) {
        assert!((a - b).abs() <= 1.0 / 127.0 / 2.0 + 1e-6);
    }
    assert_eq!(retrieval::quantize(&row, 1), vec![0.44, -0.44, 0.44, 0.44]);
}

#[test]
fn vertical_slash_finds_planted_columns_and_diagonals() {
    // Head 0: vertical columns 5, 77, 130; head 1: diagonals every 16 tokens.
    let n = 256;
    let (q, k) = planted_qk(&[Plant::Vertical(vec![5, 77, 130]), Plant::Diagonal(16)], n, 32, 8.0, 3);
    let e = causal() & vertical_slash().block(32).last_q(32).vertical(top_k(3)).slash(top_k(16));
    let resolved = resolve_pattern(&e, &q, &k, &IndexOptions::default()).unwrap();
    let ix = resolved.index().unwrap();
    // Every query after column 130 attends to the three planted columns.
    for t in 131..n {
        let keys = kept(&ix, 0, t);
        for c in [5, 77, 130] {
            assert!(keys.contains(&c), "row {t} misses column {c}");
        }
    }
    // The 16 planted diagonals (offsets 0, 16, ..., 240) are the slashes: rows keep their tiles.
    for t in 40..n {
        let keys = kept(&ix, 1, t);
        assert!(keys.contains(&t) && keys.contains(&(t - 16)), "row {t}");
    }
    let r = recall(&ix, &q, &k, resolved.scale, Universe::Causal, None).unwrap();
    assert!(r.per_head[0] > 0.5 && r.per_head[1] > 0.95, "{r:?}");
    assert!(ix.density() < 0.5);
}

#[test]
fn grid_recovers_the_planted_phase() {
    let (q, k) =
        planted_qk(&[Plant::Grid { stride: 8, phase: 3 }, Plant::Grid { stride: 8, phase: 6 }], 200, 16, 8.0, 5);
    let e: PatternExpr = grid(8).lines(GridLines::Cols).into();
    let ix = build_index(&e, &q, &k, &IndexOptions::default()).unwrap();
    assert_eq!(kept(&ix, 0, 10), (3..200).step_by(8).collect::<Vec<_>>());
    assert_eq!(kept(&ix, 1, 10), (6..200).step_by(8).collect::<Vec<_>>());
    // Rows: query 3 + 8j attends to everything.
    let e: PatternExpr = grid(8).phase(3).lines(GridLines::Rows).sink(2).into();
    let ix = build_index(&e, &q, &k, &IndexOptions::default()).unwrap();
    assert_eq!(kept(&ix, 0, 11).len(), 200);
    assert_eq!(kept(&ix, 0, 12), vec![0, 1]);
}

#[test]
fn recall_is_one_for_full_and_falls_with_density() {
    let (q, k) = (Tensor::random(2, 300, 16, 9), Tensor::random(2, 300, 16, 10));
    let o = IndexOptions::default();
    let full_ix = build_index(&full(), &q, &k, &o).unwrap();
    let r = recall(&full_ix, &q, &k, 0.25, Universe::All, None).unwrap();
    assert!((r.mean - 1.0).abs() < 1e-12 && (r.min - 1.0).abs() < 1e-12);
    assert!((full_ix.density() - 1.0).abs() < 1e-12);
    let w = build_index(&window(32), &q, &k, &o).unwrap();
    let rw = recall(&w, &q, &k, 0.25, Universe::Causal, Some(50)).unwrap();
    assert!(rw.mean < 1.0 && rw.mean > 0.05, "{rw:?}");
    assert_eq!(rw.rows, 50);
    // The sample ends with the last row.
    assert_eq!(*metrics::sample_rows(300, Some(50)).last().unwrap(), 299);
}

/// Builds that share last-query estimates (as the pattern search's candidates do) give the same
/// indexes as builds that compute their own, for several vertical-slash and grid candidates
/// under different contexts, and a cache used with other tensors does not leak into them.
#[test]
fn shared_estimates_give_the_same_indexes() {
    let plants = vec![Plant::Slashes(vec![40]), Plant::Vertical(vec![3, 200]), Plant::Grid { stride: 16, phase: 5 }];
    let (q, k) = planted_qk(&plants, 500, 16, 6.0, 11);
    let (q2, k2) = planted_qk(&plants, 500, 16, 6.0, 12);
    let patterns: Vec<PatternExpr> = vec![
        causal() & vertical_slash().vertical(top_k(16)).slash(top_k(4)),
        causal() & vertical_slash().vertical(top_k(64)).slash(top_k(8)),
        vertical_slash().vertical(top_p(0.5)).slash(top_k(2)).into(),
        causal() & (sink(8) | grid(16)),
        causal() & grid(32),
        grid(16).into(),
    ];
    let shared = Some(std::sync::Arc::new(Estimates::default()));
    for (q, k) in [(&q, &k), (&q2, &k2)] {
        for p in &patterns {
            let alone = build_index(p, q, k, &IndexOptions::default()).unwrap();
            let with = build_index(p, q, k, &IndexOptions { estimates: shared.clone(), ..Default::default() }).unwrap();
            assert_eq!(alone, with, "{p}");
        }
    }
}

proptest! {
    /// A grid's row lines per query block keep exactly the rows `q % stride == phase`, over
    /// any rows of one block (regions may start inside a block) and over rows spanning blocks.
    #[test]
    fn row_line_masks_keep_the_phase_rows(
        stride in 1usize..80, phase_seed in any::<usize>(), block_m in 1usize..130, q0 in 0usize..600, len in 1usize..200,
    ) {
        use weft_patterns::families::RowLines;
        let phase = phase_seed % stride;
        let lines = RowLines { stride, phase: Some(phase), block_m };
        // One block: from q0 to the block's end; then any span.
        let block_end = (q0 / block_m + 1) * block_m;
        for (a, b) in [(q0, block_end.min(q0 + len)), (q0, q0 + len)] {
            let p = lines.pred_over(a, b);
            for q in a..b {
                let env = Env { q: q as i64, k: 0, h: 0, nq: 1 << 20, nk: 1 << 20 };
                prop_assert_eq!(p.eval(&env), q % stride == phase, "{} over {}..{} at q = {}", p, a, b, q);
            }
        }
    }
}
