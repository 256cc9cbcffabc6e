//! # weft-cache: the kernel database
//!
//! One sled database with three trees:
//!
//! - `kernels`: compiled kernels (CUBIN and PTX, the source's kernel key, NVRTC options),
//!   keyed by toolchain + kernel key + architecture;
//! - `tuning`: autotuning records (best config, every timing, date), keyed by toolchain +
//!   pattern hash + head + shape bucket;
//! - `search`: per-head pattern search results, keyed by model, layer and head.
//!
//! Every value is a versioned envelope (`{"schema": N, "value": ...}`, JSON). The
//! [`Toolchain`] (GPU name, compute capability, SM count, driver, NVRTC and codegen versions)
//! is part of every kernel and tuning key, so an entry made by another GPU or toolchain is
//! never found by a lookup; [`Db::verify`] reports such entries as stale, and entries that do
//! not decode as corrupt. Each write is flushed before it returns, so a process killed in the
//! middle of a tune leaves every finished record intact.
//!
//! sled allows one process at a time to have a database open. So that many processes can share
//! one (a server process per GPU, an autotune while they run), a [`Db`] is a handle that opens
//! sled only for the duration of one operation (a lookup, one record written, a listing) and
//! closes it after: readers and writers alike hold it for milliseconds. A process that finds it
//! held retries with backoff, says so on standard error after [`WAIT_NOTICE`], and gives up
//! with [`Error::Locked`] (naming the holder's process id and command line, from the `holder`
//! file each opener writes) after the timeout: [`DEFAULT_TIMEOUT`], or `WEFT_DB_TIMEOUT`
//! seconds. A database sled cannot read gets [`Error::Corrupt`], which says how to reset it.
//!
//! The default location is a per-user cache directory ([`default_path`]), overridden by the
//! `WEFT_DB` environment variable (and by `--db` on the command line).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A raw (key, value) pair of a tree.
type KeyValue = (sled::IVec, sled::IVec);

/// Entries written per operation by [`Db::import`].
pub const IMPORT_BATCH: usize = 256;

/// Version of the value envelope; bumped when a record's layout changes.
pub const SCHEMA_VERSION: u32 = 1;

/// The trees of the database.
pub const TREES: [&str; 3] = ["kernels", "tuning", "search"];

const HOLDER_FILE: &str = "holder";

/// How long an operation waits for a database another process holds, unless `WEFT_DB_TIMEOUT`
/// (seconds) says otherwise. Operations hold it for milliseconds; a wait this long means a
/// process stopped while holding it, or something outside weft keeps it open.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// After this long waiting, a line on standard error says which process holds the database.
pub const WAIT_NOTICE: Duration = Duration::from_secs(3);

/// Everything that can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the kernel database {path} stayed held by another process ({holder}) for {waited_s} s; \
         weft holds it only for one read or write at a time, so that process is stuck or is not weft: \
         stop it, wait longer (WEFT_DB_TIMEOUT=<seconds>), or use another database with --db or WEFT_DB"
    )]
    Locked { path: String, holder: String, waited_s: u64 },
    #[error(
        "the kernel database {path} cannot be read ({detail}); it only caches tuned kernels: reset it with \
         `weft cache clear --db {path}` or delete that directory"
    )]
    Corrupt { path: String, detail: String },
    #[error("kernel database {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel database {path}: {detail}")]
    Sled { path: String, detail: String },
    #[error("no per-user cache directory on this system: give a database path with --db or WEFT_DB")]
    NoCacheDir,
    #[error("{0}")]
    Format(String),
}

/// Where the database lives by default: `$WEFT_DB`, else `<user cache dir>/weft/db`.
pub fn default_path() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("WEFT_DB").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    dirs::cache_dir().map(|d| d.join("weft").join("db")).ok_or(Error::NoCacheDir)
}

/// What a compiled kernel is valid for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Toolchain {
    pub gpu_name: String,
    /// Compute capability as `major * 10 + minor`.
    pub sm: u32,
    pub sm_count: u32,
    pub driver_version: i32,
    /// NVRTC (major, minor).
    pub nvrtc_version: (i32, i32),
    pub codegen_version: u32,
}

impl Toolchain {
    fn key(&self) -> String {
        format!(
            "{}|sm{}|{}sm|drv{}|nvrtc{}.{}|cg{}",
            self.gpu_name.replace('|', "/"),
            self.sm,
            self.sm_count,
            self.driver_version,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            self.codegen_version
        )
    }
}

/// The shape class a tuning record applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeBucket {
    /// Sequence-length bucket: the next power of two of the key length, at least 1024.
    pub seq: u32,
    pub head_dim: u32,
    pub dtype: String,
    /// Query heads per key head.
    pub gqa: u32,
    pub causal: bool,
    /// Sequences decoded together (paged decode steps): the next power of two of the batch;
    /// `None` for everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
}

impl ShapeBucket {
    /// The bucket of a problem.
    pub fn new(seq_len: usize, head_dim: u32, dtype: &str, gqa: u32, causal: bool) -> ShapeBucket {
        ShapeBucket { seq: Self::seq_bucket(seq_len), head_dim, dtype: dtype.to_string(), gqa, causal, batch: None }
    }

    /// The sequence-length bucket of `seq_len` keys (the [`ShapeBucket::seq`] field).
    pub fn seq_bucket(seq_len: usize) -> u32 {
        (seq_len.max(1024) as u64).next_power_of_two().min(u64::from(u32::MAX)) as u32
    }

    /// This bucket for decode steps of `batch` sequences.
    pub fn with_batch(self, batch: usize) -> ShapeBucket {
        let batch = (batch.max(1) as u64).next_power_of_two().min(u64::from(u32::MAX)) as u32;
        ShapeBucket { batch: Some(batch), ..self }
    }
}

/// Key of a compiled kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelKey {
    pub toolchain: Toolchain,
    /// The generated source's kernel key (`weft_codegen::Kernel::key`).
    pub kernel: String,
    /// Target architecture, e.g. `sm_90`.
    pub arch: String,
}

/// A compiled kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    /// Stored as base64 text (records written as a JSON array of numbers, 3-4x larger, still
    /// read).
    #[serde(with = "cubin_text")]
    pub cubin: Vec<u8>,
    pub ptx: String,
    pub options: Vec<String>,
    pub threads: u32,
    pub shared_bytes: u32,
    pub head_dim: u32,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// A CUBIN in a JSON record: base64 text; an array of numbers (older records) is read too.
mod cubin_text {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Text(String),
            Numbers(Vec<u8>),
        }
        match Stored::deserialize(d)? {
            Stored::Text(t) => STANDARD.decode(t).map_err(serde::de::Error::custom),
            Stored::Numbers(v) => Ok(v),
        }
    }
}

/// Key of a tuning record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuneKey {
    pub toolchain: Toolchain,
    pub pattern_hash: String,
    /// The head, when heads of one pattern tune differently.
    pub head: Option<u32>,
    pub bucket: ShapeBucket,
}

/// The outcome of tuning one (pattern, head, bucket).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneRecord {
    /// The winning config (serialized `weft_codegen::KernelConfig`).
    pub best: serde_json::Value,
    pub best_ms: f64,
    /// The runtime's untuned config's median time; `None` when it did not run (older records
    /// wrote a NaN here, which JSON stores as null: that reads as `None` too).
    #[serde(default)]
    pub default_ms: Option<f64>,
    /// Every config tried with its median time (`None` when it failed to compile or run).
    pub timings: Vec<(serde_json::Value, Option<f64>)>,
    /// The winner's kernel key in the `kernels` tree.
    pub kernel: String,
    pub created: u64,
}

/// Key of a search result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchKey {
    pub model: String,
    pub layer: u32,
    pub head: u32,
}

/// The pattern chosen for one head.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchRecord {
    /// The pattern (serialized `weft_dsl::Pattern`).
    pub pattern: serde_json::Value,
    pub recall: f64,
    pub density: f64,
    pub created: u64,
    /// The candidate family (empty in records written before it was kept).
    #[serde(default)]
    pub family: String,
    /// Standard error of `recall` (0: measured on every row, or not recorded).
    #[serde(default)]
    pub recall_se: f64,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    schema: u32,
    value: T,
}

/// One entry as listed or exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub tree: String,
    pub key: String,
    pub value: serde_json::Value,
}

/// What [`Db::import`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    pub imported: usize,
    /// (tree/key, why) of each entry not imported.
    pub rejected: Vec<(String, String)>,
}

/// What [`Db::verify`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    pub checked: usize,
    /// (tree, key, why) of entries that do not decode.
    pub corrupt: Vec<(String, String, String)>,
    /// (tree, key) of entries made by another toolchain than the one given.
    pub stale: Vec<(String, String)>,
}

/// A kernel database: its path, opened for each operation (see the crate's documentation).
pub struct Db {
    path: PathBuf,
    /// Serialises this process's operations: sled's lock also refuses a second open from
    /// the same process.
    turn: Mutex<()>,
    timeout: Duration,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn timestamp() -> u64 {
    now()
}

fn tree_key(parts: &[&str]) -> String {
    parts.join("/")
}

/// The wait for a held database: `WEFT_DB_TIMEOUT` seconds, else [`DEFAULT_TIMEOUT`].
fn timeout_from_env() -> Result<Duration, Error> {
    match std::env::var("WEFT_DB_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| Error::Format(format!("WEFT_DB_TIMEOUT must be seconds between 0 and 86400, got `{v}`"))),
    }
}

impl Db {
    /// The database at `path` (created if needed), checked by opening it once; it is not
    /// held between operations. Waits up to `WEFT_DB_TIMEOUT` seconds (default
    /// [`DEFAULT_TIMEOUT`]) whenever another process holds it.
    pub fn open(path: &Path) -> Result<Db, Error> {
        Db::open_with_timeout(path, timeout_from_env()?)
    }

    /// [`Db::open`] with an explicit wait for a database another process holds.
    pub fn open_with_timeout(path: &Path, timeout: Duration) -> Result<Db, Error> {
        let p = path.display().to_string();
        if path.exists() && !path.is_dir() {
            return Err(Error::Format(format!(
                "{p} is a file, not a kernel database: a database is a directory (give --db or WEFT_DB a directory \
                 path; it is created if missing)"
            )));
        }
        std::fs::create_dir_all(path).map_err(|source| Error::Io { path: p.clone(), source })?;
        let db = Db { path: path.to_path_buf(), turn: Mutex::new(()), timeout };
        db.with(|_| Ok(()))?;
        Ok(db)
    }

    /// Runs `f` on the database opened for it, then closes it.
    fn with<R>(&self, f: impl FnOnce(&sled::Db) -> Result<R, Error>) -> Result<R, Error> {
        // A panic elsewhere while holding the turn leaves nothing half-done here.
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let db = self.acquire()?;
        f(&db)
    }

    /// Opens sled, waiting (with backoff) while another process holds it.
    fn acquire(&self) -> Result<sled::Db, Error> {
        let p = self.path.display().to_string();
        let holder = || {
            std::fs::read_to_string(self.path.join(HOLDER_FILE))
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "holder unknown".into())
        };
        let start = Instant::now();
        let (mut pause, mut told) = (Duration::from_millis(2), false);
        loop {
            // No background flusher: writes flush themselves, and the lock goes with the handle.
            match sled::Config::new().path(&self.path).flush_every_ms(None).open() {
                Ok(db) => {
                    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
                    // Best effort: the holder file only improves the message another process sees.
                    let _ = std::fs::write(
                        self.path.join(HOLDER_FILE),
                        format!("pid {}: {}", std::process::id(), args.join(" ")),
                    );
                    return Ok(db);
                }
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    let waited = start.elapsed();
                    if waited >= self.timeout {
                        return Err(Error::Locked { path: p, holder: holder(), waited_s: waited.as_secs() });
                    }
                    if !told && waited >= WAIT_NOTICE {
                        eprintln!("weft: waiting for the kernel database {p}, held by {}", holder());
                        told = true;
                    }
                    std::thread::sleep(pause.min(self.timeout.saturating_sub(waited)));
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(sled::Error::Io(source)) => return Err(Error::Io { path: p, source }),
                Err(other) => return Err(Error::Corrupt { path: p, detail: other.to_string() }),
            }
        }
    }

    /// Deletes the database directory at `path` (for a database too damaged to open). Refuses
    /// a directory holding anything but sled's files, so a mistyped path deletes nothing else.
    pub fn destroy(path: &Path) -> Result<(), Error> {
        let p = path.display().to_string();
        let io = |source| Error::Io { path: p.clone(), source };
        if !path.exists() {
            return Ok(());
        }
        for entry in std::fs::read_dir(path).map_err(io)? {
            let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            let sled_file = ["conf", "db", "blobs", HOLDER_FILE].contains(&name.as_str()) || name.starts_with("snap.");
            if !sled_file {
                return Err(Error::Format(format!(
                    "{p} holds `{name}`, which is not part of a weft database; not deleting it"
                )));
            }
        }
        std::fs::remove_dir_all(path).map_err(io)
    }

    /// The database's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: sled::Error) -> Error {
        let path = self.path.display().to_string();
        match e {
            // Damaged data reads as such, with the advice on resetting the database.
            sled::Error::Corruption { .. } => Error::Corrupt { path, detail: e.to_string() },
            sled::Error::Io(source) => Error::Io { path, source },
            other => Error::Sled { path, detail: other.to_string() },
        }
    }

    fn tree(&self, db: &sled::Db, name: &str) -> Result<sled::Tree, Error> {
        db.open_tree(name).map_err(|e| self.err(e))
    }

    fn put<T: Serialize>(&self, tree: &str, key: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(&Envelope { schema: SCHEMA_VERSION, value })
            .map_err(|e| Error::Format(format!("cannot encode a {tree} record: {e}")))?;
        self.with(|db| {
            self.tree(db, tree)?.insert(key.as_bytes(), bytes).map_err(|e| self.err(e))?;
            // A finished record survives a kill that follows.
            db.flush().map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn get<T: DeserializeOwned>(&self, tree: &str, key: &str) -> Result<Option<T>, Error> {
        let Some(bytes) = self.with(|db| self.tree(db, tree)?.get(key.as_bytes()).map_err(|e| self.err(e)))? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Envelope<T>>(&bytes) {
            Ok(env) if env.schema == SCHEMA_VERSION => Ok(Some(env.value)),
            // An entry of another schema is as good as absent: it is re-tuned and overwritten.
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Format(format!(
                "entry {tree}/{key} in {} does not decode ({e}); run `weft cache verify`",
                self.path.display()
            ))),
        }
    }

    fn kernel_key(k: &KernelKey) -> String {
        tree_key(&[&k.toolchain.key(), &k.kernel, &k.arch])
    }

    fn tune_key(k: &TuneKey) -> String {
        let head = k.head.map_or("all".to_string(), |h| format!("h{h}"));
        let b = &k.bucket;
        let mut bucket =
            format!("n{}|d{}|{}|g{}|{}", b.seq, b.head_dim, b.dtype, b.gqa, if b.causal { "causal" } else { "full" });
        if let Some(batch) = b.batch {
            bucket += &format!("|b{batch}");
        }
        tree_key(&[&k.toolchain.key(), &k.pattern_hash, &head, &bucket])
    }

    fn search_key(k: &SearchKey) -> String {
        tree_key(&[&k.model.replace('/', "\u{2215}"), &format!("l{:05}", k.layer), &format!("h{:05}", k.head)])
    }

    /// Stores a compiled kernel.
    pub fn put_kernel(&self, key: &KernelKey, record: &KernelRecord) -> Result<(), Error> {
        self.put("kernels", &Self::kernel_key(key), record)
    }

    /// A compiled kernel, if one was stored for exactly this toolchain.
    pub fn kernel(&self, key: &KernelKey) -> Result<Option<KernelRecord>, Error> {
        self.get("kernels", &Self::kernel_key(key))
    }

    /// Stores a tuning record.
    pub fn put_tuning(&self, key: &TuneKey, record: &TuneRecord) -> Result<(), Error> {
        self.put("tuning", &Self::tune_key(key), record)
    }

    /// The tuning record for exactly this toolchain, pattern, head and bucket.
    pub fn tuning(&self, key: &TuneKey) -> Result<Option<TuneRecord>, Error> {
        self.get("tuning", &Self::tune_key(key))
    }

    /// Stores a search result.
    pub fn put_search(&self, key: &SearchKey, record: &SearchRecord) -> Result<(), Error> {
        self.put("search", &Self::search_key(key), record)
    }

    /// Stores many search results in one operation.
    pub fn put_searches(&self, records: &[(SearchKey, SearchRecord)]) -> Result<(), Error> {
        let encoded = records
            .iter()
            .map(|(k, r)| {
                serde_json::to_vec(&Envelope { schema: SCHEMA_VERSION, value: r })
                    .map(|b| (Self::search_key(k), b))
                    .map_err(|e| Error::Format(format!("cannot encode a search record: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.with(|db| {
            let t = self.tree(db, "search")?;
            for (k, b) in encoded {
                t.insert(k.as_bytes(), b).map_err(|e| self.err(e))?;
            }
            db.flush().map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    /// The search result of one head.
    pub fn search(&self, key: &SearchKey) -> Result<Option<SearchRecord>, Error> {
        self.get("search", &Self::search_key(key))
    }

    /// Every search result stored for `model`, in (layer, head) order.
    pub fn search_results(&self, model: &str) -> Result<Vec<(SearchKey, SearchRecord)>, Error> {
        let prefix = Self::search_key(&SearchKey { model: model.to_string(), layer: 0, head: 0 });
        let prefix = &prefix[..prefix.rfind("/l").unwrap_or(prefix.len()) + 1];
        let mut out = Vec::new();
        let items = self.with(|db| {
            let t = self.tree(db, "search")?;
            t.scan_prefix(prefix.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
        })?;
        for (k, v) in items {
            let key = String::from_utf8_lossy(&k).into_owned();
            let parts: Vec<&str> = key.rsplitn(3, '/').collect();
            let layer = parts.get(1).and_then(|l| l.strip_prefix('l')).and_then(|l| l.parse().ok());
            let head = parts.first().and_then(|h| h.strip_prefix('h')).and_then(|h| h.parse().ok());
            let rec = serde_json::from_slice::<Envelope<SearchRecord>>(&v)
                .ok()
                .filter(|e| e.schema == SCHEMA_VERSION)
                .map(|e| e.value);
            if let (Some(layer), Some(head), Some(rec)) = (layer, head, rec) {
                out.push((SearchKey { model: model.to_string(), layer, head }, rec));
            }
        }
        Ok(out)
    }

    /// Every entry, tree by tree, in key order (values decoded to JSON; undecodable values as
    /// a string saying so).
    pub fn entries(&self) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        for (tree, items) in self.read_all()? {
            for (k, v) in items {
                let value = serde_json::from_slice(&v)
                    .unwrap_or_else(|e| serde_json::Value::String(format!("<undecodable: {e}>")));
                out.push(Entry { tree: tree.to_string(), key: String::from_utf8_lossy(&k).into_owned(), value });
            }
        }
        Ok(out)
    }

    /// Every tree's (key, value) pairs, read in one operation.
    fn read_all(&self) -> Result<Vec<(&'static str, Vec<KeyValue>)>, Error> {
        self.with(|db| {
            TREES
                .iter()
                .map(|&tree| {
                    let items = self.tree(db, tree)?.iter().collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))?;
                    Ok((tree, items))
                })
                .collect()
        })
    }

    /// Adds exported entries (overwriting equal keys). Each is checked first: a known tree,
    /// and a value that decodes as that tree's record in this schema; the others are
    /// rejected, with the reason, and not written. Written in batches of [`IMPORT_BATCH`],
    /// each its own operation, so that other processes are not kept waiting through a large
    /// import.
    pub fn import(&self, entries: &[Entry]) -> Result<ImportReport, Error> {
        let mut report = ImportReport::default();
        let mut good = Vec::with_capacity(entries.len());
        for e in entries {
            let bytes = serde_json::to_vec(&e.value).map_err(|err| Error::Format(err.to_string()))?;
            let problem = match e.tree.as_str() {
                "kernels" => check::<KernelRecord>(&bytes),
                "tuning" => check::<TuneRecord>(&bytes),
                "search" => check::<SearchRecord>(&bytes),
                other => Some(format!("unknown tree `{other}`; expected one of {TREES:?}")),
            };
            match problem {
                Some(why) => report.rejected.push((format!("{}/{}", e.tree, e.key), why)),
                None => good.push(e),
            }
        }
        for batch in good.chunks(IMPORT_BATCH) {
            self.with(|db| {
                for e in batch {
                    let bytes = serde_json::to_vec(&e.value).map_err(|err| Error::Format(err.to_string()))?;
                    self.tree(db, &e.tree)?.insert(e.key.as_bytes(), bytes).map_err(|err| self.err(err))?;
                }
                db.flush().map_err(|e| self.err(e))?;
                Ok(())
            })?;
            report.imported += batch.len();
        }
        Ok(report)
    }

    /// Removes every entry; returns how many.
    pub fn clear(&self) -> Result<usize, Error> {
        self.with(|db| {
            let mut n = 0;
            for tree in TREES {
                let t = self.tree(db, tree)?;
                // Counted key by key, stopping at the first error: on damaged data `Tree::len`
                // would yield the same error forever.
                for key in t.iter().keys() {
                    key.map_err(|e| self.err(e))?;
                    n += 1;
                }
                t.clear().map_err(|e| self.err(e))?;
            }
            db.flush().map_err(|e| self.err(e))?;
            Ok(n)
        })
    }

    /// Checks every entry: it decodes with this schema, and (when `current` is given) it was
    /// made by that toolchain.
    pub fn verify(&self, current: Option<&Toolchain>) -> Result<Verification, Error> {
        let mut v = Verification::default();
        let current_key = current.map(Toolchain::key);
        for (tree, items) in self.read_all()? {
            for (k, bytes) in items {
                let key = String::from_utf8_lossy(&k).into_owned();
                v.checked += 1;
                let problem = match tree {
                    "kernels" => check::<KernelRecord>(&bytes),
                    "tuning" => check::<TuneRecord>(&bytes),
                    _ => check::<SearchRecord>(&bytes),
                };
                if let Some(why) = problem {
                    v.corrupt.push((tree.to_string(), key.clone(), why));
                }
                if let Some(ck) = &current_key {
                    if tree != "search" && !key.starts_with(&format!("{ck}/")) {
                        v.stale.push((tree.to_string(), key));
                    }
                }
            }
        }
        Ok(v)
    }
}

#[derive(Deserialize)]
struct SchemaOnly {
    schema: u32,
}

/// What is wrong with a stored value, if anything (at most [`MAX_REASON`] characters: a
/// decoding error may quote the value, which can be megabytes).
fn check<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    let why = match serde_json::from_slice::<SchemaOnly>(bytes) {
        Err(e) => Some(e.to_string()),
        Ok(s) if s.schema != SCHEMA_VERSION => Some(format!("schema {} (this weft reads {SCHEMA_VERSION})", s.schema)),
        Ok(_) => serde_json::from_slice::<Envelope<T>>(bytes).err().map(|e| e.to_string()),
    }?;
    if why.chars().count() <= MAX_REASON {
        return Some(why);
    }
    let cut: String = why.chars().take(MAX_REASON).collect();
    Some(format!("{cut}... ({} bytes of message cut; the value is {} bytes)", why.len() - cut.len(), bytes.len()))
}

/// The longest reason [`check`] gives.
const MAX_REASON: usize = 300;
