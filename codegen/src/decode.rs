//! The split-KV decode kernel ([`emit_decode`]) and the log-sum-exp merge ([`emit_merge`]).

use weft_dsl::{Pattern, Permutation, Pred};

use crate::config::check_head_dim;
use crate::keys::{key_and_header, prelude};
use crate::templates::{DECODE, MERGE, PRELUDE};
use crate::{DType, Error, Kernel};

/// Everything a decode kernel depends on: an index with one query per row (`block_m = 1`).
#[derive(Clone, Debug)]
pub struct DecodeSpec<'a> {
    pub pattern: &'a Pattern,
    pub masks: &'a [Pred],
    pub permutation: Option<Permutation>,
    /// The index's `block_n`.
    pub block_n: u32,
    pub head_dim: u32,
    pub dtype: DType,
}

/// Threads per CTA of the decode kernel.
pub const DECODE_THREADS: u32 = 128;

/// Generates the split-key decode kernel: partial outputs (f32) and log-sum-exps per split,
/// combined by [`emit_merge`]`(.., Partial::F32)`.
pub fn emit_decode(spec: &DecodeSpec<'_>) -> Result<Kernel, Error> {
    spec.pattern.validate()?;
    check_head_dim(spec.head_dim)?;
    if !spec.block_n.is_power_of_two() || spec.block_n > 256 {
        return Err(Error::Config(format!("block_n must be a power of two up to 256, got {}", spec.block_n)));
    }
    let config = format!(
        "decode block_n={} head_dim={} dtype={} threads={DECODE_THREADS}",
        spec.block_n,
        spec.head_dim,
        spec.dtype.name()
    );
    let (key, header) =
        key_and_header("decode", &[PRELUDE, DECODE], Some(spec.pattern), &config, spec.masks, spec.permutation);
    let name = format!("weft_decode_{}", &key[..16]);
    let source = DECODE
        .replace("{{HEADER}}", &header)
        .replace("{{PRELUDE}}", &prelude(spec.masks, spec.permutation, spec.dtype))
        .replace("{{NAME}}", &name)
        .replace("{{BN}}", &spec.block_n.to_string())
        .replace("{{D}}", &spec.head_dim.to_string());
    Ok(Kernel {
        name,
        source,
        key,
        threads: DECODE_THREADS,
        shared_bytes: 0,
        head_dim: spec.head_dim,
        arch_specific: false,
    })
}

/// Element type of the partial outputs a merge reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// f32 partials (split-KV decode).
    F32,
    /// Partials in the attention dtype (ring steps run the attention kernel).
    Dtype,
}

/// Threads per CTA of the merge kernel (one warp per row).
pub const MERGE_THREADS: u32 = 128;

/// Generates the log-sum-exp merge of partial results over disjoint key sets.
pub fn emit_merge(head_dim: u32, dtype: DType, partial: Partial) -> Result<Kernel, Error> {
    check_head_dim(head_dim)?;
    let config = format!("merge head_dim={head_dim} dtype={} partial={partial:?}", dtype.name());
    let (key, header) = key_and_header("merge", &[PRELUDE, MERGE], None, &config, &[], None);
    let name = format!("weft_merge_{}", &key[..16]);
    let (part_t, load) = match partial {
        Partial::F32 => ("float", "    return parts[i];"),
        Partial::Dtype => (
            "u16",
            "    float lo, hi;\n    unpack(parts[i] , lo, hi);  // the value sits in the low half\n    return lo;",
        ),
    };
    let source = MERGE
        .replace("{{HEADER}}", &header)
        .replace("{{PRELUDE}}", &prelude(&[], None, dtype))
        .replace("{{NAME}}", &name)
        .replace("{{D}}", &head_dim.to_string())
        .replace("{{PART_T}}", part_t)
        .replace("{{PART_LOAD}}", load);
    Ok(Kernel { name, source, key, threads: MERGE_THREADS, shared_bytes: 0, head_dim, arch_specific: false })
}
