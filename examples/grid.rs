//! A frame-major video grid (MMInference): 16 frames of 48 tokens; each query attends to the
//! same in-frame position of every frame (grid columns), the line rows, and 8 sink tokens.

use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{build_index, IndexOptions};
use weft::sparse_pattern;

#[sparse_pattern]
fn frames() -> Pattern {
    grid(stride = 48, lines = both, sink = 8)
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pattern = frames();
    let n = 16 * 48;
    let (q, k) = planted_qk(&[Plant::Grid { stride: 48, phase: 17 }], n, 64, 8.0, 5);
    let index = build_index(&pattern.expr, &q, &k, &IndexOptions::default())?;
    let (full, partial, columns) = index.entry_counts();
    println!(
        "{pattern}: {full} full blocks, {partial} partial blocks, {columns} columns, density {:.1}%",
        100.0 * index.density()
    );
    // The phase was recovered from the data: column 17 of every frame is kept for every query.
    for f in 0..16 {
        assert!(index.contains_token(0, 5, f * 48 + 17));
    }
    // Row lines: query 17 of a frame attends to every key.
    assert!((0..n).all(|j| index.contains_token(0, 48 + 17, j)));
    Ok(())
}
