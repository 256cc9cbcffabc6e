//! Generated CUDA is deterministic and reviewed: snapshots of a few kernels.

use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::builder::*;
use weft_dsl::{Pattern, Permutation};
use weft_patterns::{build_index, IndexOptions, Tensor};

fn kernel(p: &Pattern, n: usize, config: KernelConfig) -> weft_codegen::Kernel {
    let (q, k) = (Tensor::random(2, n, 16, 1), Tensor::random(2, n, 16, 2));
    let ix = build_index(&p.expr, &q, &k, &IndexOptions::default()).unwrap();
    let spec = KernelSpec { pattern: p, masks: &ix.masks, permutation: ix.permutation, config };
    let a = emit(&spec).unwrap();
    assert_eq!(a, emit(&spec).unwrap(), "emission must be deterministic");
    a
}

#[test]
fn causal_sliding_window_bf16_d128() {
    let p = Pattern::new("window", causal() & window(1024));
    insta::assert_snapshot!(kernel(&p, 300, KernelConfig::new(128, DType::Bf16)).source);
}

#[test]
fn video_fp16_d64_header_and_masks() {
    let p = Pattern::new("video", sink(64) | local(256) | vertical_vector().q_block(64).keep(top_k(16)));
    let k = kernel(&p, 500, KernelConfig::new(64, DType::F16));
    let head: Vec<&str> = k.source.lines().take(6).collect();
    let masks: Vec<&str> = k.source.lines().filter(|l| l.trim_start().starts_with("case ")).collect();
    insta::assert_snapshot!(format!("{}\n...\n{}", head.join("\n"), masks.join("\n")));
}

#[test]
fn permuted_grid_token_map() {
    let p = Pattern::new("pgrid", permuted(Permutation::Stride(16), block().block_q(32).block_k(32).keep(top_k(2))));
    let c = KernelConfig { block_m: 32, block_n: 32, ..KernelConfig::new(64, DType::Bf16) };
    let k = kernel(&p, 200, c);
    let start = k.source.find("__device__ __forceinline__ int weft_token").unwrap();
    let end = start + k.source[start..].find("\n}").unwrap() + 2;
    insta::assert_snapshot!(&k.source[start..end]);
}

#[test]
fn index_module_bf16_d128() {
    let k = weft_codegen::emit_index_module(128).unwrap();
    assert_eq!(k, weft_codegen::emit_index_module(128).unwrap(), "emission must be deterministic");
    // The header and the generated config (the constants the host and the templates share);
    // the body is the templates.
    let config = k.source.split("// ---- prelude.cuh ----").next().unwrap();
    let lines: Vec<&str> = config.lines().filter(|l| !l.starts_with("//   ") && !l.is_empty()).collect();
    insta::assert_snapshot!(lines.join("\n"));
}

#[test]
fn wgmma_probe_wrappers_bf16_d128() {
    let k = weft_codegen::emit_wgmma_probe(128).unwrap();
    assert_eq!(k, weft_codegen::emit_wgmma_probe(128).unwrap(), "emission must be deterministic");
    assert!(weft_codegen::emit_wgmma_probe(256).is_err(), "head_dim 256 is refused");
    // The generated part: the header and the two wgmma wrappers (the rest is the template).
    let start = k.source.find("__device__ __forceinline__ void wgmma_qk").unwrap();
    let end = k.source.find("// This thread's accumulators").unwrap();
    let head: Vec<&str> = k.source.lines().take_while(|l| l.starts_with("// ")).collect();
    insta::assert_snapshot!(format!("{}\n...\n{}", head.join("\n"), &k.source[start..end]));
}
