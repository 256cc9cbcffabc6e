//! Canonical form and content hash.
//!
//! Two patterns that differ only in how a union or intersection is written (order, nesting,
//! repeats, several static operands) have the same canonical form and therefore the same
//! hash. The hash is BLAKE3 over a versioned header and the canonical form's JSON; it keys
//! every cache entry, so the encoding only changes with [`IR_VERSION`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ir::*;

/// Version of the canonical encoding. Bumping it invalidates every stored kernel.
pub const IR_VERSION: u32 = 1;

/// A 256-bit BLAKE3 content hash of a pattern's canonical form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PatternHash(pub [u8; 32]);

impl PatternHash {
    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// The first 16 hex digits, for names and logs.
    pub fn short(&self) -> String {
        self.to_hex()[..16].to_string()
    }
}

impl fmt::Display for PatternHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PatternHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PatternHash({})", self.short())
    }
}

/// The canonical form: unions and intersections flattened, their static operands merged
/// into one predicate, operands sorted by their encoding and deduplicated.
pub fn canonicalize(expr: &PatternExpr) -> PatternExpr {
    match expr {
        PatternExpr::Union(items) => nary(items, true),
        PatternExpr::Intersect(items) => nary(items, false),
        PatternExpr::Permuted { permutation, inner } => {
            PatternExpr::Permuted { permutation: *permutation, inner: Box::new(canonicalize(inner)) }
        }
        PatternExpr::Ring { workers, layout, inner } => {
            PatternExpr::Ring { workers: *workers, layout: *layout, inner: Box::new(canonicalize(inner)) }
        }
        other => other.clone(),
    }
}

fn encode(e: &PatternExpr) -> Vec<u8> {
    // The IR is plain data (no maps, finite floats after validation): serialization cannot fail.
    serde_json::to_vec(e).unwrap_or_default()
}

fn flatten_into(items: &[PatternExpr], union: bool, out: &mut Vec<PatternExpr>) {
    for item in items {
        match (item, union) {
            (PatternExpr::Union(inner), true) | (PatternExpr::Intersect(inner), false) => {
                flatten_into(inner, union, out)
            }
            (other, _) => out.push(canonicalize(other)),
        }
    }
}

/// Splits `a || b || c` (for a union) or `a && b && c` (for an intersection) into its operands.
fn split_pred(p: Pred, union: bool, out: &mut Vec<Pred>) {
    match (p, union) {
        (Pred::Or(a, b), true) | (Pred::And(a, b), false) => {
            split_pred(*a, union, out);
            split_pred(*b, union, out);
        }
        (other, _) => out.push(other),
    }
}

fn nary(items: &[PatternExpr], union: bool) -> PatternExpr {
    let mut flat = Vec::new();
    flatten_into(items, union, &mut flat);
    // A canonical child may itself be a merged static of the same operator: split it again.
    let mut parts = Vec::new();
    for e in flat {
        match e {
            PatternExpr::Static(p) => {
                let mut ps = Vec::new();
                split_pred(p, union, &mut ps);
                parts.extend(ps.into_iter().map(PatternExpr::Static));
            }
            PatternExpr::Union(inner) if union => parts.extend(inner),
            PatternExpr::Intersect(inner) if !union => parts.extend(inner),
            other => parts.push(other),
        }
    }
    let flat = parts;
    let (statics, mut rest): (Vec<_>, Vec<_>) = flat.into_iter().partition(|e| matches!(e, PatternExpr::Static(_)));
    let mut preds: Vec<(Vec<u8>, Pred)> = statics
        .into_iter()
        .filter_map(|e| match e {
            PatternExpr::Static(p) => Some((serde_json::to_vec(&p).unwrap_or_default(), p)),
            _ => None,
        })
        .collect();
    preds.sort_by(|a, b| a.0.cmp(&b.0));
    preds.dedup_by(|a, b| a.0 == b.0);
    let merged = preds.into_iter().map(|(_, p)| p).reduce(|a, b| {
        if union {
            Pred::Or(Box::new(a), Box::new(b))
        } else {
            Pred::And(Box::new(a), Box::new(b))
        }
    });
    if let Some(p) = merged {
        rest.push(PatternExpr::Static(p));
    }
    let mut keyed: Vec<(Vec<u8>, PatternExpr)> = rest.into_iter().map(|e| (encode(&e), e)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.dedup_by(|a, b| a.0 == b.0);
    let mut out: Vec<PatternExpr> = keyed.into_iter().map(|(_, e)| e).collect();
    match out.len() {
        0 => PatternExpr::Static(Pred::Const(!union)),
        1 => out.pop().unwrap_or(PatternExpr::Static(Pred::Const(!union))),
        _ if union => PatternExpr::Union(out),
        _ => PatternExpr::Intersect(out),
    }
}

/// The bytes the hash is taken over.
pub fn canonical_bytes(expr: &PatternExpr) -> Vec<u8> {
    let mut bytes = format!("weft-ir/{IR_VERSION}\n").into_bytes();
    bytes.extend(encode(&canonicalize(expr)));
    bytes
}

/// The content hash of an expression.
pub fn hash_expr(expr: &PatternExpr) -> PatternHash {
    PatternHash(*blake3::hash(&canonical_bytes(expr)).as_bytes())
}
