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
    assert!(k.arch_specific && k.source.contains("#define WEFT_WGMMA 1") && k.source.contains("wgmma_ss_n128("));
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
