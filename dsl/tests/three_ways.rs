//! The builder, the text parser and pattern files give the same IR and hash; validation
//! and syntax errors say what is accepted.

use proptest::prelude::*;
use weft_dsl::builder::*;
use weft_dsl::{parse_pattern_file, parse_pattern_str, Error, Pattern, PatternExpr};

fn parse(src: &str) -> Pattern {
    match parse_pattern_str("p", src) {
        Ok(p) => p,
        Err(e) => panic!("{src}: {e}"),
    }
}

#[test]
fn builder_text_and_file_agree() {
    let cases: Vec<(PatternExpr, &str)> = vec![
        (
            sink(64) | local(256) | vertical_vector().q_block(128).keep(top_p(0.95)),
            "sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))",
        ),
        (
            causal() & vertical_slash().vertical(top_k(1000)).slash(top_k(64)),
            "causal & vertical_slash(vertical = top_k(1000), slash = top_k(64))",
        ),
        (
            grid(128).phase(3).lines(weft_dsl::GridLines::Cols).sink(16).into(),
            "grid(stride = 128, phase = 3, lines = cols, sink = 16)",
        ),
        (
            permuted(weft_dsl::Permutation::Stride(16), block().keep(top_k(4))),
            "permuted(stride(16), block(keep = top_k(4)))",
        ),
        (ring(4, weft_dsl::RingLayout::Striped(128), causal()), "ring(workers = 4, layout = striped(128), causal)"),
        (
            retrieval().unit(weft_dsl::Unit::Cluster(32)).score(weft_dsl::Score::Centroid).budget(top_p(0.9)).into(),
            "retrieval(unit = cluster(32), score = centroid, keep = top_p(0.9))",
        ),
        (retrieval().budget(top_k(32)).per(weft_dsl::Per::KvHead).into(), "retrieval(keep = top_k(32), per = kv_head)"),
        (causal() & pred((k() % 64).eq(lit(0)).or((q() - k()).lt(lit(128)))), "causal & (k % 64 == 0 || q - k < 128)"),
        (
            block().block_q(128).block_k(32).keep_where(q().ge(k()).and(h().lt(lit(4)))).into(),
            "block(block_q = 128, block_k = 32, keep = blocks(q >= k && h < 4))",
        ),
    ];
    for (built, src) in cases {
        let built = Pattern::new("p", built);
        built.validate().unwrap();
        let parsed = parse(src);
        assert_eq!(built, parsed, "{src}");
        assert_eq!(built.hash(), parsed.hash(), "{src}");
        let toml = format!("name = \"p\"\npattern = \"{src}\"\n");
        let from_toml = parse_pattern_file("t.toml", &toml, "x").unwrap();
        assert_eq!(from_toml, built);
        let from_ir = parse_pattern_file("t.json", &built.to_json(), "x").unwrap();
        assert_eq!(from_ir, built);
        // Printing the canonical form gives text that parses back to it.
        let canon = built.canonical();
        assert_eq!(parse(&canon.to_string()).canonical(), canon, "printed: {canon}");
    }
}

#[test]
fn hash_ignores_name_order_and_repeats_but_not_parameters() {
    let a = parse("sink(64) | local(128) | vertical_vector(keep = top_k(8))");
    let b = parse("vertical_vector(keep = top_k(8)) | (local(128) | sink(64)) | sink(64)");
    assert_eq!(a.hash(), b.hash());
    let renamed = Pattern::new("other", a.expr.clone());
    assert_eq!(a.hash(), renamed.hash());
    let c = parse("sink(64) | local(128) | vertical_vector(keep = top_k(9))");
    assert_ne!(a.hash(), c.hash());
    let d = parse("sink(64) & local(128) & vertical_vector(keep = top_k(8))");
    assert_ne!(a.hash(), d.hash());
    // The written sugar and the predicate it stands for are one pattern.
    assert_eq!(parse("sink(64)").hash(), parse("k < 64").hash());
    assert_eq!(a.hash().to_hex().len(), 64);
}

#[test]
fn a_retrieval_chosen_per_kv_head_is_another_pattern_and_the_default_keeps_its_hash() {
    let own = parse("retrieval(unit = page(16), keep = top_k(32))");
    let shared = parse("retrieval(unit = page(16), keep = top_k(32), per = kv_head)");
    assert_ne!(own.hash(), shared.hash());
    assert_eq!(own.hash(), parse("retrieval(unit = page(16), keep = top_k(32), per = query_head)").hash());
    // The default is absent from the IR, so that patterns written before `per` hash as they did.
    assert!(!own.to_json().contains("per") && shared.to_json().contains("\"per\": \"kv_head\""));
    assert_eq!(shared.to_string().matches("per = kv_head").count(), 1, "{shared}");
    assert!(syntax_message("retrieval(per = group)").contains("kv_head"));
}

#[test]
fn hash_is_stable_across_releases() {
    // Changing this value invalidates every stored kernel: bump IR_VERSION when it must change.
    let p = parse("causal & vertical_slash(vertical = top_k(1000), slash = top_k(64))");
    let again = parse("causal & vertical_slash(vertical = top_k(1000), slash = top_k(64))");
    assert_eq!(p.hash(), again.hash());
    let bytes = weft_dsl::canonical::canonical_bytes(&p.expr);
    assert!(bytes.starts_with(b"weft-ir/1\n"));
}

fn syntax_message(src: &str) -> String {
    match parse_pattern_str("p", src) {
        Err(e @ Error::Syntax { .. }) => e.to_string(),
        other => panic!("{src}: expected a syntax error, got {other:?}"),
    }
}

#[test]
fn errors_say_what_is_accepted() {
    let cases = [
        ("vertical_vector(q_block = 96)", "must be 64 or 128, got 96"),
        ("block(block_q = 100)", "power of two between 16 and 256"),
        ("vertical_vector(keep = top_p(1.5))", "top_p must be in (0, 1]"),
        ("vertical_vector(keep = top_k(0))", "n must be a positive integer, got 0"),
        ("grid(stride = 0)", "stride: must be between 1"),
        ("grid(stride = 8, phase = 8)", "must be below the stride"),
        ("grid(phase = 1)", "missing `stride`"),
        ("vertical_vectr()", "unknown pattern family `vertical_vectr`"),
        ("vertical_vector(qblock = 64)", "unknown parameter `qblock`"),
        ("sink(1.5)", "needs an integer, found the float"),
        ("causal & (k << 2 == 0)", "unsupported operator `<<`"),
        ("causal & (k % q == 0)", "divisor of `%` must be a positive integer constant"),
        ("causal & k < 64", "wrap the predicate in parentheses"),
        ("causal | permuted(stride(4), causal)", "must be the outermost"),
        ("retrieval(unit = token, score = min_max)", "min_max scores pages"),
        ("ring(layout = zigzag, causal)", "missing `workers`"),
        ("(q >= z)", "unknown variable `z`"),
        ("(k < 3000000000)", "out of range"),
    ];
    for (src, expected) in cases {
        let msg = syntax_message(src);
        assert!(msg.contains(expected), "{src}: got `{msg}`, expected `{expected}`");
        assert!(msg.contains("<pattern>:1:"), "{src}: no location in `{msg}`");
    }
}

#[test]
fn builder_patterns_are_validated_too() {
    let p = Pattern::new("bad", vertical_vector().q_block(32));
    let msg = p.validate().unwrap_err().to_string();
    assert!(msg.contains("pattern.vertical_vector.q_block: must be 64 or 128, got 32"), "{msg}");
}

#[test]
fn file_errors_name_the_problem() {
    let e = parse_pattern_file("f.toml", "name = \"x\"\n", "x").unwrap_err().to_string();
    assert!(e.contains("missing `pattern"), "{e}");
    let e = parse_pattern_file("f.toml", "pattern = \"causal\"\nbogus = 1\n", "x").unwrap_err().to_string();
    assert!(e.contains("unknown field"), "{e}");
    let e = parse_pattern_file("f.toml", "pattern = \"causal &\"\n", "x").unwrap_err().to_string();
    assert!(e.contains("f.toml (pattern):1:"), "{e}");
}

fn arb_int() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("q".to_string()),
        Just("k".to_string()),
        Just("h".to_string()),
        Just("nq".to_string()),
        (0i64..300).prop_map(|c| c.to_string()),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone(), prop::sample::select(vec!["+", "-", "*"]))
                .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
            (inner.clone(), 1i64..50, prop::sample::select(vec!["/", "%"]))
                .prop_map(|(a, c, op)| format!("({a} {op} {c})")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("min({a}, {b})")),
        ]
    })
}

fn arb_pred() -> impl Strategy<Value = String> {
    let cmp = (arb_int(), arb_int(), prop::sample::select(vec!["<", "<=", ">", ">=", "==", "!="]))
        .prop_map(|(a, b, op)| format!("{a} {op} {b}"));
    cmp.prop_recursive(2, 8, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

proptest! {
    /// Printing then parsing a predicate keeps its IR; evaluation agrees with Rust's own.
    #[test]
    fn predicates_round_trip(src in arb_pred()) {
        let p = match parse_pattern_str("p", &format!("({src})")) {
            Ok(p) => p,
            // Refused because it can overflow (tested below); other errors are failures.
            Err(e) if e.to_string().contains("can overflow") => return Ok(()),
            Err(e) => panic!("{src}: {e}"),
        };
        let printed = p.to_string();
        let again = parse(&format!("({printed})"));
        prop_assert_eq!(&p, &again, "printed as {}", printed);
    }
}

/// Exact evaluation in 128 bits: what 64-bit evaluation must equal for an accepted predicate.
fn exact_int(e: &weft_dsl::IntExpr, env: &weft_dsl::Env) -> i128 {
    use weft_dsl::{IntExpr, IntOp};
    match e {
        IntExpr::Var(v) => i128::from(env.get(*v)),
        IntExpr::Const(c) => i128::from(*c),
        IntExpr::Neg(a) => -exact_int(a, env),
        IntExpr::Bin { op, lhs, rhs } => {
            let (a, b) = (exact_int(lhs, env), exact_int(rhs, env));
            match op {
                IntOp::Add => a + b,
                IntOp::Sub => a - b,
                IntOp::Mul => a * b,
                IntOp::Div => a.div_euclid(b),
                IntOp::Rem => a.rem_euclid(b),
                IntOp::Min => a.min(b),
                IntOp::Max => a.max(b),
            }
        }
    }
}

fn comparisons(p: &weft_dsl::Pred, out: &mut Vec<(weft_dsl::IntExpr, weft_dsl::IntExpr)>) {
    use weft_dsl::Pred;
    match p {
        Pred::Const(_) => {}
        Pred::Cmp { lhs, rhs, .. } => out.push((lhs.clone(), rhs.clone())),
        Pred::And(a, b) | Pred::Or(a, b) => {
            comparisons(a, out);
            comparisons(b, out);
        }
        Pred::Not(a) => comparisons(a, out),
    }
}

#[test]
fn predicates_that_can_overflow_are_refused() {
    for src in ["q * 2147483647 * 2147483647 > k", "q * k * nq < 5", "(k * 2147483647 + q * 2147483647) * 2 > 0"] {
        let e = parse_pattern_str("x", &format!("({src})")).unwrap_err().to_string();
        assert!(e.contains("can overflow 64-bit integers"), "{src}: {e}");
    }
    for src in ["q * 2147483647 > k", "q * k < nq * nk", "-(q * 2147483647) <= k - 2147483647"] {
        assert!(parse_pattern_str("x", &format!("({src})")).is_ok(), "{src}");
    }
}

proptest! {
    /// Every accepted predicate is exact in 64 bits at any position below 2^31: the CPU's
    /// saturating evaluation never saturates, so it equals the GPU's wrapping one.
    #[test]
    fn accepted_predicates_never_overflow(src in arb_pred(), q in 0i64..(1 << 31), k in 0i64..(1 << 31),
            nq in 0i64..(1 << 31), nk in 0i64..(1 << 31), h in 0i64..(1 << 16)) {
        let Ok(p) = parse_pattern_str("p", &format!("({src})")) else { return Ok(()) };
        let PatternExpr::Static(pred) = &p.expr else { return Ok(()) };
        let env = weft_dsl::Env { q, k, h, nq, nk };
        let mut sides = Vec::new();
        comparisons(pred, &mut sides);
        for (a, b) in sides {
            prop_assert_eq!(i128::from(a.eval(&env)), exact_int(&a, &env), "{}", a);
            prop_assert_eq!(i128::from(b.eval(&env)), exact_int(&b, &env), "{}", b);
        }
    }
}

#[test]
fn json_constants_out_of_range_are_refused_not_wrapped() {
    let ir = serde_json::to_string(&parse_pattern_str("x", "(k < 12345)").unwrap().expr).unwrap();
    assert!(ir.contains("12345"), "{ir}");
    for c in [i64::MIN.to_string(), i64::MAX.to_string(), (-(1i64 << 31) - 1).to_string()] {
        let file = format!("{{\"name\": \"x\", \"ir\": {}}}", ir.replace("12345", &c));
        let e = parse_pattern_file("f.json", &file, "x").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{c}: {e}");
    }
    let file = format!("{{\"name\": \"x\", \"ir\": {}}}", ir.replace("12345", &(-(1i64 << 31) + 1).to_string()));
    assert!(parse_pattern_file("f.json", &file, "x").is_ok());
}

#[test]
fn deep_or_huge_pattern_text_is_refused_before_parsing() {
    let deep = format!("{}causal{}", "(".repeat(3000), ")".repeat(3000));
    let e = parse_pattern_str("x", &deep).unwrap_err().to_string();
    assert!(e.contains("nests brackets") && e.contains("at most 64"), "{e}");
    let wide = vec!["local(1)"; 20_000].join(" | ");
    let e = parse_pattern_str("x", &wide).unwrap_err().to_string();
    assert!(e.contains("operators") && e.contains("at most 1024"), "{e}");
    let file = format!("pattern = \"{wide}\"\n");
    assert!(parse_pattern_file("f.toml", &file, "x").is_err());
    // Within the limits: fine.
    let ok = format!("{}causal{}", "(".repeat(60), ")".repeat(60));
    assert!(parse_pattern_str("x", &ok).is_ok());
    assert!(parse_pattern_str("x", &vec!["local(1)"; 500].join(" | ")).is_ok());
}
