//! Validation: every parameter in its accepted range, every node where it may stand.
//!
//! Errors name the path to the offending node, the field, and what is accepted, so the macro
//! can point at the argument's token and the CLI can print a sentence a user can act on.

use crate::ir::*;

/// One problem with a pattern.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}.{field}: {message}")]
pub struct ValidationError {
    /// Where in the tree, e.g. `union[2].vertical_vector`.
    pub path: String,
    /// The parameter, e.g. `q_block` (`expr` for structural problems).
    pub field: &'static str,
    /// What was wrong and what is accepted.
    pub message: String,
}

/// Largest magnitude of a predicate constant: predicates run in 32-bit integer math on GPU.
pub const MAX_CONST: i64 = i32::MAX as i64;
/// Largest token count accepted in a parameter (sink, local, strides, ...).
pub const MAX_TOKENS: u32 = 1 << 24;

/// Positions and lengths (`q`, `k`, `nq`, `nk`) a predicate must be exact for: below 2^31.
pub const MAX_POSITION: i128 = 1 << 31;
/// Heads (`h`) a predicate must be exact for: below 2^16.
pub const MAX_HEAD: i128 = 1 << 16;

/// The values `e` can take for positions below [`MAX_POSITION`] and heads below [`MAX_HEAD`],
/// or `None` when some part of it can leave 64-bit integers. Predicates are evaluated in 64-bit
/// integers (the CPU saturates where the GPU would wrap): refusing expressions that can
/// overflow is what keeps the two equal on every input.
pub fn int_range(e: &IntExpr) -> Option<(i128, i128)> {
    let fits = |(lo, hi): (i128, i128)| (lo >= i64::MIN as i128 && hi <= i64::MAX as i128).then_some((lo, hi));
    let r = match e {
        IntExpr::Var(Var::H) => (0, MAX_HEAD - 1),
        IntExpr::Var(_) => (0, MAX_POSITION - 1),
        IntExpr::Const(c) => (*c as i128, *c as i128),
        IntExpr::Neg(a) => {
            let (lo, hi) = int_range(a)?;
            (-hi, -lo)
        }
        IntExpr::Bin { op, lhs, rhs } => {
            let ((a, b), (c, d)) = (int_range(lhs)?, int_range(rhs)?);
            match op {
                IntOp::Add => (a + c, b + d),
                IntOp::Sub => (a - d, b - c),
                IntOp::Mul => {
                    let p = [a * c, a * d, b * c, b * d];
                    (*p.iter().min()?, *p.iter().max()?)
                }
                // Validation asks for a positive constant divisor: Euclidean division by it is
                // floor division, and the remainder lies in 0..divisor.
                IntOp::Div if c > 0 => (a.div_euclid(c), b.div_euclid(c)),
                IntOp::Rem if c > 0 => (0, d - 1),
                IntOp::Div | IntOp::Rem => (a.min(0).min(-b.abs()), b.max(0).max(a.abs())),
                IntOp::Min => (a.min(c), b.min(d)),
                IntOp::Max => (a.max(c), b.max(d)),
            }
        }
    };
    fits(r)
}

struct Ctx {
    errors: Vec<ValidationError>,
}

impl Ctx {
    fn err(&mut self, path: &str, field: &'static str, message: String) {
        self.errors.push(ValidationError { path: path.to_string(), field, message });
    }

    fn pow2(&mut self, path: &str, field: &'static str, v: u32, lo: u32, hi: u32) {
        if !(v.is_power_of_two() && (lo..=hi).contains(&v)) {
            self.err(path, field, format!("must be a power of two between {lo} and {hi}, got {v}"));
        }
    }

    fn range(&mut self, path: &str, field: &'static str, v: u32, lo: u32, hi: u32) {
        if !(lo..=hi).contains(&v) {
            self.err(path, field, format!("must be between {lo} and {hi}, got {v}"));
        }
    }

    fn budget(&mut self, path: &str, field: &'static str, b: &Budget) {
        match *b {
            Budget::TopK(n) => self.range(path, field, n, 1, MAX_TOKENS),
            Budget::TopP(p) => {
                if !(p > 0.0 && p <= 1.0) {
                    self.err(path, field, format!("top_p must be in (0, 1], got {p}"));
                }
            }
            Budget::Threshold(t) => {
                if !(t > 0.0 && t <= 1.0) {
                    self.err(path, field, format!("threshold must be in (0, 1], got {t}"));
                }
            }
        }
    }

    fn int(&mut self, path: &str, field: &'static str, e: &IntExpr) {
        match e {
            IntExpr::Var(_) => {}
            IntExpr::Const(c) => {
                if c.unsigned_abs() > MAX_CONST.unsigned_abs() {
                    self.err(
                        path,
                        field,
                        format!("constant {c} is out of range: predicates use 32-bit integers (|c| <= {MAX_CONST})"),
                    );
                }
            }
            IntExpr::Neg(a) => self.int(path, field, a),
            IntExpr::Bin { op, lhs, rhs } => {
                self.int(path, field, lhs);
                self.int(path, field, rhs);
                if matches!(op, IntOp::Div | IntOp::Rem) && !matches!(**rhs, IntExpr::Const(c) if c > 0) {
                    self.err(
                        path,
                        field,
                        format!("the divisor of `{}` must be a positive integer constant", op.symbol()),
                    );
                }
            }
        }
    }

    /// The whole comparison side `e` must stay in 64-bit integers (see [`int_range`]); its
    /// parts were checked by [`Ctx::int`]. One message per expression, naming it.
    fn no_overflow(&mut self, path: &str, field: &'static str, e: &IntExpr) {
        if int_range(e).is_none() {
            self.err(
                path,
                field,
                format!(
                    "`{e}` can overflow 64-bit integers for positions up to 2^31: predicates are exact 64-bit \
                     integer arithmetic; use smaller constants or fewer products"
                ),
            );
        }
    }

    fn pred(&mut self, path: &str, field: &'static str, p: &Pred) {
        match p {
            Pred::Const(_) => {}
            Pred::Cmp { lhs, rhs, .. } => {
                self.int(path, field, lhs);
                self.int(path, field, rhs);
                self.no_overflow(path, field, lhs);
                self.no_overflow(path, field, rhs);
            }
            Pred::And(a, b) | Pred::Or(a, b) => {
                self.pred(path, field, a);
                self.pred(path, field, b);
            }
            Pred::Not(a) => self.pred(path, field, a),
        }
    }

    fn expr(&mut self, path: &str, e: &PatternExpr, top: Top) {
        match e {
            PatternExpr::Static(p) => self.pred(&format!("{path}.static"), "predicate", p),
            PatternExpr::Block(b) => {
                let path = format!("{path}.block");
                self.pow2(&path, "block_q", b.block_q, 16, 256);
                self.pow2(&path, "block_k", b.block_k, 16, 256);
                match &b.keep {
                    BlockKeep::Budget(budget) => self.budget(&path, "keep", budget),
                    BlockKeep::Where(p) => self.pred(&path, "keep", p),
                }
            }
            PatternExpr::VerticalVector(v) => {
                let path = format!("{path}.vertical_vector");
                if v.q_block != 64 && v.q_block != 128 {
                    self.err(&path, "q_block", format!("must be 64 or 128, got {}", v.q_block));
                }
                self.budget(&path, "keep", &v.keep);
                self.range(&path, "sink", v.sink, 0, MAX_TOKENS);
                self.range(&path, "local", v.local, 0, MAX_TOKENS);
            }
            PatternExpr::VerticalSlash(v) => {
                let path = format!("{path}.vertical_slash");
                self.pow2(&path, "block", v.block, 16, 256);
                self.range(&path, "last_q", v.last_q, 1, 4096);
                self.budget(&path, "vertical", &v.vertical);
                self.budget(&path, "slash", &v.slash);
            }
            PatternExpr::Grid(g) => {
                let path = format!("{path}.grid");
                self.range(&path, "stride", g.stride, 1, MAX_TOKENS);
                if let Some(phase) = g.phase {
                    if phase >= g.stride.max(1) {
                        self.err(&path, "phase", format!("must be below the stride ({}), got {phase}", g.stride));
                    }
                }
                self.range(&path, "sink", g.sink, 0, MAX_TOKENS);
            }
            PatternExpr::Retrieval(r) => {
                let path = format!("{path}.retrieval");
                match r.unit {
                    Unit::Token => {}
                    Unit::Page(n) => self.range(&path, "unit", n, 1, 4096),
                    Unit::Cluster(n) => self.range(&path, "unit", n, 1, 65536),
                }
                match (r.score, r.unit) {
                    (Score::MinMax, Unit::Page(_)) | (Score::Centroid, Unit::Cluster(_)) => {}
                    (Score::Quantized(bits), Unit::Token | Unit::Page(_)) => {
                        if ![1, 2, 4, 8].contains(&bits) {
                            self.err(&path, "score", format!("quantized bits must be 1, 2, 4 or 8, got {bits}"));
                        }
                    }
                    (Score::MinMax, _) => self.err(&path, "score", "min_max scores pages: use unit = page(n)".into()),
                    (Score::Centroid, _) => {
                        self.err(&path, "score", "centroid scores clusters: use unit = cluster(n)".into())
                    }
                    (Score::Quantized(_), _) => {
                        self.err(&path, "score", "quantized scores tokens or pages: use unit = token or page(n)".into())
                    }
                }
                self.budget(&path, "keep", &r.budget);
                self.range(&path, "sink", r.sink, 0, MAX_TOKENS);
                self.range(&path, "recent", r.recent, 0, MAX_TOKENS);
            }
            PatternExpr::Union(items) | PatternExpr::Intersect(items) => {
                let name = if matches!(e, PatternExpr::Union(_)) { "union" } else { "intersect" };
                if items.is_empty() {
                    self.err(path, "expr", format!("{name} needs at least one pattern"));
                }
                for (i, item) in items.iter().enumerate() {
                    self.expr(&format!("{path}.{name}[{i}]"), item, Top::Inner);
                }
            }
            PatternExpr::Permuted { permutation, inner } => {
                let path = format!("{path}.permuted");
                if top == Top::Inner {
                    self.err(&path, "expr", "permuted(...) must be the outermost pattern (ring(...) may wrap it): union and intersect operands share one token order".into());
                }
                let Permutation::Stride(s) = *permutation;
                self.range(&path, "permutation", s, 1, MAX_TOKENS);
                if inner.contains_retrieval() {
                    self.err(&path, "expr", "retrieval operators run on decode tokens and cannot be permuted".into());
                }
                self.expr(&path, inner, Top::Inner);
            }
            PatternExpr::Ring { workers, layout, inner } => {
                let path = format!("{path}.ring");
                if top != Top::Outer {
                    self.err(&path, "expr", "ring(...) must be the outermost pattern".into());
                }
                self.range(&path, "workers", *workers, 1, 1024);
                if let RingLayout::Striped(n) = layout {
                    self.range(&path, "layout", *n, 1, MAX_TOKENS);
                }
                self.expr(&path, inner, Top::InsideRing);
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Top {
    Outer,
    InsideRing,
    Inner,
}

/// Checks every parameter and the tree's shape; returns every problem found.
pub fn validate(expr: &PatternExpr) -> Result<(), Vec<ValidationError>> {
    let mut ctx = Ctx { errors: Vec::new() };
    ctx.expr("pattern", expr, Top::Outer);
    if ctx.errors.is_empty() {
        Ok(())
    } else {
        Err(ctx.errors)
    }
}
