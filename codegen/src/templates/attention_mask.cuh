// The attention kernel's masks: which tiles need no per-pair test, and the per-pair test of
// the others through the index's mask predicates (masks.cuh).
#pragma once
#include "attention_shape.cuh"
#include "masks.cuh"

// Whether tile `t` of the row has nothing to mask: a key block in range without a predicate,
// or a whole chunk of BN columns none of which carries one (the warp reads the chunk's mask
// ids together). The scale is folded into exp2 later, so masked scores are only set to -inf.
__device__ __forceinline__ bool tile_is_full(int t, u32 nblocks, u32 ncols, const u32* bidx, const u16* bmask,
                                             const u16* cmask, int nk, int lane) {
    if (t < (int)nblocks) {
        return bmask[t] == FULL && ((int)bidx[t] + 1) * BN <= nk;
    } else {
        const int first = (t - (int)nblocks) * BN;
        bool clean = first + BN <= (int)ncols;
#pragma unroll
        for (int k = lane; k < BN; k += 32) clean = clean && cmask[first + k] == FULL;
        return __all_sync(0xffffffff, clean) != 0;
    }
}

// Sets to -inf this thread's scores of the tile that the index drops: keys past the list
// (`kpos` -1), queries past the sequence, and pairs a key's mask id rejects. `kpos` and
// `kmask` are the stage's key positions and mask ids; `row0` is the index position of this
// thread's first row.
__device__ __forceinline__ void apply_masks(float (&s)[MT][NT][4], const int* kpos, const u16* kmask, int row0,
                                            int lane, int nq, int nk, int h) {
    // Whether query `qpos` keeps key `key` of the tile.
    auto keeps = [&](int key, int qpos) {
        const int kp = kpos[key];
        const u16 id = kmask[key];
        return kp >= 0 && qpos < nq && (id == FULL || weft_mask(id, qpos, kp, h, nq, nk));
    };
    if constexpr (MASKS <= 4) {
        // Few predicates: every test inlined; each key's loads serve all of the thread's rows.
        // (The test is written out rather than calling `keeps`: with the lambda, ptxas
        // spilled 76 B instead of 8 at 128 x 64 tiles.)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int key = j * 8 + (lane % 4) * 2 + c;
                const int kp = kpos[key];
                const u16 id = kmask[key];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const int qpos = row0 + mt * 16 + 8 * i;
                        const bool keep = kp >= 0 && qpos < nq && (id == FULL || weft_mask(id, qpos, kp, h, nq, nk));
                        if (!keep) s[mt][j][2 * i + c] = neg_inf();
                    }
                }
            }
        }
    } else {
        // Many predicates (e.g. one per head): the tests run in a rolled loop into a
        // bit set, so the predicate switch is compiled once per 64 scores, not once
        // per score, and compile time stays flat in the mask count.
        constexpr int SCORES = NT * 2 * MT * 2;
        constexpr int WORDS = (SCORES + 63) / 64;
        unsigned long long kept[WORDS];
#pragma unroll
        for (int w = 0; w < WORDS; ++w) {
            unsigned long long bits = 0;
#pragma unroll 1
            for (int e = w * 64; e < min(SCORES, w * 64 + 64); ++e) {
                // e = ((j * 2 + c) * MT + mt) * 2 + i
                const int i = e % 2, mt = (e / 2) % MT, c = (e / (2 * MT)) % 2, j = e / (4 * MT);
                bits |= (unsigned long long)keeps(j * 8 + (lane % 4) * 2 + c, row0 + mt * 16 + 8 * i) << (e - w * 64);
            }
            kept[w] = bits;
        }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const int e = ((j * 2 + c) * MT + mt) * 2 + i;
                        if (!((kept[e / 64] >> (e % 64)) & 1)) s[mt][j][2 * i + c] = neg_inf();
                    }
    }
}
