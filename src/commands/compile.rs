//! `weft emit` and `weft compile`, and the kernel generation they share.

use std::path::Path;

use anyhow::{bail, Context, Result};
use weft::dsl::Pattern;
use weft::patterns::{self as pat, IndexOptions, Tensor};

use super::args::KernelArgs;
use super::MAX_SEQ;

pub(crate) fn emit(pattern: &Pattern, args: &KernelArgs) -> Result<()> {
    let k = generate(pattern, args)?;
    print!("{}", k.source);
    Ok(())
}

/// The kernel for a pattern, with the layout and masks of its index on a synthetic input.
pub(crate) fn generate(pattern: &Pattern, args: &KernelArgs) -> Result<weft::codegen::Kernel> {
    pattern.validate()?;
    if args.seq == 0 || args.seq > MAX_SEQ {
        bail!("--seq must be between 1 and {MAX_SEQ}, got {}", args.seq);
    }
    let dtype: weft::codegen::DType = args.dtype.parse()?;
    if pattern.expr.contains_retrieval() {
        bail!("retrieval patterns run on the decode kernel (weft::codegen::emit_decode); `weft emit` and `weft compile` show attention kernels");
    }
    let q = Tensor::random(1, args.seq, 16, 1);
    let k = Tensor::random(1, args.seq, 16, 2);
    let opts = IndexOptions { block_m: args.block_m, block_n: args.block_n, ..Default::default() };
    let ix = pat::build_index(&pattern.expr, &q, &k, &opts)?;
    let mut config = weft::codegen::KernelConfig {
        stages: args.stages,
        ..weft::codegen::KernelConfig::for_blocks(ix.block_m, ix.block_n, args.head_dim, dtype)
    };
    if args.wgmma {
        config = config.with_wgmma();
    }
    config.producer = args.producer;
    config.persistent = args.persistent;
    let spec = weft::codegen::KernelSpec { pattern, masks: &ix.masks, permutation: ix.permutation, config };
    Ok(weft::codegen::emit(&spec)?)
}

pub(crate) fn compile(pattern: &Pattern, args: &KernelArgs, arch: &str, cubin: Option<&Path>) -> Result<()> {
    let arch: weft::runtime::Arch = arch.parse()?;
    let kernel = generate(pattern, args)?;
    let (major, minor) = weft::runtime::nvrtc::version()?;
    let c = weft::runtime::nvrtc::compile_kernel(&kernel, arch)?;
    println!("kernel        {}", kernel.name);
    println!("pattern       {} = {pattern}", pattern.name);
    println!("target        {} (NVRTC {major}.{minor}), {:.0} ms", arch.name(), c.millis);
    println!("threads       {} per CTA", kernel.threads);
    match &c.report {
        Some(r) => {
            println!("registers     {} per thread", r.registers);
            println!("shared memory {} bytes dynamic, {} static", kernel.shared_bytes, r.static_shared);
            println!("stack frame   {} bytes", r.stack_frame);
            println!(
                "spills        {} bytes stored, {} loaded{}",
                r.spill_stores,
                r.spill_loads,
                if r.spill_stores + r.spill_loads > 0 { "  <- spills: try a smaller head dim or block" } else { "" }
            );
        }
        None => println!("resources     not reported by this NVRTC (no ptxas info in its log)"),
    }
    println!("cubin         {} bytes, ptx {} bytes", c.cubin.len(), c.ptx.len());
    if let Some(path) = cubin {
        std::fs::write(path, &c.cubin).with_context(|| format!("writing the CUBIN to {}", path.display()))?;
        println!("written       {}", path.display());
    }
    Ok(())
}
