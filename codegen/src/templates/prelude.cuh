// Shared helpers of every kernel: types, PTX wrappers (cp.async, ldmatrix, mma.sync), the
// sparse index's row view. The element type comes from the config (WEFT_F16).
#pragma once
#include "config.cuh"

#if WEFT_F16
#define WEFT_MMA_TYPE "f16"
#define WEFT_CVT_TYPE "f16x2"
#else
#define WEFT_MMA_TYPE "bf16"
#define WEFT_CVT_TYPE "bf16x2"
#endif

typedef unsigned short u16;
typedef unsigned int u32;

// (The prelude serves every kernel; constants a kernel does not read are [[maybe_unused]].)
[[maybe_unused]] constexpr u16 FULL = 0xffff;  // mask id of an entry without a predicate

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ---- integer helpers of the mask predicates (masks.cuh): 64-bit, Euclidean division ----
__device__ __forceinline__ long long weft_div(long long a, long long c) { return a >= 0 ? a / c : -((-a + c - 1) / c); }
__device__ __forceinline__ long long weft_rem(long long a, long long c) { return a - c * weft_div(a, c); }
__device__ __forceinline__ long long weft_min(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long weft_max(long long a, long long b) { return a > b ? a : b; }

// ---- PTX helpers ----
// A generic pointer into shared memory as a 32-bit shared-window address. Not volatile, so the
// compiler hoists it: kernels take one base address and add constant offsets to it.
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// c += a (16x16, row) * b (16x8, col), f32 accumulate.
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." WEFT_MMA_TYPE "." WEFT_MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c = a * b with a zero accumulator (the first k-step), so no registers are cleared first.
__device__ __forceinline__ void mma_zero(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." WEFT_MMA_TYPE "." WEFT_MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
// Two floats to a packed pair, `lo` in the low half.
__device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn." WEFT_CVT_TYPE ".f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// One row of the sparse index: its key blocks (with mask ids) and its columns (with mask ids).
struct IndexRow {
    u32 nblocks, ncols;
    const u32* bidx;
    const u16* bmask;
    const u32* cidx;
    const u16* cmask;
};

__device__ __forceinline__ IndexRow index_row(int row, const u32* block_ptr, const u32* block_idx, const u16* block_mask,
                                              const u32* col_ptr, const u32* col_idx, const u16* col_mask) {
    IndexRow r;
    r.nblocks = block_ptr[row + 1] - block_ptr[row];
    r.ncols = col_ptr[row + 1] - col_ptr[row];
    r.bidx = block_idx + block_ptr[row];
    r.bmask = block_mask + block_ptr[row];
    r.cidx = col_idx + col_ptr[row];
    r.cmask = col_mask + col_ptr[row];
    return r;
}

// Two packed 16-bit values to floats (`lo` from the low half).
__device__ __forceinline__ void unpack(u32 v, float& lo, float& hi) {
#if WEFT_F16
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(lo), "=f"(hi) : "r"(v));
#else
    lo = __uint_as_float(v << 16);
    hi = __uint_as_float(v & 0xffff0000u);
#endif
}

