//! A long-context text pattern: causal attention restricted to MInference's vertical-slash
//! estimate, with the recall it keeps of causal attention.

use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{build_index, recall, IndexOptions, Universe};
use weft::sparse_pattern;

#[sparse_pattern]
fn text() -> Pattern {
    causal & vertical_slash(vertical = top_k(64), slash = top_k(16), last_q = 64, block = 64)
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = text();
    println!("{}: {}", pattern.name, pattern);
    let n = 1000; // not a multiple of the block
    let (q, k) = planted_qk(&[Plant::Vertical(vec![0, 1, 2, 3, 500]), Plant::Diagonal(32)], n, 64, 8.0, 3);
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    let r = recall(&index, &q, &k, 0.125, Universe::Causal, None)?;
    println!("density {:.1}% of all pairs, recall of causal attention {:.1}%", 100.0 * index.density(), 100.0 * r.mean);
    // Causal: nothing in the future is ever computed.
    for t in (0..n).step_by(97) {
        for j in t + 1..n {
            assert!(!index.contains_token(0, t, j));
        }
    }
    assert!(r.mean > 0.8);
    Ok(())
}
