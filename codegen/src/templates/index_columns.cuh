// Vertical-vector column selection: score, threshold, select, budget.
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"
#include "index_repro.cuh"

// The key of sample column j: one run of 32 keys out of every 16, at an offset hashed from the
// block of 16 runs (stratified, so that periodic structure in the keys cannot line up with it).
__device__ __forceinline__ u32 sample_key(u32 j) {
    const u32 block = j / 32;
    const u32 offset = ((block * 2654435761u) >> 16) % 16;
    return (block * 16 + offset) * 32 + j % 32;
}

// ---- score: grid (ceil(groups / 64), ceil(cols / 128), heads of the chunk), 128 threads ----
// Approximate dots pooled_q[h0 + hh][g] . k (unscaled) over `cols` columns, by mode:
//   SCORE_DENSE   approx[hh][g][c] for every key c (cols = nk);
//   SCORE_SAMPLE  approx[hh][g][j] for sample column j, key sample_key(j) (cols = samples);
//   SCORE_EMIT    every key c of the group's candidates scoring at least thresh[.][0] is
//                 appended, with its score, to the group's list (list_cap entries; the count
//                 goes on past it, so the select kernel sees an overflow), and list_high counts
//                 those at least thresh[.][1] (cols = nk).
[[maybe_unused]] constexpr int SCORE_DENSE = 0, SCORE_SAMPLE = 1, SCORE_EMIT = 2;
constexpr int SCORE_NT = SCORE_COLS / 8;  // 8-key column tiles of a warp's scores

// One tile's scores: the 16 x 128 of this warp (groups warp * 16 + lane / 4 (+ 8), keys
// j * 8 + (lane % 4) * 2 (+ 1)) of pooled q (hi and lo halves at hi_addr and lo_addr, this
// lane's ldmatrix addresses) against the 128 keys at k_addr.
__device__ __forceinline__ void score_tile(float (&s)[SCORE_NT][4], u32 hi_addr, u32 lo_addr, u32 k_addr) {
#pragma unroll
    for (int j = 0; j < SCORE_NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        u32 ahi[4], alo[4];
        ldmatrix_x4(ahi, hi_addr + 2 * (kk * 16));
        ldmatrix_x4(alo, lo_addr + 2 * (kk * 16));
#pragma unroll
        for (int j = 0; j < SCORE_NT; j += 2) {
            u32 b[4];
            ldmatrix_x4(b, k_addr + 2 * (j * 8 * LDS + kk * 16));
            mma(s[j], ahi, b[0], b[1]);
            mma(s[j], alo, b[0], b[1]);
            mma(s[j + 1], ahi, b[2], b[3]);
            mma(s[j + 1], alo, b[2], b[3]);
        }
    }
}

// What `mode` does with one tile's scores (groups g0.., columns c0..): stores them (dense and
// sample), or appends the candidates at least their group's threshold to its list (emit).
__device__ __forceinline__ void score_tile_out(
    const float (&s)[SCORE_NT][4], int mode, int h, int hh, int g0, int c0, int groups, int cols,
    float* __restrict__ approx, const u32* __restrict__ cand_lo, const u32* __restrict__ cand_hi, int per_head,
    const float* __restrict__ thresh, u32* __restrict__ list_key, float* __restrict__ list_val,
    u32* __restrict__ list_count, u32* __restrict__ list_high, int list_cap)
{
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    constexpr int NT = SCORE_NT;
    if (mode != SCORE_EMIT) {
        float* out = approx + (size_t)hh * groups * cols;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int g = g0 + warp * 16 + lane / 4 + (i / 2) * 8;
                const int c = c0 + j * 8 + (lane % 4) * 2 + i % 2;
                if (g < groups && c < cols) out[(size_t)g * cols + c] = s[j][i];
            }
        }
        return;
    }
    // Emit. Group warp * 16 + lane / 4 + 8 r's scores of this tile lie in the four lanes of
    // one quad (s[j][2 r + e], key c0 + 8 j + 2 (lane % 4) + e). Each lane marks its candidates
    // in a bit mask (bit 2 j + e); the quad counts them, one lane reserves their slots with one
    // atomic, and each lane writes its own after its quad neighbours'. No shared-memory atomics
    // and no barrier: the counting with both in shared memory, and its divergent branches, were
    // most of this kernel's instructions (measured with Nsight Compute). With a 3-10% budget
    // most warps find no candidate in a tile and skip everything after the marking.
    constexpr u32 FULL = 0xffffffffu;
    const int quad = lane % 4;
    const u32 c_first = (u32)(c0 + 2 * quad);
    u32 bits[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int g = g0 + warp * 16 + lane / 4 + r * 8;
        const bool ok = g < groups;
        const int slot = (per_head ? h : 0) * groups + (ok ? g : 0);
        const u32 lo = ok ? cand_lo[slot] : 0, hi = ok ? cand_hi[slot] : 0;
        const u32 width = hi > lo ? hi - lo : 0;  // keys lo .. hi - 1 (none for a row past `groups`)
        const float t_in = ok ? thresh[2 * ((size_t)h * groups + g)] : 0.f;
        u32 m = 0;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 c = c_first + 8 * j + e;
                m |= (u32)(c - lo < width && s[j][2 * r + e] >= t_in) << (2 * j + e);
            }
        }
        bits[r] = m;
    }
    if (!__any_sync(FULL, bits[0] | bits[1])) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int g = g0 + warp * 16 + lane / 4 + r * 8;
        const size_t at = (size_t)h * groups + g;  // used only when the group has candidates
        const u32 n = __popc(bits[r]);
        u32 incl = n;  // inclusive prefix over the quad's lanes
        u32 v = __shfl_up_sync(FULL, incl, 1, 4);
        if (quad >= 1) incl += v;
        v = __shfl_up_sync(FULL, incl, 2, 4);
        if (quad >= 2) incl += v;
        const u32 total = __shfl_sync(FULL, incl, 3, 4);
        u32 base = 0;
        if (quad == 0 && total) base = atomicAdd(list_count + at, total);  // goes on past list_cap
        u32 slot = __shfl_sync(FULL, base, 0, 4) + incl - n;
        u32 high = 0;  // candidates at least thresh[1]
        if (bits[r]) {
            const float t_high = thresh[2 * at + 1];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if ((bits[r] >> (2 * j + e)) & 1u) {
                        const float a = s[j][2 * r + e];
                        if (slot < (u32)list_cap) {
                            list_key[at * list_cap + slot] = c_first + 8 * j + e;
                            list_val[at * list_cap + slot] = a;
                        }
                        ++slot;
                        high += a >= t_high;
                    }
                }
            }
        }
        high += __shfl_xor_sync(FULL, high, 1);
        high += __shfl_xor_sync(FULL, high, 2);
        if (quad == 0 && high) atomicAdd(list_high + at, high);
    }
}

// The pooled-q halves of groups g0 .. g0 + 63 into sHi and sLo (zero past `groups`), and a
// tile of 128 keys from column c0 into sK (sample keys in SCORE_SAMPLE mode; zero past the
// columns): cp.async by the CTA's threads, not committed.
__device__ __forceinline__ void load_pooled(u16* sHi, u16* sLo, const u16* hi_src, const u16* lo_src, int g0, int groups) {
    for (int i = threadIdx.x; i < SCORE_ROWS * CHUNKS; i += SCORE_THREADS) {
        const int r = i / CHUNKS, col = (i % CHUNKS) * 8;
        const bool ok = g0 + r < groups;
        const size_t off = ok ? (size_t)(g0 + r) * D + col : 0;
        cp_async16(smem_u32(sHi + r * LDS + col), hi_src + off, ok ? 16 : 0);
        cp_async16(smem_u32(sLo + r * LDS + col), lo_src + off, ok ? 16 : 0);
    }
}
__device__ __forceinline__ void load_key_tile(u16* sK, const u16* k_src, int c0, int mode, int cols, int nk) {
    for (int i = threadIdx.x; i < SCORE_COLS * CHUNKS; i += SCORE_THREADS) {
        const int r = i / CHUNKS, col = (i % CHUNKS) * 8;
        const u32 j = c0 + r, key = mode == SCORE_SAMPLE ? sample_key(j) : j;
        const bool ok = (int)j < cols && (int)key < nk;
        cp_async16(smem_u32(sK + r * LDS + col), k_src + (ok ? (size_t)key * D + col : 0), ok ? 16 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(SCORE_THREADS) WEFT_ENTRY(score)(SCORE_PARAMS)
{

    extern __shared__ __align__(16) unsigned char smem[];
    u16* sHi = (u16*)smem;                 // [SCORE_ROWS][LDS]
    u16* sLo = sHi + SCORE_ROWS * LDS;     // [SCORE_ROWS][LDS]
    u16* sK = sLo + SCORE_ROWS * LDS;      // [SCORE_COLS][LDS]
    const int hh = blockIdx.z, h = h0 + hh, kv = h / (hq / hkv);
    const int g0 = blockIdx.x * SCORE_ROWS, c0 = blockIdx.y * SCORE_COLS;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const u16* hi_src = pq_hi + (size_t)h * groups * D;
    const u16* lo_src = pq_lo + (size_t)h * groups * D;
    const u16* k_src = K + (size_t)kv * nk * D;
    load_pooled(sHi, sLo, hi_src, lo_src, g0, groups);
    load_key_tile(sK, k_src, c0, mode, cols, nk);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int mat = lane / 8;
    const u32 a_off = 2 * ((warp * 16 + lane % 16) * LDS + (lane / 16) * 8);
    const u32 k_addr = smem_u32(sK) + 2 * (((mat / 2) * 8 + lane % 8) * LDS + (mat % 2) * 8);
    float s[SCORE_NT][4];
    score_tile(s, smem_u32(sHi) + a_off, smem_u32(sLo) + a_off, k_addr);
    score_tile_out(s, mode, h, hh, g0, c0, groups, cols, approx, cand_lo, cand_hi, per_head, thresh, list_key,
                   list_val, list_count, list_high, list_cap);
}

// The bin of a 2048-bin histogram where the running sum from the top first satisfies
// `reached`; sets `above` to the sum of the bins above it. One warp.
template <class T, class Reached>
__device__ __forceinline__ int find_bin_by(const T* hist, const Reached& reached, T& above, int lane) {
    constexpr int PER = HIST / 32;
    T mine = 0;  // lane l sums bins [HIST - (l + 1) * PER, HIST - l * PER): lane 0 holds the top
    for (int i = 0; i < PER; ++i) mine += hist[HIST - 1 - lane * PER - i];
    T incl = mine;  // inclusive prefix from the top
    for (int o = 1; o < 32; o *= 2) {
        const T v = __shfl_up_sync(0xffffffff, incl, o);
        if (lane >= o) incl += v;
    }
    const T excl = incl - mine;
    const bool here = !reached(excl) && reached(incl);
    const u32 who = __ballot_sync(0xffffffff, here);
    const int src = who ? __ffs(who) - 1 : 31;  // none: the goal lies past every bin (a bug)
    int bin = 0;
    T run = __shfl_sync(0xffffffff, excl, src);
    if (lane == src) {
        for (int i = 0; i < PER; ++i) {
            const int b = HIST - 1 - lane * PER - i;
            bin = b;
            if (reached(run + hist[b])) break;
            run += hist[b];
        }
    }
    bin = __shfl_sync(0xffffffff, bin, src);
    above = __shfl_sync(0xffffffff, run, src);
    return bin;
}
// find_bin_by's goals: a count of `need` keys; a weight of `goal` after `base` (weight sums
// are integers below 2^53, so exact in f64).
struct CountReaches {
    u32 need;
    __device__ bool operator()(u32 run) const { return run >= need; }
};
struct WeightReaches {
    unsigned long long base;
    double goal;
    __device__ bool operator()(unsigned long long run) const { return (double)(base + run) >= goal; }
};

// Counts score `a` in a radix histogram: its key's top 11 bits, or (second) the next 11 bits
// when the top ones are b1.
__device__ __forceinline__ void hist_add(u32* hist, float a, bool second, u32 b1) {
    const u32 k = float_key(a);
    if (!second) atomicAdd(hist + (k >> 21), 1u);
    else if ((k >> 21) == b1) atomicAdd(hist + ((k >> 10) & (HIST - 1)), 1u);
}

// The need-th largest of the values get(i, a) yields for i in [0, n) (get returns whether i
// holds one): the 22-bit prefix of its key by two 11-bit radix passes, as a full key. `hist`
// is a zeroed shared histogram and is zeroed again on return. Every thread of the CTA calls it.
template <class Get>
__device__ u32 radix_prefix(u32* hist, u32 need, u32 n, Get get, u32* s_bin, u32* s_above) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    for (u32 i = tid; i < n; i += blockDim.x) {
        float a;
        if (get(i, a)) hist_add(hist, a, false, 0);
    }
    __syncthreads();
    if (warp == 0) {
        u32 above;
        const int b = find_bin_by(hist, CountReaches{need}, above, lane);
        if (lane == 0) *s_bin = b, *s_above = above;
    }
    __syncthreads();
    const u32 b1 = *s_bin, need2 = need - *s_above;
    for (int i = tid; i < HIST; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (u32 i = tid; i < n; i += blockDim.x) {
        float a;
        if (get(i, a)) hist_add(hist, a, true, b1);
    }
    __syncthreads();
    if (warp == 0) {
        u32 above;
        const int b = find_bin_by(hist, CountReaches{need2}, above, lane);
        if (lane == 0) *s_bin = b;
    }
    __syncthreads();
    const u32 prefix = (b1 << 11 | *s_bin) << 10;
    for (int i = tid; i < HIST; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    return prefix;
}

// The sample rank to collect down to for `keep` of `cands` candidates with `sampled` of them in
// the sample: the expected rank plus eight standard deviations and 32, so that the collected
// keys hold the keep-th all but surely (when they do not, the slow path takes over).
__device__ __forceinline__ u32 sample_rank(u32 keep, u32 cands, u32 sampled) {
    const float expect = (float)keep * (float)sampled / (float)cands;
    return (u32)ceilf(expect + 8.f * sqrtf(expect) + 32.f);
}

// The error bound of every approximate score of group (h, g): see APPROX_ERR.
__device__ __forceinline__ float group_bound(const float* pq_l1, const u32* kmax_bits, int h, int kv, int groups, int g) {
    return APPROX_ERR * pq_l1[(size_t)h * groups + g] * __uint_as_float(kmax_bits[kv]) + 1e-30f;
}

// ---- threshold: grid (groups, heads of the chunk), SELECT_THREADS ----
// From the sampled scores (SCORE_SAMPLE), per group: thresh[0] = a score below the keep-th
// largest with a margin, less 3 bounds (keys at or above it are emitted), thresh[1] = that
// plus 3 bounds (keys at or above it are counted: the list is complete when keep of them are).
// Groups that keep all or none of their candidates, or whose sample is too small, emit nothing.
extern "C" __global__ void __launch_bounds__(THRESHOLD_THREADS) WEFT_ENTRY(threshold)(THRESHOLD_PARAMS)
{

    __shared__ u32 hist[HIST];
    __shared__ u32 sBin, sAbove, sSampled;
    const int g = blockIdx.x, hh = blockIdx.y, h = h0 + hh, kv = h / (hq / hkv), tid = threadIdx.x;
    const int slot = (per_head ? h : 0) * groups + g;
    const u32 lo = cand_lo[slot], hi = cand_hi[slot], cands = hi - lo;
    const u32 keep = min((u32)top_k, cands);
    const float* sv = sample + ((size_t)hh * groups + g) * samples;
    for (int i = tid; i < HIST; i += SELECT_THREADS) hist[i] = 0;
    if (tid == 0) sSampled = 0;
    __syncthreads();
    u32 mine = 0;
    for (int j = tid; j < samples; j += SELECT_THREADS) {
        const u32 c = sample_key(j);
        mine += c >= lo && c < hi;
    }
    atomicAdd(&sSampled, mine);
    __syncthreads();
    const u32 sampled = sSampled;
    float* out = thresh + 2 * ((size_t)h * groups + g);
    const u32 rank = keep == 0 || keep == cands || sampled == 0 ? 0 : sample_rank(keep, cands, sampled);
    if (rank == 0 || rank >= sampled) {
        if (tid == 0) out[0] = out[1] = __int_as_float(0x7f800000);  // +inf: emit nothing
        return;
    }
    auto get = [&](u32 j, float& a) {
        const u32 c = sample_key(j);
        a = sv[j];
        return c >= lo && c < hi;
    };
    const float bmax = group_bound(pq_l1, kmax_bits, h, kv, groups, g);
    const float t = key_float(radix_prefix(hist, rank, (u32)samples, get, &sBin, &sAbove)) - 3.f * bmax;
    if (tid == 0) {
        out[0] = t;
        out[1] = t + 3.f * bmax;
    }
}

// The keep best candidates in [lo, hi) by exact score (scale x repro_dot, as `select` scores
// its unsure keys; then the lower key), as a bitmap in `bits` (cleared first): for a group the
// bounds cannot settle (more than UNSURE_CAP keys near the cut, or a bound that failed). Six
// radix passes over the scores' 64-bit keys (bits 63-53, 52-42, ..., 19-9, 8-0) find the keep-th
// best score; each pass scores every candidate again, which needs no scratch memory and is
// fine on a path this rare (about 0.5 ms per group at 64k keys, D = 128). Then one ascending
// pass chooses the keys above it and the lowest keys equal to it, as many as keep needs.
// `hist` is a zeroed shared histogram, zeroed again on return. Every thread of the CTA calls
// it. (Left to the compiler to inline: kept out of line, its call made `select` spill.)
__device__ void select_exact(
    const float* sPq, const u16* k_h, u32 lo, u32 hi, u32 keep, double scale, u32* hist, u32* bits, int words)
{
    __shared__ u32 sBin, sAbove, warpTies[SELECT_THREADS / 32];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    auto key_of = [&](u32 c) { return double_key(rank_score(scale * repro_dot(sPq, k_h + (size_t)c * D))); };
    for (int i = tid; i < words; i += SELECT_THREADS) bits[i] = 0;
    unsigned long long cut = 0;  // the keep-th best key: its bits from `done` up so far
    u32 need = keep;             // how many keys with cut's bits from `done` up to take
    // Pass bits [shift, done): 11 bits, and 9 in the last pass.
    for (int done = 64, shift = 53; done > 0; done = shift, shift = max(shift - 11, 0)) {
        const unsigned long long width_mask = (1ull << (done - shift)) - 1;
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
            const unsigned long long k = key_of(c);
            if (done == 64 || (k >> done) == (cut >> done)) atomicAdd(hist + ((k >> shift) & width_mask), 1u);
        }
        __syncthreads();
        if (warp == 0) {
            u32 above;
            const int b = find_bin_by(hist, CountReaches{need}, above, lane);
            if (lane == 0) sBin = b, sAbove = above;
        }
        __syncthreads();
        const unsigned long long high = done == 64 ? 0ull : cut >> done << done;
        cut = high | (unsigned long long)sBin << shift;
        need -= sAbove;
        for (int i = tid; i < HIST; i += SELECT_THREADS) hist[i] = 0;
        __syncthreads();
    }
    // Keys above the cut, and the first `need` keys at it in ascending order.
    u32 taken = 0;
    for (u32 base = lo; base < hi; base += SELECT_THREADS) {
        const u32 c = base + tid;
        const unsigned long long k = c < hi ? key_of(c) : 0ull;
        if (c < hi && k > cut) atomicOr(bits + c / 32, 1u << (c % 32));
        const bool tie = c < hi && k == cut;
        const u32 ballot = __ballot_sync(0xffffffff, tie);
        if (lane == 0) warpTies[warp] = __popc(ballot);
        __syncthreads();
        u32 before = taken + __popc(ballot & ((1u << lane) - 1));
        for (int w = 0; w < warp; ++w) before += warpTies[w];
        if (tie && before < need) atomicOr(bits + c / 32, 1u << (c % 32));
        for (int w = 0; w < SELECT_THREADS / 32; ++w) taken += warpTies[w];
        __syncthreads();
    }
}

// ---- select: grid (groups, heads of the chunk), SELECT_THREADS ----
// Chooses the keep best keys of group g (keep = top_k, or keep_in[h * groups + g] from
// `budget` when keep_in is set). Writes them, ascending, to chosen[(h * groups + g) * cap ..],
// or with cap = 0 as a bitmap to chosen[(h * groups + g) * ceil(nk / 32) ..]; and their count.
// Where the candidates' approximate scores come from, by mode:
//   SELECT_DENSE  approx[hh][g][c] (SCORE_DENSE). A sample (every 16th run of 32 keys) gives a
//                 score below the keep-th with a margin; one pass collects every key above it
//                 (less the bounds) into shared memory (collect_cap > 0), and the radix passes
//                 run there; if the sample misjudged, they read all keys instead;
//   SELECT_LIST   the group's list from SCORE_EMIT, when complete (no overflow, and keep keys
//                 at or above thresh[1]), in shared memory when it fits (collect_cap), else read
//                 in place; otherwise every candidate is scored again here (the slow path: one
//                 CTA reads all keys three times; the sample's margins make it all but unused).
// Either way the same keys are chosen.
[[maybe_unused]] constexpr int SELECT_DENSE = 0, SELECT_LIST = 1;
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) WEFT_ENTRY(select)(SELECT_PARAMS)
{

    extern __shared__ __align__(16) unsigned char smem[];
    double* uScore = (double*)smem;                   // [UNSURE_CAP] exact scores of unsure keys
    u32* uKey = (u32*)(uScore + UNSURE_CAP);          // [UNSURE_CAP]
    u32* hist = uKey + UNSURE_CAP;                    // [HIST]
    float* sPq = (float*)(hist + HIST);               // [D]
    float* colVal = sPq + D;                          // [collect_cap] collected approximate scores
    u32* colKey = (u32*)(colVal + collect_cap);       // [collect_cap] and their keys
    u32* bits = colKey + collect_cap;                 // [ceil(nk / 32)] chosen keys
    __shared__ u32 nIn, nUnsure, nCol, nHigh, sBin, sAbove;
    __shared__ u32 scan[SELECT_THREADS];

    const int hh = blockIdx.y, h = h0 + hh, g = blockIdx.x, kv = h / (hq / hkv);
    const int tid = threadIdx.x;
    const int slot = (per_head ? h : 0) * groups + g;
    const u32 lo = cand_lo[slot], hi = cand_hi[slot];
    const u32 cands = hi - lo;
    const u32 keep = min(keep_in ? keep_in[(size_t)h * groups + g] : (u32)top_k, cands);
    const float* s = approx + ((size_t)hh * groups + g) * nk;
    const u16* k_h = K + (size_t)kv * nk * D;
    const int words = (nk + 31) / 32;
    for (int i = tid; i < words; i += SELECT_THREADS) bits[i] = 0;
    for (int i = tid; i < HIST; i += SELECT_THREADS) hist[i] = 0;
    for (int d = tid; d < D; d += SELECT_THREADS) sPq[d] = pooled[((size_t)h * groups + g) * D + d];
    if (tid == 0) nIn = nUnsure = nCol = nHigh = 0;
    __syncthreads();

    // The keep-th exact score lies within bmax of the keep-th approximate one.
    const float bmax = group_bound(pq_l1, kmax_bits, h, kv, groups, g);
    const float l1 = pq_l1[(size_t)h * groups + g];
    const float* kinf_h = kinf + (size_t)kv * nk;
    const bool dense = mode == SELECT_DENSE;
    auto score_of = [&](u32 c) { return dense ? s[c] : approx_dot(sPq, k_h + (size_t)c * D); };
    // Whether the radix passes read the collected keys (shared memory, or a global list when
    // gKey is set) or every candidate.
    bool collected = false;
    // Nonzero (a STATUS_ code) when the group is ranked exactly over all keys instead.
    int exact_code = 0;
    const u32* gKey = nullptr;
    const float* gVal = nullptr;

    if (keep == cands) {
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) atomicOr(bits + c / 32, 1u << (c % 32));
    } else if (keep > 0) {
        if (!dense) {
            const size_t at = (size_t)h * groups + g;
            const u32 n = list_count[at];
            if (n <= (u32)list_cap && list_high[at] >= keep) {
                if (n <= (u32)collect_cap) {
                    for (u32 i = tid; i < n; i += SELECT_THREADS) {
                        colKey[i] = list_key[at * list_cap + i];
                        colVal[i] = list_val[at * list_cap + i];
                    }
                } else {
                    // Longer than shared memory holds: the passes read the list in place.
                    gKey = list_key + at * list_cap;
                    gVal = list_val + at * list_cap;
                }
                if (tid == 0) nCol = n;
                collected = true;
            } else if (tid == 0) {
                atomicAdd(status + 1, 1);  // this group takes the slow path (counted for the report)
            }
            __syncthreads();
        } else if (collect_cap > 0) {
            const u32 columns = (cands + 511) / 512 * 32;  // sample columns (some past hi)
            u32 valid = 0;
            for (u32 j = tid; j < columns; j += SELECT_THREADS) valid += lo + sample_key(j) < hi;
            atomicAdd(&nHigh, valid);
            __syncthreads();
            const u32 sampled = nHigh;
            __syncthreads();
            if (tid == 0) nHigh = 0;
            const u32 rank = sample_rank(keep, cands, sampled);
            if (rank < sampled) {
                auto get_sample = [&](u32 j, float& a) {
                    const u32 c = lo + sample_key(j);
                    a = c < hi ? s[c] : 0.f;
                    return c < hi;
                };
                const float t_c = key_float(radix_prefix(hist, rank, columns, get_sample, &sBin, &sAbove)) - 3.f * bmax;
                const float t_h = t_c + 3.f * bmax;
                for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
                    const float a = s[c];
                    if (a >= t_c) {
                        const u32 i = atomicAdd(&nCol, 1u);
                        if (i < (u32)collect_cap) colVal[i] = a, colKey[i] = c;
                        if (a >= t_h) atomicAdd(&nHigh, 1u);
                    }
                }
                __syncthreads();
                // Usable when it fits and the keep-th largest is among the keys at or above
                // t_h, so every key within the bounds of it was collected.
                collected = nCol <= (u32)collect_cap && nHigh >= keep;
            }
        }
        auto get = [&](u32 i, float& a) {
            a = !collected ? score_of(lo + i) : gVal ? gVal[i] : colVal[i];
            return true;
        };
        const u32 prefix = radix_prefix(hist, keep, collected ? nCol : cands, get, &sBin, &sAbove);
        const float t_lo = key_float(prefix), t_hi = key_float(prefix | 1023u);
        // Decided by the bounds, or unsure (scored exactly below).
        auto classify = [&](u32 c, float a) {
            const float bc = APPROX_ERR * l1 * kinf_h[c] + 1e-30f;
            if (a - bc > t_hi + bmax) {
                atomicOr(bits + c / 32, 1u << (c % 32));
                atomicAdd(&nIn, 1u);
            } else if (!(a + bc < t_lo - bmax)) {
                const u32 i = atomicAdd(&nUnsure, 1u);
                if (i < UNSURE_CAP) uKey[i] = c;
            }
        };
        if (collected) {
            for (u32 i = tid; i < nCol; i += SELECT_THREADS) classify(gKey ? gKey[i] : colKey[i], gVal ? gVal[i] : colVal[i]);
        } else {
            for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) classify(c, score_of(c));
        }
        __syncthreads();
        const u32 unsure = nUnsure, in = nIn;
        if (unsure > UNSURE_CAP) {
            exact_code = STATUS_TOO_MANY_UNSURE;
        } else if (in > keep || keep - in > unsure) {
            exact_code = STATUS_BOUND;
        } else {
            // Exact scores of the unsure keys (the CPU builder's dot, times the scale), ranked.
            for (u32 i = tid; i < unsure; i += SELECT_THREADS) uScore[i] = rank_score(scale * repro_dot(sPq, k_h + (size_t)uKey[i] * D));
            sort_best_first(uScore, uKey, unsure, pow2_at_least(unsure));
            for (u32 i = tid; i < keep - in; i += SELECT_THREADS) atomicOr(bits + uKey[i] / 32, 1u << (uKey[i] % 32));
        }
    }
    __syncthreads();

    // The chosen keys in ascending order: each thread takes a run of words, counts, then a
    // block-wide exclusive scan places its keys.
    const int per = (words + SELECT_THREADS - 1) / SELECT_THREADS;
    const int w0 = tid * per, w1 = min(w0 + per, words);
    u32 mine = 0;
    auto count_chosen = [&]() {
        mine = 0;
        for (int w = w0; w < w1; ++w) mine += __popc(bits[w]);
        scan[tid] = mine;
        __syncthreads();
        for (int o = 1; o < SELECT_THREADS; o *= 2) {
            const u32 v = tid >= o ? scan[tid - o] : 0;
            __syncthreads();
            scan[tid] += v;
            __syncthreads();
        }
    };
    count_chosen();
    // (exact_code is the same in every thread, and so is the count.)
    if (exact_code == 0 && scan[SELECT_THREADS - 1] != keep) exact_code = STATUS_BOUND;
    if (exact_code != 0) {
        if (tid == 0) {
            atomicMax(status, exact_code);
            atomicAdd(status + 2, 1);
        }
        select_exact(sPq, k_h, lo, hi, keep, scale, hist, bits, words);
        count_chosen();
    }
    u32 at = scan[tid] - mine;
    if (cap == 0) {
        // The chosen keys as a bitmap of `words` words per group.
        u32* out = chosen + ((size_t)h * groups + g) * words;
        for (int w = w0; w < w1; ++w) out[w] = bits[w];
    }
    u32* out = chosen + ((size_t)h * groups + g) * cap;
    for (int w = w0; w < w1 && cap > 0; ++w) {
        u32 word = bits[w];
        while (word) {
            const int b = __ffs(word) - 1;
            word &= word - 1;
            if (at < (u32)cap) out[at] = (u32)(w * 32 + b);
            ++at;
        }
    }
    if (tid == SELECT_THREADS - 1) chosen_count[(size_t)h * groups + g] = (int)scan[tid];
}

// ---- budget: grid (groups, heads of the chunk), SELECT_THREADS ----
// For vertical_vector(keep = threshold(t) | top_p(p)): how many columns group g keeps, into
// keep_out[h * groups + g]; `select` then chooses that many, best first, as for top_k (both
// budgets keep a prefix of the ranking).
//   BUDGET_THRESHOLD (arg = ln t): from the approximate scores (SCORE_DENSE) and the exact
//   scores (repro_dot, times the scale) of the keys the bounds leave open: the exact best score
//   M (only keys whose approximate score reaches the best approximate one less two bounds can
//   hold it), then the count of keys whose exact score is at least M + ln t;
//   BUDGET_TOP_P (arg = p): from every key's exact score and the best (vv_exact), every key's
//   fixed-point weight top_p_weight(score - best) into `weights` (this chunk's groups x
//   keys), their total, then three weighted radix passes over the weights find the weight at
//   which the running sum from the top reaches p of the total: the keys above it, plus as
//   many at it as the sum needs.
[[maybe_unused]] constexpr int BUDGET_THRESHOLD = 0, BUDGET_TOP_P = 1;
// The CPU builder's score of key c: scale x repro_dot.
__device__ __forceinline__ double exact_score(const float* pq, const u16* k_h, u32 c, double scale) {
    return __dmul_rn(scale, repro_dot(pq, k_h + (size_t)c * D));
}
extern "C" __global__ void __launch_bounds__(BUDGET_THREADS) WEFT_ENTRY(budget)(BUDGET_PARAMS)
{

    __shared__ unsigned long long wHist[HIST];
    __shared__ u32 nHist[HIST];
    __shared__ float sPq[D];
    __shared__ u32 sAmax, sCount;
    __shared__ unsigned long long sBest, sTotal, sAbove;
    __shared__ int sBin;
    const int hh = blockIdx.y, h = h0 + hh, g = blockIdx.x, kv = h / (hq / hkv), tid = threadIdx.x;
    const int slot = (per_head ? h : 0) * groups + g;
    const u32 lo = cand_lo[slot], hi = cand_hi[slot];
    const float* s = approx + ((size_t)hh * groups + g) * nk;
    const u16* k_h = K + (size_t)kv * nk * D;
    const float l1 = pq_l1[(size_t)h * groups + g];
    const float* kinf_h = kinf + (size_t)kv * nk;
    const float bmax = group_bound(pq_l1, kmax_bits, h, kv, groups, g);
    if (hi <= lo) {
        if (tid == 0) keep_out[(size_t)h * groups + g] = 0;
        return;
    }
    for (int d = tid; d < D; d += SELECT_THREADS) sPq[d] = pooled[((size_t)h * groups + g) * D + d];
    if (tid == 0) sAmax = 0, sCount = 0, sBest = 0, sTotal = 0;
    __syncthreads();
    u32 keep;
    if (mode == BUDGET_THRESHOLD) {
        u32 amax = 0;
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) amax = max(amax, float_key(s[c]));
        atomicMax(&sAmax, amax);
        __syncthreads();
        const float floor_dot = key_float(sAmax) - 2.f * bmax;
        auto bound = [&](u32 c) { return APPROX_ERR * l1 * kinf_h[c] + 1e-30f; };
        unsigned long long best_key = 0;
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
            if (s[c] + bound(c) >= floor_dot) best_key = max(best_key, double_key(exact_score(sPq, k_h, c, scale)));
        }
        atomicMax(&sBest, best_key);
        __syncthreads();
        const double M = key_double(sBest);
        // Scaled bounds (x: below, y: above), widened by 2^-20 for the roundings here.
        auto scaled = [&](u32 c) {
            const double a = (double)s[c], b = (double)bound(c);
            const double e_lo = scale * (a - b), e_hi = scale * (a + b);
            const double slack = (fabs(e_lo) + fabs(e_hi)) * 0x1p-20 + 1e-300;
            return make_double2(e_lo - slack, e_hi + slack);
        };
        const double cut = __dadd_rn(M, arg);
        const double slack = fabs(cut) * 0x1p-20;
        u32 mine = 0;
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
            const double2 e = scaled(c);
            if (e.x > cut + slack) ++mine;
            else if (!(e.y < cut - slack)) mine += exact_score(sPq, k_h, c, scale) >= cut;
        }
        atomicAdd(&sCount, mine);
        __syncthreads();
        keep = max(sCount, 1u);
    } else {
        u32* w = weights + ((size_t)hh * groups + g) * nk;
        const double* e = exact + ((size_t)hh * groups + g) * nk;
        const double M = key_double(best[(size_t)hh * groups + g]);
        for (int i = tid; i < HIST; i += SELECT_THREADS) wHist[i] = 0, nHist[i] = 0;
        __syncthreads();
        // The weights, their total, and the histogram of bits 31-21 (weights are at most 2^31;
        // a zero weight adds nothing, so it skips the atomic).
        unsigned long long total = 0;
        for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
            const u32 wc = (u32)top_p_weight(__dsub_rn(e[c], M));
            w[c] = wc;
            total += wc;
            if (wc) atomicAdd(wHist + (wc >> 21), (unsigned long long)wc);
        }
        atomicAdd(&sTotal, total);
        __syncthreads();
        const double goal = top_p_goal(arg, sTotal);
        // Radix over bits 31-21, 20-10 and 9-0: each pass finds the bin where the running sum
        // from the top reaches the goal. The keys above it are counted in registers on the
        // next pass (the last bin's from its count histogram); only keys in the bin so far
        // touch the histograms.
        u32 bins[3];
        unsigned long long base = 0;  // weight of the keys above the prefix so far
        u32 above_keys = 0;
#pragma unroll
        for (int pass = 0; pass < 3; ++pass) {
            if (pass > 0) {
                for (u32 c = lo + tid; c < hi; c += SELECT_THREADS) {
                    const u32 v = w[c];
                    if ((v >> 21) != bins[0]) {
                        above_keys += (v >> 21) > bins[0] && pass == 1;
                        continue;
                    }
                    const u32 mid = (v >> 10) & (HIST - 1);
                    if (pass == 1) {
                        atomicAdd(wHist + mid, (unsigned long long)v);
                    } else if (mid > bins[1]) {
                        ++above_keys;
                    } else if (mid == bins[1]) {
                        atomicAdd(wHist + (v & 1023u), (unsigned long long)v);
                        atomicAdd(nHist + (v & 1023u), 1u);
                    }
                }
                __syncthreads();
            }
            if (tid < 32) {
                unsigned long long above;
                const int bin = find_bin_by(wHist, WeightReaches{base, goal}, above, tid);
                if (tid == 0) sBin = bin, sAbove = above;
            }
            __syncthreads();
            bins[pass] = (u32)sBin;
            base += sAbove;
            if (pass == 2) {
                for (int i = bins[2] + 1 + tid; i < HIST; i += SELECT_THREADS) above_keys += nHist[i];
            }
            __syncthreads();
            for (int i = tid; i < HIST; i += SELECT_THREADS) wHist[i] = 0;
            __syncthreads();
        }
        atomicAdd(&sCount, above_keys);
        __syncthreads();
        const u32 prefix = bins[0] << 21 | bins[1] << 10 | bins[2];
        // `prefix` is the weight where the sum crosses the goal (positive: the best key alone
        // weighs 2^31 and the goal is below the total); as many keys of it as reach the goal.
        const unsigned long long v = prefix > 0 ? prefix : 1;
        double need = ceil((goal - (double)base) / (double)v);
        unsigned long long m = need < 1.0 ? 1ull : (unsigned long long)need;
        while (m > 1 && (double)(base + (m - 1) * v) >= goal) --m;
        while ((double)(base + m * v) < goal) ++m;
        keep = sCount + (u32)m;
    }
    if (tid == 0) keep_out[(size_t)h * groups + g] = keep;
}
