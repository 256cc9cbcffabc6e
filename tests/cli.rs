//! The `weft` command: output a person can read, JSON a program can read, and errors (never
//! panics) on bad input.

use assert_cmd::Command;
use predicates::prelude::*;

fn weft() -> Command {
    Command::cargo_bin("weft").unwrap()
}

fn no_panic() -> impl Predicate<str> {
    predicate::str::contains("panicked").not().and(predicate::str::contains("RUST_BACKTRACE").not())
}

#[test]
fn help_lists_the_commands() {
    weft().arg("--help").assert().success().stdout(
        predicate::str::contains("patterns")
            .and(predicate::str::contains("explain"))
            .and(predicate::str::contains("quickstart")),
    );
}

#[test]
fn patterns_lists_families_and_defaults() {
    let out = weft().arg("patterns").assert().success().get_output().stdout.clone();
    let text = String::from_utf8(out).unwrap();
    for family in ["block", "vertical_vector", "vertical_slash", "grid", "permuted", "ring", "retrieval", "causal"] {
        assert!(text.contains(family), "missing {family}");
    }
    assert!(text.contains("q_block      default 64"), "{text}");
}

#[test]
fn explain_json_reports_exact_density() {
    let out = weft()
        .args(["explain", "causal", "--seq", "100", "--heads", "2", "--kv-heads", "1", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let density = v["density"].as_f64().unwrap();
    assert!((density - 5050.0 / 10000.0).abs() < 1e-12, "{density}");
    assert_eq!(v["valid"], true);
    assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    assert!((v["recall_mean"].as_f64().unwrap() - 1.0).abs() < 1e-9, "causal keeps all causal mass");
}

#[test]
fn explain_reads_files_builtins_and_text() {
    weft().args(["explain", "examples/patterns/video.toml", "--seq", "300", "--heads", "1"]).assert().success().stdout(
        predicate::str::contains("hash")
            .and(predicate::str::contains("density"))
            .and(predicate::str::contains("recall")),
    );
    weft().args(["explain", "vertical-slash", "--seq", "200", "--heads", "2"]).assert().success();
    // A grid's row lines: each head's estimated phase, since the masks name block offsets.
    weft().args(["explain", "grid(stride = 100)", "--seq", "300", "--heads", "2"]).assert().success().stdout(
        predicate::str::contains("row lines q % stride == phase, phase estimated per head: ")
            .and(predicate::str::contains(" of 100")),
    );
    weft()
        .args(["explain", "retrieval", "--seq", "500", "--heads", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 queries x 500 keys"));
    weft().args(["explain", "(q / 64 == k / 64) | sink(4)", "--seq", "130", "--heads", "1"]).assert().success();
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    weft().args(["explain", "vertical_vector(q_block = 96)"]).assert().failure().stderr(
        predicate::str::contains("must be 64 or 128, got 96")
            .and(predicate::str::contains("<pattern>:1:27"))
            .and(no_panic()),
    );
    weft()
        .args(["explain", "no-such-pattern"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("neither a pattern file").and(no_panic()));
    weft()
        .args(["explain", "causal", "--heads", "3", "--kv-heads", "2"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("must divide").and(no_panic()));
    weft()
        .args(["explain", "causal", "--qk", "/nonexistent.safetensors"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("cannot read /nonexistent.safetensors").and(no_panic()));
    weft()
        .args(["mask", "causal", "--seq", "100"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nothing to write"));
    weft()
        .args(["mask", "causal", "--seq", "10000", "--heads", "1", "--npy", "x.npy"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("limited to 8192"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "pattern = \"grid(stride = 0)\"\n").unwrap();
    weft()
        .args(["explain", bad.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicate::str::contains("stride").and(predicate::str::contains("bad.toml")).and(no_panic()));
    std::fs::write(&bad, [0xffu8, 0xfe, 0x00]).unwrap();
    weft().args(["explain", bad.to_str().unwrap()]).assert().failure().stderr(no_panic());
}

#[test]
fn mask_writes_a_png_and_an_npy() {
    let dir = tempfile::tempdir().unwrap();
    let (png_path, npy_path) = (dir.path().join("m.png"), dir.path().join("m.npy"));
    weft()
        .args(["mask", "causal & window(40)", "--seq", "200", "--heads", "2", "--head", "1", "--px", "128"])
        .arg("--png")
        .arg(&png_path)
        .arg("--npy")
        .arg(&npy_path)
        .assert()
        .success();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let reader = decoder.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (128, 128));
    let bytes = std::fs::read(&npy_path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'shape': (200, 200)") && header.contains("|b1"), "{header}");
    let ones = bytes[10 + header_len..].iter().filter(|b| **b == 1).count();
    // window(40) under causal: row t keeps min(t + 1, 40) keys.
    let want: usize = (0..200).map(|t: usize| (t + 1).min(40)).sum();
    assert_eq!(ones, want);
}

#[test]
fn real_qk_from_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qk.safetensors");
    let q = weft::patterns::Tensor::random(4, 96, 16, 1);
    let k = weft::patterns::Tensor::random(2, 96, 16, 2);
    weft::qk::save(&path, &q, &k).unwrap();
    weft()
        .args(["explain", "causal & block(block_q = 32, block_k = 32, keep = top_k(2))", "--qk"])
        .arg(&path)
        .assert()
        .success()
        .stdout(predicate::str::contains("q [4, 96, 16], k [2, 96, 16]"));
    let (q2, k2) = weft::qk::load(&path, None).unwrap();
    assert_eq!((q2, k2), (q, k));
    let err = weft::qk::load(&path, Some(3)).unwrap_err().to_string();
    assert!(err.contains("no tensor `layers.3.q`"), "{err}");
    let mut bad = weft::patterns::Tensor::random(1, 4, 2, 1);
    bad.data[3] = f32::NAN;
    weft::qk::save(&path, &bad, &bad).unwrap();
    let err = weft::qk::load(&path, None).unwrap_err().to_string();
    assert!(err.contains("tensor `q`") && err.contains("NaN"), "{err}");
    // Layer numbers past the limit (or past u64) are refused, not truncated or allocated for.
    let t = weft::patterns::Tensor::random(1, 8, 4, 3);
    let raw: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    for layer in ["18446744073709551615", "99999999999999999999999", "65536"] {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 8, 4], &raw).unwrap();
        let names = [format!("layers.{layer}.q"), format!("layers.{layer}.k")];
        let file = dir.path().join(format!("layer-{layer}.safetensors"));
        safetensors::serialize_to_file(names.iter().map(|n| (n.clone(), view.clone())), &None, &file).unwrap();
        weft()
            .args(["search", "--no-db", "--png"])
            .arg(dir.path().join("heads.png"))
            .arg("--qk")
            .arg(&file)
            .assert()
            .failure()
            .stderr(predicate::str::contains("layer numbers are integers from 0 to 65535").and(no_panic()));
    }
}

#[test]
fn quickstart_runs_and_says_what_needs_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    weft().arg("quickstart").arg("--out").arg(dir.path()).assert().success().stdout(
        predicate::str::contains("identical").and(
            // On the GPU the kernel runs and matches the reference; without one, the step says why.
            predicate::str::contains("relative L2 error against the reference")
                .or(predicate::str::contains("6. The kernel on the GPU").and(predicate::str::contains("not run:"))),
        ),
    );
    assert!(dir.path().join("video_head0.png").exists());
}

#[test]
fn emit_prints_deterministic_cuda_with_a_header() {
    let run = || {
        let out = weft().args(["emit", "vertical-vector", "--head-dim", "64", "--dtype", "fp16"]).assert().success();
        String::from_utf8(out.get_output().stdout.clone()).unwrap()
    };
    let src = run();
    assert!(src.starts_with("// Generated by weft-codegen"), "{}", &src[..200]);
    assert!(src.contains("// pattern  vertical-vector = vertical_vector(") && src.contains("dtype=fp16"));
    // fp16: the config selects the f16 tensor-core instructions of the prelude.
    assert!(src.contains("#define WEFT_F16 1") && src.contains("#define WEFT_MMA_TYPE \"f16\""));
    assert_eq!(src, run());
    weft()
        .args(["emit", "retrieval"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("decode kernel").and(no_panic()));
    weft()
        .args(["emit", "causal", "--head-dim", "96"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("head_dim must be 64, 128 or 256"));
}

#[test]
fn compile_reports_registers_and_spills() {
    // scripts/test.sh puts the pinned NVRTC on the loader path.
    weft().args(["compile", "causal & window(512)", "--arch", "sm_80", "--head-dim", "64"]).assert().success().stdout(
        predicate::str::contains("registers").and(predicate::str::contains("spills        0 bytes stored, 0 loaded")),
    );
    weft()
        .args(["compile", "causal", "--arch", "sm_70"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sm_80 or later"));
    // The Hopper path: sm_90a, and a clear error elsewhere or for tiles it does not take.
    weft().args(["compile", "causal", "--arch", "sm_90", "--wgmma"]).assert().success().stdout(
        predicate::str::contains("sm_90").and(predicate::str::contains("spills        0 bytes stored, 0 loaded")),
    );
    weft()
        .args(["compile", "causal", "--arch", "sm_80", "--wgmma"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sm_90 GPUs (H100, H200) only").and(no_panic()));
    weft()
        .args(["emit", "causal", "--wgmma", "--block-m", "32"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("the wgmma path takes").and(no_panic()));
}

#[test]
fn cache_commands_round_trip_and_report_problems() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let db_s = db.to_str().unwrap();
    weft().args(["cache", "ls", "--db", db_s]).assert().success().stdout(predicate::str::contains("0 entries"));
    // Import an export made by the library.
    {
        let d = weft::cache::Db::open(&db).unwrap();
        let key = weft::cache::SearchKey { model: "tiny".into(), layer: 1, head: 2 };
        let rec = weft::cache::SearchRecord {
            pattern: serde_json::json!({"name": "p"}),
            recall: 0.97,
            density: 0.12,
            created: 0,
            ..Default::default()
        };
        d.put_search(&key, &rec).unwrap();
    }
    let export = dir.path().join("export.json");
    weft().args(["cache", "export", "--json", "--db", db_s]).arg(&export).assert().success();
    weft().args(["cache", "ls", "--db", db_s]).assert().success().stdout(predicate::str::contains("recall 0.97"));
    weft()
        .args(["cache", "show", "l00001", "--db", db_s])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"density\": 0.12"));
    weft()
        .args(["cache", "show", "nothing-like-this", "--db", db_s])
        .assert()
        .failure()
        .stderr(predicate::str::contains("no entry"));
    weft()
        .args(["cache", "verify", "--db", db_s])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 entries checked"));
    weft()
        .args(["cache", "clear", "--db", db_s])
        .assert()
        .success()
        .stdout(predicate::str::contains("removed 1 entries"));
    weft()
        .args(["cache", "import", "--db", db_s])
        .arg(&export)
        .assert()
        .success()
        .stdout(predicate::str::contains("imported 1"));
    // Held past the timeout by another process (this test, through sled itself): refused,
    // naming the holder; a database handle of this process does not hold it.
    {
        let _handle = weft::cache::Db::open(&db).unwrap();
        weft().args(["cache", "ls", "--db", db_s]).assert().success().stdout(predicate::str::contains("1 entries"));
        let _held = sled::Config::new().path(&db).open().unwrap();
        weft().args(["cache", "ls", "--db", db_s]).env("WEFT_DB_TIMEOUT", "0.5").assert().failure().stderr(
            predicate::str::contains("stayed held by another process")
                .and(predicate::str::contains("pid"))
                .and(predicate::str::contains("WEFT_DB_TIMEOUT"))
                .and(no_panic()),
        );
    }
    // Corrupt: unreadable files; clear deletes the database as the message says.
    for f in std::fs::read_dir(&db).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "holder" {
            std::fs::write(&p, vec![0xa5u8; 4096]).unwrap();
        }
    }
    weft().args(["cache", "ls", "--db", db_s]).assert().failure().stderr(
        predicate::str::contains("cannot be read").and(predicate::str::contains("weft cache clear")).and(no_panic()),
    );
    weft()
        .args(["cache", "clear", "--db", db_s])
        .assert()
        .success()
        .stdout(predicate::str::contains("deleted the unreadable database"));
    weft().args(["cache", "ls", "--db", db_s]).assert().success();
    // WEFT_DB is the default location.
    weft().args(["cache", "ls"]).env("WEFT_DB", db_s).assert().success().stdout(predicate::str::contains(db_s));
}

#[test]
fn oversized_requests_are_refused_not_attempted() {
    weft()
        .args(["explain", "retrieval", "--seq", "100000000000"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--seq").and(no_panic()));
    weft()
        .args(["mask", "causal", "--seq", "64", "--px", "1000000000", "--png", "x.png"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--px"));
    weft()
        .args(["emit", "causal", "--seq", "100000000000"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("--seq"));
    weft()
        .args(["explain", "causal", "--seq", "300", "--block-m", "1099511627776"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("block sizes must be between").and(no_panic()));
    // Indexes past the tile bound are refused before they are built.
    weft()
        .args(["emit", "full", "--seq", "4194304"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("block pairs").and(no_panic()));
    weft()
        .args(["explain", "causal", "--seq", "65536", "--heads", "1", "--block-m", "1", "--block-n", "1"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("block pairs").and(no_panic()));
    // Synthetic inputs past the memory limit are refused with the estimate.
    for (flag, value) in [("--head-dim", "100000000"), ("--heads", "1000000")] {
        weft()
            .args(["explain", "causal", "--seq", "64", flag, value])
            .assert()
            .failure()
            .stderr(predicate::str::contains("GiB").and(no_panic()));
    }
    // A Q/K file passes the same bounds as synthetic input.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.safetensors");
    let q = weft::patterns::Tensor::random(1, 300_000, 1, 1);
    weft::qk::save(&path, &q, &q).unwrap();
    weft()
        .args(["explain", "causal", "--qk"])
        .arg(&path)
        .assert()
        .failure()
        .stderr(predicate::str::contains("too large for the CPU reference").and(no_panic()));
}

#[test]
fn search_picks_patterns_per_head_and_stores_them() {
    use weft::patterns::synthetic::{planted_qk, Plant};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny-model.safetensors");
    let plants = [Plant::Vertical(vec![5, 300, 301]), Plant::Blocks { size: 64 }, Plant::Dense];
    let layers: Vec<_> = (0..2).map(|l| planted_qk(&plants, 600, 32, 16.0, l)).collect();
    weft::qk::save_layers(&file, &layers).unwrap();
    let (json, png, db) = (dir.path().join("choice.json"), dir.path().join("map.png"), dir.path().join("db"));
    weft()
        .args(["search", "--target-recall", "0.9", "--qk"])
        .arg(&file)
        .arg("--json")
        .arg(&json)
        .arg("--png")
        .arg(&png)
        .arg("--db")
        .arg(&db)
        .assert()
        .success()
        .stdout(
            predicate::str::contains("6 heads in 2 layers")
                .and(predicate::str::contains("stored 6 choices for model `tiny-model`")),
        );
    let chosen: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(chosen.len(), 6);
    assert_eq!(chosen[0]["family"], "vertical_vector");
    assert_ne!(chosen[1]["family"], "dense", "the planted blocks are sparse");
    assert_eq!(chosen[2]["family"], "dense");
    assert!(png.exists());
    let stored = weft::cache::Db::open(&db).unwrap().entries().unwrap();
    assert_eq!(stored.iter().filter(|e| e.tree == "search").count(), 6);
    // The budget mode respects its budget.
    weft()
        .args(["search", "--budget", "0.7", "--no-db", "--qk"])
        .arg(&file)
        .assert()
        .success()
        .stdout(predicate::str::contains("mean density budget 0.7"));
    // Short sequences: the sink and local band alone exceed a tiny budget.
    weft()
        .args(["search", "--budget", "0.05", "--no-db", "--qk"])
        .arg(&file)
        .assert()
        .failure()
        .stderr(predicate::str::contains("raise --budget").and(no_panic()));
    // Bad files and values are errors.
    weft().args(["search", "--qk", "/nonexistent.safetensors", "--no-db"]).assert().failure().stderr(no_panic());
    weft()
        .args(["search", "--budget", "2", "--no-db", "--qk"])
        .arg(&file)
        .assert()
        .failure()
        .stderr(predicate::str::contains("--budget"));
}

#[test]
fn autotune_without_a_gpu_says_what_to_do() {
    // CI has no GPU: the command must explain, not panic. (On a GPU machine it tunes.)
    if weft::runtime::Gpu::open(0).is_ok() {
        return;
    }
    weft()
        .args(["autotune", "causal", "--seq", "1000", "--no-db"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("autotune times kernels on an NVIDIA GPU").and(no_panic()));
    // Retrieval patterns tune the decode kernel's split count: also a GPU job.
    weft()
        .args(["autotune", "retrieval", "--no-db"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("autotune times kernels on an NVIDIA GPU").and(no_panic()));
}

#[cfg(unix)]
#[test]
fn closed_pipes_and_full_disks_end_without_a_panic() {
    use std::io::Read;
    use std::process::{Command as Std, Stdio};
    let bin = assert_cmd::cargo::cargo_bin("weft");
    // A reader that stops early (`| head -c 1`): a quiet end, by SIGPIPE or success.
    let mut child =
        Std::new(&bin).args(["emit", "vertical-vector"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "a closed pipe printed: {stderr}");
    // A full disk: an error that says so.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Std::new(&bin).arg("patterns").stdout(full).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot write the output"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_wrong_library_under_the_cuda_names_is_an_error_not_a_crash() {
    // Another library (libm) copied under the names cudarc loads.
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(libm) = libm else {
        println!("skipped: no libm.so.6 at the usual paths to stand in for a wrong library");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["libnvrtc.so", "libnvrtc.so.13", "libcuda.so", "libcuda.so.1"] {
        std::fs::copy(libm, dir.path().join(name)).unwrap();
    }
    weft()
        .env("LD_LIBRARY_PATH", dir.path())
        .args(["compile", "causal", "--arch", "sm_90"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("has no nvrtcVersion: it is not NVRTC").and(no_panic()));
    weft()
        .env("LD_LIBRARY_PATH", dir.path())
        .args(["autotune", "causal", "--no-db"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("it is not the NVIDIA driver's library").and(no_panic()));
}

/// Each bad input says what it is and what to do.
#[test]
fn bad_inputs_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fails = |args: &[&str], what: &str| {
        weft().args(args).current_dir(d).assert().failure().stderr(predicate::str::contains(what).and(no_panic()));
    };
    // Paths given as patterns: a directory, a missing file, a symlink loop, a FIFO.
    std::fs::create_dir(d.join("dir")).unwrap();
    fails(&["explain", "./dir"], "is a directory, not a pattern file");
    fails(&["explain", "missing.toml"], "pattern file `missing.toml` does not exist");
    std::os::unix::fs::symlink(d.join("l1"), d.join("l2")).unwrap();
    std::os::unix::fs::symlink(d.join("l2"), d.join("l1")).unwrap();
    fails(&["explain", "./l1"], "cannot read pattern file `./l1`");
    let fifo = d.join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    fails(&["explain", "./fifo"], "not a regular file");
    // A file named like a built-in: the built-in wins; written as a path, the file is read.
    std::fs::write(d.join("causal"), "name = \"mine\"\npattern = \"full\"\n").unwrap();
    weft()
        .args(["explain", "causal"])
        .current_dir(d)
        .assert()
        .success()
        .stdout(predicate::str::contains("pattern   causal"));
    weft().args(["explain", "./causal"]).current_dir(d).assert().success().stdout(predicate::str::contains("mine"));
    // Budgets.
    fails(&["explain", "block(keep = top_k(1.5))"], "n must be a positive integer");
    fails(&["explain", "block(keep = top_k(-1))"], "n must be a positive integer, got -1");
    // --db naming a file.
    std::fs::write(d.join("afile"), "x").unwrap();
    fails(&["cache", "ls", "--db", "afile"], "is a file, not a kernel database");
    // Safetensors files that are not.
    std::fs::write(d.join("short.safetensors"), "{}").unwrap();
    fails(&["search", "--qk", "short.safetensors", "--no-db"], "shorter than the 8-byte header length");
    let mut header = 7u64.to_le_bytes().to_vec();
    header.extend_from_slice(b"{\"a\": 1");
    std::fs::write(d.join("json.safetensors"), header).unwrap();
    fails(&["search", "--qk", "json.safetensors", "--no-db"], "header is not the JSON safetensors expects");
    // An import of values that are not records: counted and refused, each with its reason.
    std::fs::write(
        d.join("import.json"),
        r#"[{"tree": "search", "key": "a", "value": null}, {"tree": "search", "key": "b", "value": "text"},
            {"tree": "nope", "key": "c", "value": 1}]"#,
    )
    .unwrap();
    weft()
        .args(["cache", "import", "--db", "db", "import.json"])
        .current_dir(d)
        .assert()
        .failure()
        .stdout(predicate::str::contains("imported 0 entries").and(predicate::str::contains("rejected 3")));
}
