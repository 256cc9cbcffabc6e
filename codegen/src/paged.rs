//! Decode over a paged KV cache ([`emit_paged`]): filling and appending to the cache with its
//! Quest metadata, the retrieval choice of pages on the device, split-KV attention over the
//! kept tokens (merged by [`crate::emit_merge`]`(.., Partial::F32)`), and, for a cache kept in
//! host memory, the copy of the kept pages into a GPU cache of hot pages. See
//! `templates/paged.cu`.

use crate::abi::cuda_param_lists;
use crate::config::check_head_dim;
use crate::keys::{constant, key_and_header};
use crate::templates::{closure, defines, render};
use crate::{DType, Error, Kernel};

/// The paged module's entry points, each `{kernel.name}_{name}`.
pub mod entry {
    use crate::abi::{Axis, Entry};
    use Axis::{Each, Fixed, Tiles};

    /// x: logical pages of the tokens filled; y: KV heads.
    pub const FILL: Entry =
        Entry { name: "fill", threads: 128, params: "PagedFillParams", grid: [Each, Each, Fixed(1)] };
    /// x: sequences; y: KV heads.
    pub const APPEND: Entry =
        Entry { name: "append", threads: 128, params: "PagedAppendParams", grid: [Each, Each, Fixed(1)] };
    /// x: sequences.
    pub const ADVANCE: Entry = Entry {
        name: "advance",
        threads: ADVANCE_THREADS,
        params: "PagedAdvanceParams",
        grid: [Tiles(ADVANCE_THREADS as usize), Fixed(1), Fixed(1)],
    };
    /// Every candidate page's score for every query head. x: tiles of candidate pages; y: KV
    /// heads; z: sequences.
    pub const SCORE: Entry = Entry {
        name: "score",
        threads: SCORE_THREADS,
        params: "PagedScoreParams",
        grid: [Tiles(SCORE_THREADS as usize), Each, Each],
    };
    /// The retrieval choice of pages. x: query heads; y: sequences.
    pub const RETRIEVE: Entry =
        Entry { name: "retrieve", threads: 256, params: "PagedRetrieveParams", grid: [Each, Each, Fixed(1)] };
    /// Split-KV attention over the kept tokens. x: splits; y: query heads (retrieval) or groups
    /// of [`super::heads_per_cta`] of them (dense); z: sequences.
    pub const ATTEND: Entry =
        Entry { name: "attend", threads: 128, params: "PagedAttendParams", grid: [Each, Each, Each] };

    /// A cache in host memory: copies a retrieval step's kept pages into the GPU's hot pages.
    /// x: query heads; y: sequences.
    pub const STAGE: Entry =
        Entry { name: "stage", threads: 128, params: "PagedStageParams", grid: [Each, Each, Fixed(1)] };

    const ADVANCE_THREADS: u32 = 256;
    const SCORE_THREADS: u32 = 128;

    /// All of them, in source order.
    pub const ALL: [Entry; 7] = [FILL, APPEND, ADVANCE, SCORE, RETRIEVE, ATTEND, STAGE];
}

/// Query heads a dense step's `attend` CTA serves for `group` query heads per KV head: the
/// largest of 4, 2 and 1 that divides it (the heads share the rows they read).
pub fn heads_per_cta(group: u32) -> u32 {
    [4, 2, 1].into_iter().find(|h| group % h == 0).unwrap_or(1)
}

/// Generates the paged-cache module for `head_dim`, `dtype` and `group` query heads per KV
/// head (its entries: [`entry::ALL`]), for a cache in GPU memory or, `host`, in host memory
/// with hot pages on the GPU.
pub fn emit_paged(head_dim: u32, dtype: DType, group: u32, host: bool) -> Result<Kernel, Error> {
    check_head_dim(head_dim)?;
    if group == 0 || group > 1024 {
        return Err(Error::Config(format!("query heads per KV head must be 1 to 1024, got {group}")));
    }
    let where_ = if host { " kv=host" } else { "" };
    let config = format!("paged head_dim={head_dim} dtype={} group={group}{where_}", dtype.name());
    let (key, header) = key_and_header("paged", &closure("paged.cu"), None, &config, &[], None);
    let name = format!("weft_paged_{}", &key[..16]);
    let mut cfg = format!("#define WEFT_ENTRY(entry) {name}_##entry\n");
    cfg += &defines(&[("WEFT_F16", dtype == DType::F16), ("WEFT_HOST", host)]);
    cfg += &constant("int", "D", head_dim, "head dimension");
    cfg += &constant("int", "G", group, "query heads per KV head");
    cfg += &constant("int", "HPC", heads_per_cta(group), "query heads per dense attend CTA (heads_per_cta)");
    cfg += &crate::index::repro_constants();
    for e in entry::ALL {
        cfg += &e.threads_constant();
        cfg.push('\n');
    }
    let structs: Vec<&str> = entry::ALL.iter().map(|e| e.params).collect();
    let source =
        render(&header, "paged.cu", &[("config.cuh", Some(cfg)), ("params.cuh", Some(cuda_param_lists(&structs)))]);
    Ok(Kernel { name, source, key, threads: 0, shared_bytes: 0, head_dim, arch_specific: false })
}
