//! Token permutations by index arithmetic, never by table, so kernels can apply them while
//! loading rows instead of copying tensors.
//!
//! `stride(s)` takes frame-major tokens `t = f * s + p` (frame `f`, in-frame position `p`) to
//! position-major order: all tokens at position 0 first (frame by frame), then position 1, ...
//! With `n = F * s + r` tokens (`F` full frames, a last frame of `r` tokens), positions
//! `p < r` hold `F + 1` tokens and the others `F`, so
//!
//! ```text
//! forward(f * s + p) = p * F + min(p, r) + f
//! ```
//!
//! and the inverse splits at `r * (F + 1)`.

use weft_dsl::Permutation;

/// Where token `i` of an `n`-token axis goes.
pub fn forward(p: Permutation, i: usize, n: usize) -> usize {
    let Permutation::Stride(s) = p;
    let s = (s as usize).max(1);
    let (full, r) = (n / s, n % s);
    let (f, pos) = (i / s, i % s);
    pos * full + pos.min(r) + f
}

/// Which token lands at position `j` (the inverse of [`forward`]).
pub fn inverse(p: Permutation, j: usize, n: usize) -> usize {
    let Permutation::Stride(s) = p;
    let s = (s as usize).max(1);
    let (full, r) = (n / s, n % s);
    let split = r * (full + 1);
    let (pos, f) = if j < split {
        (j / (full + 1), j % (full + 1))
    } else {
        let j = j - split;
        // Reached only when `full > 0`: past the split every position holds `full` tokens.
        (r + j / full.max(1), j % full.max(1))
    };
    f * s + pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bijection_for_awkward_lengths() {
        for s in [1u32, 2, 3, 7, 16] {
            for n in [1usize, 2, 5, 16, 17, 33, 100] {
                let p = Permutation::Stride(s);
                let mut seen = vec![false; n];
                for i in 0..n {
                    let j = forward(p, i, n);
                    assert!(j < n, "s={s} n={n} i={i} -> {j}");
                    assert!(!seen[j]);
                    seen[j] = true;
                    assert_eq!(inverse(p, j, n), i, "s={s} n={n}");
                }
            }
        }
    }

    #[test]
    fn grid_lines_become_contiguous() {
        // Tokens at in-frame position 3 of 4 frames of 8 land next to each other.
        let p = Permutation::Stride(8);
        let lands: Vec<usize> = (0..4).map(|f| forward(p, f * 8 + 3, 32)).collect();
        assert_eq!(lands, vec![12, 13, 14, 15]);
    }
}
