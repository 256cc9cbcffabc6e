//! Decode-time KV retrieval (Quest): one query token scores 16-token pages by their min/max
//! key bounds, keeps the best 8 pages plus 4 sink and 32 recent tokens.

use weft::patterns::{build_index, recall, reference, IndexOptions, Tensor, Universe};
use weft::sparse_pattern;

#[sparse_pattern]
fn quest() -> Pattern {
    retrieval(unit = page(16), score = min_max, keep = top_k(8), sink = 4, recent = 32)
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = quest();
    let (nk, heads) = (2000, 4);
    let q = Tensor::random(heads, 1, 64, 1);
    let mut k = Tensor::random(2, nk, 64, 2);
    // Plant a page the query needs: keys 1600..1616 align with every query head.
    for h in 0..2 {
        for t in 1600..1616 {
            for d in 0..64 {
                let x = q.row(2 * h, 0)[d] + q.row(2 * h + 1, 0)[d];
                k.row_mut(h, t)[d] += 0.8 * x;
            }
        }
    }
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    let kept = reference::kept_keys(&index, 0, 0);
    let r = recall(&index, &q, &k, 0.125, Universe::Causal, None)?;
    println!("{pattern}: keeps {} of {nk} keys, recall {:.1}%", kept.len(), 100.0 * r.mean);
    assert!(kept.len() <= 4 + 32 + 8 * 16);
    assert!((1600..1616).all(|t| kept.contains(&t)), "the planted page must be retrieved");
    Ok(())
}
