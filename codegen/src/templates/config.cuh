// Sample of a header weft-codegen generates per kernel (see templates.rs), so that the
// templates open and compile on their own; tests check it is what codegen generates.
#pragma once
#define WEFT_KERNEL weft_attn_sample
#define WEFT_F16 0
#define WEFT_WGMMA 0
#define WEFT_PRODUCER 0
#define WEFT_PERSISTENT 0
constexpr int BM = 64;  // query rows per CTA (the index's block_m)
constexpr int BN = 64;  // keys per tile (the index's block_n)
constexpr int D = 128;  // head dimension
constexpr int STAGES = 2;  // K/V tiles in flight (cp.async pipeline depth)
constexpr bool GATHERS = false;  // the pattern can list single key columns
constexpr int MT = 1;  // 16-row m-tiles per warp: each K/V fragment feeds MT mma
constexpr int KERNEL_THREADS = 128;  // the launch's block size (KernelConfig::threads)
constexpr int KERNEL_SHARED_BYTES = 87808;  // the launch's dynamic shared memory
#define WEFT_PARTIAL_F32 1
typedef float PartT;  // the partials' element type
constexpr int KEYS = 64;  // keys in the probe's tile
#define WEFT_ENTRY(entry) weft_index_sample_##entry
constexpr int POOL_THREADS = 128;
constexpr int KSTATS_THREADS = 256;
constexpr int SCORE_THREADS = 128;
constexpr int THRESHOLD_THREADS = 512;
constexpr int SELECT_THREADS = 512;
constexpr int BUDGET_THREADS = 512;
constexpr int VV_EXACT_THREADS = 256;
constexpr int COLUMNS_THREADS = 128;
constexpr int SCAN_THREADS = 1024;
constexpr int BLOCK_SCORES_THREADS = 256;
constexpr int BLOCK_SELECT_THREADS = 256;
constexpr int BLOCK_TOP_THREADS = 256;
constexpr int BLOCK_ROWS_THREADS = 128;
constexpr int VS_LOGITS_THREADS = 256;
constexpr int VS_EXP_THREADS = 256;
constexpr int VS_INV_THREADS = 256;
constexpr int VS_MASS_THREADS = 256;
constexpr int VS_SELECT_THREADS = 1024;
constexpr int GRID_SELECT_THREADS = 1024;
constexpr int VS_TILES_THREADS = 128;
constexpr int SCORE_ROWS = 64;  // groups per score CTA (4 warps x 16)
constexpr int SCORE_COLS = 128;  // keys per score CTA
constexpr int HIST = 2048;  // bins of the radix histograms (11 bits)
constexpr int UNSURE_CAP = 4096;  // keys per group scored exactly
constexpr int ROWS_PER_CTA = 4;  // index rows per columns / block_rows CTA
constexpr int KSTATS_KEYS = 64;  // keys per kstats CTA
constexpr int BLOCK_TOP_GROUPS = 8;  // groups per block_top CTA
constexpr int BLOCK_SCORE_TILE = 64;  // groups and key blocks per block_scores CTA
constexpr int VS_ROWS = 64;  // estimated rows per vs_logits CTA (8 per warp)
constexpr int VS_KEYS = 256;  // keys per vs_logits CTA (8 per lane)
constexpr int VS_EXP_KEYS = 2048;  // keys per vs_exp CTA
constexpr int VS_MASS_KEYS = 256;  // keys or diagonals per vs_mass CTA
constexpr int SUM_CHUNK = 256;  // keys per partial row sum (repro::SUM_CHUNK)
constexpr unsigned short DROP_CODE = 0xfffe;  // column rule: the row's blocks compute this key
constexpr unsigned int PER_COLUMN = 0x10000;  // rule codes from here on index per-key codes
constexpr unsigned int PER_LINE = 0x80000000;  // line codes from here on index per-offset codes
constexpr long long LOG2E_BITS = 0x3ff71547652b82feLL;  // repro::LOG2E
constexpr long long LN2_HI_BITS = 0x3fe62e42fee00000LL;  // repro::LN2_HI
constexpr long long LN2_LO_BITS = 0x3dea39ef35793c76LL;  // repro::LN2_LO
#define EXP_COEF_BITS 0x3de6124613a86d09LL, 0x3e21eed8eff8d898LL, 0x3e5ae64567f544e4LL, 0x3e927e4fb7789f5cLL, 0x3ec71de3a556c734LL, 0x3efa01a01a01a01aLL, 0x3f2a01a01a01a01aLL, 0x3f56c16c16c16c17LL, 0x3f81111111111111LL, 0x3fa5555555555555LL, 0x3fc5555555555555LL, 0x3fe0000000000000LL  // repro::EXP_COEF
#define WEFT_HOST 1
constexpr int G = 4;  // query heads per KV head
constexpr int HPC = 4;  // query heads per dense attend CTA (heads_per_cta)
constexpr int FILL_THREADS = 128;
constexpr int APPEND_THREADS = 128;
constexpr int ADVANCE_THREADS = 256;
constexpr int RETRIEVE_THREADS = 256;
constexpr int ATTEND_THREADS = 128;
constexpr int STAGE_THREADS = 128;
