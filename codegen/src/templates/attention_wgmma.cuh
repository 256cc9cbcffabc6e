// The attention kernel's products per tile on the wgmma path: S = Q K^T and O += P V as
// warpgroup MMAs reading swizzled panels through descriptors (the mma.sync products are in
// attention.cu's main loop).
#pragma once
#include "attention_shape.cuh"
#include "attention_tiles.cuh"

#if WEFT_WGMMA
// S = Q K^T for a warpgroup's 64 rows of Q (at `q_base`) against the tile (at `k_base`): both
// operands K-major in shared memory, 16 columns (32 bytes) per step, the next panel every 64.
// Issued, not committed or waited for.
__device__ __forceinline__ void qk_wgmma(float (&acc)[NT * 4], u32 q_base, u32 k_base) {
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
        const u32 at = (kk % 4) * 32;
        wgmma_qk(acc, smem_desc(q_base + (kk / 4) * BM * 128 + at, 16, 1024),
                 smem_desc(k_base + (kk / 4) * BN * 128 + at, 16, 1024), kk > 0);
    }
}

// O += P V for the tile whose V is at `v_base`, issued and committed, not waited for: V read transposed
// through descriptors (16 keys = 16 rows of 128 bytes into every 64-column panel), P from
// registers. The caller fences pa and O first.
__device__ __forceinline__ void pv_wgmma(float (&acc)[DT * 4], u32 (&p)[BN / 16][4], u32 v_base) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv(acc, p[kk], smem_desc(v_base + kk * 16 * 128, BN * 128, 1024), true);
    wgmma_commit();
}
#endif
