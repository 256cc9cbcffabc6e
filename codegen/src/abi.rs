//! The host-device boundary: every kernel entry point takes one `#[repr(C)]` parameter struct
//! by value (as FlashAttention's `Flash_fwd_params`), declared here once. The generated source
//! gets the CUDA mirror of the structs it uses ([`cuda_structs`]), with `static_assert`s on
//! every field's offset and the struct's size, so a kernel whose layout differs from the host's
//! does not compile (the NVRTC tests compile every kernel on the CPU machine). Kernels read
//! fields by name; the runtime fills them by name: no argument is passed by position.
//!
//! The entry points themselves (name, threads per CTA, parameter struct) are [`Entry`]s; the
//! generated source takes its `__launch_bounds__` from the same table the launches read.

use std::fmt::Write as _;

/// A device address as kernels receive it (`CUdeviceptr`); 0 for an unused pointer.
pub type DevPtr = u64;

/// One field of a parameter struct, in its host layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    /// The field's CUDA type (`const u16*`, `int`, ...).
    pub cuda: &'static str,
    /// Byte offset in the `#[repr(C)]` struct.
    pub offset: usize,
    pub size: usize,
    pub align: usize,
}

/// A kernel's parameter struct: `#[repr(C)]` plain data (device addresses and scalars), passed
/// by value as the entry point's only argument.
pub trait Params: Copy + Default + Send + Sync + 'static {
    /// The struct's name, on both sides.
    const NAME: &'static str;
    /// Its fields in declaration order.
    fn fields() -> Vec<Field>;
    /// Its size in bytes on the host.
    fn size() -> usize {
        std::mem::size_of::<Self>()
    }
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
                    offset: std::mem::offset_of!($name, $field),
                    size: std::mem::size_of::<$ty>(),
                    align: std::mem::align_of::<$ty>(),
                }),*]
            }
        }
    )*

        /// Every parameter struct: (name, fields, size).
        pub fn all_params() -> Vec<(&'static str, Vec<Field>, usize)> {
            vec![$(($name::NAME, $name::fields(), $name::size())),*]
        }
    };
}

params! {
    /// The attention kernel ([`crate::emit`]): Q, K, V, O `[tokens, heads, D]` rows, the sparse index in CSR form, packed-batch offsets and the head map.
    AttentionParams {
        q: DevPtr = "const u16*",
        k: DevPtr = "const u16*",
        v: DevPtr = "const u16*",
        o: DevPtr = "u16*",
        lse: DevPtr = "float*",
        block_ptr: DevPtr = "const u32*",
        block_idx: DevPtr = "const u32*",
        block_mask: DevPtr = "const u16*",
        col_ptr: DevPtr = "const u32*",
        col_idx: DevPtr = "const u32*",
        col_mask: DevPtr = "const u16*",
        seq_q: DevPtr = "const int*",
        seq_k: DevPtr = "const int*",
        seq_qb: DevPtr = "const int*",
        head_map: DevPtr = "const int*",
        batch: i32 = "int",
        total_q: i32 = "int",
        total_k: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        scale_log2: f32 = "float",
        index_heads: i32 = "int",
    }
    /// The split-KV decode kernel ([`crate::emit_decode`]): f32 partials per split for the merge.
    DecodeParams {
        q: DevPtr = "const u16*",
        k: DevPtr = "const u16*",
        v: DevPtr = "const u16*",
        opart: DevPtr = "float*",
        lsepart: DevPtr = "float*",
        block_ptr: DevPtr = "const u32*",
        block_idx: DevPtr = "const u32*",
        block_mask: DevPtr = "const u16*",
        col_ptr: DevPtr = "const u32*",
        col_idx: DevPtr = "const u32*",
        col_mask: DevPtr = "const u16*",
        nq: i32 = "int",
        nk: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        scale_log2: f32 = "float",
        splits: i32 = "int",
    }
    /// The log-sum-exp merge ([`crate::emit_merge`]); `parts` is f32 or the attention dtype (`Partial`).
    MergeParams {
        parts: DevPtr = "const void*",
        lses: DevPtr = "const float*",
        o: DevPtr = "u16*",
        lse: DevPtr = "float*",
        nparts: i32 = "int",
        rows: i32 = "int",
    }
    /// The wgmma probe ([`crate::emit_wgmma_probe`]).
    ProbeParams {
        q: DevPtr = "const u16*",
        k: DevPtr = "const u16*",
        v: DevPtr = "const u16*",
        s: DevPtr = "float*",
        o: DevPtr = "float*",
    }
    /// The index builders' `pool` entry ([`crate::emit_index_module`]).
    PoolParams {
        q: DevPtr = "const u16*",
        nq: i32 = "int",
        q_block: i32 = "int",
        groups: i32 = "int",
        pooled: DevPtr = "float*",
        pq_hi: DevPtr = "u16*",
        pq_lo: DevPtr = "u16*",
        pq_l1: DevPtr = "float*",
    }
    /// The index builders' `kstats` entry ([`crate::emit_index_module`]).
    KstatsParams {
        k: DevPtr = "const u16*",
        nk: i32 = "int",
        kinf: DevPtr = "float*",
        kmax_bits: DevPtr = "u32*",
    }
    /// The index builders' `score` entry ([`crate::emit_index_module`]).
    ScoreParams {
        pq_hi: DevPtr = "const u16*",
        pq_lo: DevPtr = "const u16*",
        k: DevPtr = "const u16*",
        approx: DevPtr = "float*",
        h0: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        groups: i32 = "int",
        nk: i32 = "int",
        mode: i32 = "int",
        cols: i32 = "int",
        cand_lo: DevPtr = "const u32*",
        cand_hi: DevPtr = "const u32*",
        per_head: i32 = "int",
        thresh: DevPtr = "const float*",
        list_key: DevPtr = "u32*",
        list_val: DevPtr = "float*",
        list_count: DevPtr = "u32*",
        list_high: DevPtr = "u32*",
        list_cap: i32 = "int",
    }
    /// The index builders' `threshold` entry ([`crate::emit_index_module`]).
    ThresholdParams {
        sample: DevPtr = "const float*",
        samples: i32 = "int",
        pq_l1: DevPtr = "const float*",
        kmax_bits: DevPtr = "const u32*",
        cand_lo: DevPtr = "const u32*",
        cand_hi: DevPtr = "const u32*",
        per_head: i32 = "int",
        h0: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        groups: i32 = "int",
        top_k: i32 = "int",
        thresh: DevPtr = "float*",
    }
    /// The index builders' `select` entry ([`crate::emit_index_module`]).
    SelectParams {
        approx: DevPtr = "const float*",
        pooled: DevPtr = "const float*",
        pq_l1: DevPtr = "const float*",
        k: DevPtr = "const u16*",
        kinf: DevPtr = "const float*",
        kmax_bits: DevPtr = "const u32*",
        cand_lo: DevPtr = "const u32*",
        cand_hi: DevPtr = "const u32*",
        per_head: i32 = "int",
        h0: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        groups: i32 = "int",
        nk: i32 = "int",
        top_k: i32 = "int",
        keep_in: DevPtr = "const u32*",
        scale: f64 = "double",
        cap: i32 = "int",
        collect_cap: i32 = "int",
        mode: i32 = "int",
        list_key: DevPtr = "const u32*",
        list_val: DevPtr = "const float*",
        list_count: DevPtr = "const u32*",
        list_high: DevPtr = "const u32*",
        list_cap: i32 = "int",
        chosen: DevPtr = "u32*",
        chosen_count: DevPtr = "int*",
        status: DevPtr = "int*",
    }
    /// The index builders' `budget` entry ([`crate::emit_index_module`]).
    BudgetParams {
        approx: DevPtr = "const float*",
        pooled: DevPtr = "const float*",
        pq_l1: DevPtr = "const float*",
        k: DevPtr = "const u16*",
        kinf: DevPtr = "const float*",
        kmax_bits: DevPtr = "const u32*",
        cand_lo: DevPtr = "const u32*",
        cand_hi: DevPtr = "const u32*",
        per_head: i32 = "int",
        h0: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        groups: i32 = "int",
        nk: i32 = "int",
        scale: f64 = "double",
        mode: i32 = "int",
        arg: f64 = "double",
        exact: DevPtr = "const double*",
        best: DevPtr = "const unsigned long long*",
        weights: DevPtr = "u32*",
        keep_out: DevPtr = "u32*",
    }
    /// The index builders' `columns` entry ([`crate::emit_index_module`]).
    ColumnsParams {
        chosen: DevPtr = "const u32*",
        chosen_count: DevPtr = "const int*",
        cap: i32 = "int",
        words: i32 = "int",
        rule_ptr: DevPtr = "const u32*",
        rule_c0: DevPtr = "const u32*",
        rule_c1: DevPtr = "const u32*",
        rule_code: DevPtr = "const u32*",
        codes: DevPtr = "const u32*",
        per_head: i32 = "int",
        hq: i32 = "int",
        q_blocks: i32 = "int",
        block_m: i32 = "int",
        q_block: i32 = "int",
        groups: i32 = "int",
        pass: i32 = "int",
        tiles: DevPtr = "const u32*",
        tile_block: i32 = "int",
        tile_groups: i32 = "int",
        tile_words: i32 = "int",
        line_phase: DevPtr = "const int*",
        line_stride: i32 = "int",
        line_len: i32 = "int",
        line_rule_base: i32 = "int",
        line_codes: DevPtr = "const u16*",
        row_count: DevPtr = "u32*",
        col_ptr: DevPtr = "const u32*",
        col_idx: DevPtr = "u32*",
        col_mask: DevPtr = "u16*",
    }
    /// The index builders' `scan` entry ([`crate::emit_index_module`]).
    ScanParams {
        row_count: DevPtr = "const u32*",
        rows: i32 = "int",
        col_ptr: DevPtr = "u32*",
    }
    /// The index builders' `block_scores` entry ([`crate::emit_index_module`]).
    BlockScoresParams {
        pooled_q: DevPtr = "const float*",
        pooled_k: DevPtr = "const float*",
        hq: i32 = "int",
        hkv: i32 = "int",
        groups: i32 = "int",
        kblocks: i32 = "int",
        scale: f64 = "double",
        scores: DevPtr = "double*",
    }
    /// The index builders' `block_select` entry ([`crate::emit_index_module`]).
    BlockSelectParams {
        scores: DevPtr = "const double*",
        allowed: DevPtr = "const u32*",
        per_head: i32 = "int",
        groups: i32 = "int",
        kblocks: i32 = "int",
        mode: i32 = "int",
        top_k: i32 = "int",
        budget_arg: f64 = "double",
        chosen: DevPtr = "u32*",
    }
    /// The index builders' `block_top` entry ([`crate::emit_index_module`]).
    BlockTopParams {
        scores: DevPtr = "const double*",
        allowed: DevPtr = "const u32*",
        per_head: i32 = "int",
        groups: i32 = "int",
        kblocks: i32 = "int",
        mode: i32 = "int",
        top_k: i32 = "int",
        budget_arg: f64 = "double",
        chosen: DevPtr = "u32*",
        cache_width: i32 = "int",
    }
    /// The index builders' `block_rows` entry ([`crate::emit_index_module`]).
    BlockRowsParams {
        chosen: DevPtr = "const u32*",
        entry_ptr: DevPtr = "const u32*",
        entry_kb: DevPtr = "const u32*",
        entry_pattern_kb: DevPtr = "const u32*",
        code_sel: DevPtr = "const u16*",
        code_not: DevPtr = "const u16*",
        code_line: DevPtr = "const u32*",
        line_phase: DevPtr = "const int*",
        line_stride: i32 = "int",
        line_len: i32 = "int",
        line_codes: DevPtr = "const u16*",
        per_head: i32 = "int",
        hq: i32 = "int",
        q_blocks: i32 = "int",
        block_m: i32 = "int",
        block_q: i32 = "int",
        groups: i32 = "int",
        kblocks: i32 = "int",
        pass: i32 = "int",
        row_count: DevPtr = "u32*",
        block_ptr: DevPtr = "const u32*",
        block_idx: DevPtr = "u32*",
        block_mask: DevPtr = "u16*",
    }
    /// The index builders' `vs_logits` entry ([`crate::emit_index_module`]).
    VsLogitsParams {
        q: DevPtr = "const u16*",
        k: DevPtr = "const u16*",
        nq: i32 = "int",
        nk: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        h0: i32 = "int",
        last: i32 = "int",
        allowed: DevPtr = "const u32*",
        per_head: i32 = "int",
        scale: f64 = "double",
        logits: DevPtr = "double*",
        rowmax: DevPtr = "unsigned long long*",
    }
    /// The index builders' `vs_exp` entry ([`crate::emit_index_module`]).
    VsExpParams {
        weights: DevPtr = "double*",
        rowmax: DevPtr = "const unsigned long long*",
        nk: i32 = "int",
        last: i32 = "int",
        partial: DevPtr = "double*",
    }
    /// The index builders' `vs_inv` entry ([`crate::emit_index_module`]).
    VsInvParams {
        partial: DevPtr = "const double*",
        nk: i32 = "int",
        last: i32 = "int",
        inv: DevPtr = "double*",
    }
    /// The index builders' `vs_mass` entry ([`crate::emit_index_module`]).
    VsMassParams {
        weights: DevPtr = "const double*",
        inv_rows: DevPtr = "const double*",
        nq: i32 = "int",
        nk: i32 = "int",
        last: i32 = "int",
        h0: i32 = "int",
        slashes: i32 = "int",
        vert: DevPtr = "double*",
        slash: DevPtr = "double*",
    }
    /// The index builders' `vs_select` entry ([`crate::emit_index_module`]).
    VsSelectParams {
        vert: DevPtr = "const double*",
        slash: DevPtr = "const double*",
        nq: i32 = "int",
        nk: i32 = "int",
        hq: i32 = "int",
        vertical_k: i32 = "int",
        slash_k: i32 = "int",
        vlist: DevPtr = "u32*",
        slist: DevPtr = "u32*",
        counts: DevPtr = "int*",
    }
    /// The index builders' `grid_select` entry ([`crate::emit_index_module`]).
    GridSelectParams {
        vert: DevPtr = "const double*",
        nk: i32 = "int",
        hq: i32 = "int",
        stride: i32 = "int",
        phase: i32 = "int",
        cols: i32 = "int",
        cap: i32 = "int",
        vlist: DevPtr = "u32*",
        counts: DevPtr = "int*",
        phases: DevPtr = "int*",
    }
    /// The index builders' `vs_tiles` entry ([`crate::emit_index_module`]).
    VsTilesParams {
        slist: DevPtr = "const u32*",
        counts: DevPtr = "const int*",
        hq: i32 = "int",
        slash_k: i32 = "int",
        nq: i32 = "int",
        nk: i32 = "int",
        block: i32 = "int",
        groups: i32 = "int",
        kblocks: i32 = "int",
        tiles: DevPtr = "u32*",
    }
    /// The index builders' `vv_exact` entry ([`crate::emit_index_module`]).
    VvExactParams {
        pooled: DevPtr = "const float*",
        k: DevPtr = "const u16*",
        groups: i32 = "int",
        nk: i32 = "int",
        hq: i32 = "int",
        hkv: i32 = "int",
        h0: i32 = "int",
        cand_lo: DevPtr = "const u32*",
        cand_hi: DevPtr = "const u32*",
        per_head: i32 = "int",
        scale: f64 = "double",
        exact: DevPtr = "double*",
        best: DevPtr = "unsigned long long*",
    }
}

/// The CUDA definition of parameter struct `name` and the asserts that pin its layout to the
/// host's; `None` for a name that is not a parameter struct.
pub fn cuda_struct(name: &str) -> Option<String> {
    let (name, fields, size) = all_params().into_iter().find(|(n, _, _)| *n == name)?;
    let mut s = format!("struct {name} {{\n");
    for f in &fields {
        let _ = writeln!(s, "    {} {};", f.cuda, f.name);
    }
    s.push_str("};\n");
    // C lays out fields in order, each at the next multiple of its alignment: with the same
    // sizes and alignments in the same order, and the same total size, every offset agrees
    // (NVRTC has no offsetof; `c_layout` checks the rule against Rust's offsets).
    let _ = writeln!(
        s,
        "static_assert(sizeof({name}) == {size}, \"{name}: the host layout (weft-codegen abi.rs) differs\");"
    );
    for f in &fields {
        let _ = writeln!(
            s,
            "static_assert(sizeof({name}::{n}) == {} && alignof(decltype({name}::{n})) == {}, \"{name}::{n}: the host layout differs\");",
            f.size,
            f.align,
            n = f.name
        );
    }
    Some(s)
}

/// The CUDA definitions of `names` (see [`cuda_struct`]), in that order.
pub(crate) fn cuda_structs(names: &[&str]) -> String {
    let mut out = String::from("// ---- parameter structs (weft-codegen abi.rs; layout asserted) ----\n");
    for n in names {
        out.push_str(&cuda_struct(n).unwrap_or_else(|| panic!("{n} is declared in abi.rs")));
    }
    out
}

/// A kernel entry point: its name suffix (`{kernel.name}_{name}`, or the kernel's name when
/// empty), its threads per CTA and its parameter struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: &'static str,
    pub threads: u32,
    pub params: &'static str,
}

impl Entry {
    /// The `constexpr` the source's `__launch_bounds__` reads: `{NAME}_THREADS`.
    pub(crate) fn threads_constant(&self) -> String {
        format!("constexpr int {}_THREADS = {};", self.name.to_uppercase(), self.threads)
    }
}

/// The offsets and size C gives fields of these sizes and alignments, in order: what the CUDA
/// side derives from the sizes and alignments [`cuda_struct`] asserts.
pub fn c_layout(fields: &[Field]) -> (Vec<usize>, usize) {
    let (mut at, mut align) = (0usize, 1usize);
    let offsets = fields
        .iter()
        .map(|f| {
            at = at.next_multiple_of(f.align);
            align = align.max(f.align);
            let here = at;
            at += f.size;
            here
        })
        .collect();
    (offsets, at.next_multiple_of(align))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_struct_has_the_c_layout_its_cuda_mirror_derives() {
        for (name, fields, size) in all_params() {
            let (offsets, c_size) = c_layout(&fields);
            let rust: Vec<usize> = fields.iter().map(|f| f.offset).collect();
            assert_eq!((offsets, c_size), (rust, size), "{name}");
            let cuda = cuda_struct(name).unwrap();
            assert!(cuda.contains(&format!("static_assert(sizeof({name}) == {size},")), "{cuda}");
            assert_eq!(cuda.matches("static_assert").count(), fields.len() + 1, "{cuda}");
        }
    }
}
