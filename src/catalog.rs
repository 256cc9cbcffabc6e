//! The families weft knows, their parameters and defaults, and the built-in patterns the CLI
//! accepts by name. Defaults are read from the IR's `Default` impls, so this table cannot
//! drift from what the parser does.

use weft_dsl::builder::*;
use weft_dsl::*;

/// One parameter of a family.
pub struct Param {
    pub name: &'static str,
    pub default: String,
    pub accepted: &'static str,
}

/// One family of the DSL.
pub struct Family {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: Vec<Param>,
}

fn p(name: &'static str, default: impl ToString, accepted: &'static str) -> Param {
    Param { name, default: default.to_string(), accepted }
}

/// Every family and named static form, in the order `weft patterns` lists them.
pub fn families() -> Vec<Family> {
    let b = Block::default();
    let vv = VerticalVector::default();
    let vs = VerticalSlash::default();
    let g = Grid::default();
    let r = Retrieval::default();
    let keep = match &b.keep {
        BlockKeep::Budget(x) => x.to_string(),
        BlockKeep::Where(p) => format!("blocks({p})"),
    };
    vec![
        Family { name: "full", summary: "every pair (dense attention)", params: vec![] },
        Family { name: "causal", summary: "k <= q + nk - nq (bottom-right aligned)", params: vec![] },
        Family { name: "sink(n)", summary: "the first n keys: k < n", params: vec![] },
        Family { name: "local(w)", summary: "a diagonal band: |q + nk - nq - k| < w", params: vec![] },
        Family { name: "window(w)", summary: "causal sliding window: 0 <= q + nk - nq - k < w", params: vec![] },
        Family {
            name: "(predicate)",
            summary: "any comparison of q, k, h, nq, nk with + - * / % min max, joined by && || !",
            params: vec![],
        },
        Family {
            name: "block",
            summary: "block-sparse; dynamic from mean-pooled block scores, or static from a block predicate",
            params: vec![
                p("block_q", b.block_q, "power of two, 16..=256"),
                p("block_k", b.block_k, "power of two, 16..=256"),
                p("keep", keep, "top_k(n) | top_p(p) | threshold(t) | blocks(predicate over block indices)"),
            ],
        },
        Family {
            name: "vertical_vector",
            summary: "VecAttention: per query block, key columns chosen from the pooled query's scores",
            params: vec![
                p("q_block", vv.q_block, "64 | 128"),
                p("keep", vv.keep, "top_k(n) | top_p(p) | threshold(t), t in (0, 1]"),
                p("sink", vv.sink, "always-kept first tokens"),
                p("local", vv.local, "always-kept diagonal band half-width"),
            ],
        },
        Family {
            name: "vertical_slash",
            summary: "MInference: columns and diagonals estimated from the last queries",
            params: vec![
                p("vertical", vs.vertical, "budget over column mass"),
                p("slash", vs.slash, "budget over diagonal mass"),
                p("last_q", vs.last_q, "1..=4096 queries used for the estimate"),
                p("block", vs.block, "power of two, 16..=256 (slash tiles, query groups)"),
            ],
        },
        Family {
            name: "grid",
            summary: "MMInference: lines at a stride (frame size) over frame-major tokens",
            params: vec![
                p("stride", "required", ">= 1, the frame size in tokens"),
                p("phase", "chosen per head", "0..stride"),
                p("lines", g.lines, "rows | cols | both"),
                p("sink", g.sink, "always-kept first tokens"),
            ],
        },
        Family {
            name: "permuted(perm, pattern)",
            summary: "MMInference: the pattern over permuted tokens (outermost only); perm = stride(s)",
            params: vec![],
        },
        Family {
            name: "ring",
            summary: "MTraining: the pattern computed by W ring workers, merged by log-sum-exp (outermost)",
            params: vec![
                p("workers", "required", "1..=1024"),
                p("layout", RingLayout::ZigZag, "contiguous | zigzag | striped(n)"),
            ],
        },
        Family {
            name: "retrieval",
            summary: "decode KV retrieval: score units, keep a budget, plus sink and recent tokens",
            params: vec![
                p("unit", r.unit, "token | page(n) | cluster(n)"),
                p("score", r.score, "min_max (pages) | centroid (clusters) | quantized(bits)"),
                p("keep", r.budget, "top_k(n) | top_p(p) | threshold(t)"),
                p("sink", r.sink, "always-kept first tokens"),
                p("recent", r.recent, "always-kept last tokens"),
            ],
        },
    ]
}

/// Built-in patterns by name: (name, pattern).
pub fn builtins() -> Vec<(&'static str, PatternExpr)> {
    vec![
        ("dense", full()),
        ("causal", causal()),
        ("sliding-window", window(1024)),
        ("block", block().into()),
        ("vertical-vector", vertical_vector().into()),
        ("vertical-slash", causal() & vertical_slash()),
        ("grid", grid(256).into()),
        ("permuted-grid", permuted(Permutation::Stride(256), block().keep(top_k(8)))),
        ("ring", ring(4, RingLayout::ZigZag, causal())),
        ("retrieval", retrieval().into()),
    ]
}

/// A built-in pattern by name (`vertical_vector` and `vertical-vector` both work).
pub fn builtin(name: &str) -> Option<Pattern> {
    let want = name.replace('_', "-");
    builtins().into_iter().find(|(n, _)| *n == want).map(|(n, e)| Pattern::new(n, e))
}
