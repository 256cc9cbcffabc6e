//! Interval analysis of static predicates over a rectangle of (query, key) positions.
//!
//! The index builder asks, for each block, whether a predicate is true for every pair, false
//! for every pair, or mixed. Intervals answer the first two cheaply and soundly (never a wrong
//! "all"); when they cannot decide, the builder checks the block pair by pair.

use weft_dsl::eval::{apply_cmp, apply_int};
use weft_dsl::{CmpOp, IntExpr, IntOp, Pred, Var};

/// A rectangle of positions `q in q0..q1`, `k in k0..k1` (half-open) at head `h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub q0: i64,
    pub q1: i64,
    pub k0: i64,
    pub k1: i64,
    pub h: i64,
    pub nq: i64,
    pub nk: i64,
}

impl Region {
    /// Rows `q0..q1` and keys `k0..k1` of head `h`, in a problem of `nq` queries and `nk` keys.
    pub fn new(h: usize, (q0, q1): (usize, usize), (k0, k1): (usize, usize), (nq, nk): (usize, usize)) -> Region {
        let i = |x: usize| x as i64;
        Region { q0: i(q0), q1: i(q1), k0: i(k0), k1: i(k1), h: i(h), nq: i(nq), nk: i(nk) }
    }

    /// Number of pairs.
    pub fn pairs(&self) -> u64 {
        ((self.q1 - self.q0).max(0) as u64) * ((self.k1 - self.k0).max(0) as u64)
    }

    /// Every pair, row by row.
    pub fn for_each(&self, mut f: impl FnMut(i64, i64)) {
        for q in self.q0..self.q1 {
            for k in self.k0..self.k1 {
                f(q, k)
            }
        }
    }

    fn env(&self, q: i64, k: i64) -> weft_dsl::Env {
        weft_dsl::Env { q, k, h: self.h, nq: self.nq, nk: self.nk }
    }

    /// The two halves of a region of at least two pairs, split along its longer side.
    fn halves(&self) -> (Region, Region) {
        if self.q1 - self.q0 >= self.k1 - self.k0 {
            let mid = self.q0 + (self.q1 - self.q0) / 2;
            (Region { q1: mid, ..*self }, Region { q0: mid, ..*self })
        } else {
            let mid = self.k0 + (self.k1 - self.k0) / 2;
            (Region { k1: mid, ..*self }, Region { k0: mid, ..*self })
        }
    }

    /// Evaluates `p` at one pair of this region's head.
    pub fn eval(&self, p: &Pred, q: i64, k: i64) -> bool {
        p.eval(&self.env(q, k))
    }
}

type Iv = (i64, i64);

/// The interval of `x - y` for `x` in `a` and `y` in `b` (saturating).
fn difference(a: Iv, b: Iv) -> Iv {
    (a.0.saturating_sub(b.1), a.1.saturating_sub(b.0))
}

fn corners(op: IntOp, a: Iv, b: Iv) -> Iv {
    let c = [apply_int(op, a.0, b.0), apply_int(op, a.0, b.1), apply_int(op, a.1, b.0), apply_int(op, a.1, b.1)];
    (c.iter().copied().min().unwrap_or(0), c.iter().copied().max().unwrap_or(0))
}

fn interval(e: &IntExpr, r: &Region) -> Iv {
    match e {
        IntExpr::Var(Var::Q) => (r.q0, r.q1 - 1),
        IntExpr::Var(Var::K) => (r.k0, r.k1 - 1),
        IntExpr::Var(Var::H) => (r.h, r.h),
        IntExpr::Var(Var::Nq) => (r.nq, r.nq),
        IntExpr::Var(Var::Nk) => (r.nk, r.nk),
        IntExpr::Const(c) => (*c, *c),
        IntExpr::Neg(a) => {
            let (lo, hi) = interval(a, r);
            (hi.saturating_neg(), lo.saturating_neg())
        }
        IntExpr::Bin { op, lhs, rhs } => {
            let a = interval(lhs, r);
            let b = interval(rhs, r);
            match op {
                IntOp::Add => (a.0.saturating_add(b.0), a.1.saturating_add(b.1)),
                IntOp::Sub => difference(a, b),
                IntOp::Mul | IntOp::Min | IntOp::Max => corners(*op, a, b),
                IntOp::Div if b.0 == b.1 && b.0 > 0 => (a.0.div_euclid(b.0), a.1.div_euclid(b.0)),
                IntOp::Rem if b.0 == b.1 && b.0 > 0 => {
                    let c = b.0;
                    if a.0.div_euclid(c) == a.1.div_euclid(c) {
                        (a.0.rem_euclid(c), a.1.rem_euclid(c))
                    } else {
                        (0, c - 1)
                    }
                }
                // Validation forbids other divisors; stay sound anyway.
                _ => (i64::MIN, i64::MAX),
            }
        }
    }
}

/// `Some(true)` if `p` holds for every pair of `r`, `Some(false)` if for none, `None` if the
/// intervals cannot tell.
pub fn decide(p: &Pred, r: &Region) -> Option<bool> {
    if r.pairs() == 0 {
        return Some(false);
    }
    match p {
        Pred::Const(b) => Some(*b),
        Pred::Cmp { op, lhs, rhs } => {
            // Compare through the difference's interval.
            let d = difference(interval(lhs, r), interval(rhs, r));
            if d.0 == d.1 {
                return Some(apply_cmp(*op, d.0, 0));
            }
            match op {
                CmpOp::Lt => decided(d.1 < 0, d.0 >= 0),
                CmpOp::Le => decided(d.1 <= 0, d.0 > 0),
                CmpOp::Gt => decided(d.0 > 0, d.1 <= 0),
                CmpOp::Ge => decided(d.0 >= 0, d.1 < 0),
                CmpOp::Eq => decided(false, d.0 > 0 || d.1 < 0),
                CmpOp::Ne => decided(d.0 > 0 || d.1 < 0, false),
            }
        }
        Pred::And(a, b) => match (decide(a, r), decide(b, r)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Pred::Or(a, b) => match (decide(a, r), decide(b, r)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Pred::Not(a) => decide(a, r).map(|x| !x),
    }
}

fn decided(all: bool, none: bool) -> Option<bool> {
    if all {
        Some(true)
    } else if none {
        Some(false)
    } else {
        None
    }
}

/// Regions of at most this many pairs that intervals leave undecided are checked pair by pair.
const PAIRWISE: u64 = 4;

/// Like [`decide`], but settles undecided regions exactly: `None` only for a region that is
/// truly mixed.
///
/// An undecided region is split in halves (along its longer side), each decided by intervals
/// where they can be, the first half first; the region is mixed as soon as two parts disagree.
/// At a window's edge that takes a few interval checks where checking pair by pair took about
/// a hundred pairs (static plans ask this for every column near the diagonal of every row,
/// most of their time). Small undecided parts are checked pair by pair, stopping at the first
/// disagreement.
pub fn decide_exact(p: &Pred, r: &Region) -> Option<bool> {
    if let Some(x) = decide(p, r) {
        return Some(x);
    }
    let mut seen = [false; 2];
    let mut note = |x: bool| {
        seen[usize::from(x)] = true;
        seen[0] && seen[1]
    };
    // (`r` itself is known to be undecided: a large one starts from its halves.)
    let mut stack = if r.pairs() <= PAIRWISE {
        vec![*r]
    } else {
        let (a, b) = r.halves();
        vec![b, a]
    };
    while let Some(part) = stack.pop() {
        if part.pairs() <= PAIRWISE {
            for q in part.q0..part.q1 {
                for k in part.k0..part.k1 {
                    if note(part.eval(p, q, k)) {
                        return None;
                    }
                }
            }
            continue;
        }
        match decide(p, &part) {
            Some(x) if note(x) => return None,
            Some(_) => {}
            None => {
                let (a, b) = part.halves();
                stack.push(b);
                stack.push(a);
            }
        }
    }
    Some(seen[1] && !seen[0])
}

/// How many pairs of `r` satisfy `p`. Regions the intervals decide are counted whole. Where
/// the predicate, with the parts the region decides folded away, reads only one of `q` and
/// `k`, one line of the region is counted and multiplied (a grid's `q % 8 == 3` over a block
/// below the diagonal). Otherwise the region is split in halves, down to [`COUNT_PAIRWISE`]
/// pairs checked one by one. Counting a block on the diagonal of a causal mask takes a few
/// dozen interval checks instead of a check per pair: what lets pattern search measure exact
/// density over every row.
pub fn count(p: &Pred, r: &Region) -> u64 {
    let mut n = 0;
    let mut stack = vec![*r];
    while let Some(part) = stack.pop() {
        if let Some(x) = decide(p, &part) {
            n += if x { part.pairs() } else { 0 };
            continue;
        }
        let s = fold(p, &part);
        let (rows, cols) = ((part.q1 - part.q0) as u64, (part.k1 - part.k0) as u64);
        if !s.uses(Var::K) || part.k1 - part.k0 == 1 {
            let line = Region { k1: part.k0 + 1, ..part };
            n += cols * (part.q0..part.q1).filter(|&q| line.eval(&s, q, part.k0)).count() as u64;
        } else if !s.uses(Var::Q) || part.q1 - part.q0 == 1 {
            let line = Region { q1: part.q0 + 1, ..part };
            n += rows * (part.k0..part.k1).filter(|&k| line.eval(&s, part.q0, k)).count() as u64;
        } else if part.pairs() <= COUNT_PAIRWISE {
            for q in part.q0..part.q1 {
                n += (part.k0..part.k1).filter(|&k| part.eval(&s, q, k)).count() as u64;
            }
        } else {
            let (a, b) = part.halves();
            stack.push(b);
            stack.push(a);
        }
    }
    n
}

/// Undecided regions of at most this many pairs are counted pair by pair.
const COUNT_PAIRWISE: u64 = 64;

/// `p` with every sub-predicate that `r` decides replaced by its constant, and constants
/// folded through `and`, `or` and `not`.
pub fn fold(p: &Pred, r: &Region) -> Pred {
    if let Some(x) = decide(p, r) {
        return Pred::Const(x);
    }
    match p {
        Pred::And(a, b) => match (fold(a, r), fold(b, r)) {
            (Pred::Const(true), x) | (x, Pred::Const(true)) => x,
            (Pred::Const(false), _) | (_, Pred::Const(false)) => Pred::Const(false),
            (x, y) => Pred::And(Box::new(x), Box::new(y)),
        },
        Pred::Or(a, b) => match (fold(a, r), fold(b, r)) {
            (Pred::Const(false), x) | (x, Pred::Const(false)) => x,
            (Pred::Const(true), _) | (_, Pred::Const(true)) => Pred::Const(true),
            (x, y) => Pred::Or(Box::new(x), Box::new(y)),
        },
        Pred::Not(a) => match fold(a, r) {
            Pred::Const(x) => Pred::Const(!x),
            x => Pred::Not(Box::new(x)),
        },
        other => other.clone(),
    }
}
