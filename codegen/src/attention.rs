//! The attention kernel ([`emit`]).

use weft_dsl::{Pattern, PatternExpr, Permutation, Pred};

use crate::keys::{key_and_header, prelude};
use crate::templates::{ATTENTION, PRELUDE, WGMMA};
use crate::wgmma::wgmma_helpers;
use crate::{Error, Kernel, KernelConfig};

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
        &[PRELUDE, ATTENTION, WGMMA],
        Some(spec.pattern),
        &config,
        spec.masks,
        spec.permutation,
    );
    let name = format!("weft_attn_{}", &key[..16]);
    let source = ATTENTION
        .replace("{{HEADER}}", &header)
        .replace("{{PRELUDE}}", &prelude(spec.masks, spec.permutation, c.dtype))
        .replace("{{NAME}}", &name)
        .replace("{{BM}}", &c.block_m.to_string())
        .replace("{{BN}}", &c.block_n.to_string())
        .replace("{{D}}", &c.head_dim.to_string())
        .replace("{{MT}}", &(c.warp_rows / 16).to_string())
        .replace("{{STAGES}}", &c.stages.to_string())
        .replace("{{GATHERS}}", if gathers { "true" } else { "false" })
        .replace("{{WGMMA}}", if c.wgmma { "1" } else { "0" })
        .replace("{{PRODUCER}}", if c.producer { "1" } else { "0" })
        .replace("{{PERSISTENT}}", if c.persistent { "1" } else { "0" })
        .replace(
            "{{WGMMA_HELPERS}}",
            &if c.wgmma { wgmma_helpers(c.block_n, c.head_dim, c.dtype) } else { String::new() },
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
