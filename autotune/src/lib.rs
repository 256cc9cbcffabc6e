//! # weft-autotune: per-head pattern search (and, to come, kernel autotuning)
//!
//! - [`search`]: offline, per model: for every layer and head of captured Q/K, score candidate
//!   patterns by recall and density and pick one per head, by a target recall or under a
//!   global density budget. CPU only (rayon across heads).
//!
//! - [`space`]: the kernel config space of a pattern, pruned by a static resource model
//!   (shared memory, then NVRTC's register and spill report from a parallel compile), with the
//!   CTAs per multiprocessor each survivor gets.
//!
//! Still to come (see the project's issues): timing the survivors on the GPU with early
//! elimination, verification of winners before they are stored in `weft-cache`, and recall
//! computed on the GPU.

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
