//! MTraining's ring: a causal sliding-window pattern computed by 4 zig-zag ring workers, each
//! step a partial attention with log-sum-exp, merged exactly.

use weft::dsl::RingLayout;
use weft::patterns::{attention, build_index, ring, IndexOptions, Tensor};
use weft::sparse_pattern;

#[sparse_pattern]
fn ringed() -> Pattern {
    ring(workers = 4, layout = zigzag, causal & (window(300) | sink(4)))
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = ringed();
    let n = 777;
    // GQA: 4 query heads share 2 key/value heads.
    let (q, k, v) = (Tensor::random(4, n, 32, 1), Tensor::random(2, n, 32, 2), Tensor::random(2, n, 32, 3));
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    let one = attention(&index, &q, &k, &v, 0.18)?;
    let four = ring::ring_attention(&index, &q, &k, &v, 0.18, 4, RingLayout::ZigZag)?;
    let err = one.out.data.iter().zip(&four.out.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let lse_err = one.lse.iter().zip(&four.lse).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    for (w, tokens) in ring::worker_tokens(RingLayout::ZigZag, n, 4).iter().enumerate() {
        println!("worker {w}: {} tokens", tokens.len());
    }
    println!("{pattern}\nring of 4 vs one worker: max diff {err:.1e} (output), {lse_err:.1e} (log-sum-exp)");
    assert!(err < 1e-6 && lse_err < 1e-9);
    Ok(())
}
