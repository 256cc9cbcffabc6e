// Index builders: pooled query groups and key blocks (pool), key statistics (kstats).
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"

// ---- pool: grid (ceil(groups / POOL_GROUPS), heads), 128 threads ----
// The mean of each group's rows (q_block of them, fewer in the last group), per column: D / 8
// threads per group, each summing 8 columns with 16-byte loads (one load per element held
// the copy to about 3.3 TB/s), row by row in f64, then one division and a rounding to f32:
// the CPU builder's order. Also the bf16 hi and lo halves and the group's |pooled|_1 (a bound,
// rounded up).
constexpr int POOL_LANES = D / 8, POOL_GROUPS = 128 / POOL_LANES;
static_assert(POOL_LANES <= 32 && 32 % POOL_LANES == 0, "a group's lanes lie in one warp");
extern "C" __global__ void __launch_bounds__(POOL_THREADS) WEFT_ENTRY(pool)(POOL_PARAMS)
{

    const int g = blockIdx.x * POOL_GROUPS + threadIdx.x / POOL_LANES, h = blockIdx.y;
    const int lane = threadIdx.x % POOL_LANES, c0 = lane * 8;
    const bool ok = g < groups;
    const int q0 = g * q_block, q1 = ok ? min(q0 + q_block, nq) : q0;
    const u16* src = Q + (size_t)h * nq * D + c0;
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
#pragma unroll 8
    for (int t = q0; t < q1; ++t) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + (size_t)t * D);
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[2 * i] += (double)bf16_to_float((u16)(w[i] & 0xffffu));
            acc[2 * i + 1] += (double)bf16_to_float((u16)(w[i] >> 16));
        }
    }
    const double n = (double)max(q1 - q0, 1);
    float p[8];
    u16 hi[8], lo[8];
    double l1 = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        p[i] = (float)(acc[i] / n);
        hi[i] = float_to_bf16(p[i]);
        lo[i] = float_to_bf16(p[i] - bf16_to_float(hi[i]));
        l1 += fabs((double)p[i]);
    }
    auto pack = [](const u16* x) {
        return make_uint4(x[0] | (u32)x[1] << 16, x[2] | (u32)x[3] << 16, x[4] | (u32)x[5] << 16, x[6] | (u32)x[7] << 16);
    };
#pragma unroll
    for (int o = 1; o < POOL_LANES; o *= 2) l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    if (ok) {
        const size_t at = ((size_t)h * groups + g) * D + c0;
        reinterpret_cast<float4*>(pooled + at)[0] = make_float4(p[0], p[1], p[2], p[3]);
        reinterpret_cast<float4*>(pooled + at)[1] = make_float4(p[4], p[5], p[6], p[7]);
        *reinterpret_cast<uint4*>(pq_hi + at) = pack(hi);
        *reinterpret_cast<uint4*>(pq_lo + at) = pack(lo);
        if (lane == 0) pq_l1[(size_t)h * groups + g] = __double2float_ru(l1);
    }
}

// ---- kstats: grid (ceil(nk / 64), hkv), 256 threads: a warp per key, 8 keys per warp ----
// One atomic per CTA for the head's maximum: 64 keys share it (atomics on one address per
// key serialised and cost more than the reads).
extern "C" __global__ void __launch_bounds__(KSTATS_THREADS) WEFT_ENTRY(kstats)(KSTATS_PARAMS)
{

    __shared__ float wmax[8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = blockIdx.y;
    float block_max = 0.f;
    for (int i = 0; i < 8; ++i) {
        const int c = blockIdx.x * KSTATS_KEYS + i * 8 + warp;
        if (c >= nk) break;
        const u16* row = K + ((size_t)h * nk + c) * D;
        float m = 0.f;
        for (int d = lane; d < D; d += 32) m = fmaxf(m, fabsf(bf16_to_float(row[d])));
        for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        if (lane == 0) kinf[(size_t)h * nk + c] = m;
        block_max = fmaxf(block_max, m);
    }
    if (lane == 0) wmax[warp] = block_max;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = 0.f;
        for (int w = 0; w < 8; ++w) m = fmaxf(m, wmax[w]);
        atomicMax(kmax_bits + h, __float_as_uint(m));  // non-negative floats order as integers
    }
}
