// The attention kernel's derived shape: warps, threads, shared-memory rows, fragment counts.
// BM, BN, D, STAGES, GATHERS and MT come from the config (KernelConfig).
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#if WEFT_WGMMA
#include "wgmma.cuh"
#endif
constexpr int WARPS = BM / (16 * MT);
constexpr bool Q_IN_REGS = MT == 1; // with one m-tile, Q's fragments stay in registers
constexpr int THREADS = (WARPS + (WEFT_PRODUCER ? 4 : 0)) * 32;
static_assert(THREADS == KERNEL_THREADS, "the block size the host launches (KernelConfig::threads)");
constexpr int LOADERS = WEFT_PRODUCER ? 128 : THREADS;  // the threads that copy tiles
#if WEFT_PRODUCER
constexpr int CONSUMER_WARPS = WARPS;  // the warps that compute (all but the producer's)
// KernelConfig::validate takes the producer schedule at 128 rows only: two consumers. With
// them (384 threads, 168 registers each at entry), the producer gives registers to the
// consumers: 56 x 128 + 224 x 256 = 64512 of the 65536 (FlashAttention-3 gives a cp.async
// producer 40; a gather here holds up to 16 positions).
static_assert(WARPS == 8, "the producer schedule: two computing warpgroups");
constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
#endif
constexpr int Q_BUFFERS = WEFT_PERSISTENT ? 2 : 1;
constexpr int LDS = D + 8;          // padded shared row (elements): ldmatrix stays conflict-free
constexpr int NT = BN / 8;          // 8-key column tiles of S per warp
constexpr int DT = D / 8;           // 8-wide column tiles of O per warp
constexpr int KQ = D / 16;          // k-steps of Q K^T
constexpr int CHUNKS = D / 8;       // 16-byte chunks per row
#if WEFT_WGMMA
// Elements per shared row: unpadded, in swizzled panels (ldmatrix's padding is not needed).
#define ROW D
#define ROWS_BYTES(n) ((n) * 128)
constexpr bool PINGPONG = WEFT_PRODUCER;  // the consumers take turns issuing MMAs (see the main loop)
static_assert(MT == 1 && BM % 64 == 0 && (BN == 64 || BN == 128) && D <= 128, "wgmma: 64-row warpgroups");

#else
#define ROW LDS
#define ROWS_BYTES(n) (2 * (n) * LDS)
#endif
