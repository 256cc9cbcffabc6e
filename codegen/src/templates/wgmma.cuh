// ---- Hopper (sm_90a) warpgroup MMA helpers: the 128-byte swizzled layout, shared-memory matrix
// descriptors, wgmma fences and the generated wgmma wrappers (see templates/hopper.cu for the
// layout and fragment conventions). Only kernels with Kernel::arch_specific include them. ----
// Byte offset of element (r, c) of a [rows][64] panel in the 128-byte swizzle.
__device__ __forceinline__ u32 swizzle128(int r, int c) {
    return (u32)(r * 128 + ((((c >> 3) ^ (r & 7))) << 4) + ((c & 7) << 1));
}

// A shared-memory matrix descriptor: start address, leading and stride byte offsets (each in
// units of 16 bytes), 128-byte swizzle.
__device__ __forceinline__ unsigned long long smem_desc(u32 addr, u32 lead, u32 stride) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lead & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((stride & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Starts moving the line holding global address `p` into L1 (a hint: it has no result; the
// callers pass addresses inside their arrays).
__device__ __forceinline__ void prefetch_l1(const void* p) {
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; prefetch.global.L1 [g]; }" ::"l"(p));
}
// mbarriers (the producer schedule): init with an arrival count, the fence that publishes the
// inits, an arrival, an arrival that waits for this thread's cp.async copies (without .noinc:
// it holds the phase open until they land, and the plain arrival is the one counted), and a
// wait for the phase of the given parity to complete.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_cp_async(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra WAIT;\n}" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// Named barriers 1.. (0 is __syncthreads'): wait until `count` threads arrived or synced, or
// arrive without waiting.
__device__ __forceinline__ void named_sync(int id, int count) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int count) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory"); }
// Register reallocation between warpgroups (the counts must fit the CTA's share of the file).
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }
// Shared memory written by ordinary stores, made visible to the wgmma unit (the async proxy).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving accumulator reads and writes across an asynchronous MMA.
template <int N> __device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A fragments in registers: their writes stay above the wgmma.fence that orders
// them before the MMAs that read them.
template <int N> __device__ __forceinline__ void fence_registers(u32 (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}
#include "wgmma_ops.cuh"  // generated per kernel: wgmma_qk (S = Q K^T) and wgmma_pv (O += P V) for its shapes
