//! Printing the IR back as DSL text that parses to the same IR.
//!
//! Static predicates that match a named form (`causal`, `sink(n)`, `local(w)`, `window(w)`,
//! `full`) print under that name; everything else prints with the fewest parentheses Rust's
//! precedence allows.

use std::fmt::{self, Display, Formatter};

use crate::builder;
use crate::ir::*;

fn int_prec(e: &IntExpr) -> u8 {
    match e {
        IntExpr::Bin { op: IntOp::Add | IntOp::Sub, .. } => 1,
        IntExpr::Bin { op: IntOp::Mul | IntOp::Div | IntOp::Rem, .. } => 2,
        IntExpr::Const(c) if *c < 0 => 3,
        _ => 4,
    }
}

impl Display for IntExpr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            IntExpr::Var(v) => f.write_str(v.name()),
            IntExpr::Const(c) => write!(f, "{c}"),
            IntExpr::Neg(a) => {
                if int_prec(a) < 4 {
                    write!(f, "-({a})")
                } else {
                    write!(f, "-{a}")
                }
            }
            IntExpr::Bin { op: op @ (IntOp::Min | IntOp::Max), lhs, rhs } => {
                write!(f, "{}({lhs}, {rhs})", op.symbol())
            }
            IntExpr::Bin { op, lhs, rhs } => {
                let p = int_prec(self);
                if int_prec(lhs) < p {
                    write!(f, "({lhs})")?;
                } else {
                    write!(f, "{lhs}")?;
                }
                write!(f, " {} ", op.symbol())?;
                if int_prec(rhs) <= p {
                    write!(f, "({rhs})")
                } else {
                    write!(f, "{rhs}")
                }
            }
        }
    }
}

/// The named static form a predicate was built from, if any.
fn sugar(p: &Pred) -> Option<String> {
    if *p == Pred::Const(true) {
        return Some("full".into());
    }
    let as_pred = |e: PatternExpr| match e {
        PatternExpr::Static(p) => p,
        _ => Pred::Const(false),
    };
    if *p == as_pred(builder::causal()) {
        return Some("causal".into());
    }
    // The width is the constant of the predicate's last comparison; rebuild and compare.
    fn last_const(p: &Pred) -> Option<u32> {
        match p {
            Pred::Cmp { rhs: IntExpr::Const(c), .. } => u32::try_from(*c).ok(),
            Pred::And(_, b) => last_const(b),
            _ => None,
        }
    }
    let n = last_const(p)?;
    for (name, make) in
        [("sink", builder::sink as fn(u32) -> PatternExpr), ("local", builder::local), ("window", builder::window)]
    {
        if *p == as_pred(make(n)) {
            return Some(format!("{name}({n})"));
        }
    }
    None
}

fn pred_prec(p: &Pred) -> u8 {
    if sugar(p).is_some() {
        return 5;
    }
    match p {
        Pred::Or(..) => 1,
        Pred::And(..) => 2,
        Pred::Cmp { .. } => 3,
        Pred::Not(..) | Pred::Const(_) => 4,
    }
}

fn write_pred_operand(f: &mut Formatter<'_>, p: &Pred, need: u8) -> fmt::Result {
    if pred_prec(p) < need {
        write!(f, "({p})")
    } else {
        write!(f, "{p}")
    }
}

impl Display for Pred {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if let Some(s) = sugar(self) {
            return f.write_str(&s);
        }
        match self {
            Pred::Const(b) => write!(f, "{b}"),
            Pred::Cmp { op, lhs, rhs } => write!(f, "{lhs} {} {rhs}", op.symbol()),
            Pred::And(a, b) => {
                write_pred_operand(f, a, 2)?;
                f.write_str(" && ")?;
                write_pred_operand(f, b, 3)
            }
            Pred::Or(a, b) => {
                write_pred_operand(f, a, 1)?;
                f.write_str(" || ")?;
                write_pred_operand(f, b, 2)
            }
            Pred::Not(a) => {
                f.write_str("!")?;
                write_pred_operand(f, a, 4)
            }
        }
    }
}

impl Display for Budget {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Budget::TopK(n) => write!(f, "top_k({n})"),
            Budget::TopP(p) => write!(f, "top_p({p:?})"),
            Budget::Threshold(t) => write!(f, "threshold({t:?})"),
        }
    }
}

impl Display for Unit {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Token => f.write_str("token"),
            Unit::Page(n) => write!(f, "page({n})"),
            Unit::Cluster(n) => write!(f, "cluster({n})"),
        }
    }
}

impl Display for Score {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Score::MinMax => f.write_str("min_max"),
            Score::Centroid => f.write_str("centroid"),
            Score::Quantized(b) => write!(f, "quantized({b})"),
        }
    }
}

impl Display for GridLines {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GridLines::Rows => "rows",
            GridLines::Cols => "cols",
            GridLines::Both => "both",
        })
    }
}

impl Display for RingLayout {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            RingLayout::Contiguous => f.write_str("contiguous"),
            RingLayout::ZigZag => f.write_str("zigzag"),
            RingLayout::Striped(n) => write!(f, "striped({n})"),
        }
    }
}

impl Display for Permutation {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Permutation::Stride(s) => write!(f, "stride({s})"),
        }
    }
}

fn expr_prec(e: &PatternExpr) -> u8 {
    match e {
        PatternExpr::Union(_) => 1,
        PatternExpr::Intersect(_) => 2,
        // A bare comparison inside `|`/`&` needs parentheses: Rust binds `&` tighter.
        PatternExpr::Static(p) if sugar(p).is_none() => 0,
        _ => 4,
    }
}

impl Display for PatternExpr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let operand = |f: &mut Formatter<'_>, e: &PatternExpr, need: u8| {
            if expr_prec(e) < need {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        };
        match self {
            PatternExpr::Static(p) => write!(f, "{p}"),
            PatternExpr::Block(b) => {
                write!(f, "block(block_q = {}, block_k = {}, keep = ", b.block_q, b.block_k)?;
                match &b.keep {
                    BlockKeep::Budget(budget) => write!(f, "{budget})"),
                    BlockKeep::Where(p) => write!(f, "blocks({p}))"),
                }
            }
            PatternExpr::VerticalVector(v) => write!(
                f,
                "vertical_vector(q_block = {}, keep = {}, sink = {}, local = {})",
                v.q_block, v.keep, v.sink, v.local
            ),
            PatternExpr::VerticalSlash(v) => write!(
                f,
                "vertical_slash(vertical = {}, slash = {}, last_q = {}, block = {})",
                v.vertical, v.slash, v.last_q, v.block
            ),
            PatternExpr::Grid(g) => {
                write!(f, "grid(stride = {}", g.stride)?;
                if let Some(p) = g.phase {
                    write!(f, ", phase = {p}")?;
                }
                write!(f, ", lines = {}, sink = {})", g.lines, g.sink)
            }
            PatternExpr::Retrieval(r) => {
                write!(
                    f,
                    "retrieval(unit = {}, score = {}, keep = {}, sink = {}, recent = {}",
                    r.unit, r.score, r.budget, r.sink, r.recent
                )?;
                if r.per == Per::KvHead {
                    f.write_str(", per = kv_head")?;
                }
                f.write_str(")")
            }
            PatternExpr::Union(items) | PatternExpr::Intersect(items) => {
                let (op, p) = if matches!(self, PatternExpr::Union(_)) { (" | ", 1) } else { (" & ", 2) };
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    // Left operand of a chain may share the precedence; later ones may not.
                    operand(f, item, if i == 0 { p } else { p + 1 })?;
                }
                if items.is_empty() {
                    f.write_str(if p == 1 { "(false)" } else { "full" })?;
                }
                Ok(())
            }
            PatternExpr::Permuted { permutation, inner } => write!(f, "permuted({permutation}, {inner})"),
            PatternExpr::Ring { workers, layout, inner } => {
                write!(f, "ring(workers = {workers}, layout = {layout}, {inner})")
            }
        }
    }
}
