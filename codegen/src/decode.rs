//! The split-KV decode kernel ([`emit_decode`]) and the log-sum-exp merge ([`emit_merge`]).

use weft_dsl::{Pattern, Permutation, Pred};

use crate::abi::{cuda_param_lists, Axis, Entry};
use crate::config::check_head_dim;
use crate::keys::{constant, key_and_header, masks};
use crate::templates::{closure, defines, render};
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

/// The decode kernel's entry point (the kernel's own name). Grid: x query rows times splits,
/// y query heads.
pub const DECODE_ENTRY: Entry =
    Entry { name: "", threads: DECODE_THREADS, params: "DecodeParams", grid: [Axis::Each, Axis::Each, Axis::Fixed(1)] };

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
        key_and_header("decode", &closure("decode.cu"), Some(spec.pattern), &config, spec.masks, spec.permutation);
    let name = format!("weft_decode_{}", &key[..16]);
    let mut cfg = format!("#define WEFT_KERNEL {name}\n");
    cfg += &defines(&[("WEFT_F16", spec.dtype == DType::F16)]);
    cfg += &constant("int", "BN", spec.block_n, "keys per block entry (the index's block_n)");
    cfg += &constant("int", "D", spec.head_dim, "head dimension");
    cfg += &constant("int", "KERNEL_THREADS", DECODE_THREADS, "the launch's block size (DECODE_THREADS)");
    let source = render(
        &header,
        "decode.cu",
        &[
            ("config.cuh", Some(cfg)),
            ("masks.cuh", Some(masks(spec.masks, spec.permutation))),
            ("params.cuh", Some(cuda_param_lists(&[DECODE_ENTRY.params]))),
        ],
    );
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

/// The merge kernel's entry point (the kernel's own name). Grid: x rows, a warp each.
pub const MERGE_ENTRY: Entry = Entry {
    name: "",
    threads: MERGE_THREADS,
    params: "MergeParams",
    grid: [Axis::Tiles(MERGE_THREADS as usize / 32), Axis::Fixed(1), Axis::Fixed(1)],
};

/// Generates the log-sum-exp merge of partial results over disjoint key sets.
pub fn emit_merge(head_dim: u32, dtype: DType, partial: Partial) -> Result<Kernel, Error> {
    check_head_dim(head_dim)?;
    let config = format!("merge head_dim={head_dim} dtype={} partial={partial:?}", dtype.name());
    let (key, header) = key_and_header("merge", &closure("merge.cu"), None, &config, &[], None);
    let name = format!("weft_merge_{}", &key[..16]);
    let f32_parts = partial == Partial::F32;
    let mut cfg = format!("#define WEFT_KERNEL {name}\n");
    cfg += &defines(&[("WEFT_F16", dtype == DType::F16), ("WEFT_PARTIAL_F32", f32_parts)]);
    cfg += &format!(
        "typedef {} PartT;  // the partials' element type\n",
        if f32_parts { "float" } else { "unsigned short" }
    );
    cfg += &constant("int", "D", head_dim, "head dimension");
    cfg += &constant("int", "KERNEL_THREADS", MERGE_THREADS, "the launch's block size (MERGE_THREADS)");
    let source = render(
        &header,
        "merge.cu",
        &[("config.cuh", Some(cfg)), ("params.cuh", Some(cuda_param_lists(&[MERGE_ENTRY.params])))],
    );
    Ok(Kernel { name, source, key, threads: MERGE_THREADS, shared_bytes: 0, head_dim, arch_specific: false })
}
