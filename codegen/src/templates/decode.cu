// Decode over weft's sparse index: one query row per index row (block_m = 1), e.g. a
// retrieval operator's kept keys. The row's keys (its key blocks, then its columns) are split
// into `splits` contiguous ranges, one CTA each, so a single token still fills the GPU; each
// warp walks every WARPS-th key of its range with an online softmax (one lane holds D/32
// elements of q, k, v and the output), the warps combine in shared memory, and the CTA
// writes an f32 partial output and its log-sum-exp for the merge kernel. Memory-bound: keys
// are read once, as whole rows (coalesced per warp).

#include "config.cuh"   // generated per kernel: its config, entry points and names
#include "prelude.cuh"
#include "params.cuh"   // generated from weft-codegen abi.rs: the parameter structs
#include "masks.cuh"    // generated per kernel: the index's mask predicates and token map
// BN (keys per block entry: the index's block_n) and D come from the config.
constexpr int WARPS = 4;
static_assert(WARPS * 32 == KERNEL_THREADS, "the block size the host launches (DECODE_THREADS)");
constexpr int E = D / 32;           // elements per lane

extern "C" __global__ void __launch_bounds__(WARPS * 32) WEFT_KERNEL(DECODE_PARAMS)
{

    __shared__ float s_m[WARPS], s_l[WARPS];
    __shared__ float s_acc[WARPS][D];

    const int qpos = blockIdx.x / splits, split = blockIdx.x % splits, h = blockIdx.y;
    const int kv_head = h / (hq / hkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = h * nq + qpos;
    const IndexRow ir = index_row(row, block_ptr, block_idx, block_mask, col_ptr, col_idx, col_mask);
    const u32 nblocks = ir.nblocks, ncols = ir.ncols;
    const u32* bidx = ir.bidx;
    const u16* bmask = ir.bmask;
    const u32* cidx = ir.cidx;
    const u16* cmask = ir.cmask;
    const int total = (int)nblocks * BN + (int)ncols;
    const int chunk = (total + splits - 1) / splits;
    const int begin = split * chunk, end = min(total, begin + chunk);
    const int tok = weft_token(qpos, nq);
    const u16* Kh = K + (size_t)kv_head * nk * D;
    const u16* Vh = V + (size_t)kv_head * nk * D;

    // This lane's slice of q, pre-scaled into the log2 domain.
    float qv[E];
    const u32* qrow = (const u32*)(Q + ((size_t)h * nq + tok) * D + lane * E);
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
        unpack(qrow[i], qv[2 * i], qv[2 * i + 1]);
        qv[2 * i] *= scale_log2;
        qv[2 * i + 1] *= scale_log2;
    }

    float m = neg_inf(), l = 0.f, acc[E];
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] = 0.f;
    for (int i = begin + warp; i < end; i += WARPS) {
        int pos;
        u16 mask;
        if (i < (int)nblocks * BN) {
            pos = (int)bidx[i / BN] * BN + i % BN;
            mask = bmask[i / BN];
            if (pos >= nk) continue;
        } else {
            pos = (int)cidx[i - (int)nblocks * BN];
            mask = cmask[i - (int)nblocks * BN];
        }
        if (mask != FULL && !weft_mask(mask, qpos, pos, h, nq, nk)) continue;
        const size_t off = (size_t)weft_token(pos, nk) * D + lane * E;
        const u32* krow = (const u32*)(Kh + off);
        const u32* vrow = (const u32*)(Vh + off);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < E / 2; ++j) {
            float a, b;
            unpack(krow[j], a, b);
            s = fmaf(qv[2 * j], a, fmaf(qv[2 * j + 1], b, s));
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
        const float mn = fmaxf(m, s);
        const float alpha = m == neg_inf() ? 0.f : exp2f(m - mn);
        const float p = exp2f(s - mn);
        l = l * alpha + p;
#pragma unroll
        for (int j = 0; j < E / 2; ++j) {
            float a, b;
            unpack(vrow[j], a, b);
            acc[2 * j] = fmaf(p, a, acc[2 * j] * alpha);
            acc[2 * j + 1] = fmaf(p, b, acc[2 * j + 1] * alpha);
        }
        m = mn;
    }

    // Combine the warps.
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < E; ++i) s_acc[warp][lane * E + i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float mx = neg_inf();
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, s_m[w]);
        float sum = 0.f, out[E];
#pragma unroll
        for (int i = 0; i < E; ++i) out[i] = 0.f;
        if (mx != neg_inf()) {
            for (int w = 0; w < WARPS; ++w) {
                const float f = s_m[w] == neg_inf() ? 0.f : exp2f(s_m[w] - mx);
                sum += s_l[w] * f;
#pragma unroll
                for (int i = 0; i < E; ++i) out[i] += s_acc[w][lane * E + i] * f;
            }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const size_t prow = (size_t)split * hq * nq + (size_t)h * nq + tok;
#pragma unroll
        for (int i = 0; i < E; ++i) Opart[prow * D + lane * E + i] = out[i] * inv;
        if (lane == 0) LSEpart[prow] = sum > 0.f ? (mx + log2f(sum)) * 0.69314718055994531f : neg_inf();
    }
}
