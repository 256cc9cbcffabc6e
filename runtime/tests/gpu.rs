//! GPU correctness: every family's generated kernel against the CPU reference, on fresh random
//! inputs, with poisoned outputs, sizes that are not multiples of the blocks, GQA and causal.
//! Built with `--features gpu`; run on the GPU machine by `scripts/gpu.sh`.
#![cfg(feature = "gpu")]

use common::Schedule;
use cudarc::driver::CudaSlice;
use weft_codegen::{emit, emit_decode, emit_merge, DType, DecodeSpec, KernelConfig, KernelSpec, Partial};
use weft_dsl::builder::*;
use weft_dsl::{Pattern, Permutation, RingLayout, Score, Unit};
use weft_patterns::synthetic::{planted_qk, Plant};
use weft_patterns::{attention, build_index, ring, Attention, IndexOptions, Tensor};
use weft_runtime::{AttnShape, Gpu, GpuOptions, VvStrategy};

mod common;

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
        // Products past 32 bits (q x (2^31 - 1) ~ 2^41): predicates are exact 64-bit integers
        // on both sides, and validation refuses any that could leave 64 bits.
        Pattern::new(
            "wide_ints",
            causal() & pred(((q() * lit(2147483647)) % 1000003).lt(lit(600000)).or(k().lt(lit(4)))),
        ),
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

/// `x` rounded to `dtype`: the raw words for the GPU and their values for the reference.
fn round(x: &[f32], dtype: DType) -> (Vec<u16>, Vec<f32>) {
    let words = dtype.encode(x);
    let values = dtype.decode(&words);
    (words, values)
}

fn to_f32(x: &[u16], dtype: DType) -> Vec<f32> {
    dtype.decode(x)
}

#[test]
fn every_family_matches_the_cpu_reference() {
    let gpu = Gpu::open(0).expect("a GPU");
    println!("GPU: {} ({}, {} SMs)", gpu.name, gpu.arch.name(), gpu.sm_count);
    let mut failures = Vec::new();
    let mut seed = 1000u64;
    // Every family at its default blocks, the tall patterns at 128-row blocks, and both again
    // with a 3-stage K/V pipeline.
    let cases: Vec<(Pattern, Option<usize>, u32)> = families()
        .into_iter()
        .map(|p| (p, None, 2))
        .chain(tall().into_iter().map(|p| (p, Some(128), 2)))
        .chain(tall().into_iter().map(|p| (p, Some(128), 3)))
        .chain(
            families()
                .into_iter()
                .filter(|p| ["vertical_vector", "block_topk", "grid", "ring"].contains(&p.name.as_str()))
                .map(|p| (p, None, 3)),
        )
        .collect();
    for (p, block_m, stages) in cases {
        for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64), (DType::Bf16, 64), (DType::F16, 128)] {
            for (n, hq, hkv) in [(1000usize, 4usize, 2usize), (333, 2, 2)] {
                seed += 1;
                let opts = IndexOptions { block_m, ..Default::default() };
                let config =
                    |bm: usize, bn: usize| KernelConfig { stages, ..KernelConfig::for_blocks(bm, bn, d as u32, dtype) };
                let case = FamilyCase { p: &p, opts, dtype, d, n, hq, hkv, seed };
                if let Err(what) = check_family(&gpu, &case, config, &format!("stages={stages}")) {
                    failures.push(what);
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// One family case: pattern, index options, dtype, head dim, tokens, heads, seed.
struct FamilyCase<'a> {
    p: &'a Pattern,
    opts: IndexOptions,
    dtype: DType,
    d: usize,
    n: usize,
    hq: usize,
    hkv: usize,
    seed: u64,
}

/// Runs one family case (planted Q/K so the dynamic families pick something meaningful) with
/// the kernel `config(block_m, block_n)` makes against the CPU reference, printing an `ok` or
/// `FAIL` line; the error names the case.
fn check_family(
    gpu: &Gpu,
    c: &FamilyCase<'_>,
    config: impl Fn(usize, usize) -> KernelConfig,
    what: &str,
) -> Result<(), String> {
    let FamilyCase { p, dtype, d, n, hq, hkv, seed, .. } = *c;
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
    let (q, k, v) =
        (Tensor::new(hq, n, d, qr).unwrap(), Tensor::new(hkv, n, d, kr).unwrap(), Tensor::new(hkv, n, d, vr).unwrap());
    let ix = build_index(&p.expr, &q, &k, &c.opts).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let want = attention(&ix, &q, &k, &v, scale).unwrap();
    let config = config(ix.block_m, ix.block_n);
    let kernel = emit(&KernelSpec { pattern: p, masks: &ix.masks, permutation: ix.permutation, config }).unwrap();
    let s = gpu.stream();
    let dix = gpu.upload_index(&ix).unwrap();
    let (qd, kd, vd) = (s.clone_htod(&qb).unwrap(), s.clone_htod(&kb).unwrap(), s.clone_htod(&vb).unwrap());
    let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
    let (rel, nan, lse_err) = run_and_compare(gpu, &kernel, &config, &dix, shape, (&qd, &kd, &vd), dtype, scale, &want);
    let ok = nan == 0 && rel < dtype.reference_tolerance() && lse_err < 2e-2;
    println!(
        "{} {:<20} {:<5} d={:<3} n={:<5} hq={} hkv={} bm={:<3} bn={:<3} {what} density={:.3} rel_err={:.2e} lse_err={:.2e} unwritten={}",
        if ok { "ok  " } else { "FAIL" },
        p.name,
        dtype.name(),
        d,
        n,
        hq,
        hkv,
        ix.block_m,
        ix.block_n,
        ix.density(),
        rel,
        lse_err,
        nan
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{} {} d={d} n={n} {what}", p.name, dtype.name()))
    }
}

/// The Hopper path (`KernelConfig::wgmma`, sm_90a): every family the block sizes allow, at
/// 64 x 64, 128 x 64 (2 and 3 stages) and 128 x 128 tiles; per tile bf16 at head dim 128 with
/// GQA over 1000 tokens, and fp16 (bf16 with 3 stages) at head dim 64 over 333; causal and
/// sizes that are not multiples of the tiles, against the CPU reference with poisoned outputs.
/// (64 x 128 tiles, which `hopper_space` offers, are compiled in CI but not run here.)
#[test]
fn wgmma_attention_matches_the_cpu_reference() {
    check_wgmma_tiles(&[Schedule::Plain]);
}

/// The same for the producer schedule (`KernelConfig::producer`) at its 128-row tiles, with
/// and without its persistent grid: a test of its own, so that a hang there (mbarriers, named
/// barriers) can be told from the plain wgmma path and run apart (`... wgmma_producer` under
/// `timeout`). The persistent kernels run on 3 CTAs (bf16 cases) and 1 (the others), so that
/// each CTA walks many rows of different lengths: barrier phases and Q buffers carry across
/// rows, as they do with one CTA per SM at long sequences.
#[test]
fn wgmma_producer_schedule_matches_the_cpu_reference() {
    check_wgmma_tiles(&[Schedule::Producer, Schedule::Persistent]);
}

/// Every family at each of [`common::WGMMA_TILES`] whose schedule is one of `schedules`.
fn check_wgmma_tiles(schedules: &[Schedule]) {
    let gpu = Gpu::open(0).expect("a GPU");
    if gpu.arch.sm != 90 {
        println!("skipped: the wgmma path needs sm_90, this GPU is {}", gpu.arch.name());
        return;
    }
    let mut failures = Vec::new();
    let mut seed = 5000u64;
    for p in families() {
        for (bm, bn, stages, schedule) in common::WGMMA_TILES {
            if !schedules.contains(&schedule) || !schedule.takes(&p) {
                continue;
            }
            // Two cases per tile (so that the whole suite runs in under 10 minutes):
            // bf16 at d=128 over 1000 tokens with GQA, and fp16 or bf16 at d=64 over 333.
            let small = if stages == 3 { DType::Bf16 } else { DType::F16 };
            for (dtype, d, n, hq, hkv) in [(DType::Bf16, 128usize, 1000usize, 4usize, 2usize), (small, 64, 333, 2, 2)] {
                seed += 1;
                let opts = IndexOptions { block_m: Some(bm), block_n: Some(bn), ..Default::default() };
                // Patterns whose granularity these blocks do not fit are skipped.
                if weft_patterns::layout(&p.expr, &opts).is_err() {
                    continue;
                }
                let config = |bm: usize, bn: usize| {
                    schedule.apply(KernelConfig {
                        stages,
                        ..KernelConfig::for_blocks(bm, bn, d as u32, dtype).with_wgmma()
                    })
                };
                gpu.set_options(GpuOptions {
                    persistent_ctas: if dtype == DType::Bf16 && d == 128 { 3 } else { 1 },
                    ..gpu.options()
                });
                let case = FamilyCase { p: &p, opts, dtype, d, n, hq, hkv, seed };
                let label = match schedule {
                    Schedule::Plain => format!("wgmma stages={stages}"),
                    Schedule::Producer => format!("wgmma stages={stages} producer"),
                    Schedule::Persistent => format!("wgmma stages={stages} persistent"),
                };
                if let Err(what) = check_family(&gpu, &case, config, &label) {
                    failures.push(what);
                }
            }
        }
    }
    gpu.set_options(GpuOptions { persistent_ctas: 0, ..gpu.options() });
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// Runs `kernel` (generated for `config`) over `index` into outputs poisoned with NaN (in both
/// dtypes, so an unwritten element cannot pass) and compares them with `want`: relative error,
/// non-finite count, worst log-sum-exp error (see [`compare`]).
#[allow(clippy::too_many_arguments)]
fn run_and_compare(
    gpu: &Gpu,
    kernel: &weft_codegen::Kernel,
    config: &KernelConfig,
    index: &weft_runtime::DeviceIndex,
    shape: AttnShape,
    qkv: (&CudaSlice<u16>, &CudaSlice<u16>, &CudaSlice<u16>),
    dtype: DType,
    scale: f64,
    want: &Attention,
) -> (f64, usize, f64) {
    let s = gpu.stream();
    let mut out = s.clone_htod(&vec![0xffffu16; shape.hq * shape.nq * shape.head_dim]).unwrap();
    let mut lse = s.clone_htod(&vec![f32::NAN; shape.hq * shape.nq]).unwrap();
    gpu.attention(kernel, config, index, shape, qkv.0, qkv.1, qkv.2, &mut out, &mut lse, scale as f32).unwrap();
    s.synchronize().unwrap();
    let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
    compare(&got, &s.clone_dtoh(&lse).unwrap(), want)
}

/// Attention over a GPU-built `index` (mask ids numbered as in `masks`) against the reference
/// over the CPU builder's `want_ix`, on the bf16 inputs `x`: see [`run_and_compare`].
#[allow(clippy::too_many_arguments)]
fn compare_over_device_index(
    gpu: &Gpu,
    p: &Pattern,
    masks: &[weft_dsl::Pred],
    index: &weft_runtime::DeviceIndex,
    shape: AttnShape,
    qkv: (&CudaSlice<u16>, &CudaSlice<u16>, &CudaSlice<u16>),
    want_ix: &weft_patterns::SparseIndex,
    x: &Inputs,
    scale: f64,
) -> (f64, usize, f64) {
    let config = KernelConfig::for_blocks(index.block_m, index.block_n, shape.head_dim as u32, DType::Bf16);
    let kernel = emit(&KernelSpec { pattern: p, masks, permutation: None, config }).unwrap();
    let want = attention(want_ix, &x.q, &x.k, &x.v, scale).unwrap();
    run_and_compare(gpu, &kernel, &config, index, shape, qkv, DType::Bf16, scale, &want)
}

/// Prints one device-index case (`ok` or `FAIL`, then `line`, then the first index
/// difference if any) and records `case` as a failure when it is not ok.
fn report_case(ok: bool, line: String, diff: Option<&String>, failures: &mut Vec<String>, case: String) {
    println!("{} {line}", if ok { "ok  " } else { "FAIL" });
    if let Some(d) = diff {
        println!("     first difference: {d}");
    }
    if !ok {
        failures.push(case);
    }
}

/// The shapes of the device-index tests: (nq, nk, hq, hkv, d), none a multiple of a block,
/// GQA and not, both head dims, and a long key range.
const DEVICE_INDEX_SHAPES: [(usize, usize, usize, usize, usize); 4] =
    [(1000, 1000, 4, 2, 128), (333, 333, 2, 2, 64), (700, 1000, 4, 2, 128), (600, 8200, 4, 2, 128)];

/// What [`check_device_built`] found: whether all holds, the first index difference, the
/// build's report, and the attention's errors (see [`run_and_compare`]).
struct DeviceBuilt {
    ok: bool,
    diff: Option<String>,
    blocks: usize,
    report: weft_runtime::IndexBuildReport,
    rel: f64,
    nan: usize,
    lse_err: f64,
}

/// Uploads `x`, builds its index on the GPU with `build` (mask ids numbered as in `masks`),
/// compares it entry for entry with the CPU builder's `want_ix`, and runs attention over it
/// against the reference.
#[allow(clippy::too_many_arguments)]
fn check_device_built(
    gpu: &Gpu,
    p: &Pattern,
    x: &Inputs,
    shape: AttnShape,
    masks: &[weft_dsl::Pred],
    want_ix: &weft_patterns::SparseIndex,
    scale: f64,
    build: impl FnOnce(&CudaSlice<u16>, &CudaSlice<u16>) -> (weft_runtime::DeviceIndex, weft_runtime::IndexBuild),
) -> DeviceBuilt {
    let s = gpu.stream();
    let (qd, kd, vd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
    let (dix, build) = build(&qd, &kd);
    let report = build.finish(&dix).unwrap();
    let within = report.blocks <= report.capacity.0 && report.columns <= report.capacity.1;
    let mut got_ix = dix.to_host(gpu).unwrap();
    got_ix.masks = masks.to_vec();
    let diff = weft_codegen::plan::index_difference(&got_ix, want_ix);
    let (rel, nan, lse_err) = compare_over_device_index(gpu, p, masks, &dix, shape, (&qd, &kd, &vd), want_ix, x, scale);
    // The lists were allocated at the plan's bounds, before any count was known: the entries
    // must fit them.
    let diff = diff.or_else(|| (!within).then(|| format!("entries past the lists' capacity: {report:?}")));
    let ok = diff.is_none() && nan == 0 && rel < DType::Bf16.reference_tolerance() && lse_err < 2e-2;
    DeviceBuilt { ok, diff, blocks: got_ix.block_idx.len(), report, rel, nan, lse_err }
}

/// Relative L2 error of `got` against the reference, count of non-finite values, and the
/// worst log-sum-exp error (`-inf` rows must be `-inf`).
fn compare(got: &[f32], got_lse: &[f32], want: &Attention) -> (f64, usize, f64) {
    let (mut num, mut den, mut nan) = (0f64, 0f64, 0usize);
    for (g, w) in got.iter().zip(&want.out.data) {
        nan += usize::from(!g.is_finite());
        num += f64::from(g - w).powi(2);
        den += f64::from(*w).powi(2);
    }
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
    ((num / den.max(1e-30)).sqrt(), nan, lse_err)
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qb: Vec<u16>,
    kb: Vec<u16>,
    vb: Vec<u16>,
}

/// Makes key `to` of every K head a copy of key `from` (the bf16 words and the reference).
fn copy_key(x: &mut Inputs, from: usize, to: usize) {
    let (nk, d) = (x.k.tokens, x.k.dim);
    for h in 0..x.k.heads {
        let (a, b) = ((h * nk + from) * d, (h * nk + to) * d);
        x.kb.copy_within(a..a + d, b);
        x.k.data.copy_within(a..a + d, b);
    }
}

/// Key `c` one bf16 step larger in dimension `dim`, in both copies of K.
fn nudge_key(x: &mut Inputs, c: usize, dim: usize) {
    let (nk, d) = (x.k.tokens, x.k.dim);
    for h in 0..x.k.heads {
        let at = (h * nk + c) * d + dim;
        x.kb[at] += 1;
        x.k.data[at] = f32::from_bits(u32::from(x.kb[at]) << 16);
    }
}

fn inputs(hq: usize, hkv: usize, nq: usize, nk: usize, d: usize, dtype: DType, seed: u64) -> Inputs {
    let (q, k, v) =
        (Tensor::random(hq, nq, d, seed), Tensor::random(hkv, nk, d, seed + 1), Tensor::random(hkv, nk, d, seed + 2));
    let (qb, qr) = round(&q.data, dtype);
    let (kb, kr) = round(&k.data, dtype);
    let (vb, vr) = round(&v.data, dtype);
    Inputs {
        q: Tensor::new(hq, nq, d, qr).unwrap(),
        k: Tensor::new(hkv, nk, d, kr).unwrap(),
        v: Tensor::new(hkv, nk, d, vr).unwrap(),
        qb,
        kb,
        vb,
    }
}

#[test]
fn retrieval_decode_matches_the_cpu_reference() {
    let gpu = Gpu::open(0).expect("a GPU");
    let patterns = vec![
        Pattern::new("quest", retrieval().budget(top_k(16))),
        Pattern::new("retro", retrieval().unit(Unit::Cluster(32)).score(Score::Centroid).budget(top_p(0.9))),
        Pattern::new("paris", retrieval().unit(Unit::Token).score(Score::Quantized(4)).budget(top_k(200))),
        Pattern::new("quest_window", retrieval().budget(top_k(8)) | window(100)),
    ];
    let mut failures = Vec::new();
    let mut seed = 5000;
    for p in &patterns {
        for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64)] {
            // Decode (one query) and a short chunk of queries, GQA 4:2, keys not a multiple of 64.
            for (nq, nk, splits) in [(1usize, 3001usize, 0usize), (1, 700, 1), (3, 1000, 5)] {
                seed += 1;
                let (hq, hkv) = (4, 2);
                let x = inputs(hq, hkv, nq, nk, d, dtype, seed);
                let ix = build_index(&p.expr, &x.q, &x.k, &IndexOptions::default()).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let want = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
                let spec = DecodeSpec {
                    pattern: p,
                    masks: &ix.masks,
                    permutation: None,
                    block_n: ix.block_n as u32,
                    head_dim: d as u32,
                    dtype,
                };
                let kernel = emit_decode(&spec).unwrap();
                let merge = emit_merge(d as u32, dtype, Partial::F32).unwrap();
                let s = gpu.stream();
                let dix = gpu.upload_index(&ix).unwrap();
                let (qd, kd, vd) =
                    (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
                let mut out = s.clone_htod(&vec![0xffffu16; hq * nq * d]).unwrap();
                let mut lse = s.clone_htod(&vec![f32::NAN; hq * nq]).unwrap();
                let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
                gpu.decode(&kernel, &merge, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32, splits)
                    .unwrap();
                s.synchronize().unwrap();
                let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
                let (rel, nan, lse_err) = compare(&got, &s.clone_dtoh(&lse).unwrap(), &want);
                // A second call reuses the first's partials: the same output, bit for bit.
                let mut again = s.clone_htod(&vec![0xffffu16; hq * nq * d]).unwrap();
                gpu.decode(&kernel, &merge, &dix, shape, &qd, &kd, &vd, &mut again, &mut lse, scale as f32, splits)
                    .unwrap();
                let same = s.clone_dtoh(&again).unwrap() == s.clone_dtoh(&out).unwrap();
                let tol = dtype.reference_tolerance();
                let ok = nan == 0 && rel < tol && lse_err < 2e-2 && same;
                println!(
                    "{} decode {:<13} {:<5} d={:<3} nq={nq} nk={nk:<5} splits={splits} kept={:.3} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan} repeat_equal={same}",
                    if ok { "ok  " } else { "FAIL" }, p.name, dtype.name(), d, ix.density()
                );
                if !ok {
                    failures.push(format!("{} {} nq={nq} nk={nk}", p.name, dtype.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn ring_steps_merged_on_the_gpu_match_the_cpu_reference() {
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    for (layout, workers) in [(RingLayout::ZigZag, 4usize), (RingLayout::Contiguous, 3), (RingLayout::Striped(128), 2)]
    {
        for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64)] {
            let p = Pattern::new("ring", ring(workers as u32, layout, causal() & (window(400) | sink(8))));
            let (n, hq, hkv) = (1100usize, 4usize, 2usize);
            let x = inputs(hq, hkv, n, n, d, dtype, 7000 + workers as u64);
            let ix = build_index(&p.expr, &x.q, &x.k, &IndexOptions::default()).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let want = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
            let s = gpu.stream();
            let (qd, kd, vd) =
                (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
            let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
            let rows = hq * n;
            // One attention launch per ring step, each writing its partial output and lse.
            let mut parts = s.alloc_zeros::<u16>(workers * rows * d).unwrap();
            let mut lses = s.alloc_zeros::<f32>(workers * rows).unwrap();
            for step in 0..workers {
                let sx = ring::step_index(&ix, layout, workers, step).unwrap();
                let config = KernelConfig::for_blocks(sx.block_m, sx.block_n, d as u32, dtype);
                let kernel = emit(&KernelSpec { pattern: &p, masks: &sx.masks, permutation: None, config }).unwrap();
                let dix = gpu.upload_index(&sx).unwrap();
                let mut o = s.alloc_zeros::<u16>(rows * d).unwrap();
                let mut l = s.alloc_zeros::<f32>(rows).unwrap();
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut o, &mut l, scale as f32).unwrap();
                s.memcpy_dtod(&o, &mut parts.slice_mut(step * rows * d..(step + 1) * rows * d)).unwrap();
                s.memcpy_dtod(&l, &mut lses.slice_mut(step * rows..(step + 1) * rows)).unwrap();
            }
            let merge = emit_merge(d as u32, dtype, Partial::Dtype).unwrap();
            let mut out = s.clone_htod(&vec![0xffffu16; rows * d]).unwrap();
            let mut lse = s.clone_htod(&vec![f32::NAN; rows]).unwrap();
            gpu.merge(&merge, &parts, &lses, workers, rows, d, &mut out, &mut lse).unwrap();
            s.synchronize().unwrap();
            let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
            let (rel, nan, lse_err) = compare(&got, &s.clone_dtoh(&lse).unwrap(), &want);
            // Partials are rounded to the dtype before the merge: allow twice the rounding.
            let tol = match dtype {
                DType::Bf16 => 2e-2,
                DType::F16 => 3e-3,
            };
            let ok = nan == 0 && rel < tol && lse_err < 2e-2;
            println!(
                "{} ring {:?} x{workers} {:<5} d={:<3} n={n} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
                if ok { "ok  " } else { "FAIL" },
                layout,
                dtype.name(),
                d
            );
            if !ok {
                failures.push(format!("{layout:?} {workers} {}", dtype.name()));
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn packed_batch_matches_per_sequence_references() {
    use weft_patterns::BatchIndex;
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    // (queries, keys) per sequence: chunked prefill (fewer queries than keys), a single token,
    // lengths that are not multiples of the block.
    let seqs = [(300usize, 300usize), (1, 77), (200, 517), (1000, 1000)];
    let patterns = [
        Pattern::new("causal", causal()),
        Pattern::new("vertical_vector", sink(16) | local(64) | vertical_vector().keep(top_k(32))),
        Pattern::new("block_topk", causal() & block().keep(top_k(3))),
    ];
    for p in &patterns {
        for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64)] {
            let (hq, hkv) = (4usize, 2usize);
            // The plain kernel at the pattern's blocks; on sm_90 also the persistent producer
            // grid at 128 x 128 (patterns without gathered columns whose blocks allow it) on 3
            // CTAs, so that each CTA's rows run across the sequences.
            let large = IndexOptions { block_m: Some(128), block_n: Some(128), ..Default::default() };
            let mut variants = vec![(IndexOptions::default(), false)];
            if gpu.arch.sm == 90 && Schedule::Persistent.takes(p) && weft_patterns::layout(&p.expr, &large).is_ok() {
                variants.push((large, true));
            }
            for (opts, persistent) in variants {
                let xs: Vec<Inputs> = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, (nq, nk))| inputs(hq, hkv, *nq, *nk, d, dtype, 9000 + i as u64))
                    .collect();
                let ixs: Vec<_> = xs.iter().map(|x| build_index(&p.expr, &x.q, &x.k, &opts).unwrap()).collect();
                let batch = BatchIndex::concat(&ixs).unwrap();
                // Packed [heads, total, d] buffers.
                let pack = |get: &dyn Fn(&Inputs) -> (&Vec<u16>, usize), heads: usize| -> Vec<u16> {
                    let mut out = Vec::new();
                    for h in 0..heads {
                        for x in &xs {
                            let (data, n) = get(x);
                            out.extend_from_slice(&data[h * n * d..(h + 1) * n * d]);
                        }
                    }
                    out
                };
                let qp = pack(&|x| (&x.qb, x.q.tokens), hq);
                let kp = pack(&|x| (&x.kb, x.k.tokens), hkv);
                let vp = pack(&|x| (&x.vb, x.v.tokens), hkv);
                let (tq, tk) = (seqs.iter().map(|s| s.0).sum::<usize>(), seqs.iter().map(|s| s.1).sum::<usize>());
                let scale = 1.0 / (d as f64).sqrt();
                let plain = KernelConfig::for_blocks(batch.block_m, batch.block_n, d as u32, dtype);
                let config = if persistent { Schedule::Persistent.apply(plain.with_wgmma()) } else { plain };
                gpu.set_options(GpuOptions { persistent_ctas: if persistent { 3 } else { 0 }, ..gpu.options() });
                let kernel = emit(&KernelSpec { pattern: p, masks: &batch.masks, permutation: None, config }).unwrap();
                let s = gpu.stream();
                let dix = gpu.upload_batch(&batch).unwrap();
                let (qd, kd, vd) = (s.clone_htod(&qp).unwrap(), s.clone_htod(&kp).unwrap(), s.clone_htod(&vp).unwrap());
                let mut out = s.clone_htod(&vec![0xffffu16; hq * tq * d]).unwrap();
                let mut lse = s.clone_htod(&vec![f32::NAN; hq * tq]).unwrap();
                let shape = AttnShape { hq, hkv, nq: tq, nk: tk, head_dim: d };
                gpu.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32).unwrap();
                s.synchronize().unwrap();
                let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
                let got_lse = s.clone_dtoh(&lse).unwrap();
                let mut q0 = 0;
                for (i, (x, ix)) in xs.iter().zip(&ixs).enumerate() {
                    let nq = x.q.tokens;
                    let want = attention(ix, &x.q, &x.k, &x.v, scale).unwrap();
                    let mut g = Vec::new();
                    let mut gl = Vec::new();
                    for h in 0..hq {
                        g.extend_from_slice(&got[(h * tq + q0) * d..(h * tq + q0 + nq) * d]);
                        gl.extend_from_slice(&got_lse[h * tq + q0..h * tq + q0 + nq]);
                    }
                    let (rel, nan, lse_err) = compare(&g, &gl, &want);
                    let tol = dtype.reference_tolerance();
                    let ok = nan == 0 && rel < tol && lse_err < 2e-2;
                    println!(
                        "{} batch {:<16} {:<5} d={:<3} {} seq {i} ({nq} x {}) rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
                        if ok { "ok  " } else { "FAIL" }, p.name, dtype.name(), d, if persistent { "persistent" } else { "plain     " }, x.k.tokens
                    );
                    if !ok {
                        failures.push(format!("{} {} persistent={persistent} seq {i}", p.name, dtype.name()));
                    }
                    q0 += nq;
                }
            }
        }
    }
    gpu.set_options(GpuOptions { persistent_ctas: 0, ..gpu.options() });
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn kernels_load_from_the_database_without_nvrtc() {
    use weft_runtime::LoadSource;
    let dir = tempfile::tempdir().unwrap();
    let p = Pattern::new("window", causal() & window(300));
    let (hq, hkv, n, d, dtype) = (4usize, 2usize, 700usize, 128usize, DType::Bf16);
    let x = inputs(hq, hkv, n, n, d, dtype, 31337);
    let ix = build_index(&p.expr, &x.q, &x.k, &IndexOptions::default()).unwrap();
    let config = KernelConfig::for_blocks(ix.block_m, ix.block_n, d as u32, dtype);
    let kernel = emit(&KernelSpec { pattern: &p, masks: &ix.masks, permutation: None, config }).unwrap();

    // First process-like run: compiled and stored.
    let mut first = Gpu::open(0).unwrap();
    first.attach_db(weft_cache::Db::open(dir.path()).unwrap()).unwrap();
    let (_, src) = first.load_traced(&kernel).unwrap();
    assert_eq!(src, LoadSource::Compiled);
    let db = first.detach_db().unwrap();
    drop(first);

    // A fresh runtime (empty module cache): CUBIN from the database, timed.
    let mut second = Gpu::open(0).unwrap();
    second.attach_db(db).unwrap();
    let t = std::time::Instant::now();
    let (_, src) = second.load_traced(&kernel).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!("ok   kernel loaded from the database in {ms:.2} ms (no NVRTC)");
    assert_eq!(src, LoadSource::Database);
    assert!(ms < 5.0, "{ms} ms");

    // The stored kernel computes the right thing.
    let scale = 1.0 / (d as f64).sqrt();
    let want = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
    let s = second.stream();
    let dix = second.upload_index(&ix).unwrap();
    let (qd, kd, vd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
    let mut out = s.clone_htod(&vec![0xffffu16; hq * n * d]).unwrap();
    let mut lse = s.clone_htod(&vec![f32::NAN; hq * n]).unwrap();
    let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
    second.attention(&kernel, &config, &dix, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32).unwrap();
    s.synchronize().unwrap();
    let (rel, nan, lse_err) =
        compare(&to_f32(&s.clone_dtoh(&out).unwrap(), dtype), &s.clone_dtoh(&lse).unwrap(), &want);
    println!("ok   database kernel rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}");
    assert!(nan == 0 && rel < dtype.reference_tolerance() && lse_err < 2e-2);

    // An entry of another toolchain is never used: garbage stored under another driver.
    let db = second.detach_db().unwrap();
    let p2 = Pattern::new("window2", causal() & window(200));
    let ix2 = build_index(&p2.expr, &x.q, &x.k, &IndexOptions::default()).unwrap();
    let k2 = emit(&KernelSpec { pattern: &p2, masks: &ix2.masks, permutation: None, config }).unwrap();
    let mut other = second.toolchain().unwrap();
    other.driver_version += 10;
    let key = weft_cache::KernelKey { toolchain: other, kernel: k2.key.clone(), arch: second.arch.name() };
    let junk = weft_cache::KernelRecord {
        name: k2.name.clone(),
        cubin: vec![0; 64],
        ptx: String::new(),
        options: vec![],
        threads: 0,
        shared_bytes: 0,
        head_dim: 0,
        created: 0,
    };
    db.put_kernel(&key, &junk).unwrap();
    second.attach_db(db).unwrap();
    let (_, src) = second.load_traced(&k2).unwrap();
    assert_eq!(src, LoadSource::Compiled, "a stale entry must not be loaded");
    println!("ok   stale entry ignored, kernel compiled");
}

/// One layer, heads with different patterns: the runtime groups heads by kernel config (one
/// launch per group), uses a stored tuning record where there is one and the default config
/// elsewhere, and every head matches the CPU reference of its own pattern.
#[test]
fn a_layer_with_mixed_patterns_runs_grouped_and_matches_the_reference() {
    use weft_runtime::{tune_key, LayerPlan, Runtime};
    let dir = tempfile::tempdir().unwrap();
    let window = Pattern::new("window", causal() & window(300));
    let vv = Pattern::new("vv", sink(16) | local(64) | vertical_vector().keep(top_k(48)));
    let by_head =
        Pattern::new("by_head", causal() & pred(h().eq(lit(2)).or(k().lt(lit(64))).or(q().lt(k() + lit(40)))));
    let blocks32 = Pattern::new("blocks32", block().block_q(32).block_k(32).keep_where(q().ge(k())));
    let plan = LayerPlan::new(vec![window.clone(), vv.clone(), by_head, window.clone(), blocks32, vv]);
    let mut failures = Vec::new();
    for (dtype, d, n, tuned) in
        [(DType::Bf16, 128usize, 777usize, false), (DType::F16, 64, 1000, false), (DType::Bf16, 128, 777, true)]
    {
        let (hq, hkv) = (6usize, 3usize);
        let tuned_config = KernelConfig::for_blocks(128, 64, d as u32, dtype);
        if tuned {
            // A tuning record for `window` at this bucket, as `weft autotune` stores it.
            let gpu = Gpu::open(0).unwrap();
            let db = weft_cache::Db::open(dir.path()).unwrap();
            let key = tune_key(gpu.toolchain().unwrap(), &window, None, n, d as u32, dtype, hq / hkv);
            let record = weft_cache::TuneRecord {
                best: serde_json::to_value(tuned_config).unwrap(),
                best_ms: 1.0,
                default_ms: Some(1.0),
                timings: vec![],
                kernel: String::new(),
                created: 0,
            };
            db.put_tuning(&key, &record).unwrap();
        }
        let rt = Runtime::open(Some(dir.path())).unwrap();
        let x = inputs(hq, hkv, n, n, d, dtype, 4242 + n as u64);
        let s = rt.gpu.stream();
        let (qd, kd, vd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
        let mut out = s.clone_htod(&vec![0xffffu16; hq * n * d]).unwrap();
        let mut lse = s.clone_htod(&vec![f32::NAN; hq * n]).unwrap();
        let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
        let reports = rt.attention_layer(&plan, shape, dtype, &qd, &kd, &vd, &mut out, &mut lse, None).unwrap();
        s.synchronize().unwrap();

        // Launches: one per distinct config, covering every head once.
        let config_of = |h: usize| {
            if tuned && plan.patterns()[h].name == "window" {
                tuned_config
            } else {
                KernelConfig::default_for_arch(&plan.patterns()[h].expr, d as u32, dtype, rt.gpu.arch.sm).unwrap()
            }
        };
        // (In bf16 a dynamic pattern's heads launch on their own, their index built on the
        // GPU over just those heads.)
        let own = |h: usize| (dtype == DType::Bf16 && plan.patterns()[h].name == "vv").then_some("vv");
        let mut configs: Vec<(KernelConfig, Option<&str>)> = (0..hq).map(|h| (config_of(h), own(h))).collect();
        configs.sort();
        configs.dedup();
        let mut covered: Vec<usize> = reports.iter().flat_map(|r| r.heads.clone()).collect();
        covered.sort();
        let vv_on_gpu =
            reports.iter().filter(|r| r.patterns == ["vv"]).all(|r| r.index_on_gpu == (dtype == DType::Bf16));
        let grouped = reports.len() == configs.len()
            && covered == (0..hq).collect::<Vec<_>>()
            && reports.iter().all(|r| r.heads.iter().all(|&h| config_of(h) == r.config))
            && reports.iter().all(|r| r.tuned == (tuned && r.patterns == ["window"]))
            && vv_on_gpu;
        for r in &reports {
            println!(
                "     launch {} heads {:?} patterns {:?} tuned={} source={:?} index {:.1} ms",
                r.config, r.heads, r.patterns, r.tuned, r.source, r.index_ms
            );
        }

        // Each head against the CPU reference of its own pattern.
        let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
        let got_lse = s.clone_dtoh(&lse).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let mut worst = (0f64, 0usize, 0f64);
        for h in 0..hq {
            let c = config_of(h);
            let opts = IndexOptions {
                block_m: Some(c.block_m as usize),
                block_n: Some(c.block_n as usize),
                scale: Some(scale),
                ..Default::default()
            };
            let ix = build_index(&plan.patterns()[h].expr, &x.q, &x.k, &opts).unwrap();
            let want = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
            let one = Attention {
                out: Tensor::new(1, n, d, want.out.data[h * n * d..(h + 1) * n * d].to_vec()).unwrap(),
                lse: want.lse[h * n..(h + 1) * n].to_vec(),
            };
            let (rel, nan, lse_err) = compare(&got[h * n * d..(h + 1) * n * d], &got_lse[h * n..(h + 1) * n], &one);
            worst = (worst.0.max(rel), worst.1 + nan, worst.2.max(lse_err));
        }
        let ok = grouped && worst.1 == 0 && worst.0 < dtype.reference_tolerance() && worst.2 < 2e-2;
        println!(
            "{} layer {} d={d} n={n} tuned-record={tuned}: {} launches for {hq} heads, rel_err={:.2e} lse_err={:.2e} unwritten={}",
            if ok { "ok  " } else { "FAIL" }, dtype.name(), reports.len(), worst.0, worst.2, worst.1
        );
        if !ok {
            failures.push(format!("{} d={d} tuned={tuned} grouped={grouped}", dtype.name()));
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// A packed batch of sequences of different lengths (one cross-length) through one layer call:
/// every (sequence, head) matches the CPU reference of its pattern at that sequence's lengths.
#[test]
fn a_packed_varlen_layer_matches_each_sequence_reference() {
    use weft_runtime::{LayerPlan, Runtime};
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(Some(dir.path())).unwrap();
    let plan = LayerPlan::new(vec![
        Pattern::new("window", causal() & window(300)),
        Pattern::new("vv", causal() & (sink(16) | local(64) | vertical_vector().keep(top_k(48)))),
        Pattern::new("causal", causal()),
        Pattern::new("by_head", causal() & pred(h().eq(lit(3)).or(k().lt(lit(64))).or(q().lt(k() + lit(40))))),
    ]);
    let (hq, hkv) = (4usize, 2usize);
    let seqs = [(300usize, 300usize), (1000, 1000), (77, 77), (50, 413)];
    let (tq, tk): (usize, usize) = (seqs.iter().map(|s| s.0).sum(), seqs.iter().map(|s| s.1).sum());
    let mut failures = Vec::new();
    for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64)] {
        let xs: Vec<Inputs> =
            seqs.iter().enumerate().map(|(b, &(nq, nk))| inputs(hq, hkv, nq, nk, d, dtype, 777 + b as u64)).collect();
        // Packed [heads, total tokens, d]: each head's tokens, sequence after sequence.
        let pack = |heads: usize, part: &dyn Fn(&Inputs) -> (&[u16], usize)| {
            let mut out = Vec::new();
            for h in 0..heads {
                for x in &xs {
                    let (data, n) = part(x);
                    out.extend_from_slice(&data[h * n * d..(h + 1) * n * d]);
                }
            }
            out
        };
        let qp = pack(hq, &|x| (&x.qb, x.q.tokens));
        let kp = pack(hkv, &|x| (&x.kb, x.k.tokens));
        let vp = pack(hkv, &|x| (&x.vb, x.v.tokens));
        assert_eq!((qp.len(), kp.len()), (hq * tq * d, hkv * tk * d));
        let s = rt.gpu.stream();
        let (qd, kd, vd) = (s.clone_htod(&qp).unwrap(), s.clone_htod(&kp).unwrap(), s.clone_htod(&vp).unwrap());
        let mut out = s.clone_htod(&vec![0xffffu16; hq * tq * d]).unwrap();
        let mut lse = s.clone_htod(&vec![f32::NAN; hq * tq]).unwrap();
        let reports = rt
            .attention_layer_varlen(&plan, (hq, hkv), d, &seqs, dtype, &qd, &kd, &vd, &mut out, &mut lse, None)
            .unwrap();
        let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
        let got_lse = s.clone_dtoh(&lse).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let mut worst = (0f64, 0usize, 0f64);
        let mut q0 = 0;
        for (x, &(nq, _)) in xs.iter().zip(&seqs) {
            for h in 0..hq {
                let p = &plan.patterns()[h];
                let c = KernelConfig::default_for_arch(&p.expr, d as u32, dtype, rt.gpu.arch.sm).unwrap();
                let opts = IndexOptions {
                    block_m: Some(c.block_m as usize),
                    block_n: Some(c.block_n as usize),
                    scale: Some(scale),
                    ..Default::default()
                };
                let ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
                let want = attention(&ix, &x.q, &x.k, &x.v, scale).unwrap();
                let one = Attention {
                    out: Tensor::new(1, nq, d, want.out.data[h * nq * d..(h + 1) * nq * d].to_vec()).unwrap(),
                    lse: want.lse[h * nq..(h + 1) * nq].to_vec(),
                };
                let at = h * tq + q0;
                let (rel, nan, lse_err) = compare(&got[at * d..(at + nq) * d], &got_lse[at..at + nq], &one);
                worst = (worst.0.max(rel), worst.1 + nan, worst.2.max(lse_err));
            }
            q0 += nq;
        }
        let ok = worst.1 == 0 && worst.0 < dtype.reference_tolerance() && worst.2 < 2e-2;
        println!(
            "{} varlen {} d={d} seqs={seqs:?}: {} launches, rel_err={:.2e} lse_err={:.2e} unwritten={}",
            if ok { "ok  " } else { "FAIL" },
            dtype.name(),
            reports.len(),
            worst.0,
            worst.2,
            worst.1
        );
        if !ok {
            failures.push(dtype.name());
        }
    }
    // Bad batches are errors, not launches.
    let s = rt.gpu.stream();
    let (q, k) = (s.alloc_zeros::<u16>(hq * 10 * 64).unwrap(), s.alloc_zeros::<u16>(hkv * 10 * 64).unwrap());
    let (mut o, mut l) = (s.alloc_zeros::<u16>(hq * 10 * 64).unwrap(), s.alloc_zeros::<f32>(hq * 10).unwrap());
    for bad in [&[][..], &[(0usize, 5usize), (10, 5)][..], &[(5, 5), (6, 5)][..]] {
        let r = rt.attention_layer_varlen(&plan, (hq, hkv), 64, bad, DType::F16, &q, &k, &k, &mut o, &mut l, None);
        assert!(r.is_err(), "{bad:?} must be refused");
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn vertical_vector_indexes_built_on_the_gpu_match_the_cpu_builder() {
    use weft_codegen::plan::{index_difference, ColumnPlan};
    let gpu = Gpu::open(0).expect("a GPU");
    let vv = |q_block: u32, n: weft_dsl::Budget, sink: u32, local: u32| {
        vertical_vector().q_block(q_block).keep(n).sink(sink).local(local)
    };
    let mut failures = Vec::new();
    let mut seed = 9000u64;
    // Random logits are flat: threshold(0.5) keeps the keys within ln 2 of the best (a few
    // percent), top_p(0.95) most keys, top_p(0.3) about a quarter.
    for n in [top_k(37), top_k(300), threshold(0.5), top_p(0.3), top_p(0.95)] {
        let top_k = matches!(n, weft_dsl::Budget::TopK(_));
        let patterns = [
            Pattern::new("causal_vv", causal() & vv(64, n, 16, 64)),
            Pattern::new("vv128", vv(128, n, 0, 0)),
            Pattern::new("causal_vv_window", causal() & (vv(64, n, 4, 0) | window(100))),
        ];
        for p in &patterns {
            // 8200 keys: enough for the sampled threshold (the list strategy's fast path).
            for (nq, nk, hq, hkv, d) in DEVICE_INDEX_SHAPES {
                for ties in [false, true] {
                    seed += 1;
                    let mut x = inputs(hq, hkv, nq, nk, d, DType::Bf16, seed);
                    if ties {
                        // Every third key repeated: equal exact scores, so the lower key must win.
                        for c in (0..nk - 1).step_by(3) {
                            copy_key(&mut x, c, c + 1);
                        }
                    }
                    let scale = 1.0 / (d as f64).sqrt();
                    let opts = IndexOptions { scale: Some(scale), ..Default::default() };
                    let want_ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
                    let plan = ColumnPlan::new(&p.expr, hq, nq, nk, &opts).unwrap();
                    let s = gpu.stream();
                    let (qd, kd, vd) =
                        (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
                    let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
                    // Every strategy, and lists too short for their keys (the slow path), must
                    // give the CPU's index.
                    let mut diff = None;
                    let mut dix = None;
                    let mut columns = 0;
                    let mut slow = Vec::new();
                    // Lists of 16 keys (8 in shared memory) send most groups down the slow path;
                    // 1024 (512) reads some lists in place.
                    // Threshold and top_p score densely (lists are refused).
                    let strategies: &[VvStrategy] = if top_k {
                        &[
                            VvStrategy::Dense,
                            VvStrategy::List { capacity: Some(16) },
                            VvStrategy::List { capacity: Some(1024) },
                            VvStrategy::List { capacity: None },
                        ]
                    } else {
                        assert!(gpu
                            .build_vv_index_with(
                                &plan,
                                shape,
                                DType::Bf16,
                                &qd,
                                &kd,
                                VvStrategy::List { capacity: None }
                            )
                            .is_err());
                        &[VvStrategy::Dense, VvStrategy::Auto]
                    };
                    for &strategy in strategies {
                        let (ix, build) =
                            gpu.build_vv_index_with(&plan, shape, DType::Bf16, &qd, &kd, strategy).unwrap();
                        let report = build.finish(&ix).unwrap();
                        let mut got_ix = ix.to_host(&gpu).unwrap();
                        got_ix.masks = plan.skeleton.masks.clone();
                        if let Some(d) = index_difference(&got_ix, &want_ix) {
                            diff.get_or_insert(format!("{strategy:?}: {d}"));
                        }
                        // Entries within the lists' bounds; no group needed the exact ranking
                        // over all keys (these inputs have no runs of near-equal keys that
                        // long), and every bound held.
                        if report.columns > report.capacity.1 || report.exact_groups > 0 || report.bound_failed {
                            diff.get_or_insert(format!("{strategy:?}: {report:?}"));
                        }
                        columns = report.columns;
                        slow.push(report.slow_groups);
                        dix = Some(ix);
                    }
                    let dix = dix.unwrap();
                    // Attention over the GPU-built index against the reference over the CPU's.
                    let qkv = (&qd, &kd, &vd);
                    let masks = &plan.skeleton.masks;
                    let (rel, nan, lse_err) =
                        compare_over_device_index(&gpu, p, masks, &dix, shape, qkv, &want_ix, &x, scale);
                    let ok = diff.is_none() && nan == 0 && rel < DType::Bf16.reference_tolerance() && lse_err < 2e-2;
                    let line = format!(
                        "vv index {:<17} {n:<14} nq={nq:<4} nk={nk:<4} hq={hq} hkv={hkv} d={d:<3} ties={ties:<5} columns={} slow_groups={slow:?} same_index={} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
                        p.name, columns, diff.is_none()
                    );
                    let case = format!("{} {n} nq={nq} nk={nk} ties={ties}", p.name);
                    report_case(ok, line, diff.as_ref(), &mut failures, case);
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// Vertical-vector indexes in 128 x 128 blocks (the Hopper default's tiles for 128-row
/// vertical vectors): sink and local blocks of 128 keys with their masks, columns outside
/// them, the same as the CPU builder's at those blocks.
#[test]
fn vertical_vector_indexes_in_128_key_blocks_match_the_cpu_builder() {
    use weft_codegen::plan::ColumnPlan;
    let gpu = Gpu::open(0).expect("a GPU");
    let vv =
        |n: weft_dsl::Budget, sink: u32, local: u32| vertical_vector().q_block(128).keep(n).sink(sink).local(local);
    let patterns = [
        Pattern::new("vv128_sink_local", vv(top_k(37), 64, 64)),
        Pattern::new("causal_vv128", causal() & vv(top_k(300), 16, 100)),
        Pattern::new("vv128_top_p", vv(top_p(0.3), 0, 0)),
    ];
    let mut failures = Vec::new();
    let mut seed = 9700u64;
    for p in &patterns {
        for (nq, nk, hq, hkv, d) in DEVICE_INDEX_SHAPES {
            seed += 1;
            let x = inputs(hq, hkv, nq, nk, d, DType::Bf16, seed);
            let scale = 1.0 / (d as f64).sqrt();
            let opts =
                IndexOptions { block_m: Some(128), block_n: Some(128), scale: Some(scale), ..Default::default() };
            let want_ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
            let plan = ColumnPlan::new(&p.expr, hq, nq, nk, &opts).unwrap();
            let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
            let masks = &plan.skeleton.masks;
            let r = check_device_built(&gpu, p, &x, shape, masks, &want_ix, scale, |q, k| {
                gpu.build_vv_index(&plan, shape, DType::Bf16, q, k).unwrap()
            });
            let DeviceBuilt { ok, rel, nan, lse_err, .. } = r;
            let line = format!(
                "vv index 128x128 {:<17} nq={nq:<4} nk={nk:<4} hq={hq} hkv={hkv} d={d:<3} blocks={} columns={} same_index={} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
                p.name, r.blocks, r.report.columns, r.diff.is_none()
            );
            report_case(ok, line, r.diff.as_ref(), &mut failures, format!("{} nq={nq} nk={nk}", p.name));
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn vertical_vector_block_and_vertical_slash_layers_build_their_index_on_the_gpu() {
    use weft_runtime::Runtime;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(Some(dir.path())).unwrap();
    for p in [
        Pattern::new("causal_vv", causal() & vertical_vector().q_block(64).keep(top_k(100)).sink(16).local(64)),
        Pattern::new("causal_vv_p", causal() & vertical_vector().q_block(64).keep(top_p(0.2)).sink(16).local(64)),
        Pattern::new("vv_threshold", vertical_vector().q_block(128).keep(threshold(0.6)).sink(4)),
        Pattern::new("causal_block", causal() & block().block_q(64).block_k(64).keep(top_k(6))),
        Pattern::new("causal_vs", causal() & vertical_slash().vertical(top_k(200)).slash(top_k(12))),
        Pattern::new("causal_grid_cols", causal() & grid(300).lines(weft_dsl::GridLines::Cols).sink(8)),
        Pattern::new("causal_grid", causal() & grid(300).sink(8)),
    ] {
        layer_on_gpu_built_index(&rt, &p);
    }
}

/// Keys built to defeat the selection's bounds: every key equal (every score ties at the cut),
/// four distinct keys repeated (ties at several levels), or one key nudged by one bf16 step in
/// one dimension per key (distinct exact scores a few ulps apart, far inside the approximate
/// scores' error bound). More than 4096 keys of a group are too close to the cut to decide
/// quickly, so `select` ranks those groups exactly over all their keys on the device; the
/// index must be the CPU builder's.
#[test]
fn vertical_vector_groups_with_many_near_equal_keys_are_ranked_exactly_on_the_gpu() {
    use weft_codegen::plan::{index_difference, ColumnPlan};
    let gpu = Gpu::open(0).expect("a GPU");
    let (hq, hkv, nq, d) = (4usize, 2usize, 900usize, 128usize);
    let mut failures = Vec::new();
    for nk in [5000usize, 8200] {
        for keys in ["equal", "four", "nudged"] {
            let mut x = inputs(hq, hkv, nq, nk, d, DType::Bf16, 4242 + nk as u64);
            for c in 1..nk {
                match keys {
                    "equal" => copy_key(&mut x, 0, c),
                    "four" => copy_key(&mut x, c % 4, c),
                    _ => {
                        copy_key(&mut x, 0, c);
                        nudge_key(&mut x, c, (c * 7) % d);
                    }
                }
            }
            let s = gpu.stream();
            let (qd, kd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap());
            let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
            let scale = 1.0 / (d as f64).sqrt();
            let opts = IndexOptions { scale: Some(scale), ..Default::default() };
            for n in [top_k(100), top_k(3000), threshold(0.9), top_p(0.3)] {
                let p = Pattern::new("causal_vv", causal() & vertical_vector().q_block(64).keep(n).sink(16).local(64));
                let plan = ColumnPlan::new(&p.expr, hq, nq, nk, &opts).unwrap();
                let want_ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
                let (ix, build) = gpu.build_vv_index(&plan, shape, DType::Bf16, &qd, &kd).unwrap();
                let report = build.finish(&ix).unwrap();
                let mut got_ix = ix.to_host(&gpu).unwrap();
                got_ix.masks = plan.skeleton.masks.clone();
                let diff = index_difference(&got_ix, &want_ix);
                // With equal or nudged keys, top_k groups (over 4096 candidates) must take the
                // exact ranking; four distinct keys leave fewer unsure keys, and the budgets
                // may keep every key, which needs no ranking.
                let exact_expected = matches!(n, weft_dsl::Budget::TopK(_)) && keys != "four";
                let ok = diff.is_none()
                    && !report.bound_failed
                    && report.columns <= report.capacity.1
                    && (!exact_expected || report.exact_groups > 0);
                let line = format!(
                    "vv exact ranking keys={keys:<6} nk={nk} {n:<14} columns={} exact_groups={} slow_groups={} same_index={}",
                    report.columns,
                    report.exact_groups,
                    report.slow_groups,
                    diff.is_none()
                );
                report_case(ok, line, diff.as_ref(), &mut failures, format!("{keys} nk={nk} {n}"));
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// A layer the GPU builders do not take (fp16: they read bf16) builds the same index on the
/// host; and a softmax scale the kernels cannot use is an error, not NaN output.
#[test]
fn a_layer_whose_pattern_the_gpu_cannot_build_falls_back_to_the_host() {
    use weft_runtime::{LayerPlan, Runtime};
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::open(Some(dir.path())).unwrap();
    let p = Pattern::new("causal_vv", causal() & vertical_vector().q_block(64).keep(top_k(100)).sink(16).local(64));
    let (hq, hkv, nq, nk, d) = (4usize, 2usize, 900usize, 5000usize, 128usize);
    let x = inputs(hq, hkv, nq, nk, d, DType::F16, 4242);
    let s = rt.gpu.stream();
    let (qd, kd, vd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
    let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = s.clone_htod(&vec![0xffffu16; hq * nq * d]).unwrap();
    let mut lse = s.clone_htod(&vec![f32::NAN; hq * nq]).unwrap();
    let layer = LayerPlan::uniform(p.clone(), hq);
    let negative = rt.attention_layer(&layer, shape, DType::F16, &qd, &kd, &vd, &mut out, &mut lse, Some(-0.1));
    assert!(matches!(negative, Err(weft_runtime::Error::Usage(_))), "a negative scale is refused: {negative:?}");
    let reports = rt.attention_layer(&layer, shape, DType::F16, &qd, &kd, &vd, &mut out, &mut lse, None).unwrap();
    s.synchronize().unwrap();
    assert!(!reports[0].index_on_gpu, "built on the host: the GPU builders take bf16");
    let c = reports[0].config;
    let opts = IndexOptions {
        block_m: Some(c.block_m as usize),
        block_n: Some(c.block_n as usize),
        scale: Some(scale),
        ..Default::default()
    };
    let want = attention(&build_index(&p.expr, &x.q, &x.k, &opts).unwrap(), &x.q, &x.k, &x.v, scale).unwrap();
    let (rel, nan, lse_err) =
        compare(&to_f32(&s.clone_dtoh(&out).unwrap(), DType::F16), &s.clone_dtoh(&lse).unwrap(), &want);
    let ok = nan == 0 && rel < DType::F16.reference_tolerance() && lse_err < 2e-2;
    println!(
        "{} fp16 layer built its index on the host: rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
        if ok { "ok  " } else { "FAIL" }
    );
    assert!(ok);
}

fn layer_on_gpu_built_index(rt: &weft_runtime::Runtime, p: &Pattern) {
    use weft_runtime::LayerPlan;
    let (hq, hkv, nq, nk, d) = (4usize, 2usize, 900usize, 5000usize, 128usize);
    let x = inputs(hq, hkv, nq, nk, d, DType::Bf16, 777);
    let s = rt.gpu.stream();
    let (qd, kd, vd) = (s.clone_htod(&x.qb).unwrap(), s.clone_htod(&x.kb).unwrap(), s.clone_htod(&x.vb).unwrap());
    let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
    let plan = LayerPlan::uniform(p.clone(), hq);
    let mut results = Vec::new();
    for on_gpu in [true, false] {
        rt.set_gpu_index(on_gpu);
        let mut out = s.clone_htod(&vec![0xffffu16; hq * nq * d]).unwrap();
        let mut lse = s.clone_htod(&vec![f32::NAN; hq * nq]).unwrap();
        let reports = rt.attention_layer(&plan, shape, DType::Bf16, &qd, &kd, &vd, &mut out, &mut lse, None).unwrap();
        s.synchronize().unwrap();
        assert_eq!(reports.len(), 1, "one launch for one pattern");
        assert_eq!(reports[0].index_on_gpu, on_gpu, "index built where asked");
        results.push((to_f32(&s.clone_dtoh(&out).unwrap(), DType::Bf16), s.clone_dtoh(&lse).unwrap(), reports));
    }
    // The same index either way, so the same kernel computes the same output, bit for bit.
    let same = results[0].0.iter().zip(&results[1].0).all(|(a, b)| a.to_bits() == b.to_bits());
    let c = results[0].2[0].config;
    let scale = 1.0 / (d as f64).sqrt();
    let opts = IndexOptions {
        block_m: Some(c.block_m as usize),
        block_n: Some(c.block_n as usize),
        scale: Some(scale),
        ..Default::default()
    };
    let want = attention(&build_index(&p.expr, &x.q, &x.k, &opts).unwrap(), &x.q, &x.k, &x.v, scale).unwrap();
    let (rel, nan, lse_err) = compare(&results[0].0, &results[0].1, &want);
    let ok = same && nan == 0 && rel < DType::Bf16.reference_tolerance() && lse_err < 2e-2;
    println!(
        "{} layer {} on a GPU-built index: {c}, index {:.2} ms on the GPU vs {:.2} ms on the host, identical output={same} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
        if ok { "ok  " } else { "FAIL" },
        p.name,
        results[0].2[0].index_ms,
        results[1].2[0].index_ms
    );
    assert!(ok);
}

/// Builds `p`'s index on the GPU through a `SlashPlan` (vertical-slash or grid) and checks it
/// against the CPU builder's (same index, right attention over it); `what` and `keys` label
/// the printed line, `case` the failure.
#[allow(clippy::too_many_arguments)]
fn check_slash_plan(
    gpu: &Gpu,
    p: &Pattern,
    x: &Inputs,
    (nq, nk, hq, hkv, d): (usize, usize, usize, usize, usize),
    what: &str,
    keys: &str,
    case: String,
    failures: &mut Vec<String>,
) {
    use weft_codegen::plan::SlashPlan;
    let scale = 1.0 / (d as f64).sqrt();
    let opts = IndexOptions { scale: Some(scale), ..Default::default() };
    let want_ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
    let plan = SlashPlan::new(&p.expr, hq, nq, nk, &opts).unwrap();
    let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
    let r = check_device_built(gpu, p, x, shape, &plan.masks, &want_ix, scale, |q, k| {
        gpu.build_vs_index(&plan, shape, DType::Bf16, q, k).unwrap()
    });
    let DeviceBuilt { ok, rel, nan, lse_err, .. } = r;
    let line = format!(
        "{what} nq={nq:<4} nk={nk:<4} hq={hq} hkv={hkv} d={d:<3} {keys} blocks={} columns={} same_index={} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
        r.blocks, r.report.columns, r.diff.is_none()
    );
    report_case(ok, line, r.diff.as_ref(), failures, case);
}

#[test]
fn vertical_slash_indexes_built_on_the_gpu_match_the_cpu_builder() {
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    let mut seed = 9700u64;
    for (nv, ns) in [(30u32, 5u32), (300, 40)] {
        let vs = |b: u32, last: u32| vertical_slash().block(b).last_q(last).vertical(top_k(nv)).slash(top_k(ns));
        let patterns = [
            Pattern::new("causal_vs", causal() & vs(64, 64)),
            Pattern::new("sink_local_causal_vs", sink(4) | local(64) | (causal() & vs(64, 64))),
            Pattern::new("vs32_last100", weft_dsl::PatternExpr::from(vs(32, 100))),
        ];
        for p in &patterns {
            for (nq, nk, hq, hkv, d) in DEVICE_INDEX_SHAPES {
                for ties in [false, true] {
                    seed += 1;
                    let mut x = inputs(hq, hkv, nq, nk, d, DType::Bf16, seed);
                    if ties {
                        // Every other key repeats its left neighbour: equal logits, equal column
                        // masses, so the lower key must win.
                        for c in (1..nk).step_by(2) {
                            copy_key(&mut x, c - 1, c);
                        }
                    }
                    let what = format!("vs index {:<22} nv={nv:<3} ns={ns:<2}", p.name);
                    let case = format!("{} nv={nv} nq={nq} nk={nk} ties={ties}", p.name);
                    check_slash_plan(
                        &gpu,
                        p,
                        &x,
                        (nq, nk, hq, hkv, d),
                        &what,
                        &format!("ties={ties:<5}"),
                        case,
                        &mut failures,
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn grid_indexes_built_on_the_gpu_match_the_cpu_builder() {
    use weft_dsl::GridLines;
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    let mut seed = 9900u64;
    for stride in [37u32, 256, 1500] {
        let cols = || grid(stride).lines(GridLines::Cols);
        let patterns = [
            Pattern::new("causal_grid_cols", causal() & cols().sink(4)),
            Pattern::new("grid_cols", weft_dsl::PatternExpr::from(cols())),
            Pattern::new("local_causal_grid_cols", local(64) | (causal() & cols())),
            // A given phase: rows and columns, no estimate.
            Pattern::new("causal_fixed_grid", causal() & (sink(2) | grid(stride).phase(stride / 3))),
            // Row lines at the estimated phase: codes per offset in the query block.
            Pattern::new("causal_grid", causal() & grid(stride).sink(4)),
            Pattern::new("grid_rows", weft_dsl::PatternExpr::from(grid(stride).lines(GridLines::Rows))),
            Pattern::new("window_grid", window(300) & grid(stride)),
        ];
        for p in &patterns {
            for (nq, nk, hq, hkv, d) in DEVICE_INDEX_SHAPES {
                for uniform in [false, true] {
                    seed += 1;
                    let mut x = inputs(hq, hkv, nq, nk, d, DType::Bf16, seed);
                    if uniform {
                        // Every key of a head the same: positions holding as many keys have
                        // equal masses, so the lowest must win.
                        for c in 1..nk {
                            copy_key(&mut x, 0, c);
                        }
                    }
                    let what = format!("grid index {:<22} stride={stride:<4}", p.name);
                    let case = format!("{} stride={stride} nq={nq} nk={nk} uniform={uniform}", p.name);
                    let keys = format!("uniform={uniform:<5}");
                    check_slash_plan(&gpu, p, &x, (nq, nk, hq, hkv, d), &what, &keys, case, &mut failures);
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn block_indexes_built_on_the_gpu_match_the_cpu_builder() {
    use weft_codegen::plan::BlockPlan;
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    // top_k and threshold select by radix (block_top), top_p by sort (block_select).
    {
        let mut seed = 9500u64;
        for n in [3u32, 12] {
            let blk = |bq: u32, keep| block().block_q(bq).block_k(64).keep(keep);
            let patterns = [
                Pattern::new("causal_block", causal() & blk(64, top_k(n))),
                Pattern::new("block128", blk(128, top_k(n))),
                Pattern::new("causal_threshold_window", causal() & (blk(64, threshold(0.3)) | window(100))),
                Pattern::new("causal_top_p", causal() & blk(64, top_p(0.05 * f64::from(n)))),
            ];
            for p in &patterns {
                for (nq, nk, hq, hkv, d) in DEVICE_INDEX_SHAPES {
                    for ties in ["none", "pairs", "all"] {
                        seed += 1;
                        let mut x = inputs(hq, hkv, nq, nk, d, DType::Bf16, seed);
                        if ties == "all" {
                            // Every key of a head the same: every score ties, so the lowest
                            // blocks win, across 32-block words at nk = 8200 (the selectors
                            // carry the count of ties taken from word to word).
                            for c in 1..nk {
                                copy_key(&mut x, 0, c);
                            }
                        }
                        if ties == "pairs" {
                            // Odd key blocks repeat the even ones: equal pooled keys, equal scores,
                            // so the lower block must win.
                            for h in 0..hkv {
                                for b in (0..nk / 64).step_by(2).filter(|b| (b + 2) * 64 <= nk) {
                                    let (a, c) = ((h * nk + b * 64) * d, (h * nk + (b + 1) * 64) * d);
                                    x.kb.copy_within(a..a + 64 * d, c);
                                    x.k.data.copy_within(a..a + 64 * d, c);
                                }
                            }
                        }
                        let scale = 1.0 / (d as f64).sqrt();
                        let opts = IndexOptions { scale: Some(scale), ..Default::default() };
                        let want_ix = build_index(&p.expr, &x.q, &x.k, &opts).unwrap();
                        let plan = BlockPlan::new(&p.expr, hq, nq, nk, &opts).unwrap();
                        let shape = AttnShape { hq, hkv, nq, nk, head_dim: d };
                        // The selection without its shared-memory cache of keys on one tie mode
                        // (rows of more than 1536 key blocks take that path).
                        let cached = ties != "pairs";
                        gpu.set_options(GpuOptions {
                            block_top_cache: if cached { usize::MAX } else { 0 },
                            ..gpu.options()
                        });
                        let r = check_device_built(&gpu, p, &x, shape, &plan.masks, &want_ix, scale, |q, k| {
                            gpu.build_block_index(&plan, shape, DType::Bf16, q, k).unwrap()
                        });
                        gpu.set_options(GpuOptions { block_top_cache: usize::MAX, ..gpu.options() });
                        let DeviceBuilt { ok, rel, nan, lse_err, .. } = r;
                        let line = format!(
                        "block index {:<24} n={n:<2} nq={nq:<4} nk={nk:<4} hq={hq} hkv={hkv} d={d:<3} ties={ties:<5} cached={cached:<5} blocks={} same_index={} rel_err={rel:.2e} lse_err={lse_err:.2e} unwritten={nan}",
                        p.name, r.blocks, r.diff.is_none()
                    );
                        let case = format!("{} n={n} nq={nq} nk={nk} ties={ties}", p.name);
                        report_case(ok, line, r.diff.as_ref(), &mut failures, case);
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// The Hopper building blocks (`weft_codegen::emit_wgmma_probe`, sm_90a): S = Q K^T with both
/// operands read by wgmma from 128-byte swizzled shared memory, and O = bf16(S) V with P from
/// registers and V read transposed. The inputs are multiples of 1/4 in [-3/4, 3/4], so every
/// product and every sum below is exact in f32, on the tensor cores as on the CPU: the
/// comparison is exact, and a wrong descriptor, swizzle or fragment layout cannot hide in a
/// tolerance.
#[test]
fn wgmma_probe_matches_exact_products() {
    let gpu = Gpu::open(0).expect("a GPU");
    if gpu.arch.sm != 90 {
        println!("skipped: the wgmma probe needs sm_90, this GPU is {}", gpu.arch.name());
        return;
    }
    let keys = weft_codegen::WGMMA_PROBE_KEYS as usize;
    let s = gpu.stream();
    let mut failures = Vec::new();
    for (d, seed) in [(64usize, 11u64), (128, 12)] {
        let kernel = weft_codegen::emit_wgmma_probe(d as u32).unwrap();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state % 7) as f32 - 3.0) / 4.0
                })
                .collect()
        };
        let (q, k, v) = (values(64 * d), values(keys * d), values(keys * d));
        let bits = |x: &[f32]| x.iter().map(|f| (f.to_bits() >> 16) as u16).collect::<Vec<u16>>();
        let (qd, kd, vd) =
            (s.clone_htod(&bits(&q)).unwrap(), s.clone_htod(&bits(&k)).unwrap(), s.clone_htod(&bits(&v)).unwrap());
        let mut sd = s.clone_htod(&vec![f32::NAN; 64 * keys]).unwrap();
        let mut od = s.clone_htod(&vec![f32::NAN; 64 * d]).unwrap();
        gpu.wgmma_probe(&kernel, &qd, &kd, &vd, &mut sd, &mut od).unwrap();
        let (got_s, got_o) = (s.clone_dtoh(&sd).unwrap(), s.clone_dtoh(&od).unwrap());
        // The CPU's S, P = bf16(S) rounded to nearest even, and O.
        let bf16 = |x: f32| {
            let b = x.to_bits();
            f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
        };
        let want_s: Vec<f32> = (0..64 * keys)
            .map(|i| {
                (0..d).map(|c| f64::from(q[i / keys * d + c]) * f64::from(k[i % keys * d + c])).sum::<f64>() as f32
            })
            .collect();
        let want_o: Vec<f32> = (0..64 * d)
            .map(|i| {
                let (row, c) = (i / d, i % d);
                (0..keys).map(|j| f64::from(bf16(want_s[row * keys + j])) * f64::from(v[j * d + c])).sum::<f64>() as f32
            })
            .collect();
        let first_diff = |got: &[f32], want: &[f32], cols: usize| {
            got.iter()
                .zip(want)
                .position(|(g, w)| g != w)
                .map(|i| format!("row {} col {}: got {} want {}", i / cols, i % cols, got[i], want[i]))
        };
        let (ds, dout) = (first_diff(&got_s, &want_s, keys), first_diff(&got_o, &want_o, d));
        let ok = ds.is_none() && dout.is_none();
        println!(
            "{} wgmma probe d={d} keys={keys}: S {} O {}",
            if ok { "ok  " } else { "FAIL" },
            ds.as_deref().unwrap_or("exact"),
            dout.as_deref().unwrap_or("exact")
        );
        if !ok {
            failures.push(d);
        }
    }
    assert!(failures.is_empty(), "wgmma probe wrong at head dims {failures:?}");
}

/// Decode over a paged cache: a batch of ragged sequences (lengths not multiples of the page
/// size; one built by appends alone, one whose keys are all equal so that every page ties),
/// filled then appended to, decoded densely and with pages chosen on the device by Quest's
/// bound and by quantized keys (ParisKV; 1, 4 and 8 bits). The kept tokens must be the CPU
/// reference's (`weft_patterns::retrieval::kept_for_row`), every one, and the output attention
/// over them.
#[test]
fn paged_decode_matches_the_cpu_reference() {
    use weft_dsl::{Budget, Retrieval};
    use weft_patterns::retrieval::{kept_for_rows, units};
    use weft_runtime::{PagedOptions, PagedShape};
    let gpu = Gpu::open(0).expect("a GPU");
    let mut failures = Vec::new();
    let mut seed = 9100;
    let mut bits_cycle = [4u32, 1, 8].into_iter().cycle();
    let appends = 3usize;
    for (dtype, d) in [(DType::Bf16, 128usize), (DType::F16, 64)] {
        for (hq, hkv) in [(4usize, 4usize), (8, 2), (8, 1)] {
            for page_size in [16usize, 64] {
                seed += 10;
                let filled = [0usize, 774, 2998, 127, 500];
                let lens: Vec<usize> = filled.iter().map(|n| n + appends).collect();
                let batch = lens.len();
                let max_pages = lens.iter().max().unwrap().div_ceil(page_size) + 1;
                let shape = PagedShape { batch, hq, hkv, head_dim: d, page_size, max_pages, dtype };
                // Per sequence: K and V [hkv, len, d] rounded to the dtype; sequence 4's keys
                // are all one row (every page ties).
                let mut ks = Vec::new();
                let mut vs = Vec::new();
                for (b, &n) in lens.iter().enumerate() {
                    let mut k = Tensor::random(hkv, n, d, seed + 2 * b as u64);
                    if b == 4 {
                        let row: Vec<f32> = k.row(0, 0).to_vec();
                        for t in 0..hkv * n {
                            k.data[t * d..(t + 1) * d].copy_from_slice(&row);
                        }
                    }
                    let v = Tensor::random(hkv, n, d, seed + 2 * b as u64 + 1);
                    let (kb, kr) = round(&k.data, dtype);
                    let (vb, vr) = round(&v.data, dtype);
                    ks.push((kb, Tensor::new(hkv, n, d, kr).unwrap()));
                    vs.push((vb, Tensor::new(hkv, n, d, vr).unwrap()));
                }
                let qt = Tensor::random(batch * hq, 1, d, seed + 99);
                let (qb, qr) = round(&qt.data, dtype);
                let s = gpu.stream();
                let key_bits = bits_cycle.next().unwrap();
                let mut cache =
                    gpu.paged_cache_with_options(shape, PagedOptions { key_bits, ..PagedOptions::default() }).unwrap();
                // Fill the first tokens of each sequence, then append the rest one step at a time.
                for b in 0..batch {
                    let n = filled[b];
                    let take = |x: &[u16]| -> Vec<u16> {
                        (0..hkv).flat_map(|h| x[(h * lens[b]) * d..(h * lens[b] + n) * d].to_vec()).collect()
                    };
                    let (kd, vd) = (s.clone_htod(&take(&ks[b].0)).unwrap(), s.clone_htod(&take(&vs[b].0)).unwrap());
                    cache.fill(&gpu, b, &kd, &vd, n).unwrap();
                }
                for step in 0..appends {
                    let new = |x: &[(Vec<u16>, Tensor)]| -> Vec<u16> {
                        (0..batch)
                            .flat_map(|b| {
                                let (t, n) = (filled[b] + step, lens[b]);
                                (0..hkv).flat_map(move |h| x[b].0[(h * n + t) * d..(h * n + t + 1) * d].to_vec())
                            })
                            .collect()
                    };
                    let (kd, vd) = (s.clone_htod(&new(&ks)).unwrap(), s.clone_htod(&new(&vs)).unwrap());
                    cache.append(&gpu, &kd, &vd).unwrap();
                }
                assert_eq!(cache.lens(), &lens[..]);
                let qd = s.clone_htod(&qb).unwrap();
                // The device ranks pages by the f32 softmax scale it is given, widened.
                let scale = f64::from((1.0 / (d as f64).sqrt()) as f32);
                let quest = |budget| Retrieval {
                    unit: Unit::Page(page_size as u32),
                    score: Score::MinMax,
                    budget,
                    sink: 4,
                    recent: 40,
                    ..Retrieval::default()
                };
                let cases = [
                    None,
                    Some(quest(Budget::TopK(8))),
                    Some(quest(Budget::TopK(100_000))),
                    Some(quest(Budget::Threshold(0.5))),
                    Some(quest(Budget::TopP(0.3))),
                    Some(quest(Budget::TopP(1.0))),
                    Some(Retrieval { sink: 0, recent: 0, ..quest(Budget::TopK(3)) }),
                    Some(Retrieval { score: Score::Quantized(key_bits), ..quest(Budget::TopK(8)) }),
                    Some(Retrieval { score: Score::Quantized(key_bits), ..quest(Budget::TopP(0.3)) }),
                    Some(Retrieval { per: weft_dsl::Per::KvHead, ..quest(Budget::TopK(8)) }),
                    Some(Retrieval {
                        per: weft_dsl::Per::KvHead,
                        score: Score::Quantized(key_bits),
                        ..quest(Budget::Threshold(0.5))
                    }),
                ];
                for r in &cases {
                    for splits in [0usize, 3] {
                        let mut out = s.clone_htod(&vec![0xffffu16; batch * hq * d]).unwrap();
                        let mut lse = s.clone_htod(&vec![f32::NAN; batch * hq]).unwrap();
                        cache.decode_step(&gpu, &qd, &mut out, &mut lse, r.as_ref(), scale as f32, splits).unwrap();
                        let got = to_f32(&s.clone_dtoh(&out).unwrap(), dtype);
                        let got_lse = s.clone_dtoh(&lse).unwrap();
                        let kept_gpu = cache.last_kept(&gpu).unwrap();
                        assert_eq!(
                            kept_gpu.is_some(),
                            r.is_some(),
                            "the kept sets of a retrieval step, none of a dense one"
                        );
                        let (mut worst, mut worst_lse, mut unwritten, mut wrong_sets, mut kept_share) =
                            (0f64, 0f64, 0usize, 0usize, 0f64);
                        for b in 0..batch {
                            let q = Tensor::new(hq, 1, d, qr[b * hq * d..(b + 1) * hq * d].to_vec()).unwrap();
                            let (k, v) = (&ks[b].1, &vs[b].1);
                            let mut kept: Vec<Vec<u32>> = Vec::new();
                            for h in 0..hq {
                                let kv = h / (hq / hkv);
                                kept.push(match r {
                                    None => (0..lens[b] as u32).collect(),
                                    Some(r) => {
                                        let (u, c) = units(r, k, kv);
                                        // The heads that choose together: this one, or its KV head's.
                                        let g = hq / hkv;
                                        let heads =
                                            if r.per == weft_dsl::Per::KvHead { kv * g..kv * g + g } else { h..h + 1 };
                                        let rows: Vec<&[f32]> = heads.map(|x| q.row(x, 0)).collect();
                                        kept_for_rows(r, &rows, k, kv, &u, &c, lens[b], scale)
                                    }
                                });
                            }
                            if let Some(g) = &kept_gpu {
                                for h in 0..hq {
                                    wrong_sets += usize::from(g[b * hq + h] != kept[h]);
                                }
                            }
                            kept_share += kept.iter().map(|x| x.len()).sum::<usize>() as f64 / (hq * lens[b]) as f64;
                            let want = weft_patterns::dense_attention(
                                |h, _, t| kept[h].binary_search(&(t as u32)).is_ok(),
                                &q,
                                k,
                                v,
                                scale,
                            )
                            .unwrap();
                            let rows = b * hq..(b + 1) * hq;
                            let (rel, nan, lse_err) =
                                compare(&got[rows.start * d..rows.end * d], &got_lse[rows.clone()], &want);
                            worst = worst.max(rel);
                            worst_lse = worst_lse.max(lse_err);
                            unwritten += nan;
                        }
                        let tol = dtype.reference_tolerance();
                        let ok = unwritten == 0 && worst < tol && worst_lse < 2e-2 && wrong_sets == 0;
                        let name = match r {
                            None => "dense".to_string(),
                            Some(r) => {
                                format!("{:?} {:?} {:?} sink={} recent={}", r.per, r.score, r.budget, r.sink, r.recent)
                            }
                        };
                        println!(
                            "{} paged {:<30} {:<5} d={d:<3} hq={hq} hkv={hkv} page={page_size:<3} lens={lens:?} splits={splits} kept={:.3} wrong_sets={wrong_sets} rel_err={worst:.2e} lse_err={worst_lse:.2e} unwritten={unwritten}",
                            if ok { "ok  " } else { "FAIL" },
                            name,
                            dtype.name(),
                            kept_share / batch as f64,
                        );
                        if !ok {
                            failures.push(format!(
                                "{name} {} hq={hq} hkv={hkv} page={page_size} splits={splits}",
                                dtype.name()
                            ));
                        }
                    }
                }
            }
        }
    }
    // Bad input is an error, not a launch: a retrieval the device does not take, a full sequence.
    let shape = PagedShape { batch: 1, hq: 2, hkv: 1, head_dim: 64, page_size: 16, max_pages: 1, dtype: DType::Bf16 };
    let mut cache = gpu.paged_cache(shape).unwrap();
    let s = gpu.stream();
    let (q, mut out, mut lse) =
        (s.alloc_zeros::<u16>(128).unwrap(), s.alloc_zeros::<u16>(128).unwrap(), s.alloc_zeros::<f32>(2).unwrap());
    let clusters = Retrieval { unit: Unit::Cluster(32), score: Score::Centroid, ..Retrieval::default() };
    let e = cache.decode_step(&gpu, &q, &mut out, &mut lse, Some(&clusters), 0.1, 0).unwrap_err().to_string();
    assert!(e.contains("the cache's pages"), "{e}");
    let kv = s.alloc_zeros::<u16>(64).unwrap();
    for _ in 0..16 {
        cache.append(&gpu, &kv, &kv).unwrap();
    }
    let e = cache.append(&gpu, &kv, &kv).unwrap_err().to_string();
    assert!(e.contains("sequence 0 is full"), "{e}");
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// A paged cache in host memory decodes exactly as one in GPU memory (the same outputs, bit for
/// bit, and the same kept tokens), whatever its hot pages: none (every read over the bus), a
/// few (slots taken by other pages in the same step, read over the bus), and many (pages found
/// hot in later steps). Steps interleave retrieval, dense decode and appends, so an appended
/// token must reach a page's hot copy.
#[test]
fn paged_cache_in_host_memory_decodes_as_the_gpu_cache() {
    use weft_dsl::{Budget, Retrieval};
    use weft_runtime::PagedShape;
    let gpu = Gpu::open(0).expect("a GPU");
    let s = gpu.stream();
    let (d, hq, hkv, page_size) = (128usize, 8usize, 2usize, 16usize);
    let filled = [1000usize, 37, 515];
    let (batch, steps) = (filled.len(), 4usize);
    let max_pages = (filled.iter().max().unwrap() + steps).div_ceil(page_size);
    let shape = PagedShape { batch, hq, hkv, head_dim: d, page_size, max_pages, dtype: DType::Bf16 };
    let mut caches = vec![("gpu".to_string(), gpu.paged_cache(shape).unwrap())];
    for hot in [0usize, 7, 4096] {
        let c = gpu.paged_cache_in_host(shape, hot).unwrap();
        assert!(c.in_host());
        caches.push((format!("host, {hot} hot pages"), c));
    }
    assert!(!caches[0].1.in_host() && caches[0].1.hot_stats(&gpu).unwrap().is_none());
    let bf16 = |n: usize, seed: u64| round(&Tensor::random(1, n, 1, seed).data, DType::Bf16).0;
    for (b, &n) in filled.iter().enumerate() {
        let (k, v) = (
            s.clone_htod(&bf16(hkv * n * d, 7700 + b as u64)).unwrap(),
            s.clone_htod(&bf16(hkv * n * d, 7800 + b as u64)).unwrap(),
        );
        for (_, c) in &mut caches {
            c.fill(&gpu, b, &k, &v, n).unwrap();
        }
    }
    let quest = Retrieval {
        unit: Unit::Page(page_size as u32),
        score: Score::MinMax,
        budget: Budget::TopK(6),
        sink: 4,
        recent: 20,
        ..Retrieval::default()
    };
    let mut failures = Vec::new();
    for step in 0..steps {
        let q = s.clone_htod(&bf16(batch * hq * d, 7900 + step as u64)).unwrap();
        for r in [Some(&quest), None, Some(&quest)] {
            let mut results = Vec::new();
            for (name, c) in &mut caches {
                let mut out = s.clone_htod(&vec![0xffffu16; batch * hq * d]).unwrap();
                let mut lse = s.clone_htod(&vec![f32::NAN; batch * hq]).unwrap();
                c.decode_step(&gpu, &q, &mut out, &mut lse, r, 0.088, 0).unwrap();
                let kept = c.last_kept(&gpu).unwrap();
                results.push((name.clone(), s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap(), kept));
            }
            let (_, out0, lse0, kept0) = &results[0];
            for (name, out, lse, kept) in &results[1..] {
                let same =
                    out == out0 && lse.iter().zip(lse0).all(|(a, b)| a.to_bits() == b.to_bits()) && kept == kept0;
                let what = if r.is_some() { "quest top_k(6)" } else { "dense" };
                println!(
                    "{} paged {name}: step {step} {what}: {}",
                    if same { "ok  " } else { "FAIL" },
                    if same { "equal to the GPU cache's" } else { "differs" }
                );
                if !same {
                    failures.push(format!("{name} step {step} {what}"));
                }
            }
        }
        let k = s.clone_htod(&bf16(batch * hkv * d, 8000 + step as u64)).unwrap();
        let v = s.clone_htod(&bf16(batch * hkv * d, 8100 + step as u64)).unwrap();
        for (_, c) in &mut caches {
            c.append(&gpu, &k, &v).unwrap();
        }
    }
    let stats: Vec<_> = caches[1..].iter().map(|(_, c)| c.hot_stats(&gpu).unwrap().unwrap()).collect();
    println!("hot pages' counters (none, 7, 4096 slots): {stats:?}");
    // No slots: no lookups. Few: pages lose their slot to others. Many: later steps find pages hot.
    assert_eq!(stats[0], weft_runtime::HotStats::default());
    assert!(stats[1].conflicts > 0, "7 slots for dozens of kept pages: {:?}", stats[1]);
    assert!(stats[2].hits > 0 && stats[2].copied > 0, "{:?}", stats[2]);
    // Each step's second retrieval repeats its first's queries: about half the lookups hit.
    assert!(stats[2].hit_rate() > 0.4, "{:?}", stats[2]);
    assert!(failures.is_empty(), "failed: {failures:?}");
}
