//! Hopper warpgroup MMA helpers and their probe kernel ([`emit_wgmma_probe`]).

use crate::abi::{cuda_param_lists, Axis, Entry};
use crate::keys::{constant, key_and_header};
use crate::templates::{closure, defines, render};
use crate::{DType, Error, Kernel};

/// The probe's entry point (the kernel's own name): one warpgroup.
pub const PROBE_ENTRY: Entry =
    Entry { name: "", threads: 128, params: "ProbeParams", grid: [Axis::Fixed(1), Axis::Fixed(1), Axis::Fixed(1)] };

/// Keys in the tile of [`emit_wgmma_probe`].
pub const WGMMA_PROBE_KEYS: u32 = 64;

/// Generates the Hopper building blocks' probe for bf16 and `head_dim` (64 or 128): one
/// warpgroup computes S = Q K^T (64 x [`WGMMA_PROBE_KEYS`], both operands in 128-byte swizzled
/// shared memory) and O = bf16(S) V (P from registers, V read transposed) with `wgmma`. It is
/// compiled for sm_90a (`Kernel::arch_specific`: the target `wgmma` needs) and launched with one CTA of
/// 128 threads and [`Kernel::shared_bytes`] of dynamic shared memory; see `templates/hopper.cu`.
/// The attention kernel's Hopper path (`KernelConfig::wgmma`) is built from these pieces; the
/// GPU suite checks them alone first, so a failure points at a piece, not at the kernel.
pub fn emit_wgmma_probe(head_dim: u32) -> Result<Kernel, Error> {
    if ![64, 128].contains(&head_dim) {
        return Err(Error::Config(format!("the wgmma probe takes head_dim 64 or 128, got {head_dim}")));
    }
    let keys = WGMMA_PROBE_KEYS;
    let config = format!("wgmma-probe head_dim={head_dim} keys={keys}");
    let (key, header) = key_and_header("wgmma-probe", &closure("hopper.cu"), None, &config, &[], None);
    let name = format!("weft_wgmma_{}", &key[..16]);
    let mut cfg = format!("#define WEFT_KERNEL {name}\n");
    cfg += &defines(&[("WEFT_F16", false)]);
    cfg += &constant("int", "D", head_dim, "head dim (columns of Q, K, V)");
    cfg += &constant("int", "KEYS", keys, "keys in the probe's tile");
    let source = render(
        &header,
        "hopper.cu",
        &[
            ("config.cuh", Some(cfg)),
            ("params.cuh", Some(cuda_param_lists(&[PROBE_ENTRY.params]))),
            ("wgmma_ops.cuh", Some(wgmma_ops(keys, head_dim, DType::Bf16))),
        ],
    );
    // Q, K and V tiles, and 1024 bytes to align them to the swizzle's period.
    let shared_bytes = (64 + 2 * keys) * head_dim * 2 + 1024;
    Ok(Kernel { name, source, key, threads: PROBE_ENTRY.threads, shared_bytes, head_dim, arch_specific: true })
}

/// The generated `wgmma_ops.cuh`: `wgmma_qk`, the m64n`keys`k16 product S = Q K^T with A and B
/// in shared memory, and `wgmma_pv`, the m64n`head_dim`k16 product O += P V with A (P) in
/// registers and B (V) read transposed, for `dtype`.
pub(crate) fn wgmma_ops(keys: u32, head_dim: u32, dtype: DType) -> String {
    [wgmma_wrapper("wgmma_qk", keys, false, dtype), wgmma_wrapper("wgmma_pv", head_dim, true, dtype)].join("\n")
}

/// A `wgmma` m64n`n`k16 wrapper (`dtype` inputs, f32 accumulators), one asm statement with its
/// `n / 2` accumulators as operands, named `name`: without `registers_a` it takes A and B from
/// shared memory (both K-major), with it A from registers and B from shared memory read transposed
/// (MN-major). `accumulate` false overwrites the accumulators.
fn wgmma_wrapper(name: &str, n: u32, registers_a: bool, dtype: DType) -> String {
    let acc = n / 2;
    let ty = match dtype {
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
    };
    let d_list = (0..acc).map(|i| format!("%{i}")).collect::<Vec<_>>().join(", ");
    let d_ops = (0..acc).map(|i| format!("\"+f\"(d[{i}])")).collect::<Vec<_>>().join(", ");
    let shape = format!("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty}");
    if registers_a {
        let (a, b, flag) = (acc, acc + 4, acc + 5);
        format!(
            "__device__ __forceinline__ void {name}(float (&d)[{acc}], const u32 (&a)[4], unsigned long long db, bool accumulate) {{\n\
             \x20   asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{flag}, 0;\\n\"\n\
             \x20                \"{shape} {{{d_list}}}, {{%{a}, %{a1}, %{a2}, %{a3}}}, %{b}, p, 1, 1, 1;\\n}}\\n\"\n\
             \x20                : {d_ops}\n\
             \x20                : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(db), \"r\"((int)accumulate));\n}}\n",
            a1 = a + 1,
            a2 = a + 2,
            a3 = a + 3,
        )
    } else {
        let (da, db, flag) = (acc, acc + 1, acc + 2);
        format!(
            "__device__ __forceinline__ void {name}(float (&d)[{acc}], unsigned long long da, unsigned long long db, bool accumulate) {{\n\
             \x20   asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{flag}, 0;\\n\"\n\
             \x20                \"{shape} {{{d_list}}}, %{da}, %{db}, p, 1, 1, 0, 0;\\n}}\\n\"\n\
             \x20                : {d_ops}\n\
             \x20                : \"l\"(da), \"l\"(db), \"r\"((int)accumulate));\n}}\n"
        )
    }
}
