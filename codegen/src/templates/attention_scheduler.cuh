// The attention kernel's row order. Without WEFT_PERSISTENT a CTA computes one index row:
// query block blockIdx.x (counted over the batch's sequences) of index head blockIdx.y. With it
// (one CTA per SM, KernelConfig::persistent) the CTAs walk the rows w = 0, 1, ... of one
// order, CTA c taking c, c + gridDim.x, ...: head by head, so that the CTAs at work share one
// head's K and V in L2 as the grid's CTAs do without WEFT_PERSISTENT (every head's last query
// blocks first ran dense attention 1.3x slower); within a head the batch's last query blocks
// first (under causal masks the heaviest of a single sequence). `seq_qb[batch]` is the batch's
// query blocks per head.
#pragma once
#include "attention_shape.cuh"

#if WEFT_PERSISTENT
// Row w's query block (over the batch) and index head.
__device__ __forceinline__ int persistent_query_block(const int* seq_qb, int batch, int w) {
    return seq_qb[batch] - 1 - w % seq_qb[batch];
}
__device__ __forceinline__ int persistent_head(const int* seq_qb, int batch, int w) { return w / seq_qb[batch]; }
#endif
