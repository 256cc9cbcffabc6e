use crate::predicates::*;
use crate::*;
use weft_dsl::builder::*;
use weft_dsl::Pattern;

#[test]
fn default_configs_are_tiles_the_kernel_has() {
    let patterns: Vec<weft_dsl::PatternExpr> = vec![
        full(),
        causal() & window(1000),
        block().block_q(256).block_k(256).keep(top_k(2)).into(),
        block().block_q(32).block_k(48).keep(top_k(2)).into(),
        vertical_vector().q_block(128).keep(top_k(8)).into(),
        causal() & vertical_slash().block(256).vertical(top_k(8)).slash(top_k(2)),
        grid(48).into(),
    ];
    for p in &patterns {
        let c = KernelConfig::default_for(p, 128, DType::Bf16).unwrap();
        assert!(c.validate().is_ok(), "{p}: {c}");
        assert!(c.block_m.is_power_of_two() && (16..=128).contains(&c.block_m), "{p}: {c}");
        assert!(c.block_n.is_power_of_two() && (16..=128).contains(&c.block_n), "{p}: {c}");
    }
    let c =
        KernelConfig::default_for(&block().block_q(256).block_k(256).keep(top_k(2)).into(), 64, DType::F16).unwrap();
    assert_eq!((c.block_m, c.block_n, c.warp_rows), (128, 128, 32));
}

#[test]
fn hopper_defaults_take_the_producer_at_128_rows_and_wgmma_where_the_tiles_allow() {
    let blocks: weft_dsl::PatternExpr = block().block_q(128).block_k(128).keep(top_k(2)).into();
    let vs = causal() & vertical_slash().block(64).vertical(top_k(8)).slash(top_k(2));
    let vv: weft_dsl::PatternExpr = vertical_vector().q_block(128).keep(top_k(8)).into();
    let vv64: weft_dsl::PatternExpr = vertical_vector().q_block(64).keep(top_k(8)).into();
    let small: weft_dsl::PatternExpr = block().block_q(32).block_k(32).keep(top_k(2)).into();
    let causal: weft_dsl::PatternExpr = causal();
    // (pattern, head dim, Hopper tiles (None: mma.sync), producer)
    for (p, d, tiles, producer) in [
        (&blocks, 128, Some((128, 128)), true),
        (&vs, 64, Some((64, 64)), false),
        (&causal, 128, Some((128, 128)), true),
        (&causal, 64, Some((128, 128)), true),
        (&vv, 128, Some((128, 64)), true),
        (&vv64, 128, None, false),
        (&small, 128, None, false),
        (&vs, 256, None, false),
        (&causal, 256, None, false),
    ] {
        let base = KernelConfig::default_for(p, d, DType::Bf16).unwrap();
        let hopper = KernelConfig::default_for_arch(p, d, DType::Bf16, 90).unwrap();
        assert!(hopper.validate().is_ok());
        match tiles {
            Some(t) => assert_eq!((hopper.wgmma, hopper.block_m, hopper.block_n), (true, t.0, t.1), "{p} d={d}"),
            None => assert_eq!(hopper, base, "{p} d={d}"),
        }
        assert_eq!(hopper.producer, producer, "{p} d={d}: {hopper}");
        assert_eq!(KernelConfig::default_for_arch(p, d, DType::Bf16, 80).unwrap(), base, "{p}: sm_80 keeps mma.sync");
    }
}

#[test]
fn predicates_lower_with_euclidean_division() {
    let p = match causal() & pred((k() % 64).eq(lit(0)).or((q() / 128).ne(-k()))) {
        weft_dsl::PatternExpr::Intersect(v) => match &v[1] {
            weft_dsl::PatternExpr::Static(p) => p.clone(),
            _ => unreachable!(),
        },
        _ => unreachable!(),
    };
    assert_eq!(cuda_pred(&p), "((weft_rem(k, 64LL) == 0LL) || (weft_div(q, 128LL) != (-k)))");
}

#[test]
fn every_config_field_changes_the_kernel_key() {
    let p = Pattern::new("p", full());
    let base = KernelConfig::for_blocks(128, 64, 128, DType::Bf16);
    let variants = [
        base,
        KernelConfig { warp_rows: 16, ..base },
        KernelConfig { block_n: 32, ..base },
        KernelConfig { block_m: 64, ..base },
        KernelConfig { head_dim: 64, ..base },
        KernelConfig { dtype: DType::F16, ..base },
        base.with_wgmma(),
        KernelConfig { producer: true, ..base.with_wgmma() },
        KernelConfig { producer: true, persistent: true, ..base.with_wgmma() },
    ];
    let mut keys: Vec<String> = variants
        .iter()
        .map(|c| emit(&KernelSpec { pattern: &p, masks: &[], permutation: None, config: *c }).unwrap().key)
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), variants.len());
}

#[test]
fn configs_are_checked() {
    assert!(KernelConfig::new(128, DType::Bf16).validate().is_ok());
    assert!(KernelConfig { block_m: 48, ..KernelConfig::new(64, DType::F16) }.validate().is_err());
    let big = KernelConfig::for_blocks(128, 128, 256, DType::Bf16);
    assert!(big.validate().unwrap_err().to_string().contains("227 KiB"));
}

#[test]
fn wgmma_configs_are_checked_and_sized() {
    let w = KernelConfig::for_blocks(128, 128, 128, DType::Bf16).with_wgmma();
    assert!(w.validate().is_ok());
    // A warpgroup per 64 rows; unpadded tiles plus 1024 bytes to align them.
    assert_eq!(w.threads(), 256);
    assert_eq!(w.shared_bytes(), (128 + 2 * 2 * 128) * 128 * 2 + 2 * 128 * 6 + 1024);
    for bad in [
        KernelConfig { block_m: 32, ..w },
        KernelConfig { block_n: 32, ..w },
        KernelConfig { head_dim: 256, ..w },
        KernelConfig { warp_rows: 32, ..w },
    ] {
        assert!(bad.validate().unwrap_err().to_string().contains("wgmma"), "{bad}");
    }
    let k =
        emit(&KernelSpec { pattern: &Pattern::new("p", full()), masks: &[], permutation: None, config: w }).unwrap();
    assert!(
        k.arch_specific
            && k.source.contains("#define WEFT_WGMMA 1")
            && k.source.contains("wgmma.mma_async.sync.aligned.m64n128k16")
            && k.source.contains("wgmma_qk(")
    );
    // Records stored before the field existed read as the mma.sync path.
    let old = r#"{"block_m":64,"block_n":64,"head_dim":128,"dtype":"Bf16","warp_rows":16,"stages":2}"#;
    let c: KernelConfig = serde_json::from_str(old).unwrap();
    assert!(!c.wgmma && !c.producer);
    // The producer schedule: a fourth warpgroup, four mbarriers per stage, wgmma only.
    let p = KernelConfig { producer: true, ..w };
    assert!(p.validate().is_ok());
    assert_eq!((p.threads(), p.shared_bytes()), (384, w.shared_bytes() + 8 + 32 * 2));
    let e = KernelConfig { producer: true, ..KernelConfig::for_blocks(128, 128, 128, DType::Bf16) }.validate();
    assert!(e.unwrap_err().to_string().contains("set wgmma too"));
    let k =
        emit(&KernelSpec { pattern: &Pattern::new("p", full()), masks: &[], permutation: None, config: p }).unwrap();
    assert!(k.source.contains("#define WEFT_PRODUCER 1") && k.threads == 384);
    // The persistent grid: a second Q buffer and its two mbarriers; producer only; and
    // patterns without gathered columns only.
    let ps = KernelConfig { persistent: true, ..p };
    assert!(ps.validate().is_ok());
    assert_eq!(ps.shared_bytes(), p.shared_bytes() + 128 * 128 * 2 + 16);
    let e = KernelConfig { persistent: true, ..w }.validate().unwrap_err().to_string();
    assert!(e.contains("set producer too"), "{e}");
    let k =
        emit(&KernelSpec { pattern: &Pattern::new("p", causal()), masks: &[], permutation: None, config: ps }).unwrap();
    assert!(k.source.contains("#define WEFT_PERSISTENT 1"));
    let vv = Pattern::new("vv", vertical_vector().q_block(128).keep(top_k(8)));
    let e = emit(&KernelSpec { pattern: &vv, masks: &[], permutation: None, config: ps }).unwrap_err().to_string();
    assert!(e.contains("without gathered key columns"), "{e}");
}

/// The generated header `name` as it appears in rendered `source` (between its marker and the
/// next section's).
fn generated_section<'a>(source: &'a str, name: &str) -> &'a str {
    let marker = format!("// ---- {name} (generated) ----\n");
    let start = source.find(&marker).map(|i| i + marker.len()).unwrap_or(source.len());
    let end = source[start..].find("\n// ---- ").map(|i| start + i + 1).unwrap_or(source.len());
    &source[start..end]
}

/// The samples of the generated headers kept in the templates folder, so that every template
/// opens and compiles on its own: what codegen generates for a default bf16 attention kernel
/// (causal, head dim 128), with the constants of the other kernels' configs added (first
/// definition of each name wins: they agree where they overlap).
fn sample_headers() -> Vec<(&'static str, String)> {
    let pattern = Pattern::new("sample", causal());
    let causal_mask = [weft_dsl::Pred::Cmp {
        op: weft_dsl::CmpOp::Le,
        lhs: weft_dsl::IntExpr::Var(weft_dsl::Var::K),
        rhs: weft_dsl::IntExpr::Var(weft_dsl::Var::Q),
    }];
    let config = KernelConfig::new(128, DType::Bf16);
    let attention =
        emit(&KernelSpec { pattern: &pattern, masks: &causal_mask, permutation: None, config }).unwrap().source;
    let decode = emit_decode(&DecodeSpec {
        pattern: &pattern,
        masks: &causal_mask,
        permutation: None,
        block_n: 64,
        head_dim: 128,
        dtype: DType::Bf16,
    })
    .unwrap()
    .source;
    let merge = emit_merge(128, DType::Bf16, Partial::F32).unwrap().source;
    let probe = emit_wgmma_probe(128).unwrap().source;
    let index = emit_index_module(128).unwrap().source;
    let paged = crate::paged::emit_paged(128, DType::Bf16, 4, true).unwrap().source;
    let mut config = String::new();
    let mut defined = std::collections::HashSet::new();
    for source in [&attention, &decode, &merge, &probe, &index, &paged] {
        for line in generated_section(source, "config.cuh").lines() {
            let name = line
                .trim_start_matches("#define ")
                .split(['=', ';', '(', ' '])
                .find(|w| {
                    !w.is_empty()
                        && !["constexpr", "int", "bool", "unsigned", "short", "long", "typedef", "float"].contains(w)
                })
                .unwrap_or(line)
                .to_string();
            let name = if line.starts_with("typedef") { line.to_string() } else { name };
            if defined.insert(name) {
                config.push_str(line);
                config.push('\n');
            }
        }
    }
    let all: Vec<&str> = abi::all_params().iter().map(|(n, _)| *n).collect();
    let lead = "// Sample of a header weft-codegen generates per kernel (see templates.rs), so that the\n\
                // templates open and compile on their own; tests check it is what codegen generates.\n\
                #pragma once\n";
    // Kernel names hash the templates: the samples take fixed ones, so that editing a template
    // does not change them.
    for (kind, key) in [("attn", &attention), ("index", &index)] {
        let marker = format!("weft_{kind}_");
        if let Some(at) = key.find(&marker) {
            let name = &key[at..at + marker.len() + 16];
            config = config.replace(name, &format!("weft_{kind}_sample"));
        }
    }
    vec![
        ("config.cuh", format!("{lead}{config}")),
        ("masks.cuh", format!("{lead}#include \"prelude.cuh\"\n{}", crate::keys::masks(&causal_mask, None))),
        ("params.cuh", format!("{lead}#include \"prelude.cuh\"\n{}", abi_structs(&all))),
        ("wgmma_ops.cuh", format!("{lead}#include \"prelude.cuh\"\n{}", crate::wgmma::wgmma_ops(64, 128, DType::Bf16))),
    ]
}

fn abi_structs(names: &[&str]) -> String {
    names.iter().filter_map(|n| abi::cuda_params(n)).collect()
}

#[test]
fn the_sample_headers_are_what_codegen_generates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/templates");
    let bless = std::env::var_os("WEFT_BLESS").is_some();
    for (name, text) in sample_headers() {
        let path = dir.join(name);
        if bless {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(on_disk, text, "{name} differs from what codegen generates: rerun with WEFT_BLESS=1");
    }
}

#[test]
fn every_entry_names_a_declared_parameter_struct() {
    let declared: Vec<&str> = abi::all_params().iter().map(|(n, _)| *n).collect();
    for e in entry::ALL.iter().chain(&crate::paged::entry::ALL).chain([&ATTENTION_ENTRY]) {
        assert!(declared.contains(&e.params), "{} takes {}, which abi.rs does not declare", e.name, e.params);
    }
    for root in ["attention.cu", "decode.cu", "merge.cu", "hopper.cu", "index.cu", "paged.cu"] {
        assert!(!crate::templates::closure(root).is_empty(), "{root} is a template");
    }
}
