// Forward attention over weft's sparse index (FlashAttention-2 schedule).
// One CTA computes one index row (a persistent one a sequence of rows): BM query rows of one
// head against the row's tiles. A tile is either a key block from the block list (BN
// consecutive keys) or a chunk of up to BN gathered key columns; both land in the same
// shared-memory tile, so columns run on the same tensor-core math as blocks. Online softmax in f32 (log2 domain), mma.sync m16n8k16,
// ldmatrix, and cp.async double buffering of the K/V tiles.
// With WEFT_WGMMA (KernelConfig::wgmma, sm_90a) the two products run as warpgroup MMAs
// instead: one warpgroup per 64 rows (16 rows per warp, as mma.sync with MT = 1, so the
// accumulators have the same layout and the masks and softmax below serve both), Q, K and V
// in 128-byte swizzled panels read through descriptors, P from registers.
//
// This file holds the schedules: which rows a CTA computes (one, or a persistent sequence in
// attention_scheduler.cuh's order), who copies the tiles (every thread with a cp.async
// pipeline, or a producer warpgroup), and the consumers' main loop. The pieces they share are apart: attention_shape.cuh (the
// derived constants), attention_tiles.cuh (where a tile's keys come from, the swizzle),
// attention_wgmma.cuh (the two products as warpgroup MMAs), attention_mask.cuh,
// attention_softmax.cuh, attention_epilogue.cuh, attention_pipeline.cuh (the producer's
// stage bookkeeping and copies of a row).

#include "config.cuh"   // generated per kernel: its config, entry points and names
#include "prelude.cuh"
#include "params.cuh"   // generated from weft-codegen abi.rs: the parameter structs
#include "masks.cuh"    // generated per kernel: the index's mask predicates and token map
// WEFT_WGMMA, WEFT_PRODUCER and WEFT_PERSISTENT come from the config:
// With WEFT_PRODUCER (KernelConfig::producer, wgmma only) a producer warpgroup copies the K/V
// tiles and the consumer warpgroups only compute (FlashAttention-3's warp specialisation):
// mbarriers per stage say when a tile has landed (full) and when every consumer is done with
// it (empty), so no barrier holds the whole CTA, and setmaxnreg moves registers from the
// producer to the consumers.
// With WEFT_PERSISTENT (KernelConfig::persistent, producer only) the grid has one CTA per SM,
// and each CTA runs index rows blockIdx.x, blockIdx.x + gridDim.x, ... (heaviest query blocks
// first). Producer and consumers number the tiles of all their rows in one sequence, so the
// stage mbarriers carry from row to row and the producer copies the next row's Q (into the
// other of two Q buffers) and first tiles while the consumers finish and store this one.
#if WEFT_WGMMA
#include "wgmma.cuh"
#endif
#include "attention_shape.cuh"
#include "attention_tiles.cuh"
#include "attention_pipeline.cuh"
#include "attention_scheduler.cuh"
#include "attention_wgmma.cuh"
#include "attention_mask.cuh"
#include "attention_softmax.cuh"
#include "attention_epilogue.cuh"




extern "C" __global__ void __launch_bounds__(THREADS, 1) WEFT_KERNEL(ATTENTION_PARAMS)
{

    // The layout below, in bytes, within what the host gives the launch (KernelConfig::shared_bytes):
    // Q, K and V tiles, key positions and mask ids, 1024 to align swizzled panels, mbarriers
    // (each 8 bytes, at most 8 of alignment).
    static_assert(2 * (Q_BUFFERS * BM + 2 * STAGES * BN) * ROW + STAGES * BN * (4 + 2) +
                          (WEFT_WGMMA ? 1024 : 0) + (WEFT_PRODUCER ? 8 + 32 * STAGES + 16 * WEFT_PERSISTENT : 0) <=
                      KERNEL_SHARED_BYTES,
                  "the shared memory the host gives the launch (KernelConfig::shared_bytes)");
    extern __shared__ __align__(16) unsigned char smem[];
#if WEFT_WGMMA
    // Swizzled panels start on 1024 bytes (the swizzle's period); the config asks for 1024 spare.
    u16* sQ = (u16*)(smem + (1024 - smem_u32(smem) % 1024) % 1024);  // [Q_BUFFERS][BM][ROW]
#else
    u16* sQ = (u16*)smem;                           // [BM][ROW]
#endif
    u16* sK = sQ + Q_BUFFERS * BM * ROW;            // [STAGES][BN][ROW] (after [Q_BUFFERS][BM][ROW])
    u16* sV = sK + STAGES * BN * ROW;               // [STAGES][BN][ROW]
    int* sKeyPos = (int*)(sV + STAGES * BN * ROW);  // [STAGES][BN] index position of each key, -1 if none
    u16* sKeyMask = (u16*)(sKeyPos + STAGES * BN);  // [STAGES][BN] mask id of each key
#if WEFT_PRODUCER
    // [4][STAGES] mbarriers, 8-byte aligned, for K (with the key positions and mask ids) and V
    // apart: full (the stage's tile landed) and empty (the consumers are done with it). K is
    // released after a tile's masks, V after its P V, a tile later.
    const u32 bar_full_k = (smem_u32(sKeyMask + STAGES * BN) + 7u) & ~7u;
    const u32 bar_full_v = bar_full_k + 8 * STAGES;
    const u32 bar_empty_k = bar_full_v + 8 * STAGES;
    const u32 bar_empty_v = bar_empty_k + 8 * STAGES;
#endif
#if WEFT_PERSISTENT
    // [2] mbarriers: the consumers are done with a Q buffer (its row's last S completed).
    const u32 bar_q_empty = bar_empty_v + 8 * STAGES;
#endif

    // The row a CTA works on (without WEFT_PERSISTENT, the only one): query block x over all
    // sequences of index head ih. head_map names the layer's query head h it serves (heads
    // that share this kernel, possibly with different patterns, run in one launch).
    int ih, h, b, qb, nq, nk, kv_head, ntiles;
    u32 nblocks, ncols;
    const u32* bidx;
    const u16* bmask;
    const u32* cidx;
    const u16* cmask;
    const u16 *Qh, *Kh, *Vh;
    auto begin_row = [&](int x, int head) {
        ih = head;
        h = head_map[ih];
        // Packed batch: x counts query blocks over all sequences; find this one's sequence.
        int lo = 0, hi = batch - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (seq_qb[mid] <= x) lo = mid; else hi = mid - 1;
        }
        b = lo;
        qb = x - seq_qb[b];
        nq = seq_q[b + 1] - seq_q[b];
        nk = seq_k[b + 1] - seq_k[b];
        kv_head = h / (hq / hkv);
        const int heads = WEFT_PERSISTENT ? index_heads : (int)gridDim.y;
        const int row = heads * seq_qb[b] + ih * (seq_qb[b + 1] - seq_qb[b]) + qb;  // rows: sequence, head, block
        const IndexRow ir = index_row(row, block_ptr, block_idx, block_mask, col_ptr, col_idx, col_mask);
        nblocks = ir.nblocks;
        ncols = ir.ncols;
        bidx = ir.bidx;
        bmask = ir.bmask;
        cidx = ir.cidx;
        cmask = ir.cmask;
        ntiles = (int)nblocks + (int)((ncols + BN - 1) / BN);
#if WEFT_PERSISTENT
        // The same in every lane, and now provably so: without this ptxas treats the tile loop
        // of a row found in a loop as divergent and serialises its wgmma (C7520).
        ntiles = __shfl_sync(0xffffffff, ntiles, 0);
#endif
        Qh = Q + ((size_t)h * total_q + seq_q[b]) * D;
        Kh = K + ((size_t)kv_head * total_k + seq_k[b]) * D;
        Vh = V + ((size_t)kv_head * total_k + seq_k[b]) * D;
    };
#if WEFT_PERSISTENT
    // This CTA takes rows blockIdx.x, blockIdx.x + gridDim.x, ... below `rows` of the order
    // attention_scheduler.cuh gives.
    const int rows = index_heads * seq_qb[batch];
    auto begin_nth_row = [&](int w) {
        begin_row(persistent_query_block(seq_qb, batch, w), persistent_head(seq_qb, batch, w));
    };
#else
    begin_row((int)blockIdx.x, (int)blockIdx.y);
#endif
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // The computing warps count from 0 after the producer's four.
    const int cwarp = warp - (WEFT_PRODUCER ? 4 : 0);

#if WEFT_PRODUCER
    if (tid == 0) {
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(bar_full_k + 8 * st, LOADERS);
            mbar_init(bar_full_v + 8 * st, LOADERS);
            mbar_init(bar_empty_k + 8 * st, CONSUMER_WARPS * 32);
            mbar_init(bar_empty_v + 8 * st, CONSUMER_WARPS * 32);
        }
#if WEFT_PERSISTENT
        for (int i = 0; i < 2; ++i) mbar_init(bar_q_empty + 8 * i, CONSUMER_WARPS * 32);
#endif
        fence_mbarrier_init();
    }
    __syncthreads();
#endif
    // Q tile into buffer `buf`: query positions qb * BM + r, zero-filled past the end (the
    // producer's copies join tile 0's).
    auto load_q = [&](int buf) {
        const u32 q_dst = smem_u32(sQ + buf * BM * ROW);
        for (int c = tid; c < BM * CHUNKS; c += LOADERS) {
            const int r = c / CHUNKS, col = (c % CHUNKS) * 8, pos = qb * BM + r;
            const bool ok = pos < nq;
#if WEFT_WGMMA
            const u32 dst = q_dst + tile_chunk<BM>(r, col);
#else
            const u32 dst = q_dst + 2 * (r * LDS + col);
#endif
            cp_async16(dst, ok ? Qh + (size_t)weft_token(pos, nq) * D + col : Qh, ok ? 16 : 0);
        }
    };
#if !WEFT_PERSISTENT
    if (!WEFT_PRODUCER || (tid < LOADERS && ntiles > 0)) load_q(0);
#endif

    // A thread copies the same 16-byte column chunk of rows ROW_STEP apart: ROWS_BYTES(n) is how
    // far n rows down that chunk lies. Padded rows are 2 x LDS bytes; in the swizzled panels a
    // row is 128 bytes whatever D (the chunk's panel is fixed by its column), and rows a
    // multiple of 8 apart keep the chunk's swizzled position.
    constexpr int ROW_STEP = LOADERS / CHUNKS;
    static_assert(!WEFT_WGMMA || ROW_STEP % 8 == 0, "wgmma: a thread's rows keep their swizzle");
    constexpr u32 STAGE_BYTES = 2 * BN * ROW;          // one stage of sK (or sV)
    constexpr u32 V_BYTES = 2 * STAGES * BN * ROW;     // sV - sK
    const int ld_row = tid / CHUNKS, ld_col = (tid % CHUNKS) * 8;
#if WEFT_WGMMA
    const u32 ld_dst = smem_u32(sK) + tile_chunk<BN>(ld_row, ld_col);
#else
    const u32 ld_dst = smem_u32(sK) + 2 * (ld_row * LDS + ld_col);
#endif
    // with_k / with_v: which of the tile's K and V rows to copy (the key positions and mask ids
    // go with K). mma.sync copies both at once; the wgmma schedule copies V later than K.
    auto load_tile = [&](int t, int stage, bool with_k, bool with_v) {
        const TileSource src = tile_source(t, nblocks, ncols, bidx, bmask, nk);
        const u32 k_dst = ld_dst + stage * STAGE_BYTES;
        int* key_pos = sKeyPos + stage * BN;
        u16* key_mask = sKeyMask + stage * BN;
        if constexpr (IDENTITY_TOKENS && BN % ROW_STEP == 0) {
            if (src.is_block && src.count == BN) {
                // A whole block of consecutive keys: fixed strides, no per-row decisions.
                const u16* k_src = Kh + (size_t)(src.base + ld_row) * D + ld_col;
                const u16* v_src = Vh + (size_t)(src.base + ld_row) * D + ld_col;
#pragma unroll
                for (int i = 0; i < BN / ROW_STEP; ++i) {
                    if (with_k) cp_async16(k_dst + ROWS_BYTES(i * ROW_STEP), k_src + (size_t)i * ROW_STEP * D, 16);
                    if (with_v) cp_async16(k_dst + V_BYTES + ROWS_BYTES(i * ROW_STEP), v_src + (size_t)i * ROW_STEP * D, 16);
                }
                if (with_k && ld_col == 0) {
#pragma unroll
                    for (int i = 0; i < BN / ROW_STEP; ++i) {
                        key_pos[ld_row + i * ROW_STEP] = src.base + ld_row + i * ROW_STEP;
                        key_mask[ld_row + i * ROW_STEP] = src.mask;
                    }
                }
                return;
            }
        }
        // Gathered columns, a block at the end of the sequence, or permuted tokens.
        if constexpr (GATHERS) {
            // Patterns with column lists: the key positions first, all of this thread's
            // column-index loads in flight together (one round trip to memory per tile
            // instead of one per pair of rows; vertical vectors ran 1.5x slower without).
            constexpr int ROWS = (BN + ROW_STEP - 1) / ROW_STEP;
            int pos_of[ROWS];
            u16 mask_of[ROWS];
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int r = ld_row + i * ROW_STEP;
                const bool ok = r < BN && r < src.count;
                pos_of[i] = !ok ? -1 : src.is_block ? src.base + r : (int)cidx[src.base + r];
                // (Only the threads that record the key's position and mask id read the mask.)
                mask_of[i] = !ok || ld_col != 0 ? FULL : src.is_block ? src.mask : cmask[src.base + r];
            }
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int r = ld_row + i * ROW_STEP;
                if (r >= BN) break;
                const int pos = pos_of[i];
                const size_t off = pos >= 0 ? (size_t)weft_token(pos, nk) * D + ld_col : 0;
                const u32 dst = k_dst + ROWS_BYTES(r - ld_row);
                if (with_k) cp_async16(dst, Kh + off, pos >= 0 ? 16 : 0);
                if (with_v) cp_async16(dst + V_BYTES, Vh + off, pos >= 0 ? 16 : 0);
                if (with_k && ld_col == 0) {
                    key_pos[r] = pos;
                    key_mask[r] = mask_of[i];
                }
            }
        } else {
            // Without columns (blocks only) the rolled loop keeps the register allocation
            // of the full-block path (1% faster on dense and block patterns).
#pragma unroll 2
            for (int r = ld_row; r < BN; r += ROW_STEP) {
                const bool ok = r < src.count;
                const int pos = !ok ? -1 : src.is_block ? src.base + r : (int)cidx[src.base + r];
                const size_t off = ok ? (size_t)weft_token(pos, nk) * D + ld_col : 0;
                const u32 dst = k_dst + ROWS_BYTES(r - ld_row);
                if (with_k) cp_async16(dst, Kh + off, ok ? 16 : 0);
                if (with_v) cp_async16(dst + V_BYTES, Vh + off, ok ? 16 : 0);
                if (with_k && ld_col == 0) {
                    key_pos[r] = pos;
                    key_mask[r] = !ok ? FULL : src.is_block ? src.mask : cmask[src.base + r];
                }
            }
        }
    };

#if WEFT_WGMMA
    // The index entries that tile t's copies will read (its column positions and mask ids, or
    // its block's entry), moved into L1 an iteration early: the wgmma schedule issues its
    // copies between the barrier and the MMAs, where a column position loaded from L2 would
    // hold the MMAs back (the copies need the position for their addresses). One prefetch per
    // 128-byte line (32 positions, 64 mask ids) and one for the last entry's line.
    auto prefetch_tile = [&](int t) {
        if (t >= ntiles) return;
        if (t < (int)nblocks) {
            if (tid == 0) {
                prefetch_l1(bidx + t);
                prefetch_l1(bmask + t);
            }
            return;
        }
        const int first = (t - (int)nblocks) * BN, count = min(BN, (int)ncols - first);
        if (tid <= BN / 32) {
            prefetch_l1(cidx + first + min(tid * 32, count - 1));
        } else if (tid <= BN / 32 + 1 + BN / 64) {
            prefetch_l1(cmask + first + min((tid - BN / 32 - 1) * 64, count - 1));
        }
    };
#endif
#if !WEFT_PRODUCER
    // Copy group g of the wgmma schedule: tile g's K and tile g - 1's V, each into its stage.
    auto load_group = [&](int g) {
        if (g < ntiles) load_tile(g, g % STAGES, true, false);
        if (g >= 1 && g - 1 < ntiles) load_tile(g - 1, (g - 1) % STAGES, false, true);
        cp_async_commit();
    };
#endif
#if WEFT_PRODUCER
    if (tid < LOADERS) {
        // The producer warpgroup: each row's tiles through produce_row_tiles
        // (attention_pipeline.cuh), then it is done.
        setmaxnreg_dec<PRODUCER_REGS>();
        const StageBars bars{bar_full_k, bar_full_v, bar_empty_k, bar_empty_v};
        int g0 = 0;  // the row's first tile's number in the CTA's sequence
        auto produce_row = [&]() {
            produce_row_tiles(load_tile, bars, g0, ntiles);
            g0 += ntiles;
        };
#if WEFT_PERSISTENT
        // n counts the rows with tiles (rows without any take no Q buffer): row n's Q goes into
        // buffer n % 2 once the consumers released row n - 2's (the release number n / 2 - 1).
        // The consumers cannot run two releases ahead: each needs this row's copies first.
        int n = 0;
        for (int w = blockIdx.x; w < rows; w += gridDim.x) {
            begin_nth_row(w);
            if (ntiles == 0) continue;
            if (n >= 2) mbar_wait(bar_q_empty + 8 * (n % 2), (u32)(n / 2 - 1) & 1u);
            load_q(n % 2);
            produce_row();
            ++n;
        }
#else
        produce_row();
#endif
        // Nothing in flight when the warps exit.
        cp_async_commit();
        cp_async_wait<0>();
        return;
    }
    setmaxnreg_inc<CONSUMER_REGS>();
#endif
#if !WEFT_PRODUCER
    // Prologue: tiles 0 .. STAGES - 2 in flight, one commit group each (empty past the end,
    // so that group t always holds tile t). Two stages keep the plain form: ptxas allocates
    // the unrolled loop's copy differently (88 B of spills instead of 8 at 128 x 64 tiles).
    // The wgmma schedule's group g holds K_g and V_{g-1} instead (see the main loop).
    if constexpr (WEFT_WGMMA) {
#pragma unroll
        for (int g = 0; g < STAGES - 1; ++g) load_group(g);
    } else if constexpr (STAGES == 2) {
        if (ntiles > 0) load_tile(0, 0, true, true);
        cp_async_commit();
    } else {
#pragma unroll
        for (int p = 0; p < STAGES - 1; ++p) {
            if (p < ntiles) load_tile(p, p, true, true);
            cp_async_commit();
        }
    }
#endif

    // The consumers' work on the current row: its tiles are numbers g0, g0 + 1, ... of the
    // CTA's sequence (0, 1, ... without WEFT_PERSISTENT), and its Q is in buffer qbuf.
    auto consume_row = [&](int g0, int qbuf) {
        // Index position of this thread's first row in m-tile `mt` (the second is 8 below).
        const int row0 = qb * BM + cwarp * 16 * MT + lane / 4;
        float m[MT][2], l[MT][2];                          // running row max (log2 units), this thread's row-sum share
        float o[MT][DT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            m[mt][0] = m[mt][1] = neg_inf();
            l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
        }
        u32 qf[Q_IN_REGS ? KQ : 1][4];

        // ldmatrix addresses: one shared-window base per operand and lane; every fragment below is
        // that base plus a compile-time offset (plus the stage), which folds into the instruction.
        const int mat = lane / 8;  // which 8x8 matrix of an x4 load this lane addresses
        const u32 q_addr = smem_u32(sQ) + 2 * ((warp * 16 * MT + lane % 16) * LDS + (lane / 16) * 8);
        const u32 k_addr = smem_u32(sK) + 2 * (((mat / 2) * 8 + lane % 8) * LDS + (mat % 2) * 8);
        const u32 v_addr = smem_u32(sV) + 2 * (((mat % 2) * 8 + lane % 8) * LDS + (mat / 2) * 8);

#if WEFT_WGMMA
        // The warpgroup schedule overlaps each tile's softmax with the previous tile's P V
        // (FlashAttention-3's intra-warpgroup pipelining): iteration t issues S_t = Q K_t^T and
        // then O += P_{t-1} V_{t-1}, waits for S_t alone, and masks and exponentiates tile t while
        // the tensor cores finish P_{t-1} V_{t-1}. V lags K by a tile: after its barrier (and
        // before its MMAs, which ptxas would serialise around the copies) iteration t copies group
        // t + STAGES - 1, K_{t+STAGES-1} into the stage of K_{t-1} (last read by S_{t-1}) and
        // V_{t+STAGES-2} into the stage of V_{t-2} (last read by P_{t-2} V_{t-2}); every warpgroup
        // waited for both before this iteration's barrier, so one barrier per tile suffices.
        u32 pa[BN / 16][4];  // the previous tile's P as bf16 pairs: the A operand of its P V
        float(&oacc)[DT * 4] = reinterpret_cast<float(&)[DT * 4]>(o);
        // With a producer, the two computing warpgroups also take turns issuing their MMAs
        // (FlashAttention-3's ping-pong): warpgroup 0 syncs on named barrier 1 and then arrives on
        // 2, warpgroup 1 the reverse, so one's softmax runs while the other's MMAs do. Warpgroup 1
        // arrives once first so that warpgroup 0 starts; warpgroup 0 takes the last arrival at the
        // end.
        if constexpr (PINGPONG) {
            if (cwarp / 4 == 1 && ntiles > 0) named_arrive(1, 256);
        }
#endif
        for (int t = 0; t < ntiles; ++t) {
            const int g = g0 + t, stage = g % STAGES;
#if WEFT_WGMMA && WEFT_PRODUCER
            // K_t has landed (the fill number g / STAGES of its stage), and V_{t-1}, which this
            // iteration's P V reads (waited for here, not between the MMAs and their wait, where
            // ptxas would serialise them).
            mbar_wait(stage_bar(bar_full_k, g), fill_parity(g));
            if (t > 0) mbar_wait(stage_bar(bar_full_v, g - 1), fill_parity(g - 1));
            fence_async_shared();  // the copies, ordered before the wgmma unit's reads
#elif WEFT_WGMMA
            // Groups t + 1 .. t + STAGES - 2 may still be in flight; group t (K_t, V_{t-1}) and
            // everything older must be complete.
            cp_async_wait<STAGES - 2>();
            fence_async_shared();  // this thread's copies, visible to the wgmma unit after the barrier
            __syncthreads();
            load_group(t + STAGES - 1);
#else
            // Tile t + STAGES - 1 goes into the stage tile t - 1 used (freed by the barrier that
            // ended the last iteration); then every group but the newest STAGES - 1 is complete,
            // which includes tile t's.
            if (t + STAGES - 1 < ntiles) load_tile(t + STAGES - 1, (t + STAGES - 1) % STAGES, true, true);
            cp_async_commit();
            cp_async_wait<STAGES - 1>();
            __syncthreads();
#endif

            if constexpr (Q_IN_REGS && !WEFT_WGMMA) {
                if (t == 0) {
#pragma unroll
                    for (int kk = 0; kk < KQ; ++kk) ldmatrix_x4(qf[kk], q_addr + 2 * (kk * 16));
                }
            }

            // S = Q K^T for this warp's MT x 16 rows and the tile's BN keys.
            float s[MT][NT][4];
#if WEFT_WGMMA
            {
                // This warpgroup's 64 rows of Q against the tile.
                float(&acc)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(s);
                const u32 q_base = smem_u32(sQ + qbuf * BM * ROW) + (cwarp / 4) * 64 * 128;
                const u32 k_base = smem_u32(sK) + stage * STAGE_BYTES;
                fence_registers(acc);
                fence_registers(pa);
                fence_registers(oacc);
                if constexpr (PINGPONG) named_sync(1 + cwarp / 4, 256);  // this warpgroup's turn
                wgmma_fence();
                qk_wgmma(acc, q_base, k_base);
                wgmma_commit();
                if (t > 0) {
                    pv_wgmma(oacc, pa, smem_u32(sV) + (g - 1) % STAGES * STAGE_BYTES);
                    if constexpr (PINGPONG) named_arrive(2 - cwarp / 4, 256);  // the other's turn
                    wgmma_wait<1>();  // S_t; P_{t-1} V_{t-1} may still run
                } else {
                    if constexpr (PINGPONG) named_arrive(2 - cwarp / 4, 256);
                    wgmma_wait<0>();
                }
                fence_registers(acc);
                // The next iteration copies K_{t+STAGES}: its index entries, into L1 now.
                if constexpr (GATHERS && !WEFT_PRODUCER) prefetch_tile(t + STAGES);
            }
#else
            // (The mma.sync products stay here rather than in functions beside the wgmma ones:
            // as functions they changed ptxas's register allocation of some mma.sync kernels.)
            const u32 k_stage = k_addr + stage * STAGE_BYTES;
#pragma unroll
            for (int kk = 0; kk < KQ; ++kk) {
                u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (Q_IN_REGS) {
#pragma unroll
                        for (int i = 0; i < 4; ++i) qa[mt][i] = qf[kk][i];
                    } else {
                        ldmatrix_x4(qa[mt], q_addr + 2 * (mt * 16 * LDS + kk * 16));
                    }
                }
#pragma unroll
                for (int j = 0; j < NT; j += 2) {
                    u32 b[4];
                    ldmatrix_x4(b, k_stage + 2 * (j * 8 * LDS + kk * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (kk == 0) {
                            mma_zero(s[mt][j], qa[mt], b[0], b[1]);
                            mma_zero(s[mt][j + 1], qa[mt], b[2], b[3]);
                        } else {
                            mma(s[mt][j], qa[mt], b[0], b[1]);
                            mma(s[mt][j + 1], qa[mt], b[2], b[3]);
                        }
                    }
                }
            }
#endif

            // Mask (a tile with nothing to mask skips the per-pair test).
            const bool full = tile_is_full(t, nblocks, ncols, bidx, bmask, cmask, nk, lane);
            if (!full) apply_masks(s, sKeyPos + stage * BN, sKeyMask + stage * BN, row0, lane, nq, nk, h);

#if WEFT_PRODUCER
            // K_t and its key positions and mask ids are done with (S_t completed before the masks).
            mbar_arrive(stage_bar(bar_empty_k, g));
#endif
            // Online softmax per row (two rows per m-tile and thread; a quad shares a row).
            float alpha[MT][2];
            const bool rescale = online_softmax(s, m, l, alpha, scale_log2);
#if WEFT_WGMMA
            wgmma_wait<0>();  // P_{t-1} V_{t-1}: O holds tiles up to t - 1, and pa may be rewritten
            fence_registers(oacc);
            fence_registers(pa);  // (pa's old values stay put until here: the MMA read them)
#if WEFT_PRODUCER
            // V_{t-1} is done with: P_{t-1} V_{t-1} completed.
            if (t > 0) mbar_arrive(stage_bar(bar_empty_v, g - 1));
#endif
#endif
            // Rescale O only when some row of the warp has a new maximum.
            if (__any_sync(0xffffffff, rescale)) rescale_o(o, alpha);

            // O += P V: the S accumulators become the A operand without leaving registers.
#if WEFT_WGMMA
            // P_t's fragments wait in registers for the next iteration (or the loop's end) to
            // issue P_t V_t.
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) p_fragment(s[0], kk, pa[kk]);
#else
            const u32 v_stage = v_addr + stage * STAGE_BYTES;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) p_fragment(s[mt], kk, a[mt]);
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, v_stage + 2 * (kk * 16 * LDS + dt * 8));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma(o[mt][dt], a[mt], b[0], b[1]);
                        mma(o[mt][dt + 1], a[mt], b[2], b[3]);
                    }
                }
            }
            __syncthreads();  // the stage is refilled by the next iteration's load
#endif
        }
        cp_async_wait<0>();
#if WEFT_WGMMA
        if constexpr (PINGPONG) {
            if (cwarp / 4 == 0 && ntiles > 0) named_sync(1, 256);
        }
        if (ntiles > 0) {
            // The last tile's P V, once its V has landed.
            const int last = g0 + ntiles - 1;
#if WEFT_PRODUCER
            mbar_wait(stage_bar(bar_full_v, last), fill_parity(last));
            fence_async_shared();
#else
            fence_async_shared();
            __syncthreads();
#endif
            fence_registers(pa);
            fence_registers(oacc);
            wgmma_fence();
            pv_wgmma(oacc, pa, smem_u32(sV) + last % STAGES * STAGE_BYTES);
            wgmma_wait<0>();
            fence_registers(oacc);
#if WEFT_PERSISTENT
            // The row's last V and its Q are done with (its last S completed before its masks).
            mbar_arrive(stage_bar(bar_empty_v, last));
            mbar_arrive(bar_q_empty + 8 * qbuf);
#endif
        }
#endif

        // Normalize and write the output rows at their tokens, with the natural-log log-sum-exp.
        store_output(o, m, l, row0, lane, nq, O, LSE, (size_t)h * total_q, seq_q + b);
    };
#if WEFT_PERSISTENT
    // The consumers' rows, in the producer's order (n counts the rows with tiles, as there).
    // Both warpgroups finish a row (its ping-pong included) before either starts the next.
    int g0 = 0, n = 0;
    for (int w = blockIdx.x; w < rows; w += gridDim.x) {
        begin_nth_row(w);
        if (w != (int)blockIdx.x) named_sync(3, CONSUMER_WARPS * 32);
        consume_row(g0, n % 2);
        g0 += ntiles;
        n += ntiles > 0;
    }
#else
    consume_row(0, 0);
#endif
}
