//! Property tests of the semantics: the compressed index keeps exactly the pattern's pairs,
//! reference attention over it equals naive masked attention, union and intersection behave
//! as set operations, permuted equals direct, and a ring of workers equals one worker.

use proptest::prelude::*;
use weft_dsl::builder::*;
use weft_dsl::*;
use weft_patterns::reference::{attention, dense_attention};
use weft_patterns::*;

/// Inputs: Q [hq, nq, d], K and V [hkv, nk, d] with GQA, fresh random values.
#[derive(Clone, Debug)]
struct Shape {
    hq: usize,
    hkv: usize,
    nq: usize,
    nk: usize,
    d: usize,
    seed: u64,
}

fn arb_shape() -> impl Strategy<Value = Shape> {
    (
        prop::sample::select(vec![(1usize, 1usize), (2, 1), (4, 2)]),
        1usize..80,
        0usize..3,
        prop::sample::select(vec![4usize, 8]),
        any::<u64>(),
    )
        .prop_map(|((hq, hkv), nq, extra, d, seed)| {
            // Mostly square; sometimes more keys than queries (chunked prefill, decode).
            let nk = nq + extra * 13;
            Shape { hq, hkv, nq, nk, d, seed }
        })
}

struct Qkv {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn inputs(s: &Shape) -> Qkv {
    Qkv {
        q: Tensor::random(s.hq, s.nq, s.d, s.seed),
        k: Tensor::random(s.hkv, s.nk, s.d, s.seed ^ 0x9e37),
        v: Tensor::random(s.hkv, s.nk, s.d + 1, s.seed ^ 0x51ed),
    }
}

fn arb_pred() -> impl Strategy<Value = Pred> {
    let leaf = prop_oneof![
        Just(causal()),
        (1u32..20).prop_map(sink),
        (1u32..30).prop_map(local),
        (1u32..30).prop_map(window),
        (2i64..9, 0i64..9).prop_map(|(m, r)| pred((k() % m).eq(lit(r % m)))),
        (2i64..40).prop_map(|b| pred((q() / b).eq(k() / b))),
        (0i64..3, 1u32..10).prop_map(|(hh, n)| pred(h().eq(lit(hh)).or(k().lt(lit(n.into()))))),
        (1i64..60).prop_map(|c| pred((q() - k()).max(k() - q()).ge(lit(c)))),
    ]
    .prop_map(|e| match e {
        PatternExpr::Static(p) => p,
        _ => Pred::Const(false),
    });
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.and(b)),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.or(b)),
            inner.prop_map(|a| !a),
        ]
    })
}

fn arb_budget() -> impl Strategy<Value = Budget> {
    prop_oneof![(1u32..6).prop_map(top_k), (0.3f64..1.0).prop_map(top_p), (0.05f64..1.0).prop_map(threshold)]
}

fn arb_dynamic() -> impl Strategy<Value = PatternExpr> {
    prop_oneof![
        (prop::sample::select(vec![16u32, 32]), prop::sample::select(vec![16u32, 32]), arb_budget())
            .prop_map(|(bq, bk, b)| block().block_q(bq).block_k(bk).keep(b).into()),
        (prop::sample::select(vec![16u32, 32]), arb_pred()).prop_map(|(b, p)| block()
            .block_q(b)
            .block_k(b)
            .keep_where(p)
            .into()),
        (prop::sample::select(vec![64u32, 128]), arb_budget(), 0u32..6, 0u32..12)
            .prop_map(|(qb, b, s, l)| vertical_vector().q_block(qb).keep(b).sink(s).local(l).into()),
        (prop::sample::select(vec![16u32, 32]), 1u32..20, arb_budget(), arb_budget())
            .prop_map(|(b, lq, v, s)| vertical_slash().block(b).last_q(lq).vertical(v).slash(s).into()),
        (
            2u32..9,
            prop::option::of(0u32..2),
            prop::sample::select(vec![GridLines::Rows, GridLines::Cols, GridLines::Both]),
            0u32..4
        )
            .prop_map(|(st, ph, lines, sk)| {
                let g = grid(st).lines(lines).sink(sk);
                match ph {
                    Some(p) => g.phase(p % st).into(),
                    None => g.into(),
                }
            }),
    ]
}

fn arb_pattern() -> impl Strategy<Value = PatternExpr> {
    let leaf = prop_oneof![arb_pred().prop_map(PatternExpr::Static), arb_dynamic()];
    prop_oneof![
        leaf.clone(),
        (leaf.clone(), leaf.clone()).prop_map(|(a, b)| a | b),
        (leaf.clone(), leaf.clone()).prop_map(|(a, b)| a & b),
        (leaf.clone(), leaf.clone(), leaf).prop_map(|(a, b, c)| (a | b) & c),
    ]
}

/// Every pair of every head, in token coordinates.
fn pairs(s: &Shape) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..s.hq).flat_map(move |h| (0..s.nq).flat_map(move |q| (0..s.nk).map(move |k| (h, q, k))))
}

/// The index keeps exactly the resolved pattern's pairs, lists each once, and counts them right.
fn check_index_exact(
    expr: &PatternExpr,
    s: &Shape,
    x: &Qkv,
    opts: &IndexOptions,
) -> Result<SparseIndex, TestCaseError> {
    let resolved = resolve_pattern(expr, &x.q, &x.k, opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ix = resolved.index().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut count = 0u64;
    for (h, q, k) in pairs(s) {
        let want = resolved.contains_token(h, q, k);
        prop_assert_eq!(ix.contains_token(h, q, k), want, "pair h={} q={} k={} of {}", h, q, k, expr);
        count += u64::from(want);
    }
    prop_assert_eq!(ix.pairs(), count);
    for h in 0..s.hq {
        for qpos in 0..s.nq {
            let mut keys = Vec::new();
            ix.for_each_key(h, qpos, |k| keys.push(k));
            let n = keys.len();
            prop_assert_eq!(ix.row_len(h, qpos), n, "row_len of row {}", qpos);
            keys.sort_unstable();
            keys.dedup();
            prop_assert_eq!(keys.len(), n, "a key listed twice in row {}", qpos);
        }
    }
    Ok(ix)
}

fn close(a: &Attention, b: &Attention, tol: f64) -> Result<(), TestCaseError> {
    for (i, (x, y)) in a.out.data.iter().zip(&b.out.data).enumerate() {
        prop_assert!((f64::from(*x) - f64::from(*y)).abs() <= tol, "out[{}]: {} vs {}", i, x, y);
    }
    for (i, (x, y)) in a.lse.iter().zip(&b.lse).enumerate() {
        prop_assert!(x == y || (x - y).abs() <= tol, "lse[{}]: {} vs {}", i, x, y);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn static_index_covers_exactly_the_predicate(p in arb_pred(), s in arb_shape(),
            bm in prop::sample::select(vec![16usize, 32, 64]), bn in prop::sample::select(vec![16usize, 32, 64])) {
        let x = inputs(&s);
        let opts = IndexOptions { block_m: Some(bm), block_n: Some(bn), ..Default::default() };
        let ix = check_index_exact(&PatternExpr::Static(p.clone()), &s, &x, &opts)?;
        for (h, q, k) in pairs(&s) {
            let env = Env { q: q as i64, k: k as i64, h: h as i64, nq: s.nq as i64, nk: s.nk as i64 };
            prop_assert_eq!(ix.contains(h, q, k), p.eval(&env));
        }
    }

    /// Pair counts (density's numerator) agree with membership, per head and per row.
    #[test]
    fn pair_counts_match_membership(e in arb_pattern(), s in arb_shape()) {
        let x = inputs(&s);
        let ix = build_index(&e, &x.q, &x.k, &IndexOptions::default()).unwrap();
        for h in 0..s.hq {
            let mut total = 0u64;
            for q in 0..s.nq {
                let row = (0..s.nk).filter(|&k| ix.contains(h, q, k)).count();
                prop_assert_eq!(ix.row_len(h, q), row, "head {} row {}", h, q);
                total += row as u64;
            }
            prop_assert_eq!(ix.head_pairs(h), total, "head {}", h);
            prop_assert_eq!(ix.pairs_per_head()[h], total, "head {}", h);
        }
    }

    #[test]
    fn reference_over_index_equals_dense_masked(e in arb_pattern(), s in arb_shape()) {
        let x = inputs(&s);
        let opts = IndexOptions::default();
        check_index_exact(&e, &s, &x, &opts)?;
        let resolved = resolve_pattern(&e, &x.q, &x.k, &opts).unwrap();
        let ix = resolved.index().unwrap();
        let scale = resolved.scale;
        let sparse = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
        let dense = dense_attention(|h, q, k| resolved.contains_token(h, q, k), &x.q, &x.k, &x.v, scale).unwrap();
        close(&sparse, &dense, 1e-6)?;
    }

    #[test]
    fn union_and_intersection_are_set_operations(a in arb_pattern(), b in arb_pattern(), p in arb_pred(), s in arb_shape()) {
        let x = inputs(&s);
        let o = IndexOptions { block_m: Some(16), block_n: Some(16), ..Default::default() };
        let ix = |e: PatternExpr| build_index(&e, &x.q, &x.k, &o).unwrap();
        let (ia, ib) = (ix(a.clone()), ix(b.clone()));
        let uab = ix(a.clone() | b.clone());
        let uba = ix(b.clone() | a.clone());
        let aa = ix(a.clone() | a.clone());
        let af = ix(a.clone() & full());
        // Static operands of an intersection only restrict: D & p is inside p.
        let ap = ix(a.clone() & PatternExpr::Static(p.clone()));
        for (h, q, k) in pairs(&s) {
            let (ina, inb) = (ia.contains(h, q, k), ib.contains(h, q, k));
            prop_assert_eq!(uab.contains(h, q, k), ina || inb);
            prop_assert_eq!(uba.contains(h, q, k), ina || inb);
            prop_assert_eq!(aa.contains(h, q, k), ina);
            prop_assert_eq!(af.contains(h, q, k), ina);
            let env = Env { q: q as i64, k: k as i64, h: h as i64, nq: s.nq as i64, nk: s.nk as i64 };
            if ap.contains(h, q, k) {
                prop_assert!(p.eval(&env));
            }
        }
        // For static operands the intersection is exact.
        let sp = ix(PatternExpr::Static(p.clone()) & causal());
        for (h, q, k) in pairs(&s) {
            let env = Env { q: q as i64, k: k as i64, h: h as i64, nq: s.nq as i64, nk: s.nk as i64 };
            prop_assert_eq!(sp.contains(h, q, k), p.eval(&env) && k + s.nq <= q + s.nk);
        }
        prop_assert_eq!(Pattern::new("x", a.clone() | b.clone()).hash(), Pattern::new("y", b | a).hash());
    }

    #[test]
    fn permuted_equals_direct(inner in arb_pattern(), stride in 1u32..9, s in arb_shape()) {
        let x = inputs(&s);
        let perm = Permutation::Stride(stride);
        let e = permuted(perm, inner.clone());
        let o = IndexOptions::default();
        let ix = check_index_exact(&e, &s, &x, &o)?;
        let scale = 1.0 / (s.d as f64).sqrt();
        // Direct: permute the tensors for real, run the inner pattern there, un-permute rows.
        let pq = x.q.gather_tokens(|i| permute::inverse(perm, i, s.nq));
        let pk = x.k.gather_tokens(|i| permute::inverse(perm, i, s.nk));
        let pv = x.v.gather_tokens(|i| permute::inverse(perm, i, s.nk));
        let direct_ix = build_index(&inner, &pq, &pk, &o).unwrap();
        let direct = attention(&direct_ix, &pq, &pk, &pv, scale).unwrap();
        let virt = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
        for h in 0..s.hq {
            for t in 0..s.nq {
                let i = permute::forward(perm, t, s.nq);
                for (a, b) in virt.out.row(h, t).iter().zip(direct.out.row(h, i)) {
                    prop_assert!((a - b).abs() <= 1e-6, "{} vs {}", a, b);
                }
                let (a, b) = (virt.lse[h * s.nq + t], direct.lse[h * s.nq + i]);
                prop_assert!(a == b || (a - b).abs() <= 1e-9);
            }
        }
        // A static inner predicate reads permuted positions.
        if let PatternExpr::Static(p) = &inner {
            for (h, q, k) in pairs(&s) {
                let env = Env { q: permute::forward(perm, q, s.nq) as i64, k: permute::forward(perm, k, s.nk) as i64,
                    h: h as i64, nq: s.nq as i64, nk: s.nk as i64 };
                prop_assert_eq!(ix.contains_token(h, q, k), p.eval(&env));
            }
        }
    }

    #[test]
    fn ring_of_workers_equals_one_worker(e in arb_pattern(), workers in 1usize..6,
            layout in prop::sample::select(vec![RingLayout::Contiguous, RingLayout::ZigZag, RingLayout::Striped(3), RingLayout::Striped(16)]),
            s in arb_shape()) {
        let x = inputs(&s);
        let ringed = ring(workers as u32, layout, e.clone());
        let ix = build_index(&ringed, &x.q, &x.k, &IndexOptions::default()).unwrap();
        let plain = build_index(&e, &x.q, &x.k, &IndexOptions::default()).unwrap();
        prop_assert_eq!(&ix, &plain);
        let scale = 0.3;
        let one = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
        let many = ring::ring_attention(&ix, &x.q, &x.k, &x.v, scale, workers, layout).unwrap();
        close(&one, &many, 1e-6)?;
        // Every token has exactly one worker, and the shards of one step are a partition.
        let parts = ring::worker_tokens(layout, s.nk, workers);
        prop_assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), s.nk);
        let mut seen: Vec<usize> = (0..workers).map(|w| ring::shard_at_step(w, 1, workers)).collect();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..workers).collect::<Vec<_>>());
    }
}

#[test]
fn zigzag_balances_causal_work() {
    // With causal attention, zig-zag gives each worker nearly the same number of pairs.
    let (n, w) = (1024usize, 4usize);
    let work = |layout| {
        let mut per = vec![0u64; w];
        for t in 0..n {
            per[ring::worker_of(layout, t, n, w)] += t as u64 + 1;
        }
        let max = *per.iter().max().unwrap() as f64;
        let min = *per.iter().min().unwrap() as f64;
        max / min
    };
    assert!(work(RingLayout::ZigZag) < 1.01);
    assert!(work(RingLayout::Contiguous) > 3.0);
}

#[test]
fn causal_index_marks_full_and_partial_blocks() {
    let (q, k) = (Tensor::random(1, 100, 4, 1), Tensor::random(1, 100, 4, 2));
    let ix =
        build_index(&causal(), &q, &k, &IndexOptions { block_m: Some(32), block_n: Some(32), ..Default::default() })
            .unwrap();
    // 4 query blocks: the diagonal blocks are partial, those below are full.
    assert_eq!(ix.entry_counts(), (6, 4, 0));
    assert_eq!(ix.pairs(), 100 * 101 / 2);
    assert_eq!(ix.masks.len(), 1);
}

#[test]
fn bad_inputs_are_errors() {
    let q = Tensor::random(3, 10, 4, 1);
    let k = Tensor::random(2, 10, 4, 2);
    let e = build_index(&causal(), &q, &k, &IndexOptions::default()).unwrap_err().to_string();
    assert!(e.contains("multiple of the key heads"), "{e}");
    let mut k = Tensor::random(1, 10, 4, 2);
    k.data[13] = f32::NAN;
    let e = build_index(&causal(), &q, &k, &IndexOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`k` holds a NaN or infinity at head 0, token 3"), "{e}");
    let k = Tensor::random(1, 10, 4, 2);
    let e = build_index(&vertical_vector().into(), &q, &k, &IndexOptions { block_m: Some(48), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not divide"), "{e}");
    assert!(Tensor::new(1, 2, 3, vec![0.0; 5]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Ring steps partition the index, and their partial attentions merge to the whole.
    #[test]
    fn ring_steps_partition_and_merge(e in arb_pattern(), workers in 1usize..5,
            layout in prop::sample::select(vec![RingLayout::Contiguous, RingLayout::ZigZag, RingLayout::Striped(3), RingLayout::Striped(16)]),
            s in arb_shape()) {
        let x = inputs(&s);
        let ix = build_index(&e, &x.q, &x.k, &IndexOptions::default()).unwrap();
        let steps: Vec<SparseIndex> = (0..workers).map(|st| ring::step_index(&ix, layout, workers, st).unwrap()).collect();
        for (h, q, k) in pairs(&s) {
            let owners = steps.iter().filter(|st| st.contains(h, q, k)).count();
            prop_assert_eq!(owners, usize::from(ix.contains(h, q, k)), "pair {} {} {}", h, q, k);
            // The step of a pair is the one its key's shard is visited at.
            for (st, sx) in steps.iter().enumerate() {
                if sx.contains(h, q, k) {
                    let (wq, wk) = (ring::worker_of(layout, q, s.nq, workers), ring::worker_of(layout, k, s.nk, workers));
                    prop_assert_eq!(ring::shard_at_step(wq, st, workers), wk);
                }
            }
        }
        let scale = 0.4;
        let whole = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
        let parts: Vec<Attention> = steps.iter().map(|st| attention(st, &x.q, &x.k, &x.v, scale).unwrap()).collect();
        for h in 0..s.hq {
            for t in 0..s.nq {
                let ps: Vec<reference::Partial> = parts.iter().map(|a| reference::Partial {
                    out: a.out.row(h, t).iter().map(|v| f64::from(*v)).collect(),
                    lse: a.lse[h * s.nq + t],
                }).collect();
                let m = reference::merge(&ps, s.d + 1);
                for (a, b) in m.out.iter().zip(whole.out.row(h, t)) {
                    prop_assert!((a - f64::from(*b)).abs() < 1e-5, "{} vs {}", a, b);
                }
                let w = whole.lse[h * s.nq + t];
                prop_assert!(m.lse == w || (m.lse - w).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn batch_concatenation_keeps_every_sequence_and_shares_masks() {
    let shapes = [(100usize, 100usize), (1, 40), (257, 300)];
    let patterns = [causal() & window(50), sink(4) | local(30) | vertical_vector().keep(top_k(5)), causal()];
    let mut parts = Vec::new();
    for (i, ((nq, nk), e)) in shapes.iter().zip(patterns.iter()).enumerate() {
        let q = Tensor::random(2, *nq, 8, i as u64);
        let k = Tensor::random(2, *nk, 8, 100 + i as u64);
        parts.push(
            build_index(e, &q, &k, &IndexOptions { block_m: Some(64), block_n: Some(64), ..Default::default() })
                .unwrap(),
        );
    }
    let b = BatchIndex::concat(&parts).unwrap();
    assert_eq!(b.seq_q, vec![0, 100, 101, 358]);
    assert_eq!(b.seq_k, vec![0, 100, 140, 440]);
    assert_eq!(b.seq_qb, vec![0, 2, 3, 8]);
    // causal appears in two sequences' tables but once in the shared one.
    let causal_pred = match causal() {
        PatternExpr::Static(p) => p,
        _ => unreachable!(),
    };
    assert_eq!(b.masks.iter().filter(|m| **m == causal_pred).count(), 1);
    for (seq, ix) in parts.iter().enumerate() {
        let row0 = b.heads * b.seq_qb[seq] as usize;
        for r in 0..ix.heads * ix.q_blocks() {
            let (s0, s1) = (b.block_ptr[row0 + r] as usize, b.block_ptr[row0 + r + 1] as usize);
            let (o0, o1) = (ix.block_ptr[r] as usize, ix.block_ptr[r + 1] as usize);
            assert_eq!(&b.block_idx[s0..s1], &ix.block_idx[o0..o1]);
            for (m_b, m_o) in b.block_mask[s0..s1].iter().zip(&ix.block_mask[o0..o1]) {
                if *m_o == FULL {
                    assert_eq!(*m_b, FULL);
                } else {
                    assert_eq!(b.masks[*m_b as usize], ix.masks[*m_o as usize]);
                }
            }
            let (s0, s1) = (b.col_ptr[row0 + r] as usize, b.col_ptr[row0 + r + 1] as usize);
            let (o0, o1) = (ix.col_ptr[r] as usize, ix.col_ptr[r + 1] as usize);
            assert_eq!(&b.col_idx[s0..s1], &ix.col_idx[o0..o1]);
        }
    }
    assert!(BatchIndex::concat(&[]).is_err());
    let other =
        build_index(&causal(), &Tensor::random(3, 10, 8, 1), &Tensor::random(3, 10, 8, 2), &IndexOptions::default())
            .unwrap();
    assert!(BatchIndex::concat(&[parts[0].clone(), other]).unwrap_err().to_string().contains("sequence 1"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Building only some rows gives exactly those rows of the full index.
    #[test]
    fn row_restricted_builds_match_the_full_index(e in arb_pattern(), s in arb_shape(), picks in prop::collection::vec(any::<prop::sample::Index>(), 1..6)) {
        let x = inputs(&s);
        let rows: Vec<usize> = picks.iter().map(|i| i.index(s.nq)).collect();
        let full = build_index(&e, &x.q, &x.k, &IndexOptions::default()).unwrap();
        let part = build_index(&e, &x.q, &x.k, &IndexOptions { rows: Some(rows.clone()), ..Default::default() }).unwrap();
        for h in 0..s.hq {
            for q in 0..s.nq {
                let same_block = rows.iter().any(|r| r / full.block_m == q / full.block_m);
                for k in 0..s.nk {
                    let want = same_block && full.contains(h, q, k);
                    prop_assert_eq!(part.contains(h, q, k), want, "h={} q={} k={}", h, q, k);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Heads gathered from two patterns' indexes keep exactly their sources' pairs, even for
    /// predicates that read the head number (it is fixed in as the source head).
    #[test]
    fn gathered_heads_keep_their_sources_pairs(a in arb_pattern(), b in arb_pattern(), s in arb_shape(), picks in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..6)) {
        let x = inputs(&s);
        let opts = IndexOptions { block_m: Some(16), block_n: Some(16), ..Default::default() };
        let ia = build_index(&a, &x.q, &x.k, &opts).unwrap();
        let ib = build_index(&b, &x.q, &x.k, &opts).unwrap();
        let parts: Vec<(&SparseIndex, usize)> =
            picks.iter().map(|(first, h)| (if *first { &ia } else { &ib }, h.index(s.hq))).collect();
        let g = SparseIndex::gather_heads(&parts).unwrap();
        prop_assert_eq!(g.heads, parts.len());
        for (i, (src, h)) in parts.iter().enumerate() {
            for q in 0..s.nq {
                for k in 0..s.nk {
                    prop_assert_eq!(g.contains(i, q, k), src.contains(*h, q, k), "gathered head {} (source head {}) q={} k={}", i, h, q, k);
                }
            }
            prop_assert_eq!(g.head_pairs(i), src.head_pairs(*h));
        }
    }
}

#[test]
fn gathering_mismatched_indexes_is_an_error() {
    let x = inputs(&Shape { hq: 2, hkv: 1, nq: 40, nk: 40, d: 4, seed: 1 });
    let a = build_index(&causal(), &x.q, &x.k, &IndexOptions { block_m: Some(16), ..Default::default() }).unwrap();
    let b = build_index(&causal(), &x.q, &x.k, &IndexOptions { block_m: Some(32), ..Default::default() }).unwrap();
    assert!(SparseIndex::gather_heads(&[(&a, 0), (&b, 1)]).is_err());
    assert!(SparseIndex::gather_heads(&[(&a, 2)]).is_err());
    assert!(SparseIndex::gather_heads(&[]).is_err());
}

#[test]
fn gathering_keeps_only_the_masks_the_heads_use() {
    let x = inputs(&Shape { hq: 4, hkv: 2, nq: 100, nk: 100, d: 4, seed: 3 });
    let opts = IndexOptions { block_m: Some(16), block_n: Some(16), ..Default::default() };
    // Head 0 keeps a diagonal band, the others everything: only head 0 has partial blocks.
    let ix = build_index(&pred(h().ne(lit(0)).or((q() - k()).lt(lit(5)).and(k().le(q())))), &x.q, &x.k, &opts).unwrap();
    let dense = SparseIndex::gather_heads(&[(&ix, 1), (&ix, 3)]).unwrap();
    assert!(dense.masks.is_empty(), "{:?}", dense.masks);
    let band = SparseIndex::gather_heads(&[(&ix, 0), (&ix, 2)]).unwrap();
    assert_eq!(band.masks.len(), 1, "{:?}", band.masks);
    assert_eq!(band.head_pairs(0), ix.head_pairs(0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `decide_exact` (intervals over halves, pairs only in small parts) says what checking
    /// every pair says: all true, all false, or mixed.
    #[test]
    fn decide_exact_matches_checking_every_pair(
        p in arb_pred(),
        (q0, dq, k0, dk) in (0i64..400, 1i64..160, 0i64..400, 1i64..160),
        h in 0i64..3,
    ) {
        use weft_patterns::interval::{decide_exact, Region};
        let r = Region { q0, q1: q0 + dq, k0, k1: k0 + dk, h, nq: 600, nk: 640 };
        let (mut any_true, mut any_false) = (false, false);
        r.for_each(|q, k| if r.eval(&p, q, k) { any_true = true } else { any_false = true });
        let want = match (any_true, any_false) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        };
        prop_assert_eq!(decide_exact(&p, &r), want, "{:?} over {:?}", p, r);
    }
}

#[test]
fn indexes_past_the_tile_bound_are_refused_before_building() {
    use weft_patterns::{build_index, IndexOptions, Tensor, MAX_TILES};
    let (q, k) = (Tensor::zeros(1, 65536, 1), Tensor::zeros(1, 65536, 1));
    let tiny = IndexOptions { block_m: Some(1), block_n: Some(1), ..Default::default() };
    let e = build_index(&weft_dsl::builder::causal(), &q, &k, &tiny).unwrap_err().to_string();
    assert!(e.contains("block pairs") && e.contains(&MAX_TILES.to_string()), "{e}");
}
