//! A video-DiT pattern: sinks, a diagonal band and VecAttention's vertical vectors, checked
//! against dense masked attention on synthetic Q/K.

use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{attention, build_index, dense_attention, recall, IndexOptions, Tensor, Universe};
use weft::sparse_pattern;

#[sparse_pattern]
fn video() -> Pattern {
    sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = video();
    println!("{}: {}\nhash {}", pattern.name, pattern, pattern.hash());

    // Two heads: one looks at a few "anchor" tokens, one is unstructured.
    let n = 1024;
    let (q, k) = planted_qk(&[Plant::Vertical(vec![300, 301, 700]), Plant::Dense], n, 64, 8.0, 1);
    let v = Tensor::random(2, n, 64, 2);
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    let scale = 1.0 / 8.0;
    let r = recall(&index, &q, &k, scale, Universe::All, None)?;
    println!("density {:.1}%, recall {:.1}% (per head {:.1?})", 100.0 * index.density(), 100.0 * r.mean, r.per_head);

    let sparse = attention(&index, &q, &k, &v, scale)?;
    let dense = dense_attention(|h, i, j| index.contains_token(h, i, j), &q, &k, &v, scale)?;
    let err = sparse.out.data.iter().zip(&dense.out.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("max |sparse - dense masked| = {err:.1e}");
    assert!(err < 1e-5);
    assert!(r.per_head[0] > 0.9, "the anchor head should keep most of its mass");
    Ok(())
}
