// The producer schedule's stage bookkeeping (WEFT_PRODUCER): which mbarrier and phase parity a
// tile's fill and release use.
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
#endif
