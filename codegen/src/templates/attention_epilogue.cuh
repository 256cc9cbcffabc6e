// The attention kernel's epilogue: the output rows normalized and written at their tokens,
// with the natural-log log-sum-exp of each row (-inf for a row without keys, output 0).
#pragma once
#include "attention_shape.cuh"
#include "masks.cuh"

// Writes this thread's rows: `row0` is the index position of its first row; the sequence's
// first token is row `head_base + *seq_start` of O and LSE (head h of `[heads, total_q]`).
__device__ __forceinline__ void store_output(const float (&o)[MT][DT][4], const float (&m)[MT][2],
                                             const float (&l)[MT][2], int row0, int lane, int nq,
                                             u16* __restrict__ O, float* __restrict__ LSE, size_t head_base,
                                             const int* seq_start) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float sum = l[mt][i];
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            sum += __shfl_xor_sync(0xffffffff, sum, 2);
            const int qpos = row0 + mt * 16 + 8 * i;
            if (qpos < nq) {
                const int tok = weft_token(qpos, nq);
                const float inv = sum > 0.f ? 1.f / sum : 0.f;
                u16* dst = O + (head_base + *seq_start + tok) * D + (lane % 4) * 2;
#pragma unroll
                for (int dt = 0; dt < DT; ++dt)
                    *(u32*)(dst + dt * 8) = pack(o[mt][dt][2 * i] * inv, o[mt][dt][2 * i + 1] * inv);
                if (lane % 4 == 0)
                    LSE[head_base + *seq_start + tok] = sum > 0.f ? (m[mt][i] + log2f(sum)) * 0.69314718055994531f : neg_inf();
            }
        }
    }
}
