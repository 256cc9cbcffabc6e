//! Synthetic Q/K with planted structure, so that a pattern's choice can be checked against a
//! known truth (and the quickstart has something real-looking to show).
//!
//! Every head starts from small Gaussian noise; a planted structure adds a strong component:
//! - `Vertical(cols)`: keys `cols` share a direction every query points to;
//! - `Diagonal(period)`: query `t` and key `s` share a one-hot code of `t mod period` and
//!   `s mod period`, so attention falls on the diagonals `t - s = 0 mod period`;
//! - `Grid(stride)`: key `s` carries the code of `s mod stride` and every query the code of
//!   one phase, giving vertical lines at that stride;
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
            Plant::Grid { stride, phase } => {
                let s = (*stride).clamp(1, dim);
                for t in 0..tokens {
                    q.row_mut(h, t)[phase % s] += unit;
                    k.row_mut(h, t)[t % s] += unit;
                }
            }
        }
    }
    (q, k)
}
