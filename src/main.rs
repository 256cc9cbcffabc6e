//! The `weft` command.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use commands::args::{AutotuneArgs, CacheAction, InputArgs, KernelArgs, PatternArg, SearchArgs};
use commands::{autotune, cache, compile, explain, load_pattern, patterns, quickstart, search};

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
            patterns::print_patterns();
            Ok(())
        }
        Command::Explain { pattern, input, json } => explain::explain(&load_pattern(&pattern.pattern)?, &input, json),
        Command::Mask { pattern, input, head, png, npy, px } => {
            explain::mask(&load_pattern(&pattern.pattern)?, &input, head, png.as_deref(), npy.as_deref(), px)
        }
        Command::Emit { pattern, kernel } => compile::emit(&load_pattern(&pattern.pattern)?, &kernel),
        Command::Compile { pattern, kernel, arch, cubin } => {
            compile::compile(&load_pattern(&pattern.pattern)?, &kernel, &arch, cubin.as_deref())
        }
        Command::Search(args) => search::search(args),
        Command::Autotune(args) => autotune::autotune(args),
        Command::Cache { db, action } => cache::cache(db, action),
        Command::Quickstart { out } => quickstart::quickstart(&out),
    }
}
