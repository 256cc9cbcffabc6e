{{HEADER}}
// Vertical-vector index building on the GPU: the columns `vertical_vector(keep = top_k(n) |
// threshold(t) | top_p(p))` chooses per query group, the same columns the CPU builder chooses,
// then the index's column lists. Entry points (launched in this order by weft-runtime's device
// index builder):
//   pool     mean of each group's queries (f64 sums, as the CPU builder), and its split into two
//            dtype halves for the tensor cores;
//   kstats   per key: the largest |k| (error bounds of the approximate scores);
//   score    approximate dot products pooled q . k for every group and key, on tensor cores
//            (hi and lo halves of pooled q, f32 accumulation);
//   vv_exact (top_p only) every pair's exact f64 score, and each group's best;
//   budget   (threshold and top_p) how many keys each group keeps: a prefix of the ranking;
//   select   per group: the n-th largest approximate score by two radix histograms (over the
//            keys a sampled threshold collects into shared memory, or over all); keys
//            certainly above or below it by the error bound are decided at once, the rest get
//            the CPU builder's exact f64 score and are ranked exactly (score, then lower key);
//            a group the bounds cannot settle this way (more than UNSURE_CAP keys near the
//            cut) is ranked exactly over all its keys (select_exact), in the same kernel;
//   columns  per index row: the group's chosen keys (a list, or a bitmap for the budgets)
//            through the plan's column rules (count pass, then write pass);
//   scan     column counts to row pointers.
// Error bound of `score`: the products of the bf16 halves are exact in f32 and the halves
// carry pooled q to 2^-17 relative; tensor-core accumulation loses less than 2^-17 of the sum
// of |terms| over D <= 256. APPROX_ERR = 2^-12 keeps a margin of 16x over their sum; a bound
// that failed would show as an inconsistent count: `select` then ranks the group exactly over
// all its keys, and counts it in the status words (a bug to report, never a wrong index).

{{PRELUDE}}
constexpr int D = {{D}};
constexpr int LDS = D + 8;               // padded shared row (elements)
constexpr int CHUNKS = D / 8;            // 16-byte chunks per row
constexpr float APPROX_ERR = 1.0f / 4096.0f;
constexpr int SCORE_ROWS = 64;           // groups per score CTA (4 warps x 16)
constexpr int SCORE_COLS = 128;          // keys per score CTA
constexpr int SCORE_THREADS = 128;
constexpr int SELECT_THREADS = 512;
constexpr int HIST = 2048;               // 11-bit radix histograms
constexpr int UNSURE_CAP = 4096;         // keys per group scored exactly
constexpr u16 DROP_CODE = {{DROP}};      // column rule: the row's blocks compute this key already
constexpr u32 PER_COLUMN = {{PER_COLUMN}};  // rule codes from here on index per-key codes
constexpr u32 PER_LINE = {{PER_LINE}};      // line codes from here on index per-offset codes

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

// ---- pool: grid (ceil(groups / POOL_GROUPS), heads), 128 threads ----
// The mean of each group's rows (q_block of them, fewer in the last group), per column: D / 8
// threads per group, each summing 8 columns with 16-byte loads (one load per element held
// the copy to about 3.3 TB/s), row by row in f64, then one division and a rounding to f32:
// the CPU builder's order. Also the bf16 hi and lo halves and the group's |pooled|_1 (a bound,
// rounded up).
constexpr int POOL_LANES = D / 8, POOL_GROUPS = 128 / POOL_LANES;
static_assert(POOL_LANES <= 32 && 32 % POOL_LANES == 0, "a group's lanes lie in one warp");
extern "C" __global__ void __launch_bounds__(128) {{NAME}}_pool(
    const u16* __restrict__ Q, int nq, int q_block, int groups,
    float* __restrict__ pooled, u16* __restrict__ pq_hi, u16* __restrict__ pq_lo, float* __restrict__ pq_l1)
{
    const int g = blockIdx.x * POOL_GROUPS + threadIdx.x / POOL_LANES, h = blockIdx.y;
    const int lane = threadIdx.x % POOL_LANES, c0 = lane * 8;
    const bool ok = g < groups;
    const int q0 = g * q_block, q1 = ok ? min(q0 + q_block, nq) : q0;
    const u16* src = Q + (size_t)h * nq * D + c0;
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
#pragma unroll 8
    for (int t = q0; t < q1; ++t) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + (size_t)t * D);
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[2 * i] += (double)bf16_to_float((u16)(w[i] & 0xffffu));
            acc[2 * i + 1] += (double)bf16_to_float((u16)(w[i] >> 16));
        }
    }
    const double n = (double)max(q1 - q0, 1);
    float p[8];
    u16 hi[8], lo[8];
    double l1 = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        p[i] = (float)(acc[i] / n);
        hi[i] = float_to_bf16(p[i]);
        lo[i] = float_to_bf16(p[i] - bf16_to_float(hi[i]));
        l1 += fabs((double)p[i]);
    }
    auto pack = [](const u16* x) {
        return make_uint4(x[0] | (u32)x[1] << 16, x[2] | (u32)x[3] << 16, x[4] | (u32)x[5] << 16, x[6] | (u32)x[7] << 16);
    };
#pragma unroll
    for (int o = 1; o < POOL_LANES; o *= 2) l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    if (ok) {
        const size_t at = ((size_t)h * groups + g) * D + c0;
        reinterpret_cast<float4*>(pooled + at)[0] = make_float4(p[0], p[1], p[2], p[3]);
        reinterpret_cast<float4*>(pooled + at)[1] = make_float4(p[4], p[5], p[6], p[7]);
        *reinterpret_cast<uint4*>(pq_hi + at) = pack(hi);
        *reinterpret_cast<uint4*>(pq_lo + at) = pack(lo);
        if (lane == 0) pq_l1[(size_t)h * groups + g] = __double2float_ru(l1);
    }
}

// ---- kstats: grid (ceil(nk / 64), hkv), 256 threads: a warp per key, 8 keys per warp ----
// One atomic per CTA for the head's maximum: 64 keys share it (atomics on one address per
// key serialised and cost more than the reads).
extern "C" __global__ void __launch_bounds__(256) {{NAME}}_kstats(
    const u16* __restrict__ K, int nk, float* __restrict__ kinf, u32* __restrict__ kmax_bits)
{
    __shared__ float wmax[8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = blockIdx.y;
    float block_max = 0.f;
    for (int i = 0; i < 8; ++i) {
        const int c = blockIdx.x * 64 + i * 8 + warp;
        if (c >= nk) break;
        const u16* row = K + ((size_t)h * nk + c) * D;
        float m = 0.f;
        for (int d = lane; d < D; d += 32) m = fmaxf(m, fabsf(bf16_to_float(row[d])));
        for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        if (lane == 0) kinf[(size_t)h * nk + c] = m;
        block_max = fmaxf(block_max, m);
    }
    if (lane == 0) wmax[warp] = block_max;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = 0.f;
        for (int w = 0; w < 8; ++w) m = fmaxf(m, wmax[w]);
        atomicMax(kmax_bits + h, __float_as_uint(m));  // non-negative floats order as integers
    }
}

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

extern "C" __global__ void __launch_bounds__(SCORE_THREADS) {{NAME}}_score(
    const u16* __restrict__ pq_hi, const u16* __restrict__ pq_lo, const u16* __restrict__ K,
    float* __restrict__ approx, int h0, int hq, int hkv, int groups, int nk, int mode, int cols,
    const u32* __restrict__ cand_lo, const u32* __restrict__ cand_hi, int per_head,
    const float* __restrict__ thresh, u32* __restrict__ list_key, float* __restrict__ list_val,
    u32* __restrict__ list_count, u32* __restrict__ list_high, int list_cap)
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
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) {{NAME}}_threshold(
    const float* __restrict__ sample, int samples, const float* __restrict__ pq_l1, const u32* __restrict__ kmax_bits,
    const u32* __restrict__ cand_lo, const u32* __restrict__ cand_hi, int per_head,
    int h0, int hq, int hkv, int groups, int top_k, float* __restrict__ thresh)
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

// A SIMT f32 approximate score (the slow path's): well inside the tensor-core bound.
__device__ __forceinline__ float approx_dot(const float* pq, const u16* row) {
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc = fmaf(pq[d], bf16_to_float(row[d]), acc);
    return acc;
}

// The CPU builder's dot (`weft_patterns::repro::dot`): one f64 accumulator, dimensions in
// order. Products of a float and a bf16 are exact in f64, so fma gives the CPU's sums.
// `b` is a row of K (16-byte aligned: D is a multiple of 8 and rows start at multiples of D).
// It is read 16 dimensions at a time with 16-byte loads, the next 16 loaded while these are
// summed: one thread scores a key alone, and per-element loads left it waiting on memory
// D / 8 times per key. The sum is the same fma chain, dimensions in order. (Two loads per
// step, not more: `select` must stay within 64 registers, so that two of its 512-thread CTAs
// fit an SM; four took it to 80.)
constexpr int DOT_BATCH = 2;  // 16-byte loads (8 dimensions each) per step
static_assert(D % (8 * DOT_BATCH) == 0, "repro_dot reads 8 x DOT_BATCH dimensions per step");
__device__ __forceinline__ double repro_dot(const float* a, const u16* b) {
    const uint4* row = reinterpret_cast<const uint4*>(b);
    double acc = 0.0;
    uint4 cur[DOT_BATCH], next[DOT_BATCH];
#pragma unroll
    for (int j = 0; j < DOT_BATCH; ++j) cur[j] = __ldg(row + j);
#pragma unroll 1
    for (int step = 0; step < D / (8 * DOT_BATCH); ++step) {
        const bool more = step + 1 < D / (8 * DOT_BATCH);
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) next[j] = more ? __ldg(row + (step + 1) * DOT_BATCH + j) : cur[j];
        const float* as = a + step * 8 * DOT_BATCH;
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) {
            const u32 w[4] = {cur[j].x, cur[j].y, cur[j].z, cur[j].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // The lower address holds the lower dimension (little endian).
                acc = fma((double)as[8 * j + 2 * e], (double)__uint_as_float(w[e] << 16), acc);
                acc = fma((double)as[8 * j + 2 * e + 1], (double)__uint_as_float(w[e] & 0xffff0000u), acc);
            }
        }
#pragma unroll
        for (int j = 0; j < DOT_BATCH; ++j) cur[j] = next[j];
    }
    return acc;
}

// ---- repro::exp, operation for operation (the _rn intrinsics are never contracted) ----
__device__ __forceinline__ double pow2i(long long n) { return __longlong_as_double((n + 1023) << 52); }
__device__ double repro_exp(double x) {
    if (x != x) return x;
    if (x < -746.0) return 0.0;
    if (x > 709.0) return __longlong_as_double(0x7ff0000000000000LL);
    const double n = round(__dmul_rn(x, __longlong_as_double({{LOG2E}})));
    const double r = __dsub_rn(__dsub_rn(x, __dmul_rn(n, __longlong_as_double({{LN2_HI}}))),
                               __dmul_rn(n, __longlong_as_double({{LN2_LO}})));
    const long long coef[12] = {{{EXP_COEF}}};
    double p = __longlong_as_double(coef[0]);
#pragma unroll
    for (int i = 1; i < 12; ++i) p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double(coef[i]));
    const double er = __dadd_rn(1.0, __dadd_rn(r, __dmul_rn(__dmul_rn(r, r), p)));
    const long long ni = (long long)n;
    if (ni < -1000) return __dmul_rn(__dmul_rn(er, pow2i(ni + 200)), pow2i(-200));
    return __dmul_rn(er, pow2i(ni));
}

// weft_patterns::select::top_p_weight: floor(exp(x) * 2^31) for `below` rounded down to a
// multiple of 2^-20, 0 below -23 and for NaN (a weight that never decreases as `below` grows).
// Scaling by powers of two is exact, so both floors see exact values.
constexpr double TOP_P_ONE = 2147483648.0;
constexpr double TOP_P_STEPS = 1048576.0;
__device__ __forceinline__ unsigned long long top_p_weight(double below) {
    const double k = floor(__dmul_rn(below, TOP_P_STEPS));
    if (k != k || k < -23.0 * TOP_P_STEPS) return 0ull;
    return (unsigned long long)floor(__dmul_rn(repro_exp(__dmul_rn(k, 1.0 / TOP_P_STEPS)), TOP_P_ONE));
}
// The running sum top_p(p) must reach: p x total x (1 - 1e-12), as the CPU rounds it.
__device__ __forceinline__ double top_p_goal(double p, unsigned long long total) {
    return __dmul_rn(__dmul_rn(p, (double)total), 1.0 - 1e-12);
}

// The smallest power of two at least n (1 for 0).
__device__ __forceinline__ u32 pow2_at_least(u32 n) {
    u32 p = 1;
    while (p < n) p *= 2;
    return p;
}

// Sorts the first n (score, id) pairs best first (higher score, then the lower id), padding
// to n2 entries (a power of two, at least n) with (-inf, max id): a bitonic sort in shared
// memory.
// Every thread of the CTA calls it.
__device__ void sort_best_first(double* score, u32* id, u32 n, u32 n2) {
    for (u32 i = n + threadIdx.x; i < n2; i += blockDim.x) {
        score[i] = __longlong_as_double(0xfff0000000000000LL);  // -inf
        id[i] = 0xffffffffu;
    }
    __syncthreads();
    for (u32 size = 2; size <= n2; size *= 2) {
        for (u32 stride = size / 2; stride > 0; stride /= 2) {
            for (u32 i = threadIdx.x; i < n2; i += blockDim.x) {
                const u32 j = i ^ stride;
                if (j > i) {
                    const bool first_before = score[i] > score[j] || (score[i] == score[j] && id[i] < id[j]);
                    // Within a run of `size`, the first half of the bitonic merge ascends
                    // (best first) where (i & size) == 0.
                    const bool ascending = (i & size) == 0;
                    if (first_before != ascending) {
                        const double ts = score[i];
                        score[i] = score[j];
                        score[j] = ts;
                        const u32 tk = id[i];
                        id[i] = id[j];
                        id[j] = tk;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Doubles to unsigned keys that sort the same way (NaN aside).
__device__ __forceinline__ unsigned long long double_key(double x) {
    const unsigned long long u = (unsigned long long)__double_as_longlong(x);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ double key_double(unsigned long long k) {
    return __longlong_as_double((long long)((k >> 63) ? (k & 0x7fffffffffffffffull) : ~k));
}

// An exact score as the CPU ranks it (weft_patterns::select): NaN as -inf, last.
__device__ __forceinline__ double rank_score(double x) { return x != x ? __longlong_as_double(0xfff0000000000000LL) : x; }

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
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) {{NAME}}_select(
    const float* __restrict__ approx, const float* __restrict__ pooled, const float* __restrict__ pq_l1,
    const u16* __restrict__ K, const float* __restrict__ kinf, const u32* __restrict__ kmax_bits,
    const u32* __restrict__ cand_lo, const u32* __restrict__ cand_hi, int per_head,
    int h0, int hq, int hkv, int groups, int nk, int top_k, const u32* __restrict__ keep_in, double scale, int cap,
    int collect_cap, int mode, const u32* __restrict__ list_key, const float* __restrict__ list_val, const u32* __restrict__ list_count,
    const u32* __restrict__ list_high, int list_cap,
    u32* __restrict__ chosen, int* __restrict__ chosen_count, int* __restrict__ status)
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
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) {{NAME}}_budget(
    const float* __restrict__ approx, const float* __restrict__ pooled, const float* __restrict__ pq_l1,
    const u16* __restrict__ K, const float* __restrict__ kinf, const u32* __restrict__ kmax_bits,
    const u32* __restrict__ cand_lo, const u32* __restrict__ cand_hi, int per_head,
    int h0, int hq, int hkv, int groups, int nk, double scale, int mode, double arg,
    const double* __restrict__ exact, const unsigned long long* __restrict__ best,
    u32* __restrict__ weights, u32* __restrict__ keep_out)
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
extern "C" __global__ void __launch_bounds__(128) {{NAME}}_columns(
    const u32* __restrict__ chosen, const int* __restrict__ chosen_count, int cap, int words,
    const u32* __restrict__ rule_ptr, const u32* __restrict__ rule_c0, const u32* __restrict__ rule_c1,
    const u32* __restrict__ rule_code, const u32* __restrict__ codes, int per_head,
    int hq, int q_blocks, int block_m, int q_block, int groups, int pass,
    const u32* __restrict__ tiles, int tile_block, int tile_groups, int tile_words,
    const int* __restrict__ line_phase, int line_stride, int line_len, int line_rule_base,
    const u16* __restrict__ line_codes,
    u32* __restrict__ row_count, const u32* __restrict__ col_ptr, u32* __restrict__ col_idx, u16* __restrict__ col_mask)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * 4 + warp;
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
extern "C" __global__ void __launch_bounds__(1024) {{NAME}}_scan(const u32* __restrict__ row_count, int rows, u32* __restrict__ col_ptr)
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

// ---- block top-k / top-p / threshold (BlockPlan) ----
// Pooled queries (pool over block_q rows) and pooled keys (pool over block_k rows) come from
// `pool`. Every candidate pattern block's score is computed exactly as the CPU builder does
// (f64, the same order), so the selection is exact without bounds.

// ---- block_scores: grid (ceil(groups / 64), ceil(kblocks / 64), hq), 256 threads ----
// scores[h][g][kb] = scale * dot(pooled_q[h][g], pooled_k[kv][kb]) with the CPU builder's dot
// (four accumulators over d mod 4, weft_patterns::tensor::dot), the pooled rows staged in
// shared memory as doubles, so every pooled key is read once per 64 groups instead of once per
// group. The four lanes of a quad hold the four accumulators (lane j: dimensions d = j mod 4)
// of the same 8 groups x 8 key blocks, and combine them at the end by two shuffles in the
// CPU's order, (a0 + a1) + (a2 + a3): 64 multiply-adds per 16 shared-memory reads. At 64k
// (H200): 0.30 ms with a thread holding all four accumulators of 4 x 4 pairs
// (16 per 8 reads), 0.184 with the register prefetch below, 0.186 in quads (the FP64 pipe
// about 40% busy, 8 warps per SM); quads of 4 x 8 pairs at two CTAs per SM took 0.219.
extern "C" __global__ void __launch_bounds__(256) {{NAME}}_block_scores(
    const float* __restrict__ pooled_q, const float* __restrict__ pooled_k, int hq, int hkv, int groups,
    int kblocks, double scale, double* __restrict__ scores)
{
    constexpr int T = 64, DC = 32;
    // (sK's rows are 36 doubles apart: the 16 reads of a half-warp, 4 key blocks x 4
    // dimensions, then fall in 16 different bank pairs.)
    __shared__ double sQ[T][DC];
    __shared__ double sK[T][DC + 4];
    const int h = blockIdx.z, kv = h / (hq / hkv), tid = threadIdx.x;
    const int g0 = blockIdx.x * T, kb0 = blockIdx.y * T;
    const int quad = tid / 4, j = tid % 4;
    const int qr = quad / 8, qk = quad % 8;  // groups g0 + 8 qr + i, key blocks kb0 + qk + 8 l
    double acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int l = 0; l < 8; ++l) acc[i][l] = 0.0;
    // The next DC columns are read into registers while the current ones are multiplied (one
    // CTA fits an SM, so nothing else would hide the reads).
    constexpr int PER = T * DC / 256;
    float rq[PER], rk[PER];
    auto fetch = [&](int d0) {
#pragma unroll
        for (int n = 0; n < PER; ++n) {
            const int i = tid + 256 * n, t = i / DC, d = d0 + i % DC;
            rq[n] = g0 + t < groups ? pooled_q[((size_t)h * groups + g0 + t) * D + d] : 0.f;
            rk[n] = kb0 + t < kblocks ? pooled_k[((size_t)kv * kblocks + kb0 + t) * D + d] : 0.f;
        }
    };
    fetch(0);
    for (int d0 = 0; d0 < D; d0 += DC) {
#pragma unroll
        for (int n = 0; n < PER; ++n) {
            const int i = tid + 256 * n;
            sQ[i / DC][i % DC] = (double)rq[n];
            sK[i / DC][i % DC] = (double)rk[n];
        }
        __syncthreads();
        if (d0 + DC < D) fetch(d0 + DC);
#pragma unroll 2
        for (int s = 0; s < DC / 4; ++s) {
            const int d = 4 * s + j;
            double a[8], b[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = sQ[8 * qr + i][d];
#pragma unroll
            for (int l = 0; l < 8; ++l) b[l] = sK[qk + 8 * l][d];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int l = 0; l < 8; ++l) acc[i][l] = fma(a[i], b[l], acc[i][l]);
        }
        __syncthreads();
    }
    // (IEEE addition commutes, so every lane of the quad gets the same sums.) Lane j stores the
    // key blocks with l = j mod 4: each store writes 8 neighbouring doubles of a group's row.
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            const double pair = __dadd_rn(acc[i][l], __shfl_xor_sync(0xffffffffu, acc[i][l], 1));
            const double dot = __dadd_rn(__dadd_rn(pair, __shfl_xor_sync(0xffffffffu, pair, 2)), 0.0);
            const int g = g0 + 8 * qr + i, kb = kb0 + qk + 8 * l;
            if (l % 4 == j && g < groups && kb < kblocks) scores[((size_t)h * groups + g) * kblocks + kb] = __dmul_rn(scale, dot);
        }
}

// ---- block_select: grid (groups, hq), 256 threads; dynamic shared memory kblocks x 12 bytes,
// rounded up to a power of two ----
// Sets bit kb of chosen[(h * groups + g) * words ..] for each chosen pattern key block, from
// the candidates' scores (block_scores). Mode 0: top_k(top_k); 1: threshold (budget_arg =
// ln t); 2: top_p (budget_arg = p).
extern "C" __global__ void __launch_bounds__(256) {{NAME}}_block_select(
    const double* __restrict__ scores, const u32* __restrict__ allowed, int per_head, int groups, int kblocks,
    int mode, int top_k, double budget_arg, u32* __restrict__ chosen)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int g = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const u32 n2 = pow2_at_least(kblocks);
    double* sScore = (double*)smem;           // [n2]
    u32* sId = (u32*)(sScore + n2);           // [n2]
    __shared__ u32 nCand, nKeep;
    const int words = (kblocks + 31) / 32;
    const u32* allow = allowed + ((size_t)(per_head ? h : 0) * groups + g) * words;
    const double* row = scores + ((size_t)h * groups + g) * kblocks;
    if (tid == 0) nCand = nKeep = 0;
    __syncthreads();
    for (int kb = tid; kb < kblocks; kb += 256) {
        if (!((allow[kb / 32] >> (kb % 32)) & 1u)) continue;
        const u32 i = atomicAdd(&nCand, 1u);
        sScore[i] = row[kb];
        sId[i] = kb;
    }
    __syncthreads();
    const u32 n = nCand;
    sort_best_first(sScore, sId, n, n2);
    u32 keep;
    if (mode == 0) {
        keep = min((u32)top_k, n);
    } else if (mode == 2) {
        // top_p(p): the fewest best whose fixed-point weights (top_p_weight) reach p of their
        // total (weft_patterns::select; integer sums, so the order does not matter).
        unsigned long long* w = (unsigned long long*)sScore;  // only the ids are needed after this
        const double best = n > 0 ? sScore[0] : 0.0;
        __syncthreads();
        for (u32 i = tid; i < n; i += 256) w[i] = top_p_weight(__dsub_rn(sScore[i], best));
        __syncthreads();
        if (tid == 0) {
            unsigned long long total = 0;
            for (u32 i = 0; i < n; ++i) total += w[i];
            const double goal = top_p_goal(budget_arg, total);
            unsigned long long acc = 0;
            u32 count = 0;
            for (u32 i = 0; i < n; ++i) {
                acc += w[i];
                ++count;
                if ((double)acc >= goal) break;
            }
            nKeep = count;
        }
        __syncthreads();
        keep = nKeep;
    } else {
        // threshold(t): every block within ln t of the best (at least one).
        const double cut = n > 0 ? sScore[0] + budget_arg : 0.0;
        u32 mine = 0;
        for (u32 i = tid; i < n; i += 256) mine += sScore[i] >= cut;
        atomicAdd(&nKeep, mine);
        __syncthreads();
        keep = n > 0 ? max(nKeep, 1u) : 0u;
    }
    u32* out = chosen + ((size_t)h * groups + g) * words;
    for (int w = tid; w < words; w += 256) out[w] = 0;
    __syncthreads();
    for (u32 i = tid; i < keep; i += 256) atomicOr(out + sId[i] / 32, 1u << (sId[i] % 32));
}

// ---- block_top: grid (ceil(groups / 8), hq), 256 threads: one warp per (group, head);
// dynamic shared memory 8 x cache_width x 10 bytes (none when cache_width is 0) ----
// block_select for top_k (mode 0) and threshold (mode 1) without a sort: the same choice (the
// CPU's ranking: score descending with NaN as -inf and -0 below +0, ties to the lower block)
// found by a radix select over 64-bit keys, eight 8-bit digits from the top, on a per-warp
// histogram in shared memory; then the key at the cut decides, and of the blocks holding
// exactly that key the lowest-numbered ones fill the count. A warp per row with no block-wide
// barrier: the sort's 45 barrier stages per row made block_select latency-bound (0.62 ms for
// 32 heads x 512 groups x 512 blocks). With cache_width (at least the row's blocks rounded up
// to 32) each warp keeps its row's keys in shared memory, read from the scores and the
// allowed bits once instead of on each of the ten passes, with a list of the blocks still in
// the running that each digit pass shortens; the histogram's atomics are one per distinct
// digit in a warp (most keys of a row share their top digits, so per-lane atomics queued on
// one address).
extern "C" __global__ void __launch_bounds__(256, 1) {{NAME}}_block_top(
    const double* __restrict__ scores, const u32* __restrict__ allowed, int per_head, int groups, int kblocks,
    int mode, int top_k, double budget_arg, u32* __restrict__ chosen, int cache_width)
{
    __shared__ u32 sHist[8][256];
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = blockIdx.x * 8 + warp, h = blockIdx.y;
    if (g >= groups) return;
    u32* hist = sHist[warp];
    const int words = (kblocks + 31) / 32;
    const u32* allow = allowed + ((size_t)(per_head ? h : 0) * groups + g) * words;
    const double* row = scores + ((size_t)h * groups + g) * kblocks;
    // Block kb's key, or 0 (below every key of a real score: -inf's key is 0x000fffff...) when
    // it is not a candidate.
    auto key_from_scores = [&](int kb) -> unsigned long long {
        const bool cand = kb < kblocks && ((allow[kb / 32] >> (kb % 32)) & 1u);
        return cand ? double_key(rank_score(row[kb])) : 0ull;
    };
    unsigned long long* cache = reinterpret_cast<unsigned long long*>(smem) + (size_t)warp * cache_width;
    // With the cache, `live` lists the blocks still in the running (after 8 cached rows).
    u16* live = reinterpret_cast<u16*>(reinterpret_cast<unsigned long long*>(smem) + 8 * (size_t)cache_width) +
                (size_t)warp * cache_width;
    if (cache_width > 0) {
        for (int kb = lane; kb < words * 32; kb += 32) cache[kb] = key_from_scores(kb);
        __syncwarp();
    }
    auto key_of = [&](int kb, bool& cand) -> unsigned long long {
        const unsigned long long key = cache_width > 0 ? cache[kb] : key_from_scores(kb);
        cand = key != 0;
        return key;
    };
    // Candidates (listed in `live` with the cache), and the best key (threshold mode's
    // reference).
    u32 n = 0;
    unsigned long long best = 0;
    for (int base = 0; base < words * 32; base += 32) {
        bool cand;
        const unsigned long long key = key_of(base + lane, cand);
        const u32 ballot = __ballot_sync(0xffffffffu, cand);
        if (cache_width > 0 && cand) live[n + __popc(ballot & ((1u << lane) - 1u))] = (u16)(base + lane);
        n += __popc(ballot);
        if (cand && key > best) best = key;
    }
    __syncwarp();
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    u32 keep;
    if (mode == 0) {
        keep = min((u32)top_k, n);
    } else {
        // threshold(t): every candidate within ln t of the best, at least one.
        const double cut = key_double(best) + budget_arg;
        u32 count = 0;
        for (int base = 0; base < words * 32; base += 32) {
            bool cand;
            const unsigned long long key = key_of(base + lane, cand);
            count += __popc(__ballot_sync(0xffffffffu, cand && key_double(key) >= cut));
        }
        keep = n > 0 ? max(count, 1u) : 0u;
    }
    // The keep-th best key: digit by digit from the top, `prefix` holds the digits found and
    // `rank` the place (from 1) wanted among the candidates that share them.
    // With the cache each pass reads only the `alive` blocks that share the digits found so
    // far, and then drops those that do not share the new one: after the first passes a few.
    unsigned long long prefix = 0;
    u32 rank = keep;
    u32 alive = n;
    auto pass_key = [&](int i, bool& cand) -> unsigned long long {
        if (cache_width == 0) return key_of(i, cand);
        cand = i < (int)alive;
        return cand ? cache[live[i]] : 0ull;
    };
    for (int shift = 56; shift >= 0 && keep > 0; shift -= 8) {
        for (int b = lane; b < 256; b += 32) hist[b] = 0;
        __syncwarp();
        const int len = cache_width > 0 ? (int)alive : words * 32;
        for (int base = 0; base < len; base += 32) {
            bool cand;
            const unsigned long long key = pass_key(base + lane, cand);
            // (A shift by 64 is undefined: the first digit has no prefix to match.)
            const bool counts = cand && (shift == 56 || (key >> (shift + 8)) == prefix);
            const u32 counting = __ballot_sync(0xffffffffu, counts);
            if (counts) {
                const u32 digit = (u32)(key >> shift) & 255u;
                const u32 peers = __match_any_sync(counting, digit);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (u32)__popc(peers));
            }
        }
        __syncwarp();
        // Lane l holds digits 8l .. 8l + 7; `above` counts the candidates with a higher digit.
        u32 mine = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) mine += hist[8 * lane + i];
        // An inclusive suffix sum over the lanes by doubling; minus its own, what lies above.
        u32 suffix = mine;
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
            const u32 v = __shfl_down_sync(0xffffffffu, suffix, o);
            if (lane + o < 32) suffix += v;
        }
        const u32 above = suffix - mine;
        int found = -1;
        u32 found_above = 0;
        u32 cum = above;
#pragma unroll
        for (int i = 7; i >= 0; --i) {
            const u32 c = hist[8 * lane + i];
            if (found < 0 && cum < rank && rank <= cum + c) {
                found = 8 * lane + i;
                found_above = cum;
            }
            cum += c;
        }
        const u32 who = __ballot_sync(0xffffffffu, found >= 0);
        const int src = __ffs(who) - 1;
        const int digit = __shfl_sync(0xffffffffu, found, src);
        rank -= __shfl_sync(0xffffffffu, found_above, src);
        prefix = (prefix << 8) | (unsigned long long)digit;
        if (cache_width > 0 && shift > 0) {
            // Keep the blocks whose key has the new prefix, in place: a chunk's ids are read
            // before any is written, and writes never pass the chunk being read.
            u32 kept = 0;
            for (int base = 0; base < (int)alive; base += 32) {
                const int i = base + lane;
                const u16 id = i < (int)alive ? live[i] : 0;
                const bool stays = i < (int)alive && (cache[id] >> shift) == prefix;
                const u32 ballot = __ballot_sync(0xffffffffu, stays);
                __syncwarp();
                if (stays) live[kept + __popc(ballot & ((1u << lane) - 1u))] = id;
                kept += __popc(ballot);
            }
            alive = kept;
        }
        __syncwarp();  // the histogram is cleared for the next digit
    }
    // Every candidate above the cut key, and the first `rank` (by block number) at it.
    u32* out = chosen + ((size_t)h * groups + g) * words;
    u32 at_cut = 0;
    for (int base = 0; base < words * 32; base += 32) {
        bool cand;
        const unsigned long long key = key_of(base + lane, cand);
        const bool tie = keep > 0 && cand && key == prefix;
        const u32 ties = __ballot_sync(0xffffffffu, tie);
        const u32 before = at_cut + __popc(ties & ((1u << lane) - 1u));
        const bool take = keep > 0 && cand && (key > prefix || (tie && before < rank));
        const u32 word = __ballot_sync(0xffffffffu, take);
        if (lane == 0) out[base / 32] = word;
        at_cut += __popc(ties);
    }
}

// ---- block_rows: grid (ceil(rows / 4)), 128 threads: one warp per index row ----
// Each possible key block of the row gets its code when its pattern block is chosen, else
// the other, or in a query block holding grid row lines (line_offset) its line code; pass 0
// counts entries into row_count, pass 1 writes them at block_ptr.
extern "C" __global__ void __launch_bounds__(128) {{NAME}}_block_rows(
    const u32* __restrict__ chosen, const u32* __restrict__ entry_ptr, const u32* __restrict__ entry_kb,
    const u32* __restrict__ entry_pattern_kb, const u16* __restrict__ code_sel, const u16* __restrict__ code_not,
    const u32* __restrict__ code_line, const int* __restrict__ line_phase, int line_stride, int line_len,
    const u16* __restrict__ line_codes,
    int per_head, int hq, int q_blocks, int block_m, int block_q, int groups, int kblocks, int pass,
    u32* __restrict__ row_count, const u32* __restrict__ block_ptr, u32* __restrict__ block_idx, u16* __restrict__ block_mask)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * 4 + warp;
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
