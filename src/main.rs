//! The `weft` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use weft::analysis::{AnalysisOptions, Report, UniverseChoice};
use weft::catalog;
use weft::dsl::{self, Pattern};
use weft::patterns::synthetic::{planted_qk, Plant};
use weft::patterns::{self as pat, IndexOptions, Tensor, Universe};

/// Longest synthetic sequence the CPU-side commands accept.
const MAX_SEQ: usize = 1 << 22;
/// Largest side of a block-map picture.
const MAX_PX: usize = 16384;

const QUICKSTART_PATTERN: &str = include_str!("../examples/patterns/video.toml");

/// weft: a compiler and autotuner for sparse-attention and KV-retrieval GPU kernels.
///
/// Describe an attention pattern in weft's DSL (a pattern file, a built-in name, or the
/// expression itself in quotes), then inspect it: its IR and hash, the sparse index it
/// builds on real or synthetic Q/K, its density and recall, and a picture of its block map.
#[derive(Parser)]
#[command(name = "weft", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Log more (repeat for more detail); WEFT_LOG=debug works too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the pattern families with their parameters and defaults, and the built-in patterns.
    Patterns,
    /// Print a pattern's IR, hash and validation result, build its index and report density
    /// and recall.
    ///
    /// Example: weft explain "causal & vertical_slash(vertical = top_k(256))" --seq 4096
    Explain {
        #[command(flatten)]
        pattern: PatternArg,
        #[command(flatten)]
        input: InputArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Draw a pattern's block map and column picks for one head as a PNG, or write the dense
    /// mask as a NumPy array.
    ///
    /// Example: weft mask vertical-vector --seq 4096 --png vv.png
    Mask {
        #[command(flatten)]
        pattern: PatternArg,
        #[command(flatten)]
        input: InputArgs,
        /// Head to draw.
        #[arg(long, default_value_t = 0)]
        head: usize,
        /// Write the block map here (PNG).
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
        /// Write the dense boolean mask [queries, keys] here (.npy; at most 8192 tokens).
        #[arg(long, value_name = "FILE")]
        npy: Option<PathBuf>,
        /// Largest side of the picture in pixels (each pixel covers several tokens beyond it).
        #[arg(long, default_value_t = 1024, value_name = "PIXELS")]
        px: usize,
    },
    /// Print the CUDA C++ weft generates for a pattern (its masks come from the index built on
    /// a synthetic input of --seq tokens).
    ///
    /// Example: weft emit vertical-vector --head-dim 128 --dtype bf16
    Emit {
        #[command(flatten)]
        pattern: PatternArg,
        #[command(flatten)]
        kernel: KernelArgs,
    },
    /// Compile a pattern's kernel with NVRTC and print its registers, shared memory and spills
    /// (no GPU needed; libnvrtc is).
    ///
    /// Example: weft compile "causal & window(1024)" --arch sm_90
    Compile {
        #[command(flatten)]
        pattern: PatternArg,
        #[command(flatten)]
        kernel: KernelArgs,
        /// Target architecture.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Also write the CUBIN here (for `nvdisasm` or `cuobjdump -sass`).
        #[arg(long, value_name = "FILE")]
        cubin: Option<PathBuf>,
    },
    /// Choose a pattern for every layer and head of a model from captured Q/K: the cheapest
    /// reaching a target recall, or the best mean recall under a density budget.
    ///
    /// Example: weft search --qk captured.safetensors --target-recall 0.95 --png heads.png
    Search(SearchArgs),
    /// Tune a pattern's kernel on this machine's GPU for one shape bucket: compile the config
    /// space in parallel, time it, check the winner against the CPU reference, store it.
    ///
    /// Example: weft autotune "causal & window(1024)" --seq 16384 --heads 32
    Autotune(AutotuneArgs),
    /// Inspect and maintain the kernel database (tuned kernels, tuning records, search results).
    Cache {
        /// The database directory (default: $WEFT_DB, else the per-user cache directory).
        #[arg(long, global = true, value_name = "DIR")]
        db: Option<PathBuf>,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Run everything that exists so far on a bundled example, and say what comes next.
    Quickstart {
        /// Where to write the example's pictures.
        #[arg(long, default_value = "weft-quickstart", value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct AutotuneArgs {
    /// The pattern: a file, a built-in name or DSL text (or use --from-search).
    #[arg(value_name = "PATTERN", required_unless_present = "from_search")]
    pattern: Option<String>,
    /// Instead: every distinct pattern `weft search` chose for this model (from the database).
    #[arg(long, value_name = "MODEL", conflicts_with = "pattern")]
    from_search: Option<String>,
    /// Sequence lengths of the buckets (queries = keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [16384usize], value_name = "N")]
    seq: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 32, value_name = "H")]
    heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long, value_name = "H")]
    kv_heads: Option<usize>,
    /// Head dimensions (64, 128, 256), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128u32])]
    head_dim: Vec<u32>,
    /// Element types (bf16, fp16), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string()])]
    dtype: Vec<String>,
    /// Store the result for this head only (for patterns whose heads differ).
    #[arg(long)]
    head: Option<u32>,
    /// Kernel database (default: $WEFT_DB, else the per-user cache directory).
    #[arg(long, value_name = "DIR")]
    db: Option<PathBuf>,
    /// Do not store the result.
    #[arg(long)]
    no_db: bool,
    /// Time the Hopper path's configs too (wgmma, sm_90a; H100/H200 only). The default on
    /// those GPUs, where the untuned kernel is on that path; this flag says so when a GPU or
    /// head dim has none.
    #[arg(long, conflicts_with = "no_wgmma")]
    wgmma: bool,
    /// Time the mma.sync configs only (and the runtime's default config), also on sm_90.
    #[arg(long)]
    no_wgmma: bool,
}

#[derive(Args)]
struct SearchArgs {
    /// Captured Q/K: `layers.<L>.q` / `layers.<L>.k` (or `q` / `k`), [heads, tokens, head_dim].
    #[arg(long, value_name = "FILE")]
    qk: PathBuf,
    /// Per head, the cheapest pattern keeping this share of the softmax mass (the default mode).
    #[arg(long, value_name = "R", conflicts_with = "budget")]
    target_recall: Option<f64>,
    /// Instead: a mean density over all heads, spent where it buys the most recall.
    #[arg(long, value_name = "D")]
    budget: Option<f64>,
    /// The model attends bidirectionally (default: causal, as decoder LLMs).
    #[arg(long)]
    bidirectional: bool,
    /// Model name the results are stored under (default: the file name).
    #[arg(long)]
    model: Option<String>,
    /// Kernel database for the results (default: $WEFT_DB, else the per-user cache directory).
    #[arg(long, value_name = "DIR")]
    db: Option<PathBuf>,
    /// Do not store the results in the database.
    #[arg(long)]
    no_db: bool,
    /// Write every choice as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw a heads x layers map of the chosen families and densities here (PNG).
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Compute recall on the CPU even when a GPU is present (by default GPU 0 computes it with
    /// generated kernels, for head dims 64, 128 and 256).
    #[arg(long)]
    cpu: bool,
}

#[derive(Subcommand)]
enum CacheAction {
    /// List every entry with a one-line summary.
    Ls,
    /// Print the entries whose key contains KEY, as JSON.
    Show { key: String },
    /// Write every entry as JSON (to FILE, or to standard output).
    Export {
        /// JSON is the export format (the only one).
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
struct PatternArg {
    /// A pattern file (.toml or .json), a built-in name (see `weft patterns`), or DSL text in
    /// quotes such as "sink(64) | local(256) | vertical_vector(keep = top_p(0.95))".
    #[arg(value_name = "PATTERN")]
    pattern: String,
}

#[derive(Args)]
struct KernelArgs {
    /// Head dimension: 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    head_dim: u32,
    /// Element type: bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tokens of the synthetic input whose index supplies the layout and masks.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    seq: usize,
    /// Rows per query block (default: the pattern's own).
    #[arg(long)]
    block_m: Option<usize>,
    /// Keys per key block (default: the pattern's own).
    #[arg(long)]
    block_n: Option<usize>,
    /// K/V tiles in flight: 2 or 3.
    #[arg(long, default_value_t = 2)]
    stages: u32,
    /// The Hopper path (warpgroup MMAs, sm_90a; 64 or 128 rows and keys, head dim 64 or 128),
    /// which the runtime runs untuned on sm_90 for most patterns.
    #[arg(long)]
    wgmma: bool,
    /// With --wgmma and 128 rows: a producer warpgroup copies the tiles, the other two compute
    /// (the runtime's sm_90 default at 128 rows).
    #[arg(long)]
    producer: bool,
    /// With --producer: a persistent grid, one CTA per SM walking the rows (opt-in, not for
    /// patterns with gathered columns).
    #[arg(long)]
    persistent: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Synthetic {
    /// Heads with planted vertical columns, diagonals and grid lines, and a dense one.
    Planted,
    /// Gaussian noise.
    Random,
}

#[derive(Clone, Copy, ValueEnum)]
enum UniverseArg {
    /// Causal when the pattern mentions causal or window, else all keys.
    Auto,
    All,
    Causal,
}

#[derive(Args)]
struct InputArgs {
    /// Sequence length (keys) of the synthetic input.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    seq: usize,
    /// Queries (default: the sequence length, or 1 for retrieval patterns).
    #[arg(long, value_name = "N")]
    queries: Option<usize>,
    /// Query heads of the synthetic input.
    #[arg(long, default_value_t = 4, value_name = "H")]
    heads: usize,
    /// Key/value heads (GQA); must divide --heads (default: --heads).
    #[arg(long, value_name = "H")]
    kv_heads: Option<usize>,
    /// Head dimension of the synthetic input.
    #[arg(long, default_value_t = 64, value_name = "D")]
    head_dim: usize,
    /// Which synthetic input.
    #[arg(long, value_enum, default_value_t = Synthetic::Planted)]
    synthetic: Synthetic,
    /// Seed of the synthetic input.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Real Q/K instead: a safetensors file with `q` and `k` ([heads, tokens, head_dim]).
    #[arg(long, value_name = "FILE")]
    qk: Option<PathBuf>,
    /// With --qk, read `layers.<L>.q` and `layers.<L>.k`.
    #[arg(long, value_name = "L", requires = "qk")]
    layer: Option<usize>,
    /// Rows per query block of the index (default: the pattern's own).
    #[arg(long)]
    block_m: Option<usize>,
    /// Keys per key block of the index (default: the pattern's own).
    #[arg(long)]
    block_n: Option<usize>,
    /// Softmax mass recall is measured against.
    #[arg(long, value_enum, default_value_t = UniverseArg::Auto)]
    universe: UniverseArg,
    /// Query rows per head sampled for recall (0: all).
    #[arg(long, default_value_t = 256, value_name = "ROWS")]
    recall_rows: usize,
}

fn main() -> ExitCode {
    quiet_output_errors();
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let env = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| filter.into());
    tracing_subscriber::fmt().with_env_filter(env).with_writer(std::io::stderr).init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A closed pipe ends the process quietly, as it does other Unix tools (`weft explain causal |
/// head -1`); any other failure to write the output (a full disk) is reported as an error
/// rather than as a crash.
fn quiet_output_errors() {
    #[cfg(unix)]
    // Safety: restores the default action of SIGPIPE (Rust ignores it), before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // `print!` panics with this message when stdout cannot be written.
        if let Some(why) = message.strip_prefix("failed printing to stdout: ") {
            eprintln!("error: cannot write the output: {why}");
            std::process::exit(1);
        }
        default(info);
    }));
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Patterns => {
            print_patterns();
            Ok(())
        }
        Command::Explain { pattern, input, json } => explain(&load_pattern(&pattern.pattern)?, &input, json),
        Command::Mask { pattern, input, head, png, npy, px } => {
            mask(&load_pattern(&pattern.pattern)?, &input, head, png.as_deref(), npy.as_deref(), px)
        }
        Command::Emit { pattern, kernel } => {
            let k = generate(&load_pattern(&pattern.pattern)?, &kernel)?;
            print!("{}", k.source);
            Ok(())
        }
        Command::Compile { pattern, kernel, arch, cubin } => {
            compile(&load_pattern(&pattern.pattern)?, &kernel, &arch, cubin.as_deref())
        }
        Command::Search(args) => search(args),
        Command::Autotune(args) => autotune(args),
        Command::Cache { db, action } => cache(db, action),
        Command::Quickstart { out } => quickstart(&out),
    }
}

fn load_pattern(arg: &str) -> Result<Pattern> {
    Ok(weft::analysis::load_pattern(arg, "cli")?)
}

fn print_patterns() {
    println!("Pattern families (combine with `|` for union and `&` for intersection):\n");
    for f in catalog::families() {
        println!("  {:<26} {}", f.name, f.summary);
        for p in &f.params {
            println!("      {:<12} default {:<18} {}", p.name, p.default, p.accepted);
        }
    }
    println!("\nBudgets: top_k(n) keeps the n best; top_p(p) the fewest whose softmax mass reaches p;");
    println!("threshold(t) every candidate within -ln(t) of the best score.\n");
    println!("Built-in patterns (usable wherever a PATTERN is expected):\n");
    for (name, e) in catalog::builtins() {
        println!("  {name:<16} {e}");
    }
}

struct Input {
    q: Tensor,
    k: Tensor,
    description: String,
}

fn synthetic_plants(heads: usize, n: usize, d: usize) -> Vec<Plant> {
    (0..heads)
        .map(|h| match h % 4 {
            0 => Plant::Vertical((0..8).map(|i| (i * 997 + 13) % n.max(1)).collect()),
            1 => Plant::Diagonal(d.min(64)),
            2 => Plant::Grid { stride: 16.min(d), phase: 5 },
            _ => Plant::Dense,
        })
        .collect()
}

fn make_input(args: &InputArgs, pattern: &Pattern) -> Result<Input> {
    if let Some(path) = &args.qk {
        let (q, k) = weft::qk::load(path, args.layer)?;
        let description = format!(
            "{}: q [{}, {}, {}], k [{}, {}, {}]",
            path.display(),
            q.heads,
            q.tokens,
            q.dim,
            k.heads,
            k.tokens,
            k.dim
        );
        return Ok(Input { q, k, description });
    }
    let n = args.seq;
    let nq = args.queries.unwrap_or(if pattern.expr.contains_retrieval() { 1 } else { n });
    let kvh = args.kv_heads.unwrap_or(args.heads);
    if n == 0 || nq == 0 || args.heads == 0 || kvh == 0 || args.head_dim == 0 {
        bail!("--seq, --queries, --heads, --kv-heads and --head-dim must be at least 1");
    }
    if args.heads % kvh != 0 {
        bail!("--kv-heads {kvh} must divide --heads {}", args.heads);
    }
    if nq > n {
        bail!("--queries {nq} is larger than --seq {n}: queries are the last tokens of the sequence");
    }
    if n > MAX_SEQ {
        bail!("--seq {n} is over {MAX_SEQ} tokens, more than the CPU reference handles here");
    }
    if (nq as u128) * (n as u128) * (args.heads as u128) > 1 << 36 {
        bail!("{} heads x {nq} x {n} pairs is too large for the CPU reference; lower --seq or --heads", args.heads);
    }
    let (q, k, what) = match args.synthetic {
        Synthetic::Planted => {
            let plants = synthetic_plants(args.heads, n, args.head_dim);
            let (q_all, k_all) = planted_qk(&plants, n, args.head_dim, 8.0, args.seed);
            // Queries are the last nq tokens; K/V heads are the first of each GQA group.
            let q = q_all.slice_tokens(n - nq, n);
            let group = args.heads / kvh;
            let mut k = Tensor::zeros(kvh, n, args.head_dim);
            for h in 0..kvh {
                for t in 0..n {
                    k.row_mut(h, t).copy_from_slice(k_all.row(h * group, t));
                }
            }
            (q, k, "synthetic planted Q/K (vertical, diagonal, grid, dense heads)")
        }
        Synthetic::Random => (
            Tensor::random(args.heads, nq, args.head_dim, args.seed),
            Tensor::random(kvh, n, args.head_dim, args.seed + 1),
            "synthetic Gaussian Q/K",
        ),
    };
    let description = format!(
        "{what}: {} query heads, {kvh} kv heads, {nq} queries x {n} keys, head dim {}, seed {}",
        args.heads, args.head_dim, args.seed
    );
    Ok(Input { q, k, description })
}

fn analyse(pattern: &Pattern, input: &Input, args: &InputArgs) -> Result<Report> {
    let universe = match args.universe {
        UniverseArg::Auto => UniverseChoice::Auto,
        UniverseArg::All => UniverseChoice::All,
        UniverseArg::Causal => UniverseChoice::Causal,
    };
    let opts =
        AnalysisOptions { block_m: args.block_m, block_n: args.block_n, universe, recall_rows: args.recall_rows };
    Ok(weft::analysis::analyse(pattern, &input.q, &input.k, &opts)?)
}

fn explain(pattern: &Pattern, args: &InputArgs, json: bool) -> Result<()> {
    let valid = pattern.validate();
    if let (true, Err(e)) = (json, &valid) {
        println!("{}", serde_json::to_string_pretty(&weft::analysis::invalid_json(pattern, e))?);
        bail!("the pattern is invalid");
    }
    if !json {
        println!("pattern   {}", pattern.name);
        println!("text      {pattern}");
        println!("canonical {}", pattern.canonical());
        println!("hash      {}", pattern.hash());
        match &valid {
            Ok(()) => println!("valid     yes"),
            Err(e) => {
                println!("valid     no");
                return Err(anyhow::anyhow!("{e}"));
            }
        }
    }
    let input = make_input(args, pattern)?;
    let r = analyse(pattern, &input, args)?;
    let (full, partial, cols) = r.index.entry_counts();
    let per_head_density: Vec<f64> = (0..r.index.heads).map(|h| r.index.head_density(h)).collect();
    if json {
        let out = r.to_json(pattern, &input.description);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("ir        {}", serde_json::to_string(&pattern.expr)?);
    println!("input     {}", input.description);
    println!("layout    block_m = {}, block_n = {}", r.index.block_m, r.index.block_n);
    println!(
        "index     built in {:.1} ms: {full} full blocks, {partial} partial blocks, {cols} columns, {} mask predicate(s)",
        r.build_ms,
        r.index.masks.len()
    );
    for (i, m) in r.index.masks.iter().enumerate() {
        println!("  mask {i}  {m}");
    }
    if r.row_lines.iter().any(|ls| !ls.is_empty()) {
        // Row-line masks name the line rows' offset in their query block, not the phase.
        let phases: Vec<String> = r
            .row_lines
            .iter()
            .map(|ls| ls.iter().map(|(s, p)| format!("{p} of {s}")).collect::<Vec<_>>().join(" + "))
            .collect();
        println!(
            "row lines q % stride == phase, phase estimated per head: {} (masks `q % {} == r` name a line row's offset in its query block)",
            phases.join(", "),
            r.index.block_m
        );
    }
    println!(
        "density   {:.2}% of all pairs (per head: {})",
        100.0 * r.density,
        per_head_density.iter().map(|d| format!("{:.1}%", 100.0 * d)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "recall    {:.2}% mean, {:.2}% worst row, of the {} softmax mass ({} rows per head; per head: {})",
        100.0 * r.recall.mean,
        100.0 * r.recall.min,
        match r.universe {
            Universe::All => "bidirectional",
            Universe::Causal => "causal",
        },
        r.recall.rows,
        r.recall.per_head.iter().map(|d| format!("{:.1}%", 100.0 * d)).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

fn mask(
    pattern: &Pattern,
    args: &InputArgs,
    head: usize,
    png: Option<&Path>,
    npy: Option<&Path>,
    px: usize,
) -> Result<()> {
    if png.is_none() && npy.is_none() {
        bail!("nothing to write: give --png FILE and/or --npy FILE");
    }
    if px == 0 || px > MAX_PX {
        bail!("--px must be between 1 and {MAX_PX}, got {px}");
    }
    let input = make_input(args, pattern)?;
    if head >= input.q.heads {
        bail!("--head {head} is out of range: the input has {} query heads", input.q.heads);
    }
    if npy.is_some() && input.q.tokens.max(input.k.tokens) > 8192 {
        bail!(
            "--npy writes a dense [queries, keys] mask and is limited to 8192 tokens; use --png for longer sequences"
        );
    }
    let r = analyse(pattern, &input, args)?;
    let slice = &r.index;
    if let Some(path) = png {
        let (w, h, rgb) = weft::viz::block_map(slice, head, px);
        weft::viz::write_png(path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} ({w} x {h} px): head {head} of `{}`", path.display(), pattern.name);
        println!("legend: {}", weft::viz::LEGEND);
        if r.index.permutation.is_some() {
            println!("axes are permuted positions (the order the kernel iterates)");
        }
    }
    if let Some(path) = npy {
        let m = weft::viz::dense_mask(slice, head);
        weft::viz::write_npy_bool(path, slice.nq, slice.nk, &m)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} (bool [{}, {}], token order)", path.display(), slice.nq, slice.nk);
    }
    println!(
        "head {head}: density {:.2}%, recall {:.2}%",
        100.0 * r.index.head_density(head),
        100.0 * r.recall.per_head[head]
    );
    Ok(())
}

fn autotune(args: AutotuneArgs) -> Result<()> {
    use weft::autotune::tune::{tune, TuneRequest};
    let dtypes: Vec<weft::codegen::DType> = args.dtype.iter().map(|d| d.parse()).collect::<Result<_, _>>()?;
    if let Some(s) = args.seq.iter().find(|s| **s == 0 || **s > MAX_SEQ) {
        bail!("--seq must be between 1 and {MAX_SEQ}, got {s}");
    }
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    let db = if args.no_db {
        None
    } else {
        let path = match &args.db {
            Some(p) => p.clone(),
            None => weft::cache::default_path()?,
        };
        Some((weft::cache::Db::open(&path)?, path))
    };
    // The patterns: one given, or every distinct one a search chose for a model.
    let patterns: Vec<Pattern> = match (&args.pattern, &args.from_search) {
        (Some(p), _) => vec![load_pattern(p)?],
        (None, Some(model)) => {
            let Some((db, path)) = &db else { bail!("--from-search reads the database: drop --no-db") };
            let mut found: Vec<Pattern> = Vec::new();
            for (key, rec) in db.search_results(model)? {
                let p: Pattern = serde_json::from_value(rec.pattern).with_context(|| {
                    format!("the search result of layer {} head {} does not hold a pattern", key.layer, key.head)
                })?;
                if !found.iter().any(|f| f.hash() == p.hash()) {
                    found.push(p);
                }
            }
            if found.is_empty() {
                bail!(
                    "no search results for model `{model}` in {} (run `weft search --model {model}` first)",
                    path.display()
                );
            }
            found
        }
        (None, None) => bail!("give a PATTERN or --from-search MODEL"),
    };
    for p in &patterns {
        p.validate()?;
    }
    let gpu = weft::runtime::Gpu::open(0).context(
        "autotune times kernels on an NVIDIA GPU; without one, `weft compile` shows what a config costs in registers and shared memory",
    )?;
    let mut summary = Vec::new();
    for pattern in &patterns {
        for &seq in &args.seq {
            for &head_dim in &args.head_dim {
                for &dtype in &dtypes {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.enable_steady_tick(std::time::Duration::from_millis(200));
                    bar.set_prefix(format!("{} n={seq} d={head_dim} {}", pattern.name, dtype.name()));
                    let report = |m: &str| bar.set_message(m.to_string());
                    if pattern.expr.contains_retrieval() {
                        // Decode: one query per sequence over `seq` cached keys; the split count is tuned.
                        let req = weft::autotune::decode::DecodeTuneRequest {
                            pattern,
                            heads: args.heads,
                            kv_heads,
                            keys: seq,
                            head_dim,
                            dtype,
                        };
                        let r = weft::autotune::decode::tune_decode(&gpu, db.as_ref().map(|(d, _)| d), &req, &report)?;
                        bar.finish_and_clear();
                        println!(
                            "{} (decode) on {}, {} heads ({} kv), one query over {seq} keys, head dim {head_dim}, {}",
                            pattern.name,
                            gpu.name,
                            args.heads,
                            kv_heads,
                            dtype.name()
                        );
                        println!("{:<14} {:>10}", "splits", "median ms");
                        for (splits, t) in &r.timings {
                            let name = if *splits == 0 { "auto".to_string() } else { splits.to_string() };
                            println!("{name:<14} {:>10}", t.map_or("-".into(), |m| format!("{m:.4}")));
                        }
                        let gain = r.auto_ms.map_or("auto failed".to_string(), |a| format!("{:.2}x", a / r.best_ms));
                        summary.push(format!(
                            "{:<24} n={seq:<6} d={head_dim:<3} {:<5} decode splits={:<24} {:>8.4} ms  gain {gain} over auto  error {:.1e}  {:.1} s",
                            pattern.name,
                            dtype.name(),
                            r.best_splits,
                            r.best_ms,
                            r.verified_error,
                            r.seconds
                        ));
                        continue;
                    }
                    let req = TuneRequest {
                        pattern,
                        heads: args.heads,
                        kv_heads,
                        seq,
                        head_dim,
                        dtype,
                        head: args.head,
                        wgmma: if args.wgmma {
                            Some(true)
                        } else if args.no_wgmma {
                            Some(false)
                        } else {
                            None
                        },
                    };
                    let r = tune(&gpu, db.as_ref().map(|(d, _)| d), &req, &report)?;
                    bar.finish_and_clear();
                    println!(
                        "{} on {} ({}), {} heads ({} kv) x {seq} tokens, head dim {head_dim}, {}",
                        pattern.name,
                        gpu.name,
                        gpu.arch.name(),
                        args.heads,
                        kv_heads,
                        dtype.name()
                    );
                    println!("{:<62} {:>10} {:>9}  note", "config", "median ms", "TFLOP/s");
                    for t in &r.timings {
                        let (ms, tf) = match t.median_ms {
                            Some(m) => (format!("{m:.3}"), format!("{:.0}", r.flops / (m * 1e-3) / 1e12)),
                            None => ("-".into(), "-".into()),
                        };
                        println!("{:<62} {ms:>10} {tf:>9}  {}", t.config.to_string(), t.note);
                    }
                    let gain = r.default_ms.map_or("default pruned".to_string(), |d| format!("{:.2}x", d / r.best_ms));
                    summary.push(format!(
                        "{:<24} n={seq:<6} d={head_dim:<3} {:<5} {:<34} {:>8.3} ms {:>5.0} TFLOP/s  gain {gain}  error {:.1e}  {:.1} s",
                        pattern.name,
                        dtype.name(),
                        format!("{}x{}/{} {}-stage", r.best.block_m, r.best.block_n, r.best.warp_rows, r.best.stages),
                        r.best_ms,
                        r.flops / (r.best_ms * 1e-3) / 1e12,
                        r.verified_error,
                        r.seconds
                    ));
                }
            }
        }
    }
    println!("\nsummary (best config as block_m x block_n / rows per warp and pipeline stages; gain over the default config):");
    for line in &summary {
        println!("  {line}");
    }
    if let Some((_, path)) = &db {
        println!("stored in {}", path.display());
    }
    Ok(())
}

/// Colours of the families in the search map.
const FAMILY_COLOURS: [(&str, [u8; 3]); 6] = [
    ("dense", [120, 120, 120]),
    ("local", [46, 139, 87]),
    ("block", [46, 94, 170]),
    ("vertical_vector", [214, 55, 46]),
    ("vertical_slash", [230, 150, 30]),
    ("grid", [140, 80, 170]),
];

fn search(args: SearchArgs) -> Result<()> {
    use weft::autotune::search::*;
    let opts = weft::search::SearchOptions {
        target_recall: args.target_recall.unwrap_or(0.95),
        budget: args.budget,
        causal: !args.bidirectional,
        cpu: args.cpu,
    };
    let model = args.model.clone().unwrap_or_else(|| {
        args.qk.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} candidate indexes, layer {msg} [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |p: weft::search::Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{}", p.layer));
    };
    let outcome = weft::search::run(&args.qk, &opts, &progress)?;
    bar.finish_and_clear();
    let chosen = outcome.choices;
    println!(
        "{} heads in {} layers searched in {:.1} s over {} candidates ({}; recall on {}, recall and density on {} sampled rows per head)",
        chosen.len(),
        outcome.layers,
        start.elapsed().as_secs_f64(),
        outcome.candidates,
        match args.budget {
            Some(b) => format!("mean density budget {b}"),
            None => format!("target recall {}", opts.target_recall),
        },
        outcome.backend,
        outcome.rows_per_head
    );
    println!("{:<6} {:<48} {:>8} {:>8}", "layer", "families", "density", "recall");
    for l in summarize(&chosen) {
        let f: Vec<String> = l.families.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        println!(
            "{:<6} {:<48} {:>7.1}% {:>7.1}%",
            l.layer,
            f.join(", "),
            100.0 * l.mean_density,
            100.0 * l.mean_recall
        );
    }
    let n = chosen.len().max(1) as f64;
    println!(
        "all    {:<48} {:>7.1}% {:>7.1}%",
        "",
        100.0 * chosen.iter().map(|c| c.density).sum::<f64>() / n,
        100.0 * chosen.iter().map(|c| c.recall).sum::<f64>() / n
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&chosen)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.png {
        let nl = chosen.iter().map(|c| c.layer).max().unwrap_or(0) + 1;
        let nh = chosen.iter().map(|c| c.head).max().unwrap_or(0) + 1;
        let cell = 12usize;
        let (w, h) = (nl * cell, nh * cell);
        let mut rgb = vec![255u8; w * h * 3];
        for c in &chosen {
            let base = FAMILY_COLOURS.iter().find(|f| f.0 == c.family).map_or([0, 0, 0], |f| f.1);
            // Lighter for sparser heads: the colour's strength is the density (at least 25%).
            let t = c.density.clamp(0.25, 1.0);
            let col = base.map(|x| (255.0 - (255.0 - f64::from(x)) * t) as u8);
            for y in c.head * cell..(c.head + 1) * cell - 1 {
                for x in c.layer * cell..(c.layer + 1) * cell - 1 {
                    let i = (y * w + x) * 3;
                    rgb[i..i + 3].copy_from_slice(&col);
                }
            }
        }
        weft::viz::write_png(path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        let legend: Vec<String> = FAMILY_COLOURS.iter().map(|(n, c)| format!("{n} rgb{c:?}")).collect();
        println!("wrote {} (columns: layers, rows: heads; lighter = sparser): {}", path.display(), legend.join(", "));
    }
    if !args.no_db {
        let path = match &args.db {
            Some(p) => p.clone(),
            None => weft::cache::default_path()?,
        };
        let db = weft::cache::Db::open(&path)?;
        for c in &chosen {
            let key = weft::cache::SearchKey { model: model.clone(), layer: c.layer as u32, head: c.head as u32 };
            let rec = weft::cache::SearchRecord {
                pattern: serde_json::to_value(&c.pattern)?,
                recall: c.recall,
                density: c.density,
                created: weft::cache::timestamp(),
            };
            db.put_search(&key, &rec)?;
        }
        println!("stored {} choices for model `{model}` in {}", chosen.len(), path.display());
    }
    Ok(())
}

fn summary(e: &weft::cache::Entry) -> String {
    let v = &e.value["value"];
    match e.tree.as_str() {
        "kernels" => format!(
            "{} ({} bytes CUBIN, {} threads)",
            v["name"].as_str().unwrap_or("?"),
            v["cubin"].as_array().map_or(0, Vec::len),
            v["threads"]
        ),
        "tuning" => format!("best {} ms (default {} ms), config {}", v["best_ms"], v["default_ms"], v["best"]),
        "search" => format!("recall {}, density {}", v["recall"], v["density"]),
        _ => String::new(),
    }
}

fn cache(db: Option<PathBuf>, action: CacheAction) -> Result<()> {
    use weft::cache::{default_path, Db, Entry, Error as CacheError};
    let path = match db {
        Some(p) => p,
        None => default_path()?,
    };
    if let CacheAction::Clear = action {
        // A database that cannot be read, on opening or while clearing, is deleted: it only
        // caches what autotune and search can make again.
        let cleared = Db::open(&path).and_then(|db| db.clear());
        return match cleared {
            Ok(n) => {
                println!("removed {n} entries from {}", path.display());
                Ok(())
            }
            Err(CacheError::Corrupt { .. }) => {
                Db::destroy(&path)?;
                println!("deleted the unreadable database {}", path.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
    }
    let db = Db::open(&path)?;
    match action {
        CacheAction::Ls => {
            let entries = db.entries()?;
            println!("{}: {} entries", path.display(), entries.len());
            for e in &entries {
                println!("{:<8} {}  {}", e.tree, e.key, summary(e));
            }
        }
        CacheAction::Show { key } => {
            let found: Vec<Entry> = db.entries()?.into_iter().filter(|e| e.key.contains(&key)).collect();
            if found.is_empty() {
                bail!("no entry of {} has a key containing `{key}` (see `weft cache ls`)", path.display());
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        CacheAction::Export { json, out } => {
            if !json {
                bail!("give --json: JSON is the export format");
            }
            let text = serde_json::to_string_pretty(&db.entries()?)?;
            match out {
                Some(f) => {
                    std::fs::write(&f, text).with_context(|| format!("cannot write {}", f.display()))?;
                    println!("exported {} to {}", path.display(), f.display());
                }
                None => println!("{text}"),
            }
        }
        CacheAction::Import { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let entries: Vec<Entry> = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a `weft cache export --json` file", file.display()))?;
            println!("imported {} entries into {}", db.import(&entries)?, path.display());
        }
        CacheAction::Verify => {
            let current = weft::runtime::Gpu::open(0).ok().and_then(|g| g.toolchain().ok());
            let v = db.verify(current.as_ref())?;
            println!("{}: {} entries checked", path.display(), v.checked);
            for (tree, key, why) in &v.corrupt {
                println!("corrupt  {tree}/{key}: {why}");
            }
            match &current {
                Some(tc) => {
                    for (tree, key) in &v.stale {
                        println!("stale    {tree}/{key}: made by another GPU or toolchain, will be re-tuned");
                    }
                    println!(
                        "current toolchain: {} sm_{} driver {} NVRTC {}.{}",
                        tc.gpu_name, tc.sm, tc.driver_version, tc.nvrtc_version.0, tc.nvrtc_version.1
                    );
                }
                None => println!(
                    "no GPU here: staleness (another GPU, driver, NVRTC or codegen) is checked on a GPU machine"
                ),
            }
            if !v.corrupt.is_empty() {
                bail!("{} corrupt entries; `weft cache clear` resets the database", v.corrupt.len());
            }
        }
        CacheAction::Clear => {}
    }
    Ok(())
}

/// The kernel for a pattern, with the layout and masks of its index on a synthetic input.
fn generate(pattern: &Pattern, args: &KernelArgs) -> Result<weft::codegen::Kernel> {
    pattern.validate()?;
    if args.seq == 0 || args.seq > MAX_SEQ {
        bail!("--seq must be between 1 and {MAX_SEQ}, got {}", args.seq);
    }
    let dtype: weft::codegen::DType = args.dtype.parse()?;
    if pattern.expr.contains_retrieval() {
        bail!("retrieval patterns run on the decode kernel (weft::codegen::emit_decode); `weft emit` and `weft compile` show attention kernels");
    }
    let q = Tensor::random(1, args.seq, 16, 1);
    let k = Tensor::random(1, args.seq, 16, 2);
    let opts = IndexOptions { block_m: args.block_m, block_n: args.block_n, ..Default::default() };
    let ix = pat::build_index(&pattern.expr, &q, &k, &opts)?;
    let mut config = weft::codegen::KernelConfig {
        stages: args.stages,
        ..weft::codegen::KernelConfig::for_blocks(ix.block_m, ix.block_n, args.head_dim, dtype)
    };
    if args.wgmma {
        config = config.with_wgmma();
    }
    config.producer = args.producer;
    config.persistent = args.persistent;
    let spec = weft::codegen::KernelSpec { pattern, masks: &ix.masks, permutation: ix.permutation, config };
    Ok(weft::codegen::emit(&spec)?)
}

fn compile(pattern: &Pattern, args: &KernelArgs, arch: &str, cubin: Option<&Path>) -> Result<()> {
    let arch: weft::runtime::Arch = arch.parse()?;
    let kernel = generate(pattern, args)?;
    let (major, minor) = weft::runtime::nvrtc::version()?;
    let c = weft::runtime::nvrtc::compile_kernel(&kernel, arch)?;
    println!("kernel        {}", kernel.name);
    println!("pattern       {} = {pattern}", pattern.name);
    println!("target        {} (NVRTC {major}.{minor}), {:.0} ms", arch.name(), c.millis);
    println!("threads       {} per CTA", kernel.threads);
    match &c.report {
        Some(r) => {
            println!("registers     {} per thread", r.registers);
            println!("shared memory {} bytes dynamic, {} static", kernel.shared_bytes, r.static_shared);
            println!("stack frame   {} bytes", r.stack_frame);
            println!(
                "spills        {} bytes stored, {} loaded{}",
                r.spill_stores,
                r.spill_loads,
                if r.spill_stores + r.spill_loads > 0 { "  <- spills: try a smaller head dim or block" } else { "" }
            );
        }
        None => println!("resources     not reported by this NVRTC (no ptxas info in its log)"),
    }
    println!("cubin         {} bytes, ptx {} bytes", c.cubin.len(), c.ptx.len());
    if let Some(path) = cubin {
        std::fs::write(path, &c.cubin).with_context(|| format!("writing the CUBIN to {}", path.display()))?;
        println!("written       {}", path.display());
    }
    Ok(())
}

fn quickstart(out: &Path) -> Result<()> {
    println!("weft quickstart\n");
    println!("1. A pattern, written in weft's DSL (examples/patterns/video.toml):\n");
    for line in QUICKSTART_PATTERN.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        println!("     {line}");
    }
    let pattern = dsl::parse_pattern_file("examples/patterns/video.toml", QUICKSTART_PATTERN, "video")?;
    use dsl::builder::*;
    let built = Pattern::new("video", sink(64) | local(128) | vertical_vector().q_block(64).keep(top_k(64)));
    println!("\n   parsed and validated; content hash {}", pattern.hash());
    println!(
        "   the same pattern from the Rust builder hashes to {} ({})",
        built.hash().short(),
        if built.hash() == pattern.hash() { "identical" } else { "DIFFERENT" }
    );
    if built.hash() != pattern.hash() {
        bail!("the builder and the file disagree: this is a bug in weft");
    }

    println!("\n2. Its sparse index on synthetic Q/K with planted structure (4 heads, 1024 tokens, d = 64):\n");
    let args = InputArgs {
        seq: 1024,
        queries: None,
        heads: 4,
        kv_heads: Some(2),
        head_dim: 64,
        synthetic: Synthetic::Planted,
        seed: 7,
        qk: None,
        layer: None,
        block_m: None,
        block_n: None,
        universe: UniverseArg::All,
        recall_rows: 128,
    };
    let input = make_input(&args, &pattern)?;
    let r = analyse(&pattern, &input, &args)?;
    let (full, partial, cols) = r.index.entry_counts();
    println!("   built in {:.1} ms: {full} full blocks, {partial} partial blocks, {cols} columns", r.build_ms);
    println!("   density {:.2}% of pairs, recall {:.2}% of the softmax mass", 100.0 * r.density, 100.0 * r.recall.mean);

    println!("\n3. Reference attention over the index, checked against dense masked attention:\n");
    let v = Tensor::random(input.k.heads, input.k.tokens, 64, 11);
    let start = Instant::now();
    let sparse = pat::attention(&r.index, &input.q, &input.k, &v, r.scale)?;
    let sparse_ms = start.elapsed().as_secs_f64() * 1e3;
    let ix = &r.index;
    let dense = pat::dense_attention(|h, q, k| ix.contains_token(h, q, k), &input.q, &input.k, &v, r.scale)?;
    let diff = sparse.out.data.iter().zip(&dense.out.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("   sparse reference {sparse_ms:.0} ms; max |sparse - dense| = {diff:.2e}");
    if diff > 1e-5 {
        bail!("the sparse reference disagrees with dense masked attention: this is a bug in weft");
    }

    println!("\n4. Pictures of the block map:\n");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for head in 0..2 {
        let (w, h, rgb) = weft::viz::block_map(&r.index, head, 512);
        let path = out.join(format!("video_head{head}.png"));
        weft::viz::write_png(&path, w, h, &rgb).with_context(|| format!("cannot write {}", path.display()))?;
        println!("   wrote {}", path.display());
    }
    println!("   legend: {}", weft::viz::LEGEND);

    println!("\n5. The CUDA kernel for it (weft emit examples/patterns/video.toml prints it all):\n");
    let kernel = generate(
        &pattern,
        &KernelArgs {
            head_dim: 128,
            dtype: "bf16".into(),
            seq: 1024,
            block_m: None,
            block_n: None,
            stages: 2,
            wgmma: false,
            producer: false,
            persistent: false,
        },
    )?;
    for line in kernel.source.lines().take(5) {
        println!("   {line}");
    }
    match weft::runtime::nvrtc::check_available() {
        Ok(()) => {
            let c = weft::runtime::nvrtc::compile_kernel(&kernel, weft::runtime::Arch::SM90)?;
            match &c.report {
                Some(r) => println!(
                    "   compiled with NVRTC for sm_90 in {:.0} ms: {} registers, {} bytes spilled",
                    c.millis,
                    r.registers,
                    r.spill_stores + r.spill_loads
                ),
                None => println!("   compiled with NVRTC for sm_90 in {:.0} ms", c.millis),
            }
        }
        Err(e) => println!("   (not compiled: {e})"),
    }
    println!("\nNext steps need an NVIDIA GPU:");
    println!("   - run the kernel: scripts/gpu.sh builds the GPU tests, scripts/gpu-run.sh runs them there");
    println!("   - tune it and store it: weft autotune examples/patterns/video.toml --seq 16384 --heads 32");
    println!("   - load stored kernels without a compiler: weft::Runtime::open(None) in Rust");
    println!("\nTry: weft patterns | weft explain vertical-slash --seq 8192 | weft compile grid --arch sm_80");
    Ok(())
}
