//! # weft
//!
//! A compiler and autotuner for sparse-attention and KV-retrieval GPU kernels.
//!
//! Describe a pattern with `#[sparse_pattern]`, the [`dsl::builder`] or a pattern file; weft
//! builds its sparse index from Q and K, computes reference attention on the CPU
//! ([`patterns`]), and (in later crates) lowers it to CUDA, autotunes it per GPU and loads
//! tuned kernels at run time.
//!
//! ```
//! use weft::sparse_pattern;
//!
//! #[sparse_pattern]
//! fn video() -> Pattern {
//!     sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))
//! }
//!
//! let p = video();
//! assert_eq!(p.name, "video");
//! assert_eq!(p.hash(), weft::dsl::parse_pattern_str("video",
//!     "sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))").unwrap().hash());
//! ```

pub use weft_autotune as autotune;
pub use weft_cache as cache;
pub use weft_codegen as codegen;
pub use weft_dsl as dsl;
pub use weft_macros::sparse_pattern;
pub use weft_patterns as patterns;
pub use weft_runtime as runtime;
pub use weft_runtime::Runtime;

pub mod analysis;
pub mod catalog;
pub mod qk;
pub mod search;
pub mod viz;

/// What the library's own functions (analysis, search, Q/K files) report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pattern(#[from] weft_dsl::Error),
    #[error(transparent)]
    Patterns(#[from] weft_patterns::Error),
    #[error(transparent)]
    Qk(#[from] qk::QkError),
    #[error(transparent)]
    Autotune(#[from] weft_autotune::Error),
    /// A bad argument, with what to do instead.
    #[error("{0}")]
    Usage(String),
}
