// Block selection: block_scores, block_select, block_top.
#pragma once
#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"
#include "index_common.cuh"
#include "index_repro.cuh"

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
extern "C" __global__ void __launch_bounds__(BLOCK_SCORES_THREADS) WEFT_ENTRY(block_scores)(BLOCK_SCORES_PARAMS)
{

    constexpr int T = BLOCK_SCORE_TILE, DC = 32;
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
extern "C" __global__ void __launch_bounds__(BLOCK_SELECT_THREADS) WEFT_ENTRY(block_select)(BLOCK_SELECT_PARAMS)
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
extern "C" __global__ void __launch_bounds__(BLOCK_TOP_THREADS, 1) WEFT_ENTRY(block_top)(BLOCK_TOP_PARAMS)
{

    __shared__ u32 sHist[8][256];
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    static_assert(BLOCK_TOP_THREADS == 32 * BLOCK_TOP_GROUPS, "block_top: a warp per group");
    const int g = blockIdx.x * BLOCK_TOP_GROUPS + warp, h = blockIdx.y;
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
