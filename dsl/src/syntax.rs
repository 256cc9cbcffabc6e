//! The DSL's one parser, from a `syn` expression to the IR.
//!
//! The `#[sparse_pattern]` macro and the text format both come through here, so a pattern
//! written either way is the same IR with the same hash, and an error points at the same
//! token (a compile-time span in the macro, a line and column in a file).
//!
//! Grammar (Rust expression syntax, read by `syn`):
//!
//! ```text
//! pattern   := pattern "|" pattern            union
//!            | pattern "&" pattern            intersection
//!            | "(" pattern ")" | family | predicate
//! family    := full | causal | sink(n) | local(w) | window(w)
//!            | block(block_q = .., block_k = .., keep = budget | blocks(predicate))
//!            | vertical_vector(q_block = .., keep = budget, sink = .., local = ..)
//!            | vertical_slash(vertical = budget, slash = budget, last_q = .., block = ..)
//!            | grid(stride = .., phase = .., lines = rows|cols|both, sink = ..)
//!            | retrieval(unit = token|page(n)|cluster(n), score = min_max|centroid|quantized(b),
//!                        keep = budget, sink = .., recent = ..)
//!            | permuted(stride(s), pattern) | ring(workers = .., layout = contiguous|zigzag|striped(n), pattern)
//! budget    := top_k(n) | top_p(p) | threshold(t)
//! predicate := comparisons of integer expressions over q, k, h, nq, nk joined by && || !
//! integer   := + - * / % min(a, b) max(a, b), integer literals; / and % by positive constants
//! ```
//!
//! Rust binds `&` and `|` tighter than comparisons, so a predicate next to `&` or `|` needs
//! parentheses: `causal & (k % 64 == 0)`.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{BinOp, Expr, Lit, UnOp};

use crate::builder;
use crate::ir::*;
use crate::validate::{validate, MAX_CONST};

type Result<T> = syn::Result<T>;

const FAMILIES: &str = "full, causal, sink(n), local(w), window(w), block(..), vertical_vector(..), \
vertical_slash(..), grid(..), retrieval(..), permuted(..), ring(..), or a parenthesized predicate such as `(q >= k)`";

fn err<T>(span: Span, msg: impl std::fmt::Display) -> Result<T> {
    Err(syn::Error::new(span, msg))
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Paren(p) => strip(&p.expr),
        Expr::Group(g) => strip(&g.expr),
        _ => e,
    }
}

/// A call `name(args)` or a bare `name`, with named (`a = v`) and positional arguments.
struct Call<'a> {
    name: String,
    span: Span,
    named: Vec<(syn::Ident, &'a Expr)>,
    positional: Vec<&'a Expr>,
}

fn ident_of(e: &Expr) -> Option<syn::Ident> {
    match strip(e) {
        Expr::Path(p) if p.qself.is_none() => p.path.get_ident().cloned(),
        _ => None,
    }
}

fn call_of(e: &Expr) -> Option<Call<'_>> {
    match strip(e) {
        Expr::Call(c) => {
            let name = ident_of(&c.func)?;
            let mut named = Vec::new();
            let mut positional = Vec::new();
            for arg in &c.args {
                match arg {
                    Expr::Assign(a) => match ident_of(&a.left) {
                        Some(id) => named.push((id, &*a.right)),
                        None => positional.push(arg),
                    },
                    _ => positional.push(arg),
                }
            }
            Some(Call { name: name.to_string(), span: e.span(), named, positional })
        }
        Expr::Path(_) => {
            let name = ident_of(e)?;
            Some(Call { name: name.to_string(), span: e.span(), named: Vec::new(), positional: Vec::new() })
        }
        _ => None,
    }
}

impl<'a> Call<'a> {
    /// Rejects unknown and repeated parameter names, and positional arguments beyond `positional`.
    fn check(&self, accepted: &[&str], positional: usize) -> Result<()> {
        for (i, (id, _)) in self.named.iter().enumerate() {
            let name = id.to_string();
            if !accepted.contains(&name.as_str()) {
                return err(
                    id.span(),
                    format!(
                        "unknown parameter `{name}` for `{}`; accepted: {}",
                        self.name,
                        if accepted.is_empty() { "none".to_string() } else { accepted.join(", ") }
                    ),
                );
            }
            if self.named[..i].iter().any(|(other, _)| *other == name) {
                return err(id.span(), format!("parameter `{name}` is given twice"));
            }
        }
        if self.positional.len() > positional {
            let extra = self.positional[positional];
            let msg = if accepted.is_empty() {
                format!("`{}` takes {positional} argument(s)", self.name)
            } else {
                format!(
                    "unexpected argument for `{}`: parameters are named, e.g. `{} = ...`; accepted: {}",
                    self.name,
                    accepted[0],
                    accepted.join(", ")
                )
            };
            return err(extra.span(), msg);
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&'a Expr> {
        self.named.iter().find(|(id, _)| id == name).map(|(_, e)| *e)
    }

    fn span_of(&self, name: &str) -> Span {
        self.get(name).map(|e| e.span()).unwrap_or(self.span)
    }

    fn positional(&self, i: usize, what: &str) -> Result<&'a Expr> {
        self.positional
            .get(i)
            .copied()
            .ok_or_else(|| syn::Error::new(self.span, format!("`{}` is missing its {what}", self.name)))
    }

    fn u32_or(&self, name: &str, default: u32) -> Result<u32> {
        self.get(name).map_or(Ok(default), |e| lit_u32(e, name))
    }

    fn budget_or(&self, name: &str, default: Budget) -> Result<Budget> {
        self.get(name).map_or(Ok(default), budget)
    }

    /// Validates a finished leaf and reports each problem at its parameter's token.
    fn validated(&self, node: PatternExpr) -> Result<PatternExpr> {
        match validate(&node) {
            Ok(()) => Ok(node),
            Err(errors) => Err(combine(errors.into_iter().map(|e| {
                syn::Error::new(self.span_of(e.field), format!("`{}` {}: {}", self.name, e.field, e.message))
            }))),
        }
    }
}

fn combine(errors: impl Iterator<Item = syn::Error>) -> syn::Error {
    errors
        .reduce(|mut a, b| {
            a.combine(b);
            a
        })
        .unwrap_or_else(|| syn::Error::new(Span::call_site(), "invalid pattern"))
}

fn int_lit(e: &Expr, what: &str) -> Result<i64> {
    match strip(e) {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(i) => i
                .base10_parse::<i64>()
                .map_err(|_| syn::Error::new(i.span(), format!("`{what}`: {i} does not fit in 64 bits"))),
            Lit::Float(x) => err(x.span(), format!("`{what}` needs an integer, found the float `{x}`")),
            Lit::Str(s) => err(s.span(), format!("`{what}` needs an integer, found the string {}", s.token())),
            other => err(other.span(), format!("`{what}` needs an integer literal")),
        },
        Expr::Unary(u) if matches!(u.op, UnOp::Neg(_)) => Ok(-int_lit(&u.expr, what)?),
        other => err(other.span(), format!("`{what}` needs an integer literal")),
    }
}

fn lit_u32(e: &Expr, what: &str) -> Result<u32> {
    let v = int_lit(e, what)?;
    u32::try_from(v)
        .map_err(|_| syn::Error::new(e.span(), format!("`{what}` must be between 0 and {}, got {v}", u32::MAX)))
}

fn lit_f64(e: &Expr, what: &str) -> Result<f64> {
    match strip(e) {
        Expr::Lit(l) => match &l.lit {
            Lit::Float(x) => x.base10_parse::<f64>(),
            Lit::Int(i) => i.base10_parse::<f64>(),
            other => err(other.span(), format!("`{what}` needs a number")),
        },
        Expr::Unary(u) if matches!(u.op, UnOp::Neg(_)) => Ok(-lit_f64(&u.expr, what)?),
        other => err(other.span(), format!("`{what}` needs a number literal")),
    }
}

fn one_arg<'a>(c: &Call<'a>, what: &str) -> Result<&'a Expr> {
    c.check(&[], 1)?;
    c.positional(0, what)
}

fn budget(e: &Expr) -> Result<Budget> {
    let bad = || syn::Error::new(e.span(), "expected a budget: top_k(n), top_p(p) or threshold(t)");
    let c = call_of(e).ok_or_else(bad)?;
    Ok(match c.name.as_str() {
        "top_k" => {
            let n = one_arg(&c, "count")?;
            let positive =
                |got: String| syn::Error::new(n.span(), format!("`top_k(n)`: n must be a positive integer, got {got}"));
            match int_lit(n, "top_k") {
                Ok(v) if v >= 1 => Budget::TopK(u32::try_from(v).map_err(|_| {
                    syn::Error::new(
                        n.span(),
                        format!("`top_k(n)`: n must be at most {}, got {v}", crate::validate::MAX_TOKENS),
                    )
                })?),
                Ok(v) => return Err(positive(v.to_string())),
                Err(e) => {
                    return Err(syn::Error::new(n.span(), format!("`top_k(n)`: n must be a positive integer; {e}")))
                }
            }
        }
        "top_p" => Budget::TopP(lit_f64(one_arg(&c, "mass")?, "top_p")?),
        "threshold" => Budget::Threshold(lit_f64(one_arg(&c, "threshold")?, "threshold")?),
        _ => return Err(bad()),
    })
}

fn choice<T>(e: &Expr, what: &str, options: &[(&str, bool)], make: impl Fn(&str, Option<u32>) -> T) -> Result<T> {
    let accepted: Vec<String> =
        options.iter().map(|(n, arg)| if *arg { format!("{n}(n)") } else { n.to_string() }).collect();
    let bad = || syn::Error::new(e.span(), format!("expected {what}: {}", accepted.join(", ")));
    let c = call_of(e).ok_or_else(bad)?;
    let (_, takes_arg) = options.iter().find(|(n, _)| *n == c.name).ok_or_else(bad)?;
    let is_call = matches!(strip(e), Expr::Call(_));
    let arg = if *takes_arg {
        Some(lit_u32(one_arg(&c, "size")?, &c.name)?)
    } else {
        if is_call {
            return err(e.span(), format!("`{}` takes no argument: write `{}`", c.name, c.name));
        }
        None
    };
    Ok(make(&c.name, arg))
}

// ---------- integers and predicates ----------

fn precedence_hint(op: &BinOp) -> Option<&'static str> {
    match op {
        BinOp::BitAnd(_) | BinOp::BitOr(_) => Some(
            "`&` and `|` combine patterns and bind tighter than comparisons in Rust: wrap the predicate in parentheses, e.g. `causal & (k < 64)`",
        ),
        _ => None,
    }
}

fn int_expr(e: &Expr) -> Result<IntExpr> {
    match strip(e) {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(_) => {
                let v = int_lit(e, "constant")?;
                if v.unsigned_abs() > MAX_CONST.unsigned_abs() {
                    return err(
                        e.span(),
                        format!("constant {v} is out of range: predicates use 32-bit integers (|c| <= {MAX_CONST})"),
                    );
                }
                Ok(IntExpr::Const(v))
            }
            Lit::Float(x) => err(x.span(), format!("predicates use integers; found the float `{x}`")),
            Lit::Bool(b) => err(b.span(), "expected an integer, found a boolean"),
            other => err(other.span(), "expected an integer"),
        },
        Expr::Path(_) => {
            let id = ident_of(e).ok_or_else(|| syn::Error::new(e.span(), "expected q, k, h, nq, nk or an integer"))?;
            Var::from_name(&id.to_string()).map(IntExpr::Var).ok_or_else(|| {
                syn::Error::new(
                    id.span(),
                    format!("unknown variable `{id}`; predicates use q, k, h, nq, nk and integer constants"),
                )
            })
        }
        Expr::Unary(u) => match u.op {
            UnOp::Neg(_) => match int_expr(&u.expr)? {
                IntExpr::Const(c) => Ok(IntExpr::Const(-c)),
                other => Ok(IntExpr::Neg(Box::new(other))),
            },
            _ => err(u.op.span(), "unsupported operator in an integer expression; use + - * / % min max"),
        },
        Expr::Binary(b) => {
            let op = match b.op {
                BinOp::Add(_) => IntOp::Add,
                BinOp::Sub(_) => IntOp::Sub,
                BinOp::Mul(_) => IntOp::Mul,
                BinOp::Div(_) => IntOp::Div,
                BinOp::Rem(_) => IntOp::Rem,
                ref op => {
                    let msg = precedence_hint(op).map(str::to_string).unwrap_or_else(|| {
                        format!(
                            "unsupported operator `{}` in an integer expression; integers use + - * / % min(a, b) max(a, b)",
                            quote_op(op)
                        )
                    });
                    return err(op.span(), msg);
                }
            };
            let lhs = int_expr(&b.left)?;
            let rhs = int_expr(&b.right)?;
            if matches!(op, IntOp::Div | IntOp::Rem) && !matches!(rhs, IntExpr::Const(c) if c > 0) {
                return err(
                    b.right.span(),
                    format!("the divisor of `{}` must be a positive integer constant", op.symbol()),
                );
            }
            Ok(IntExpr::Bin { op, lhs: Box::new(lhs), rhs: Box::new(rhs) })
        }
        Expr::Call(_) => {
            let c = call_of(e).ok_or_else(|| syn::Error::new(e.span(), "expected min(a, b) or max(a, b)"))?;
            let op = match c.name.as_str() {
                "min" => IntOp::Min,
                "max" => IntOp::Max,
                other => {
                    return err(
                        c.span,
                        format!("unknown function `{other}` in an integer expression; use min(a, b) or max(a, b)"),
                    )
                }
            };
            c.check(&[], 2)?;
            let a = int_expr(c.positional(0, "first operand")?)?;
            let b = int_expr(c.positional(1, "second operand")?)?;
            Ok(IntExpr::Bin { op, lhs: Box::new(a), rhs: Box::new(b) })
        }
        other => err(other.span(), "expected an integer expression over q, k, h, nq, nk"),
    }
}

/// How an operator is spelled in source.
fn quote_op(op: &BinOp) -> &'static str {
    match op {
        BinOp::Add(_) => "+",
        BinOp::Sub(_) => "-",
        BinOp::Mul(_) => "*",
        BinOp::Div(_) => "/",
        BinOp::Rem(_) => "%",
        BinOp::And(_) => "&&",
        BinOp::Or(_) => "||",
        BinOp::BitXor(_) => "^",
        BinOp::BitAnd(_) => "&",
        BinOp::BitOr(_) => "|",
        BinOp::Shl(_) => "<<",
        BinOp::Shr(_) => ">>",
        BinOp::Eq(_) => "==",
        BinOp::Lt(_) => "<",
        BinOp::Le(_) => "<=",
        BinOp::Ne(_) => "!=",
        BinOp::Ge(_) => ">=",
        BinOp::Gt(_) => ">",
        _ => "compound assignment",
    }
}

fn cmp_op(op: &BinOp) -> Option<CmpOp> {
    Some(match op {
        BinOp::Lt(_) => CmpOp::Lt,
        BinOp::Le(_) => CmpOp::Le,
        BinOp::Gt(_) => CmpOp::Gt,
        BinOp::Ge(_) => CmpOp::Ge,
        BinOp::Eq(_) => CmpOp::Eq,
        BinOp::Ne(_) => CmpOp::Ne,
        _ => return None,
    })
}

fn is_predicate_syntax(e: &Expr) -> bool {
    match strip(e) {
        Expr::Binary(b) => cmp_op(&b.op).is_some() || matches!(b.op, BinOp::And(_) | BinOp::Or(_)),
        Expr::Unary(u) => matches!(u.op, UnOp::Not(_)),
        Expr::Lit(l) => matches!(l.lit, Lit::Bool(_)),
        _ => false,
    }
}

/// The static named forms, usable both as patterns and inside predicates.
fn static_sugar(c: &Call<'_>) -> Result<Option<Pred>> {
    let make: fn(u32) -> PatternExpr = match c.name.as_str() {
        "full" | "causal" => {
            c.check(&[], 0)?;
            let e = if c.name == "full" { builder::full() } else { builder::causal() };
            return Ok(match e {
                PatternExpr::Static(p) => Some(p),
                _ => None,
            });
        }
        "sink" => builder::sink,
        "local" => builder::local,
        "window" => builder::window,
        _ => return Ok(None),
    };
    let n = lit_u32(one_arg(c, "token count")?, &c.name)?;
    if n > crate::validate::MAX_TOKENS {
        return err(c.span, format!("`{}` must be at most {}, got {n}", c.name, crate::validate::MAX_TOKENS));
    }
    Ok(match make(n) {
        PatternExpr::Static(p) => Some(p),
        _ => None,
    })
}

/// Parses a static predicate.
pub fn predicate(e: &Expr) -> Result<Pred> {
    match strip(e) {
        Expr::Lit(l) => match &l.lit {
            Lit::Bool(b) => Ok(Pred::Const(b.value)),
            Lit::Int(_) | Lit::Float(_) => {
                err(l.span(), "expected a condition (a comparison such as `q >= k`), found a number")
            }
            other => err(other.span(), "expected a condition such as `q >= k`"),
        },
        Expr::Unary(u) if matches!(u.op, UnOp::Not(_)) => Ok(Pred::Not(Box::new(predicate(&u.expr)?))),
        Expr::Binary(b) => {
            if let Some(op) = cmp_op(&b.op) {
                return Ok(Pred::Cmp { op, lhs: int_expr(&b.left)?, rhs: int_expr(&b.right)? });
            }
            match b.op {
                BinOp::And(_) => Ok(Pred::And(Box::new(predicate(&b.left)?), Box::new(predicate(&b.right)?))),
                BinOp::Or(_) => Ok(Pred::Or(Box::new(predicate(&b.left)?), Box::new(predicate(&b.right)?))),
                ref op => err(
                    op.span(),
                    precedence_hint(op).map(str::to_string).unwrap_or_else(|| {
                        format!("`{}` makes an integer, not a condition; compare it, e.g. `q % 64 == 0`", quote_op(op))
                    }),
                ),
            }
        }
        Expr::Call(_) | Expr::Path(_) => {
            if let Some(c) = call_of(e) {
                if let Some(p) = static_sugar(&c)? {
                    return Ok(p);
                }
                if Var::from_name(&c.name).is_some() {
                    return err(c.span, format!("`{}` is an integer; compare it, e.g. `q >= k`", c.name));
                }
                return err(c.span, format!("`{}` is not a static predicate; predicates are comparisons over q, k, h, nq, nk, or causal, full, sink(n), local(w), window(w)", c.name));
            }
            err(e.span(), "expected a condition such as `q >= k`")
        }
        other => err(other.span(), "expected a condition such as `q >= k`"),
    }
}

// ---------- patterns ----------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Outer,
    InsideRing,
    Inner,
}

/// Parses a pattern expression and validates it; errors carry the offending token's span.
pub fn pattern(e: &Expr) -> Result<PatternExpr> {
    let expr = pattern_at(e, Place::Outer)?;
    // Leaves were validated at their own tokens; this catches anything structural left.
    validate(&expr).map_err(|errors| combine(errors.into_iter().map(|v| syn::Error::new(e.span(), v.to_string()))))?;
    Ok(expr)
}

fn pattern_at(e: &Expr, place: Place) -> Result<PatternExpr> {
    if is_predicate_syntax(e) {
        return Ok(PatternExpr::Static(predicate(e)?));
    }
    match strip(e) {
        Expr::Binary(b) => {
            let union = match b.op {
                BinOp::BitOr(_) => true,
                BinOp::BitAnd(_) => false,
                ref op => {
                    return err(
                        op.span(),
                        format!(
                            "unsupported operator `{}` between patterns; combine patterns with `|` (union) and `&` (intersection)",
                            quote_op(op)
                        ),
                    )
                }
            };
            let lhs = pattern_at(&b.left, Place::Inner)?;
            let rhs = pattern_at(&b.right, Place::Inner)?;
            Ok(if union { lhs | rhs } else { lhs & rhs })
        }
        Expr::Lit(l) => err(l.span(), format!("expected a pattern, found a literal; expected one of: {FAMILIES}")),
        Expr::Unary(u) => err(u.op.span(), "only `!` (on a static predicate) is accepted before a pattern"),
        Expr::Call(_) | Expr::Path(_) => {
            let c = call_of(e).ok_or_else(|| syn::Error::new(e.span(), format!("expected one of: {FAMILIES}")))?;
            family(&c, place)
        }
        other => err(other.span(), format!("expected a pattern: {FAMILIES}")),
    }
}

fn family(c: &Call<'_>, place: Place) -> Result<PatternExpr> {
    if let Some(p) = static_sugar(c)? {
        return Ok(PatternExpr::Static(p));
    }
    let node = match c.name.as_str() {
        "block" => {
            c.check(&["block_q", "block_k", "keep"], 0)?;
            let d = Block::default();
            let keep =
                match c.get("keep") {
                    None => d.keep,
                    Some(e) => match call_of(e) {
                        Some(k) if k.name == "blocks" => BlockKeep::Where(predicate(one_arg(&k, "block predicate")?)?),
                        // A budget's own errors say what is wrong with its argument.
                        Some(k) if ["top_k", "top_p", "threshold"].contains(&k.name.as_str()) => {
                            BlockKeep::Budget(budget(e)?)
                        }
                        _ => return err(
                            e.span(),
                            "expected top_k(n), top_p(p), threshold(t) or blocks(predicate over block indices q, k)",
                        ),
                    },
                };
            PatternExpr::Block(Block {
                block_q: c.u32_or("block_q", d.block_q)?,
                block_k: c.u32_or("block_k", d.block_k)?,
                keep,
            })
        }
        "vertical_vector" => {
            c.check(&["q_block", "keep", "sink", "local"], 0)?;
            let d = VerticalVector::default();
            PatternExpr::VerticalVector(VerticalVector {
                q_block: c.u32_or("q_block", d.q_block)?,
                keep: c.budget_or("keep", d.keep)?,
                sink: c.u32_or("sink", d.sink)?,
                local: c.u32_or("local", d.local)?,
            })
        }
        "vertical_slash" => {
            c.check(&["vertical", "slash", "last_q", "block"], 0)?;
            let d = VerticalSlash::default();
            PatternExpr::VerticalSlash(VerticalSlash {
                block: c.u32_or("block", d.block)?,
                last_q: c.u32_or("last_q", d.last_q)?,
                vertical: c.budget_or("vertical", d.vertical)?,
                slash: c.budget_or("slash", d.slash)?,
            })
        }
        "grid" => {
            c.check(&["stride", "phase", "lines", "sink"], 0)?;
            let stride = match c.get("stride") {
                Some(e) => lit_u32(e, "stride")?,
                None => {
                    return err(
                        c.span,
                        "`grid` is missing `stride` (the frame size in tokens), e.g. `grid(stride = 256)`",
                    )
                }
            };
            let lines = match c.get("lines") {
                None => GridLines::Both,
                Some(e) => {
                    choice(e, "grid lines", &[("rows", false), ("cols", false), ("both", false)], |n, _| match n {
                        "rows" => GridLines::Rows,
                        "cols" => GridLines::Cols,
                        _ => GridLines::Both,
                    })?
                }
            };
            let phase = c.get("phase").map(|e| lit_u32(e, "phase")).transpose()?;
            PatternExpr::Grid(Grid { stride, phase, lines, sink: c.u32_or("sink", 0)? })
        }
        "retrieval" => {
            c.check(&["unit", "score", "keep", "sink", "recent", "per"], 0)?;
            let d = Retrieval::default();
            let unit = match c.get("unit") {
                None => d.unit,
                Some(e) => {
                    choice(e, "a KV unit", &[("token", false), ("page", true), ("cluster", true)], |n, a| match n {
                        "token" => Unit::Token,
                        "page" => Unit::Page(a.unwrap_or(16)),
                        _ => Unit::Cluster(a.unwrap_or(16)),
                    })?
                }
            };
            let score = match c.get("score") {
                None => d.score,
                Some(e) => choice(
                    e,
                    "a unit score",
                    &[("min_max", false), ("centroid", false), ("quantized", true)],
                    |n, a| match n {
                        "min_max" => Score::MinMax,
                        "centroid" => Score::Centroid,
                        _ => Score::Quantized(a.unwrap_or(4)),
                    },
                )?,
            };
            PatternExpr::Retrieval(Retrieval {
                unit,
                score,
                budget: c.budget_or("keep", d.budget)?,
                sink: c.u32_or("sink", d.sink)?,
                recent: c.u32_or("recent", d.recent)?,
                per: match c.get("per") {
                    None => d.per,
                    Some(e) => {
                        choice(e, "whose choice", &[("query_head", false), ("kv_head", false)], |n, _| match n {
                            "kv_head" => Per::KvHead,
                            _ => Per::QueryHead,
                        })?
                    }
                },
            })
        }
        "permuted" => {
            if place == Place::Inner {
                return err(c.span, "`permuted(...)` must be the outermost pattern (or directly inside `ring(...)`): the operands of `|` and `&` share one token order");
            }
            c.check(&[], 2)?;
            let perm_e = c.positional(0, "permutation, e.g. `stride(16)`")?;
            let permutation =
                choice(perm_e, "a permutation", &[("stride", true)], |_, a| Permutation::Stride(a.unwrap_or(1)))?;
            let inner = pattern_at(c.positional(1, "inner pattern")?, Place::Inner)?;
            PatternExpr::Permuted { permutation, inner: Box::new(inner) }
        }
        "ring" => {
            if place != Place::Outer {
                return err(c.span, "`ring(...)` must be the outermost pattern");
            }
            c.check(&["workers", "layout"], 1)?;
            let workers = match c.get("workers") {
                Some(e) => lit_u32(e, "workers")?,
                None => {
                    return err(
                        c.span,
                        "`ring` is missing `workers`, e.g. `ring(workers = 4, layout = zigzag, causal)`",
                    )
                }
            };
            let layout = match c.get("layout") {
                None => RingLayout::ZigZag,
                Some(e) => choice(
                    e,
                    "a ring layout",
                    &[("contiguous", false), ("zigzag", false), ("striped", true)],
                    |n, a| match n {
                        "contiguous" => RingLayout::Contiguous,
                        "zigzag" => RingLayout::ZigZag,
                        _ => RingLayout::Striped(a.unwrap_or(128)),
                    },
                )?,
            };
            let inner = pattern_at(c.positional(0, "inner pattern")?, Place::InsideRing)?;
            PatternExpr::Ring { workers, layout, inner: Box::new(inner) }
        }
        name if Var::from_name(name).is_some() => {
            return err(
                c.span,
                format!("`{name}` is a position, not a pattern; compare it inside parentheses, e.g. `(q >= k)`"),
            )
        }
        name => return err(c.span, format!("unknown pattern family `{name}`; expected one of: {FAMILIES}")),
    };
    c.validated(node)
}
