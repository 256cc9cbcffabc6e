// The attention kernel's online softmax (f32, log2 domain): running row maxima and sums, and
// the rescaling of O when a maximum moves.
#pragma once
#include "attention_shape.cuh"

// Exponentiates this thread's scores of the tile in place (two rows per m-tile; a quad shares a
// row), updating the running maxima `m` (log2 units) and this thread's row-sum shares `l`;
// `alpha` gets each row's rescale factor. Returns whether any of this thread's maxima moved.
__device__ __forceinline__ bool online_softmax(float (&s)[MT][NT][4], float (&m)[MT][2], float (&l)[MT][2],
                                               float (&alpha)[MT][2], float scale_log2) {
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // Raw scores: the max commutes with the positive scale.
            float raw = neg_inf();
#pragma unroll
            for (int j = 0; j < NT; ++j) raw = fmaxf(raw, fmaxf(s[mt][j][2 * i], s[mt][j][2 * i + 1]));
            raw = fmaxf(raw, __shfl_xor_sync(0xffffffff, raw, 1));
            raw = fmaxf(raw, __shfl_xor_sync(0xffffffff, raw, 2));
            const float mx = fmaxf(m[mt][i], raw * scale_log2);
            const float base = mx == neg_inf() ? 0.f : mx;
            alpha[mt][i] = m[mt][i] == neg_inf() ? 0.f : exp2f(m[mt][i] - base);
            rescale |= m[mt][i] != mx;
            m[mt][i] = mx;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                // One FFMA and one EX2 per score.
                s[mt][j][2 * i] = exp2f(fmaf(s[mt][j][2 * i], scale_log2, -base));
                s[mt][j][2 * i + 1] = exp2f(fmaf(s[mt][j][2 * i + 1], scale_log2, -base));
                sum += s[mt][j][2 * i] + s[mt][j][2 * i + 1];
            }
            l[mt][i] = l[mt][i] * alpha[mt][i] + sum;
        }
    }
    return rescale;
}

// O *= alpha per row: called only when some row of the warp has a new maximum (after the first
// tiles the running max rarely moves, and this saves MT x DT x 4 multiplies per tile).
__device__ __forceinline__ void rescale_o(float (&o)[MT][DT][4], const float (&alpha)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[mt][dt][0] *= alpha[mt][0];
            o[mt][dt][1] *= alpha[mt][0];
            o[mt][dt][2] *= alpha[mt][1];
            o[mt][dt][3] *= alpha[mt][1];
        }
}
