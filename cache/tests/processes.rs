//! Many processes on one database: 8 readers load every record over and over while a writer
//! adds records one operation at a time; every reader gets every record it asks for, and the
//! database verifies clean afterwards.
//!
//! The test re-runs its own binary as the readers and the writer (`WEFT_SHARE_ROLE` set).

use std::process::{Command, Stdio};

use weft_cache::*;

const SEEDED: u32 = 64;
const WRITTEN: u32 = 200;
const READERS: usize = 8;

fn key(i: u32) -> SearchKey {
    SearchKey { model: "shared".into(), layer: i / 16, head: i % 16 }
}

fn record(i: u32) -> SearchRecord {
    SearchRecord {
        pattern: serde_json::json!({"i": i}),
        recall: 0.5,
        density: f64::from(i),
        created: 0,
        ..Default::default()
    }
}

/// The child processes of the test below, not a test of its own.
#[test]
#[ignore = "helper process of eight_readers_and_a_writer_share_one_database"]
fn role() {
    let (Ok(role), Ok(path)) = (std::env::var("WEFT_SHARE_ROLE"), std::env::var("WEFT_SHARE_DB")) else { return };
    let db = Db::open(std::path::Path::new(&path)).unwrap();
    if role == "writer" {
        for i in SEEDED..SEEDED + WRITTEN {
            db.put_search(&key(i), &record(i)).unwrap();
        }
        println!("wrote {WRITTEN}");
        return;
    }
    // A reader: every seeded record, 5 times over, each lookup its own operation, and the
    // model's whole listing in between.
    let mut reads = 0;
    for _ in 0..5 {
        for i in 0..SEEDED {
            let r = db.search(&key(i)).unwrap().unwrap_or_else(|| panic!("record {i} missing"));
            assert_eq!(r.density, f64::from(i));
            reads += 1;
        }
        assert!(db.search_results("shared").unwrap().len() >= SEEDED as usize);
    }
    println!("read {reads}");
}

#[test]
fn eight_readers_and_a_writer_share_one_database() {
    if std::env::var("WEFT_SHARE_ROLE").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path()).unwrap();
        for i in 0..SEEDED {
            db.put_search(&key(i), &record(i)).unwrap();
        }
    }
    let spawn = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args(["role", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("WEFT_SHARE_ROLE", role)
            .env("WEFT_SHARE_DB", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let writer = spawn("writer");
    let readers: Vec<_> = (0..READERS).map(|_| spawn("reader")).collect();
    for (name, child) in std::iter::once(("writer", writer)).chain(readers.into_iter().map(|c| ("reader", c))) {
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
        let want = if name == "writer" { format!("wrote {WRITTEN}") } else { format!("read {}", 5 * SEEDED) };
        assert!(stdout.contains(&want), "{name}: {stdout}");
    }
    let db = Db::open(dir.path()).unwrap();
    for i in 0..SEEDED + WRITTEN {
        assert_eq!(db.search(&key(i)).unwrap().expect("every record is there").density, f64::from(i));
    }
    let v = db.verify(None).unwrap();
    assert!(v.corrupt.is_empty(), "{:?}", v.corrupt);
    assert_eq!(v.checked, (SEEDED + WRITTEN) as usize);
}
