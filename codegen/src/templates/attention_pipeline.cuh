// The producer schedule (WEFT_PRODUCER): which mbarrier and phase parity a tile's fill and
// release use, and the producer warpgroup's copies of a row.
#pragma once
#include "attention_shape.cuh"

#if WEFT_PRODUCER
// Tile number g of a CTA's sequence occupies stage g % STAGES, as that stage's (g / STAGES)-th
// fill: the stage's mbarrier in the array at `bars` (8 bytes each), the parity of that fill's
// phase (what the consumers' wait on the full barrier takes), and that of the release of the
// stage's previous occupant, tile g - STAGES (what the producer's wait on the empty one takes).
__device__ __forceinline__ u32 stage_bar(u32 bars, int g) { return bars + 8 * (g % STAGES); }
__device__ __forceinline__ u32 fill_parity(int g) { return (u32)(g / STAGES) & 1u; }
__device__ __forceinline__ u32 release_parity(int g) { return (u32)(g / STAGES - 1) & 1u; }

// The producer schedule's four stage mbarrier arrays (8 bytes per stage each): K and V apart,
// full (the stage's tile landed) and empty (the consumers are done with it).
struct StageBars {
    u32 full_k, full_v, empty_k, empty_v;
};

// The producer's copies of one row's `ntiles` tiles, numbered g0, g0 + 1, ... in the CTA's
// sequence: K_t, then V_{t-1} (V lags K by a tile, as in the schedule without a producer), each into its stage once the consumers
// released the stage's previous occupant, then the stage's full barrier. Each thread's
// arrival counts once its own copies have landed: cp.async.mbarrier.arrive (without .noinc)
// holds the phase open until then, the plain arrival is the one counted. `load_tile(t, stage,
// with_k, with_v)` issues the copies of tile t.
template <class LoadTile>
__device__ __forceinline__ void produce_row_tiles(LoadTile& load_tile, const StageBars& bars, int g0, int ntiles) {
    auto produce = [&](int t, bool k_part) {
        const int g = g0 + t;
        const u32 empty = stage_bar(k_part ? bars.empty_k : bars.empty_v, g);
        const u32 full = stage_bar(k_part ? bars.full_k : bars.full_v, g);
        if (g >= STAGES) mbar_wait(empty, release_parity(g));
        load_tile(t, g % STAGES, k_part, !k_part);
        mbar_arrive_cp_async(full);
        mbar_arrive(full);
    };
    for (int t = 0; t < ntiles; ++t) {
        produce(t, true);
        if (t > 0) produce(t - 1, false);
    }
    if (ntiles > 0) produce(ntiles - 1, false);
}
#endif
