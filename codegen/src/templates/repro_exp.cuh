// weft_patterns::repro::exp operation for operation, and top_p's fixed-point weights
// (weft_patterns::select::top_p_weight): what GPU selections need to choose exactly as the CPU.
// LOG2E_BITS, LN2_HI_BITS, LN2_LO_BITS and EXP_COEF_BITS come from the config.
#pragma once
#include "config.cuh"

// ---- repro::exp, operation for operation (the _rn intrinsics are never contracted) ----
__device__ __forceinline__ double pow2i(long long n) { return __longlong_as_double((n + 1023) << 52); }
__device__ double repro_exp(double x) {
    if (x != x) return x;
    if (x < -746.0) return 0.0;
    if (x > 709.0) return __longlong_as_double(0x7ff0000000000000LL);
    const double n = round(__dmul_rn(x, __longlong_as_double(LOG2E_BITS)));
    const double r = __dsub_rn(__dsub_rn(x, __dmul_rn(n, __longlong_as_double(LN2_HI_BITS))),
                               __dmul_rn(n, __longlong_as_double(LN2_LO_BITS)));
    const long long coef[12] = {EXP_COEF_BITS};
    double p = __longlong_as_double(coef[0]);
#pragma unroll
    for (int i = 1; i < 12; ++i) p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double(coef[i]));
    const double er = __dadd_rn(1.0, __dadd_rn(r, __dmul_rn(__dmul_rn(r, r), p)));
    const long long ni = (long long)n;
    if (ni < -1000) return __dmul_rn(__dmul_rn(er, pow2i(ni + 200)), pow2i(-200));
    return __dmul_rn(er, pow2i(ni));
}

// weft_patterns::select::top_p_weight: floor(exp(x) * 2^31) for `below` rounded down to a
// multiple of 2^-20, 0 below -23 and for NaN (a weight that never decreases as `below` grows).
// Scaling by powers of two is exact, so both floors see exact values.
constexpr double TOP_P_ONE = 2147483648.0;
constexpr double TOP_P_STEPS = 1048576.0;
__device__ __forceinline__ unsigned long long top_p_weight(double below) {
    const double k = floor(__dmul_rn(below, TOP_P_STEPS));
    if (k != k || k < -23.0 * TOP_P_STEPS) return 0ull;
    return (unsigned long long)floor(__dmul_rn(repro_exp(__dmul_rn(k, 1.0 / TOP_P_STEPS)), TOP_P_ONE));
}
// The running sum top_p(p) must reach: p x total x (1 - 1e-12), as the CPU rounds it.
__device__ __forceinline__ double top_p_goal(double p, unsigned long long total) {
    return __dmul_rn(__dmul_rn(p, (double)total), 1.0 - 1e-12);
}

