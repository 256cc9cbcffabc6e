//! # weft-dsl: the pattern IR
//!
//! Every sparse-attention pattern weft knows is one value of [`PatternExpr`]: a tree whose
//! leaves are static predicates over token positions, dynamic families chosen from Q and K
//! at run time (block, vertical-vector, vertical-slash, grid) and decode-time retrieval
//! operators; whose inner nodes are union, intersection, a virtual permutation and a ring
//! partition. The IR is plain serde data; it carries no behaviour beyond evaluation of
//! static predicates, validation and hashing. Semantics of the dynamic families live in
//! `weft-patterns`, lowering in `weft-codegen`.
//!
//! ## Three ways in, one IR
//! - the `#[sparse_pattern]` attribute (crate `weft-macros`, re-exported by `weft`), checked at
//!   compile time with errors at the offending token;
//! - the [`builder`] functions and operators, for code that assembles patterns at run time;
//! - text: the same expression syntax in a string ([`parse_pattern_str`]), or a TOML/JSON file
//!   ([`load_pattern_file`]) holding either that string or the serialized IR.
//!
//! All three go through the same parser or constructors and give the same IR and the same
//! [`PatternHash`].
//!
//! ## Hashing
//! [`Pattern::hash`] is BLAKE3 over a versioned canonical encoding ([`canonical`]): union and
//! intersection operands are flattened, sorted and deduplicated, and their static operands
//! merged, so `a | b` and `b | a` share kernels in the cache. The name is not hashed.

pub mod builder;
pub mod canonical;
mod display;
pub mod eval;
pub mod ir;
pub mod syntax;
pub mod validate;

use std::path::Path;

pub use canonical::{PatternHash, IR_VERSION};
pub use eval::Env;
pub use ir::*;
pub use validate::ValidationError;

/// Everything that can go wrong reading or checking a pattern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter out of range or a node in the wrong place.
    #[error("invalid pattern:\n  {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<ValidationError>),
    /// Pattern text that does not parse.
    #[error("{origin}:{line}:{column}: {message}\n  {snippet}")]
    Syntax { origin: String, line: usize, column: usize, message: String, snippet: String },
    /// A pattern file that cannot be read.
    #[error("cannot read pattern file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A pattern file whose structure is wrong.
    #[error("pattern file {path}: {message}")]
    File { path: String, message: String },
}

impl Pattern {
    /// A named pattern (not yet validated: see [`Pattern::validate`]).
    pub fn new(name: impl Into<String>, expr: impl Into<PatternExpr>) -> Pattern {
        Pattern { name: name.into(), expr: expr.into() }
    }

    /// Checks every parameter range and the tree's shape.
    pub fn validate(&self) -> Result<(), Error> {
        validate::validate(&self.expr).map_err(Error::Invalid)
    }

    /// The content hash (independent of the name).
    pub fn hash(&self) -> PatternHash {
        canonical::hash_expr(&self.expr)
    }

    /// The canonical form of the expression.
    pub fn canonical(&self) -> Pattern {
        Pattern { name: self.name.clone(), expr: canonical::canonicalize(&self.expr) }
    }

    /// The IR as pretty JSON (the `ir` form of a pattern file).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl PatternExpr {
    /// Whether the pairs depend only on positions, heads and lengths, not on Q and K (no
    /// dynamic selection anywhere): its index can be built once per shape and reused.
    pub fn is_static(&self) -> bool {
        match self {
            PatternExpr::Static(_) => true,
            PatternExpr::Block(b) => matches!(b.keep, BlockKeep::Where(_)),
            PatternExpr::VerticalVector(_)
            | PatternExpr::VerticalSlash(_)
            | PatternExpr::Grid(_)
            | PatternExpr::Retrieval(_) => false,
            PatternExpr::Union(items) | PatternExpr::Intersect(items) => items.iter().all(Self::is_static),
            PatternExpr::Permuted { inner, .. } | PatternExpr::Ring { inner, .. } => inner.is_static(),
        }
    }

    /// Whether a retrieval operator (a decode-time, one-query-per-row family) occurs.
    pub fn contains_retrieval(&self) -> bool {
        self.any_leaf(&|e| matches!(e, PatternExpr::Retrieval(_)))
    }

    /// Whether `f` holds for some leaf (a static predicate or a family), through unions,
    /// intersections, permutations and rings.
    pub fn any_leaf(&self, f: &dyn Fn(&PatternExpr) -> bool) -> bool {
        match self {
            PatternExpr::Union(items) | PatternExpr::Intersect(items) => items.iter().any(|i| i.any_leaf(f)),
            PatternExpr::Permuted { inner, .. } | PatternExpr::Ring { inner, .. } => inner.any_leaf(f),
            leaf => f(leaf),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.expr, f)
    }
}

fn syntax_error(origin: &str, src: &str, e: &syn::Error) -> Error {
    let start = e.span().start();
    let line_text = src.lines().nth(start.line.saturating_sub(1)).unwrap_or("");
    Error::Syntax {
        origin: origin.to_string(),
        line: start.line.max(1),
        column: start.column + 1,
        message: e.to_string(),
        snippet: format!("{line_text}\n  {}^", " ".repeat(start.column)),
    }
}

/// Parses DSL text such as `"causal & vertical_slash(vertical = top_k(1000))"` and validates it.
pub fn parse_pattern_str(name: &str, src: &str) -> Result<Pattern, Error> {
    parse_with_origin(name, src, "<pattern>")
}

/// The deepest bracket nesting a pattern's text may have: the parser and every pass over the
/// IR recurse on it, and a few thousand levels would overflow the stack.
pub const MAX_NESTING: usize = 64;
/// The most operator characters (`|`, `&`, arithmetic, comparisons) a pattern's text may hold:
/// a chain of `a | b | c ...` nests one level per operator in the IR.
pub const MAX_OPERATORS: usize = 1024;

/// Refuses text past [`MAX_NESTING`] or [`MAX_OPERATORS`] before it is parsed.
fn check_size(src: &str, origin: &str) -> Result<(), Error> {
    let (mut depth, mut deepest, mut ops) = (0usize, 0usize, 0usize);
    let mut first_over = None;
    for (line, text) in src.lines().enumerate() {
        for (column, c) in text.chars().enumerate() {
            match c {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                '|' | '&' | '+' | '-' | '*' | '/' | '%' | '<' | '>' | '=' | '!' => ops += 1,
                _ => {}
            }
            deepest = deepest.max(depth);
            if (depth > MAX_NESTING || ops > MAX_OPERATORS) && first_over.is_none() {
                first_over = Some((line + 1, column, text.to_string()));
            }
        }
    }
    let Some((line, column, text)) = first_over else { return Ok(()) };
    let message = if deepest > MAX_NESTING {
        format!("the pattern nests brackets {deepest} deep; at most {MAX_NESTING} levels are accepted")
    } else {
        format!(
            "the pattern has {ops} operators; at most {MAX_OPERATORS} are accepted (split it into several patterns)"
        )
    };
    let shown: String = text.chars().take(column + 1).skip(column.saturating_sub(40)).collect();
    Err(Error::Syntax {
        origin: origin.to_string(),
        line,
        column: column + 1,
        message,
        snippet: format!("{shown}\n  {}^", " ".repeat(shown.chars().count().saturating_sub(1))),
    })
}

fn parse_with_origin(name: &str, src: &str, origin: &str) -> Result<Pattern, Error> {
    check_size(src, origin)?;
    let expr: syn::Expr = syn::parse_str(src).map_err(|e| syntax_error(origin, src, &e))?;
    let expr = syntax::pattern(&expr).map_err(|e| syntax_error(origin, src, &e))?;
    Ok(Pattern::new(name, expr))
}

/// The on-disk form: a name and either the DSL text (`pattern`) or the serialized IR (`ir`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternFile {
    name: Option<String>,
    pattern: Option<String>,
    ir: Option<PatternExpr>,
}

/// Reads a pattern from TOML or JSON text. `origin` names the source in errors.
///
/// ```toml
/// name = "video"
/// pattern = "sink(64) | local(256) | vertical_vector(q_block = 128, keep = top_p(0.95))"
/// ```
pub fn parse_pattern_file(origin: &str, text: &str, default_name: &str) -> Result<Pattern, Error> {
    let file_err = |message: String| Error::File { path: origin.to_string(), message };
    let looks_json = text.trim_start().starts_with('{');
    let file: PatternFile = if looks_json {
        serde_json::from_str(text).map_err(|e| file_err(format!("invalid JSON: {e}")))?
    } else {
        toml::from_str(text).map_err(|e| file_err(format!("invalid TOML: {e}")))?
    };
    let name = file.name.unwrap_or_else(|| default_name.to_string());
    let pattern = match (file.pattern, file.ir) {
        (Some(src), None) => parse_with_origin(&name, &src, &format!("{origin} (pattern)"))?,
        (None, Some(expr)) => Pattern::new(name, expr),
        (Some(_), Some(_)) => {
            return Err(file_err("give either `pattern` (DSL text) or `ir` (serialized IR), not both".into()))
        }
        (None, None) => {
            return Err(file_err(
                "missing `pattern = \"...\"` (DSL text such as \"causal & window(1024)\") or `ir`".into(),
            ))
        }
    };
    pattern.validate()?;
    Ok(pattern)
}

/// Reads a `.toml` or `.json` pattern file; the name defaults to the file stem.
pub fn load_pattern_file(path: &Path) -> Result<Pattern, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("pattern");
    parse_pattern_file(&path.display().to_string(), &text, stem)
}
