//! `weft quickstart`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use weft::dsl::{self, Pattern};
use weft::patterns::{self as pat, Tensor};

use super::args::{InputArgs, KernelArgs, Synthetic, UniverseArg};
use super::compile::generate;
use super::explain::{analyse, make_input};

const QUICKSTART_PATTERN: &str = include_str!("../../examples/patterns/video.toml");

pub(crate) fn quickstart(out: &Path) -> Result<()> {
    println!("weft quickstart\n");
    println!("1. A pattern, written in weft's DSL (examples/patterns/video.toml):\n");
    for line in QUICKSTART_PATTERN.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        println!("     {line}");
    }
    let pattern = dsl::parse_pattern_file("examples/patterns/video.toml", QUICKSTART_PATTERN, "video")?;
    use dsl::builder::*;
    let built = Pattern::new("video", sink(64) | local(128) | vertical_vector().q_block(64).keep(top_k(64)));
    println!("\n   parsed and validated; content hash {}", pattern.hash());
    println!(
        "   the same pattern from the Rust builder hashes to {} ({})",
        built.hash().short(),
        if built.hash() == pattern.hash() { "identical" } else { "DIFFERENT" }
    );
    if built.hash() != pattern.hash() {
        bail!("the builder and the file disagree: this is a bug in weft");
    }

    println!("\n2. Its sparse index on synthetic Q/K with planted structure (4 heads, 1024 tokens, d = 64):\n");
    let args = InputArgs {
        seq: 1024,
        queries: None,
        heads: 4,
        kv_heads: Some(2),
        head_dim: 64,
        synthetic: Synthetic::Planted,
        seed: 7,
        qk: None,
        layer: None,
        block_m: None,
        block_n: None,
        universe: UniverseArg::All,
        recall_rows: 128,
    };
    let input = make_input(&args, &pattern)?;
    let r = analyse(&pattern, &input, &args)?;
    let (full, partial, cols) = r.index.entry_counts();
    println!("   built in {:.1} ms: {full} full blocks, {partial} partial blocks, {cols} columns", r.build_ms);
    println!(
        "   density {:.2}% of all pairs, recall {:.2}% of the softmax mass",
        100.0 * r.density,
        100.0 * r.recall.mean
    );

    println!("\n3. Reference attention over the index, checked against dense masked attention:\n");
    let v = Tensor::random(input.k.heads, input.k.tokens, 64, 11);
    let start = Instant::now();
    let sparse = pat::attention(&r.index, &input.q, &input.k, &v, r.scale)?;
    let sparse_ms = start.elapsed().as_secs_f64() * 1e3;
    let ix = &r.index;
    let dense = pat::dense_attention(|h, q, k| ix.contains_token(h, q, k), &input.q, &input.k, &v, r.scale)?;
    let diff = sparse.out.data.iter().zip(&dense.out.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("   sparse reference {sparse_ms:.0} ms; max |sparse - dense| = {diff:.2e}");
    if diff > 1e-5 {
        bail!("the sparse reference disagrees with dense masked attention: this is a bug in weft");
    }

    println!("\n4. Pictures of the block map:\n");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for head in 0..2 {
        let (w, h, rgb) = weft::viz::block_map(&r.index, head, 512);
        let path = out.join(format!("video_head{head}.png"));
        weft::viz::write_png(&path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        println!("   wrote {}", path.display());
    }
    println!("   legend: {}", weft::viz::LEGEND);

    println!("\n5. The CUDA kernel for it (weft emit examples/patterns/video.toml prints it all):\n");
    let kernel = generate(
        &pattern,
        &KernelArgs {
            head_dim: 128,
            dtype: "bf16".into(),
            seq: 1024,
            block_m: None,
            block_n: None,
            stages: 2,
            wgmma: false,
            producer: false,
            persistent: false,
        },
    )?;
    for line in kernel.source.lines().take(5) {
        println!("   {line}");
    }
    match weft::runtime::nvrtc::check_available() {
        Ok(()) => {
            let c = weft::runtime::nvrtc::compile_kernel(&kernel, weft::runtime::Arch::SM90)?;
            match &c.report {
                Some(r) => println!(
                    "   compiled with NVRTC for sm_90 in {:.0} ms: {} registers, {} bytes spilled",
                    c.millis,
                    r.registers,
                    r.spill_stores + r.spill_loads
                ),
                None => println!("   compiled with NVRTC for sm_90 in {:.0} ms", c.millis),
            }
        }
        Err(e) => println!("   (not compiled: {e})"),
    }

    println!("\n6. The kernel on the GPU (bf16, d = 64), against the reference attention:\n");
    match run_on_gpu(&pattern, &r.index, &input.q, &input.k, &v, r.scale) {
        Ok(line) => println!("   {line}"),
        Err(e) => println!("   not run: {e:#}"),
    }
    println!("\nNext steps:");
    println!("   - the GPU tests: scripts/gpu.sh builds them, scripts/gpu-run.sh runs them on a GPU machine");
    println!("   - tune it and store it: weft autotune examples/patterns/video.toml --seq 16384 --heads 32");
    println!("   - load stored kernels without a compiler: weft::Runtime::open(None) in Rust");
    println!("\nTry: weft patterns | weft explain vertical-slash --seq 8192 | weft compile grid --arch sm_80");
    Ok(())
}

/// Runs the pattern's kernel over `index` on GPU 0 (inputs rounded to bf16) and compares it
/// with the reference attention over the same rounded inputs; a line to print, or why it could
/// not run (no GPU, no driver) or what went wrong.
fn run_on_gpu(
    pattern: &Pattern,
    index: &pat::SparseIndex,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<String> {
    use weft::codegen::{DType, KernelConfig, KernelSpec};
    use weft::runtime::{timing, AttnShape, Gpu};
    let gpu = Gpu::open(0)?;
    let dtype = DType::Bf16;
    let d = q.dim;
    let config = KernelConfig::for_blocks(index.block_m, index.block_n, d as u32, dtype);
    let kernel =
        weft::codegen::emit(&KernelSpec { pattern, masks: &index.masks, permutation: index.permutation, config })?;
    let rounded = |t: &Tensor| -> Result<(Vec<u16>, Tensor)> {
        let words = dtype.encode(&t.data);
        Ok((words.clone(), Tensor::new(t.heads, t.tokens, t.dim, dtype.decode(&words))?))
    };
    let ((qw, qr), (kw, kr), (vw, vr)) = (rounded(q)?, rounded(k)?, rounded(v)?);
    let want = pat::attention(index, &qr, &kr, &vr, scale)?;
    let s = gpu.stream();
    let (qd, kd, vd) = (s.clone_htod(&qw)?, s.clone_htod(&kw)?, s.clone_htod(&vw)?);
    // Poisoned outputs: a row the kernel does not write shows as NaN.
    let mut out = s.clone_htod(&vec![0xffffu16; qw.len()])?;
    let mut lse = s.clone_htod(&vec![f32::NAN; q.heads * q.tokens])?;
    let device_index = gpu.upload_index(index)?;
    let shape = AttnShape { hq: q.heads, hkv: k.heads, nq: q.tokens, nk: k.tokens, head_dim: d };
    let times = timing::time_calls::<weft::runtime::Error>(
        s,
        3,
        20,
        |_| gpu.attention(&kernel, &config, &device_index, shape, &qd, &kd, &vd, &mut out, &mut lse, scale as f32),
        |_| false,
    )?;
    let got = dtype.decode(&s.clone_dtoh(&out)?);
    let (mut err, mut norm) = (0f64, 0f64);
    for (g, w) in got.iter().zip(&want.out.data) {
        err += f64::from(g - w).powi(2);
        norm += f64::from(*w).powi(2);
    }
    let rel = (err / norm.max(f64::MIN_POSITIVE)).sqrt();
    if !rel.is_finite() || rel > dtype.reference_tolerance() {
        bail!("the GPU's output differs from the reference: relative L2 error {rel:.2e} (this is a bug in weft)");
    }
    let ms = timing::median(&times).unwrap_or(f64::NAN);
    Ok(format!(
        "ran on {} ({}) in {ms:.3} ms (median of 20); relative L2 error against the reference {rel:.2e}",
        gpu.name,
        gpu.arch.name()
    ))
}
