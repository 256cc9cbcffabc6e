//! Synthetic Q/K with planted structure, so that a pattern's choice can be checked against a
//! known truth (and the quickstart has something real-looking to show).
//!
//! Every head starts from small Gaussian noise; a planted structure adds a strong component:
//! - `Vertical(cols)`: keys `cols` share a direction every query points to;
//! - `Diagonal(period)`: query `t` and key `s` share a one-hot code of `t mod period` and
//!   `s mod period`, so attention falls on the diagonals `t - s = 0 mod period`;
//! - `Grid { stride, phase }`: keys at `s mod stride == phase` share a code every query points
//!   to (vertical lines at the stride), and the queries at that phase are zero, so they attend
//!   uniformly to every key (horizontal lines): MMInference's grid;
//! - `Slashes(offsets)`: query `t` and the keys `t - o` share a random code, so attention falls
//!   on those diagonals;
//! - `Blocks { size }`: query block `i` (of `size` tokens) shares a code with one earlier key
//!   block `t(i) <= i`, chosen by a fixed hash, so attention falls on scattered blocks;
//! - `Dense`: noise only.

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::tensor::Tensor;

/// A structure planted in one head.
#[derive(Clone, Debug, PartialEq)]
pub enum Plant {
    Dense,
    Vertical(Vec<usize>),
    Diagonal(usize),
    Grid { stride: usize, phase: usize },
    Blocks { size: usize },
    Slashes(Vec<usize>),
}

/// The key block query block `i` is planted to attend to (`Plant::Blocks`): a fixed hash of
/// `i` into `0..=i`, never the diagonal block unless `i = 0`.
pub fn planted_block_target(i: usize) -> usize {
    if i == 0 {
        0
    } else {
        (i.wrapping_mul(2654435761) >> 7) % i
    }
}

/// Q `[plants.len(), tokens, dim]` and K with the same heads; head `h` carries `plants[h]`.
/// A planted match adds `strength` to the scaled logit (noise adds about 0.25): 8 is sharp.
pub fn planted_qk(plants: &[Plant], tokens: usize, dim: usize, strength: f32, seed: u64) -> (Tensor, Tensor) {
    let heads = plants.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut noise = |h: usize, n: usize| -> Tensor {
        let data = (0..h * n * dim).map(|_| 0.5 * rng.sample::<f32, _>(StandardNormal)).collect();
        Tensor { heads: h, tokens: n, dim, data }
    };
    let mut q = noise(heads, tokens);
    let mut k = noise(heads, tokens);
    // q . k gains unit^2 on a planted match, i.e. `strength` logits after the 1/sqrt(d) scale.
    let unit = (strength * (dim as f32).sqrt()).sqrt();
    for (h, plant) in plants.iter().enumerate() {
        match plant {
            Plant::Dense => {}
            Plant::Vertical(cols) => {
                for t in 0..tokens {
                    q.row_mut(h, t)[0] += unit;
                }
                for &c in cols.iter().filter(|c| **c < tokens) {
                    k.row_mut(h, c)[0] += unit;
                }
            }
            Plant::Diagonal(period) => {
                let p = (*period).clamp(1, dim);
                for t in 0..tokens {
                    q.row_mut(h, t)[t % p] += unit;
                    k.row_mut(h, t)[t % p] += unit;
                }
            }
            Plant::Slashes(offsets) => {
                // A random unit code per query position, shared with the keys `offsets` back.
                let mut code_rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed ^ h as u64);
                let codes: Vec<Vec<f32>> = (0..tokens)
                    .map(|_| {
                        let v: Vec<f32> = (0..dim).map(|_| code_rng.sample::<f32, _>(StandardNormal)).collect();
                        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                        v.into_iter().map(|x| x / norm).collect()
                    })
                    .collect();
                for (t, code) in codes.iter().enumerate() {
                    for (x, c) in q.row_mut(h, t).iter_mut().zip(code) {
                        *x += unit * c;
                    }
                    for &o in offsets.iter().filter(|o| **o <= t) {
                        for (x, c) in k.row_mut(h, t - o).iter_mut().zip(code) {
                            *x += unit * c;
                        }
                    }
                }
            }
            Plant::Blocks { size } => {
                let size = (*size).max(1);
                let nb = tokens.div_ceil(size);
                for i in 0..nb {
                    let code = i % dim;
                    let target = planted_block_target(i);
                    for t in i * size..((i + 1) * size).min(tokens) {
                        q.row_mut(h, t)[code] += unit;
                    }
                    for t in target * size..((target + 1) * size).min(tokens) {
                        k.row_mut(h, t)[code] += unit;
                    }
                }
            }
            Plant::Grid { stride, phase } => {
                let s = (*stride).max(1);
                for t in 0..tokens {
                    if t % s == phase % s {
                        q.row_mut(h, t).iter_mut().for_each(|x| *x = 0.0);
                        k.row_mut(h, t)[0] += unit;
                    } else {
                        q.row_mut(h, t)[0] += unit;
                    }
                }
            }
        }
    }
    (q, k)
}
