{{HEADER}}
// Exact merge of partial attention results over disjoint key sets (split-KV decode, ring
// steps): lse = log(sum_s exp(lse_s)), O = sum_s exp(lse_s - lse) O_s. One warp per row.

{{PRELUDE}}
constexpr int D = {{D}};
constexpr int E = D / 32;
constexpr int ROWS_PER_CTA = 4;

__device__ __forceinline__ float part_value(const {{PART_T}}* parts, size_t i) {
{{PART_LOAD}}
}

extern "C" __global__ void __launch_bounds__(ROWS_PER_CTA * 32) {{NAME}}(
    const {{PART_T}}* __restrict__ parts, const float* __restrict__ lses,
    u16* __restrict__ O, float* __restrict__ LSE, int nparts, int rows)
{
    const int row = blockIdx.x * ROWS_PER_CTA + threadIdx.x / 32, lane = threadIdx.x % 32;
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
