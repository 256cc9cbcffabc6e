// Sample of a header weft-codegen generates per kernel (see templates.rs), so that the
// templates open and compile on their own; tests check it is what codegen generates.
#pragma once
#include "prelude.cuh"
// The index's mask predicates (positions are index positions).
[[maybe_unused]] constexpr int MASKS = 1;  // predicates in the table below
__device__ __forceinline__ bool weft_mask(int id, long long q, long long k, long long h, long long nq, long long nk) {
    switch (id) {
    case 0: return (k <= q);  // k <= q
    default: return false;
    }
}
// Index position -> token row.
[[maybe_unused]] constexpr bool IDENTITY_TOKENS = true;  // position p is token p (no permutation)
__device__ __forceinline__ int weft_token(int pos, int n) {
    return pos;  // identity: the pattern is not permuted
}
