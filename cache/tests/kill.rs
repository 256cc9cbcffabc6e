//! A writer killed with SIGKILL mid-stream leaves a database that opens with every record it
//! finished (each write is flushed before it returns).
//!
//! The test re-runs its own binary as the writer (`WEFT_KILL_WRITER` set), which prints the
//! index of each record after `put` returns; the parent kills it after a while and checks that
//! every printed record is there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use weft_cache::*;

fn key(i: u32) -> SearchKey {
    SearchKey { model: "killed".into(), layer: i / 32, head: i % 32 }
}

/// The child process of the test below, not a test of its own.
#[test]
#[ignore = "helper process of sigkill_mid_write_keeps_every_finished_record"]
fn writer() {
    let Ok(path) = std::env::var("WEFT_KILL_WRITER") else { return };
    let db = Db::open(std::path::Path::new(&path)).unwrap();
    for i in 0.. {
        let rec = SearchRecord {
            pattern: serde_json::json!({"i": i}),
            recall: 0.5,
            density: 0.5,
            created: u64::from(i),
            ..Default::default()
        };
        db.put_search(&key(i), &rec).unwrap();
        println!("done {i}");
    }
}

#[test]
fn sigkill_mid_write_keeps_every_finished_record() {
    if std::env::var("WEFT_KILL_WRITER").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["writer", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("WEFT_KILL_WRITER", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut finished = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(i) = line.strip_prefix("done ") {
            finished.push(i.parse::<u32>().unwrap());
            if finished.len() == 200 {
                // SIGKILL: no destructor, no final flush.
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    assert_eq!(finished.len(), 200, "the writer stopped early");
    let db = Db::open(dir.path()).expect("the database opens after a SIGKILL");
    for i in &finished {
        assert!(db.search(&key(*i)).unwrap().is_some(), "record {i} was finished but is missing");
    }
    let v = db.verify(None).unwrap();
    assert!(v.corrupt.is_empty(), "{:?}", v.corrupt);
    assert!(v.checked >= finished.len());
}
