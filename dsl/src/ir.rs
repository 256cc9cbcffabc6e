//! The pattern IR: plain data, serde-serializable, shared by every crate.
//!
//! A [`Pattern`] is a name plus a [`PatternExpr`]. Expressions are a tree whose leaves are
//! static predicates ([`Pred`]), dynamic families (chosen from Q and K at run time) and
//! retrieval operators; inner nodes are union, intersection, a virtual permutation and a
//! ring partition. The name is metadata: it is not part of the content hash.

use serde::{Deserialize, Serialize};

/// A named sparse-attention pattern.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pattern {
    /// Human-readable name (the function name for `#[sparse_pattern]`).
    pub name: String,
    /// What the pattern computes (serialized as `ir`, the key of a pattern file).
    #[serde(rename = "ir")]
    pub expr: PatternExpr,
}

/// A pattern expression: which (query, key) pairs attention computes.
///
/// Positions `q` and `k` are token indices. With `nq` queries and `nk` keys, causal
/// attention aligns the last query with the last key (`k <= q + nk - nq`), as FlashAttention
/// does for decode and chunked prefill.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternExpr {
    /// A static predicate over `q`, `k`, `h`, `nq`, `nk` and constants.
    Static(Pred),
    /// Block-sparse at `block_q x block_k` granularity.
    Block(Block),
    /// VecAttention: per query block, individual key columns (token granularity).
    VerticalVector(VerticalVector),
    /// MInference: vertical columns plus diagonals, estimated from the last queries.
    VerticalSlash(VerticalSlash),
    /// MMInference: lines at a stride (frame size) over frame-major tokens.
    Grid(Grid),
    /// Decode-time KV retrieval: score KV units, keep a budget of them plus sink and recent.
    Retrieval(Retrieval),
    /// Pairs kept by any child.
    Union(Vec<PatternExpr>),
    /// Pairs kept by every child.
    Intersect(Vec<PatternExpr>),
    /// The inner pattern applied in permuted token order; the output is un-permuted.
    /// Must be the outermost node (or directly inside [`PatternExpr::Ring`]).
    Permuted { permutation: Permutation, inner: Box<PatternExpr> },
    /// The inner pattern computed by `workers` ring workers, merged exactly by log-sum-exp.
    /// It changes the schedule, not the pairs. Must be the outermost node.
    Ring { workers: u32, layout: RingLayout, inner: Box<PatternExpr> },
}

/// A variable of a static predicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Var {
    /// Query position (a block index inside `blocks(...)`).
    Q,
    /// Key position (a block index inside `blocks(...)`).
    K,
    /// Query head index.
    H,
    /// Number of queries.
    Nq,
    /// Number of keys.
    Nk,
}

impl Var {
    /// The name used in the DSL.
    pub fn name(self) -> &'static str {
        match self {
            Var::Q => "q",
            Var::K => "k",
            Var::H => "h",
            Var::Nq => "nq",
            Var::Nk => "nk",
        }
    }

    /// Parses a DSL variable name.
    pub fn from_name(name: &str) -> Option<Var> {
        Some(match name {
            "q" => Var::Q,
            "k" => Var::K,
            "h" => Var::H,
            "nq" => Var::Nq,
            "nk" => Var::Nk,
            _ => return None,
        })
    }
}

/// Integer binary operators. Division and remainder are Euclidean and their divisor must be
/// a positive constant, so every backend (CPU, CUDA) agrees and no division by zero exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Min,
    Max,
}

impl IntOp {
    /// The operator as written in the DSL (`min`/`max` are calls).
    pub fn symbol(self) -> &'static str {
        match self {
            IntOp::Add => "+",
            IntOp::Sub => "-",
            IntOp::Mul => "*",
            IntOp::Div => "/",
            IntOp::Rem => "%",
            IntOp::Min => "min",
            IntOp::Max => "max",
        }
    }
}

/// An integer expression (64-bit, saturating).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntExpr {
    Var(Var),
    Const(i64),
    Neg(Box<IntExpr>),
    Bin { op: IntOp, lhs: Box<IntExpr>, rhs: Box<IntExpr> },
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    /// The operator as written in the DSL.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

/// A boolean predicate over (q, k, h, nq, nk).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pred {
    Const(bool),
    Cmp { op: CmpOp, lhs: IntExpr, rhs: IntExpr },
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    Not(Box<Pred>),
}

/// How many candidates a dynamic selection keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// The `n` highest-scoring candidates (ties: lower index first).
    TopK(u32),
    /// The fewest highest-scoring candidates whose softmax mass reaches `p`, in (0, 1].
    TopP(f64),
    /// Every candidate whose score is within `-ln(t)` of the best, `t` in (0, 1].
    Threshold(f64),
}

/// Which blocks a [`Block`] pattern keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKeep {
    /// Dynamic: a budget over mean-pooled query-block x key-block scores.
    Budget(Budget),
    /// Static: a predicate where `q` and `k` are block indices.
    Where(Pred),
}

/// Block-sparse attention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub block_q: u32,
    pub block_k: u32,
    pub keep: BlockKeep,
}

impl Default for Block {
    fn default() -> Self {
        Block { block_q: 64, block_k: 64, keep: BlockKeep::Budget(Budget::TopP(0.9)) }
    }
}

/// VecAttention's vertical vectors: per query block, key columns chosen from the mean-pooled
/// query's scores against every key; `sink` first tokens and a `local` diagonal band always kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerticalVector {
    pub q_block: u32,
    pub keep: Budget,
    pub sink: u32,
    pub local: u32,
}

impl Default for VerticalVector {
    fn default() -> Self {
        VerticalVector { q_block: 64, keep: Budget::Threshold(0.05), sink: 64, local: 64 }
    }
}

/// MInference's vertical-slash: from the last `last_q` queries, the best key columns
/// (`vertical`) and diagonals (`slash`); a chosen diagonal keeps every `block x block` tile it
/// crosses, as MInference's kernel computes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerticalSlash {
    pub block: u32,
    pub last_q: u32,
    pub vertical: Budget,
    pub slash: Budget,
}

impl Default for VerticalSlash {
    fn default() -> Self {
        VerticalSlash { block: 64, last_q: 64, vertical: Budget::TopK(1024), slash: Budget::TopK(64) }
    }
}

/// Which lines a [`Grid`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GridLines {
    /// Queries at `q % stride == phase` attend to every key.
    Rows,
    /// Keys at `k % stride == phase` are attended by every query.
    Cols,
    /// Both.
    Both,
}

/// MMInference's grid: frame-major tokens with frames of `stride` tokens; lines at the
/// same in-frame position `phase` (chosen per head from the last 64 queries when absent),
/// plus the first `sink` tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub stride: u32,
    pub phase: Option<u32>,
    pub lines: GridLines,
    pub sink: u32,
}

impl Default for Grid {
    fn default() -> Self {
        Grid { stride: 256, phase: None, lines: GridLines::Both, sink: 0 }
    }
}

/// A token permutation, computed by index arithmetic (never a table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permutation {
    /// Frame-major to position-major: token `f * stride + p` moves next to the tokens at the
    /// same in-frame position `p` of every other frame, turning grid lines into blocks.
    Stride(u32),
}

/// How a ring of workers splits the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RingLayout {
    /// Worker `w` holds one contiguous `N / W` range.
    Contiguous,
    /// The sequence cut in `2W` chunks; worker `w` holds chunks `w` and `2W - 1 - w`
    /// (balances causal work).
    ZigZag,
    /// Stripes of `n` tokens dealt round-robin to the workers.
    Striped(u32),
}

/// The KV unit a retrieval operator scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Single tokens.
    Token,
    /// Contiguous pages of `n` tokens.
    Page(u32),
    /// k-means clusters of about `n` tokens each.
    Cluster(u32),
}

/// How a retrieval operator scores a unit against the query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// Quest: an upper bound of q.k from per-page elementwise min and max keys (pages only).
    MinMax,
    /// RetroInfer: q . centroid (clusters only).
    Centroid,
    /// ParisKV: q . k with keys quantized to `bits` bits per element (tokens or pages).
    Quantized(u32),
}

/// A decode-time retrieval operator: per query token, score the units of the visible keys,
/// keep `budget` of them plus `sink` first and `recent` last tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    pub unit: Unit,
    pub score: Score,
    pub budget: Budget,
    pub sink: u32,
    pub recent: u32,
    /// Whose choice it is: each query head's (the default), or one per KV head for the query
    /// heads that share it (GQA). Absent from the IR when the default, so that the hashes of
    /// patterns written before it stay as they were.
    #[serde(default, skip_serializing_if = "Per::is_query_head")]
    pub per: Per,
}

impl Default for Retrieval {
    fn default() -> Self {
        Retrieval {
            unit: Unit::Page(16),
            score: Score::MinMax,
            budget: Budget::TopK(64),
            sink: 4,
            recent: 64,
            per: Per::QueryHead,
        }
    }
}

/// Who a retrieval operator's choice belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// Every query head chooses its own units.
    #[default]
    QueryHead,
    /// The query heads of a KV head choose together: a unit scores the best of their scaled
    /// scores (for Quest's bound, still an upper bound for each head), and all of them attend
    /// over the units it keeps, so the KV head's kept keys are read once.
    KvHead,
}

impl Per {
    pub fn is_query_head(&self) -> bool {
        *self == Per::QueryHead
    }
}
