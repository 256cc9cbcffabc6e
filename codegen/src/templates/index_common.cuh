// Index builders: constants and conversions every builder uses.
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"

// D, the entry points' thread counts and the ABI codes of the device plans come from the config.
static_assert(COLUMNS_THREADS == 32 * ROWS_PER_CTA && BLOCK_ROWS_THREADS == 32 * ROWS_PER_CTA,
              "columns and block_rows: a warp per index row");
static_assert(KSTATS_THREADS == 256 && KSTATS_KEYS == 8 * 8, "kstats: 8 warps x 8 keys");
constexpr int LDS = D + 8;               // padded shared row (elements)
constexpr int CHUNKS = D / 8;            // 16-byte chunks per row
constexpr float APPROX_ERR = 1.0f / 4096.0f;
// From the config as well (the host sizes grids and shared memory with them): SCORE_ROWS
// (groups per score CTA, 4 warps x 16), SCORE_COLS (keys per score CTA), HIST (11-bit radix
// histograms), UNSURE_CAP (keys per group scored exactly); DROP_CODE (column rule: the row's
// blocks compute this key already), PER_COLUMN and PER_LINE (rule and line codes from there on
// index per-key and per-offset codes).
static_assert(THRESHOLD_THREADS == SELECT_THREADS && BUDGET_THREADS == SELECT_THREADS,
              "threshold and budget run with select's block shape");

// Status words of select, for the build's report (none stops the build: the device needs no
// host decision between selection and attention): status[0] is the largest of the codes below
// among the groups ranked exactly over all keys, status[1] counts the groups that took the
// slow path, status[2] the groups ranked exactly over all keys.
constexpr int STATUS_TOO_MANY_UNSURE = 1;  // many near-equal keys at the cut (inputs, not a bug)
constexpr int STATUS_BOUND = 2;            // an error bound did not hold (a bug)

__device__ __forceinline__ float bf16_to_float(u16 x) { return __uint_as_float((u32)x << 16); }
__device__ __forceinline__ u16 float_to_bf16(float x) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(0.f), "f"(x));
    return (u16)(r & 0xffff);
}

// Floats to unsigned keys that sort the same way (finite inputs).
__device__ __forceinline__ u32 float_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
