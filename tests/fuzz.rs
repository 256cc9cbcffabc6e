//! Fuzzing in CI, bounded by case counts (about 20 s on 2 cores): pattern text, pattern files,
//! safetensors Q/K files and kernel-database records, random and mutated from valid ones, must
//! each end in a value or an error: no panic, no stack overflow, no allocation the input size
//! does not bound.

use proptest::prelude::*;
use weft::cache::{Db, Entry};
use weft::dsl::{parse_pattern_file, parse_pattern_str};

/// Pieces of pattern text: valid tokens in random order make deeper cases than random bytes.
fn text() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "causal",
        "(",
        ")",
        "&",
        "|",
        "!",
        "sink(",
        "local(",
        "window(",
        "block(",
        "keep",
        "=",
        "top_k(",
        "top_p(",
        "threshold(",
        "vertical_vector(",
        "vertical_slash(",
        "grid(",
        "stride",
        "q",
        "k",
        "h",
        "nq",
        "nk",
        "*",
        "/",
        "%",
        "+",
        "-",
        "<",
        "<=",
        "==",
        ",",
        "0",
        "1",
        "64",
        "-1",
        "1.5",
        "2147483647",
        "9223372036854775807",
        "18446744073709551616",
        "permuted(",
        "ring(",
        "retrieval(",
        "min(",
        "max(",
        "\u{0}",
        "é",
        " ",
    ]);
    prop_oneof![prop::collection::vec(token, 0..60).prop_map(|t| t.concat()), ".{0,200}"]
}

/// Bytes of a valid Q/K safetensors file (two tiny layers), for mutation.
fn valid_qk() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qk.safetensors");
    let layers: Vec<_> = (0..2)
        .map(|l| {
            let t = |h: usize, s: u64| weft::patterns::Tensor::random(h, 40, 8, s);
            (t(2, l), t(1, 10 + l))
        })
        .collect();
    weft::qk::save_layers(&path, &layers).unwrap();
    std::fs::read(&path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pattern_text_parses_or_errs(src in text()) {
        let _ = parse_pattern_str("fuzz", &src);
    }

    #[test]
    fn pattern_files_parse_or_err(body in text(), json in any::<bool>()) {
        let file = if json {
            format!("{{\"name\": \"x\", \"text\": {:?}, \"ir\": {}}}", body, body)
        } else {
            format!("name = \"x\"\ntext = {:?}\n{}", body, body)
        };
        let _ = parse_pattern_file(if json { "f.json" } else { "f.toml" }, &file, "x");
        let _ = parse_pattern_file("f.json", &body, "x");
        let _ = parse_pattern_file("f.toml", &body, "x");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A valid file with bytes overwritten, its header length changed, or cut short.
    #[test]
    fn mutated_qk_files_load_or_err(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            header_len in prop::option::of(any::<u64>()), cut in prop::option::of(any::<prop::sample::Index>())) {
        let mut bytes = valid_qk();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(n) = header_len {
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(layers) = weft::qk::layers(&path) {
            for l in layers {
                let _ = weft::qk::load(&path, l);
            }
        }
    }

    /// Random header text behind a correct length prefix.
    #[test]
    fn random_qk_headers_load_or_err(header in ".{0,300}") {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let _ = weft::qk::layers(&path);
        let _ = weft::qk::load(&path, None);
    }
}

/// Database records of any shape, as an import would bring them.
fn record() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|x| serde_json::json!(x)),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "schema", "value", "pattern", "recall", "density", "created", "best", "kernel", "cubin"
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn database_records_of_any_shape_are_listed_verified_and_read(
            records in prop::collection::vec((prop::sample::select(vec!["kernels", "tuning", "search"]), ".{0,30}", record()), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let entries: Vec<Entry> =
            records.into_iter().map(|(tree, key, value)| Entry { tree: tree.to_string(), key, value }).collect();
        let _ = db.import(&entries);
        let _ = db.entries();
        let _ = db.verify(None);
        for e in &entries {
            let _ = db.search_results(&e.key);
        }
        let _ = db.clear();
    }
}
