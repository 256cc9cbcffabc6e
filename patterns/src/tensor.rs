//! Host tensors in weft's layout: `[heads, tokens, dim]`, row-major, f32.

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::Error;

/// A `[heads, tokens, dim]` f32 tensor (Q, K, V or an attention output).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data`, checking that its length is `heads * tokens * dim`.
    pub fn new(heads: usize, tokens: usize, dim: usize, data: Vec<f32>) -> Result<Tensor, Error> {
        let expected = heads
            .checked_mul(tokens)
            .and_then(|x| x.checked_mul(dim))
            .ok_or_else(|| Error::Shape(format!("[{heads}, {tokens}, {dim}] overflows")))?;
        if data.len() != expected {
            return Err(Error::Shape(format!(
                "a [{heads}, {tokens}, {dim}] tensor needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { heads, tokens, dim, data })
    }

    /// A tensor of zeros.
    pub fn zeros(heads: usize, tokens: usize, dim: usize) -> Tensor {
        Tensor { heads, tokens, dim, data: vec![0.0; heads * tokens * dim] }
    }

    /// Standard-normal values from a seeded generator (reproducible).
    pub fn random(heads: usize, tokens: usize, dim: usize, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data = (0..heads * tokens * dim).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
        Tensor { heads, tokens, dim, data }
    }

    /// The `dim` values of one token of one head.
    pub fn row(&self, head: usize, token: usize) -> &[f32] {
        let start = (head * self.tokens + token) * self.dim;
        &self.data[start..start + self.dim]
    }

    /// Mutable access to one row.
    pub fn row_mut(&mut self, head: usize, token: usize) -> &mut [f32] {
        let start = (head * self.tokens + token) * self.dim;
        &mut self.data[start..start + self.dim]
    }

    /// A copy with the tokens reordered: row `i` of the result is row `from(i)` of `self`.
    pub fn gather_tokens(&self, from: impl Fn(usize) -> usize) -> Tensor {
        let mut out = Tensor::zeros(self.heads, self.tokens, self.dim);
        for h in 0..self.heads {
            for i in 0..self.tokens {
                out.row_mut(h, i).copy_from_slice(self.row(h, from(i)));
            }
        }
        out
    }

    /// Tokens `start..end` of every head (clamped to the tensor).
    pub fn slice_tokens(&self, start: usize, end: usize) -> Tensor {
        let end = end.min(self.tokens);
        let start = start.min(end);
        let mut data = Vec::with_capacity(self.heads * (end - start) * self.dim);
        for h in 0..self.heads {
            for t in start..end {
                data.extend_from_slice(self.row(h, t));
            }
        }
        Tensor { heads: self.heads, tokens: end - start, dim: self.dim, data }
    }

    /// Fails naming the tensor, head and token of the first NaN or infinity.
    pub fn check_finite(&self, name: &str) -> Result<(), Error> {
        match self.data.iter().position(|x| !x.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite {
                tensor: name.to_string(),
                head: i / (self.tokens * self.dim).max(1),
                token: (i / self.dim.max(1)) % self.tokens.max(1),
            }),
        }
    }
}

/// Dot product in f64 (four independent accumulators, so the compiler vectorizes it).
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..4 {
            acc[i] += f64::from(x[i]) * f64::from(y[i]);
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Checks Q `[hq, nq, d]` and K `[hkv, nk, d]` (and V `[hkv, nk, dv]` if given) for attention:
/// non-empty, same head dim, `hq` a multiple of `hkv` (GQA). Returns the GQA group size.
pub fn check_qkv(q: &Tensor, k: &Tensor, v: Option<&Tensor>) -> Result<usize, Error> {
    if q.heads == 0 || q.tokens == 0 || q.dim == 0 || k.heads == 0 || k.tokens == 0 {
        return Err(Error::Shape(format!(
            "empty input: q is [{}, {}, {}], k is [{}, {}, {}]; every dimension must be at least 1",
            q.heads, q.tokens, q.dim, k.heads, k.tokens, k.dim
        )));
    }
    if q.dim != k.dim {
        return Err(Error::Shape(format!("q has head dim {} but k has {}; they must match", q.dim, k.dim)));
    }
    if q.heads % k.heads != 0 {
        return Err(Error::Shape(format!(
            "q has {} heads and k has {}: the query heads must be a multiple of the key heads (GQA)",
            q.heads, k.heads
        )));
    }
    if let Some(v) = v {
        if v.heads != k.heads || v.tokens != k.tokens || v.dim == 0 {
            return Err(Error::Shape(format!(
                "v is [{}, {}, {}] but k is [{}, {}, _]: v needs k's heads and tokens",
                v.heads, v.tokens, v.dim, k.heads, k.tokens
            )));
        }
    }
    Ok(q.heads / k.heads)
}
