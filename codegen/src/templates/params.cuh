// Sample of a header weft-codegen generates per kernel (see templates.rs), so that the
// templates open and compile on their own; tests check it is what codegen generates.
#pragma once
#include "prelude.cuh"
// AttentionParams (weft-codegen abi.rs), in its field order.
#define ATTENTION_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ K, \
    const u16* __restrict__ V, \
    u16* __restrict__ O, \
    float* __restrict__ LSE, \
    const u32* __restrict__ block_ptr, \
    const u32* __restrict__ block_idx, \
    const u16* __restrict__ block_mask, \
    const u32* __restrict__ col_ptr, \
    const u32* __restrict__ col_idx, \
    const u16* __restrict__ col_mask, \
    const int* __restrict__ seq_q, \
    const int* __restrict__ seq_k, \
    const int* __restrict__ seq_qb, \
    const int* __restrict__ head_map, \
    int batch, \
    int total_q, \
    int total_k, \
    int hq, \
    int hkv, \
    float scale_log2, \
    int index_heads
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "AttentionParams: the host's q, k, v, block_mask, col_mask differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "AttentionParams: the host's o differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "AttentionParams: the host's lse differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "AttentionParams: the host's block_ptr, block_idx, col_ptr, col_idx differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "AttentionParams: the host's seq_q, seq_k, seq_qb, head_map differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "AttentionParams: the host's batch, total_q, total_k, hq, hkv, index_heads differ");
static_assert(sizeof(float) == 4 && alignof(float) == 4, "AttentionParams: the host's scale_log2 differ");
// DecodeParams (weft-codegen abi.rs), in its field order.
#define DECODE_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ K, \
    const u16* __restrict__ V, \
    float* __restrict__ Opart, \
    float* __restrict__ LSEpart, \
    const u32* __restrict__ block_ptr, \
    const u32* __restrict__ block_idx, \
    const u16* __restrict__ block_mask, \
    const u32* __restrict__ col_ptr, \
    const u32* __restrict__ col_idx, \
    const u16* __restrict__ col_mask, \
    int nq, \
    int nk, \
    int hq, \
    int hkv, \
    float scale_log2, \
    int splits
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "DecodeParams: the host's q, k, v, block_mask, col_mask differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "DecodeParams: the host's opart, lsepart differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "DecodeParams: the host's block_ptr, block_idx, col_ptr, col_idx differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "DecodeParams: the host's nq, nk, hq, hkv, splits differ");
static_assert(sizeof(float) == 4 && alignof(float) == 4, "DecodeParams: the host's scale_log2 differ");
// MergeParams (weft-codegen abi.rs), in its field order.
#define MERGE_PARAMS \
    const PartT* __restrict__ parts, \
    const float* __restrict__ lses, \
    u16* __restrict__ O, \
    float* __restrict__ LSE, \
    int nparts, \
    int rows
static_assert(sizeof(const PartT*) == 8 && alignof(const PartT*) == 8, "MergeParams: the host's parts differ");
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "MergeParams: the host's lses differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "MergeParams: the host's o differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "MergeParams: the host's lse differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "MergeParams: the host's nparts, rows differ");
// ProbeParams (weft-codegen abi.rs), in its field order.
#define PROBE_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ K, \
    const u16* __restrict__ V, \
    float* __restrict__ S, \
    float* __restrict__ O
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "ProbeParams: the host's q, k, v differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "ProbeParams: the host's s, o differ");
// PagedFillParams (weft-codegen abi.rs), in its field order.
#define PAGED_FILL_PARAMS \
    const u16* __restrict__ Ksrc, \
    const u16* __restrict__ Vsrc, \
    int n, \
    int seq, \
    const u32* __restrict__ page_table, \
    int max_pages, \
    int page_size, \
    int hkv, \
    u16* __restrict__ Kc, \
    u16* __restrict__ Vc, \
    u16* __restrict__ kmin, \
    u16* __restrict__ kmax, \
    signed char* __restrict__ codes, \
    float* __restrict__ cscale, \
    int key_bits, \
    u32* __restrict__ hot_tag, \
    int hot_slots
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PagedFillParams: the host's ksrc, vsrc differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedFillParams: the host's n, seq, max_pages, page_size, hkv, key_bits, hot_slots differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "PagedFillParams: the host's page_table differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "PagedFillParams: the host's kc, vc, kmin, kmax differ");
static_assert(sizeof(signed char*) == 8 && alignof(signed char*) == 8, "PagedFillParams: the host's codes differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "PagedFillParams: the host's cscale differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "PagedFillParams: the host's hot_tag differ");
// PagedAppendParams (weft-codegen abi.rs), in its field order.
#define PAGED_APPEND_PARAMS \
    const u16* __restrict__ Knew, \
    const u16* __restrict__ Vnew, \
    const int* __restrict__ seq_lens, \
    const u32* __restrict__ page_table, \
    int max_pages, \
    int page_size, \
    int hkv, \
    u16* __restrict__ Kc, \
    u16* __restrict__ Vc, \
    u16* __restrict__ kmin, \
    u16* __restrict__ kmax, \
    signed char* __restrict__ codes, \
    float* __restrict__ cscale, \
    int key_bits, \
    u16* __restrict__ hot_k, \
    u16* __restrict__ hot_v, \
    const u32* __restrict__ hot_tag, \
    int hot_slots
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PagedAppendParams: the host's knew, vnew differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "PagedAppendParams: the host's seq_lens differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "PagedAppendParams: the host's page_table, hot_tag differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedAppendParams: the host's max_pages, page_size, hkv, key_bits, hot_slots differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "PagedAppendParams: the host's kc, vc, kmin, kmax, hot_k, hot_v differ");
static_assert(sizeof(signed char*) == 8 && alignof(signed char*) == 8, "PagedAppendParams: the host's codes differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "PagedAppendParams: the host's cscale differ");
// PagedAdvanceParams (weft-codegen abi.rs), in its field order.
#define PAGED_ADVANCE_PARAMS \
    int* __restrict__ seq_lens, \
    int batch
static_assert(sizeof(int*) == 8 && alignof(int*) == 8, "PagedAdvanceParams: the host's seq_lens differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedAdvanceParams: the host's batch differ");
// PagedScoreParams (weft-codegen abi.rs), in its field order.
#define PAGED_SCORE_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ kmin, \
    const u16* __restrict__ kmax, \
    const signed char* __restrict__ codes, \
    const float* __restrict__ cscale, \
    int score_mode, \
    const u32* __restrict__ page_table, \
    const int* __restrict__ seq_lens, \
    int max_pages, \
    int page_size, \
    int hq, \
    int hkv, \
    int sink, \
    int recent, \
    double scale, \
    int shared, \
    unsigned long long* __restrict__ scores
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PagedScoreParams: the host's q, kmin, kmax differ");
static_assert(sizeof(const signed char*) == 8 && alignof(const signed char*) == 8, "PagedScoreParams: the host's codes differ");
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "PagedScoreParams: the host's cscale differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedScoreParams: the host's score_mode, max_pages, page_size, hq, hkv, sink, recent, shared differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "PagedScoreParams: the host's page_table differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "PagedScoreParams: the host's seq_lens differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "PagedScoreParams: the host's scale differ");
static_assert(sizeof(unsigned long long*) == 8 && alignof(unsigned long long*) == 8, "PagedScoreParams: the host's scores differ");
// PagedRetrieveParams (weft-codegen abi.rs), in its field order.
#define PAGED_RETRIEVE_PARAMS \
    const int* __restrict__ seq_lens, \
    int max_pages, \
    int page_size, \
    int hq, \
    int group, \
    int sink, \
    int recent, \
    int mode, \
    int top_k, \
    double budget_arg, \
    const unsigned long long* __restrict__ scores, \
    int2* __restrict__ chunks, \
    int* __restrict__ chunk_count, \
    int cap
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "PagedRetrieveParams: the host's seq_lens differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedRetrieveParams: the host's max_pages, page_size, hq, group, sink, recent, mode, top_k, cap differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "PagedRetrieveParams: the host's budget_arg differ");
static_assert(sizeof(const unsigned long long*) == 8 && alignof(const unsigned long long*) == 8, "PagedRetrieveParams: the host's scores differ");
static_assert(sizeof(int2*) == 8 && alignof(int2*) == 8, "PagedRetrieveParams: the host's chunks differ");
static_assert(sizeof(int*) == 8 && alignof(int*) == 8, "PagedRetrieveParams: the host's chunk_count differ");
// PagedAttendParams (weft-codegen abi.rs), in its field order.
#define PAGED_ATTEND_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ Kc, \
    const u16* __restrict__ Vc, \
    const u32* __restrict__ page_table, \
    const int* __restrict__ seq_lens, \
    int max_pages, \
    int page_size, \
    int batch, \
    int hq, \
    int hkv, \
    const int2* __restrict__ chunks, \
    const int* __restrict__ chunk_count, \
    int cap, \
    int dense, \
    int shared, \
    int splits, \
    float scale_log2, \
    const u16* __restrict__ hot_k, \
    const u16* __restrict__ hot_v, \
    const u32* __restrict__ hot_tag, \
    int hot_slots, \
    unsigned* __restrict__ hot_step, \
    float* __restrict__ Opart, \
    float* __restrict__ LSEpart
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PagedAttendParams: the host's q, kc, vc, hot_k, hot_v differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "PagedAttendParams: the host's page_table, hot_tag differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "PagedAttendParams: the host's seq_lens, chunk_count differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedAttendParams: the host's max_pages, page_size, batch, hq, hkv, cap, dense, shared, splits, hot_slots differ");
static_assert(sizeof(const int2*) == 8 && alignof(const int2*) == 8, "PagedAttendParams: the host's chunks differ");
static_assert(sizeof(float) == 4 && alignof(float) == 4, "PagedAttendParams: the host's scale_log2 differ");
static_assert(sizeof(unsigned*) == 8 && alignof(unsigned*) == 8, "PagedAttendParams: the host's hot_step differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "PagedAttendParams: the host's opart, lsepart differ");
// PagedStageParams (weft-codegen abi.rs), in its field order.
#define PAGED_STAGE_PARAMS \
    const u16* __restrict__ Kc, \
    const u16* __restrict__ Vc, \
    const u32* __restrict__ page_table, \
    int max_pages, \
    int page_size, \
    int hq, \
    int hkv, \
    const int2* __restrict__ chunks, \
    const int* __restrict__ chunk_count, \
    int cap, \
    int group, \
    u16* __restrict__ hot_k, \
    u16* __restrict__ hot_v, \
    u32* __restrict__ hot_tag, \
    unsigned long long* __restrict__ hot_claim, \
    int hot_slots, \
    const unsigned* __restrict__ hot_step, \
    unsigned long long* __restrict__ hot_stats
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PagedStageParams: the host's kc, vc differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "PagedStageParams: the host's page_table differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PagedStageParams: the host's max_pages, page_size, hq, hkv, cap, group, hot_slots differ");
static_assert(sizeof(const int2*) == 8 && alignof(const int2*) == 8, "PagedStageParams: the host's chunks differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "PagedStageParams: the host's chunk_count differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "PagedStageParams: the host's hot_k, hot_v differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "PagedStageParams: the host's hot_tag differ");
static_assert(sizeof(unsigned long long*) == 8 && alignof(unsigned long long*) == 8, "PagedStageParams: the host's hot_claim, hot_stats differ");
static_assert(sizeof(const unsigned*) == 8 && alignof(const unsigned*) == 8, "PagedStageParams: the host's hot_step differ");
// PoolParams (weft-codegen abi.rs), in its field order.
#define POOL_PARAMS \
    const u16* __restrict__ Q, \
    int nq, \
    int q_block, \
    int groups, \
    float* __restrict__ pooled, \
    u16* __restrict__ pq_hi, \
    u16* __restrict__ pq_lo, \
    float* __restrict__ pq_l1
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "PoolParams: the host's q differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "PoolParams: the host's nq, q_block, groups differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "PoolParams: the host's pooled, pq_l1 differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "PoolParams: the host's pq_hi, pq_lo differ");
// KstatsParams (weft-codegen abi.rs), in its field order.
#define KSTATS_PARAMS \
    const u16* __restrict__ K, \
    int nk, \
    float* __restrict__ kinf, \
    u32* __restrict__ kmax_bits
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "KstatsParams: the host's k differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "KstatsParams: the host's nk differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "KstatsParams: the host's kinf differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "KstatsParams: the host's kmax_bits differ");
// ScoreParams (weft-codegen abi.rs), in its field order.
#define SCORE_PARAMS \
    const u16* __restrict__ pq_hi, \
    const u16* __restrict__ pq_lo, \
    const u16* __restrict__ K, \
    float* __restrict__ approx, \
    int h0, \
    int hq, \
    int hkv, \
    int groups, \
    int nk, \
    int mode, \
    int cols, \
    const u32* __restrict__ cand_lo, \
    const u32* __restrict__ cand_hi, \
    int per_head, \
    const float* __restrict__ thresh, \
    u32* __restrict__ list_key, \
    float* __restrict__ list_val, \
    u32* __restrict__ list_count, \
    u32* __restrict__ list_high, \
    int list_cap
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "ScoreParams: the host's pq_hi, pq_lo, k differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "ScoreParams: the host's approx, list_val differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "ScoreParams: the host's h0, hq, hkv, groups, nk, mode, cols, per_head, list_cap differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "ScoreParams: the host's cand_lo, cand_hi differ");
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "ScoreParams: the host's thresh differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "ScoreParams: the host's list_key, list_count, list_high differ");
// ThresholdParams (weft-codegen abi.rs), in its field order.
#define THRESHOLD_PARAMS \
    const float* __restrict__ sample, \
    int samples, \
    const float* __restrict__ pq_l1, \
    const u32* __restrict__ kmax_bits, \
    const u32* __restrict__ cand_lo, \
    const u32* __restrict__ cand_hi, \
    int per_head, \
    int h0, \
    int hq, \
    int hkv, \
    int groups, \
    int top_k, \
    float* __restrict__ thresh
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "ThresholdParams: the host's sample, pq_l1 differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "ThresholdParams: the host's samples, per_head, h0, hq, hkv, groups, top_k differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "ThresholdParams: the host's kmax_bits, cand_lo, cand_hi differ");
static_assert(sizeof(float*) == 8 && alignof(float*) == 8, "ThresholdParams: the host's thresh differ");
// SelectParams (weft-codegen abi.rs), in its field order.
#define SELECT_PARAMS \
    const float* __restrict__ approx, \
    const float* __restrict__ pooled, \
    const float* __restrict__ pq_l1, \
    const u16* __restrict__ K, \
    const float* __restrict__ kinf, \
    const u32* __restrict__ kmax_bits, \
    const u32* __restrict__ cand_lo, \
    const u32* __restrict__ cand_hi, \
    int per_head, \
    int h0, \
    int hq, \
    int hkv, \
    int groups, \
    int nk, \
    int top_k, \
    const u32* __restrict__ keep_in, \
    double scale, \
    int cap, \
    int collect_cap, \
    int mode, \
    const u32* __restrict__ list_key, \
    const float* __restrict__ list_val, \
    const u32* __restrict__ list_count, \
    const u32* __restrict__ list_high, \
    int list_cap, \
    u32* __restrict__ chosen, \
    int* __restrict__ chosen_count, \
    int* __restrict__ status
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "SelectParams: the host's approx, pooled, pq_l1, kinf, list_val differ");
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "SelectParams: the host's k differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "SelectParams: the host's kmax_bits, cand_lo, cand_hi, keep_in, list_key, list_count, list_high differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "SelectParams: the host's per_head, h0, hq, hkv, groups, nk, top_k, cap, collect_cap, mode, list_cap differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "SelectParams: the host's scale differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "SelectParams: the host's chosen differ");
static_assert(sizeof(int*) == 8 && alignof(int*) == 8, "SelectParams: the host's chosen_count, status differ");
// BudgetParams (weft-codegen abi.rs), in its field order.
#define BUDGET_PARAMS \
    const float* __restrict__ approx, \
    const float* __restrict__ pooled, \
    const float* __restrict__ pq_l1, \
    const u16* __restrict__ K, \
    const float* __restrict__ kinf, \
    const u32* __restrict__ kmax_bits, \
    const u32* __restrict__ cand_lo, \
    const u32* __restrict__ cand_hi, \
    int per_head, \
    int h0, \
    int hq, \
    int hkv, \
    int groups, \
    int nk, \
    double scale, \
    int mode, \
    double arg, \
    const double* __restrict__ exact, \
    const unsigned long long* __restrict__ best, \
    u32* __restrict__ weights, \
    u32* __restrict__ keep_out
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "BudgetParams: the host's approx, pooled, pq_l1, kinf differ");
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "BudgetParams: the host's k differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "BudgetParams: the host's kmax_bits, cand_lo, cand_hi differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "BudgetParams: the host's per_head, h0, hq, hkv, groups, nk, mode differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "BudgetParams: the host's scale, arg differ");
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "BudgetParams: the host's exact differ");
static_assert(sizeof(const unsigned long long*) == 8 && alignof(const unsigned long long*) == 8, "BudgetParams: the host's best differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "BudgetParams: the host's weights, keep_out differ");
// ColumnsParams (weft-codegen abi.rs), in its field order.
#define COLUMNS_PARAMS \
    const u32* __restrict__ chosen, \
    const int* __restrict__ chosen_count, \
    int cap, \
    int words, \
    const u32* __restrict__ rule_ptr, \
    const u32* __restrict__ rule_c0, \
    const u32* __restrict__ rule_c1, \
    const u32* __restrict__ rule_code, \
    const u32* __restrict__ codes, \
    int per_head, \
    int hq, \
    int q_blocks, \
    int block_m, \
    int q_block, \
    int groups, \
    int pass, \
    const u32* __restrict__ tiles, \
    int tile_block, \
    int tile_groups, \
    int tile_words, \
    const int* __restrict__ line_phase, \
    int line_stride, \
    int line_len, \
    int line_rule_base, \
    const u16* __restrict__ line_codes, \
    u32* __restrict__ row_count, \
    const u32* __restrict__ col_ptr, \
    u32* __restrict__ col_idx, \
    u16* __restrict__ col_mask
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "ColumnsParams: the host's chosen, rule_ptr, rule_c0, rule_c1, rule_code, codes, tiles, col_ptr differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "ColumnsParams: the host's chosen_count, line_phase differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "ColumnsParams: the host's cap, words, per_head, hq, q_blocks, block_m, q_block, groups, pass, tile_block, tile_groups, tile_words, line_stride, line_len, line_rule_base differ");
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "ColumnsParams: the host's line_codes differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "ColumnsParams: the host's row_count, col_idx differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "ColumnsParams: the host's col_mask differ");
// ScanParams (weft-codegen abi.rs), in its field order.
#define SCAN_PARAMS \
    const u32* __restrict__ row_count, \
    int rows, \
    u32* __restrict__ col_ptr
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "ScanParams: the host's row_count differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "ScanParams: the host's rows differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "ScanParams: the host's col_ptr differ");
// BlockScoresParams (weft-codegen abi.rs), in its field order.
#define BLOCK_SCORES_PARAMS \
    const float* __restrict__ pooled_q, \
    const float* __restrict__ pooled_k, \
    int hq, \
    int hkv, \
    int groups, \
    int kblocks, \
    double scale, \
    double* __restrict__ scores
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "BlockScoresParams: the host's pooled_q, pooled_k differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "BlockScoresParams: the host's hq, hkv, groups, kblocks differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "BlockScoresParams: the host's scale differ");
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "BlockScoresParams: the host's scores differ");
// BlockSelectParams (weft-codegen abi.rs), in its field order.
#define BLOCK_SELECT_PARAMS \
    const double* __restrict__ scores, \
    const u32* __restrict__ allowed, \
    int per_head, \
    int groups, \
    int kblocks, \
    int mode, \
    int top_k, \
    double budget_arg, \
    u32* __restrict__ chosen
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "BlockSelectParams: the host's scores differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "BlockSelectParams: the host's allowed differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "BlockSelectParams: the host's per_head, groups, kblocks, mode, top_k differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "BlockSelectParams: the host's budget_arg differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "BlockSelectParams: the host's chosen differ");
// BlockTopParams (weft-codegen abi.rs), in its field order.
#define BLOCK_TOP_PARAMS \
    const double* __restrict__ scores, \
    const u32* __restrict__ allowed, \
    int per_head, \
    int groups, \
    int kblocks, \
    int mode, \
    int top_k, \
    double budget_arg, \
    u32* __restrict__ chosen, \
    int cache_width
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "BlockTopParams: the host's scores differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "BlockTopParams: the host's allowed differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "BlockTopParams: the host's per_head, groups, kblocks, mode, top_k, cache_width differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "BlockTopParams: the host's budget_arg differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "BlockTopParams: the host's chosen differ");
// BlockRowsParams (weft-codegen abi.rs), in its field order.
#define BLOCK_ROWS_PARAMS \
    const u32* __restrict__ chosen, \
    const u32* __restrict__ entry_ptr, \
    const u32* __restrict__ entry_kb, \
    const u32* __restrict__ entry_pattern_kb, \
    const u16* __restrict__ code_sel, \
    const u16* __restrict__ code_not, \
    const u32* __restrict__ code_line, \
    const int* __restrict__ line_phase, \
    int line_stride, \
    int line_len, \
    const u16* __restrict__ line_codes, \
    int per_head, \
    int hq, \
    int q_blocks, \
    int block_m, \
    int block_q, \
    int groups, \
    int kblocks, \
    int pass, \
    u32* __restrict__ row_count, \
    const u32* __restrict__ block_ptr, \
    u32* __restrict__ block_idx, \
    u16* __restrict__ block_mask
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "BlockRowsParams: the host's chosen, entry_ptr, entry_kb, entry_pattern_kb, code_line, block_ptr differ");
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "BlockRowsParams: the host's code_sel, code_not, line_codes differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "BlockRowsParams: the host's line_phase differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "BlockRowsParams: the host's line_stride, line_len, per_head, hq, q_blocks, block_m, block_q, groups, kblocks, pass differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "BlockRowsParams: the host's row_count, block_idx differ");
static_assert(sizeof(u16*) == 8 && alignof(u16*) == 8, "BlockRowsParams: the host's block_mask differ");
// VsLogitsParams (weft-codegen abi.rs), in its field order.
#define VS_LOGITS_PARAMS \
    const u16* __restrict__ Q, \
    const u16* __restrict__ K, \
    int nq, \
    int nk, \
    int hq, \
    int hkv, \
    int h0, \
    int last, \
    const u32* __restrict__ allowed, \
    int per_head, \
    double scale, \
    double* __restrict__ logits, \
    unsigned long long* __restrict__ rowmax
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "VsLogitsParams: the host's q, k differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsLogitsParams: the host's nq, nk, hq, hkv, h0, last, per_head differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "VsLogitsParams: the host's allowed differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "VsLogitsParams: the host's scale differ");
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "VsLogitsParams: the host's logits differ");
static_assert(sizeof(unsigned long long*) == 8 && alignof(unsigned long long*) == 8, "VsLogitsParams: the host's rowmax differ");
// VsExpParams (weft-codegen abi.rs), in its field order.
#define VS_EXP_PARAMS \
    double* __restrict__ weights, \
    const unsigned long long* __restrict__ rowmax, \
    int nk, \
    int last, \
    double* __restrict__ partial
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "VsExpParams: the host's weights, partial differ");
static_assert(sizeof(const unsigned long long*) == 8 && alignof(const unsigned long long*) == 8, "VsExpParams: the host's rowmax differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsExpParams: the host's nk, last differ");
// VsInvParams (weft-codegen abi.rs), in its field order.
#define VS_INV_PARAMS \
    const double* __restrict__ partial, \
    int nk, \
    int last, \
    double* __restrict__ inv
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "VsInvParams: the host's partial differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsInvParams: the host's nk, last differ");
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "VsInvParams: the host's inv differ");
// VsMassParams (weft-codegen abi.rs), in its field order.
#define VS_MASS_PARAMS \
    const double* __restrict__ weights, \
    const double* __restrict__ inv_rows, \
    int nq, \
    int nk, \
    int last, \
    int h0, \
    int slashes, \
    double* __restrict__ vert, \
    double* __restrict__ slash
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "VsMassParams: the host's weights, inv_rows differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsMassParams: the host's nq, nk, last, h0, slashes differ");
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "VsMassParams: the host's vert, slash differ");
// VsSelectParams (weft-codegen abi.rs), in its field order.
#define VS_SELECT_PARAMS \
    const double* __restrict__ vert, \
    const double* __restrict__ slash, \
    int nq, \
    int nk, \
    int hq, \
    int vertical_k, \
    int slash_k, \
    u32* __restrict__ vlist, \
    u32* __restrict__ slist, \
    int* __restrict__ counts
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "VsSelectParams: the host's vert, slash differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsSelectParams: the host's nq, nk, hq, vertical_k, slash_k differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "VsSelectParams: the host's vlist, slist differ");
static_assert(sizeof(int*) == 8 && alignof(int*) == 8, "VsSelectParams: the host's counts differ");
// GridSelectParams (weft-codegen abi.rs), in its field order.
#define GRID_SELECT_PARAMS \
    const double* __restrict__ vert, \
    int nk, \
    int hq, \
    int stride, \
    int phase, \
    int cols, \
    int cap, \
    u32* __restrict__ vlist, \
    int* __restrict__ counts, \
    int* __restrict__ phases
static_assert(sizeof(const double*) == 8 && alignof(const double*) == 8, "GridSelectParams: the host's vert differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "GridSelectParams: the host's nk, hq, stride, phase, cols, cap differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "GridSelectParams: the host's vlist differ");
static_assert(sizeof(int*) == 8 && alignof(int*) == 8, "GridSelectParams: the host's counts, phases differ");
// VsTilesParams (weft-codegen abi.rs), in its field order.
#define VS_TILES_PARAMS \
    const u32* __restrict__ slist, \
    const int* __restrict__ counts, \
    int hq, \
    int slash_k, \
    int nq, \
    int nk, \
    int block, \
    int groups, \
    int kblocks, \
    u32* __restrict__ tiles
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "VsTilesParams: the host's slist differ");
static_assert(sizeof(const int*) == 8 && alignof(const int*) == 8, "VsTilesParams: the host's counts differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VsTilesParams: the host's hq, slash_k, nq, nk, block, groups, kblocks differ");
static_assert(sizeof(u32*) == 8 && alignof(u32*) == 8, "VsTilesParams: the host's tiles differ");
// VvExactParams (weft-codegen abi.rs), in its field order.
#define VV_EXACT_PARAMS \
    const float* __restrict__ pooled, \
    const u16* __restrict__ K, \
    int groups, \
    int nk, \
    int hq, \
    int hkv, \
    int h0, \
    const u32* __restrict__ cand_lo, \
    const u32* __restrict__ cand_hi, \
    int per_head, \
    double scale, \
    double* __restrict__ exact, \
    unsigned long long* __restrict__ best
static_assert(sizeof(const float*) == 8 && alignof(const float*) == 8, "VvExactParams: the host's pooled differ");
static_assert(sizeof(const u16*) == 8 && alignof(const u16*) == 8, "VvExactParams: the host's k differ");
static_assert(sizeof(int) == 4 && alignof(int) == 4, "VvExactParams: the host's groups, nk, hq, hkv, h0, per_head differ");
static_assert(sizeof(const u32*) == 8 && alignof(const u32*) == 8, "VvExactParams: the host's cand_lo, cand_hi differ");
static_assert(sizeof(double) == 8 && alignof(double) == 8, "VvExactParams: the host's scale differ");
static_assert(sizeof(double*) == 8 && alignof(double*) == 8, "VvExactParams: the host's exact differ");
static_assert(sizeof(unsigned long long*) == 8 && alignof(unsigned long long*) == 8, "VvExactParams: the host's best differ");
