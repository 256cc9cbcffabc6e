//! # weft-autotune: kernel autotuning and per-head pattern search
//!
//! - [`search`]: offline, per model: for every layer and head of captured Q/K, score candidate
//!   patterns by recall and density and pick one per head, by a target recall or under a
//!   global density budget. Indexes are built on the CPU (rayon across heads); recall is
//!   computed on the CPU or by generated kernels on the GPU ([`search::Backend`]).
//! - [`space`]: the kernel config space of a pattern, pruned by a static resource model
//!   (shared memory, then NVRTC's register and spill report from a parallel compile), with the
//!   CTAs per multiprocessor each survivor gets.
//! - [`tune`]: one (pattern, head, shape bucket) on the GPU: the pruned space timed with CUDA
//!   events and early elimination, the winner checked against the CPU reference and stored
//!   with its tuning record in `weft-cache`, under the key `weft_runtime::tune_key` gives
//!   (the runtime looks tuned configs up under the same key).
//!
//! - [`decode`]: the decode kernel's split-KV count for a retrieval pattern and cache length,
//!   timed and checked the same way.
//! - [`paged`]: the split count of decode steps over a paged KV cache, per batch and context.
//!
//! GPU tests (`--features gpu`, `tests/gpu.rs`): a tune loaded by a cold process, a tuner
//! killed mid-tune, and GPU recall against the CPU's.

pub mod decode;
pub mod paged;
pub mod search;
pub mod space;
pub mod tune;

/// Everything that can go wrong in a search.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Patterns(#[from] weft_patterns::Error),
    #[error(transparent)]
    Codegen(#[from] weft_codegen::Error),
    /// Compiling, loading or launching on the GPU.
    #[error("GPU: {0}")]
    Gpu(#[from] weft_runtime::Error),
    /// CUDA events and copies of the timing loops.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error(transparent)]
    Cache(#[from] weft_cache::Error),
    /// The search has no answer (no candidates, a budget nothing fits).
    #[error("search: {0}")]
    Search(String),
    /// The tuner has no answer (no config ran and passed the check).
    #[error("tune: {0}")]
    Tune(String),
}
