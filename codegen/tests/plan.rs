//! The static plan of each GPU-built index (vertical-vector, block, vertical-slash), completed
//! with the CPU selection's choice, is the index `build_index` builds: same blocks, same
//! columns, same masks.

use proptest::prelude::*;
use weft_codegen::plan::{index_difference, BlockPlan, ColumnPlan, SlashChoice, SlashPlan};
use weft_dsl::builder::*;
use weft_dsl::*;
use weft_patterns::*;

fn patterns(n: u32, q_block: u32) -> Vec<(&'static str, PatternExpr)> {
    let vv = |sink, local| vertical_vector().q_block(q_block).keep(top_k(n)).sink(sink).local(local);
    let vv_with = |keep| vertical_vector().q_block(q_block).keep(keep).sink(4).local(16);
    vec![
        ("vv", vv(0, 0).into()),
        ("vv+sink+local", vv(16, 40).into()),
        ("causal & vv", causal() & vv(8, 64)),
        ("causal & (vv | window)", causal() & (vv(4, 0) | window(100))),
        ("window & vv", window(300) & vv(0, 16)),
        ("causal & vv threshold", causal() & vv_with(threshold(0.02 * f64::from(n)))),
        ("vv top_p", vv_with(top_p(0.025 * f64::from(n))).into()),
    ]
}

fn check(
    nq: usize,
    nk: usize,
    group: usize,
    n: u32,
    q_block: u32,
    blocks: (usize, usize),
    seed: u64,
) -> Result<(), TestCaseError> {
    let heads = 2;
    let q = Tensor::random(heads, nq, 16, seed);
    let k = Tensor::random(heads / group, nk, 16, seed ^ 0x9e37);
    for (name, e) in patterns(n, q_block) {
        let opts =
            IndexOptions { block_m: Some(blocks.0), block_n: Some(blocks.1), scale: Some(0.25), ..Default::default() };
        let want = build_index(&e, &q, &k, &opts).unwrap();
        let plan = ColumnPlan::new(&e, heads, nq, nk, &opts).unwrap();
        let chosen = plan.choose_on_cpu(&e, &q, &k).unwrap();
        let got = plan.assemble(&chosen).unwrap();
        prop_assert!(
            index_difference(&got, &want).is_none(),
            "{name} nq={nq} nk={nk} blocks={blocks:?}: {}",
            index_difference(&got, &want).unwrap()
        );
        // GPU builds allocate their column lists at the plan's bound before any count exists.
        prop_assert!(want.col_idx.len() <= plan.column_bound(), "{name}: columns past the bound");
        // Candidate ranges: every chosen column lies in its group's range.
        for (h, groups) in chosen.iter().enumerate() {
            for (g, cols) in groups.iter().enumerate() {
                let s = plan.shape.slot(h) * plan.groups + g;
                prop_assert!(
                    cols.iter().all(|c| *c >= plan.cand_lo[s] && *c < plan.cand_hi[s]),
                    "{name}: group {g} outside its range"
                );
                let cands = (plan.cand_hi[s] - plan.cand_lo[s]) as usize;
                if matches!(plan.budget, Budget::TopK(_)) {
                    prop_assert_eq!(
                        cols.len(),
                        cands.min(n as usize),
                        "{}: group {} keeps min(n, candidates)",
                        name,
                        g
                    );
                } else {
                    prop_assert!(
                        cands == 0 || (1..=cands).contains(&cols.len()),
                        "{}: group {} keeps 1..=candidates",
                        name,
                        g
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn planned_and_cpu_built_vertical_vector_indexes_agree(
        nq in 1usize..400, extra in 0usize..120, n in 1u32..40, group in 1usize..3,
        blocks in prop::sample::select(vec![(64usize, 64usize), (32, 64), (64, 32), (16, 16)]),
        q_block in prop::sample::select(vec![64u32, 128]), seed in any::<u64>(),
    ) {
        check(nq, nq + extra, group, n, q_block, blocks, seed)?;
    }
}

#[test]
fn patterns_the_gpu_cannot_build_say_so() {
    let opts = IndexOptions { scale: Some(0.1), ..Default::default() };
    for e in [PatternExpr::from(grid(256)), PatternExpr::from(block().keep(top_k(2))), causal()] {
        let err = ColumnPlan::new(&e, 1, 100, 100, &opts).unwrap_err().to_string();
        assert!(err.contains("GPU") || err.contains("vertical_vector"), "{err}");
    }
    let e = PatternExpr::from(vertical_vector().keep(top_k(3)));
    assert!(ColumnPlan::new(&e, 1, 100, 100, &IndexOptions::default()).unwrap_err().to_string().contains("scale"));
}

fn block_patterns(n: u32, bq: u32, bk: u32) -> Vec<(&'static str, PatternExpr)> {
    let blk = |keep| block().block_q(bq).block_k(bk).keep(keep);
    vec![
        ("block", blk(top_k(n)).into()),
        ("causal & block", causal() & blk(top_k(n))),
        ("causal & (block | window)", causal() & (blk(threshold(0.3)) | window(100))),
        ("sink | block", sink(8) | blk(top_k(n))),
        ("causal & block top_p", causal() & blk(top_p(0.3 + 0.1 * f64::from(n)))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn planned_and_cpu_built_block_indexes_agree(
        nq in 1usize..400, extra in 0usize..120, n in 1u32..6, group in 1usize..3,
        blocks in prop::sample::select(vec![(64u32, 64u32, 64usize, 64usize), (64, 64, 32, 32), (128, 64, 64, 64), (32, 32, 16, 32)]),
        seed in any::<u64>(),
    ) {
        let (bq, bk, bm, bn) = blocks;
        let nk = nq + extra;
        let heads = 2;
        let q = Tensor::random(heads, nq, 16, seed);
        let k = Tensor::random(heads / group, nk, 16, seed ^ 0x51ed);
        for (name, e) in block_patterns(n, bq, bk) {
            let opts = IndexOptions { block_m: Some(bm), block_n: Some(bn), scale: Some(0.25), ..Default::default() };
            let want = build_index(&e, &q, &k, &opts).unwrap();
            let plan = BlockPlan::new(&e, heads, nq, nk, &opts).unwrap();
            let got = plan.assemble(&plan.choose_on_cpu(&e, &q, &k).unwrap()).unwrap();
            prop_assert!(index_difference(&got, &want).is_none(), "{name} nq={nq} nk={nk} blocks={blocks:?}: {}", index_difference(&got, &want).unwrap());
            prop_assert!(want.block_idx.len() <= plan.entries.bound(&plan.shape), "{name}: blocks past the bound");
        }
    }
}

/// A `SlashPlan` of `e` completed with the CPU's choice is `build_index`'s index; returns the
/// choice.
fn check_slash_plan(
    name: &str,
    e: &PatternExpr,
    q: &Tensor,
    k: &Tensor,
    (bm, bn): (usize, usize),
) -> Result<Vec<SlashChoice>, TestCaseError> {
    let opts = IndexOptions { block_m: Some(bm), block_n: Some(bn), scale: Some(0.25), ..Default::default() };
    let want = build_index(e, q, k, &opts).unwrap();
    let plan = SlashPlan::new(e, q.heads, q.tokens, k.tokens, &opts).unwrap();
    let chosen = plan.choose_on_cpu(e, q, k).unwrap();
    let got = plan.assemble(&chosen).unwrap();
    let diff = index_difference(&got, &want);
    prop_assert!(diff.is_none(), "{name} nq={} nk={} blocks={bm}x{bn}: {}", q.tokens, k.tokens, diff.unwrap());
    // GPU builds allocate their lists at these bounds before any count exists.
    prop_assert!(want.block_idx.len() <= plan.entries.bound(&plan.shape), "{name}: blocks past the bound");
    prop_assert!(want.col_idx.len() <= plan.column_bound(), "{name}: columns past the bound");
    prop_assert!(chosen.iter().all(|c| c.verticals.len() <= plan.max_verticals()), "{name}: verticals past the bound");
    Ok(chosen)
}

fn slash_patterns(nv: u32, ns: u32, b: u32, last: u32) -> Vec<(&'static str, PatternExpr)> {
    let vs = || vertical_slash().block(b).last_q(last).vertical(top_k(nv)).slash(top_k(ns));
    vec![
        ("vs", vs().into()),
        ("causal & vs", causal() & vs()),
        ("sink | local | causal & vs", sink(4) | local(40) | (causal() & vs())),
        ("window & vs", window(150) & vs()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn planned_and_cpu_built_vertical_slash_indexes_agree(
        nq in 1usize..400, extra in 0usize..120, nv in 1u32..60, ns in 1u32..12, group in 1usize..3,
        blocks in prop::sample::select(vec![(64u32, 64usize, 64usize), (64, 32, 32), (32, 32, 16), (16, 16, 16)]),
        last in prop::sample::select(vec![1u32, 16, 64]), seed in any::<u64>(),
    ) {
        let (b, bm, bn) = blocks;
        let nk = nq + extra;
        let heads = 2;
        let q = Tensor::random(heads, nq, 16, seed);
        let k = Tensor::random(heads / group, nk, 16, seed ^ 0x7f4a);
        for (name, e) in slash_patterns(nv, ns, b, last) {
            let chosen = check_slash_plan(name, &e, &q, &k, (bm, bn))?;
            prop_assert!(chosen.iter().all(|c| c.verticals.len() <= nv as usize && c.slashes.len() <= ns as usize && !c.verticals.is_empty() && !c.slashes.is_empty()));
        }
    }
}

#[test]
fn vertical_slash_plans_take_top_k_budgets_only() {
    let opts = IndexOptions { scale: Some(0.1), ..Default::default() };
    let e = causal() & vertical_slash().vertical(top_p(0.9));
    let err = SlashPlan::new(&e, 1, 100, 100, &opts).unwrap_err().to_string();
    assert!(err.contains("top_p") && err.contains("CPU"), "{err}");
}

#[test]
fn planned_indexes_are_build_index_numbered_as_the_gpu_numbers_them() {
    use weft_codegen::plan::{planned_index, AnyPlan};
    let (q, k) = (Tensor::random(2, 300, 16, 5), Tensor::random(1, 340, 16, 6));
    let opts = IndexOptions { scale: Some(0.25), ..Default::default() };
    let plannable = [
        causal() & vertical_vector().keep(top_k(20)).sink(4).local(32),
        causal() & vertical_vector().keep(threshold(0.2)).sink(4).local(32),
        causal() & block().keep(top_p(0.6)),
        sink(4) | (causal() & vertical_slash().vertical(top_k(30)).slash(top_k(4))),
        causal() & grid(48),
        causal() & grid(7).lines(GridLines::Rows).sink(3),
    ];
    for e in &plannable {
        let got = planned_index(e, &q, &k, &opts).unwrap();
        let want = build_index(e, &q, &k, &opts).unwrap();
        assert!(index_difference(&got, &want).is_none(), "{e}: {:?}", index_difference(&got, &want));
        let plan = AnyPlan::new(e, 2, 300, 340, &opts).unwrap();
        assert_eq!(got.masks, plan.masks(), "{e}: the plan's mask table");
    }
    // Patterns no GPU builder takes: build_index itself.
    let two = causal() & (vertical_vector().keep(top_k(4)) | block().keep(top_k(2)));
    for e in [causal(), two, causal() & vertical_slash().vertical(top_p(0.5))] {
        assert_eq!(planned_index(&e, &q, &k, &opts).unwrap(), build_index(&e, &q, &k, &opts).unwrap(), "{e}");
    }
}

fn grid_patterns(stride: u32) -> Vec<(&'static str, PatternExpr)> {
    let cols = || grid(stride).lines(GridLines::Cols);
    vec![
        ("grid cols", cols().into()),
        ("causal & grid cols + sink", causal() & cols().sink(4)),
        ("local | causal & grid cols", local(30) | (causal() & cols())),
        ("window & grid cols", window(150) & cols().sink(2)),
        // Row lines with a given phase are static.
        (
            "causal & (fixed rows | grid cols)",
            causal() & (grid(stride).phase(3 % stride).lines(GridLines::Rows) | cols()),
        ),
        // A given phase: the plan's verticals are its column lines.
        ("causal & (sink | fixed grid)", causal() & (sink(2) | grid(stride).phase(5 % stride))),
        // Row lines at an estimated phase: codes per offset in the query block.
        ("grid", grid(stride).into()),
        ("causal & grid rows + sink", causal() & grid(stride).lines(GridLines::Rows).sink(3)),
        ("local | causal & grid + sink", local(30) | (causal() & grid(stride).sink(2))),
        ("window & grid", window(150) & grid(stride)),
        (
            "causal & (grid rows | k < 5 + q / 2)",
            causal() & (grid(stride).lines(GridLines::Rows) | pred(k().lt(lit(5) + q() / 2))),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn planned_and_cpu_built_grid_indexes_agree(
        nq in 1usize..400, extra in 0usize..120, stride in 1u32..90, group in 1usize..3,
        blocks in prop::sample::select(vec![(64usize, 64usize), (32, 32), (16, 16)]), seed in any::<u64>(),
    ) {
        let nk = nq + extra;
        let heads = 2;
        let q = Tensor::random(heads, nq, 16, seed);
        let k = Tensor::random(heads / group, nk, 16, seed ^ 0x3c6e);
        for (name, e) in grid_patterns(stride) {
            let chosen = check_slash_plan(name, &e, &q, &k, blocks)?;
            // One phase per head: every stride-th key from it (none for row lines only), no
            // slashes.
            for c in &chosen {
                let (v, phase) = (&c.verticals, c.phase.unwrap_or(usize::MAX));
                prop_assert!(c.slashes.is_empty() && phase < stride as usize);
                if name.contains("fixed grid") {
                    prop_assert_eq!(phase, 5 % stride as usize);
                }
                prop_assert_eq!(v.is_empty(), name.contains("grid rows") || phase >= nk);
                prop_assert!(v.first().is_none_or(|f| *f as usize == phase));
                prop_assert!(v.windows(2).all(|w| w[1] - w[0] == stride));
            }
        }
    }
}

#[test]
fn row_line_plans_do_not_depend_on_the_thread_count() {
    // Rows are planned in parallel chunks; mask ids must come out as one pass in row order
    // gives them (the attention kernel is generated from the mask table).
    let opts = IndexOptions { block_m: Some(16), block_n: Some(16), scale: Some(0.1), ..Default::default() };
    for e in [causal() & grid(40).sink(3), window(300) & grid(9).lines(GridLines::Rows)] {
        let plan = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| SlashPlan::new(&e, 2, 2000, 2100, &opts).unwrap())
        };
        let (a, b) = (plan(1), plan(3));
        assert_eq!(a.masks, b.masks, "{e}");
        assert_eq!((&a.lines.codes, &a.entries.code_line), (&b.lines.codes, &b.entries.code_line), "{e}");
        assert_eq!((&a.rules.ptr, &a.rules.code, &a.rules.codes), (&b.rules.ptr, &b.rules.code, &b.rules.codes), "{e}");
    }
}

#[test]
fn row_line_codes_cover_the_offsets_in_a_query_block() {
    let opts = IndexOptions { block_m: Some(32), block_n: Some(32), scale: Some(0.1), ..Default::default() };
    for (stride, len) in [(7u32, 7usize), (32, 32), (100, 32)] {
        let plan = SlashPlan::new(&(causal() & grid(stride)), 1, 200, 200, &opts).unwrap();
        assert_eq!((plan.lines.stride, plan.lines.len), (stride as usize, len));
        // A second set of column rules for query blocks with line rows.
        assert_eq!(plan.rules.ptr.len() - 1, 2 * plan.shape.q_blocks());
        assert_eq!(plan.entries.code_line.len(), plan.entries.kb.len());
    }
    // Column lines only, or a given phase: no codes per offset.
    for e in [causal() & grid(7).lines(GridLines::Cols), causal() & grid(7).phase(3)] {
        let plan = SlashPlan::new(&e, 1, 200, 200, &opts).unwrap();
        assert_eq!(plan.lines.len, 0, "{e}");
        assert!(plan.entries.code_line.is_empty(), "{e}");
    }
}

/// Grids with row lines (estimated phase), as functions of a phase to give instead.
#[allow(clippy::type_complexity)]
fn row_line_patterns(stride: u32) -> Vec<(&'static str, Box<dyn Fn(Option<u32>) -> PatternExpr>)> {
    let g = move |phase: Option<u32>, lines| {
        let g = grid(stride).lines(lines);
        match phase {
            Some(p) => g.phase(p),
            None => g,
        }
    };
    vec![
        ("causal & grid + sink", Box::new(move |p| causal() & g(p, GridLines::Both).sink(2))),
        ("grid rows", Box::new(move |p| g(p, GridLines::Rows).into())),
        ("window & grid", Box::new(move |p| window(50) & g(p, GridLines::Both))),
        // Reads the head: one plan slot per head.
        (
            "grid rows | head 1 sink",
            Box::new(move |p| g(p, GridLines::Rows) | pred(h().eq(lit(1)).and(k().lt(lit(7))))),
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Every offset's codes, not only those the estimate picks: the plan completed with any
    /// phase keeps the pairs of the same grid with that phase given.
    #[test]
    fn row_line_plans_keep_the_right_pairs_at_every_phase(
        nq in 1usize..130, extra in 0usize..50, stride in 1u32..24,
        blocks in prop::sample::select(vec![(32usize, 32usize), (16, 16), (64, 64)]),
    ) {
        let (nk, heads) = (nq + extra, 2);
        let opts = IndexOptions { block_m: Some(blocks.0), block_n: Some(blocks.1), scale: Some(0.25), ..Default::default() };
        let (q, k) = (Tensor::random(heads, nq, 8, 1), Tensor::random(heads, nk, 8, 2));
        for (name, pattern) in row_line_patterns(stride) {
            let plan = SlashPlan::new(&pattern(None), heads, nq, nk, &opts).unwrap();
            for p in 0..stride as usize {
                let verticals = if name.contains("rows") { Vec::new() } else { (p..nk).step_by(stride as usize).map(|c| c as u32).collect() };
                let choice = SlashChoice { verticals, slashes: Vec::new(), phase: Some(p) };
                let got = plan.assemble(&vec![choice; heads]).unwrap();
                let want = build_index(&pattern(Some(p as u32)), &q, &k, &opts).unwrap();
                for hh in 0..heads {
                    for qq in 0..nq {
                        for kk in 0..nk {
                            prop_assert_eq!(got.contains(hh, qq, kk), want.contains(hh, qq, kk), "{} phase {} at ({}, {}, {})", name, p, hh, qq, kk);
                        }
                    }
                }
            }
        }
    }
}
