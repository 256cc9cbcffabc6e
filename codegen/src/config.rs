//! Kernel configs: the element type and the tunable shape of an attention kernel.

use serde::{Deserialize, Serialize};

use weft_dsl::PatternExpr;

use crate::{gathers_columns, Error};

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

/// The head dims every kernel takes.
pub(crate) const HEAD_DIMS: [u32; 3] = [64, 128, 256];

pub(crate) fn check_head_dim(head_dim: u32) -> Result<(), Error> {
    if HEAD_DIMS.contains(&head_dim) {
        Ok(())
    } else {
        Err(Error::Config(format!("head_dim must be 64, 128 or 256, got {head_dim}")))
    }
}
