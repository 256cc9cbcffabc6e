//! # weft-codegen: pattern + index masks + kernel config -> CUDA C++
//!
//! weft compiles every family through one kernel shape, because every family reduces to the
//! same sparse index (`weft_patterns::SparseIndex`): per query block, a list of key blocks
//! (full or partial) and a list of gathered key columns. The generated kernel runs the
//! FlashAttention-2 schedule over that index:
//!
//! - one CTA per (query block, head); `block_m / 16` warps, 16 query rows each;
//! - the row's tiles, block entries first, then its columns in chunks of `block_n`: both are
//!   loaded by row index into the same padded shared-memory tile with `cp.async` (double
//!   buffered), so gathered columns run the same `mma.sync.m16n8k16` tensor-core math as
//!   blocks and compute follows the kept columns, not whole blocks;
//! - full blocks skip the per-pair test; partial blocks and columns evaluate the index's mask
//!   predicates, inlined as a `switch` over mask ids ([`cuda_pred`]);
//! - `permuted(...)` is virtual: positions map to token rows by index arithmetic while loading
//!   Q/K/V and storing O; GQA maps query head `h` to key head `h / (hq / hkv)`;
//! - online softmax in f32 in the log2 domain; the output is normalized and written with the
//!   natural-log log-sum-exp of each row (`-inf` for a row without keys, output 0).
//!
//! The source is self-contained (no CUDA headers: bf16/fp16 are raw 16-bit values handled with
//! inline PTX), deterministic for the same inputs, and starts with a header naming the pattern,
//! its hash, the config and the masks. The mask predicates come from the index, so a kernel
//! serves every index of a pattern whose mask table is the same (in practice: the same pattern
//! and sequence-length class); the kernel key in the header and the entry-point name cover them.
//!
//! Besides the attention kernel ([`emit`], which also takes packed batches of sequences):
//! [`emit_decode`], a split-KV decode kernel for indexes with one query per row (retrieval
//! operators), and [`emit_merge`], the exact log-sum-exp merge of partial results (decode
//! splits, ring steps); [`emit_index_module`], the module of GPU index builders (vertical vectors,
//! blocks, vertical-slash and grids).
//!
//! Sources are rendered from the CUDA templates in `src/templates` (`templates.rs`: files that
//! include one another and a few headers generated per kernel, and compile on their own with
//! the sample headers there). Every entry point's parameters are declared once, in [`abi`],
//! and its block size and grid in an entry table ([`entry`], [`ATTENTION_ENTRY`], ...) that
//! the source and the runtime's launches both read.
//!
//! The Hopper path ([`KernelConfig::wgmma`], sm_90a only, [`Kernel::arch_specific`]) is the
//! same kernel with its two products as warpgroup MMAs: one warpgroup per 64 query rows, Q, K
//! and V in 128-byte swizzled shared memory read through matrix descriptors, P from registers
//! (`templates/wgmma.cuh`, `attention_wgmma.cuh`; [`emit_wgmma_probe`] checks the pieces alone). The index walk, masks
//! and softmax are shared, since a warp's wgmma accumulators have mma.sync's layout. Each
//! tile's softmax overlaps the previous tile's P V (FlashAttention-3's intra-warpgroup
//! pipelining). At 128 rows a producer warpgroup does every copy and the two computing
//! warpgroups wait on mbarriers instead of a CTA barrier ([`KernelConfig::producer`],
//! FlashAttention-3's warp specialisation). CI compiles it; the GPU suite checks it against the
//! CPU reference, and on the H200 it runs dense attention 1.6x faster than torch's flash
//! backend (docs/PERF.md). On sm_90 it is the untuned default
//! ([`KernelConfig::default_for_arch`]); patterns of mostly gathered columns take it at 128
//! rows only.

pub mod abi;
mod attention;
mod config;
mod decode;
mod index;
mod keys;
pub mod paged;
pub mod plan;
mod predicates;
mod templates;
#[cfg(test)]
mod tests;
mod wgmma;

pub use attention::{emit, gathers_columns, KernelSpec, ATTENTION_ENTRY};
pub use config::{DType, KernelConfig};
pub use decode::{
    emit_decode, emit_merge, DecodeSpec, Partial, DECODE_ENTRY, DECODE_THREADS, MERGE_ENTRY, MERGE_THREADS,
};
pub use index::*;
pub use keys::CODEGEN_VERSION;
pub use predicates::cuda_pred;
pub use wgmma::{emit_wgmma_probe, PROBE_ENTRY, WGMMA_PROBE_KEYS};

/// A generated kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The `extern "C"` entry point.
    pub name: String,
    pub source: String,
    /// Hash of everything the source depends on (pattern, masks, permutation, config, codegen).
    pub key: String,
    pub threads: u32,
    pub shared_bytes: u32,
    /// The head dimension the kernel is compiled for (launches check it).
    pub head_dim: u32,
    /// Compiled for the GPU's arch-specific target (`sm_90a`: wgmma), not the portable one.
    pub arch_specific: bool,
}

/// Errors of code generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel config: {0}")]
    Config(String),
    #[error("invalid pattern: {0}")]
    Pattern(#[from] weft_dsl::Error),
}
