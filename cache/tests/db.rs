//! The kernel database: round trips, versioning, staleness, export/import, a locked and a
//! corrupt database.

use weft_cache::*;

fn toolchain(gpu: &str, driver: i32) -> Toolchain {
    Toolchain {
        gpu_name: gpu.into(),
        sm: 90,
        sm_count: 132,
        driver_version: driver,
        nvrtc_version: (13, 0),
        codegen_version: 1,
    }
}

fn kernel_record() -> KernelRecord {
    KernelRecord {
        name: "weft_attn_0123".into(),
        cubin: (0..=255).collect(),
        ptx: ".entry weft_attn_0123".into(),
        options: vec!["--gpu-architecture=sm_90".into()],
        threads: 128,
        shared_bytes: 105216,
        head_dim: 128,
        created: timestamp(),
    }
}

fn tune_key(tc: Toolchain, head: Option<u32>) -> TuneKey {
    TuneKey { toolchain: tc, pattern_hash: "ab12".into(), head, bucket: ShapeBucket::new(16000, 128, "bf16", 4, true) }
}

fn tune_record() -> TuneRecord {
    TuneRecord {
        best: serde_json::json!({"block_m": 128, "block_n": 64}),
        best_ms: 1.5,
        default_ms: Some(2.0),
        timings: vec![(serde_json::json!({"block_m": 64}), Some(2.0)), (serde_json::json!({"block_m": 256}), None)],
        kernel: "k1".into(),
        created: timestamp(),
    }
}

#[test]
fn records_round_trip_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let h200 = toolchain("NVIDIA H200", 580);
    let kk = KernelKey { toolchain: h200.clone(), kernel: "k1".into(), arch: "sm_90".into() };
    let sk = SearchKey { model: "org/model".into(), layer: 3, head: 7 };
    let sr = SearchRecord {
        pattern: serde_json::json!({"name": "p"}),
        recall: 0.96,
        density: 0.1,
        created: 1,
        ..Default::default()
    };
    {
        let db = Db::open(dir.path()).unwrap();
        db.put_kernel(&kk, &kernel_record()).unwrap();
        db.put_tuning(&tune_key(h200.clone(), Some(2)), &tune_record()).unwrap();
        db.put_search(&sk, &sr).unwrap();
    }
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.kernel(&kk).unwrap().unwrap(), kernel_record_with(db.kernel(&kk).unwrap().unwrap().created));
    assert_eq!(db.tuning(&tune_key(h200.clone(), Some(2))).unwrap().unwrap().best_ms, 1.5);
    assert!(db.tuning(&tune_key(h200.clone(), None)).unwrap().is_none(), "per-head records are per head");
    assert_eq!(db.search(&sk).unwrap().unwrap(), sr);
    assert_eq!(db.search_results("org/model").unwrap(), vec![(sk.clone(), sr.clone())]);
    assert!(db.search_results("org/mod").unwrap().is_empty(), "a model name is not a prefix of another");
    assert_eq!(db.entries().unwrap().len(), 3);
}

fn kernel_record_with(created: u64) -> KernelRecord {
    KernelRecord { created, ..kernel_record() }
}

#[test]
fn another_toolchain_never_sees_an_entry_and_verify_calls_it_stale() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let old = toolchain("NVIDIA H200", 570);
    let new = toolchain("NVIDIA H200", 580);
    db.put_tuning(&tune_key(old.clone(), None), &tune_record()).unwrap();
    assert!(db.tuning(&tune_key(new.clone(), None)).unwrap().is_none());
    assert!(db.tuning(&tune_key(toolchain("NVIDIA H100", 570), None)).unwrap().is_none());
    let kk = |tc: Toolchain| KernelKey { toolchain: tc, kernel: "k".into(), arch: "sm_90".into() };
    db.put_kernel(&kk(old.clone()), &kernel_record()).unwrap();
    assert!(db.kernel(&kk(new.clone())).unwrap().is_none());
    let v = db.verify(Some(&new)).unwrap();
    assert_eq!(v.checked, 2);
    assert_eq!(v.stale.len(), 2);
    assert!(v.corrupt.is_empty());
    assert!(db.verify(Some(&old)).unwrap().stale.is_empty());
}

#[test]
fn buckets_round_up_to_powers_of_two() {
    assert_eq!(ShapeBucket::new(100, 64, "bf16", 1, false).seq, 1024);
    assert_eq!(ShapeBucket::new(16384, 64, "bf16", 1, false).seq, 16384);
    assert_eq!(ShapeBucket::new(16385, 64, "bf16", 1, false).seq, 32768);
}

#[test]
fn a_batch_bucket_files_paged_decode_apart_and_leaves_other_records_as_they_were() {
    let plain = ShapeBucket::new(16000, 128, "bf16", 4, true);
    assert_eq!(plain.batch, None);
    // A bucket without a batch serializes as before the field existed.
    assert!(!serde_json::to_string(&plain).unwrap().contains("batch"));
    let old: ShapeBucket =
        serde_json::from_str(r#"{"seq":16384,"head_dim":128,"dtype":"bf16","gqa":4,"causal":true}"#).unwrap();
    assert_eq!(old, plain);
    assert_eq!(plain.clone().with_batch(3).batch, Some(4));
    assert_eq!(plain.clone().with_batch(0).batch, Some(1));
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let key = tune_key(toolchain("H100", 13000), None);
    let paged = TuneKey { bucket: key.bucket.clone().with_batch(16), ..key.clone() };
    db.put_tuning(&key, &tune_record()).unwrap();
    assert!(db.tuning(&paged).unwrap().is_none());
    let mut rec = tune_record();
    rec.best = serde_json::json!({"splits": 8});
    db.put_tuning(&paged, &rec).unwrap();
    assert_eq!(db.tuning(&paged).unwrap().unwrap().best["splits"], 8);
    assert_eq!(db.tuning(&key).unwrap().unwrap().best["block_m"], 128);
}

#[test]
fn export_import_and_clear() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = Db::open(a.path()).unwrap();
    let tc = toolchain("NVIDIA H200", 580);
    src.put_tuning(&tune_key(tc.clone(), None), &tune_record()).unwrap();
    src.put_kernel(&KernelKey { toolchain: tc.clone(), kernel: "k1".into(), arch: "sm_90".into() }, &kernel_record())
        .unwrap();
    let exported = src.entries().unwrap();
    let json = serde_json::to_string(&exported).unwrap();
    let dst = Db::open(b.path()).unwrap();
    let back: Vec<Entry> = serde_json::from_str(&json).unwrap();
    assert_eq!(dst.import(&back).unwrap(), ImportReport { imported: 2, rejected: vec![] });
    assert_eq!(dst.entries().unwrap(), exported);
    assert_eq!(
        dst.tuning(&tune_key(tc, None)).unwrap().unwrap(),
        src.tuning(&tune_key(toolchain("NVIDIA H200", 580), None)).unwrap().unwrap()
    );
    // Unknown trees and values that are not records are rejected with the reason, the rest kept.
    let huge = "x".repeat(1 << 20);
    let bad = vec![
        Entry { tree: "nope".into(), key: "x".into(), value: serde_json::json!(1) },
        Entry { tree: "search".into(), key: "null".into(), value: serde_json::Value::Null },
        Entry { tree: "tuning".into(), key: "huge".into(), value: serde_json::json!({"schema": 1, "value": huge}) },
        Entry {
            tree: "search".into(),
            key: "ok".into(),
            value: serde_json::json!({"schema": 1, "value": {"pattern": null, "recall": 1.0, "density": 1.0, "created": 0}}),
        },
    ];
    let r = dst.import(&bad).unwrap();
    assert_eq!(r.imported, 1);
    let reasons: Vec<&str> = r
        .rejected
        .iter()
        .map(|(k, why)| {
            assert!(why.len() < 500, "{k}: a reason of {} bytes", why.len());
            k.as_str()
        })
        .collect();
    assert_eq!(reasons, ["nope/x", "search/null", "tuning/huge"]);
    assert!(r.rejected[0].1.contains("unknown tree `nope`"));
    assert_eq!(dst.clear().unwrap(), 3);
    assert!(dst.entries().unwrap().is_empty());
}

#[test]
fn undecodable_and_old_schema_entries_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Written past the import's checks, as damage or an older weft would leave them.
    {
        let raw = sled::open(dir.path()).unwrap();
        raw.open_tree("tuning").unwrap().insert("garbage", br#"{"schema": 1, "value": 5}"#.to_vec()).unwrap();
        raw.open_tree("search").unwrap().insert("future", br#"{"schema": 99, "value": {}}"#.to_vec()).unwrap();
        raw.flush().unwrap();
    }
    let db = Db::open(dir.path()).unwrap();
    let v = db.verify(None).unwrap();
    assert_eq!(v.corrupt.len(), 2, "{v:?}");
    assert!(v.corrupt.iter().any(|c| c.2.contains("schema 99")));
}

#[test]
fn handles_share_a_database_and_a_held_one_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let key = SearchKey { model: "m".into(), layer: 1, head: 2 };
    let rec =
        SearchRecord { pattern: serde_json::json!("p"), recall: 0.9, density: 0.1, created: 0, ..Default::default() };
    // Two handles (as two processes would have) both read and write.
    let (a, b) = (Db::open(dir.path()).unwrap(), Db::open(dir.path()).unwrap());
    a.put_search(&key, &rec).unwrap();
    assert_eq!(b.search(&key).unwrap().unwrap().recall, 0.9);
    // Something holding sled itself: refused after the timeout, naming the holder.
    let held = sled::Config::new().path(dir.path()).open().unwrap();
    let started = std::time::Instant::now();
    let e = Db::open_with_timeout(dir.path(), std::time::Duration::from_millis(300)).err().expect("held");
    let msg = e.to_string();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(msg.contains("stayed held by another process") && msg.contains("WEFT_DB_TIMEOUT"), "{msg}");
    assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
    // Released while another operation waits: that operation goes on.
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
    });
    let c = Db::open_with_timeout(dir.path(), std::time::Duration::from_secs(20)).unwrap();
    assert_eq!(c.search(&key).unwrap().unwrap().recall, 0.9);
    release.join().unwrap();
}

#[test]
fn a_bad_timeout_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Read at open: set for this process only while it opens (tests run in threads, so the
    // variable is set through a child process instead).
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["open_from_env", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("WEFT_TEST_DB", dir.path())
        .env("WEFT_DB_TIMEOUT", "soon")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WEFT_DB_TIMEOUT must be seconds"), "{text}");
}

/// The child process of the test above, not a test of its own.
#[test]
#[ignore = "helper process of a_bad_timeout_is_an_error"]
fn open_from_env() {
    let Ok(path) = std::env::var("WEFT_TEST_DB") else { return };
    match Db::open(std::path::Path::new(&path)) {
        Ok(_) => println!("opened"),
        Err(e) => println!("{e}"),
    }
}

#[test]
fn a_corrupt_database_says_how_to_reset_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path()).unwrap();
        db.put_search(
            &SearchKey { model: "m".into(), layer: 0, head: 0 },
            &SearchRecord {
                pattern: serde_json::json!(null),
                recall: 1.0,
                density: 1.0,
                created: 0,
                ..Default::default()
            },
        )
        .unwrap();
    }
    // Overwrite sled's config and data with garbage.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "holder" {
            std::fs::write(&p, vec![0xa5u8; 4096]).unwrap();
        }
    }
    let msg = Db::open(dir.path()).err().expect("garbage must not open").to_string();
    assert!(msg.contains("cannot be read") && msg.contains("weft cache clear --db"), "{msg}");
    // What the message says to do works: the damaged database goes, a fresh one opens.
    Db::destroy(dir.path()).unwrap();
    assert!(Db::open(dir.path()).unwrap().entries().unwrap().is_empty());
    // A directory with other files is never deleted.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("thesis.tex"), "x").unwrap();
    assert!(Db::destroy(other.path()).unwrap_err().to_string().contains("not deleting"));
    assert!(other.path().join("thesis.tex").exists());
}

#[test]
fn a_tuning_record_whose_default_did_not_run_reads_back() {
    // Older tuners wrote NaN for a default that did not run, which JSON stores as null; the
    // database called such records corrupt and the runtime ignored the tuned config.
    let dir = tempfile::tempdir().unwrap();
    let h200 = toolchain("NVIDIA H200", 580);
    let db = Db::open(dir.path()).unwrap();
    let record = TuneRecord { default_ms: None, ..tune_record() };
    db.put_tuning(&tune_key(h200.clone(), None), &record).unwrap();
    assert_eq!(db.tuning(&tune_key(h200.clone(), None)).unwrap().unwrap().default_ms, None);
    let old: TuneRecord =
        serde_json::from_str(r#"{"best":{},"best_ms":1.0,"default_ms":null,"timings":[],"kernel":"k","created":1}"#)
            .unwrap();
    assert_eq!(old.default_ms, None);
    assert!(db.verify(None).unwrap().corrupt.is_empty());
}

#[test]
fn damaged_data_never_hangs_and_its_errors_say_how_to_reset() {
    // (sled's recovery may drop a damaged log tail and open what is left; either way each call
    // must end, and an error must carry the advice.)
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path()).unwrap();
        for head in 0..400 {
            db.put_tuning(&tune_key(toolchain("gpu", 1), Some(head)), &tune_record()).unwrap();
        }
    }
    // Flip one byte in every 97 of sled's data file past its first 4 KiB, leaving its config
    // readable.
    let data = dir.path().join("db");
    let mut bytes = std::fs::read(&data).unwrap();
    for b in bytes.iter_mut().skip(4096).step_by(97) {
        *b ^= 0x5a;
    }
    std::fs::write(&data, bytes).unwrap();
    // Each call ends (bounded), in success or an error that says how to reset the database.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let outcome = match Db::open(&path) {
            Err(e) => Err(e.to_string()),
            Ok(db) => match db.entries() {
                Err(e) => Err(e.to_string()),
                Ok(_) => db.clear().map(|_| ()).map_err(|e| e.to_string()),
            },
        };
        let _ = tx.send(outcome);
    });
    let outcome = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("reading a damaged database must end");
    if let Err(msg) = &outcome {
        assert!(msg.contains("weft cache clear"), "{msg}");
    }
    println!("damaged database: {outcome:?}");
}

#[test]
fn cubins_are_stored_as_base64_text_and_older_number_arrays_still_read() {
    let r = kernel_record();
    let json = serde_json::to_string(&r).unwrap();
    // 256 bytes: 344 characters of base64, not the ~900 of a number array.
    assert!(json.contains("\"cubin\":\"AAECAwQF"), "{json}");
    assert!(json.len() < 600, "{} bytes", json.len());
    assert_eq!(serde_json::from_str::<KernelRecord>(&json).unwrap(), r);
    let older = serde_json::json!({
        "name": r.name, "cubin": r.cubin, "ptx": r.ptx, "options": r.options, "threads": r.threads,
        "shared_bytes": r.shared_bytes, "head_dim": r.head_dim, "created": r.created,
    });
    assert_eq!(serde_json::from_value::<KernelRecord>(older).unwrap(), r);
}
