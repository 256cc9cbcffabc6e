//! Arithmetic that the GPU index builders reproduce bit for bit.
//!
//! A dynamic selection ranks candidates, so a GPU builder that must choose exactly what the CPU
//! builder chooses has to compute the same numbers, not merely close ones. IEEE additions and
//! multiplications are reproducible; library functions (`exp`) and summation orders are not.
//! The estimates of vertical-slash and grid therefore use:
//! - [`exp`]: `e^x` from IEEE operations only (a Cody-Waite reduction and a Taylor polynomial,
//!   no fused multiply-add), which the CUDA template writes with `__dmul_rn` / `__dadd_rn`;
//! - [`chunked_sum`]: sums in chunks of [`SUM_CHUNK`] keys, each chunk left to right, then the
//!   chunks left to right, so the GPU sums every chunk in its own thread;
//! - [`dot`]: one f64 accumulator, dimensions in order (a thread then holds one accumulator
//!   per dot, and a tile of many dots keeps the GPU's f64 units busy);
//! - probabilities as `weight * (1 / total)`: one division per row, not per pair.
//!
//! Accuracy is a few ulp, far below what an estimate needs; determinism is the point.

/// Keys per partial sum of [`chunked_sum`].
pub const SUM_CHUNK: usize = 256;

/// log2(e), the reduction's multiplier.
pub const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^21 (its low 21 bits are zero).
pub const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 - LN2_HI, to full precision (fdlibm's constant).
pub const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// Taylor coefficients 1/j! for j = 13 down to 2 (Horner order).
pub const EXP_COEF: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// `2^n` for `-1022 <= n <= 1023`.
fn pow2(n: i64) -> f64 {
    f64::from_bits(((n + 1023) as u64) << 52)
}

/// `e^x`, reproducible on the GPU (see the module docs). 0 below -746 (and for -inf), +inf
/// above 709.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < -746.0 {
        return 0.0;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    // x = n ln 2 + r with |r| <= ln 2 / 2 (a little more from rounding).
    let n = (x * LOG2E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_COEF[0];
    for c in &EXP_COEF[1..] {
        p = p * r + c;
    }
    // e^r = 1 + r + r^2 p(r).
    let er = 1.0 + (r + (r * r) * p);
    let n = n as i64;
    if n < -1000 {
        // The result is (nearly) subnormal: scale in two steps so 2^n stays representable.
        er * pow2(n + 200) * pow2(-200)
    } else {
        er * pow2(n)
    }
}

/// The dot product of two f32 vectors in f64: one accumulator, left to right (each product is
/// exact in f64, so a fused multiply-add gives the same sums).
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = 0.0;
    for (x, y) in a.iter().zip(b) {
        acc += f64::from(*x) * f64::from(*y);
    }
    acc
}

/// [`dot`] of `a` with each of `N` vectors, computed together: the same sums, but `N`
/// independent chains keep the CPU's pipeline full.
pub fn dots<const N: usize>(a: &[f32], bs: [&[f32]; N]) -> [f64; N] {
    let mut acc = [0.0; N];
    for (d, x) in a.iter().enumerate() {
        let x = f64::from(*x);
        for (acc, b) in acc.iter_mut().zip(&bs) {
            *acc += x * f64::from(b[d]);
        }
    }
    acc
}

/// The sum of `values` in chunks of [`SUM_CHUNK`] (chunk `c` holds `values[c * SUM_CHUNK..]`),
/// each summed left to right from 0, then the chunk sums left to right from 0.
pub fn chunked_sum(values: &[f64]) -> f64 {
    let mut total = 0.0;
    for chunk in values.chunks(SUM_CHUNK) {
        let mut part = 0.0;
        for v in chunk {
            part += v;
        }
        total += part;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library() {
        for i in -7460..7090 {
            let x = i as f64 * 0.1 + 0.0123;
            let (ours, lib) = (exp(x), x.exp());
            if lib > f64::MIN_POSITIVE {
                assert!(((ours - lib) / lib).abs() < 4.0 * f64::EPSILON, "exp({x}) = {ours}, library {lib}");
            } else {
                // Subnormal results: within a few of their absolute spacing.
                assert!((ours - lib).abs() <= 4.0 * 4.9e-324 + lib * 4.0 * f64::EPSILON, "exp({x})");
            }
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(-800.0), 0.0);
        assert_eq!(exp(800.0), f64::INFINITY);
    }

    proptest! {
        #[test]
        fn exp_is_monotone_and_close(x in -745.0f64..709.0, dx in 0.0f64..1e-9) {
            let (a, b) = (exp(x), exp(x + dx));
            prop_assert!(a <= b * (1.0 + 8.0 * f64::EPSILON));
            let lib = x.exp();
            if lib > f64::MIN_POSITIVE {
                prop_assert!(((a - lib) / lib).abs() < 4.0 * f64::EPSILON);
            }
        }

        #[test]
        fn dots_together_are_dots(a in proptest::collection::vec(-2.0f32..2.0, 1..40), seed in 0u32..1000) {
            let bs: Vec<Vec<f32>> = (0..4).map(|j| a.iter().map(|x| x * (j as f32 + 0.5) - seed as f32 * 1e-3).collect()).collect();
            let got = dots(&a, [&bs[0][..], &bs[1], &bs[2], &bs[3]]);
            for j in 0..4 {
                prop_assert_eq!(got[j].to_bits(), dot(&a, &bs[j]).to_bits());
            }
        }

        #[test]
        fn chunked_sums_are_sums(v in proptest::collection::vec(0.0f64..1.0, 0..2000)) {
            let plain: f64 = v.iter().sum();
            prop_assert!((chunked_sum(&v) - plain).abs() <= 1e-12 * (1.0 + plain));
        }
    }
}
