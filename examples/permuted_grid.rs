//! MMInference's permutation: a stride permutation makes grid lines contiguous, so a plain
//! block pattern over the permuted order captures them. The permutation is virtual: the
//! index is in permuted positions and outputs land at each token's own row.

use weft::dsl::Permutation;
use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{attention, build_index, permute, IndexOptions, Tensor};
use weft::sparse_pattern;

#[sparse_pattern]
fn permuted_grid() -> Pattern {
    permuted(stride(32), block(block_q = 32, block_k = 32, keep = top_k(3)))
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = permuted_grid();
    let n = 32 * 20 + 7; // a last, partial frame
    let (q, k) = planted_qk(&[Plant::Grid { stride: 32, phase: 9 }], n, 32, 8.0, 9);
    let v = Tensor::random(1, n, 32, 10);
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    println!("{pattern}: density {:.1}%", 100.0 * index.density());

    // The same computation with the tensors permuted for real.
    let p = Permutation::Stride(32);
    let inner = match &pattern.expr {
        weft::dsl::PatternExpr::Permuted { inner, .. } => (**inner).clone(),
        _ => unreachable!("the pattern is permuted"),
    };
    let (pq, pk, pv) = (
        q.gather_tokens(|i| permute::inverse(p, i, n)),
        k.gather_tokens(|i| permute::inverse(p, i, n)),
        v.gather_tokens(|i| permute::inverse(p, i, n)),
    );
    let direct = attention(&build_index(&inner, &pq, &pk, &IndexOptions::default())?, &pq, &pk, &pv, 0.2)?;
    let virt = attention(&index, &q, &k, &v, 0.2)?;
    let mut err = 0f32;
    for t in 0..n {
        let i = permute::forward(p, t, n);
        for (a, b) in virt.out.row(0, t).iter().zip(direct.out.row(0, i)) {
            err = err.max((a - b).abs());
        }
    }
    println!("virtual vs copied permutation: max diff {err:.1e}");
    assert!(err < 1e-6);
    Ok(())
}
