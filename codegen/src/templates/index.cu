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

#include "config.cuh"
#include "prelude.cuh"
#include "params.cuh"

#include "index_common.cuh"
#include "index_repro.cuh"
#include "index_pool.cuh"
#include "index_columns.cuh"
#include "index_blocks.cuh"
#include "index_lists.cuh"
#include "index_slash.cuh"
