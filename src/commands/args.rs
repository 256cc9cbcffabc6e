//! The clap arguments of the subcommands (the top-level `Cli` and `Command` are in `main.rs`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// Where a command that stores results keeps them.
#[derive(Args)]
pub(crate) struct DbArgs {
    /// Kernel database for the results (default: $WEFT_DB, else the per-user cache directory).
    #[arg(long, value_name = "DIR")]
    pub(crate) db: Option<PathBuf>,
    /// Do not store the results in the database.
    #[arg(long)]
    pub(crate) no_db: bool,
}

impl DbArgs {
    /// The database and its path, or `None` with `--no-db`.
    pub(crate) fn open(&self) -> anyhow::Result<Option<(weft::cache::Db, PathBuf)>> {
        if self.no_db {
            return Ok(None);
        }
        let path = db_path(self.db.clone())?;
        Ok(Some((weft::cache::Db::open(&path)?, path)))
    }
}

/// `--db`, else `$WEFT_DB`, else the per-user cache directory.
pub(crate) fn db_path(db: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match db {
        Some(p) => p,
        None => weft::cache::default_path()?,
    })
}

#[derive(Args)]
pub(crate) struct AutotuneArgs {
    /// The pattern: a file, a built-in name or DSL text (or use --from-search).
    #[arg(value_name = "PATTERN", required_unless_present = "from_search")]
    pub(crate) pattern: Option<String>,
    /// Instead: every distinct pattern `weft search` chose for this model (from the database).
    #[arg(long, value_name = "MODEL", conflicts_with = "pattern")]
    pub(crate) from_search: Option<String>,
    /// Sequence lengths of the buckets (queries = keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [16384usize], value_name = "N")]
    pub(crate) seq: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 32, value_name = "H")]
    pub(crate) heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long, value_name = "H")]
    pub(crate) kv_heads: Option<usize>,
    /// Head dimensions (64, 128, 256), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128u32])]
    pub(crate) head_dim: Vec<u32>,
    /// Element types (bf16, fp16), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string()])]
    pub(crate) dtype: Vec<String>,
    /// Store the result for this head only (for patterns whose heads differ).
    #[arg(long)]
    pub(crate) head: Option<u32>,
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// Time the Hopper path's configs too (wgmma, sm_90a; H100/H200 only). The default on
    /// those GPUs, where the untuned kernel is on that path; this flag says so when a GPU or
    /// head dim has none.
    #[arg(long, conflicts_with = "no_wgmma")]
    pub(crate) wgmma: bool,
    /// Time the mma.sync configs only (and the runtime's default config), also on sm_90.
    #[arg(long)]
    pub(crate) no_wgmma: bool,
    /// Decode over a paged KV cache instead: batches of sequences of --seq tokens each,
    /// comma-separated; the pattern is a Quest retrieval (`retrieval(unit = page(n), ...)`) or
    /// `full` (dense steps, pages of --page-size). Tunes the split count per batch and length.
    #[arg(long, value_delimiter = ',', value_name = "B")]
    pub(crate) batch: Vec<usize>,
    /// Tokens per page of a dense paged step's cache (with --batch and `full`).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub(crate) page_size: usize,
}

#[derive(Args)]
pub(crate) struct SearchArgs {
    /// Captured Q/K: `layers.<L>.q` / `layers.<L>.k` (or `q` / `k`), [heads, tokens, head_dim].
    #[arg(long, value_name = "FILE")]
    pub(crate) qk: PathBuf,
    /// Per head, the cheapest pattern keeping this share of the softmax mass (the default mode).
    #[arg(long, value_name = "R", conflicts_with = "budget")]
    pub(crate) target_recall: Option<f64>,
    /// Instead: a mean density over all heads, spent where it buys the most recall.
    #[arg(long, value_name = "D")]
    pub(crate) budget: Option<f64>,
    /// The model attends bidirectionally (default: causal, as decoder LLMs).
    #[arg(long)]
    pub(crate) bidirectional: bool,
    /// Model name the results are stored under (default: the file name).
    #[arg(long)]
    pub(crate) model: Option<String>,
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// Write every choice as JSON here.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Draw a heads x layers map of the chosen families and densities here (PNG).
    #[arg(long, value_name = "FILE")]
    pub(crate) png: Option<PathBuf>,
    /// Compute recall on the CPU even when a GPU is present (by default GPU 0 computes it with
    /// generated kernels, for head dims 64, 128 and 256, over every row).
    #[arg(long)]
    pub(crate) cpu: bool,
    /// Afterwards, measure every choice's recall and density exactly over all rows (on the
    /// CPU) and report them against the estimates.
    #[arg(long)]
    pub(crate) verify: bool,
}

#[derive(Subcommand)]
pub(crate) enum CacheAction {
    /// List every entry with a one-line summary.
    Ls,
    /// Print the entries whose key contains KEY, as JSON.
    Show { key: String },
    /// Write every entry as JSON (to FILE, or to standard output).
    Export {
        /// JSON, the export format (the only one; the flag is accepted, and is the default).
        #[arg(long)]
        json: bool,
        #[arg(value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Add the entries of an export (overwriting equal keys).
    Import { file: PathBuf },
    /// Remove every entry (a database too damaged to open is deleted).
    Clear,
    /// Check that every entry decodes and, on a GPU machine, was made by this GPU and toolchain.
    Verify,
}

#[derive(Args)]
pub(crate) struct PatternArg {
    /// A pattern file (.toml or .json), a built-in name (see `weft patterns`), or DSL text in
    /// quotes such as "sink(64) | local(256) | vertical_vector(keep = top_p(0.95))".
    #[arg(value_name = "PATTERN")]
    pub(crate) pattern: String,
}

#[derive(Args)]
pub(crate) struct KernelArgs {
    /// Head dimension: 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    pub(crate) head_dim: u32,
    /// Element type: bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    pub(crate) dtype: String,
    /// Tokens of the synthetic input whose index supplies the layout and masks.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub(crate) seq: usize,
    /// Rows per query block (default: the pattern's own).
    #[arg(long)]
    pub(crate) block_m: Option<usize>,
    /// Keys per key block (default: the pattern's own).
    #[arg(long)]
    pub(crate) block_n: Option<usize>,
    /// K/V tiles in flight: 2 or 3.
    #[arg(long, default_value_t = 2)]
    pub(crate) stages: u32,
    /// The Hopper path (warpgroup MMAs, sm_90a; 64 or 128 rows and keys, head dim 64 or 128),
    /// which the runtime runs untuned on sm_90 for most patterns.
    #[arg(long)]
    pub(crate) wgmma: bool,
    /// With --wgmma and 128 rows: a producer warpgroup copies the tiles, the other two compute
    /// (the runtime's sm_90 default at 128 rows).
    #[arg(long)]
    pub(crate) producer: bool,
    /// With --producer: a persistent grid, one CTA per SM walking the rows (opt-in, not for
    /// patterns with gathered columns).
    #[arg(long)]
    pub(crate) persistent: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Synthetic {
    /// Heads with planted vertical columns, diagonals and grid lines, and a dense one.
    Planted,
    /// Gaussian noise.
    Random,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum UniverseArg {
    /// Causal when the pattern mentions causal or window, else all keys.
    Auto,
    All,
    Causal,
}

#[derive(Args)]
pub(crate) struct InputArgs {
    /// Sequence length (keys) of the synthetic input.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub(crate) seq: usize,
    /// Queries (default: the sequence length, or 1 for retrieval patterns).
    #[arg(long, value_name = "N")]
    pub(crate) queries: Option<usize>,
    /// Query heads of the synthetic input.
    #[arg(long, default_value_t = 4, value_name = "H")]
    pub(crate) heads: usize,
    /// Key/value heads (GQA); must divide --heads (default: --heads).
    #[arg(long, value_name = "H")]
    pub(crate) kv_heads: Option<usize>,
    /// Head dimension of the synthetic input.
    #[arg(long, default_value_t = 64, value_name = "D")]
    pub(crate) head_dim: usize,
    /// Which synthetic input.
    #[arg(long, value_enum, default_value_t = Synthetic::Planted)]
    pub(crate) synthetic: Synthetic,
    /// Seed of the synthetic input.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Real Q/K instead: a safetensors file with `q` and `k` ([heads, tokens, head_dim]).
    #[arg(long, value_name = "FILE")]
    pub(crate) qk: Option<PathBuf>,
    /// With --qk, read `layers.<L>.q` and `layers.<L>.k`.
    #[arg(long, value_name = "L", requires = "qk")]
    pub(crate) layer: Option<usize>,
    /// Rows per query block of the index (default: the pattern's own).
    #[arg(long)]
    pub(crate) block_m: Option<usize>,
    /// Keys per key block of the index (default: the pattern's own).
    #[arg(long)]
    pub(crate) block_n: Option<usize>,
    /// Softmax mass recall is measured against.
    #[arg(long, value_enum, default_value_t = UniverseArg::Auto)]
    pub(crate) universe: UniverseArg,
    /// Query rows per head sampled for recall (0: all).
    #[arg(long, default_value_t = 256, value_name = "ROWS")]
    pub(crate) recall_rows: usize,
}
