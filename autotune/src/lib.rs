//! # weft-autotune: kernel autotuning and per-head pattern search
//!
//! - [`search`]: offline, per model: for every layer and head of captured Q/K, score candidate
//!   patterns by recall and density and pick one per head, by a target recall or under a
//!   global density budget. CPU only (rayon across heads).
//!
//! - [`space`]: the kernel config space of a pattern, pruned by a static resource model
//!   (shared memory, then NVRTC's register and spill report from a parallel compile), with the
//!   CTAs per multiprocessor each survivor gets.
//! - [`tune`]: one (pattern, head, shape bucket) on the GPU: the pruned space timed with CUDA
//!   events and early elimination, the winner checked against the CPU reference and stored
//!   with its tuning record in `weft-cache`.
//!
//! Still to come (see the project's issues): tuning several buckets and the heads of a search
//! result in one run, and recall computed on the GPU during the search.

pub mod search;
pub mod space;
pub mod tune;

/// Everything that can go wrong in a search.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Patterns(#[from] weft_patterns::Error),
    #[error("search: {0}")]
    Search(String),
}
