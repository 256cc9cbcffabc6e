//! Point evaluation of static predicates, the definition every backend must match.

use crate::ir::*;

/// Values of the predicate variables at one (query, key) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Env {
    pub q: i64,
    pub k: i64,
    pub h: i64,
    pub nq: i64,
    pub nk: i64,
}

impl Env {
    /// The value of a variable.
    pub fn get(&self, v: Var) -> i64 {
        match v {
            Var::Q => self.q,
            Var::K => self.k,
            Var::H => self.h,
            Var::Nq => self.nq,
            Var::Nk => self.nk,
        }
    }
}

/// Applies an integer operator with saturating, Euclidean semantics; a zero divisor (which
/// validation forbids) yields 0 rather than a panic.
pub fn apply_int(op: IntOp, a: i64, b: i64) -> i64 {
    match op {
        IntOp::Add => a.saturating_add(b),
        IntOp::Sub => a.saturating_sub(b),
        IntOp::Mul => a.saturating_mul(b),
        IntOp::Div => a.checked_div_euclid(b).unwrap_or(0),
        IntOp::Rem => a.checked_rem_euclid(b).unwrap_or(0),
        IntOp::Min => a.min(b),
        IntOp::Max => a.max(b),
    }
}

/// Applies a comparison.
pub fn apply_cmp(op: CmpOp, a: i64, b: i64) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
    }
}

impl IntExpr {
    /// The value at `env`.
    pub fn eval(&self, env: &Env) -> i64 {
        match self {
            IntExpr::Var(v) => env.get(*v),
            IntExpr::Const(c) => *c,
            IntExpr::Neg(a) => a.eval(env).saturating_neg(),
            IntExpr::Bin { op, lhs, rhs } => apply_int(*op, lhs.eval(env), rhs.eval(env)),
        }
    }

    /// The expression with variable `v` replaced by the constant `value`.
    pub fn with_var(&self, v: Var, value: i64) -> IntExpr {
        match self {
            IntExpr::Var(w) if *w == v => IntExpr::Const(value),
            IntExpr::Var(_) | IntExpr::Const(_) => self.clone(),
            IntExpr::Neg(a) => IntExpr::Neg(Box::new(a.with_var(v, value))),
            IntExpr::Bin { op, lhs, rhs } => {
                IntExpr::Bin { op: *op, lhs: Box::new(lhs.with_var(v, value)), rhs: Box::new(rhs.with_var(v, value)) }
            }
        }
    }
}

impl Pred {
    /// The truth value at `env`.
    pub fn eval(&self, env: &Env) -> bool {
        match self {
            Pred::Const(b) => *b,
            Pred::Cmp { op, lhs, rhs } => apply_cmp(*op, lhs.eval(env), rhs.eval(env)),
            Pred::And(a, b) => a.eval(env) && b.eval(env),
            Pred::Or(a, b) => a.eval(env) || b.eval(env),
            Pred::Not(a) => !a.eval(env),
        }
    }

    /// The predicate with variable `v` replaced by the constant `value` (e.g. the head, when
    /// one head's entries move to another index).
    pub fn with_var(&self, v: Var, value: i64) -> Pred {
        match self {
            Pred::Const(_) => self.clone(),
            Pred::Cmp { op, lhs, rhs } => {
                Pred::Cmp { op: *op, lhs: lhs.with_var(v, value), rhs: rhs.with_var(v, value) }
            }
            Pred::And(a, b) => Pred::And(Box::new(a.with_var(v, value)), Box::new(b.with_var(v, value))),
            Pred::Or(a, b) => Pred::Or(Box::new(a.with_var(v, value)), Box::new(b.with_var(v, value))),
            Pred::Not(a) => Pred::Not(Box::new(a.with_var(v, value))),
        }
    }

    /// Whether the predicate reads variable `v`.
    pub fn uses(&self, v: Var) -> bool {
        fn int(e: &IntExpr, v: Var) -> bool {
            match e {
                IntExpr::Var(w) => *w == v,
                IntExpr::Const(_) => false,
                IntExpr::Neg(a) => int(a, v),
                IntExpr::Bin { lhs, rhs, .. } => int(lhs, v) || int(rhs, v),
            }
        }
        match self {
            Pred::Const(_) => false,
            Pred::Cmp { lhs, rhs, .. } => int(lhs, v) || int(rhs, v),
            Pred::And(a, b) | Pred::Or(a, b) => a.uses(v) || b.uses(v),
            Pred::Not(a) => a.uses(v),
        }
    }
}
