//! The module of GPU index builders ([`emit_vv_index`]): its entry points and their launch
//! geometry.

use crate::config::{check_head_dim, HEAD_DIMS};
use crate::keys::{key_and_header, prelude};
use crate::templates::{PRELUDE, VS_INDEX, VV_INDEX};
use crate::{DType, Error, Kernel};

/// The entry points of the vertical-vector index builder ([`emit_vv_index`]), in launch
/// order; each is `{kernel.name}_{entry}`.
pub const VV_INDEX_ENTRIES: [&str; 9] =
    ["pool", "kstats", "score", "threshold", "vv_exact", "budget", "select", "columns", "scan"];

/// The entry points of the block top-k index builder (same module as [`emit_vv_index`]).
pub const BLOCK_INDEX_ENTRIES: [&str; 6] = ["pool", "block_scores", "block_select", "block_rows", "scan", "block_top"];

/// The entry points of the vertical-slash index builder, which also builds grids of column
/// lines (`grid_select` in place of `vs_select`); same module as [`emit_vv_index`].
pub const VS_INDEX_ENTRIES: [&str; 10] = [
    "vs_logits",
    "vs_exp",
    "vs_inv",
    "vs_mass",
    "vs_select",
    "vs_tiles",
    "block_rows",
    "columns",
    "scan",
    "grid_select",
];

/// Keys per CTA of the `vs_exp` entry (its grid is `ceil(nk / VS_EXP_KEYS)` wide).
pub const VS_EXP_KEYS: usize = 2048;

/// Keys and estimated rows per CTA of the `vs_logits` entry (its grid is
/// `(ceil(nk / VS_LOGITS_KEYS), ceil(last / VS_LOGITS_ROWS), heads)`).
pub const VS_LOGITS_KEYS: usize = 256;
pub const VS_LOGITS_ROWS: usize = 64;

/// Dynamic shared memory of the `vs_mass` entry for `last` estimated rows.
pub fn vs_mass_shared_bytes(last: usize) -> usize {
    last * 8
}

/// Dynamic shared memory of the `block_select` entry for `kblocks` pattern key blocks.
pub fn block_select_shared_bytes(kblocks: usize) -> usize {
    kblocks.next_power_of_two() * 12
}

/// Groups per CTA of the index builders' `pool` entry (128 threads, `head_dim / 8` per group):
/// its grid is `(ceil(groups / this), heads)`.
pub fn pool_groups_per_cta(head_dim: u32) -> usize {
    1024 / head_dim as usize
}

/// Dynamic shared memory of the `score` entry: two halves of 64 pooled queries and 128 keys.
pub fn vv_score_shared_bytes(head_dim: u32) -> u32 {
    (64 + 64 + 128) * (head_dim + 8) * 2
}

/// Dynamic shared memory of the `select` entry for `nk` keys: exact scores and keys of up to
/// 4096 unsure keys, a 2048-bin histogram, the pooled query, `collect` collected keys (8 bytes
/// each) and a bit per key.
pub fn vv_select_shared_bytes(head_dim: u32, nk: usize, collect: usize) -> usize {
    4096 * (8 + 4) + 2048 * 4 + head_dim as usize * 4 + collect * 8 + nk.div_ceil(32) * 4
}

/// Keys the `select` entry collects into shared memory at most (its fast path).
pub const VV_COLLECT_MAX: usize = 12288;

/// Dynamic shared memory of a `select` CTA below which two fit on an SM of 228 KiB (with
/// their static shared memory and the per-CTA reserve).
pub const VV_TWO_CTA_SHARED: usize = 108 * 1024;

/// The most dynamic shared memory a vertical-vector index kernel may take (the `select`
/// entry's limit, which bounds the keys it serves).
pub const VV_INDEX_MAX_SHARED: u32 = 200 * 1024;

/// Generates the index builders' module for bf16 inputs of `head_dim`: vertical-vector
/// ([`VV_INDEX_ENTRIES`]), block ([`BLOCK_INDEX_ENTRIES`]) and vertical-slash
/// ([`VS_INDEX_ENTRIES`]) entry points; see the templates for the methods.
///
/// The module depends on `head_dim` alone, and every device index build asks for it (to find
/// its loaded module by key), so it is generated once per head dim and process: generating it
/// took about 0.6 ms, most of what queueing a whole build costs the host.
pub fn emit_vv_index(head_dim: u32) -> Result<Kernel, Error> {
    static EMITTED: std::sync::OnceLock<[Kernel; HEAD_DIMS.len()]> = std::sync::OnceLock::new();
    check_head_dim(head_dim)?;
    let emitted = EMITTED.get_or_init(|| HEAD_DIMS.map(generate_vv_index));
    emitted
        .iter()
        .find(|k| k.head_dim == head_dim)
        .cloned()
        .ok_or_else(|| Error::Config(format!("no index module for head_dim {head_dim}")))
}

/// [`emit_vv_index`]'s module text for a checked `head_dim`.
fn generate_vv_index(head_dim: u32) -> Kernel {
    use weft_patterns::repro;
    let config = format!("vv-index head_dim={head_dim} dtype=bf16");
    let (key, header) = key_and_header("vv-index", &[PRELUDE, VV_INDEX, VS_INDEX], None, &config, &[], None);
    let name = format!("weft_vvix_{}", &key[..16]);
    let bits = |x: f64| format!("{:#018x}LL", x.to_bits());
    let coef: Vec<String> = repro::EXP_COEF.iter().map(|c| bits(*c)).collect();
    let source = format!("{VV_INDEX}{VS_INDEX}")
        .replace("{{HEADER}}", &header)
        .replace("{{PRELUDE}}", &prelude(&[], None, DType::Bf16))
        .replace("{{NAME}}", &name)
        .replace("{{D}}", &head_dim.to_string())
        .replace("{{DROP}}", &format!("{:#x}", weft_patterns::device_plan::DROP))
        .replace("{{PER_COLUMN}}", &format!("{:#x}", weft_patterns::device_plan::PER_COLUMN))
        .replace("{{PER_LINE}}", &format!("{:#x}", weft_patterns::device_plan::PER_LINE))
        .replace("{{SUM_CHUNK}}", &repro::SUM_CHUNK.to_string())
        .replace("{{VS_EXP_KEYS}}", &VS_EXP_KEYS.to_string())
        .replace("{{VS_LOGITS_KEYS}}", &VS_LOGITS_KEYS.to_string())
        .replace("{{VS_LOGITS_ROWS}}", &VS_LOGITS_ROWS.to_string())
        .replace("{{LOG2E}}", &bits(repro::LOG2E))
        .replace("{{LN2_HI}}", &bits(repro::LN2_HI))
        .replace("{{LN2_LO}}", &bits(repro::LN2_LO))
        .replace("{{EXP_COEF}}", &coef.join(", "));
    Kernel { name, source, key, threads: 512, shared_bytes: VV_INDEX_MAX_SHARED, head_dim, arch_specific: false }
}
