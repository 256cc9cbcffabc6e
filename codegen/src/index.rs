//! The module of GPU index builders ([`emit_index_module`]: vertical vectors, blocks,
//! vertical-slash and grids): its entry points and their launch geometry.

use crate::abi::cuda_param_lists;
use crate::config::{check_head_dim, HEAD_DIMS};
use crate::keys::{constant, key_and_header};
use crate::templates::{closure, defines, render};
use crate::{Error, Kernel};

/// Every entry point of the index module ([`emit_index_module`]), each `{kernel.name}_{name}`,
/// with its threads per CTA, parameter struct ([`crate::abi`]) and grid: the generated source
/// takes its `__launch_bounds__` from here (as `{NAME}_THREADS`), the launches their block
/// size and grid; the kernels tile their axes by the same constants (emitted into the config).
pub mod entry {
    use super::{
        BLOCK_SCORE_TILE, BLOCK_TOP_GROUPS, KSTATS_KEYS, ROWS_PER_CTA, SCORE_COLS, SCORE_ROWS, VS_EXP_KEYS,
        VS_LOGITS_KEYS, VS_LOGITS_ROWS, VS_MASS_KEYS,
    };
    use crate::abi::{Axis, Entry};
    use Axis::{Each, Fixed, Tiles};

    const fn e(name: &'static str, threads: u32, params: &'static str, grid: [Axis; 3]) -> Entry {
        Entry { name, threads, params, grid }
    }
    /// x: CTAs of [`super::pool_groups_per_cta`] query groups ([`super::pool_ctas`]); y: heads.
    pub const POOL: Entry = e("pool", 128, "PoolParams", [Each, Each, Fixed(1)]);
    /// x: keys; y: KV heads.
    pub const KSTATS: Entry = e("kstats", 256, "KstatsParams", [Tiles(KSTATS_KEYS), Each, Fixed(1)]);
    /// x: query groups; y: candidate keys; z: heads.
    pub const SCORE: Entry = e("score", 128, "ScoreParams", [Tiles(SCORE_ROWS), Tiles(SCORE_COLS), Each]);
    /// x: query groups; y: heads (likewise `select` and `budget`).
    pub const THRESHOLD: Entry = e("threshold", SELECT_THREADS, "ThresholdParams", [Each, Each, Fixed(1)]);
    pub const SELECT: Entry = e("select", SELECT_THREADS, "SelectParams", [Each, Each, Fixed(1)]);
    pub const BUDGET: Entry = e("budget", SELECT_THREADS, "BudgetParams", [Each, Each, Fixed(1)]);
    /// x: keys; y: query groups; z: heads.
    pub const VV_EXACT: Entry =
        e("vv_exact", 256, "VvExactParams", [Tiles(VS_LOGITS_KEYS), Tiles(VS_LOGITS_ROWS), Each]);
    /// x: index rows (likewise `block_rows`).
    pub const COLUMNS: Entry = e("columns", 128, "ColumnsParams", [Tiles(ROWS_PER_CTA), Fixed(1), Fixed(1)]);
    /// One CTA.
    pub const SCAN: Entry = e("scan", 1024, "ScanParams", [Fixed(1), Fixed(1), Fixed(1)]);
    /// x: query groups; y: key blocks; z: heads.
    pub const BLOCK_SCORES: Entry =
        e("block_scores", 256, "BlockScoresParams", [Tiles(BLOCK_SCORE_TILE), Tiles(BLOCK_SCORE_TILE), Each]);
    /// x: query groups; y: heads.
    pub const BLOCK_SELECT: Entry = e("block_select", 256, "BlockSelectParams", [Each, Each, Fixed(1)]);
    /// x: query groups; y: heads.
    pub const BLOCK_TOP: Entry = e("block_top", 256, "BlockTopParams", [Tiles(BLOCK_TOP_GROUPS), Each, Fixed(1)]);
    pub const BLOCK_ROWS: Entry = e("block_rows", 128, "BlockRowsParams", [Tiles(ROWS_PER_CTA), Fixed(1), Fixed(1)]);
    /// x: keys; y: estimated rows; z: heads.
    pub const VS_LOGITS: Entry =
        e("vs_logits", 256, "VsLogitsParams", [Tiles(VS_LOGITS_KEYS), Tiles(VS_LOGITS_ROWS), Each]);
    /// x: keys; y: estimated rows; z: heads.
    pub const VS_EXP: Entry = e("vs_exp", 256, "VsExpParams", [Tiles(VS_EXP_KEYS), Each, Each]);
    /// x: heads.
    pub const VS_INV: Entry = e("vs_inv", 256, "VsInvParams", [Each, Fixed(1), Fixed(1)]);
    /// x: keys (and diagonals); y: heads.
    pub const VS_MASS: Entry = e("vs_mass", 256, "VsMassParams", [Tiles(VS_MASS_KEYS), Each, Fixed(1)]);
    /// x: heads; y: verticals and slashes.
    pub const VS_SELECT: Entry = e("vs_select", 1024, "VsSelectParams", [Each, Fixed(2), Fixed(1)]);
    /// x: heads.
    pub const GRID_SELECT: Entry = e("grid_select", 1024, "GridSelectParams", [Each, Fixed(1), Fixed(1)]);
    /// x: query groups; y: heads.
    pub const VS_TILES: Entry = e("vs_tiles", 128, "VsTilesParams", [Each, Each, Fixed(1)]);

    /// Threads of `select` and of the passes that share its block shape (threshold, budget).
    const SELECT_THREADS: u32 = 512;

    /// All of them, in source order.
    pub const ALL: [Entry; 20] = [
        POOL,
        KSTATS,
        SCORE,
        THRESHOLD,
        SELECT,
        BUDGET,
        VV_EXACT,
        COLUMNS,
        SCAN,
        BLOCK_SCORES,
        BLOCK_SELECT,
        BLOCK_TOP,
        BLOCK_ROWS,
        VS_LOGITS,
        VS_EXP,
        VS_INV,
        VS_MASS,
        VS_SELECT,
        GRID_SELECT,
        VS_TILES,
    ];
    /// The vertical-vector builder's, in launch order.
    pub const VERTICAL_VECTOR: [Entry; 9] = [POOL, KSTATS, SCORE, THRESHOLD, VV_EXACT, BUDGET, SELECT, COLUMNS, SCAN];
    /// The block top-k / top-p / threshold builder's.
    pub const BLOCK: [Entry; 6] = [POOL, BLOCK_SCORES, BLOCK_SELECT, BLOCK_ROWS, SCAN, BLOCK_TOP];
    /// The vertical-slash builder's (grids of column lines take `grid_select` for `vs_select`).
    pub const SLASH: [Entry; 10] =
        [VS_LOGITS, VS_EXP, VS_INV, VS_MASS, VS_SELECT, VS_TILES, BLOCK_ROWS, COLUMNS, SCAN, GRID_SELECT];
}

/// Groups per CTA of the `score` entry (4 warps x 16) and keys per CTA.
pub const SCORE_ROWS: usize = 64;
pub const SCORE_COLS: usize = 128;

/// Bins of the `select` entry's radix histograms (11 bits).
pub const HIST: usize = 2048;

/// Keys per group the `select` entry scores exactly.
pub const UNSURE_CAP: usize = 4096;

/// Index rows per CTA of the `columns` and `block_rows` entries (a warp per row).
pub const ROWS_PER_CTA: usize = 4;

/// Keys per CTA of the `kstats` entry (a warp per key, 8 keys per warp).
pub const KSTATS_KEYS: usize = 64;

/// Groups per CTA of the `block_top` entry (a warp per group).
pub const BLOCK_TOP_GROUPS: usize = 8;

/// Query groups and key blocks per CTA of the `block_scores` entry.
pub const BLOCK_SCORE_TILE: usize = 64;

/// Keys per CTA of the `vs_exp` entry.
pub const VS_EXP_KEYS: usize = 2048;

/// Keys and estimated rows per CTA of the `vs_logits` entry (and of `vv_exact`).
pub const VS_LOGITS_KEYS: usize = 256;
pub const VS_LOGITS_ROWS: usize = 64;

/// Keys (or diagonals) per CTA of the `vs_mass` entry, one per thread.
pub const VS_MASS_KEYS: usize = 256;

/// Dynamic shared memory of the `vs_mass` entry for `last` estimated rows.
pub fn vs_mass_shared_bytes(last: usize) -> usize {
    last * 8
}

/// Dynamic shared memory of the `block_select` entry for `kblocks` pattern key blocks.
pub fn block_select_shared_bytes(kblocks: usize) -> usize {
    kblocks.next_power_of_two() * 12
}

/// Groups per CTA of the index builders' `pool` entry (128 threads, `head_dim / 8` per group).
pub fn pool_groups_per_cta(head_dim: u32) -> usize {
    1024 / head_dim as usize
}

/// CTAs of the `pool` entry for `groups` query groups per head.
pub fn pool_ctas(groups: usize, head_dim: u32) -> usize {
    groups.div_ceil(pool_groups_per_cta(head_dim))
}

/// Dynamic shared memory of the `score` entry: two halves of [`SCORE_ROWS`] pooled queries and
/// [`SCORE_COLS`] keys.
pub fn vv_score_shared_bytes(head_dim: u32) -> u32 {
    ((2 * SCORE_ROWS + SCORE_COLS) as u32) * (head_dim + 8) * 2
}

/// Dynamic shared memory of the `select` entry for `nk` keys: exact scores and keys of up to
/// [`UNSURE_CAP`] unsure keys, a [`HIST`]-bin histogram, the pooled query, `collect` collected keys (8 bytes
/// each) and a bit per key.
pub fn vv_select_shared_bytes(head_dim: u32, nk: usize, collect: usize) -> usize {
    UNSURE_CAP * (8 + 4) + HIST * 4 + head_dim as usize * 4 + collect * 8 + nk.div_ceil(32) * 4
}

/// Keys the `select` entry collects into shared memory at most (its fast path).
pub const VV_COLLECT_MAX: usize = 12288;

/// Dynamic shared memory of a `select` CTA below which two fit on an SM of 228 KiB (with
/// their static shared memory and the per-CTA reserve).
pub const VV_TWO_CTA_SHARED: usize = 108 * 1024;

/// The most dynamic shared memory an index module entry may take (the `select`
/// entry's limit, which bounds the keys it serves).
pub const INDEX_MAX_SHARED: u32 = 200 * 1024;

/// Generates the index builders' module for bf16 inputs of `head_dim`: the vertical-vector
/// ([`entry::VERTICAL_VECTOR`]), block ([`entry::BLOCK`]) and vertical-slash / grid
/// ([`entry::SLASH`]) builders' entry points; see the templates (`index.cu`) for the methods.
///
/// The module depends on `head_dim` alone, and every device index build asks for it (to find
/// its loaded module by key), so it is generated once per head dim and process: generating it
/// took about 0.6 ms, most of what queueing a whole build costs the host.
pub fn emit_index_module(head_dim: u32) -> Result<Kernel, Error> {
    index_module(head_dim).cloned()
}

/// [`emit_index_module`] without the copy: the module generated once per process.
pub fn index_module(head_dim: u32) -> Result<&'static Kernel, Error> {
    static EMITTED: std::sync::OnceLock<[Kernel; HEAD_DIMS.len()]> = std::sync::OnceLock::new();
    check_head_dim(head_dim)?;
    let emitted = EMITTED.get_or_init(|| HEAD_DIMS.map(generate_index_module));
    emitted
        .iter()
        .find(|k| k.head_dim == head_dim)
        .ok_or_else(|| Error::Config(format!("no index module for head_dim {head_dim}")))
}

/// The constants of `repro_exp.cuh` (weft_patterns::repro::exp's, as bits) for a config.
pub(crate) fn repro_constants() -> String {
    use weft_patterns::repro;
    let bits = |x: f64| format!("{:#018x}LL", x.to_bits());
    let coef: Vec<String> = repro::EXP_COEF.iter().map(|c| bits(*c)).collect();
    let mut cfg = constant("long long", "LOG2E_BITS", bits(repro::LOG2E), "repro::LOG2E");
    cfg += &constant("long long", "LN2_HI_BITS", bits(repro::LN2_HI), "repro::LN2_HI");
    cfg += &constant("long long", "LN2_LO_BITS", bits(repro::LN2_LO), "repro::LN2_LO");
    cfg += &format!("#define EXP_COEF_BITS {}  // repro::EXP_COEF\n", coef.join(", "));
    cfg
}

/// [`emit_index_module`]'s module for a checked `head_dim`.
fn generate_index_module(head_dim: u32) -> Kernel {
    use weft_patterns::repro;
    let config = format!("index-module head_dim={head_dim} dtype=bf16");
    let (key, header) = key_and_header("index-module", &closure("index.cu"), None, &config, &[], None);
    let name = format!("weft_index_{}", &key[..16]);
    let mut cfg = format!("#define WEFT_ENTRY(entry) {name}_##entry\n");
    cfg += &defines(&[("WEFT_F16", false)]);
    cfg += &constant("int", "D", head_dim, "head dimension");
    for e in entry::ALL {
        cfg += &e.threads_constant();
        cfg.push('\n');
    }
    cfg += &constant("int", "SCORE_ROWS", SCORE_ROWS, "groups per score CTA (4 warps x 16)");
    cfg += &constant("int", "SCORE_COLS", SCORE_COLS, "keys per score CTA");
    cfg += &constant("int", "HIST", HIST, "bins of the radix histograms (11 bits)");
    cfg += &constant("int", "UNSURE_CAP", UNSURE_CAP, "keys per group scored exactly");
    cfg += &constant("int", "ROWS_PER_CTA", ROWS_PER_CTA, "index rows per columns / block_rows CTA");
    cfg += &constant("int", "KSTATS_KEYS", KSTATS_KEYS, "keys per kstats CTA");
    cfg += &constant("int", "BLOCK_TOP_GROUPS", BLOCK_TOP_GROUPS, "groups per block_top CTA");
    cfg += &constant("int", "BLOCK_SCORE_TILE", BLOCK_SCORE_TILE, "groups and key blocks per block_scores CTA");
    cfg += &constant("int", "VS_ROWS", VS_LOGITS_ROWS, "estimated rows per vs_logits CTA (8 per warp)");
    cfg += &constant("int", "VS_KEYS", VS_LOGITS_KEYS, "keys per vs_logits CTA (8 per lane)");
    cfg += &constant("int", "VS_EXP_KEYS", VS_EXP_KEYS, "keys per vs_exp CTA");
    cfg += &constant("int", "VS_MASS_KEYS", VS_MASS_KEYS, "keys or diagonals per vs_mass CTA");
    cfg += &constant("int", "SUM_CHUNK", repro::SUM_CHUNK, "keys per partial row sum (repro::SUM_CHUNK)");
    cfg += &constant(
        "unsigned short",
        "DROP_CODE",
        format!("{:#x}", crate::plan::DROP),
        "column rule: the row's blocks compute this key",
    );
    cfg += &constant(
        "unsigned int",
        "PER_COLUMN",
        format!("{:#x}", crate::plan::PER_COLUMN),
        "rule codes from here on index per-key codes",
    );
    cfg += &constant(
        "unsigned int",
        "PER_LINE",
        format!("{:#x}", crate::plan::PER_LINE),
        "line codes from here on index per-offset codes",
    );
    cfg += &repro_constants();
    let structs: Vec<&str> = entry::ALL.iter().map(|e| e.params).collect();
    let source =
        render(&header, "index.cu", &[("config.cuh", Some(cfg)), ("params.cuh", Some(cuda_param_lists(&structs)))]);
    // A module of several entry points: no block size of its own (each entry's is in
    // `entry`); its shared bytes are the most dynamic shared memory any entry may ask for.
    Kernel { name, source, key, threads: 0, shared_bytes: INDEX_MAX_SHARED, head_dim, arch_specific: false }
}
