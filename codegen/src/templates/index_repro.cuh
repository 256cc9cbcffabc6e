// Index builders: the CPU builder's arithmetic (weft_patterns::repro) operation for operation,
// and the orderings the selections use.
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"

// A SIMT f32 approximate score (the slow path's): well inside the tensor-core bound.
__device__ __forceinline__ float approx_dot(const float* pq, const u16* row) {
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc = fmaf(pq[d], bf16_to_float(row[d]), acc);
    return acc;
}

// The CPU builder's dot (`weft_patterns::repro::dot`): one f64 accumulator, dimensions in
// order. Products of a float and a bf16 are exact in f64, so fma gives the CPU's sums.
// `b` is a row of K (16-byte aligned: D is a multiple of 8 and rows start at multiples of D).
// It is read 16 dimensions at a time with 16-byte loads, the next 16 loaded while these are
// summed: one thread scores a key alone, and per-element loads left it waiting on memory
// D / 8 times per key. The sum is the same fma chain, dimensions in order. (Two loads per
// step, not more: `select` must stay within 64 registers, so that two of its 512-thread CTAs
// fit an SM; four took it to 80.)
constexpr int DOT_BATCH = 2;  // 16-byte loads (8 dimensions each) per step
static_assert(D % (8 * DOT_BATCH) == 0, "repro_dot reads 8 x DOT_BATCH dimensions per step");
__device__ __forceinline__ double repro_dot(const float* a, const u16* b) {
    const uint4* row = reinterpret_cast<const uint4*>(b);
    double acc = 0.0;
    uint4 cur[DOT_BATCH], next[DOT_BATCH];
#pragma unroll
    for (int j = 0; j < DOT_BATCH; ++j) cur[j] = __ldg(row + j);
#pragma unroll 1
    for (int step = 0; step < D / (8 * DOT_BATCH); ++step) {
        const bool more = step + 1 < D / (8 * DOT_BATCH);
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) next[j] = more ? __ldg(row + (step + 1) * DOT_BATCH + j) : cur[j];
        const float* as = a + step * 8 * DOT_BATCH;
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) {
            const u32 w[4] = {cur[j].x, cur[j].y, cur[j].z, cur[j].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // The lower address holds the lower dimension (little endian).
                acc = fma((double)as[8 * j + 2 * e], (double)__uint_as_float(w[e] << 16), acc);
                acc = fma((double)as[8 * j + 2 * e + 1], (double)__uint_as_float(w[e] & 0xffff0000u), acc);
            }
        }
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) cur[j] = next[j];
    }
    return acc;
}

#include "repro_exp.cuh"  // repro::exp and top_p's fixed-point weights

// The smallest power of two at least n (1 for 0).
__device__ __forceinline__ u32 pow2_at_least(u32 n) {
    u32 p = 1;
    while (p < n) p *= 2;
    return p;
}

// Sorts the first n (score, id) pairs best first (higher score, then the lower id), padding
// to n2 entries (a power of two, at least n) with (-inf, max id): a bitonic sort in shared
// memory.
// Every thread of the CTA calls it.
__device__ void sort_best_first(double* score, u32* id, u32 n, u32 n2) {
    for (u32 i = n + threadIdx.x; i < n2; i += blockDim.x) {
        score[i] = __longlong_as_double(0xfff0000000000000LL);  // -inf
        id[i] = 0xffffffffu;
    }
    __syncthreads();
    for (u32 size = 2; size <= n2; size *= 2) {
        for (u32 stride = size / 2; stride > 0; stride /= 2) {
            for (u32 i = threadIdx.x; i < n2; i += blockDim.x) {
                const u32 j = i ^ stride;
                if (j > i) {
                    const bool first_before = score[i] > score[j] || (score[i] == score[j] && id[i] < id[j]);
                    // Within a run of `size`, the first half of the bitonic merge ascends
                    // (best first) where (i & size) == 0.
                    const bool ascending = (i & size) == 0;
                    if (first_before != ascending) {
                        const double ts = score[i];
                        score[i] = score[j];
                        score[j] = ts;
                        const u32 tk = id[i];
                        id[i] = id[j];
                        id[j] = tk;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Doubles to unsigned keys that sort the same way (NaN aside).
__device__ __forceinline__ unsigned long long double_key(double x) {
    const unsigned long long u = (unsigned long long)__double_as_longlong(x);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ double key_double(unsigned long long k) {
    return __longlong_as_double((long long)((k >> 63) ? (k & 0x7fffffffffffffffull) : ~k));
}

// An exact score as the CPU ranks it (weft_patterns::select): NaN as -inf, last.
__device__ __forceinline__ double rank_score(double x) { return x != x ? __longlong_as_double(0xfff0000000000000LL) : x; }
