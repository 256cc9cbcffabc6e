//! GPU correctness: every family's generated kernel against the CPU reference, on fresh random
//! inputs, with poisoned outputs, sizes that are not multiples of the blocks, GQA and causal.
//! Built with `--features gpu`; run on the GPU machine by `scripts/gpu.sh`.
#![cfg(feature = "gpu")]

use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::builder::*;
use weft_dsl::{Pattern, Permutation, RingLayout};
use weft_patterns::synthetic::{planted_qk, Plant};
use weft_patterns::{attention, build_index, IndexOptions, Tensor};
use weft_runtime::{AttnShape, Gpu};

/// Patterns with the index's query block forced to 128 rows (32 rows per warp).
fn tall() -> Vec<Pattern> {
    vec![
        Pattern::new("dense_tall", full()),
        Pattern::new("causal_tall", causal()),
        Pattern::new("documents_tall", causal() & pred((q() / 300).eq(k() / 300).or(k().lt(lit(4))))),
    ]
}

fn families() -> Vec<Pattern> {
    vec![
        Pattern::new("dense", full()),
        Pattern::new("causal", causal()),
        Pattern::new("documents", causal() & pred((q() / 300).eq(k() / 300).or(k().lt(lit(4))))),
        Pattern::new("sliding_window", window(200) | sink(8)),
        Pattern::new("block_topk", causal() & block().keep(top_k(5))),
        Pattern::new(
            "block_static_32",
            block().block_q(32).block_k(32).keep_where(q().ge(k()).and((q() - k()).lt(lit(8)))),
        ),
        Pattern::new("vertical_vector", sink(16) | local(64) | vertical_vector().keep(top_k(48))),
        Pattern::new("vertical_vector_128", vertical_vector().q_block(128).keep(threshold(0.3)).sink(4).local(32)),
        Pattern::new("vertical_slash", causal() & vertical_slash().vertical(top_k(40)).slash(top_k(6))),
        Pattern::new("grid", grid(48).sink(4)),
        Pattern::new("permuted_grid", permuted(Permutation::Stride(48), block().keep(top_k(3)))),
        Pattern::new("ring", ring(4, RingLayout::ZigZag, causal() & window(300))),
    ]
}

fn round(x: &[f32], dtype: DType) -> (Vec<u16>, Vec<f32>) {
    x.iter()
        .map(|&v| match dtype {
            DType::Bf16 => {
                let h = half::bf16::from_f32(v);
                (h.to_bits(), h.to_f32())
            }
            DType::F16 => {
                let h = half::f16::from_f32(v);
                (h.to_bits(), h.to_f32())
            }
        })
        .unzip()
}

fn to_f32(x: &[u16], dtype: DType) -> Vec<f32> {
    x.iter()
        .map(|&b| match dtype {
            DType::Bf16 => half::bf16::from_bits(b).to_f32(),
            DType::F16 => half::f16::from_bits(b).to_f32(),
        })
        .collect()
}

#[test]
fn every_family_matches_the_cpu_reference() {
    let gpu = Gpu::open(0).expect("a GPU");
    println!("GPU: {} ({}, {} SMs)", gpu.name, gpu.arch.name(), gpu.sm_count);
    let mut failures = Vec::new();
    let mut seed = 1000u64;
    let cases = families().into_iter().map(|p| (p, None)).chain(tall().into_iter().map(|p| (p, Some(128))));
    for (p, block_m) in cases {
        for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64), (DType::Bf16, 64), (DType::F16, 128)] {
            for (n, hq, hkv) in [(1000usize, 4usize, 2usize), (333, 2, 2)] {
                seed += 1;
                // Planted structure so the dynamic families pick something meaningful.
                let plants: Vec<Plant> = (0..hq)
                    .map(|h| if h % 2 == 0 { Plant::Vertical(vec![7, 300, 301, 650]) } else { Plant::Diagonal(32) })
                    .collect();
                let (q_full, k_full) = planted_qk(&plants, n, d, 4.0, seed);
                let q = q_full;
                let k = Tensor { heads: hkv, tokens: n, dim: d, data: k_full.data[..hkv * n * d].to_vec() };
                let v = Tensor::random(hkv, n, d, seed + 7);
                let (qb, qr) = round(&q.data, dtype);
                let (kb, kr) = round(&k.data, dtype);
                let (vb, vr) = round(&v.data, dtype);
                let (q, k, v) = (
                    Tensor::new(hq, n, d, qr).unwrap(),
                    Tensor::new(hkv, n, d, kr).unwrap(),
                    Tensor::new(hkv, n, d, vr).unwrap(),
                );
                let ix = build_index(&p.expr, &q, &k, &IndexOptions { block_m, ..Default::default() }).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let want = attention(&ix, &q, &k, &v, scale).unwrap();
                let config =
                    KernelConfig::for_blocks(ix.block_m, ix.block_n, d as u32, dtype);
                let kernel =
                    emit(&KernelSpec { pattern: &p, masks: &ix.masks, permutation: ix.permutation, config }).unwrap();
                let s = &gpu.stream;
                let dix = gpu.upload_index(&ix).unwrap();
                let (qd, kd, vd) = (s.clone_htod(&qb).unwrap(), s.clone_htod(&kb).unwrap(), s.clone_htod(&vb).unwrap());
                // Poison: NaN in both dtypes, so an unwritten element cannot pass.
                let mut out = s.clone_htod(&vec![0xffffu16; hq * n * d]).unwrap();
                let mut lse = s.clone_htod(&vec![f32::NAN; hq * n]).unwrap();
                let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32).unwrap();
                s.synchronize().unwrap();
                let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
                let got_lse = s.clone_dtoh(&lse).unwrap();
                let (mut num, mut den, mut nan) = (0f64, 0f64, 0usize);
                for (g, w) in got.iter().zip(&want.out.data) {
                    if !g.is_finite() {
                        nan += 1;
                    }
                    num += f64::from(g - w).powi(2);
                    den += f64::from(*w).powi(2);
                }
                let rel = (num / den.max(1e-30)).sqrt();
                let mut lse_err = 0f64;
                for (g, w) in got_lse.iter().zip(&want.lse) {
                    let e = if w.is_infinite() {
                        if *g == f32::NEG_INFINITY {
                            0.0
                        } else {
                            f64::INFINITY
                        }
                    } else {
                        (f64::from(*g) - w).abs()
                    };
                    lse_err = lse_err.max(if e.is_nan() { f64::INFINITY } else { e });
                }
                let tol = match dtype {
                    DType::Bf16 => 1.5e-2,
                    DType::F16 => 2e-3,
                };
                let ok = nan == 0 && rel < tol && lse_err < 2e-2;
                println!(
                    "{} {:<20} {:<5} d={:<3} n={:<5} hq={} hkv={} bm={:<3} density={:.3} rel_err={:.2e} lse_err={:.2e} unwritten={}",
                    if ok { "ok  " } else { "FAIL" }, p.name, dtype.name(), d, n, hq, hkv, ix.block_m, ix.density(), rel, lse_err, nan
                );
                if !ok {
                    failures.push(format!("{} {} d={d} n={n}", p.name, dtype.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}
