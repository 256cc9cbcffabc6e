//! Config spaces, static pruning and parallel compilation (NVRTC, no GPU).

use weft_autotune::space::*;
use weft_codegen::DType;
use weft_dsl::builder::*;
use weft_dsl::Pattern;
use weft_patterns::{build_index, IndexOptions, Tensor};

fn index_for(
    p: &Pattern,
) -> impl Fn(&weft_codegen::KernelConfig) -> Result<weft_patterns::SparseIndex, weft_autotune::Error> + Sync + '_ {
    move |c| {
        let (q, k) = (Tensor::random(1, 300, 16, 1), Tensor::random(1, 300, 16, 2));
        let opts =
            IndexOptions { block_m: Some(c.block_m as usize), block_n: Some(c.block_n as usize), ..Default::default() };
        Ok(build_index(&p.expr, &q, &k, &opts)?)
    }
}

#[test]
fn spaces_follow_the_pattern_granularity() {
    let causal_space = space(&Pattern::new("c", causal()), 128, DType::Bf16);
    // 4 x 4 tiles, 16 rows per warp everywhere, 32 where the tile has 32 rows or more; a
    // 3-stage pipeline besides for tiles of 64 rows or more and 32 keys or more.
    assert_eq!(causal_space.iter().filter(|c| c.stages == 2).count(), 16 + 12);
    assert_eq!(causal_space.iter().filter(|c| c.stages == 3).count(), 2 * 3 * 2);
    assert!(causal_space.iter().filter(|c| c.stages == 3).all(|c| c.block_m >= 64 && c.block_n >= 32));
    let vv = space(&Pattern::new("vv", vertical_vector().q_block(64)), 128, DType::Bf16);
    assert!(vv.iter().all(|c| 64 % c.block_m == 0));
    assert!(vv.iter().any(|c| c.block_m == 64 && c.warp_rows == 32));
    let blocks = space(&Pattern::new("b", block().block_q(32).block_k(32)), 64, DType::F16);
    assert!(blocks.iter().all(|c| c.block_m <= 32 && c.block_n <= 32));
}

#[test]
fn occupancy_model() {
    let c = weft_codegen::KernelConfig::for_blocks(128, 64, 128, DType::Bf16);
    // 105216 bytes of shared memory: two CTAs on a Hopper SM; 255 registers x 128 threads: two.
    assert_eq!(ctas_per_sm(&c, Some(255), &DeviceLimits::HOPPER), 2);
    assert_eq!(ctas_per_sm(&c, None, &DeviceLimits::HOPPER), 2);
    let small = weft_codegen::KernelConfig::for_blocks(64, 32, 64, DType::Bf16);
    assert_eq!(ctas_per_sm(&small, Some(96), &DeviceLimits::HOPPER), 5);
}

#[test]
fn pruning_and_parallel_compile_with_nvrtc() {
    weft_runtime::nvrtc::version().expect("NVRTC is required for this test");
    let p = Pattern::new("window", causal() & window(256));
    let configs = space(&p, 128, DType::Bf16);
    let ix = index_for(&p);
    let out = compile_space(&p, &ix, &configs, &DeviceLimits::HOPPER, nvrtc_compiler(weft_runtime::Arch::SM90));
    assert_eq!(out.len(), configs.len());
    let kept: Vec<&Compiled> =
        out.iter().filter_map(|c| if let Candidate::Kept(k) = c { Some(&**k) } else { None }).collect();
    let spills = out.iter().filter(|c| matches!(c, Candidate::Dropped(_, Pruned::Spills { .. }))).count();
    for k in &kept {
        println!("kept {} regs={:?} ctas/SM={} {:.0} ms", k.config, k.registers, k.ctas_per_sm, k.compile_ms);
        assert!(!k.cubin.is_empty() && k.ctas_per_sm >= 1);
    }
    println!("{} kept, {spills} dropped for spills, of {}", kept.len(), configs.len());
    assert!(
        kept.iter().any(|k| k.config == weft_codegen::KernelConfig::new(128, DType::Bf16)),
        "the default config survives"
    );
    // 128 x 64 tiles with 32 rows per warp spill at head dim 128 (docs/PERF.md).
    assert!(spills >= 1);
}

#[test]
fn a_failed_compile_drops_only_that_config() {
    let p = Pattern::new("c", causal());
    let configs = space(&p, 64, DType::F16);
    let ix = index_for(&p);
    let big = weft_codegen::KernelConfig::for_blocks(128, 128, 256, DType::Bf16);
    let mut all = configs.clone();
    all.push(big);
    let out = compile_space(&p, &ix, &all, &DeviceLimits::AMPERE, |k: &weft_codegen::Kernel| {
        if k.name.ends_with('0') {
            Err("simulated NVRTC failure".to_string())
        } else {
            Ok(CompileOutput { cubin: vec![1], registers: Some(100), millis: 1.0, ..Default::default() })
        }
    });
    let failed = out.iter().filter(|c| matches!(c, Candidate::Dropped(_, Pruned::CompileFailed(_)))).count();
    let kept = out.iter().filter(|c| matches!(c, Candidate::Kept(_))).count();
    let smem = out.iter().filter(|c| matches!(c, Candidate::Dropped(_, Pruned::SharedMemory { .. }))).count();
    assert_eq!(smem, 1, "128 x 128 tiles at head dim 256 exceed the A100's shared memory");
    assert_eq!(failed + kept + smem, all.len());
    assert!(kept > 0);
}

/// The Hopper configs (`weft autotune --wgmma`): 64/128 tiles the pattern allows, head dims 64
/// and 128 only, 128-row tiles with and without the producer warpgroup (and its persistent grid
/// where the pattern gathers no columns); through
/// `nvrtc_compiler` they compile for sm_90a, and the two that need more than 227 KiB
/// (128 x 128 at head dim 128, 3 stages) are pruned by shared memory.
#[test]
fn hopper_configs_compile_for_sm_90a() {
    weft_runtime::nvrtc::version().expect("NVRTC is required for this test");
    assert!(hopper_space(&Pattern::new("c", causal()), 256, DType::Bf16).is_empty());
    let vv = hopper_space(&Pattern::new("vv", vertical_vector().q_block(64)), 128, DType::Bf16);
    assert!(vv.iter().all(|c| c.block_m == 64), "q_block 64 allows 64-row tiles only: {vv:?}");
    let p = Pattern::new("window", causal() & window(256));
    let configs = hopper_space(&p, 128, DType::Bf16);
    assert_eq!(configs.len(), 15, "{configs:#?}");
    assert!(configs.iter().all(|c| c.wgmma && c.warp_rows == 16));
    let producers: Vec<_> = configs.iter().filter(|c| c.producer).collect();
    assert!(producers.len() == 7 && producers.iter().all(|c| c.block_m == 128), "{producers:?}");
    // (128 x 128 tiles with 3 stages and a second Q buffer are over the shared memory limit.)
    assert_eq!(producers.iter().filter(|c| c.persistent).count(), 3);
    // A pattern with gathered columns gets no persistent grid.
    let vv = hopper_space(&Pattern::new("vv", vertical_vector().q_block(128)), 128, DType::Bf16);
    assert!(vv.iter().any(|c| c.producer) && !vv.iter().any(|c| c.persistent), "{vv:?}");
    let out =
        compile_space(&p, &index_for(&p), &configs, &DeviceLimits::HOPPER, nvrtc_compiler(weft_runtime::Arch::SM90));
    let kept = out.iter().filter(|c| matches!(c, Candidate::Kept(_))).count();
    let smem = out.iter().filter(|c| matches!(c, Candidate::Dropped(_, Pruned::SharedMemory { .. }))).count();
    let failed: Vec<_> = out.iter().filter(|c| matches!(c, Candidate::Dropped(_, Pruned::CompileFailed(_)))).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!((kept, smem), (13, 2));
}
