//! The CUDA templates kernels are rendered from, and the render step.
//!
//! Templates are CUDA files that `#include` one another and a few headers generated per kernel
//! (`config.cuh`: the kernel's constants and names; `masks.cuh`: the index's mask predicates and
//! token map; `params.cuh`: the parameter structs of `abi.rs`; `wgmma_ops.cuh`: the wgmma
//! wrappers for the kernel's shapes). The templates folder holds sample versions of the
//! generated headers, so every template opens (and compiles) on its own in an editor. Rendering
//! inlines the includes, each file once, and puts each generated header's text where it is
//! first included: every kernel is one self-contained source, with no include path at compile
//! time.

use std::collections::HashSet;
use std::fmt::Write as _;

/// The template files by name (the names their `#include`s use).
const FILES: [(&str, &str); 24] = [
    ("attention.cu", include_str!("templates/attention.cu")),
    ("attention_shape.cuh", include_str!("templates/attention_shape.cuh")),
    ("attention_tiles.cuh", include_str!("templates/attention_tiles.cuh")),
    ("attention_pipeline.cuh", include_str!("templates/attention_pipeline.cuh")),
    ("attention_scheduler.cuh", include_str!("templates/attention_scheduler.cuh")),
    ("attention_wgmma.cuh", include_str!("templates/attention_wgmma.cuh")),
    ("attention_mask.cuh", include_str!("templates/attention_mask.cuh")),
    ("attention_softmax.cuh", include_str!("templates/attention_softmax.cuh")),
    ("attention_epilogue.cuh", include_str!("templates/attention_epilogue.cuh")),
    ("decode.cu", include_str!("templates/decode.cu")),
    ("merge.cu", include_str!("templates/merge.cu")),
    ("paged.cu", include_str!("templates/paged.cu")),
    ("repro_exp.cuh", include_str!("templates/repro_exp.cuh")),
    ("hopper.cu", include_str!("templates/hopper.cu")),
    ("index.cu", include_str!("templates/index.cu")),
    ("index_common.cuh", include_str!("templates/index_common.cuh")),
    ("index_repro.cuh", include_str!("templates/index_repro.cuh")),
    ("index_pool.cuh", include_str!("templates/index_pool.cuh")),
    ("index_columns.cuh", include_str!("templates/index_columns.cuh")),
    ("index_blocks.cuh", include_str!("templates/index_blocks.cuh")),
    ("index_lists.cuh", include_str!("templates/index_lists.cuh")),
    ("index_slash.cuh", include_str!("templates/index_slash.cuh")),
    ("prelude.cuh", include_str!("templates/prelude.cuh")),
    ("wgmma.cuh", include_str!("templates/wgmma.cuh")),
];

/// The headers generated per kernel (their files in the templates folder are samples).
pub(crate) const GENERATED: [&str; 4] = ["config.cuh", "masks.cuh", "params.cuh", "wgmma_ops.cuh"];

fn file(name: &str) -> Option<&'static str> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The file a line `#include "name"` names.
fn include_of(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("#include \"")?;
    rest.split('"').next()
}

/// The texts of `root` and of every template it reaches through includes, in inclusion order
/// (what a kernel made from `root` depends on besides its generated headers: part of its key).
pub(crate) fn closure(root: &str) -> Vec<&'static str> {
    fn walk(name: &str, seen: &mut HashSet<String>, out: &mut Vec<&'static str>) {
        let Some(text) = file(name) else { return };
        out.push(text);
        for inc in text.lines().filter_map(include_of) {
            if !GENERATED.contains(&inc) && seen.insert(inc.to_string()) {
                walk(inc, seen, out);
            }
        }
    }
    let mut seen = HashSet::from([root.to_string()]);
    let mut out = Vec::new();
    walk(root, &mut seen, &mut out);
    out
}

/// Renders template `root` under `header`: includes of templates are inlined (each file once),
/// includes of generated headers replaced by `generated`'s text for them (`None`: the kernel
/// does not use that header, e.g. the wgmma helpers of an mma.sync kernel). `#pragma once`
/// lines go, since the result is a single file.
pub(crate) fn render(header: &str, root: &str, generated: &[(&str, Option<String>)]) -> String {
    fn walk(text: &str, generated: &[(&str, Option<String>)], seen: &mut HashSet<String>, out: &mut String) {
        for line in text.lines() {
            if line.trim() == "#pragma once" {
                continue;
            }
            let Some(inc) = include_of(line) else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            if !seen.insert(inc.to_string()) {
                continue;
            }
            if let Some((_, text)) = generated.iter().find(|(n, _)| *n == inc) {
                match text {
                    Some(t) => {
                        let _ = writeln!(out, "// ---- {inc} (generated) ----");
                        out.push_str(t.trim_end());
                        out.push('\n');
                    }
                    None => {
                        let _ = writeln!(out, "// ({inc}: not used by this kernel)");
                    }
                }
            } else if let Some(t) = file(inc) {
                let _ = writeln!(out, "// ---- {inc} ----");
                walk(t, generated, seen, out);
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    let mut out = format!("{}\n", header.trim_end());
    let mut seen = HashSet::from([root.to_string()]);
    walk(file(root).unwrap_or_default(), generated, &mut seen, &mut out);
    out
}

/// `#define` lines for a kernel's flags.
pub(crate) fn defines(flags: &[(&str, bool)]) -> String {
    flags.iter().map(|(name, on)| format!("#define {name} {}\n", u8::from(*on))).collect()
}
