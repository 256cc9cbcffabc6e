// Exact merge of partial attention results over disjoint key sets (split-KV decode, ring
// steps): lse = log(sum_s exp(lse_s)), O = sum_s exp(lse_s - lse) O_s. One warp per row.

#include "config.cuh"   // generated per kernel: its config, entry points and names
#include "prelude.cuh"
#include "params.cuh"   // generated from weft-codegen abi.rs: the parameter structs
// D and PartT (the partials' element type: float, or the attention dtype) come from the config.
constexpr int E = D / 32;
constexpr int MERGE_ROWS = 4;
static_assert(MERGE_ROWS * 32 == KERNEL_THREADS, "the block size the host launches (MERGE_THREADS)");

__device__ __forceinline__ float part_value(const PartT* parts, size_t i) {
#if WEFT_PARTIAL_F32
    return parts[i];
#else
    float lo, hi;
    unpack(parts[i], lo, hi);  // the value sits in the low half
    return lo;
#endif
}

extern "C" __global__ void __launch_bounds__(MERGE_ROWS * 32) WEFT_KERNEL(MERGE_PARAMS)
{

    const int row = blockIdx.x * MERGE_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float mx = neg_inf();
    for (int s = 0; s < nparts; ++s) mx = fmaxf(mx, lses[(size_t)s * rows + row]);
    float total = 0.f, acc[E];
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] = 0.f;
    if (mx != neg_inf()) {
        for (int s = 0; s < nparts; ++s) {
            const float ls = lses[(size_t)s * rows + row];
            if (ls == neg_inf()) continue;
            const float w = __expf(ls - mx);
            total += w;
#pragma unroll
            for (int i = 0; i < E; ++i) acc[i] += w * part_value(parts, ((size_t)s * rows + row) * D + lane * E + i);
        }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    u32* dst = (u32*)(O + (size_t)row * D + lane * E);
#pragma unroll
    for (int i = 0; i < E / 2; ++i) dst[i] = pack(acc[2 * i] * inv, acc[2 * i + 1] * inv);
    if (lane == 0) LSE[row] = total > 0.f ? mx + __logf(total) : neg_inf();
}
