// Hopper (sm_90a) building blocks of the attention kernel's wgmma path: warpgroup MMAs reading
// their operands from shared memory through matrix descriptors, in the 128-byte swizzled layout.
// The probe kernel below exercises each of them once, on inputs whose products and sums are
// exact, so the GPU suite can compare its output bit for bit with the CPU and point at the
// piece that is wrong, apart from the attention kernel.
//
// Layout. A tile of `rows` x D bf16 is stored as D / 64 panels of rows x 64 (128 bytes per row,
// panels 1024-byte aligned, one after the other). Within a panel, the 16-byte chunk c / 8 of row
// r sits at chunk (c / 8) ^ (r % 8): the 128-byte swizzle the descriptors name (mode 1).
// - K-major operands (Q and K for S = Q K^T, the reduction over D contiguous): descriptor start =
//   panel (k / 64) + 2 * (k % 64) bytes for the 16 columns from k; stride byte offset 1024 (the
//   next 8 rows); the leading byte offset is unused (16).
// - MN-major operand (V for O = P V, the reduction over keys, rows of V contiguous along D, read
//   transposed): start = 128 * key bytes into panel 0; leading byte offset = one panel (rows x
//   128 bytes: the next 64 columns of D); stride byte offset 1024 (the next 8 keys).
// Accumulators (m64nN, f32): warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8); register
// 4 j + {0, 1} holds columns 8 j + 2 (lane % 4) + {0, 1} of the first row, 4 j + {2, 3} the same
// columns of the row 8 below. An A operand in registers (k16) takes the same shape, 16 columns:
// {a0, a1, a2, a3} = rows (g, g + 8) x columns (2 t, 2 t + 8), two bf16 each, which is how the
// accumulators of S become P without a trip through shared memory.

#include "config.cuh"   // generated per kernel: its config, entry points and names
#include "prelude.cuh"
#include "params.cuh"   // generated from weft-codegen abi.rs: the parameter structs
// D (columns of Q, K, V) and KEYS (keys in the probe's tile) come from the config.
constexpr int PANEL = 64;         // bf16 columns per 128-byte panel row

#include "wgmma.cuh"

// This thread's accumulators of an m64nN product into `out` (row-major, N columns): rows `row`
// and `row + 8`, columns 8 j + 2 t and the next.
template <int ACC>
__device__ __forceinline__ void store_rows(float* out, int n, int row, int t, const float (&acc)[ACC]) {
#pragma unroll
    for (int j = 0; j < ACC / 4; ++j) {
        const int col = 8 * j + 2 * t;
        out[row * n + col] = acc[4 * j];
        out[row * n + col + 1] = acc[4 * j + 1];
        out[(row + 8) * n + col] = acc[4 * j + 2];
        out[(row + 8) * n + col + 1] = acc[4 * j + 3];
    }
}

// ---- probe: one warpgroup (128 threads) ----
// Q [64][D], K and V [KEYS][D] (bf16, row-major). Writes S = Q K^T ([64][KEYS], f32, from
// shared-memory operands) and O = bf16(S) V ([64][D], f32, P from registers, V read transposed).
extern "C" __global__ void __launch_bounds__(128) WEFT_KERNEL(PROBE_PARAMS)
{

    extern __shared__ unsigned char smem_raw[];
    // Panels must start on 1024 bytes (the swizzle pattern's period): the launch asks for 1024
    // bytes more than the tiles take.
    const u32 raw = smem_u32(smem_raw);
    unsigned char* smem = smem_raw + ((1024 - raw % 1024) % 1024);
    unsigned char* sQ = smem;
    unsigned char* sK = sQ + 64 * D * 2;
    unsigned char* sV = sK + KEYS * D * 2;
    const int tid = threadIdx.x;
    auto store = [&](unsigned char* base, const u16* src, int rows) {
        for (int i = tid; i < rows * D; i += 128) {
            const int r = i / D, c = i % D;
            *(u16*)(base + (c / PANEL) * rows * 128 + swizzle128(r, c % PANEL)) = src[i];
        }
    };
    store(sQ, Q, 64);
    store(sK, K, KEYS);
    store(sV, V, KEYS);
    fence_async_shared();
    __syncthreads();

    const u32 q0 = smem_u32(sQ), k0 = smem_u32(sK), v0 = smem_u32(sV);
    float s[KEYS / 2];
#pragma unroll
    for (int i = 0; i < KEYS / 2; ++i) s[i] = 0.f;  // (overwritten: the first MMA does not accumulate)
    fence_registers(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const u32 at = (kk % 4) * 32;  // 16 columns = 32 bytes into the panel
        const u32 qa = q0 + (kk / 4) * 64 * 128 + at, kb = k0 + (kk / 4) * KEYS * 128 + at;
        wgmma_qk(s, smem_desc(qa, 16, 1024), smem_desc(kb, 16, 1024), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);

    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int row = 16 * warp + g;
    store_rows(S, KEYS, row, t, s);

    // P's fragments, all written before the fence that orders them before the MMAs read them.
    u32 p[KEYS / 16][4];
#pragma unroll
    for (int ks = 0; ks < KEYS / 16; ++ks) {
        p[ks][0] = pack(s[8 * ks], s[8 * ks + 1]);
        p[ks][1] = pack(s[8 * ks + 2], s[8 * ks + 3]);
        p[ks][2] = pack(s[8 * ks + 4], s[8 * ks + 5]);
        p[ks][3] = pack(s[8 * ks + 6], s[8 * ks + 7]);
    }
    fence_registers(p);
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    fence_registers(o);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KEYS / 16; ++ks) {
        // 16 keys = 16 rows of 128 bytes further into every panel of V.
        wgmma_pv(o, p[ks], smem_desc(v0 + ks * 16 * 128, KEYS * 128, 1024), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(o);
    store_rows(O, D, row, t, o);
}
