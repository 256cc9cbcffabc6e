//! The plain-Rust way in: constructors and operators that build the same IR as the macro and
//! the text format.
//!
//! ```
//! use weft_dsl::builder::*;
//!
//! let video = sink(64) | local(256) | vertical_vector().q_block(128).keep(top_p(0.95));
//! let text = causal() & vertical_slash().vertical(top_k(1000)).slash(top_k(64));
//! let p = weft_dsl::Pattern::new("video", video);
//! assert_eq!(p.hash(), weft_dsl::parse_pattern_str("video",
//!     "sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))").unwrap().hash());
//! # let _ = text;
//! ```

use std::ops::{BitAnd, BitOr, Not};

use crate::ir::*;

/// `q`, the query position.
pub fn q() -> IntExpr {
    IntExpr::Var(Var::Q)
}
/// `k`, the key position.
pub fn k() -> IntExpr {
    IntExpr::Var(Var::K)
}
/// `h`, the query head index.
pub fn h() -> IntExpr {
    IntExpr::Var(Var::H)
}
/// `nq`, the number of queries.
pub fn nq() -> IntExpr {
    IntExpr::Var(Var::Nq)
}
/// `nk`, the number of keys.
pub fn nk() -> IntExpr {
    IntExpr::Var(Var::Nk)
}
/// An integer constant.
pub fn lit(value: i64) -> IntExpr {
    IntExpr::Const(value)
}

fn bin(op: IntOp, lhs: IntExpr, rhs: IntExpr) -> IntExpr {
    IntExpr::Bin { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }
}

impl IntExpr {
    /// `min(self, other)`.
    pub fn min(self, other: IntExpr) -> IntExpr {
        bin(IntOp::Min, self, other)
    }
    /// `max(self, other)`.
    pub fn max(self, other: IntExpr) -> IntExpr {
        bin(IntOp::Max, self, other)
    }
    fn cmp(self, op: CmpOp, other: IntExpr) -> Pred {
        Pred::Cmp { op, lhs: self, rhs: other }
    }
    /// `self < other`.
    pub fn lt(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Lt, other)
    }
    /// `self <= other`.
    pub fn le(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Le, other)
    }
    /// `self > other`.
    pub fn gt(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Gt, other)
    }
    /// `self >= other`.
    pub fn ge(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Ge, other)
    }
    /// `self == other`.
    pub fn eq(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Eq, other)
    }
    /// `self != other`.
    pub fn ne(self, other: IntExpr) -> Pred {
        self.cmp(CmpOp::Ne, other)
    }
}

impl std::ops::Add for IntExpr {
    type Output = IntExpr;
    fn add(self, rhs: IntExpr) -> IntExpr {
        bin(IntOp::Add, self, rhs)
    }
}
impl std::ops::Sub for IntExpr {
    type Output = IntExpr;
    fn sub(self, rhs: IntExpr) -> IntExpr {
        bin(IntOp::Sub, self, rhs)
    }
}
impl std::ops::Mul for IntExpr {
    type Output = IntExpr;
    fn mul(self, rhs: IntExpr) -> IntExpr {
        bin(IntOp::Mul, self, rhs)
    }
}
/// `self / divisor` (Euclidean; the divisor must be a positive constant).
impl std::ops::Div<i64> for IntExpr {
    type Output = IntExpr;
    fn div(self, divisor: i64) -> IntExpr {
        bin(IntOp::Div, self, lit(divisor))
    }
}
/// `self % divisor` (Euclidean; the divisor must be a positive constant).
impl std::ops::Rem<i64> for IntExpr {
    type Output = IntExpr;
    fn rem(self, divisor: i64) -> IntExpr {
        bin(IntOp::Rem, self, lit(divisor))
    }
}
impl std::ops::Neg for IntExpr {
    type Output = IntExpr;
    fn neg(self) -> IntExpr {
        IntExpr::Neg(Box::new(self))
    }
}

impl Pred {
    /// `self && other`.
    pub fn and(self, other: Pred) -> Pred {
        Pred::And(Box::new(self), Box::new(other))
    }
    /// `self || other`.
    pub fn or(self, other: Pred) -> Pred {
        Pred::Or(Box::new(self), Box::new(other))
    }
}

impl Not for Pred {
    type Output = Pred;
    fn not(self) -> Pred {
        Pred::Not(Box::new(self))
    }
}

/// `q + nk - nq`: the query position on the key axis (bottom-right alignment).
fn q_on_k_axis() -> IntExpr {
    q() + nk() - nq()
}

/// A static predicate as a pattern.
pub fn pred(p: Pred) -> PatternExpr {
    PatternExpr::Static(p)
}

/// Every pair.
pub fn full() -> PatternExpr {
    pred(Pred::Const(true))
}

/// Causal: `k <= q + nk - nq`.
pub fn causal() -> PatternExpr {
    pred(k().le(q_on_k_axis()))
}

/// The first `tokens` keys: `k < tokens`.
pub fn sink(tokens: u32) -> PatternExpr {
    pred(k().lt(lit(tokens.into())))
}

/// A diagonal band: `|q + nk - nq - k| < width`.
pub fn local(width: u32) -> PatternExpr {
    let w = lit(width.into());
    pred((q_on_k_axis() - k()).lt(w.clone()).and((k() - q_on_k_axis()).lt(w)))
}

/// A causal sliding window: `0 <= q + nk - nq - k < width`.
pub fn window(width: u32) -> PatternExpr {
    pred(k().le(q_on_k_axis()).and((q_on_k_axis() - k()).lt(lit(width.into()))))
}

/// Budget: the `n` best.
pub fn top_k(n: u32) -> Budget {
    Budget::TopK(n)
}
/// Budget: the fewest best whose softmax mass reaches `p`.
pub fn top_p(p: f64) -> Budget {
    Budget::TopP(p)
}
/// Budget: everything within `-ln(t)` of the best score.
pub fn threshold(t: f64) -> Budget {
    Budget::Threshold(t)
}

/// Block-sparse pattern with defaults (64 x 64 blocks, `top_p(0.9)`).
pub fn block() -> Block {
    Block::default()
}
/// VecAttention vertical vectors with defaults.
pub fn vertical_vector() -> VerticalVector {
    VerticalVector::default()
}
/// MInference vertical-slash with defaults.
pub fn vertical_slash() -> VerticalSlash {
    VerticalSlash::default()
}
/// MMInference grid with defaults (stride 256, phase chosen per head, rows and columns).
pub fn grid(stride: u32) -> Grid {
    Grid { stride, ..Grid::default() }
}
/// Retrieval operator with Quest-like defaults (pages of 16, min-max bounds, top 64 pages).
pub fn retrieval() -> Retrieval {
    Retrieval::default()
}

/// `inner` in stride-permuted order.
pub fn permuted(permutation: Permutation, inner: impl Into<PatternExpr>) -> PatternExpr {
    PatternExpr::Permuted { permutation, inner: Box::new(inner.into()) }
}

/// `inner` split over a ring of `workers`.
pub fn ring(workers: u32, layout: RingLayout, inner: impl Into<PatternExpr>) -> PatternExpr {
    PatternExpr::Ring { workers, layout, inner: Box::new(inner.into()) }
}

macro_rules! setters {
    ($ty:ty { $($field:ident : $fty:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets `", stringify!($field), "`.")]
                pub fn $field(mut self, value: $fty) -> Self {
                    self.$field = value.into();
                    self
                }
            )*
        }
    };
}

setters!(Block { block_q: u32, block_k: u32 });
setters!(VerticalVector { q_block: u32, keep: Budget, sink: u32, local: u32 });
setters!(VerticalSlash { block: u32, last_q: u32, vertical: Budget, slash: Budget });
setters!(Grid { stride: u32, lines: GridLines, sink: u32 });
setters!(Retrieval { unit: Unit, score: Score, budget: Budget, sink: u32, recent: u32, per: Per });

impl Block {
    /// Dynamic keep: a budget over pooled block scores.
    pub fn keep(mut self, budget: Budget) -> Self {
        self.keep = BlockKeep::Budget(budget);
        self
    }
    /// Static keep: a predicate over block indices.
    pub fn keep_where(mut self, p: Pred) -> Self {
        self.keep = BlockKeep::Where(p);
        self
    }
}

impl Grid {
    /// A fixed phase instead of one chosen per head.
    pub fn phase(mut self, phase: u32) -> Self {
        self.phase = Some(phase);
        self
    }
}

macro_rules! into_expr {
    ($($ty:ident => $variant:ident),*) => {
        $(
            impl From<$ty> for PatternExpr {
                fn from(value: $ty) -> PatternExpr {
                    PatternExpr::$variant(value)
                }
            }
        )*
    };
}

into_expr!(Pred => Static, Block => Block, VerticalVector => VerticalVector,
    VerticalSlash => VerticalSlash, Grid => Grid, Retrieval => Retrieval);

fn combine(lhs: PatternExpr, rhs: PatternExpr, union: bool) -> PatternExpr {
    // Left-nested chains flatten into one node, as `a | b | c` parses in the macro.
    match (lhs, union) {
        (PatternExpr::Union(mut items), true) => {
            items.push(rhs);
            PatternExpr::Union(items)
        }
        (PatternExpr::Intersect(mut items), false) => {
            items.push(rhs);
            PatternExpr::Intersect(items)
        }
        (lhs, true) => PatternExpr::Union(vec![lhs, rhs]),
        (lhs, false) => PatternExpr::Intersect(vec![lhs, rhs]),
    }
}

macro_rules! pattern_ops {
    ($($ty:ty),*) => {
        $(
            impl<R: Into<PatternExpr>> BitOr<R> for $ty {
                type Output = PatternExpr;
                fn bitor(self, rhs: R) -> PatternExpr {
                    combine(self.into(), rhs.into(), true)
                }
            }
            impl<R: Into<PatternExpr>> BitAnd<R> for $ty {
                type Output = PatternExpr;
                fn bitand(self, rhs: R) -> PatternExpr {
                    combine(self.into(), rhs.into(), false)
                }
            }
        )*
    };
}

pattern_ops!(PatternExpr, Block, VerticalVector, VerticalSlash, Grid, Retrieval);
