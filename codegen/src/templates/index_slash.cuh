// Vertical-slash and grid selection (vs_*, grid_select) and vv_exact.
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"
#include "index_repro.cuh"


// ======================================================================================
// Vertical-slash index building (weft_patterns::device_plan::SlashPlan).
// Per head, the softmax of the last `last` queries over the keys the plan allows, in the CPU
// builder's arithmetic (weft_patterns::repro: its dot, repro_exp below, row totals in
// chunks of SUM_CHUNK keys), gives column masses (verticals) and diagonal masses (slashes);
// each is cut to its top-k exactly as the CPU cuts it (mass, then the lower id). Then the
// index rows: the tiles the slashes cross through the plan's block entries (block_rows), and
// the verticals outside kept tiles through its column rules (columns). Launch order, per chunk
// of heads: vs_logits, vs_exp, vs_inv, vs_mass; then vs_select (grid_select for a grid),
// vs_tiles; then block_rows and columns counting (pass 0), scan of each, and block_rows and
// columns writing (pass 1).
// Everything is exact, so there are no bounds and no slow path: the GPU index is the CPU's.
// ======================================================================================

// VS_ROWS (estimated rows per logits CTA, 8 per warp), VS_KEYS (keys per logits CTA, 8 per lane),
// VS_EXP_KEYS (keys per vs_exp CTA) and SUM_CHUNK (keys per partial row sum, repro::SUM_CHUNK)
// come from the config.
constexpr int VS_DC = 16;                // dimensions staged in shared memory per step
static_assert(VS_ROWS == 8 * 8 && VS_KEYS == 8 * 32, "vs_logits: 8 warps x 8 rows, 32 lanes x 8 keys");

// double_key / key_double (doubles to ordered keys) come from the vertical-vector part.

// The 64 x 256 tile of f64 dots vs_logits and vv_exact compute: acc[i][l] = row (r0 + 8 tr +
// i) . key (k0 + tk + 32 l), with tr = tid / 32 and tk = tid % 32, one accumulator per pair
// over the dimensions in order (repro::dot). Rows come from rows.at(row, d) (0 past the end),
// keys are bf16 rows of K (0 past nk); both are staged in shared memory as doubles, VS_DC
// dimensions at a time. Every thread of the CTA calls it.
template <class Rows>
__device__ __forceinline__ void dot_tile(const Rows& rows, const u16* K, int kv, int nk, int k0, int r0,
                                         double (&acc)[8][8]) {
    __shared__ double sQ[VS_ROWS][VS_DC];
    __shared__ double sK[VS_KEYS][VS_DC + 1];
    const int tid = threadIdx.x, tr = tid / 32, tk = tid % 32;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int l = 0; l < 8; ++l) acc[i][l] = 0.0;
    for (int d0 = 0; d0 < D; d0 += VS_DC) {
        for (int i = tid; i < VS_ROWS * VS_DC; i += 256)
            sQ[i / VS_DC][i % VS_DC] = rows.at(r0 + i / VS_DC, d0 + i % VS_DC);
        for (int i = tid; i < VS_KEYS * VS_DC; i += 256) {
            const int c = k0 + i / VS_DC;
            sK[i / VS_DC][i % VS_DC] = c < nk ? (double)bf16_to_float(K[((size_t)kv * nk + c) * D + d0 + i % VS_DC]) : 0.0;
        }
        __syncthreads();
#pragma unroll 4
        for (int d = 0; d < VS_DC; ++d) {
            double a[8], b[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                a[i] = sQ[8 * tr + i][d];
                b[i] = sK[tk + 32 * i][d];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int l = 0; l < 8; ++l) acc[i][l] = fma(a[i], b[l], acc[i][l]);
        }
        __syncthreads();
    }
}
// dot_tile's rows: the last `last` queries of head h (bf16).
struct LastQueries {
    const u16* Q;
    int h, nq, last;
    __device__ double at(int row, int d) const {
        return row < last ? (double)bf16_to_float(Q[((size_t)h * nq + (nq - last + row)) * D + d]) : 0.0;
    }
};
// dot_tile's rows: the pooled queries of head h's groups (f32).
struct PooledGroups {
    const float* pooled;
    int h, groups;
    __device__ double at(int g, int d) const {
        return g < groups ? (double)pooled[((size_t)h * groups + g) * D + d] : 0.0;
    }
};

// ---- vs_logits: grid (ceil(nk / VS_KEYS), ceil(last / VS_ROWS), heads of the chunk), 256
// threads ----
// logits[hh][r][c] = scale * dot(q_(nq - last + r), k_c) as the CPU computes it (repro::dot:
// one f64 accumulator, dimensions in order; fma is exact here, products of two floats being
// exact in f64), -inf where the plan does not allow the pair; rowmax[hh][r] = the row's
// largest (as a key). Each thread holds 8 rows x 8 keys, so shared-memory reads (16 doubles
// per 64 multiply-adds) keep up with the f64 units.
extern "C" __global__ void __launch_bounds__(VS_LOGITS_THREADS) WEFT_ENTRY(vs_logits)(VS_LOGITS_PARAMS)
{

    const int hh = blockIdx.z, h = h0 + hh, kv = h / (hq / hkv), tid = threadIdx.x;
    const int k0 = blockIdx.x * VS_KEYS, r0 = blockIdx.y * VS_ROWS;
    const int tr = tid / 32, tk = tid % 32;  // rows r0 + 8 tr + i, keys k0 + tk + 32 l
    double acc[8][8];
    dot_tile(LastQueries{Q, h, nq, last}, K, kv, nk, k0, r0, acc);
    const int words = (nk + 31) / 32;
    const u32* allow = allowed + (size_t)(per_head ? h : 0) * last * words;
    const double ninf = __longlong_as_double(0xfff0000000000000LL);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = r0 + 8 * tr + i;
        double m = ninf;
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            const int c = k0 + tk + 32 * l;
            if (row < last && c < nk) {
                const bool ok = (allow[(size_t)row * words + c / 32] >> (c % 32)) & 1u;
                const double s = ok ? __dmul_rn(scale, acc[i][l]) : ninf;
                logits[((size_t)hh * last + row) * nk + c] = s;
                m = fmax(m, s);
            }
        }
        // The warp holds the row.
        for (int o = 16; o > 0; o /= 2) m = fmax(m, __shfl_xor_sync(0xffffffff, m, o));
        if (tk == 0 && row < last && m != ninf) atomicMax(rowmax + (size_t)hh * last + row, double_key(m));
    }
}

// ---- vs_exp: grid (ceil(nk / VS_EXP_KEYS), last, heads of the chunk), 256 threads ----
// In place: logits -> repro_exp(logit - row max) (0 for pairs not allowed, and for rows with
// none); partial[hh][r][chunk] = the chunk's weights summed left to right.
extern "C" __global__ void __launch_bounds__(VS_EXP_THREADS) WEFT_ENTRY(vs_exp)(VS_EXP_PARAMS)
{

    __shared__ double e[VS_EXP_KEYS];
    const int hh = blockIdx.z, r = blockIdx.y, tid = threadIdx.x;
    const int c0 = blockIdx.x * VS_EXP_KEYS;
    const unsigned long long mk = rowmax[(size_t)hh * last + r];
    const double mx = key_double(mk);
    double* row = weights + ((size_t)hh * last + r) * nk;
    for (int i = tid; i < VS_EXP_KEYS; i += 256) {
        const int c = c0 + i;
        double v = 0.0;
        if (c < nk) {
            v = mk == 0 ? 0.0 : repro_exp(__dsub_rn(row[c], mx));
            row[c] = v;
        }
        e[i] = v;
    }
    __syncthreads();
    const int chunks = (nk + SUM_CHUNK - 1) / SUM_CHUNK;
    if (tid < VS_EXP_KEYS / SUM_CHUNK) {
        const int chunk = blockIdx.x * (VS_EXP_KEYS / SUM_CHUNK) + tid;
        if (chunk < chunks) {
            double sum = 0.0;
            for (int i = 0; i < SUM_CHUNK; ++i) sum = __dadd_rn(sum, e[tid * SUM_CHUNK + i]);
            partial[((size_t)hh * last + r) * chunks + chunk] = sum;
        }
    }
}

// ---- vs_inv: grid (heads of the chunk), 256 threads ----
// inv[hh][r] = 1 / (row r's total: its chunk sums left to right), or 0 for a row with no key.
// Once per row here, so that each vs_mass CTA reads `last` doubles instead of every partial.
extern "C" __global__ void __launch_bounds__(VS_INV_THREADS) WEFT_ENTRY(vs_inv)(VS_INV_PARAMS)
{

    const int hh = blockIdx.x, tid = threadIdx.x;
    const int chunks = (nk + SUM_CHUNK - 1) / SUM_CHUNK;
    for (int r = tid; r < last; r += 256) {
        const double* p = partial + ((size_t)hh * last + r) * chunks;
        double t = 0.0;
        for (int c = 0; c < chunks; ++c) t = __dadd_rn(t, p[c]);
        inv[(size_t)hh * last + r] = t > 0.0 ? __ddiv_rn(1.0, t) : 0.0;
    }
}

// ---- vs_mass: grid (ceil((nq + nk) / 256), or ceil(nk / 256) for a grid, heads of the chunk),
// 256 threads; dynamic shared memory last doubles ----
// Per key c: vert[h][c] = sum over rows in order of weight * inv (vs_inv), and, unless
// `slashes` is 0 (a grid reads no diagonals), per diagonal i = r + nk - c: slash[h][i] likewise
// (the CPU's order; pairs not allowed, and rows with no key, add +0, which changes no sum).
extern "C" __global__ void __launch_bounds__(VS_MASS_THREADS) WEFT_ENTRY(vs_mass)(VS_MASS_PARAMS)
{

    extern __shared__ __align__(16) unsigned char smem[];
    double* inv = (double*)smem;
    const int hh = blockIdx.y, h = h0 + hh, tid = threadIdx.x;
    for (int r = tid; r < last; r += 256) inv[r] = inv_rows[(size_t)hh * last + r];
    __syncthreads();
    static_assert(VS_MASS_THREADS == VS_MASS_KEYS, "vs_mass: a thread per key or diagonal");
    const long long i = (long long)blockIdx.x * VS_MASS_KEYS + tid;
    const double* w = weights + (size_t)hh * last * nk;
    if (i < nk) {
        double m = 0.0;
        for (int r = 0; r < last; ++r)
            m = __dadd_rn(m, __dmul_rn(w[(size_t)r * nk + i], inv[r]));
        vert[(size_t)h * nk + i] = m;
    }
    if (slashes && i < (long long)nq + nk) {
        double m = 0.0;
        for (int r = 0; r < last; ++r) {
            const long long c = (long long)(nq - last + r) + nk - i;
            if (c >= 0 && c < nk) m = __dadd_rn(m, __dmul_rn(w[(size_t)r * nk + c], inv[r]));
        }
        slash[(size_t)h * ((size_t)nq + nk) + i] = m;
    }
}

// ---- vs_select: grid (hq, 2), 1024 threads ----
// blockIdx.y = 0: the vertical_k heaviest keys of vert[h]; 1: the slash_k heaviest diagonals of
// slash[h]. Ties go to the lower id, zero masses are never kept. Eight 8-bit radix passes over
// the masses' bits (positive doubles order as integers) find the cut; one ordered pass writes
// the chosen ids ascending to vlist[h] / slist[h] and their count to counts[y * hq + h].
extern "C" __global__ void __launch_bounds__(VS_SELECT_THREADS) WEFT_ENTRY(vs_select)(VS_SELECT_PARAMS)
{

    __shared__ u32 hist[256];
    __shared__ u32 w_eq[32], w_take[32];
    __shared__ u32 s_positive, s_bin, s_need;
    const int h = blockIdx.x, which = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const u32 n = which == 0 ? (u32)nk : (u32)(nq + nk);
    const double* v = which == 0 ? vert + (size_t)h * nk : slash + (size_t)h * ((size_t)nq + nk);
    const u32 want = which == 0 ? (u32)vertical_k : (u32)slash_k;
    u32* out = which == 0 ? vlist + (size_t)h * vertical_k : slist + (size_t)h * slash_k;
    if (tid == 0) s_positive = 0;
    __syncthreads();
    u32 mine = 0;
    for (u32 i = tid; i < n; i += 1024) mine += v[i] > 0.0;
    for (int o = 16; o > 0; o /= 2) mine += __shfl_xor_sync(0xffffffff, mine, o);
    if (lane == 0) atomicAdd(&s_positive, mine);
    __syncthreads();
    const u32 keep = min(want, s_positive);
    // The keep-th largest positive mass, 8 bits at a time; `need` of its ties are kept.
    unsigned long long cut = 0;
    u32 need = keep;
    for (int shift = 56; shift >= 0 && keep > 0; shift -= 8) {
        for (int b = tid; b < 256; b += 1024) hist[b] = 0;
        __syncthreads();
        const unsigned long long high = shift == 56 ? 0ull : (~0ull << (shift + 8));
        for (u32 i = tid; i < n; i += 1024) {
            const double x = v[i];
            const unsigned long long u = (unsigned long long)__double_as_longlong(x);
            if (x > 0.0 && (u & high) == (cut & high)) atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            u32 above = 0;
            int b = 255;
            for (; b > 0; --b) {
                if (above + hist[b] >= need) break;
                above += hist[b];
            }
            s_bin = (u32)b;
            s_need = need - above;
        }
        __syncthreads();
        cut |= (unsigned long long)s_bin << shift;
        need = s_need;
        __syncthreads();
    }
    // In id order: every mass above the cut, and the first `need` equal to it.
    u32 written = 0, ties_seen = 0;
    for (u32 base = 0; base < n && keep > 0; base += 1024) {
        const u32 i = base + tid;
        bool above = false, tie = false;
        if (i < n) {
            const double x = v[i];
            const unsigned long long u = (unsigned long long)__double_as_longlong(x);
            above = x > 0.0 && u > cut;
            tie = x > 0.0 && u == cut;
        }
        const u32 below_lane = (1u << lane) - 1;
        const u32 tie_bits = __ballot_sync(0xffffffff, tie);
        if (lane == 0) w_eq[warp] = __popc(tie_bits);
        __syncthreads();
        u32 ties_before = ties_seen, tile_ties = 0;
        // (Unrolled by 8, not fully: fully unrolled, both scans spill on sm_80.)
#pragma unroll 8
        for (int w = 0; w < 32; ++w) {
            if (w < warp) ties_before += w_eq[w];
            tile_ties += w_eq[w];
        }
        const bool take = above || (tie && ties_before + __popc(tie_bits & below_lane) < need);
        const u32 take_bits = __ballot_sync(0xffffffff, take);
        if (lane == 0) w_take[warp] = __popc(take_bits);
        __syncthreads();
        u32 at = written, tile_take = 0;
#pragma unroll 8
        for (int w = 0; w < 32; ++w) {
            if (w < warp) at += w_take[w];
            tile_take += w_take[w];
        }
        if (take) out[at + __popc(take_bits & below_lane)] = i;
        written += tile_take;
        ties_seen += tile_ties;
        __syncthreads();
    }
    if (tid == 0) counts[which * hq + h] = (int)written;
}

// (best, pos) across the warp: the largest mass, ties to the lowest position; every lane
// gets the result.
__device__ __forceinline__ void warp_argmax(double& best, int& pos) {
    for (int o = 16; o > 0; o /= 2) {
        const double b = __shfl_xor_sync(0xffffffff, best, o);
        const int p = __shfl_xor_sync(0xffffffff, pos, o);
        if (b > best || (b == best && p < pos)) best = b, pos = p;
    }
}

// ---- grid_select: grid (hq), 1024 threads ----
// For a grid: the phase (`phase`, or when negative the heaviest in-frame position of vert[h]
// folded modulo the stride, each position's masses summed in key order from 0, ties to the
// lowest position, as weft_patterns' grid_phase) to phases[h]; with column lines (`cols`)
// the keys phase, phase + stride, ... to vlist[h] (cap per head) and their count to
// counts[h]; no slashes (counts[hq + h] = 0).
extern "C" __global__ void __launch_bounds__(GRID_SELECT_THREADS) WEFT_ENTRY(grid_select)(GRID_SELECT_PARAMS)
{

    __shared__ double w_best[32];
    __shared__ int w_pos[32];
    __shared__ int s_phase;
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    if (phase < 0) {
        const double* v = vert + (size_t)h * nk;
        // Each thread's positions ascend, so a strictly larger mass is the only way to win.
        double best = -1.0;
        int pos = 0x7fffffff;
        // Positions from nk on hold no key: their mass is 0, which position 0 ties or beats.
        for (int i = tid; i < min(stride, nk); i += 1024) {
            double m = 0.0;
            for (long long k = i; k < nk; k += stride) m = __dadd_rn(m, v[k]);
            if (m > best) best = m, pos = i;
        }
        warp_argmax(best, pos);
        if (lane == 0) w_best[warp] = best, w_pos[warp] = pos;
        __syncthreads();
        if (warp == 0) {
            best = w_best[lane];
            pos = w_pos[lane];
            warp_argmax(best, pos);
            if (lane == 0) s_phase = pos;
        }
        __syncthreads();
    } else if (tid == 0) {
        s_phase = phase;
    }
    __syncthreads();
    const int p = s_phase;
    const int count = cols && p < nk ? (nk - p + stride - 1) / stride : 0;
    for (int j = tid; j < count; j += 1024) vlist[(size_t)h * cap + j] = (u32)(p + j * stride);
    if (tid == 0) {
        counts[h] = count;
        counts[hq + h] = 0;
        phases[h] = p;
    }
}

// ---- vs_tiles: grid (groups, hq), 128 threads ----
// tiles[(h * groups + g) * words ..]: bit kb set when one of head h's slashes crosses pattern
// tile (g, kb): diagonal i meets row q at key q + nk - i.
extern "C" __global__ void __launch_bounds__(VS_TILES_THREADS) WEFT_ENTRY(vs_tiles)(VS_TILES_PARAMS)
{

    const int g = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const int words = (kblocks + 31) / 32;
    u32* out = tiles + ((size_t)h * groups + g) * words;
    for (int w = tid; w < words; w += 128) out[w] = 0;
    __syncthreads();
    const long long q0 = (long long)g * block, q1 = min(q0 + block, (long long)nq);
    const int slashes = counts[hq + h];
    for (int s = tid; s < slashes; s += 128) {
        const long long i = slist[(size_t)h * slash_k + s];
        const long long last_key = q1 - 1 + nk - i;
        const long long lo = max(q0 + nk - i, 0ll), hi = min(last_key, (long long)nk - 1);
        if (last_key < 0 || lo > hi) continue;
        for (long long kb = lo / block; kb <= hi / block; ++kb) atomicOr(out + kb / 32, 1u << (kb % 32));
    }
}

// ---- vv_exact: grid (ceil(nk / VS_KEYS), ceil(groups / VS_ROWS), heads of the chunk), 256
// threads ----
// For vertical_vector(keep = top_p(p)), whose budget weighs every candidate: exact[hh][g][c] =
// scale * repro::dot(pooled q of group g, k_c) for every key (the CPU builder's score), and
// best[hh][g] the largest over the group's candidates cand_lo..cand_hi (as a key; 0 for
// none: clear it first). The tiles are vs_logits' with pooled rows for the last queries.
extern "C" __global__ void __launch_bounds__(VV_EXACT_THREADS) WEFT_ENTRY(vv_exact)(VV_EXACT_PARAMS)
{

    const int hh = blockIdx.z, h = h0 + hh, kv = h / (hq / hkv), tid = threadIdx.x;
    const int k0 = blockIdx.x * VS_KEYS, g0 = blockIdx.y * VS_ROWS;
    const int tr = tid / 32, tk = tid % 32;  // groups g0 + 8 tr + i, keys k0 + tk + 32 l
    double acc[8][8];
    dot_tile(PooledGroups{pooled, h, groups}, K, kv, nk, k0, g0, acc);
    const double ninf = __longlong_as_double(0xfff0000000000000LL);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int g = g0 + 8 * tr + i;
        const int slot = (per_head ? h : 0) * groups + min(g, groups - 1);
        const u32 lo = cand_lo[slot], hi = cand_hi[slot];
        double m = ninf;
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            const int c = k0 + tk + 32 * l;
            if (g < groups && c < nk) {
                const double s = __dmul_rn(scale, acc[i][l]);
                exact[((size_t)hh * groups + g) * nk + c] = s;
                if ((u32)c >= lo && (u32)c < hi) m = fmax(m, s);
            }
        }
        // The warp holds the group.
        for (int o = 16; o > 0; o /= 2) m = fmax(m, __shfl_xor_sync(0xffffffff, m, o));
        if (tk == 0 && g < groups && m != ninf) atomicMax(best + (size_t)hh * groups + g, double_key(m));
    }
}
