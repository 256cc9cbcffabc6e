//! One module per command; `main.rs` declares the command line and dispatches to them.

use anyhow::Result;
use weft::dsl::Pattern;

pub(crate) mod args;
pub(crate) mod autotune;
pub(crate) mod cache;
pub(crate) mod compile;
pub(crate) mod explain;
pub(crate) mod patterns;
pub(crate) mod quickstart;
pub(crate) mod search;

/// Longest synthetic sequence the CPU-side commands accept.
pub(crate) const MAX_SEQ: usize = 1 << 22;

pub(crate) fn load_pattern(arg: &str) -> Result<Pattern> {
    Ok(weft::analysis::load_pattern(arg, "cli")?)
}
