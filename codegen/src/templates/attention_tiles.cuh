// The attention kernel's tiles: where a tile's keys come from (a key block or a chunk of the
// column list), the swizzled layout of the wgmma path, and P as an A fragment.
#pragma once
#include "attention_shape.cuh"

#if WEFT_WGMMA
// Byte offset of the 16 bytes at columns col..col+7 of row r in a tile of ROWS rows: 64-column
// panels of ROWS x 128 bytes in the 128-byte swizzle.
template <int ROWS>
__device__ __forceinline__ u32 tile_chunk(int r, int col) {
    return (u32)((col / 64) * ROWS * 128) + swizzle128(r, col % 64);
}
#endif

// The A fragment of P for keys 16 kk .. 16 kk + 15 of a 16-row m-tile, from its exponentiated
// S accumulators (mma.sync's and wgmma's register layouts agree): bf16 pairs, in place.
__device__ __forceinline__ void p_fragment(const float (&s)[NT][4], int kk, u32 (&a)[4]) {
    a[0] = pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Where tile `t`'s keys come from: a key block (keys base + r) or a chunk of the column list.
struct TileSource {
    bool is_block;
    int base;    // first key position of a block, or first column of the chunk
    int count;   // keys in the tile
    u16 mask;    // the block's mask id (columns carry their own)
};

__device__ __forceinline__ TileSource tile_source(int t, u32 nblocks, u32 ncols, const u32* bidx, const u16* bmask, int nk) {
    TileSource s;
    s.is_block = t < (int)nblocks;
    if (s.is_block) {
        s.base = (int)bidx[t] * BN;
        s.count = min(BN, nk - s.base);
        s.mask = bmask[t];
    } else {
        s.base = (t - (int)nblocks) * BN;
        s.count = min(BN, (int)ncols - s.base);
        s.mask = FULL;
    }
    return s;
}
