//! The host-device boundary, declared once. Every kernel entry point's parameters are a
//! `#[repr(C)]` struct here (as FlashAttention's `Flash_fwd_params`), each field with its CUDA
//! declaration. The generated source gets each entry's parameter list from it (`{NAME}_PARAMS`,
//! a macro over the declarations in the struct's order, with `static_assert`s that every CUDA
//! type has the host field's size and alignment), and the runtime fills the struct by field
//! name and passes its fields in that order ([`Params::args`]): no argument is written out by
//! position on either side, and a kernel whose parameters differ from the host's in number,
//! order (from the same list) or size does not compile or is not launched. The NVRTC tests
//! compile every kernel on the CPU machine.
//!
//! The parameters stay separate kernel parameters (not one struct by value) because CUDA gives
//! `__restrict__` pointer parameters non-coherent loads, which pointers read out of a struct
//! parameter do not get (the block-sparse kernels ran up to 7% slower that way).
//!
//! The entry points themselves (name, threads per CTA, parameter struct) are [`Entry`]s; the
//! generated source takes its `__launch_bounds__` from the same table the launches read.

use std::fmt::Write as _;

/// A device address as kernels receive it (`CUdeviceptr`); 0 for an unused pointer.
pub type DevPtr = u64;

/// One field of a parameter struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    /// The kernel parameter's CUDA declaration (`const u16* __restrict__ Q`, `int nq`).
    pub cuda: &'static str,
    pub size: usize,
    pub align: usize,
}

impl Field {
    /// The CUDA type of the declaration (without `__restrict__` and the name).
    pub fn cuda_type(&self) -> String {
        let ty = self.cuda.rsplit_once(' ').map_or(self.cuda, |(ty, _)| ty);
        ty.replace("__restrict__", "").split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// One kernel argument: a reference to a field of a parameter struct, typed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg<'a> {
    Ptr(&'a DevPtr),
    I32(&'a i32),
    U32(&'a u32),
    F32(&'a f32),
    F64(&'a f64),
}

/// The field types a parameter struct may hold.
pub trait AsArg {
    fn as_arg(&self) -> Arg<'_>;
}

impl AsArg for DevPtr {
    fn as_arg(&self) -> Arg<'_> {
        Arg::Ptr(self)
    }
}
impl AsArg for i32 {
    fn as_arg(&self) -> Arg<'_> {
        Arg::I32(self)
    }
}
impl AsArg for u32 {
    fn as_arg(&self) -> Arg<'_> {
        Arg::U32(self)
    }
}
impl AsArg for f32 {
    fn as_arg(&self) -> Arg<'_> {
        Arg::F32(self)
    }
}
impl AsArg for f64 {
    fn as_arg(&self) -> Arg<'_> {
        Arg::F64(self)
    }
}

/// A kernel's parameters: `#[repr(C)]` plain data (device addresses and scalars).
pub trait Params: Copy + Default + Send + Sync + 'static {
    /// The struct's name.
    const NAME: &'static str;
    /// Its fields in declaration order.
    fn fields() -> Vec<Field>;
    /// Its fields as the kernel's arguments, in declaration order.
    fn args(&self) -> Vec<Arg<'_>>;
}

macro_rules! params {
    ($($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty = $cuda:literal),* $(,)? })*) => {$(
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq)]
        pub struct $name { $(pub $field: $ty),* }

        impl Params for $name {
            const NAME: &'static str = stringify!($name);
            fn fields() -> Vec<Field> {
                vec![$(Field {
                    name: stringify!($field),
                    cuda: $cuda,
                    size: std::mem::size_of::<$ty>(),
                    align: std::mem::align_of::<$ty>(),
                }),*]
            }
            fn args(&self) -> Vec<Arg<'_>> {
                vec![$(AsArg::as_arg(&self.$field)),*]
            }
        }
    )*

        /// Every parameter struct: (name, fields).
        pub fn all_params() -> Vec<(&'static str, Vec<Field>)> {
            vec![$(($name::NAME, $name::fields())),*]
        }
    };
}

params! {
    /// The attention kernel ([`crate::emit`]): Q, K, V, O `[tokens, heads, D]` rows, the sparse index in CSR form, packed-batch offsets and the head map.
    AttentionParams {
        q: DevPtr = "const u16* __restrict__ Q",
        k: DevPtr = "const u16* __restrict__ K",
        v: DevPtr = "const u16* __restrict__ V",
        o: DevPtr = "u16* __restrict__ O",
        lse: DevPtr = "float* __restrict__ LSE",
        block_ptr: DevPtr = "const u32* __restrict__ block_ptr",
        block_idx: DevPtr = "const u32* __restrict__ block_idx",
        block_mask: DevPtr = "const u16* __restrict__ block_mask",
        col_ptr: DevPtr = "const u32* __restrict__ col_ptr",
        col_idx: DevPtr = "const u32* __restrict__ col_idx",
        col_mask: DevPtr = "const u16* __restrict__ col_mask",
        seq_q: DevPtr = "const int* __restrict__ seq_q",
        seq_k: DevPtr = "const int* __restrict__ seq_k",
        seq_qb: DevPtr = "const int* __restrict__ seq_qb",
        head_map: DevPtr = "const int* __restrict__ head_map",
        batch: i32 = "int batch",
        total_q: i32 = "int total_q",
        total_k: i32 = "int total_k",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        scale_log2: f32 = "float scale_log2",
        index_heads: i32 = "int index_heads",
    }
    /// The split-KV decode kernel ([`crate::emit_decode`]): f32 partials per split for the merge.
    DecodeParams {
        q: DevPtr = "const u16* __restrict__ Q",
        k: DevPtr = "const u16* __restrict__ K",
        v: DevPtr = "const u16* __restrict__ V",
        opart: DevPtr = "float* __restrict__ Opart",
        lsepart: DevPtr = "float* __restrict__ LSEpart",
        block_ptr: DevPtr = "const u32* __restrict__ block_ptr",
        block_idx: DevPtr = "const u32* __restrict__ block_idx",
        block_mask: DevPtr = "const u16* __restrict__ block_mask",
        col_ptr: DevPtr = "const u32* __restrict__ col_ptr",
        col_idx: DevPtr = "const u32* __restrict__ col_idx",
        col_mask: DevPtr = "const u16* __restrict__ col_mask",
        nq: i32 = "int nq",
        nk: i32 = "int nk",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        scale_log2: f32 = "float scale_log2",
        splits: i32 = "int splits",
    }
    /// The log-sum-exp merge ([`crate::emit_merge`]); `parts` is f32 or the attention dtype (`Partial`).
    MergeParams {
        parts: DevPtr = "const PartT* __restrict__ parts",
        lses: DevPtr = "const float* __restrict__ lses",
        o: DevPtr = "u16* __restrict__ O",
        lse: DevPtr = "float* __restrict__ LSE",
        nparts: i32 = "int nparts",
        rows: i32 = "int rows",
    }
    /// The wgmma probe ([`crate::emit_wgmma_probe`]).
    ProbeParams {
        q: DevPtr = "const u16* __restrict__ Q",
        k: DevPtr = "const u16* __restrict__ K",
        v: DevPtr = "const u16* __restrict__ V",
        s: DevPtr = "float* __restrict__ S",
        o: DevPtr = "float* __restrict__ O",
    }
    /// The paged cache's `fill` entry ([`crate::emit_paged`]): a sequence's first `n` tokens.
    PagedFillParams {
        ksrc: DevPtr = "const u16* __restrict__ Ksrc",
        vsrc: DevPtr = "const u16* __restrict__ Vsrc",
        n: i32 = "int n",
        seq: i32 = "int seq",
        page_table: DevPtr = "const u32* __restrict__ page_table",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        hkv: i32 = "int hkv",
        kc: DevPtr = "u16* __restrict__ Kc",
        vc: DevPtr = "u16* __restrict__ Vc",
        kmin: DevPtr = "u16* __restrict__ kmin",
        kmax: DevPtr = "u16* __restrict__ kmax",
        codes: DevPtr = "signed char* __restrict__ codes",
        cscale: DevPtr = "float* __restrict__ cscale",
        key_bits: i32 = "int key_bits",
        hot_tag: DevPtr = "u32* __restrict__ hot_tag",
        hot_slots: i32 = "int hot_slots",
    }
    /// The paged cache's `append` entry ([`crate::emit_paged`]): one token per sequence.
    PagedAppendParams {
        knew: DevPtr = "const u16* __restrict__ Knew",
        vnew: DevPtr = "const u16* __restrict__ Vnew",
        seq_lens: DevPtr = "const int* __restrict__ seq_lens",
        page_table: DevPtr = "const u32* __restrict__ page_table",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        hkv: i32 = "int hkv",
        kc: DevPtr = "u16* __restrict__ Kc",
        vc: DevPtr = "u16* __restrict__ Vc",
        kmin: DevPtr = "u16* __restrict__ kmin",
        kmax: DevPtr = "u16* __restrict__ kmax",
        codes: DevPtr = "signed char* __restrict__ codes",
        cscale: DevPtr = "float* __restrict__ cscale",
        key_bits: i32 = "int key_bits",
        hot_k: DevPtr = "u16* __restrict__ hot_k",
        hot_v: DevPtr = "u16* __restrict__ hot_v",
        hot_tag: DevPtr = "const u32* __restrict__ hot_tag",
        hot_slots: i32 = "int hot_slots",
    }
    /// The paged cache's `advance` entry ([`crate::emit_paged`]).
    PagedAdvanceParams {
        seq_lens: DevPtr = "int* __restrict__ seq_lens",
        batch: i32 = "int batch",
    }
    /// The paged cache's `score` entry ([`crate::emit_paged`]): every candidate page's score
    /// for every query head (sortable keys, `[batch * hq, max_pages]`); `score_mode` 0 is
    /// Quest's bound, 1 the best token's score over quantized keys (ParisKV); `shared` 1: one
    /// score per KV head, the best of its heads', in its first head's row.
    PagedScoreParams {
        q: DevPtr = "const u16* __restrict__ Q",
        kmin: DevPtr = "const u16* __restrict__ kmin",
        kmax: DevPtr = "const u16* __restrict__ kmax",
        codes: DevPtr = "const signed char* __restrict__ codes",
        cscale: DevPtr = "const float* __restrict__ cscale",
        score_mode: i32 = "int score_mode",
        page_table: DevPtr = "const u32* __restrict__ page_table",
        seq_lens: DevPtr = "const int* __restrict__ seq_lens",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        sink: i32 = "int sink",
        recent: i32 = "int recent",
        scale: f64 = "double scale",
        shared: i32 = "int shared",
        scores: DevPtr = "unsigned long long* __restrict__ scores",
    }
    /// The paged cache's `retrieve` entry ([`crate::emit_paged`]): the page choice per
    /// (sequence, query head) over the scores `score` wrote; `mode` 0 is top_k, 1 threshold
    /// (`budget_arg` = ln t), 2 top_p (`budget_arg` = p).
    PagedRetrieveParams {
        seq_lens: DevPtr = "const int* __restrict__ seq_lens",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        hq: i32 = "int hq",
        group: i32 = "int group",
        sink: i32 = "int sink",
        recent: i32 = "int recent",
        mode: i32 = "int mode",
        top_k: i32 = "int top_k",
        budget_arg: f64 = "double budget_arg",
        scores: DevPtr = "const unsigned long long* __restrict__ scores",
        chunks: DevPtr = "int2* __restrict__ chunks",
        chunk_count: DevPtr = "int* __restrict__ chunk_count",
        cap: i32 = "int cap",
    }
    /// The paged cache's `attend` entry ([`crate::emit_paged`]): f32 partials per split for
    /// the merge.
    PagedAttendParams {
        q: DevPtr = "const u16* __restrict__ Q",
        kc: DevPtr = "const u16* __restrict__ Kc",
        vc: DevPtr = "const u16* __restrict__ Vc",
        page_table: DevPtr = "const u32* __restrict__ page_table",
        seq_lens: DevPtr = "const int* __restrict__ seq_lens",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        batch: i32 = "int batch",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        chunks: DevPtr = "const int2* __restrict__ chunks",
        chunk_count: DevPtr = "const int* __restrict__ chunk_count",
        cap: i32 = "int cap",
        dense: i32 = "int dense",
        shared: i32 = "int shared",
        splits: i32 = "int splits",
        scale_log2: f32 = "float scale_log2",
        hot_k: DevPtr = "const u16* __restrict__ hot_k",
        hot_v: DevPtr = "const u16* __restrict__ hot_v",
        hot_tag: DevPtr = "const u32* __restrict__ hot_tag",
        hot_slots: i32 = "int hot_slots",
        hot_step: DevPtr = "unsigned* __restrict__ hot_step",
        opart: DevPtr = "float* __restrict__ Opart",
        lsepart: DevPtr = "float* __restrict__ LSEpart",
    }
    /// The paged cache's `stage` entry ([`crate::emit_paged`]), for a cache in host memory:
    /// copies the pages a retrieval step kept into the GPU's cache of hot pages.
    PagedStageParams {
        kc: DevPtr = "const u16* __restrict__ Kc",
        vc: DevPtr = "const u16* __restrict__ Vc",
        page_table: DevPtr = "const u32* __restrict__ page_table",
        max_pages: i32 = "int max_pages",
        page_size: i32 = "int page_size",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        chunks: DevPtr = "const int2* __restrict__ chunks",
        chunk_count: DevPtr = "const int* __restrict__ chunk_count",
        cap: i32 = "int cap",
        group: i32 = "int group",
        hot_k: DevPtr = "u16* __restrict__ hot_k",
        hot_v: DevPtr = "u16* __restrict__ hot_v",
        hot_tag: DevPtr = "u32* __restrict__ hot_tag",
        hot_claim: DevPtr = "unsigned long long* __restrict__ hot_claim",
        hot_slots: i32 = "int hot_slots",
        hot_step: DevPtr = "const unsigned* __restrict__ hot_step",
        hot_stats: DevPtr = "unsigned long long* __restrict__ hot_stats",
    }
    /// The index builders' `pool` entry ([`crate::emit_index_module`]).
    PoolParams {
        q: DevPtr = "const u16* __restrict__ Q",
        nq: i32 = "int nq",
        q_block: i32 = "int q_block",
        groups: i32 = "int groups",
        pooled: DevPtr = "float* __restrict__ pooled",
        pq_hi: DevPtr = "u16* __restrict__ pq_hi",
        pq_lo: DevPtr = "u16* __restrict__ pq_lo",
        pq_l1: DevPtr = "float* __restrict__ pq_l1",
    }
    /// The index builders' `kstats` entry ([`crate::emit_index_module`]).
    KstatsParams {
        k: DevPtr = "const u16* __restrict__ K",
        nk: i32 = "int nk",
        kinf: DevPtr = "float* __restrict__ kinf",
        kmax_bits: DevPtr = "u32* __restrict__ kmax_bits",
    }
    /// The index builders' `score` entry ([`crate::emit_index_module`]).
    ScoreParams {
        pq_hi: DevPtr = "const u16* __restrict__ pq_hi",
        pq_lo: DevPtr = "const u16* __restrict__ pq_lo",
        k: DevPtr = "const u16* __restrict__ K",
        approx: DevPtr = "float* __restrict__ approx",
        h0: i32 = "int h0",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        groups: i32 = "int groups",
        nk: i32 = "int nk",
        mode: i32 = "int mode",
        cols: i32 = "int cols",
        cand_lo: DevPtr = "const u32* __restrict__ cand_lo",
        cand_hi: DevPtr = "const u32* __restrict__ cand_hi",
        per_head: i32 = "int per_head",
        thresh: DevPtr = "const float* __restrict__ thresh",
        list_key: DevPtr = "u32* __restrict__ list_key",
        list_val: DevPtr = "float* __restrict__ list_val",
        list_count: DevPtr = "u32* __restrict__ list_count",
        list_high: DevPtr = "u32* __restrict__ list_high",
        list_cap: i32 = "int list_cap",
    }
    /// The index builders' `threshold` entry ([`crate::emit_index_module`]).
    ThresholdParams {
        sample: DevPtr = "const float* __restrict__ sample",
        samples: i32 = "int samples",
        pq_l1: DevPtr = "const float* __restrict__ pq_l1",
        kmax_bits: DevPtr = "const u32* __restrict__ kmax_bits",
        cand_lo: DevPtr = "const u32* __restrict__ cand_lo",
        cand_hi: DevPtr = "const u32* __restrict__ cand_hi",
        per_head: i32 = "int per_head",
        h0: i32 = "int h0",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        groups: i32 = "int groups",
        top_k: i32 = "int top_k",
        thresh: DevPtr = "float* __restrict__ thresh",
    }
    /// The index builders' `select` entry ([`crate::emit_index_module`]).
    SelectParams {
        approx: DevPtr = "const float* __restrict__ approx",
        pooled: DevPtr = "const float* __restrict__ pooled",
        pq_l1: DevPtr = "const float* __restrict__ pq_l1",
        k: DevPtr = "const u16* __restrict__ K",
        kinf: DevPtr = "const float* __restrict__ kinf",
        kmax_bits: DevPtr = "const u32* __restrict__ kmax_bits",
        cand_lo: DevPtr = "const u32* __restrict__ cand_lo",
        cand_hi: DevPtr = "const u32* __restrict__ cand_hi",
        per_head: i32 = "int per_head",
        h0: i32 = "int h0",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        groups: i32 = "int groups",
        nk: i32 = "int nk",
        top_k: i32 = "int top_k",
        keep_in: DevPtr = "const u32* __restrict__ keep_in",
        scale: f64 = "double scale",
        cap: i32 = "int cap",
        collect_cap: i32 = "int collect_cap",
        mode: i32 = "int mode",
        list_key: DevPtr = "const u32* __restrict__ list_key",
        list_val: DevPtr = "const float* __restrict__ list_val",
        list_count: DevPtr = "const u32* __restrict__ list_count",
        list_high: DevPtr = "const u32* __restrict__ list_high",
        list_cap: i32 = "int list_cap",
        chosen: DevPtr = "u32* __restrict__ chosen",
        chosen_count: DevPtr = "int* __restrict__ chosen_count",
        status: DevPtr = "int* __restrict__ status",
    }
    /// The index builders' `budget` entry ([`crate::emit_index_module`]).
    BudgetParams {
        approx: DevPtr = "const float* __restrict__ approx",
        pooled: DevPtr = "const float* __restrict__ pooled",
        pq_l1: DevPtr = "const float* __restrict__ pq_l1",
        k: DevPtr = "const u16* __restrict__ K",
        kinf: DevPtr = "const float* __restrict__ kinf",
        kmax_bits: DevPtr = "const u32* __restrict__ kmax_bits",
        cand_lo: DevPtr = "const u32* __restrict__ cand_lo",
        cand_hi: DevPtr = "const u32* __restrict__ cand_hi",
        per_head: i32 = "int per_head",
        h0: i32 = "int h0",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        groups: i32 = "int groups",
        nk: i32 = "int nk",
        scale: f64 = "double scale",
        mode: i32 = "int mode",
        arg: f64 = "double arg",
        exact: DevPtr = "const double* __restrict__ exact",
        best: DevPtr = "const unsigned long long* __restrict__ best",
        weights: DevPtr = "u32* __restrict__ weights",
        keep_out: DevPtr = "u32* __restrict__ keep_out",
    }
    /// The index builders' `columns` entry ([`crate::emit_index_module`]).
    ColumnsParams {
        chosen: DevPtr = "const u32* __restrict__ chosen",
        chosen_count: DevPtr = "const int* __restrict__ chosen_count",
        cap: i32 = "int cap",
        words: i32 = "int words",
        rule_ptr: DevPtr = "const u32* __restrict__ rule_ptr",
        rule_c0: DevPtr = "const u32* __restrict__ rule_c0",
        rule_c1: DevPtr = "const u32* __restrict__ rule_c1",
        rule_code: DevPtr = "const u32* __restrict__ rule_code",
        codes: DevPtr = "const u32* __restrict__ codes",
        per_head: i32 = "int per_head",
        hq: i32 = "int hq",
        q_blocks: i32 = "int q_blocks",
        block_m: i32 = "int block_m",
        q_block: i32 = "int q_block",
        groups: i32 = "int groups",
        pass: i32 = "int pass",
        tiles: DevPtr = "const u32* __restrict__ tiles",
        tile_block: i32 = "int tile_block",
        tile_groups: i32 = "int tile_groups",
        tile_words: i32 = "int tile_words",
        line_phase: DevPtr = "const int* __restrict__ line_phase",
        line_stride: i32 = "int line_stride",
        line_len: i32 = "int line_len",
        line_rule_base: i32 = "int line_rule_base",
        line_codes: DevPtr = "const u16* __restrict__ line_codes",
        row_count: DevPtr = "u32* __restrict__ row_count",
        col_ptr: DevPtr = "const u32* __restrict__ col_ptr",
        col_idx: DevPtr = "u32* __restrict__ col_idx",
        col_mask: DevPtr = "u16* __restrict__ col_mask",
    }
    /// The index builders' `scan` entry ([`crate::emit_index_module`]).
    ScanParams {
        row_count: DevPtr = "const u32* __restrict__ row_count",
        rows: i32 = "int rows",
        col_ptr: DevPtr = "u32* __restrict__ col_ptr",
    }
    /// The index builders' `block_scores` entry ([`crate::emit_index_module`]).
    BlockScoresParams {
        pooled_q: DevPtr = "const float* __restrict__ pooled_q",
        pooled_k: DevPtr = "const float* __restrict__ pooled_k",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        groups: i32 = "int groups",
        kblocks: i32 = "int kblocks",
        scale: f64 = "double scale",
        scores: DevPtr = "double* __restrict__ scores",
    }
    /// The index builders' `block_select` entry ([`crate::emit_index_module`]).
    BlockSelectParams {
        scores: DevPtr = "const double* __restrict__ scores",
        allowed: DevPtr = "const u32* __restrict__ allowed",
        per_head: i32 = "int per_head",
        groups: i32 = "int groups",
        kblocks: i32 = "int kblocks",
        mode: i32 = "int mode",
        top_k: i32 = "int top_k",
        budget_arg: f64 = "double budget_arg",
        chosen: DevPtr = "u32* __restrict__ chosen",
    }
    /// The index builders' `block_top` entry ([`crate::emit_index_module`]).
    BlockTopParams {
        scores: DevPtr = "const double* __restrict__ scores",
        allowed: DevPtr = "const u32* __restrict__ allowed",
        per_head: i32 = "int per_head",
        groups: i32 = "int groups",
        kblocks: i32 = "int kblocks",
        mode: i32 = "int mode",
        top_k: i32 = "int top_k",
        budget_arg: f64 = "double budget_arg",
        chosen: DevPtr = "u32* __restrict__ chosen",
        cache_width: i32 = "int cache_width",
    }
    /// The index builders' `block_rows` entry ([`crate::emit_index_module`]).
    BlockRowsParams {
        chosen: DevPtr = "const u32* __restrict__ chosen",
        entry_ptr: DevPtr = "const u32* __restrict__ entry_ptr",
        entry_kb: DevPtr = "const u32* __restrict__ entry_kb",
        entry_pattern_kb: DevPtr = "const u32* __restrict__ entry_pattern_kb",
        code_sel: DevPtr = "const u16* __restrict__ code_sel",
        code_not: DevPtr = "const u16* __restrict__ code_not",
        code_line: DevPtr = "const u32* __restrict__ code_line",
        line_phase: DevPtr = "const int* __restrict__ line_phase",
        line_stride: i32 = "int line_stride",
        line_len: i32 = "int line_len",
        line_codes: DevPtr = "const u16* __restrict__ line_codes",
        per_head: i32 = "int per_head",
        hq: i32 = "int hq",
        q_blocks: i32 = "int q_blocks",
        block_m: i32 = "int block_m",
        block_q: i32 = "int block_q",
        groups: i32 = "int groups",
        kblocks: i32 = "int kblocks",
        pass: i32 = "int pass",
        row_count: DevPtr = "u32* __restrict__ row_count",
        block_ptr: DevPtr = "const u32* __restrict__ block_ptr",
        block_idx: DevPtr = "u32* __restrict__ block_idx",
        block_mask: DevPtr = "u16* __restrict__ block_mask",
    }
    /// The index builders' `vs_logits` entry ([`crate::emit_index_module`]).
    VsLogitsParams {
        q: DevPtr = "const u16* __restrict__ Q",
        k: DevPtr = "const u16* __restrict__ K",
        nq: i32 = "int nq",
        nk: i32 = "int nk",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        h0: i32 = "int h0",
        last: i32 = "int last",
        allowed: DevPtr = "const u32* __restrict__ allowed",
        per_head: i32 = "int per_head",
        scale: f64 = "double scale",
        logits: DevPtr = "double* __restrict__ logits",
        rowmax: DevPtr = "unsigned long long* __restrict__ rowmax",
    }
    /// The index builders' `vs_exp` entry ([`crate::emit_index_module`]).
    VsExpParams {
        weights: DevPtr = "double* __restrict__ weights",
        rowmax: DevPtr = "const unsigned long long* __restrict__ rowmax",
        nk: i32 = "int nk",
        last: i32 = "int last",
        partial: DevPtr = "double* __restrict__ partial",
    }
    /// The index builders' `vs_inv` entry ([`crate::emit_index_module`]).
    VsInvParams {
        partial: DevPtr = "const double* __restrict__ partial",
        nk: i32 = "int nk",
        last: i32 = "int last",
        inv: DevPtr = "double* __restrict__ inv",
    }
    /// The index builders' `vs_mass` entry ([`crate::emit_index_module`]).
    VsMassParams {
        weights: DevPtr = "const double* __restrict__ weights",
        inv_rows: DevPtr = "const double* __restrict__ inv_rows",
        nq: i32 = "int nq",
        nk: i32 = "int nk",
        last: i32 = "int last",
        h0: i32 = "int h0",
        slashes: i32 = "int slashes",
        vert: DevPtr = "double* __restrict__ vert",
        slash: DevPtr = "double* __restrict__ slash",
    }
    /// The index builders' `vs_select` entry ([`crate::emit_index_module`]).
    VsSelectParams {
        vert: DevPtr = "const double* __restrict__ vert",
        slash: DevPtr = "const double* __restrict__ slash",
        nq: i32 = "int nq",
        nk: i32 = "int nk",
        hq: i32 = "int hq",
        vertical_k: i32 = "int vertical_k",
        slash_k: i32 = "int slash_k",
        vlist: DevPtr = "u32* __restrict__ vlist",
        slist: DevPtr = "u32* __restrict__ slist",
        counts: DevPtr = "int* __restrict__ counts",
    }
    /// The index builders' `grid_select` entry ([`crate::emit_index_module`]).
    GridSelectParams {
        vert: DevPtr = "const double* __restrict__ vert",
        nk: i32 = "int nk",
        hq: i32 = "int hq",
        stride: i32 = "int stride",
        phase: i32 = "int phase",
        cols: i32 = "int cols",
        cap: i32 = "int cap",
        vlist: DevPtr = "u32* __restrict__ vlist",
        counts: DevPtr = "int* __restrict__ counts",
        phases: DevPtr = "int* __restrict__ phases",
    }
    /// The index builders' `vs_tiles` entry ([`crate::emit_index_module`]).
    VsTilesParams {
        slist: DevPtr = "const u32* __restrict__ slist",
        counts: DevPtr = "const int* __restrict__ counts",
        hq: i32 = "int hq",
        slash_k: i32 = "int slash_k",
        nq: i32 = "int nq",
        nk: i32 = "int nk",
        block: i32 = "int block",
        groups: i32 = "int groups",
        kblocks: i32 = "int kblocks",
        tiles: DevPtr = "u32* __restrict__ tiles",
    }
    /// The index builders' `vv_exact` entry ([`crate::emit_index_module`]).
    VvExactParams {
        pooled: DevPtr = "const float* __restrict__ pooled",
        k: DevPtr = "const u16* __restrict__ K",
        groups: i32 = "int groups",
        nk: i32 = "int nk",
        hq: i32 = "int hq",
        hkv: i32 = "int hkv",
        h0: i32 = "int h0",
        cand_lo: DevPtr = "const u32* __restrict__ cand_lo",
        cand_hi: DevPtr = "const u32* __restrict__ cand_hi",
        per_head: i32 = "int per_head",
        scale: f64 = "double scale",
        exact: DevPtr = "double* __restrict__ exact",
        best: DevPtr = "unsigned long long* __restrict__ best",
    }
}

/// The macro an entry point's CUDA signature uses for parameter struct `name`:
/// `AttentionParams` -> `ATTENTION_PARAMS`.
pub fn params_macro(name: &str) -> String {
    let base = name.strip_suffix("Params").unwrap_or(name);
    let mut out = String::new();
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out + "_PARAMS"
}

/// The CUDA parameter list of struct `name` (a macro, see [`params_macro`]) and the asserts
/// that each parameter's type has the host field's size and alignment; `None` for a name that
/// is not a parameter struct.
pub fn cuda_params(name: &str) -> Option<String> {
    let (name, fields) = all_params().into_iter().find(|(n, _)| *n == name)?;
    let mut s = format!("// {name} (weft-codegen abi.rs), in its field order.\n#define {}", params_macro(name));
    for (i, f) in fields.iter().enumerate() {
        let sep = if i + 1 < fields.len() { "," } else { "" };
        let _ = write!(s, " \\\n    {}{sep}", f.cuda);
    }
    s.push('\n');
    // One assert per CUDA type, naming the fields of that type.
    let mut types: Vec<(String, usize, usize, Vec<&str>)> = Vec::new();
    for f in &fields {
        let ty = f.cuda_type();
        match types.iter_mut().find(|(t, size, align, _)| *t == ty && *size == f.size && *align == f.align) {
            Some((_, _, _, names)) => names.push(f.name),
            None => types.push((ty, f.size, f.align, vec![f.name])),
        }
    }
    for (ty, size, align, names) in types {
        let _ = writeln!(
            s,
            "static_assert(sizeof({ty}) == {size} && alignof({ty}) == {align}, \"{name}: the host's {} differ\");",
            names.join(", ")
        );
    }
    Some(s)
}

/// The CUDA parameter lists of `names` (see [`cuda_params`]), in that order; names that are
/// not parameter structs are skipped (`every_entry_names_a_declared_parameter_struct` checks
/// the tables).
pub(crate) fn cuda_param_lists(names: &[&str]) -> String {
    let mut out = String::from("// ---- entry point parameters (weft-codegen abi.rs) ----\n");
    for n in names {
        out.push_str(&cuda_params(n).unwrap_or_default());
    }
    out
}

/// A kernel entry point: its name suffix (`{kernel.name}_{name}`, or the kernel's name when
/// empty), its threads per CTA, its parameter struct and its grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: &'static str,
    pub threads: u32,
    pub params: &'static str,
    /// How the grid follows from the extents a launch covers: see [`Entry::grid`].
    pub grid: [Axis; 3],
}

/// One axis of an entry's grid, as a function of the extent the launch covers on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One CTA per unit of the extent (a head, a query group, a row).
    Each,
    /// One CTA per `n` units (the kernel's tile on this axis, a constant of the generated
    /// config): `ceil(extent / n)` CTAs.
    Tiles(usize),
    /// `n` CTAs whatever the extent (the kernel tells them apart by `blockIdx`).
    Fixed(u32),
}

/// The largest grid CUDA launches: `x` up to 2^31 - 1, `y` and `z` up to 65535.
const GRID_LIMITS: [usize; 3] = [i32::MAX as usize, 65535, 65535];

impl Entry {
    /// The grid of a launch covering `extents` (per axis; ignored on [`Axis::Fixed`] axes), or
    /// an error naming the axis when it is empty or larger than CUDA launches.
    pub fn grid(&self, extents: [usize; 3]) -> Result<(u32, u32, u32), String> {
        let mut dims = [0u32; 3];
        for (i, ((axis, extent), limit)) in self.grid.iter().zip(extents).zip(GRID_LIMITS).enumerate() {
            let ctas = match *axis {
                Axis::Each => extent,
                Axis::Tiles(n) => extent.div_ceil(n.max(1)),
                Axis::Fixed(n) => n as usize,
            };
            let what = || format!("{} grid axis {}", describe(self), ["x", "y", "z"][i]);
            if ctas == 0 {
                return Err(format!("{} is empty (a weft bug: please report it)", what()));
            }
            if ctas > limit {
                return Err(format!(
                    "{} needs {ctas} CTAs, more than CUDA's {limit}: split the call (fewer heads or tokens)",
                    what()
                ));
            }
            dims[i] = ctas as u32;
        }
        Ok((dims[0], dims[1], dims[2]))
    }

    /// The `constexpr` the source's `__launch_bounds__` reads: `{NAME}_THREADS`.
    pub(crate) fn threads_constant(&self) -> String {
        format!("constexpr int {}_THREADS = {};", self.name.to_uppercase(), self.threads)
    }
}

/// An entry as errors name it: `the select entry`, or the kernel's kind for unnamed ones.
pub fn describe(entry: &Entry) -> String {
    if entry.name.is_empty() {
        entry.params.trim_end_matches("Params").to_lowercase()
    } else {
        format!("the {} entry", entry.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_struct_declares_its_fields_once_with_cuda_types_of_their_size() {
        for (name, fields) in all_params() {
            let mut names: Vec<&str> = fields.iter().map(|f| f.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), fields.len(), "{name}: a field twice");
            for f in &fields {
                let ty = f.cuda_type();
                let want = if ty.ends_with('*') { 8 } else { 0 };
                let size = match ty.as_str() {
                    "int" | "float" | "u32" => 4,
                    "double" | "long long" | "unsigned long long" => 8,
                    _ => want,
                };
                assert_eq!(size, f.size, "{name}::{}: {ty} is not {} bytes", f.name, f.size);
            }
            let cuda = cuda_params(name).unwrap();
            assert!(cuda.contains(&format!("#define {}", params_macro(name))), "{cuda}");
            for f in &fields {
                assert!(cuda.contains(&format!("sizeof({}) == {}", f.cuda_type(), f.size)), "{name}::{}", f.name);
            }
        }
        assert_eq!(params_macro("VsLogitsParams"), "VS_LOGITS_PARAMS");
    }

    #[test]
    fn args_follow_the_fields() {
        let p = AttentionParams { q: 7, hq: 3, scale_log2: 0.5, ..Default::default() };
        let args = p.args();
        assert_eq!(args.len(), AttentionParams::fields().len());
        assert_eq!(args[0], Arg::Ptr(&7));
        assert_eq!(args[18], Arg::I32(&3));
        assert_eq!(args[20], Arg::F32(&0.5));
    }

    #[test]
    fn grids_tile_their_extents_within_cuda_limits() {
        let e = Entry {
            name: "t",
            threads: 128,
            params: "ScanParams",
            grid: [Axis::Tiles(64), Axis::Each, Axis::Fixed(2)],
        };
        assert_eq!(e.grid([129, 5, 0]), Ok((3, 5, 2)));
        assert_eq!(e.grid([64, 1, 9]), Ok((1, 1, 2)));
        let empty = e.grid([0, 5, 1]).unwrap_err();
        assert!(empty.contains("the t entry grid axis x is empty"), "{empty}");
        let wide = e.grid([64, 65536, 1]).unwrap_err();
        assert!(wide.contains("axis y needs 65536 CTAs, more than CUDA's 65535"), "{wide}");
    }
}
