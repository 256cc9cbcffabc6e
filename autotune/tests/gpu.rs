//! The tuner on the GPU, end to end: a tune whose winner is verified and stored, loaded by a
//! cold process from the database (no NVRTC), eight such processes loading while a tune
//! writes, and a tuner killed with SIGKILL mid-tune that leaves a database with every
//! finished record intact.
//!
//! Child processes are this test binary re-run with an environment variable set (as in
//! `cache/tests/kill.rs`). Built with `--features gpu`; run on the GPU machine by
//! `scripts/gpu-run.sh`.
#![cfg(feature = "gpu")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use weft_autotune::tune::{tune, TuneRequest};
use weft_codegen::DType;
use weft_dsl::builder::*;
use weft_dsl::Pattern;
use weft_runtime::{AttnShape, Gpu, LayerPlan, Runtime};

fn pattern() -> Pattern {
    Pattern::new("tuned_window", causal() & window(512))
}

fn request(p: &Pattern, seq: usize) -> TuneRequest<'_> {
    TuneRequest {
        pattern: p,
        heads: 8,
        kv_heads: 4,
        seq,
        head_dim: 128,
        dtype: DType::Bf16,
        head: None,
        wgmma: Some(false),
    }
}

/// Whether this process is one of the helper processes below (the tests proper then do
/// nothing).
fn in_child() -> bool {
    std::env::var_os("WEFT_COLD_LOAD").is_some() || std::env::var_os("WEFT_TUNE_CHILD").is_some()
}

/// Re-runs this binary as `helper` with `var` set to `value`; stdout is piped.
fn child(helper: &str, var: &str, value: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([helper, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(var, value)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Child: a fresh process opens the runtime, runs one layer of the tuned pattern, and says
/// where the kernel came from and how long loading it took.
#[test]
#[ignore = "helper process of tune_then_a_cold_process_loads_the_winner"]
fn cold_loader() {
    let Some(path) = std::env::var_os("WEFT_COLD_LOAD") else { return };
    let rt = Runtime::open(Some(Path::new(&path))).unwrap();
    let (hq, hkv, n, d) = (8usize, 4usize, 2048usize, 128usize);
    let s = rt.gpu.stream();
    let q = s.clone_htod(&DType::Bf16.encode(&vec![0.01; hq * n * d])).unwrap();
    let k = s.clone_htod(&DType::Bf16.encode(&vec![0.02; hkv * n * d])).unwrap();
    let v = s.clone_htod(&DType::Bf16.encode(&vec![1.0; hkv * n * d])).unwrap();
    let mut out = s.alloc_zeros::<u16>(hq * n * d).unwrap();
    let mut lse = s.alloc_zeros::<f32>(hq * n).unwrap();
    let shape = AttnShape { hq, hkv, nq: n, nk: n, head_dim: d };
    let plan = LayerPlan::uniform(pattern(), hq);
    let reports = rt.attention_layer(&plan, shape, DType::Bf16, &q, &k, &v, &mut out, &mut lse, None).unwrap();
    s.synchronize().unwrap();
    // V is all ones, so every output is one: the loaded kernel ran.
    let o = DType::Bf16.decode(&s.clone_dtoh(&out).unwrap());
    let ones = o.iter().all(|x| (x - 1.0).abs() < 1e-2);
    for r in reports {
        println!(
            "loaded source={:?} tuned={} config={} load_ms={:.3} outputs_ok={ones}",
            r.source, r.tuned, r.config, r.load_ms
        );
    }
}

#[test]
fn tune_then_a_cold_process_loads_the_winner() {
    if in_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pattern();
    {
        let gpu = Gpu::open(0).expect("a GPU");
        let db = weft_cache::Db::open(dir.path()).unwrap();
        let r = tune(&gpu, Some(&db), &request(&p, 2048), &|_| {}).unwrap();
        println!(
            "ok   tuned {} at 2048 tokens: {} configs in {:.1} s, best {} {:.3} ms, default {:?} ms, winner error {:.2e}",
            p.name,
            r.timings.len(),
            r.seconds,
            r.best,
            r.best_ms,
            r.default_ms,
            r.verified_error
        );
        assert!(r.verified_error < DType::Bf16.reference_tolerance());
    }
    // Two cold processes: the first and a repeat (the page cache is warm for the second).
    for run in 0..2 {
        let line = loaded_from_the_database(child("cold_loader", "WEFT_COLD_LOAD", dir.path()));
        println!("ok   cold process {run}: {line}");
    }
}

/// The line a `cold_loader` process printed, checked: it ran one launch of the tuned kernel,
/// loaded from the database, with the right outputs.
fn loaded_from_the_database(mut c: std::process::Child) -> String {
    let out = BufReader::new(c.stdout.take().unwrap());
    // libtest prints "test cold_loader ... " without a newline first: take the line's tail.
    let lines: Vec<String> =
        out.lines().map_while(Result::ok).filter_map(|l| l.find("loaded ").map(|i| l[i..].to_string())).collect();
    assert!(c.wait().unwrap().success(), "the cold process failed");
    assert_eq!(lines.len(), 1, "one launch expected: {lines:?}");
    assert!(lines[0].contains("source=Database") && lines[0].contains("tuned=true"), "{}", lines[0]);
    assert!(lines[0].contains("outputs_ok=true"), "{}", lines[0]);
    lines[0].clone()
}

/// Eight processes open the runtime on one database and load a tuned kernel from it while
/// this process tunes another bucket into the same database: every process gets its kernel
/// from the database, and the database verifies clean afterwards.
#[test]
fn eight_processes_load_kernels_while_a_tune_writes() {
    if in_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pattern();
    let gpu = Gpu::open(0).expect("a GPU");
    let db = weft_cache::Db::open(dir.path()).unwrap();
    tune(&gpu, Some(&db), &request(&p, 2048), &|_| {}).unwrap();
    let children: Vec<_> = (0..8).map(|_| child("cold_loader", "WEFT_COLD_LOAD", dir.path())).collect();
    // Meanwhile: a tune of another bucket, writing its records one at a time.
    let r = tune(&gpu, Some(&db), &request(&p, 4096), &|_| {}).unwrap();
    let loaded = children.into_iter().map(loaded_from_the_database).count();
    let v = db.verify(None).unwrap();
    println!(
        "ok   8 processes loaded the tuned kernel from the database while a tune of {} configs wrote to it; {} entries verified, none corrupt",
        r.timings.len(),
        v.checked
    );
    assert_eq!(loaded, 8);
    assert!(v.corrupt.is_empty(), "{:?}", v.corrupt);
}

/// Child: tunes one bucket after another, saying after each that its records are stored.
#[test]
#[ignore = "helper process of sigkill_mid_tune_keeps_every_finished_record"]
fn tuner() {
    let Some(path) = std::env::var_os("WEFT_TUNE_CHILD") else { return };
    let gpu = Gpu::open(0).unwrap();
    let db = weft_cache::Db::open(Path::new(&path)).unwrap();
    let p = pattern();
    for seq in [1024usize, 2048, 4096, 8192, 16384] {
        tune(&gpu, Some(&db), &request(&p, seq), &|_| {}).unwrap();
        println!("stored {seq}");
    }
}

#[test]
fn sigkill_mid_tune_keeps_every_finished_record() {
    if in_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = child("tuner", "WEFT_TUNE_CHILD", dir.path());
    let out = BufReader::new(c.stdout.take().unwrap());
    let mut finished = Vec::new();
    for line in out.lines().map_while(Result::ok) {
        // libtest prints "test tuner ... " without a newline first: look inside the line.
        if let Some(seq) = line.find("stored ").map(|i| &line[i + "stored ".len()..]) {
            finished.push(seq.parse::<usize>().unwrap());
            if finished.len() == 2 {
                // The third bucket is being compiled and timed: kill it in the middle.
                std::thread::sleep(std::time::Duration::from_millis(1500));
                c.kill().unwrap();
                break;
            }
        }
    }
    c.wait().unwrap();
    assert_eq!(finished, [1024, 2048], "the tuner stopped early");
    let db = weft_cache::Db::open(dir.path()).expect("the database opens after a SIGKILL");
    let v = db.verify(None).unwrap();
    assert!(v.corrupt.is_empty(), "corrupt entries: {:?}", v.corrupt);
    let gpu = Gpu::open(0).unwrap();
    let tc = gpu.toolchain().unwrap();
    let p = pattern();
    for seq in &finished {
        let key = weft_runtime::tune_key(tc.clone(), &p, None, *seq, 128, DType::Bf16, 2);
        let record = db.tuning(&key).unwrap().unwrap_or_else(|| panic!("the tuning record of {seq} is missing"));
        let kernel =
            weft_cache::KernelKey { toolchain: tc.clone(), kernel: record.kernel.clone(), arch: gpu.arch.name() };
        assert!(db.kernel(&kernel).unwrap().is_some(), "the winner's kernel of {seq} is missing");
    }
    println!(
        "ok   SIGKILL during the third tune: the database opens, {} entries verified, none corrupt, both finished buckets' tuning records and kernels present",
        v.checked
    );
}

/// Pattern search: recall computed by generated kernels on the GPU agrees with the CPU path on
/// every head and candidate (same bf16 inputs, same sampled rows, same indexes).
#[test]
fn search_recall_on_the_gpu_agrees_with_the_cpu() {
    use weft_autotune::search::{candidates, evaluate_layer_on, sample_rows, Backend};
    use weft_patterns::synthetic::{planted_qk, Plant};
    if in_child() {
        return;
    }
    let gpu = Gpu::open(0).expect("a GPU");
    for (n, d, causal) in [(2500usize, 128usize, true), (1100, 64, false)] {
        let plants = vec![
            Plant::Vertical(vec![5, n / 3, n - 7]),
            Plant::Slashes(vec![100]),
            Plant::Grid { stride: 32, phase: 3 },
            Plant::Blocks { size: 64 },
            Plant::Dense,
            Plant::Diagonal(40),
        ];
        let (mut q, mut k) = planted_qk(&plants, n, d, 8.0, n as u64);
        for t in [&mut q, &mut k] {
            t.data = DType::Bf16.decode(&DType::Bf16.encode(&t.data));
        }
        let cands = candidates(n, causal);
        let rows = sample_rows(n);
        let cpu = evaluate_layer_on(Backend::Cpu, 0, &q, &k, &cands, causal, &rows, &|| {}).unwrap();
        let on_gpu = evaluate_layer_on(Backend::Gpu(&gpu), 0, &q, &k, &cands, causal, &rows, &|| {}).unwrap();
        let (mut recall, mut density, mut pairs) = (0f64, 0f64, 0usize);
        for (g, c) in on_gpu.iter().zip(&cpu) {
            for (gs, cs) in g.scores.iter().zip(&c.scores) {
                recall = recall.max((gs.recall - cs.recall).abs());
                density = density.max((gs.density - cs.density).abs());
                pairs += 1;
            }
        }
        let ok = recall < 2e-3 && density < 1e-12 && pairs == plants.len() * cands.len();
        println!(
            "{} search recall GPU vs CPU, n={n} d={d} causal={causal}: {pairs} (head, candidate) scores, max |recall diff| {recall:.2e}, max |density diff| {density:.1e}",
            if ok { "ok  " } else { "FAIL" }
        );
        assert!(ok);
    }
}

/// Decode: the split count of a retrieval pattern is tuned, the winner verified and stored.
#[test]
fn decode_split_count_is_tuned_verified_and_stored() {
    use weft_autotune::decode::{tune_decode, DecodeTuneRequest, SPLITS};
    if in_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gpu = Gpu::open(0).expect("a GPU");
    let db = weft_cache::Db::open(dir.path()).unwrap();
    let p = Pattern::new("quest", retrieval().budget(top_k(64)) | window(256));
    let mut bf16_best = None;
    for (keys, dtype, d) in [(32768usize, DType::Bf16, 128u32), (5000, DType::F16, 64)] {
        let req = DecodeTuneRequest { pattern: &p, heads: 32, kv_heads: 8, keys, head_dim: d, dtype };
        let r = tune_decode(&gpu, Some(&db), &req, &|_| {}).unwrap();
        let times: Vec<String> =
            r.timings.iter().map(|(s, t)| format!("{s}:{}", t.map_or("-".into(), |t| format!("{t:.4}")))).collect();
        println!(
            "ok   decode tune {} keys={keys} {} d={d}: best splits {} {:.4} ms (auto {:?} ms), error {:.2e}, {:.1} s; {}",
            p.name,
            dtype.name(),
            r.best_splits,
            r.best_ms,
            r.auto_ms,
            r.verified_error,
            r.seconds,
            times.join(" ")
        );
        assert_eq!(r.timings.len(), SPLITS.len());
        assert!(r.verified_error < dtype.reference_tolerance());
        let key = weft_runtime::tune_key(gpu.toolchain().unwrap(), &p, None, keys, d, dtype, 4);
        let rec = db.tuning(&key).unwrap().expect("the decode tuning record is stored");
        assert_eq!(rec.best["splits"].as_u64(), Some(r.best_splits as u64));
        bf16_best.get_or_insert(r.best_splits);
    }
    // The runtime reads it back (0 means the automatic choice won).
    drop(db);
    drop(gpu);
    let rt = Runtime::open(Some(dir.path())).unwrap();
    let r = rt.decode_splits(&p, 32768, 128, DType::Bf16, 4);
    println!("ok   the runtime reads the tuned split count back: {r}");
    assert_eq!(Some(r), bf16_best);
}

#[test]
fn paged_decode_split_count_is_tuned_verified_and_stored() {
    use weft_autotune::decode::SPLITS;
    use weft_autotune::paged::{tune_paged, PagedTuneRequest};
    use weft_runtime::PagedShape;
    if in_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gpu = Gpu::open(0).expect("a GPU");
    let db = weft_cache::Db::open(dir.path()).unwrap();
    let quest =
        weft_dsl::parse_pattern_str("quest", "retrieval(unit = page(16), keep = top_k(40), sink = 4, recent = 64)")
            .unwrap();
    let dense = Pattern::new("dense", full());
    let mut bests = Vec::new();
    for (p, batch, keys) in [(&quest, 4usize, 20000usize), (&dense, 3, 5000)] {
        let req = PagedTuneRequest {
            pattern: p,
            batch,
            heads: 32,
            kv_heads: 8,
            keys,
            head_dim: 128,
            dtype: DType::Bf16,
            page_size: 16,
        };
        let r = tune_paged(&gpu, Some(&db), &req, &|_| {}).unwrap();
        let times: Vec<String> =
            r.timings.iter().map(|(s, t)| format!("{s}:{}", t.map_or("-".into(), |t| format!("{t:.4}")))).collect();
        println!(
            "ok   paged decode tune {} batch={batch} keys={keys}: best splits {} {:.4} ms (auto {:?} ms), error {:.2e}, {:.1} s; {}",
            p.name,
            r.best_splits,
            r.best_ms,
            r.auto_ms,
            r.verified_error,
            r.seconds,
            times.join(" ")
        );
        assert_eq!(r.timings.len(), SPLITS.len());
        assert!(r.verified_error < DType::Bf16.reference_tolerance());
        let key = weft_runtime::paged_tune_key(gpu.toolchain().unwrap(), p, batch, keys, 128, DType::Bf16, 4);
        let rec = db.tuning(&key).unwrap().expect("the paged tuning record is stored");
        assert_eq!(rec.best["splits"].as_u64(), Some(r.best_splits as u64));
        bests.push(r.best_splits);
    }
    // The runtime finds them for caches of those shapes (0 means the automatic choice won).
    drop(db);
    drop(gpu);
    let rt = Runtime::open(Some(dir.path())).unwrap();
    let weft_dsl::PatternExpr::Retrieval(r) = &quest.expr else { panic!("a retrieval pattern") };
    for (retrieval, batch, keys, best) in [(Some(r), 4usize, 20000usize, bests[0]), (None, 3, 5000, bests[1])] {
        let shape = PagedShape {
            batch,
            hq: 32,
            hkv: 8,
            head_dim: 128,
            page_size: 16,
            max_pages: keys.div_ceil(16),
            dtype: DType::Bf16,
        };
        let mut cache = rt.paged_cache(shape).unwrap();
        let s = rt.gpu.stream();
        let kv = s.alloc_zeros::<u16>(8 * keys * 128).unwrap();
        for b in 0..batch {
            cache.fill(&rt.gpu, b, &kv, &kv, keys).unwrap();
        }
        let got = rt.paged_splits(&mut cache, retrieval);
        println!("ok   the runtime reads the tuned paged split count back: {got}");
        assert_eq!(got, best);
        // The second step's answer comes from the cache's memo: the same.
        assert_eq!(rt.paged_splits(&mut cache, retrieval), best);
    }
}
