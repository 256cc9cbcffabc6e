//! Kernel config spaces and their static pruning.
//!
//! For one pattern (its index layout constrains the tiles) and one head dim and dtype, the
//! space is every `block_m x block_n` tile that divides the pattern's granularity, with 16 or
//! 32 query rows per warp. Before anything is timed, configs are pruned by a static resource
//! model: shared memory against the device's per-CTA limit, then, from the NVRTC report of a
//! parallel compile, register spills and the CTAs that fit on one multiprocessor.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use weft_codegen::{emit, DType, Kernel, KernelConfig, KernelSpec};
use weft_dsl::Pattern;
use weft_patterns::{layout, IndexOptions, SparseIndex};

use crate::Error;

/// What the static model needs to know about a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLimits {
    /// Dynamic shared memory one CTA may use.
    pub shared_per_block: u32,
    /// Shared memory of one multiprocessor.
    pub shared_per_sm: u32,
    pub registers_per_sm: u32,
    pub max_threads_per_sm: u32,
}

impl DeviceLimits {
    /// H100 / H200 (sm_90).
    pub const HOPPER: DeviceLimits = DeviceLimits {
        shared_per_block: 227 * 1024,
        shared_per_sm: 228 * 1024,
        registers_per_sm: 65536,
        max_threads_per_sm: 2048,
    };
    /// A100 (sm_80).
    pub const AMPERE: DeviceLimits = DeviceLimits {
        shared_per_block: 163 * 1024,
        shared_per_sm: 164 * 1024,
        registers_per_sm: 65536,
        max_threads_per_sm: 2048,
    };

    /// The limits of compute capability `sm` (Hopper's for 9.0 and later, Ampere's below).
    pub fn for_sm(sm: u32) -> DeviceLimits {
        if sm >= 90 {
            DeviceLimits::HOPPER
        } else {
            DeviceLimits::AMPERE
        }
    }
}

/// The Hopper path's configs (`KernelConfig::wgmma`, sm_90 only) for `pattern`: the tiles and
/// pipeline depths of [`space`] that the path takes (64 or 128 rows and keys; head dims 64 and
/// 128, none otherwise), on wgmma with its 16 rows per warp, and at 128 rows with and without
/// the producer warpgroup, and with its persistent grid where the pattern gathers no columns
/// (shared memory prunes what does not fit).
pub fn hopper_space(pattern: &Pattern, head_dim: u32, dtype: DType) -> Vec<KernelConfig> {
    if ![64, 128].contains(&head_dim) {
        return Vec::new();
    }
    let mut out: Vec<KernelConfig> = Vec::new();
    for c in space(pattern, head_dim, dtype) {
        // (16 and 32 rows per warp map to the same wgmma config.)
        if c.block_m < 64 || c.block_n < 64 {
            continue;
        }
        // The persistent grid where the pattern takes it: it won only on short rows in the
        // 2026-11-29 measurements (block-3 at 16k: 0.350 against 0.396 ms) and lost on
        // long ones (dense and causal 5-23% slower), which is a choice per head for the timer.
        // (validate_for also refuses it without the producer, i.e. below 128 rows.)
        let persistent = KernelConfig { persistent: true, ..c.hopper() };
        let persistent = persistent.validate_for(&pattern.expr).is_ok().then_some(persistent);
        for hopper in [Some(c.with_wgmma()), Some(c.hopper()), persistent].into_iter().flatten() {
            if !out.contains(&hopper) {
                out.push(hopper);
            }
        }
    }
    out
}

/// Every config of the space for `pattern`, head dim and dtype: tiles dividing the pattern's
/// granularity, 16 or 32 rows per warp (32 only for 32-row tiles and larger), and a K/V
/// pipeline of 2 stages, or 3 where tiles are large enough for the deeper pipeline to pay
/// (64 rows or more, 32 keys or more; shared memory prunes the rest).
pub fn space(pattern: &Pattern, head_dim: u32, dtype: DType) -> Vec<KernelConfig> {
    let mut out = Vec::new();
    for bm in [16u32, 32, 64, 128] {
        for bn in [16u32, 32, 64, 128] {
            let opts = IndexOptions { block_m: Some(bm as usize), block_n: Some(bn as usize), ..Default::default() };
            if layout(&pattern.expr, &opts).is_err() {
                continue;
            }
            let depths: &[u32] = if bm >= 64 && bn >= 32 { &[2, 3] } else { &[2] };
            for warp_rows in [16u32, 32] {
                for &stages in depths {
                    if warp_rows <= bm {
                        let tiles = KernelConfig::for_blocks(bm as usize, bn as usize, head_dim, dtype);
                        out.push(KernelConfig { warp_rows, stages, ..tiles });
                    }
                }
            }
        }
    }
    out
}

/// Why a config was dropped before timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Pruned {
    /// More shared memory than a CTA may have.
    SharedMemory { needed: u32, limit: u32 },
    /// The generator or NVRTC refused it.
    CompileFailed(String),
    /// ptxas spilled registers to local memory.
    Spills { bytes: u32 },
}

/// A config that survived pruning, with its static profile.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub config: KernelConfig,
    pub kernel: Kernel,
    pub cubin: Vec<u8>,
    pub ptx: String,
    /// The compiler options used (`--gpu-architecture=sm_90a` for the Hopper path).
    pub options: Vec<String>,
    pub registers: Option<u32>,
    /// CTAs resident on one multiprocessor by shared memory, registers and threads.
    pub ctas_per_sm: u32,
    pub compile_ms: f64,
}

/// The outcome for one config.
#[derive(Clone, Debug)]
pub enum Candidate {
    Kept(Box<Compiled>),
    Dropped(KernelConfig, Pruned),
}

/// What a compiler returns for one kernel.
#[derive(Clone, Debug, Default)]
pub struct CompileOutput {
    pub cubin: Vec<u8>,
    pub ptx: String,
    /// The compiler options used (stored with the kernel).
    pub options: Vec<String>,
    /// Registers per thread, when the compiler reports them.
    pub registers: Option<u32>,
    /// Bytes spilled to local memory (stores plus loads).
    pub spill_bytes: u32,
    pub millis: f64,
}

/// CTAs of a kernel that fit on one multiprocessor.
pub fn ctas_per_sm(config: &KernelConfig, registers: Option<u32>, limits: &DeviceLimits) -> u32 {
    let threads = config.threads();
    let by_shared = limits.shared_per_sm / config.shared_bytes().max(1);
    let by_threads = limits.max_threads_per_sm / threads.max(1);
    // Registers are allocated per warp in units of 256.
    let by_regs = registers.map_or(u32::MAX, |r| {
        let per_warp = (r * 32).div_ceil(256) * 256;
        limits.registers_per_sm / (per_warp * (threads / 32)).max(1)
    });
    by_shared.min(by_threads).min(by_regs)
}

/// Generates and compiles (in parallel, with `compile`) every config of `configs` for the
/// index `ix` of `pattern`, pruning by shared memory first and by the compiler's report after.
/// `compile(kernel)` returns the [`CompileOutput`] or an error message; a failure drops that
/// config and the others go on.
pub fn compile_space<F>(
    pattern: &Pattern,
    ix_for: &(dyn Fn(&KernelConfig) -> Result<SparseIndex, Error> + Sync),
    configs: &[KernelConfig],
    limits: &DeviceLimits,
    compile: F,
) -> Vec<Candidate>
where
    F: Fn(&Kernel) -> Result<CompileOutput, String> + Sync,
{
    configs
        .par_iter()
        .map(|c| {
            if c.shared_bytes() > limits.shared_per_block {
                return Candidate::Dropped(
                    *c,
                    Pruned::SharedMemory { needed: c.shared_bytes(), limit: limits.shared_per_block },
                );
            }
            let ix = match ix_for(c) {
                Ok(ix) => ix,
                Err(e) => return Candidate::Dropped(*c, Pruned::CompileFailed(e.to_string())),
            };
            let kernel = match emit(&KernelSpec { pattern, masks: &ix.masks, permutation: ix.permutation, config: *c })
            {
                Ok(k) => k,
                Err(e) => return Candidate::Dropped(*c, Pruned::CompileFailed(e.to_string())),
            };
            match compile(&kernel) {
                Err(e) => Candidate::Dropped(*c, Pruned::CompileFailed(e)),
                Ok(out) if out.spill_bytes > 0 => Candidate::Dropped(*c, Pruned::Spills { bytes: out.spill_bytes }),
                Ok(out) => Candidate::Kept(Box::new(Compiled {
                    config: *c,
                    ctas_per_sm: ctas_per_sm(c, out.registers, limits),
                    kernel,
                    cubin: out.cubin,
                    options: out.options,
                    ptx: out.ptx,
                    registers: out.registers,
                    compile_ms: out.millis,
                })),
            }
        })
        .collect()
}

/// A `compile` for [`compile_space`] that runs NVRTC for `arch` (its arch-specific target for
/// kernels that need it).
pub fn nvrtc_compiler(arch: weft_runtime::Arch) -> impl Fn(&Kernel) -> Result<CompileOutput, String> + Sync {
    move |kernel: &Kernel| {
        let c = weft_runtime::nvrtc::compile_kernel(kernel, arch).map_err(|e| e.to_string())?;
        Ok(CompileOutput {
            spill_bytes: c.report.as_ref().map_or(0, |r| r.spill_stores + r.spill_loads),
            registers: c.report.as_ref().map(|r| r.registers),
            cubin: c.cubin,
            ptx: c.ptx,
            options: c.options,
            millis: c.millis,
        })
    }
}
