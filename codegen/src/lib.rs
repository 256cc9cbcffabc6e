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
//! splits, ring steps); [`emit_vv_index`], the module of GPU index builders (vertical vectors,
//! blocks, vertical-slash and grids).
//!
//! The Hopper path ([`KernelConfig::wgmma`], sm_90a only, [`Kernel::arch_specific`]) is the
//! same kernel with its two products as warpgroup MMAs: one warpgroup per 64 query rows, Q, K
//! and V in 128-byte swizzled shared memory read through matrix descriptors, P from registers
//! (`templates/wgmma.cu`; [`emit_wgmma_probe`] checks the pieces alone). The index walk, masks
//! and softmax are shared, since a warp's wgmma accumulators have mma.sync's layout. Each
//! tile's softmax overlaps the previous tile's P V (FlashAttention-3's intra-warpgroup
//! pipelining). At 128 rows a producer warpgroup does every copy and the two computing
//! warpgroups wait on mbarriers instead of a CTA barrier ([`KernelConfig::producer`],
//! FlashAttention-3's warp specialisation). CI compiles it; the GPU suite checks it against the
//! CPU reference, and on the H200 it runs dense attention 1.6x faster than torch's flash
//! backend (docs/PERF.md). On sm_90 it is the untuned default
//! ([`KernelConfig::default_for_arch`]); patterns of mostly gathered columns take it at 128
//! rows only.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use weft_dsl::{IntExpr, IntOp, Pattern, PatternExpr, Permutation, Pred, Var};

/// Bumped whenever generated code changes meaning; part of every kernel key and of the
/// toolchain key of every stored kernel (2: kernels take a head map).
pub const CODEGEN_VERSION: u32 = 2;

const PRELUDE: &str = include_str!("templates/prelude.cu");
const ATTENTION: &str = include_str!("templates/attention.cu");
const DECODE: &str = include_str!("templates/decode.cu");
const MERGE: &str = include_str!("templates/merge.cu");
const VV_INDEX: &str = include_str!("templates/vv_index.cu");
const VS_INDEX: &str = include_str!("templates/vs_index.cu");
const HOPPER: &str = include_str!("templates/hopper.cu");
const WGMMA: &str = include_str!("templates/wgmma.cu");

/// Element type of Q, K, V and O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DType {
    Bf16,
    F16,
}

impl DType {
    /// The name used on the command line and in headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "fp16",
        }
    }

    /// `values` rounded to this type, as the raw 16-bit words the kernels read.
    pub fn encode(self, values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|&x| match self {
                DType::Bf16 => half::bf16::from_f32(x).to_bits(),
                DType::F16 => half::f16::from_f32(x).to_bits(),
            })
            .collect()
    }

    /// Raw 16-bit words of this type back to f32.
    pub fn decode(self, words: &[u16]) -> Vec<f32> {
        words
            .iter()
            .map(|&b| match self {
                DType::Bf16 => half::bf16::from_bits(b).to_f32(),
                DType::F16 => half::f16::from_bits(b).to_f32(),
            })
            .collect()
    }

    /// Relative L2 error of an attention output in this type against the f64 reference that
    /// a correct kernel stays under (P and O are rounded to 16 bits).
    pub fn reference_tolerance(self) -> f64 {
        match self {
            DType::Bf16 => 1.5e-2,
            DType::F16 => 2e-3,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "bf16" => Ok(DType::Bf16),
            "fp16" | "f16" => Ok(DType::F16),
            other => Err(Error::Config(format!("dtype `{other}` is not supported; use bf16 or fp16"))),
        }
    }
}

/// The tunable shape of a kernel. Ordered field by field (the runtime launches a layer's
/// config groups in that order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KernelConfig {
    /// Query rows per CTA; must equal the index's `block_m` (16, 32, 64 or 128).
    pub block_m: u32,
    /// Keys per tile; must equal the index's `block_n` (16, 32, 64 or 128).
    pub block_n: u32,
    /// Head dimension (64, 128 or 256).
    pub head_dim: u32,
    pub dtype: DType,
    /// Query rows per warp: 16, or 32 to feed each K/V fragment to two tensor-core ops.
    pub warp_rows: u32,
    /// K/V tiles in flight (`cp.async` pipeline depth): 2 or 3. Records stored before this
    /// field existed read as 2, the depth their kernels had.
    #[serde(default = "two_stages")]
    pub stages: u32,
    /// The Hopper path (sm_90a only): warpgroup MMAs (`wgmma`) with operands in 128-byte
    /// swizzled shared memory, one warpgroup per 64 query rows, instead of `mma.sync`. Takes
    /// block_m and block_n of 64 or 128, head_dim 64 or 128, warp_rows 16. Records stored
    /// before this field existed read as false.
    #[serde(default)]
    pub wgmma: bool,
    /// With `wgmma`: a producer warpgroup copies the K/V tiles and the others only compute,
    /// synchronised by mbarriers per stage instead of a CTA barrier per tile (FlashAttention-3's
    /// warp specialisation; 128 more threads). Takes block_m 128. The sm_90 default at 128 rows
    /// ([`KernelConfig::hopper`]). Records stored before this field existed read as false.
    #[serde(default)]
    pub producer: bool,
    /// With `producer`: a persistent grid, one CTA per SM looping over the index rows (head by
    /// head, heaviest query blocks first), whose producer copies the next row's Q and first
    /// tiles while the consumers finish and store the current one (FlashAttention-3's
    /// persistent schedule; for rows of few tiles, where each CTA's prologue and epilogue
    /// weigh). Q is double-buffered (BM x D more shared memory). Opt-in: correct on the GPU,
    /// but slower than the plain producer grid in the measurements (docs/PERF.md: 1.03-1.24x
    /// in head-by-head order; faster only for short rows such as block-3 at 16k). Records
    /// stored before this field existed read as false.
    #[serde(default)]
    pub persistent: bool,
}

fn two_stages() -> u32 {
    2
}

impl KernelConfig {
    /// The default config for a head dim and dtype, with 64 x 64 tiles.
    pub fn new(head_dim: u32, dtype: DType) -> KernelConfig {
        KernelConfig::for_blocks(64, 64, head_dim, dtype)
    }

    /// The config used when nothing is tuned: the pattern's natural block sizes
    /// (`weft_patterns::layout`) brought to a tile the kernel has (a power of two from 16 to
    /// 128; the index is exact at any block size), and the warp shape that goes with them.
    pub fn default_for(pattern: &weft_dsl::PatternExpr, head_dim: u32, dtype: DType) -> Result<KernelConfig, Error> {
        let (block_m, block_n) = weft_patterns::layout(pattern, &weft_patterns::IndexOptions::default())
            .map_err(|e| Error::Config(e.to_string()))?;
        let tile = |g: usize| g.next_power_of_two().clamp(16, 128);
        let c = KernelConfig::for_blocks(tile(block_m), tile(block_n), head_dim, dtype);
        c.validate()?;
        Ok(c)
    }

    /// The config used when nothing is tuned, on a GPU of compute capability `sm` (90 for the
    /// H100/H200). Elsewhere, [`KernelConfig::default_for`]. On sm_90, the Hopper schedule
    /// ([`KernelConfig::hopper`]) where its tiles allow (64 or 128 rows and keys, head dim 64 or
    /// 128), and patterns with no block size of their own (full, causal, windows, documents,
    /// predicates: the index is exact at any block size) take 128 x 128 tiles, where the producer
    /// schedule runs dense attention 1.3x faster than 64 x 64 (docs/PERF.md). Vertical vectors
    /// (and retrieval, also mostly gathered columns) keep their tiles and take the Hopper path
    /// only with the producer (128 rows):
    /// at 64k tokens and 10% of the columns they ran 22.5 ms with it, 24.5 on mma.sync and 26.4
    /// on wgmma without it.
    pub fn default_for_arch(
        pattern: &weft_dsl::PatternExpr,
        head_dim: u32,
        dtype: DType,
        sm: u32,
    ) -> Result<KernelConfig, Error> {
        let c = KernelConfig::default_for(pattern, head_dim, dtype)?;
        if sm != 90 {
            return Ok(c);
        }
        let columns =
            pattern.any_leaf(&|leaf| matches!(leaf, PatternExpr::VerticalVector(_) | PatternExpr::Retrieval(_)));
        let large = weft_patterns::IndexOptions { block_m: Some(128), block_n: Some(128), ..Default::default() };
        let tiles = match weft_patterns::layout(pattern, &large) {
            Ok(_) if !columns => KernelConfig::for_blocks(128, 128, head_dim, dtype),
            _ => c,
        };
        let hopper = tiles.hopper();
        Ok(if hopper.validate().is_ok() && (hopper.producer || !columns) { hopper } else { c })
    }

    /// The same tiles and pipeline on the Hopper path: wgmma, with the 16 rows per warp its
    /// warpgroups take (check the result with [`KernelConfig::validate`]: the path takes only
    /// 64- and 128-row and -key tiles).
    pub fn with_wgmma(self) -> KernelConfig {
        KernelConfig { warp_rows: 16, wgmma: true, ..self }
    }

    /// The fastest Hopper schedule for these tiles: [`KernelConfig::with_wgmma`], with the
    /// producer warpgroup at 128 rows (1.3x faster than without at 128 x 128, docs/PERF.md).
    pub fn hopper(self) -> KernelConfig {
        KernelConfig { producer: self.block_m == 128, ..self.with_wgmma() }
    }

    /// The default config for an index's block sizes: 32 rows per warp for 128-row blocks.
    pub fn for_blocks(block_m: usize, block_n: usize, head_dim: u32, dtype: DType) -> KernelConfig {
        KernelConfig {
            block_m: block_m as u32,
            block_n: block_n as u32,
            head_dim,
            dtype,
            warp_rows: if block_m >= 128 { 32 } else { 16 },
            stages: 2,
            wgmma: false,
            producer: false,
            persistent: false,
        }
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        if self.wgmma {
            // One warpgroup (128 threads) per 64 query rows, and the producer's.
            return (self.block_m / 64 + u32::from(self.producer)) * 128;
        }
        self.block_m / self.warp_rows * 32
    }

    /// Dynamic shared memory per CTA in bytes.
    pub fn shared_bytes(&self) -> u32 {
        // The wgmma path's rows are unpadded (swizzled instead), and its tiles start on 1024
        // bytes, which the kernel aligns to within 1024 spare bytes.
        let (row, spare) = if self.wgmma { (self.head_dim, 1024) } else { (self.head_dim + 8, 0) };
        // Q (two buffers when persistent), then K and V per stage; then each stage's key
        // positions (i32) and mask ids (u16).
        let q_buffers = if self.persistent { 2 } else { 1 };
        let tiles = (q_buffers * self.block_m + 2 * self.stages * self.block_n) * row * 2;
        // The producer schedule's mbarriers: four per stage, 8 bytes each, 8-byte aligned, and
        // when persistent one per Q buffer.
        let barriers = if self.producer { 8 + 32 * self.stages + 16 * u32::from(self.persistent) } else { 0 };
        tiles + self.stages * self.block_n * (4 + 2) + spare + barriers
    }

    /// [`KernelConfig::validate`], and whether the config takes `pattern`: the persistent
    /// schedule takes no patterns with gathered columns ([`gathers_columns`]; the persistent
    /// loop's few more live registers spilled 8-44 bytes in those kernels at head dim 128, and
    /// their rows are long, which is not where the schedule helps).
    pub fn validate_for(&self, pattern: &PatternExpr) -> Result<(), Error> {
        self.validate()?;
        if self.persistent && gathers_columns(pattern) {
            return Err(Error::Config(
                "the persistent schedule takes patterns without gathered key columns (it is for short rows); \
                 use the producer schedule without it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks the config, naming the field and the accepted values.
    pub fn validate(&self) -> Result<(), Error> {
        if ![16, 32, 64, 128].contains(&self.block_m) {
            return Err(Error::Config(format!("block_m must be 16, 32, 64 or 128, got {}", self.block_m)));
        }
        if ![16, 32, 64, 128].contains(&self.block_n) {
            return Err(Error::Config(format!("block_n must be 16, 32, 64 or 128, got {}", self.block_n)));
        }
        if !(self.warp_rows == 16 || self.warp_rows == 32) || self.warp_rows > self.block_m {
            return Err(Error::Config(format!(
                "warp_rows must be 16 or 32 and at most block_m ({}), got {}",
                self.block_m, self.warp_rows
            )));
        }
        if ![64, 128, 256].contains(&self.head_dim) {
            return Err(Error::Config(format!("head_dim must be 64, 128 or 256, got {}", self.head_dim)));
        }
        if !(self.stages == 2 || self.stages == 3) {
            return Err(Error::Config(format!("stages must be 2 or 3, got {}", self.stages)));
        }
        if self.wgmma
            && !([64, 128].contains(&self.block_m)
                && [64, 128].contains(&self.block_n)
                && [64, 128].contains(&self.head_dim)
                && self.warp_rows == 16)
        {
            return Err(Error::Config(format!(
                "the wgmma path takes block_m and block_n of 64 or 128, head_dim 64 or 128 and warp_rows 16, got \
                 {} x {}, head_dim {}, warp_rows {}",
                self.block_m, self.block_n, self.head_dim, self.warp_rows
            )));
        }
        if self.producer && !self.wgmma {
            return Err(Error::Config("the producer schedule is part of the wgmma path: set wgmma too".into()));
        }
        // With one computing warpgroup ptxas serialises its MMAs behind the producer's branch
        // (C7520), and there is no second warpgroup to overlap with anyway.
        if self.producer && self.block_m != 128 {
            return Err(Error::Config(format!(
                "the producer schedule takes block_m 128 (two computing warpgroups), got {}",
                self.block_m
            )));
        }
        if self.persistent && !self.producer {
            return Err(Error::Config(
                "the persistent schedule is the producer's (it copies the next row's tiles): set producer too".into(),
            ));
        }
        // The H100/H200 and A100 give a CTA at most 227 KiB of shared memory.
        if self.shared_bytes() > 227 * 1024 {
            return Err(Error::Config(format!(
                "{} x {} tiles at head_dim {} need {} bytes of shared memory, over the 227 KiB limit",
                self.block_m,
                self.block_n,
                self.head_dim,
                self.shared_bytes()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for KernelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field: this text is part of the kernel key.
        let KernelConfig { block_m, block_n, head_dim, dtype, warp_rows, stages, wgmma, producer, persistent } = self;
        write!(
            f,
            "block_m={block_m} block_n={block_n} head_dim={head_dim} dtype={} warp_rows={warp_rows} stages={stages}{}{}{}",
            dtype.name(),
            if *wgmma { " mma=wgmma" } else { "" },
            if *producer { " producer" } else { "" },
            if *persistent { " persistent" } else { "" }
        )
    }
}

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

fn cuda_int(e: &IntExpr) -> String {
    match e {
        IntExpr::Var(v) => match v {
            Var::Q => "q",
            Var::K => "k",
            Var::H => "h",
            Var::Nq => "nq",
            Var::Nk => "nk",
        }
        .to_string(),
        IntExpr::Const(c) => format!("{c}LL"),
        IntExpr::Neg(a) => format!("(-{})", cuda_int(a)),
        IntExpr::Bin { op, lhs, rhs } => {
            let (a, b) = (cuda_int(lhs), cuda_int(rhs));
            match op {
                IntOp::Add => format!("({a} + {b})"),
                IntOp::Sub => format!("({a} - {b})"),
                IntOp::Mul => format!("({a} * {b})"),
                IntOp::Div => format!("weft_div({a}, {b})"),
                IntOp::Rem => format!("weft_rem({a}, {b})"),
                IntOp::Min => format!("weft_min({a}, {b})"),
                IntOp::Max => format!("weft_max({a}, {b})"),
            }
        }
    }
}

/// A static predicate as a CUDA boolean expression over `q, k, h, nq, nk` (64-bit, Euclidean
/// division, as `weft_dsl::eval` defines them).
pub fn cuda_pred(p: &Pred) -> String {
    match p {
        Pred::Const(b) => b.to_string(),
        // The DSL's comparison symbols are C's.
        Pred::Cmp { op, lhs, rhs } => format!("({} {} {})", cuda_int(lhs), op.symbol(), cuda_int(rhs)),
        Pred::And(a, b) => format!("({} && {})", cuda_pred(a), cuda_pred(b)),
        Pred::Or(a, b) => format!("({} || {})", cuda_pred(a), cuda_pred(b)),
        Pred::Not(a) => format!("(!{})", cuda_pred(a)),
    }
}

fn token_body(p: Option<Permutation>) -> String {
    match p {
        None => "    return pos;  // identity: the pattern is not permuted".to_string(),
        Some(Permutation::Stride(s)) => format!(
            "    // stride({s}) permutation, inverse: position `pos` holds token f * {s} + p.\n\
             \x20   const int s = {s}, frames = n / s, rest = n % s, split = rest * (frames + 1);\n\
             \x20   if (pos < split) return (pos % (frames + 1)) * s + pos / (frames + 1);\n\
             \x20   const int j = pos - split, per = frames > 0 ? frames : 1;\n\
             \x20   return (j % per) * s + rest + j / per;"
        ),
    }
}

/// The shared helpers with the mask table, token map and dtype filled in.
fn prelude(masks: &[Pred], permutation: Option<Permutation>, dtype: DType) -> String {
    let mut cases = String::new();
    for (i, m) in masks.iter().enumerate() {
        let _ = writeln!(cases, "    case {i}: return {};  // {m}", cuda_pred(m));
    }
    let (mma_type, cvt_type, unpack) = match dtype {
        DType::Bf16 => ("bf16", "bf16x2", "    lo = __uint_as_float(v << 16);\n    hi = __uint_as_float(v & 0xffff0000u);"),
        DType::F16 => (
            "f16",
            "f16x2",
            "    asm(\"{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }\" : \"=f\"(lo), \"=f\"(hi) : \"r\"(v));",
        ),
    };
    PRELUDE
        .replace("{{MASK_CASES}}", cases.trim_end_matches('\n'))
        .replace("{{MASK_COUNT}}", &masks.len().to_string())
        .replace("{{TOKEN_BODY}}", &token_body(permutation))
        .replace("{{IDENTITY_TOKENS}}", if permutation.is_none() { "true" } else { "false" })
        .replace("{{MMA_TYPE}}", mma_type)
        .replace("{{CVT_TYPE}}", cvt_type)
        .replace("{{UNPACK_BODY}}", unpack)
}

/// The kernel key (a hash of everything the source depends on) and the source header.
/// `templates`: the templates the source is made from.
fn key_and_header(
    kind: &str,
    templates: &[&str],
    pattern: Option<&Pattern>,
    config: &str,
    masks: &[Pred],
    permutation: Option<Permutation>,
) -> (String, String) {
    // The text of the templates this kernel is made from is part of the key too, so an edited
    // template can never load a kernel stored from the old one, even where CODEGEN_VERSION was
    // not bumped; and editing one leaves the keys of kernels made without it alone.
    let templates = blake3::hash(templates.concat().as_bytes());
    let mut key_input = format!("weft-codegen/{CODEGEN_VERSION}\ntemplates {templates}\n{kind}\n{config}\n");
    if let Some(p) = pattern {
        let _ = writeln!(key_input, "{}", p.hash());
    }
    if let Some(Permutation::Stride(s)) = permutation {
        let _ = writeln!(key_input, "permutation stride({s})");
    }
    for m in masks {
        let _ = writeln!(key_input, "mask {}", cuda_pred(m));
    }
    let key = blake3::hash(key_input.as_bytes()).to_hex().to_string();
    let mut header = String::new();
    let _ = writeln!(header, "// Generated by weft-codegen {CODEGEN_VERSION}. Do not edit.");
    if let Some(p) = pattern {
        let _ = writeln!(header, "// pattern  {} = {}", p.name, p);
        let _ = writeln!(header, "// hash     {}", p.hash());
    }
    let _ = writeln!(header, "// config   {config}");
    let _ = writeln!(header, "// kernel   {key}");
    if let Some(p) = permutation {
        let _ = writeln!(header, "// permuted {p}");
    }
    (key, header.trim_end().to_string())
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

/// The head dims every kernel takes.
const HEAD_DIMS: [u32; 3] = [64, 128, 256];

fn check_head_dim(head_dim: u32) -> Result<(), Error> {
    if HEAD_DIMS.contains(&head_dim) {
        Ok(())
    } else {
        Err(Error::Config(format!("head_dim must be 64, 128 or 256, got {head_dim}")))
    }
}

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

/// Keys in the tile of [`emit_wgmma_probe`].
pub const WGMMA_PROBE_KEYS: u32 = 64;

/// Generates the Hopper building blocks' probe for bf16 and `head_dim` (64 or 128): one
/// warpgroup computes S = Q K^T (64 x [`WGMMA_PROBE_KEYS`], both operands in 128-byte swizzled
/// shared memory) and O = bf16(S) V (P from registers, V read transposed) with `wgmma`. It is
/// compiled for sm_90a (`Kernel::arch_specific`: the target `wgmma` needs) and launched with one CTA of
/// 128 threads and [`Kernel::shared_bytes`] of dynamic shared memory; see `templates/hopper.cu`.
/// The attention kernel's Hopper path (`KernelConfig::wgmma`) is built from these pieces; the
/// GPU suite checks them alone first, so a failure points at a piece, not at the kernel.
pub fn emit_wgmma_probe(head_dim: u32) -> Result<Kernel, Error> {
    if ![64, 128].contains(&head_dim) {
        return Err(Error::Config(format!("the wgmma probe takes head_dim 64 or 128, got {head_dim}")));
    }
    let keys = WGMMA_PROBE_KEYS;
    let config = format!("wgmma-probe head_dim={head_dim} keys={keys}");
    let (key, header) = key_and_header("wgmma-probe", &[PRELUDE, HOPPER, WGMMA], None, &config, &[], None);
    let name = format!("weft_wgmma_{}", &key[..16]);
    let source = HOPPER
        .replace("{{HEADER}}", &header)
        .replace("{{PRELUDE}}", &prelude(&[], None, DType::Bf16))
        .replace("{{WGMMA_HELPERS}}", &wgmma_helpers(keys, head_dim, DType::Bf16))
        .replace("{{NAME}}", &name)
        .replace("{{D}}", &head_dim.to_string())
        .replace("{{KEYS}}", &keys.to_string());
    // Q, K and V tiles, and 1024 bytes to align them to the swizzle's period.
    let shared_bytes = (64 + 2 * keys) * head_dim * 2 + 1024;
    Ok(Kernel { name, source, key, threads: 128, shared_bytes, head_dim, arch_specific: true })
}

/// The wgmma helpers (`templates/wgmma.cu`) with the wrappers for S (`n` = `keys`: A and B in
/// shared memory) and for O (`n` = `head_dim`: A in registers, B transposed), for `dtype`.
fn wgmma_helpers(keys: u32, head_dim: u32, dtype: DType) -> String {
    let wrappers = [wgmma_wrapper(keys, false, dtype), wgmma_wrapper(head_dim, true, dtype)].join("\n");
    WGMMA.replace("{{WGMMA_WRAPPERS}}", &wrappers)
}

/// A `wgmma` m64n`n`k16 wrapper (`dtype` inputs, f32 accumulators), one asm statement with its
/// `n / 2` accumulators as operands: `wgmma_ss_n{n}` takes A and B from shared memory (both
/// K-major), `wgmma_rs_n{n}_mn` takes A from registers and B from shared memory read transposed
/// (MN-major). `accumulate` false overwrites the accumulators.
fn wgmma_wrapper(n: u32, registers_a: bool, dtype: DType) -> String {
    let acc = n / 2;
    let ty = match dtype {
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
    };
    let d_list = (0..acc).map(|i| format!("%{i}")).collect::<Vec<_>>().join(", ");
    let d_ops = (0..acc).map(|i| format!("\"+f\"(d[{i}])")).collect::<Vec<_>>().join(", ");
    let shape = format!("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty}");
    if registers_a {
        let (a, b, flag) = (acc, acc + 4, acc + 5);
        format!(
            "__device__ __forceinline__ void wgmma_rs_n{n}_mn(float (&d)[{acc}], const u32 (&a)[4], unsigned long long db, bool accumulate) {{\n\
             \x20   asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{flag}, 0;\\n\"\n\
             \x20                \"{shape} {{{d_list}}}, {{%{a}, %{a1}, %{a2}, %{a3}}}, %{b}, p, 1, 1, 1;\\n}}\\n\"\n\
             \x20                : {d_ops}\n\
             \x20                : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(db), \"r\"((int)accumulate));\n}}\n",
            a1 = a + 1,
            a2 = a + 2,
            a3 = a + 3,
        )
    } else {
        let (da, db, flag) = (acc, acc + 1, acc + 2);
        format!(
            "__device__ __forceinline__ void wgmma_ss_n{n}(float (&d)[{acc}], unsigned long long da, unsigned long long db, bool accumulate) {{\n\
             \x20   asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{flag}, 0;\\n\"\n\
             \x20                \"{shape} {{{d_list}}}, %{da}, %{db}, p, 1, 1, 0, 0;\\n}}\\n\"\n\
             \x20                : {d_ops}\n\
             \x20                : \"l\"(da), \"l\"(db), \"r\"((int)accumulate));\n}}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_dsl::builder::*;

    #[test]
    fn default_configs_are_tiles_the_kernel_has() {
        let patterns: Vec<weft_dsl::PatternExpr> = vec![
            full(),
            causal() & window(1000),
            block().block_q(256).block_k(256).keep(top_k(2)).into(),
            block().block_q(32).block_k(48).keep(top_k(2)).into(),
            vertical_vector().q_block(128).keep(top_k(8)).into(),
            causal() & vertical_slash().block(256).vertical(top_k(8)).slash(top_k(2)),
            grid(48).into(),
        ];
        for p in &patterns {
            let c = KernelConfig::default_for(p, 128, DType::Bf16).unwrap();
            assert!(c.validate().is_ok(), "{p}: {c}");
            assert!(c.block_m.is_power_of_two() && (16..=128).contains(&c.block_m), "{p}: {c}");
            assert!(c.block_n.is_power_of_two() && (16..=128).contains(&c.block_n), "{p}: {c}");
        }
        let c = KernelConfig::default_for(&block().block_q(256).block_k(256).keep(top_k(2)).into(), 64, DType::F16)
            .unwrap();
        assert_eq!((c.block_m, c.block_n, c.warp_rows), (128, 128, 32));
    }

    #[test]
    fn hopper_defaults_take_the_producer_at_128_rows_and_wgmma_where_the_tiles_allow() {
        let blocks: weft_dsl::PatternExpr = block().block_q(128).block_k(128).keep(top_k(2)).into();
        let vs = causal() & vertical_slash().block(64).vertical(top_k(8)).slash(top_k(2));
        let vv: weft_dsl::PatternExpr = vertical_vector().q_block(128).keep(top_k(8)).into();
        let vv64: weft_dsl::PatternExpr = vertical_vector().q_block(64).keep(top_k(8)).into();
        let small: weft_dsl::PatternExpr = block().block_q(32).block_k(32).keep(top_k(2)).into();
        let causal: weft_dsl::PatternExpr = causal();
        // (pattern, head dim, Hopper tiles (None: mma.sync), producer)
        for (p, d, tiles, producer) in [
            (&blocks, 128, Some((128, 128)), true),
            (&vs, 64, Some((64, 64)), false),
            (&causal, 128, Some((128, 128)), true),
            (&causal, 64, Some((128, 128)), true),
            (&vv, 128, Some((128, 64)), true),
            (&vv64, 128, None, false),
            (&small, 128, None, false),
            (&vs, 256, None, false),
            (&causal, 256, None, false),
        ] {
            let base = KernelConfig::default_for(p, d, DType::Bf16).unwrap();
            let hopper = KernelConfig::default_for_arch(p, d, DType::Bf16, 90).unwrap();
            assert!(hopper.validate().is_ok());
            match tiles {
                Some(t) => assert_eq!((hopper.wgmma, hopper.block_m, hopper.block_n), (true, t.0, t.1), "{p} d={d}"),
                None => assert_eq!(hopper, base, "{p} d={d}"),
            }
            assert_eq!(hopper.producer, producer, "{p} d={d}: {hopper}");
            assert_eq!(
                KernelConfig::default_for_arch(p, d, DType::Bf16, 80).unwrap(),
                base,
                "{p}: sm_80 keeps mma.sync"
            );
        }
    }

    #[test]
    fn predicates_lower_with_euclidean_division() {
        let p = match causal() & pred((k() % 64).eq(lit(0)).or((q() / 128).ne(-k()))) {
            weft_dsl::PatternExpr::Intersect(v) => match &v[1] {
                weft_dsl::PatternExpr::Static(p) => p.clone(),
                _ => unreachable!(),
            },
            _ => unreachable!(),
        };
        assert_eq!(cuda_pred(&p), "((weft_rem(k, 64LL) == 0LL) || (weft_div(q, 128LL) != (-k)))");
    }

    #[test]
    fn every_config_field_changes_the_kernel_key() {
        let p = Pattern::new("p", full());
        let base = KernelConfig::for_blocks(128, 64, 128, DType::Bf16);
        let variants = [
            base,
            KernelConfig { warp_rows: 16, ..base },
            KernelConfig { block_n: 32, ..base },
            KernelConfig { block_m: 64, ..base },
            KernelConfig { head_dim: 64, ..base },
            KernelConfig { dtype: DType::F16, ..base },
            base.with_wgmma(),
            KernelConfig { producer: true, ..base.with_wgmma() },
            KernelConfig { producer: true, persistent: true, ..base.with_wgmma() },
        ];
        let mut keys: Vec<String> = variants
            .iter()
            .map(|c| emit(&KernelSpec { pattern: &p, masks: &[], permutation: None, config: *c }).unwrap().key)
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), variants.len());
    }

    #[test]
    fn configs_are_checked() {
        assert!(KernelConfig::new(128, DType::Bf16).validate().is_ok());
        assert!(KernelConfig { block_m: 48, ..KernelConfig::new(64, DType::F16) }.validate().is_err());
        let big = KernelConfig::for_blocks(128, 128, 256, DType::Bf16);
        assert!(big.validate().unwrap_err().to_string().contains("227 KiB"));
    }

    #[test]
    fn wgmma_configs_are_checked_and_sized() {
        let w = KernelConfig::for_blocks(128, 128, 128, DType::Bf16).with_wgmma();
        assert!(w.validate().is_ok());
        // A warpgroup per 64 rows; unpadded tiles plus 1024 bytes to align them.
        assert_eq!(w.threads(), 256);
        assert_eq!(w.shared_bytes(), (128 + 2 * 2 * 128) * 128 * 2 + 2 * 128 * 6 + 1024);
        for bad in [
            KernelConfig { block_m: 32, ..w },
            KernelConfig { block_n: 32, ..w },
            KernelConfig { head_dim: 256, ..w },
            KernelConfig { warp_rows: 32, ..w },
        ] {
            assert!(bad.validate().unwrap_err().to_string().contains("wgmma"), "{bad}");
        }
        let k = emit(&KernelSpec { pattern: &Pattern::new("p", full()), masks: &[], permutation: None, config: w })
            .unwrap();
        assert!(k.arch_specific && k.source.contains("#define WEFT_WGMMA 1") && k.source.contains("wgmma_ss_n128("));
        // Records stored before the field existed read as the mma.sync path.
        let old = r#"{"block_m":64,"block_n":64,"head_dim":128,"dtype":"Bf16","warp_rows":16,"stages":2}"#;
        let c: KernelConfig = serde_json::from_str(old).unwrap();
        assert!(!c.wgmma && !c.producer);
        // The producer schedule: a fourth warpgroup, four mbarriers per stage, wgmma only.
        let p = KernelConfig { producer: true, ..w };
        assert!(p.validate().is_ok());
        assert_eq!((p.threads(), p.shared_bytes()), (384, w.shared_bytes() + 8 + 32 * 2));
        let e = KernelConfig { producer: true, ..KernelConfig::for_blocks(128, 128, 128, DType::Bf16) }.validate();
        assert!(e.unwrap_err().to_string().contains("set wgmma too"));
        let k = emit(&KernelSpec { pattern: &Pattern::new("p", full()), masks: &[], permutation: None, config: p })
            .unwrap();
        assert!(k.source.contains("#define WEFT_PRODUCER 1") && k.threads == 384);
        // The persistent grid: a second Q buffer and its two mbarriers; producer only; and
        // patterns without gathered columns only.
        let ps = KernelConfig { persistent: true, ..p };
        assert!(ps.validate().is_ok());
        assert_eq!(ps.shared_bytes(), p.shared_bytes() + 128 * 128 * 2 + 16);
        let e = KernelConfig { persistent: true, ..w }.validate().unwrap_err().to_string();
        assert!(e.contains("set producer too"), "{e}");
        let k = emit(&KernelSpec { pattern: &Pattern::new("p", causal()), masks: &[], permutation: None, config: ps })
            .unwrap();
        assert!(k.source.contains("#define WEFT_PERSISTENT 1"));
        let vv = Pattern::new("vv", vertical_vector().q_block(128).keep(top_k(8)));
        let e = emit(&KernelSpec { pattern: &vv, masks: &[], permutation: None, config: ps }).unwrap_err().to_string();
        assert!(e.contains("without gathered key columns"), "{e}");
    }
}
