//! The parts of the layer runtime that need no GPU: plans read from stored search results, and
//! the tuning key the tuner stores under and the runtime looks up.

use weft_cache::{Db, SearchKey, SearchRecord, ShapeBucket};
use weft_codegen::DType;
use weft_dsl::builder::*;
use weft_dsl::Pattern;
use weft_runtime::{tune_key, LayerPlan};

fn store(db: &Db, model: &str, layer: u32, head: u32, p: &Pattern) {
    let record = SearchRecord {
        pattern: serde_json::to_value(p).unwrap(),
        recall: 0.9,
        density: 0.1,
        created: 0,
        ..Default::default()
    };
    db.put_search(&SearchKey { model: model.into(), layer, head }, &record).unwrap();
}

#[test]
fn a_plan_from_search_results_has_one_pattern_per_head_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let a = Pattern::new("a", causal() & window(128));
    let b = Pattern::new("b", causal() & vertical_slash().vertical(top_k(16)).slash(top_k(4)));
    // Stored out of order, two layers, and another model.
    store(&db, "m", 1, 2, &a);
    store(&db, "m", 1, 0, &b);
    store(&db, "m", 1, 1, &a);
    store(&db, "m", 0, 0, &b);
    store(&db, "other", 1, 0, &a);
    let plan = LayerPlan::from_search(&db, "m", 1).unwrap();
    assert_eq!(plan.patterns(), vec![b.clone(), a.clone(), a.clone()]);
    assert_eq!(LayerPlan::from_search(&db, "m", 0).unwrap().patterns(), vec![b]);

    // No results, and a layer with a missing head, are errors that say what to do.
    let e = LayerPlan::from_search(&db, "m", 7).unwrap_err().to_string();
    assert!(e.contains("weft search"), "{e}");
    store(&db, "gappy", 0, 0, &a);
    store(&db, "gappy", 0, 2, &a);
    let e = LayerPlan::from_search(&db, "gappy", 0).unwrap_err().to_string();
    assert!(e.contains("miss some heads"), "{e}");
    assert_eq!(LayerPlan::uniform(a.clone(), 3).patterns(), vec![a.clone(), a.clone(), a]);
}

#[test]
fn tuning_keys_bucket_the_sequence_length_and_separate_patterns_heads_and_shapes() {
    let tc = weft_cache::Toolchain {
        gpu_name: "GPU".into(),
        sm: 90,
        sm_count: 132,
        driver_version: 13000,
        nvrtc_version: (13, 0),
        codegen_version: weft_codegen::CODEGEN_VERSION,
    };
    let p = Pattern::new("w", causal() & window(512));
    let key = |p: &Pattern, head, seq, d, dtype, gqa| tune_key(tc.clone(), p, head, seq, d, dtype, gqa);
    let base = key(&p, None, 5000, 128, DType::Bf16, 4);
    assert_eq!(base.bucket, ShapeBucket::new(8192, 128, "bf16", 4, false));
    // Lengths in the same power-of-two bucket share a key; everything else separates keys.
    assert_eq!(key(&p, None, 8192, 128, DType::Bf16, 4), base);
    assert_ne!(key(&p, None, 8193, 128, DType::Bf16, 4), base);
    assert_ne!(key(&p, Some(3), 5000, 128, DType::Bf16, 4), base);
    assert_ne!(key(&p, None, 5000, 64, DType::Bf16, 4), base);
    assert_ne!(key(&p, None, 5000, 128, DType::F16, 4), base);
    assert_ne!(key(&p, None, 5000, 128, DType::Bf16, 1), base);
    assert_ne!(key(&Pattern::new("w", causal() & window(256)), None, 5000, 128, DType::Bf16, 4), base);
    // Short sequences share the smallest bucket.
    assert_eq!(key(&p, None, 10, 128, DType::Bf16, 4).bucket.seq, 1024);
}
