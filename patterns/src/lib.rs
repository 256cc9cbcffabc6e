//! # weft-patterns: what each pattern means
//!
//! This crate is the oracle: for every family it defines, on the CPU and in plain Rust,
//! which (query, key) pairs are computed, and what attention over them returns. Every GPU
//! kernel weft generates is checked against it.
//!
//! - [`build_index`]: from a pattern, Q `[hq, nq, d]` and K `[hkv, nk, d]` (f32, GQA allowed:
//!   `hq` a multiple of `hkv`), the [`SparseIndex`];
//! - [`reference::attention`]: exact `softmax(Q K^T * scale) V` over an index, f64
//!   accumulation, with the log-sum-exp per row;
//! - [`metrics`]: density and recall; [`ring`]: ring partitions and the exact merge;
//!   [`permute`]: permutations by index arithmetic; [`retrieval`]: decode-time operators.
//!
//! ## The sparse index, shared by CPU and GPU
//!
//! Per query head and per query block of `block_m` rows (a *row* of the index), two CSR
//! lists: key blocks of `block_n` keys, each full or partial, and single key columns.
//!
//! ```text
//!            key blocks (block_n keys each)                     row r = head * q_blocks + qb
//!            kb0   kb1   kb2   kb3   kb4   kb5
//!   qb0    [FULL][    ][    ][    ][    ][    ]   + columns {  }
//!   qb1    [FULL][PART][    ][    ][    ][    ]   + columns { 130 }
//!   qb2    [FULL][    ][PART][    ][    ][    ]   + columns { 70, 131 }
//!   qb3    [FULL][    ][    ][FULL][PART][    ]   + columns { 70, 200 }
//!
//!   block_ptr  = [0, 1, 3, 5, 8, ...]       block_idx  = [0, 0,1, 0,2, 0,3,4, ...]
//!   block_mask = [F, F,m0, F,m0, F,F,m0 ...]  (F = FULL = 0xffff, m0 = index into `masks`)
//!   col_ptr    = [0, 0, 1, 3, 5, ...]       col_idx    = [130, 70,131, 70,200, ...]
//!   col_mask   = [F, F,F, m1,F, ...]
//! ```
//!
//! - A **full** block computes every pair of its `block_m x block_n` tile (clipped at the
//!   sequence ends): no per-pair test, as FlexAttention's full blocks.
//! - A **partial** block or a **column** carries a mask id: `masks[id]` is a static predicate
//!   over `(q, k, h, nq, nk)` that the kernel evaluates per pair. Ids are shared across heads.
//! - Columns never repeat a pair of a block entry of the same row: a column inside a listed
//!   block carries the predicate of the pairs that block does not compute.
//! - Block ids ascend per row; columns ascend per row.
//! - Positions are index positions: when the pattern is `permuted(...)`, query row `i` is
//!   token `permute::inverse(p, i, nq)` and key `j` is `permute::inverse(p, j, nk)`; kernels
//!   apply this while loading, the output lands at the token's own row.
//!
//! ## Semantics of the families (all per head, with `scale = 1/sqrt(d)` unless given)
//!
//! - static predicates: the pairs where the predicate is true;
//! - `block`: pooled (mean) query block x pooled key block logits, budget per query block;
//!   `blocks(pred)` keeps blocks whose indices satisfy `pred`;
//! - `vertical_vector`: per group of `q_block` rows, the pooled query's logits against every
//!   key after the sink, budget per group; plus `k < sink` and the band `|q + nk - nq - k| < local`;
//! - `vertical_slash`: softmax of the last `last_q` queries; column sums pick verticals,
//!   diagonal sums pick slashes (budgets over mass); a slash keeps every `block x block` tile
//!   it crosses in each query group;
//! - `grid`: columns `k >= phase` with `k = phase mod stride`, rows `q = phase mod stride`,
//!   `k < sink`; the phase, when not given, is the in-frame position with the most mass in the
//!   last 64 queries;
//! - `retrieval`: see [`retrieval`];
//! - inside an intersection, dynamic families choose among the candidates its static operands
//!   allow (e.g. only past blocks under `causal`). The exception is `retrieval`: a decode-time
//!   operator whose units (pages, clusters) are scored whole over the causally visible keys, as
//!   a serving cache keeps them; the intersection's static operands then mask the kept keys
//!   (so an intersection can only remove keys from its budget, never replace them).
//!
//! Budgets rank candidates by score, ties to the lower index ([`select::select`]); masses
//! (vertical-slash) rank as weights ([`select::select_mass`]). The estimates' softmax uses
//! [`repro`]'s arithmetic, so that GPU builders choose exactly the same.

pub mod backward;
pub mod contract;
pub mod families;
pub mod index;
pub mod interval;
pub mod key_major;
pub mod metrics;
pub mod permute;
pub mod reference;
pub mod repro;
pub mod retrieval;
pub mod ring;
pub mod select;
pub mod selection;
pub mod synthetic;
pub mod tensor;

pub use backward::{attention_backward, dense_attention_backward, ring_attention_backward, Gradients};
pub use families::Estimates;
pub use index::{
    build_index, layout, resolve_pattern, BatchIndex, IndexOptions, Resolved, SparseIndex, FULL, MAX_TILES,
};
pub use metrics::{recall, Recall, Universe};
pub use reference::{attention, dense_attention, Attention};
pub use tensor::Tensor;

/// Everything that can go wrong building an index or computing reference attention.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pattern itself is invalid.
    #[error(transparent)]
    Pattern(#[from] weft_dsl::Error),
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A NaN or infinity in an input.
    #[error(
        "tensor `{tensor}` holds a NaN or infinity at head {head}, token {token}; attention inputs must be finite"
    )]
    NonFinite { tensor: String, head: usize, token: usize },
    /// Block sizes that do not fit the pattern.
    #[error("index layout: {0}")]
    Layout(String),
}
