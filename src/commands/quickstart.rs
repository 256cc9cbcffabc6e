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
    println!("\nNext steps need an NVIDIA GPU:");
    println!("   - run the kernel: scripts/gpu.sh builds the GPU tests, scripts/gpu-run.sh runs them there");
    println!("   - tune it and store it: weft autotune examples/patterns/video.toml --seq 16384 --heads 32");
    println!("   - load stored kernels without a compiler: weft::Runtime::open(None) in Rust");
    println!("\nTry: weft patterns | weft explain vertical-slash --seq 8192 | weft compile grid --arch sm_80");
    Ok(())
}
