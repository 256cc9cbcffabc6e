//! The attention kernel ([`emit`]).

use weft_dsl::{Pattern, PatternExpr, Permutation, Pred};

use crate::abi::{cuda_param_lists, Axis, Entry};
use crate::keys::{constant, key_and_header, masks};
use crate::templates::{closure, defines, render};
use crate::wgmma::wgmma_ops;
use crate::{DType, Error, Kernel, KernelConfig};

/// The attention kernel's entry point: the kernel's own name; its block size is the config's
/// ([`KernelConfig::threads`]), this `threads` is unused. Grid: x query blocks, y index heads;
/// a persistent kernel ([`KernelConfig::persistent`]) takes x CTAs that walk all rows.
pub const ATTENTION_ENTRY: Entry =
    Entry { name: "", threads: 0, params: "AttentionParams", grid: [Axis::Each, Axis::Each, Axis::Fixed(1)] };

/// Everything a kernel depends on.
#[derive(Clone, Debug)]
pub struct KernelSpec<'a> {
    pub pattern: &'a Pattern,
    /// The index's mask table (`SparseIndex::masks`).
    pub masks: &'a [Pred],
    /// The index's permutation (`SparseIndex::permutation`).
    pub permutation: Option<Permutation>,
    pub config: KernelConfig,
}

/// Generates the attention kernel for `spec`.
pub fn emit(spec: &KernelSpec<'_>) -> Result<Kernel, Error> {
    spec.pattern.validate()?;
    let c = spec.config;
    c.validate_for(&spec.pattern.expr).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("pattern {}: {m}", spec.pattern.name)),
        other => other,
    })?;
    let gathers = gathers_columns(&spec.pattern.expr);
    let config = format!("{c} threads={} shared_bytes={}", c.threads(), c.shared_bytes());
    let (key, header) = key_and_header(
        "attention",
        &closure("attention.cu"),
        Some(spec.pattern),
        &config,
        spec.masks,
        spec.permutation,
    );
    let name = format!("weft_attn_{}", &key[..16]);
    let mut cfg = format!("#define WEFT_KERNEL {name}\n");
    cfg += &defines(&[
        ("WEFT_F16", c.dtype == DType::F16),
        ("WEFT_WGMMA", c.wgmma),
        ("WEFT_PRODUCER", c.producer),
        ("WEFT_PERSISTENT", c.persistent),
    ]);
    cfg += &constant("int", "BM", c.block_m, "query rows per CTA (the index's block_m)");
    cfg += &constant("int", "BN", c.block_n, "keys per tile (the index's block_n)");
    cfg += &constant("int", "D", c.head_dim, "head dimension");
    cfg += &constant("int", "STAGES", c.stages, "K/V tiles in flight (cp.async pipeline depth)");
    cfg += &constant("bool", "GATHERS", gathers, "the pattern can list single key columns");
    cfg += &constant("int", "MT", c.warp_rows / 16, "16-row m-tiles per warp: each K/V fragment feeds MT mma");
    cfg += &constant("int", "KERNEL_THREADS", c.threads(), "the launch's block size (KernelConfig::threads)");
    cfg += &constant("int", "KERNEL_SHARED_BYTES", c.shared_bytes(), "the launch's dynamic shared memory");
    let source = render(
        &header,
        "attention.cu",
        &[
            ("config.cuh", Some(cfg)),
            ("masks.cuh", Some(masks(spec.masks, spec.permutation))),
            ("params.cuh", Some(cuda_param_lists(&[ATTENTION_ENTRY.params]))),
            // The Hopper helpers only in wgmma kernels (the template includes them under #if):
            // a generated header of `None` leaves a note in the include's place.
            if c.wgmma {
                ("wgmma_ops.cuh", Some(wgmma_ops(c.block_n, c.head_dim, c.dtype)))
            } else {
                ("wgmma.cuh", None)
            },
        ],
    );
    Ok(Kernel {
        name,
        source,
        key,
        threads: c.threads(),
        shared_bytes: c.shared_bytes(),
        head_dim: c.head_dim,
        arch_specific: c.wgmma,
    })
}

/// Whether an index of `e` can hold single key columns (which the kernel gathers row by row):
/// vertical vectors, vertical-slash, grids with column lines and retrieval. The kernel loads
/// columns the same either way; this picks the faster load loop, and the persistent schedule
/// ([`KernelConfig::persistent`]) takes only patterns without.
pub fn gathers_columns(e: &PatternExpr) -> bool {
    e.any_leaf(&|leaf| match leaf {
        PatternExpr::VerticalVector(_) | PatternExpr::VerticalSlash(_) | PatternExpr::Retrieval(_) => true,
        PatternExpr::Grid(g) => g.lines != weft_dsl::GridLines::Rows,
        _ => false,
    })
}
