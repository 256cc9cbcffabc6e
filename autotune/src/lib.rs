//! # weft-autotune: per-head pattern search (and, to come, kernel autotuning)
//!
//! - [`search`]: offline, per model: for every layer and head of captured Q/K, score candidate
//!   patterns by recall and density and pick one per head, by a target recall or under a
//!   global density budget. CPU only (rayon across heads).
//!
//! Still to come (see the project's issues): kernel config spaces with static resource
//! pruning, parallel NVRTC compilation, GPU timing, verification of winners before they are
//! stored in `weft-cache`, and recall computed on the GPU.

pub mod search;

/// Everything that can go wrong in a search.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Patterns(#[from] weft_patterns::Error),
    #[error("search: {0}")]
    Search(String),
}
