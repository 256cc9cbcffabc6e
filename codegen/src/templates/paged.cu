// Decode over a paged KV cache, every step on the device (no host synchronisation), for a
// batch of sequences of different lengths. The cache keeps K and V as pages of `page_size`
// tokens, `[pages, page_size, hkv, D]` (vLLM's and FlashInfer's NHD layout); sequence b's
// logical page i is physical page `page_table[b * max_pages + i]`, its length `seq_lens[b]`
// (on the device, advanced by the step that appends). Per physical page and KV head the cache
// keeps the page's elementwise key minimum and maximum (Quest's metadata), rebuilt whenever a
// token enters the page. Entry points:
//   fill     a sequence's first n tokens from weft's [hkv, n, D] layout, and their pages' metadata;
//   append   one token per sequence at position seq_lens[b], and its page's metadata;
//   advance  seq_lens[b] += 1 (a launch of its own: every append CTA reads the old length);
//   score    (retrieval) every candidate page's score for every query head (Quest's bound, or
//            the best token over quantized keys), spread over the GPU;
//   retrieve (retrieval) per (sequence, query head), over those scores: the
//            pages a top_k / threshold / top_p budget keeps (exactly weft_patterns::retrieval's choice:
//            f64 scores summed in the CPU's order, ties to the lower page), and the kept
//            tokens as chunks of at most page_size tokens, ascending: the sink, the kept pages
//            (clipped to the tokens between sink and recent), the recent tokens;
//   attend   split-KV attention of each (sequence, query head) over its chunks (or, dense,
//            over every page), f32 partials and log-sum-exps for the merge kernel;
//   stage    (a cache in host memory) copies the pages a retrieval step kept into the GPU's
//            cache of hot pages, between retrieve and attend.
// A cache in host memory is pinned and mapped: Kc and Vc are its device addresses, and every
// kernel reads and writes it over the bus; only `stage` and `attend` use the hot pages (and
// only a module generated for such a cache, WEFT_HOST, looks them up in `attend`: the lookup
// costs the attend kernel of a cache in GPU memory registers it has none to spare for).

#include "config.cuh"   // generated per kernel: its config, entry points and names
#include "prelude.cuh"
#include "params.cuh"   // generated from weft-codegen abi.rs: the parameter structs
#include "repro_exp.cuh"  // top_p's fixed-point weights, as the CPU computes them
// D and the entry points' thread counts come from the config.


// One 16-bit element (the dtype's bits) as a float.
__device__ __forceinline__ float elem(u16 x) {
    float lo, hi;
    unpack((u32)x, lo, hi);
    return lo;
}

// The cache's row of token `slot` of physical page `page`, KV head `kvh`.
__device__ __forceinline__ size_t cache_row(u32 page, int slot, int kvh, int page_size, int hkv) {
    return (((size_t)page * page_size + slot) * hkv + kvh) * D;
}

// ---- quantized keys (ParisKV) ----
// A key row quantized per token as weft_patterns::retrieval::quantize: with b >= 2 bits the
// codes clamp(round(x / s), -L, L), s = max|x| / L, L = 2^(b-1) - 1 (all zero, s = 0, for a
// zero row); with 1 bit the sign (x >= 0: +1), s the mean magnitude. The kernels are built with
// fast math, so each f32 operation is done in f64 and rounded to f32 once: that is the f32
// operation's correctly rounded result, as the CPU computes it. (Rows whose magnitudes are all
// below f32's normal range may differ: fast math flushes those to zero.)
__device__ __forceinline__ float f32_of(double x) { return __double2float_rn(x); }

__device__ void quantize_row(const u16* __restrict__ row, int bits, signed char* __restrict__ code,
                             float* __restrict__ scale) {
    if (bits <= 1) {
        float sum = 0.f;  // in order, as an iterator's f32 sum
        for (int d = 0; d < D; ++d) sum = f32_of((double)sum + (double)fabsf(elem(row[d])));
        for (int d = 0; d < D; ++d) code[d] = elem(row[d]) >= 0.f ? 1 : -1;
        *scale = f32_of((double)sum / (double)D);
        return;
    }
    const float levels = (float)((1 << (bits - 1)) - 1);
    float mx = 0.f;
    for (int d = 0; d < D; ++d) mx = fmaxf(mx, fabsf(elem(row[d])));
    const float s = f32_of((double)mx / (double)levels);
    for (int d = 0; d < D; ++d) {
        const float x = mx == 0.f ? 0.f : f32_of((double)elem(row[d]) / (double)s);
        code[d] = (signed char)fminf(fmaxf(roundf(x), -levels), levels);
    }
    *scale = mx == 0.f ? 0.f : s;
}

// The GPU's cache of hot pages (a cache in host memory only; hot_slots = 0 otherwise): slots of
// one page of one KV head, K and V `[hot_slots, page_size, D]`, each tagged with the key
// `page * hkv + kvh + 1` of what it holds (0: nothing). A key has one slot (direct-mapped, a
// multiplicative hash), so the attend kernel finds a page with one load of its tag.
__device__ __forceinline__ u32 hot_key(u32 page, int kvh, int hkv) { return page * (u32)hkv + (u32)kvh + 1u; }
__device__ __forceinline__ int hot_slot(u32 key, int hot_slots) {
    return (int)(((unsigned long long)(key * 2654435761u) * (unsigned)hot_slots) >> 32);
}

// Grid: x logical pages of the n tokens, y KV heads. The page's metadata comes from the source
// rows (the cache may be in host memory: not read back).
extern "C" __global__ void __launch_bounds__(FILL_THREADS) WEFT_ENTRY(fill)(PAGED_FILL_PARAMS)
{
    const int i = blockIdx.x, kvh = blockIdx.y;
    const u32 page = page_table[(size_t)seq * max_pages + i];
    const int t0 = i * page_size, count = min(page_size, n - t0);
    // 16-byte pieces of the page's rows: K and V.
    constexpr int PIECES = D / 8;
    for (int x = threadIdx.x; x < count * PIECES; x += blockDim.x) {
        const int s = x / PIECES, c = x % PIECES;
        const size_t src = ((size_t)kvh * n + t0 + s) * D + c * 8;
        const size_t dst = cache_row(page, s, kvh, page_size, hkv) + c * 8;
        *(uint4*)(Kc + dst) = *(const uint4*)(Ksrc + src);
        *(uint4*)(Vc + dst) = *(const uint4*)(Vsrc + src);
    }
    // Elementwise minimum and maximum over the page's tokens in order (the first of equal
    // values kept, as the CPU's scan).
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const u16* src = Ksrc + ((size_t)kvh * n + t0) * D + d;
        u16 lo = src[0], hi = lo;
        float flo = elem(lo), fhi = flo;
        for (int s = 1; s < count; ++s) {
            const u16 x = src[(size_t)s * D];
            const float f = elem(x);
            if (f < flo) flo = f, lo = x;
            if (f > fhi) fhi = f, hi = x;
        }
        const size_t m = ((size_t)page * hkv + kvh) * D + d;
        kmin[m] = lo;
        kmax[m] = hi;
    }
    // Quantized keys, a row per thread.
    if (key_bits > 0)
        for (int s = threadIdx.x; s < count; s += blockDim.x) {
            const size_t at = ((size_t)page * page_size + s) * hkv + kvh;
            quantize_row(Ksrc + ((size_t)kvh * n + t0 + s) * D, key_bits, codes + at * D, cscale + at);
        }
    // A hot copy of the page is stale now.
    if (hot_slots > 0 && threadIdx.x == 0) {
        const u32 key = hot_key(page, kvh, hkv);
        const int h = hot_slot(key, hot_slots);
        if (hot_tag[h] == key) hot_tag[h] = 0;
    }
}

// Grid: x sequences, y KV heads. Knew and Vnew are [batch, hkv, D]. The page's metadata is
// updated with the new token (what a scan of the page's tokens in order gives: its first token
// starts it, a later one replaces a bound only when strictly beyond it), and a hot copy of the
// page gets the token too.
extern "C" __global__ void __launch_bounds__(APPEND_THREADS) WEFT_ENTRY(append)(PAGED_APPEND_PARAMS)
{
    const int b = blockIdx.x, kvh = blockIdx.y;
    const int pos = seq_lens[b];
    const u32 page = page_table[(size_t)b * max_pages + pos / page_size];
    const int slot = pos % page_size;
    const size_t src = ((size_t)b * hkv + kvh) * D, dst = cache_row(page, slot, kvh, page_size, hkv);
    int hot = -1;
    if (hot_slots > 0) {
        const u32 key = hot_key(page, kvh, hkv);
        const int h = hot_slot(key, hot_slots);
        if (hot_tag[h] == key) hot = h;
    }
    for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
        const uint4 k = *(const uint4*)(Knew + src + c * 8), v = *(const uint4*)(Vnew + src + c * 8);
        *(uint4*)(Kc + dst + c * 8) = k;
        *(uint4*)(Vc + dst + c * 8) = v;
        if (hot >= 0) {
            const size_t at = ((size_t)hot * page_size + slot) * D + c * 8;
            *(uint4*)(hot_k + at) = k;
            *(uint4*)(hot_v + at) = v;
        }
    }
    if (key_bits > 0 && threadIdx.x == 0) {
        const size_t at = ((size_t)page * page_size + slot) * hkv + kvh;
        quantize_row(Knew + src, key_bits, codes + at * D, cscale + at);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const u16 x = Knew[src + d];
        const size_t m = ((size_t)page * hkv + kvh) * D + d;
        if (slot == 0) {
            kmin[m] = kmax[m] = x;
        } else {
            const float f = elem(x);
            if (f < elem(kmin[m])) kmin[m] = x;
            if (f > elem(kmax[m])) kmax[m] = x;
        }
    }
}

// Grid: x sequences, ADVANCE_THREADS each.
extern "C" __global__ void __launch_bounds__(ADVANCE_THREADS) WEFT_ENTRY(advance)(PAGED_ADVANCE_PARAMS)
{
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < batch) seq_lens[b] += 1;
}

// ---- retrieve ----
// f64 to an unsigned key that sorts the same way (finite values; -0.0 is made +0.0 first).
__device__ __forceinline__ unsigned long long score_key(double s) {
    const unsigned long long u = (unsigned long long)__double_as_longlong(s + 0.0);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ double key_score(unsigned long long k) {
    return __longlong_as_double((long long)((k >> 63) ? (k & 0x7fffffffffffffffull) : ~k));
}

constexpr int RETRIEVE_WARPS = RETRIEVE_THREADS / 32;

// Exclusive block-wide prefix sum of `v` (every thread calls it); `total` gets the sum.
__device__ int block_scan(int v, int& total, int* s_warp) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        const int y = __shfl_up_sync(0xffffffff, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) s_warp[warp] = x;
    __syncthreads();
    int before = 0;
    total = 0;
    for (int w = 0; w < RETRIEVE_WARPS; ++w) {
        if (w < warp) before += s_warp[w];
        total += s_warp[w];
    }
    __syncthreads();
    return before + x - v;
}

// The largest of keys[0..n) (0 for none), for every thread of the CTA.
__device__ unsigned long long block_max_key(const unsigned long long* keys, int n, unsigned long long* s_word) {
    if (threadIdx.x == 0) s_word[0] = 0;
    __syncthreads();
    unsigned long long mx = 0;
    for (int c = threadIdx.x; c < n; c += blockDim.x) mx = max(mx, keys[c]);
    atomicMax(&s_word[0], mx);
    __syncthreads();
    const unsigned long long r = s_word[0];
    __syncthreads();
    return r;
}

// The cut of a weighted radix select over keys[0..n), most significant 8-bit digit first:
// keys rank high to low, each weighing weight(key) (1 for top_k, top_p's fixed-point weight for
// top_p), and the cut is the key at which the running weight from the top reaches `want`.
// Returns the weight still wanted among the keys equal to the cut (every key above it is
// kept). Every thread of the CTA calls it.
template <typename Weight>
__device__ unsigned long long radix_cut(const unsigned long long* keys, int n, unsigned long long want, Weight weight,
                                        unsigned long long* s_bins, unsigned long long* s_word,
                                        unsigned long long& cut) {
    unsigned long long prefix = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) s_bins[i] = 0;
        __syncthreads();
        const unsigned long long high = shift == 56 ? 0 : ~0ull << (shift + 8);
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            const unsigned long long k = keys[c];
            if ((k & high) == prefix) {
                const unsigned long long w = weight(k);
                if (w) atomicAdd(&s_bins[(k >> shift) & 255], w);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long above = 0;
            int bin = 255;
            for (; bin > 0; --bin) {
                if (above + s_bins[bin] >= want) break;
                above += s_bins[bin];
            }
            s_word[0] = (unsigned long long)bin;
            s_word[1] = above;
        }
        __syncthreads();
        want -= s_word[1];
        prefix |= s_word[0] << shift;
        __syncthreads();
    }
    cut = prefix;
    return want;
}

// A sequence of `visible` tokens: its sink [0, sink_end), its recent tokens [recent_from,
// visible), and its candidate pages, those holding a visible token outside both: the logical
// pages [p_lo, p_lo + ncand) (none when the two meet).
struct Candidates {
    int sink_end, recent_from, p_lo, ncand;
};
__device__ __forceinline__ Candidates candidates(int visible, int sink, int recent, int page_size) {
    Candidates c;
    c.sink_end = min(sink, visible);
    c.recent_from = max(visible - recent, c.sink_end);
    c.p_lo = c.sink_end / page_size;
    const int p_hi = c.sink_end < c.recent_from ? (c.recent_from + page_size - 1) / page_size : c.p_lo;
    c.ncand = p_hi - c.p_lo;
    return c;
}

// ---- score ----
// Query heads scored per pass over a page's metadata or codes.
constexpr int HC = G < 8 ? G : 8;

// Grid: x tiles of SCORE_THREADS candidate pages, y KV heads, z sequences. A thread scores one
// candidate page for every query head of the KV head (HC at a time, reading the page's
// metadata or codes once per pass): Quest's bound, summed over d in order in f64 (the CPU
// reference's arithmetic), or (score_mode 1) the best of the page's tokens' scores over
// quantized keys. Spread over the whole GPU, so that a long sequence's scores are not one
// CTA's reads.
extern "C" __global__ void __launch_bounds__(SCORE_THREADS) WEFT_ENTRY(score)(PAGED_SCORE_PARAMS)
{
    __shared__ double s_q[HC][D];
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int visible = seq_lens[b];
    const Candidates cand = candidates(visible, sink, recent, page_size);
    const int p_lo = cand.p_lo, ncand = cand.ncand;
    if (blockIdx.x * SCORE_THREADS >= ncand) return;  // the whole CTA
    const int c = blockIdx.x * SCORE_THREADS + threadIdx.x;
    const u32* table = page_table + (size_t)b * max_pages;
    const int row0 = b * hq + kvh * G;
    double group_best = 0.0;  // shared: the best of the heads' scaled scores so far
    for (int h0 = 0; h0 < G; h0 += HC) {
        __syncthreads();
        for (int x = threadIdx.x; x < HC * D; x += SCORE_THREADS) {
            const int j = x / D, d = x % D;
            s_q[j][d] = h0 + j < G ? (double)elem(Q[(size_t)(row0 + h0 + j) * D + d]) : 0.0;
        }
        __syncthreads();
        if (c >= ncand) continue;
        const u32 page = table[p_lo + c];
        double sc[HC];
        if (score_mode == 1) {
            // The dequantized key k'_d = code_d * s (rounded to f32); q . k' summed as
            // weft_patterns::dot sums (four accumulators over d mod 4, then (a0 + a1) + (a2 + a3)),
            // with explicit products and sums so that no multiply-add is fused.
            const int count = min(page_size, visible - (p_lo + c) * page_size);
#pragma unroll
            for (int j = 0; j < HC; ++j) sc[j] = neg_inf();
            for (int t = 0; t < count; ++t) {
                const size_t at = ((size_t)page * page_size + t) * hkv + kvh;
                const signed char* code = codes + at * D;
                const double ks = (double)cscale[at];
                double acc[HC][4];
#pragma unroll
                for (int j = 0; j < HC; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0;
#pragma unroll 1  // unrolled, ptxas spilled at d = 64 for sm_80
                for (int d = 0; d < D; d += 4) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const double k = (double)f32_of((double)code[d + i] * ks);
#pragma unroll
                        for (int j = 0; j < HC; ++j) acc[j][i] = __dadd_rn(acc[j][i], __dmul_rn(s_q[j][d + i], k));
                    }
                }
#pragma unroll
                for (int j = 0; j < HC; ++j)
                    sc[j] = fmax(sc[j], __dadd_rn(__dadd_rn(acc[j][0], acc[j][1]), __dadd_rn(acc[j][2], acc[j][3])));
            }
        } else {
            const u16* lo = kmin + ((size_t)page * hkv + kvh) * D;
            const u16* hi = kmax + ((size_t)page * hkv + kvh) * D;
#pragma unroll
            for (int j = 0; j < HC; ++j) sc[j] = 0.0;
            for (int d = 0; d < D; ++d) {
                const double l = (double)elem(lo[d]), u = (double)elem(hi[d]);
#pragma unroll
                for (int j = 0; j < HC; ++j) sc[j] += fmax(s_q[j][d] * l, s_q[j][d] * u);
            }
        }
#pragma unroll
        for (int j = 0; j < HC; ++j) {
            if (h0 + j >= G) break;
            const double scaled = scale * sc[j];
            if (!shared) scores[(size_t)(row0 + h0 + j) * max_pages + c] = score_key(scaled);
            // The first head's, then fmax with each next one's (as f64::max folds them).
            else group_best = h0 + j == 0 ? scaled : fmax(group_best, scaled);
        }
    }
    if (shared && c < ncand) scores[(size_t)row0 * max_pages + c] = score_key(group_best);
}

// ---- retrieve ----
// Grid: x choosing rows of a sequence (query heads, or with `group` G the KV heads, whose
// first query head's row holds the choice), y sequences.
extern "C" __global__ void __launch_bounds__(RETRIEVE_THREADS) WEFT_ENTRY(retrieve)(PAGED_RETRIEVE_PARAMS)
{
    __shared__ unsigned long long s_mass[256];
    __shared__ unsigned long long s_word[2];
    __shared__ int s_warp[RETRIEVE_WARPS];
    __shared__ int s_count;

    const int h = blockIdx.x * group, b = blockIdx.y;
    const int row = b * hq + h;
    const int visible = seq_lens[b];
    const Candidates cand = candidates(visible, sink, recent, page_size);
    const int sink_end = cand.sink_end, recent_from = cand.recent_from, p_lo = cand.p_lo, ncand = cand.ncand;
    // The candidates' scores, as `score` wrote them.
    const unsigned long long* keys = scores + (size_t)row * max_pages;

    // The cut: pages with keys above `cut` are kept, and the first `need_eq` (in page order)
    // of those equal to it.
    unsigned long long cut = 0;
    int need_eq = 0;
    int kept_target = mode == 0 ? min(top_k, ncand) : ncand;
    if (mode == 2 && ncand > 0) {
        // top_p(p): the fewest best (score, then lower page) whose fixed-point weights
        // top_p_weight(s - best) reach p x total x (1 - 1e-12), as weft_patterns::select sums
        // them (exactly, in integers). An 8-bit radix select over the keys by weight instead of
        // count finds the key at the cut; of the pages holding it, the lowest make up the rest.
        const double best = key_score(block_max_key(keys, ncand, s_word));
        if (threadIdx.x == 0) s_mass[0] = 0;
        __syncthreads();
        unsigned long long part = 0;
        for (int c = threadIdx.x; c < ncand; c += blockDim.x) part += top_p_weight(__dsub_rn(key_score(keys[c]), best));
        atomicAdd(&s_mass[0], part);
        __syncthreads();
        const unsigned long long total = s_mass[0];
        // The smallest integer sum the CPU's f64 comparison accepts (sums stay below 2^53).
        unsigned long long want = (unsigned long long)ceil(top_p_goal(budget_arg, total));
        if (want == 0) want = 1;
        __syncthreads();
        const auto weight = [best](unsigned long long k) { return top_p_weight(__dsub_rn(key_score(k), best)); };
        want = radix_cut(keys, ncand, want, weight, s_mass, s_word, cut);
        // Every key above the cut is kept; of those equal to it (one weight each), enough to
        // reach the sum, lowest pages first.
        const unsigned long long w = weight(cut);
        need_eq = w > 0 ? (int)min((want + w - 1) / w, (unsigned long long)ncand) : 1;
    } else if (mode == 1 && ncand > 0) {
        // threshold(t): keep s >= max + ln(t), at least the best.
        const unsigned long long best = block_max_key(keys, ncand, s_word);
        cut = score_key(key_score(best) + budget_arg);
        if (threadIdx.x == 0) s_count = 0;
        __syncthreads();
        int ge = 0;
        for (int c = threadIdx.x; c < ncand; c += blockDim.x) ge += keys[c] >= cut;
        atomicAdd(&s_count, ge);
        __syncthreads();
        kept_target = s_count > 0 ? s_count : 1;
        if (s_count == 0) cut = best;  // the best alone (the lowest page among equals)
        need_eq = s_count > 0 ? ncand : 1;
        __syncthreads();
    } else if (kept_target < ncand && kept_target > 0) {
        // top_k: the kept_target-th largest key (each weighs 1); of the keys equal to it, the
        // lowest pages make up the count.
        const auto one = [](unsigned long long) { return 1ull; };
        need_eq = (int)radix_cut(keys, ncand, (unsigned long long)kept_target, one, s_mass, s_word, cut);
    } else if (kept_target == 0) {
        cut = ~0ull;  // top_k(0): no page
        need_eq = 0;
    }
    const bool all = mode == 0 && kept_target >= ncand;

    // The chunks, ascending: the sink, the kept pages, the recent tokens.
    int2* out = chunks + (size_t)row * cap;
    int n = 0;  // chunks written so far (uniform across the block)
    for (int t = 0; t < sink_end; t += page_size) {
        if (threadIdx.x == 0 && n < cap) out[n] = make_int2(t, min(t + page_size, sink_end));
        ++n;
    }
    int eq_before = 0;
    for (int base = 0; base < ncand; base += blockDim.x) {
        const int c = base + threadIdx.x;
        const unsigned long long k = c < ncand ? keys[c] : 0;
        const int eq = c < ncand && !all && k == cut;
        int eq_total;
        const int eq_rank = eq_before + block_scan(eq, eq_total, s_warp);
        eq_before += eq_total;
        const int keep = c < ncand && (all || k > cut || (eq && eq_rank < need_eq));
        int kept_total;
        const int at = n + block_scan(keep, kept_total, s_warp);
        if (keep && at < cap) {
            const int p = p_lo + c;
            out[at] = make_int2(max(p * page_size, sink_end), min((p + 1) * page_size, recent_from));
        }
        n += kept_total;
    }
    for (int t = recent_from; t < visible; t += page_size) {
        if (threadIdx.x == 0 && n < cap) out[n] = make_int2(t, min(t + page_size, visible));
        ++n;
    }
    if (threadIdx.x == 0) chunk_count[row] = min(n, cap);
}

// ---- attend ----
// Memory-bound: each K and V row is read once per CTA with 16-byte loads, LANES lanes per row
// (ROWS rows per warp at a time), UNROLL passes of loads issued before their math so that
// several rows per warp are in flight. A dense step's CTA serves HPC query heads of one KV
// head (the group's heads share every key, so the rows are read once for them); a retrieval
// step's CTA serves one query head (each keeps its own pages). Each row slot keeps its own
// online softmax; the CTA merges them at the end.
constexpr int ATTEND_WARPS = ATTEND_THREADS / 32;
constexpr int LANES = D / 8;          // lanes per row: 8 elements (16 bytes) each
constexpr int ROWS = 32 / LANES;      // rows per warp per pass
constexpr int SLOTS = ATTEND_WARPS * ROWS;
constexpr int UNROLL = 4;
constexpr int TILE = 128;             // chunks staged in shared memory at a time
static_assert(D % 8 == 0 && 32 % LANES == 0, "a row is whole 16-byte pieces over lanes of one warp");
static_assert(ATTEND_THREADS >= TILE, "a thread per staged chunk");
// G (query heads per KV head) and HPC (heads per dense CTA, dividing G) come from the config.

// Grid: x splits; y query heads (retrieval) or groups of HPC query heads (dense); z sequences.
// Q is [batch, hq, D]; the partials are [splits, batch * hq, D] and [splits, batch * hq].
// Four CTAs per SM; three with the hot-page lookup (registers), whose reads are bound by the bus.
extern "C" __global__ void __launch_bounds__(ATTEND_THREADS, WEFT_HOST ? 3 : 4) WEFT_ENTRY(attend)(PAGED_ATTEND_PARAMS)
{
    __shared__ int s_start[TILE], s_off[TILE + 1];
    __shared__ float s_m[HPC][SLOTS], s_l[HPC][SLOTS];
    __shared__ float s_acc[HPC][SLOTS][D];

    const int split = blockIdx.x, b = blockIdx.z;
    // A dense step, and a retrieval whose KV head's heads share the kept chunks (`shared`, in
    // the row of the KV head's first query head), serve HPC heads a CTA.
    const bool grouped = dense || shared;
    const int hcount = grouped ? HPC : 1;
    const int h0 = grouped ? blockIdx.y * HPC : blockIdx.y;
    const int kvh = h0 / G;
    const int rows = batch * hq, row0 = b * hq + h0;
    const int crow = shared ? b * hq + kvh * G : row0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int piece = lane % LANES, slot = warp * ROWS + lane / LANES;
    const int len = seq_lens[b];
    const int nchunks = dense ? (len + page_size - 1) / page_size : chunk_count[crow];
    const int per = (nchunks + splits - 1) / splits;
    const int c0 = split * per, c1 = min(nchunks, c0 + per);
    const u32* table = page_table + (size_t)b * max_pages;
    // The hot pages' step counter: the next stage tells this step's claims from older ones by it.
    if (WEFT_HOST && hot_slots > 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0)
        *hot_step += 1;

    // This lane's piece of each head's q, in the log2 domain.
    float qv[HPC][8];
#pragma unroll
    for (int j = 0; j < HPC; ++j) {
        const uint4 w = j < hcount ? *(const uint4*)(Q + (size_t)(row0 + j) * D + piece * 8) : make_uint4(0, 0, 0, 0);
        const u32 x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            unpack(x[e], qv[j][2 * e], qv[j][2 * e + 1]);
            qv[j][2 * e] *= scale_log2;
            qv[j][2 * e + 1] *= scale_log2;
        }
    }
    float m[HPC], l[HPC], acc[HPC][8];
#pragma unroll
    for (int j = 0; j < HPC; ++j) {
        m[j] = neg_inf();
        l[j] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
    }

    for (int t0 = c0; t0 < c1; t0 += TILE) {
        // Stage up to TILE chunks: their first tokens and the running token offsets.
        const int nt = min(TILE, c1 - t0);
        __syncthreads();
        if (threadIdx.x < nt) {
            const int c = t0 + threadIdx.x;
            int2 span;
            if (dense) span = make_int2(c * page_size, min((c + 1) * page_size, len));
            else span = chunks[(size_t)crow * cap + c];
            s_start[threadIdx.x] = span.x;
            s_off[threadIdx.x + 1] = span.y - span.x;
        }
        if (threadIdx.x == 0) s_off[0] = 0;
        __syncthreads();
        if (threadIdx.x == 0)
            for (int i = 1; i <= nt; ++i) s_off[i] += s_off[i - 1];
        __syncthreads();
        const int total = s_off[nt];
        for (int base = 0; base < total; base += SLOTS * UNROLL) {
            uint4 kk[UNROLL], vv[UNROLL];
            bool ok[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int pos = base + u * SLOTS + slot;
                ok[u] = pos < total;
                if (ok[u]) {
                    // The chunk holding pos: the last with s_off[i] <= pos.
                    int lo = 0, hi = nt;
                    while (hi - lo > 1) {
                        const int mid = (lo + hi) / 2;
                        if (s_off[mid] <= pos) lo = mid;
                        else hi = mid;
                    }
                    const int t = s_start[lo] + pos - s_off[lo];
                    const u32 page = table[t / page_size];
                    const u16 *kb = Kc, *vb = Vc;
                    size_t off = cache_row(page, t % page_size, kvh, page_size, hkv) + piece * 8;
#if WEFT_HOST
                    if (hot_slots > 0) {
                        // A page with a hot copy is read from the GPU, any other from the host.
                        const u32 key = hot_key(page, kvh, hkv);
                        const int h = hot_slot(key, hot_slots);
                        if (hot_tag[h] == key) {
                            kb = hot_k;
                            vb = hot_v;
                            off = ((size_t)h * page_size + t % page_size) * D + piece * 8;
                        }
                    }
#endif
                    kk[u] = *(const uint4*)(kb + off);
                    vv[u] = *(const uint4*)(vb + off);
                } else {
                    kk[u] = vv[u] = make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float kf[8], vf[8];
                const u32 kx[4] = {kk[u].x, kk[u].y, kk[u].z, kk[u].w};
                const u32 vx[4] = {vv[u].x, vv[u].y, vv[u].z, vv[u].w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    unpack(kx[e], kf[2 * e], kf[2 * e + 1]);
                    unpack(vx[e], vf[2 * e], vf[2 * e + 1]);
                }
#pragma unroll
                for (int j = 0; j < HPC; ++j) {
                    if (j >= hcount) break;  // uniform over the CTA: a per-head retrieval serves one head
                    float sc = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) sc = fmaf(qv[j][e], kf[e], sc);
#pragma unroll
                    for (int o = LANES / 2; o > 0; o /= 2) sc += __shfl_xor_sync(0xffffffff, sc, o);
                    if (!ok[u]) continue;
                    const float mn = fmaxf(m[j], sc);
                    const float alpha = m[j] == neg_inf() ? 0.f : exp2f(m[j] - mn);
                    const float p = exp2f(sc - mn);
                    l[j] = l[j] * alpha + p;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(p, vf[e], acc[j][e] * alpha);
                    m[j] = mn;
                }
            }
        }
    }

    // Merge the row slots of every head.
#pragma unroll
    for (int j = 0; j < HPC; ++j) {
        if (piece == 0) {
            s_m[j][slot] = m[j];
            s_l[j][slot] = l[j];
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) s_acc[j][slot][piece * 8 + e] = acc[j][e];
    }
    __syncthreads();
    for (int x = threadIdx.x; x < hcount * D; x += blockDim.x) {
        const int j = x / D, e = x % D;
        float mx = neg_inf();
        for (int g = 0; g < SLOTS; ++g) mx = fmaxf(mx, s_m[j][g]);
        float sum = 0.f, o = 0.f;
        if (mx != neg_inf()) {
            for (int g = 0; g < SLOTS; ++g) {
                const float f = s_m[j][g] == neg_inf() ? 0.f : exp2f(s_m[j][g] - mx);
                sum += s_l[j][g] * f;
                o += s_acc[j][g][e] * f;
            }
        }
        const size_t prow = (size_t)split * rows + row0 + j;
        Opart[prow * D + e] = sum > 0.f ? o / sum : 0.f;
        if (e == 0) LSEpart[prow] = sum > 0.f ? (mx + log2f(sum)) * 0.69314718055994531f : neg_inf();
    }
}

// ---- stage (a cache in host memory) ----
// Grid: x choosing rows (query heads, or KV heads with `group` G), y sequences. Every page a retrieval step kept for the row (sequence b,
// query head h) gets a hot copy on the GPU unless it has one: the page's slot is claimed for
// this step (*hot_step + 1) with a compare-and-swap, so that one CTA copies it; a page whose
// slot another page claimed first in the same step stays in host memory, and the attend kernel
// reads it from there (it tells by the slot's tag). hot_stats: [lookups, hits, pages copied,
// pages left in host memory by a conflict].
extern "C" __global__ void __launch_bounds__(STAGE_THREADS) WEFT_ENTRY(stage)(PAGED_STAGE_PARAMS)
{
    __shared__ unsigned long long s_stats[4];
    const int h = blockIdx.x * group, b = blockIdx.y, kvh = h / (hq / hkv);
    const int row = b * hq + h;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned long long step = (unsigned long long)(*hot_step + 1u) << 32;
    const u32* table = page_table + (size_t)b * max_pages;
    if (threadIdx.x < 4) s_stats[threadIdx.x] = 0;
    __syncthreads();
    const int n = chunk_count[row];
    unsigned long long mine[4] = {0, 0, 0, 0};
    for (int c = warp; c < n; c += STAGE_THREADS / 32) {
        const int2 span = chunks[(size_t)row * cap + c];
        for (int p = span.x / page_size; p * page_size < span.y; ++p) {
            const u32 page = table[p];
            const u32 key = hot_key(page, kvh, hkv);
            const int slot = hot_slot(key, hot_slots);
            int won = 0;
            if (lane == 0) {
                mine[0] += 1;
                if (hot_tag[slot] == key) {
                    mine[1] += 1;
                } else {
                    unsigned long long cur = hot_claim[slot];
                    for (;;) {
                        if ((cur & 0xffffffff00000000ull) == step) {
                            mine[3] += (u32)cur != key;  // another page holds the slot this step
                            break;
                        }
                        const unsigned long long prev = atomicCAS(&hot_claim[slot], cur, step | key);
                        if (prev == cur) {
                            won = 1;
                            break;
                        }
                        cur = prev;
                    }
                }
            }
            if (!__shfl_sync(0xffffffff, won, 0)) continue;
            constexpr int PIECES = D / 8;
            for (int x = lane; x < page_size * PIECES; x += 32) {
                const int r = x / PIECES, pc = x % PIECES;
                const size_t src = cache_row(page, r, kvh, page_size, hkv) + pc * 8;
                const size_t dst = ((size_t)slot * page_size + r) * D + pc * 8;
                *(uint4*)(hot_k + dst) = *(const uint4*)(Kc + src);
                *(uint4*)(hot_v + dst) = *(const uint4*)(Vc + src);
            }
            __syncwarp();
            if (lane == 0) {
                __threadfence();
                hot_tag[slot] = key;
                mine[2] += 1;
            }
        }
    }
    if (lane == 0)
        for (int i = 0; i < 4; ++i) atomicAdd(&s_stats[i], mine[i]);
    __syncthreads();
    if (threadIdx.x < 4 && s_stats[threadIdx.x]) atomicAdd(&hot_stats[threadIdx.x], s_stats[threadIdx.x]);
}
