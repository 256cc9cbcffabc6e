//! Static predicates and permutations as CUDA expressions.

use weft_dsl::{IntExpr, IntOp, Permutation, Pred, Var};

fn cuda_int(e: &IntExpr) -> String {
    match e {
        IntExpr::Var(v) => match v {
            Var::Q => "q",
            Var::K => "k",
            Var::H => "h",
            Var::Nq => "nq",
            Var::Nk => "nk",
        }
        .to_string(),
        IntExpr::Const(c) => format!("{c}LL"),
        IntExpr::Neg(a) => format!("(-{})", cuda_int(a)),
        IntExpr::Bin { op, lhs, rhs } => {
            let (a, b) = (cuda_int(lhs), cuda_int(rhs));
            match op {
                IntOp::Add => format!("({a} + {b})"),
                IntOp::Sub => format!("({a} - {b})"),
                IntOp::Mul => format!("({a} * {b})"),
                IntOp::Div => format!("weft_div({a}, {b})"),
                IntOp::Rem => format!("weft_rem({a}, {b})"),
                IntOp::Min => format!("weft_min({a}, {b})"),
                IntOp::Max => format!("weft_max({a}, {b})"),
            }
        }
    }
}

/// A static predicate as a CUDA boolean expression over `q, k, h, nq, nk` (64-bit, Euclidean
/// division, as `weft_dsl::eval` defines them).
pub fn cuda_pred(p: &Pred) -> String {
    match p {
        Pred::Const(b) => b.to_string(),
        // The DSL's comparison symbols are C's.
        Pred::Cmp { op, lhs, rhs } => format!("({} {} {})", cuda_int(lhs), op.symbol(), cuda_int(rhs)),
        Pred::And(a, b) => format!("({} && {})", cuda_pred(a), cuda_pred(b)),
        Pred::Or(a, b) => format!("({} || {})", cuda_pred(a), cuda_pred(b)),
        Pred::Not(a) => format!("(!{})", cuda_pred(a)),
    }
}

pub(crate) fn token_body(p: Option<Permutation>) -> String {
    match p {
        None => "    return pos;  // identity: the pattern is not permuted".to_string(),
        Some(Permutation::Stride(s)) => format!(
            "    // stride({s}) permutation, inverse: position `pos` holds token f * {s} + p.\n\
             \x20   const int s = {s}, frames = n / s, rest = n % s, split = rest * (frames + 1);\n\
             \x20   if (pos < split) return (pos % (frames + 1)) * s + pos / (frames + 1);\n\
             \x20   const int j = pos - split, per = frames > 0 ? frames : 1;\n\
             \x20   return (j % per) * s + rest + j / per;"
        ),
    }
}
