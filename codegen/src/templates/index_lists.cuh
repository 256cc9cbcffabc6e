// The index's row lists from the selections through the plan's codes: columns, block_rows
// (a count pass, then a write pass) and scan (counts to row pointers).
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"

// Row lines of a grid at an estimated phase (weft_patterns::device_plan::LineCodes): the
// offset in query block qb of head h of its first line row when it is below line_len (then
// the block takes line codes; a short last block may still hold no line row, which its codes
// say), else -1, as without row lines (line_len == 0). line_phase[h] is below line_stride.
__device__ __forceinline__ int line_offset(
    const int* __restrict__ line_phase, int line_stride, int line_len, int h, int qb, int block_m)
{
    if (line_len == 0) return -1;
    const int q0_mod = (int)((long long)qb * block_m % line_stride);
    const int r = (line_phase[h] + line_stride - q0_mod) % line_stride;
    return r < line_len ? r : -1;
}

// The entry code of line code `code` at offset r: the code itself, or one of a vector.
__device__ __forceinline__ u16 line_code(u32 code, const u16* __restrict__ line_codes, int r)
{
    return code >= PER_LINE ? line_codes[code - PER_LINE + r] : (u16)code;
}

// ---- columns: grid (ceil(rows / 4)), 128 threads: one warp per index row ----
// Pass 0 counts each row's column entries into row_count; pass 1 writes them at col_ptr. The
// chosen keys of a group are a list (cap per group, chosen_count long) or, with words > 0, a
// bitmap of `words` words per group.
// With tile_words > 0 (vertical-slash), a chosen key inside a tile set in `tiles` (tile_block
// square, tile_groups query groups per head) is dropped: the tile computes it. Query blocks
// holding grid row lines (line_offset) read the rule rows from line_rule_base on.
extern "C" __global__ void __launch_bounds__(COLUMNS_THREADS) WEFT_ENTRY(columns)(COLUMNS_PARAMS)
{

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * ROWS_PER_CTA + warp;
    if (row >= hq * q_blocks) return;
    const int h = row / q_blocks, qb = row % q_blocks;
    const int g = qb * block_m / q_block;
    const u32* cols = chosen + ((size_t)h * groups + g) * (words > 0 ? words : cap);
    // (A group never chooses more than cap keys; the clamp keeps a wrong count from reading
    // past the group's list of chosen keys.)
    const int n = words > 0 ? 0 : min(chosen_count[(size_t)h * groups + g], cap);
    const int line = line_offset(line_phase, line_stride, line_len, h, qb, block_m);
    const int rrow = (line >= 0 ? line_rule_base : 0) + (per_head ? h : 0) * q_blocks + qb;
    const u32 r0 = rule_ptr[rrow], r1 = rule_ptr[rrow + 1];
    const u32* row_tiles = tile_words > 0 ? tiles + ((size_t)h * tile_groups + qb * block_m / tile_block) * tile_words : tiles;
    // The entry code of chosen key c in this row (DROP_CODE for none).
    auto code_of = [&](u32 c) {
        const bool in_tile = tile_words > 0 && ((row_tiles[c / tile_block / 32] >> (c / tile_block % 32)) & 1u);
        if (in_tile) return DROP_CODE;
        // The last run starting at or before c.
        u32 a = r0, b = r1;
        while (a < b) {
            const u32 m = (a + b) / 2;
            if (rule_c0[m] <= c) a = m + 1; else b = m;
        }
        u32 code = FULL;
        if (a > r0 && c < rule_c1[a - 1]) {
            const u32 rc = rule_code[a - 1];
            code = rc >= PER_COLUMN && rc < PER_LINE ? codes[rc - PER_COLUMN + (c - rule_c0[a - 1])] : rc;
        }
        return line_code(code, line_codes, max(line, 0));
    };
    u32 written = 0;
    if (words > 0) {
        // A bitmap: lane l takes word base + l; its entries go after those of lower lanes.
        for (int base = 0; base < words; base += 32) {
            const int w = base + lane;
            const u32 word = w < words ? cols[w] : 0u;
            u32 mine = 0;
            for (u32 rest = word; rest; rest &= rest - 1) mine += code_of(w * 32 + __ffs(rest) - 1) != DROP_CODE;
            u32 incl = mine;
            for (int o = 1; o < 32; o *= 2) {
                const u32 v = __shfl_up_sync(0xffffffff, incl, o);
                if (lane >= o) incl += v;
            }
            if (pass == 1) {
                u32 at = col_ptr[row] + written + incl - mine;
                for (u32 rest = word; rest; rest &= rest - 1) {
                    const u32 c = w * 32 + __ffs(rest) - 1;
                    const u16 code = code_of(c);
                    if (code != DROP_CODE) {
                        col_idx[at] = c;
                        col_mask[at] = code;
                        ++at;
                    }
                }
            }
            written += __shfl_sync(0xffffffff, incl, 31);
        }
    }
    for (int base = 0; base < n && words == 0; base += 32) {
        const int i = base + lane;
        const u32 c = i < n ? cols[i] : 0u;
        const u16 code = i < n ? code_of(c) : DROP_CODE;
        const bool keep = code != DROP_CODE;
        const u32 ballot = __ballot_sync(0xffffffff, keep);
        if (pass == 1 && keep) {
            const u32 at = col_ptr[row] + written + __popc(ballot & ((1u << lane) - 1));
            col_idx[at] = c;
            col_mask[at] = code;
        }
        written += __popc(ballot);
    }
    if (pass == 0 && lane == 0) row_count[row] = written;
}

// ---- scan: one CTA of 1024 threads: col_ptr[0] = 0, col_ptr[r + 1] = sum of counts to r ----
extern "C" __global__ void __launch_bounds__(SCAN_THREADS) WEFT_ENTRY(scan)(SCAN_PARAMS)
{

    __shared__ u32 part[1024];
    const int tid = threadIdx.x;
    const int per = (rows + 1023) / 1024;
    const int r0 = min(tid * per, rows), r1 = min(r0 + per, rows);
    u32 mine = 0;
    for (int r = r0; r < r1; ++r) mine += row_count[r];
    part[tid] = mine;
    __syncthreads();
    for (int o = 1; o < 1024; o *= 2) {
        const u32 v = tid >= o ? part[tid - o] : 0;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    u32 run = part[tid] - mine;
    if (tid == 0) col_ptr[0] = 0;
    for (int r = r0; r < r1; ++r) {
        run += row_count[r];
        col_ptr[r + 1] = run;
    }
}

// ---- block_rows: grid (ceil(rows / 4)), 128 threads: one warp per index row ----
// Each possible key block of the row gets its code when its pattern block is chosen, else
// the other, or in a query block holding grid row lines (line_offset) its line code; pass 0
// counts entries into row_count, pass 1 writes them at block_ptr.
extern "C" __global__ void __launch_bounds__(BLOCK_ROWS_THREADS) WEFT_ENTRY(block_rows)(BLOCK_ROWS_PARAMS)
{

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * ROWS_PER_CTA + warp;
    if (row >= hq * q_blocks) return;
    const int h = row / q_blocks, qb = row % q_blocks;
    const int g = qb * block_m / block_q;
    const int words = (kblocks + 31) / 32;
    const u32* sel = chosen + ((size_t)h * groups + g) * words;
    const int rrow = (per_head ? h : 0) * q_blocks + qb;
    const u32 e0 = entry_ptr[rrow], e1 = entry_ptr[rrow + 1];
    const int line = line_offset(line_phase, line_stride, line_len, h, qb, block_m);
    u32 written = 0;
    for (u32 base = e0; base < e1; base += 32) {
        const u32 e = base + lane;
        u16 code = DROP_CODE;
        if (e < e1 && line >= 0) {
            code = line_code(code_line[e], line_codes, line);
        } else if (e < e1) {
            const u32 pkb = entry_pattern_kb[e];
            code = ((sel[pkb / 32] >> (pkb % 32)) & 1u) ? code_sel[e] : code_not[e];
        }
        const bool keep = e < e1 && code != DROP_CODE;
        const u32 ballot = __ballot_sync(0xffffffff, keep);
        if (pass == 1 && keep) {
            const u32 at = block_ptr[row] + written + __popc(ballot & ((1u << lane) - 1));
            block_idx[at] = entry_kb[e];
            block_mask[at] = code;
        }
        written += __popc(ballot);
    }
    if (pass == 0 && lane == 0) row_count[row] = written;
}
