//! NVRTC: CUDA C++ to CUBIN (and PTX), with the compiler's resource report.
//!
//! cudarc's safe wrapper returns only PTX and only logs failures; weft needs the CUBIN for the
//! device in hand and `ptxas -v`'s register, shared-memory and spill report, so this goes
//! through `cudarc::nvrtc::result`/`sys`. NVRTC needs no GPU: CI compiles every kernel here.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use crate::Error;

/// A target architecture, e.g. `sm_90` (H100/H200) or `sm_80` (A100).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability as `major * 10 + minor`.
    pub sm: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { sm: 80 };
    pub const SM90: Arch = Arch { sm: 90 };

    /// `sm_90` style name.
    pub fn name(&self) -> String {
        format!("sm_{}", self.sm)
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch, Error> {
        s.strip_prefix("sm_")
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n >= 80)
            .map(|sm| Arch { sm })
            .ok_or_else(|| Error::Usage(format!("architecture `{s}`: use sm_80 or later, e.g. sm_90")))
    }
}

/// Per-kernel resources from `ptxas -v`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceReport {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    /// Static shared memory (the kernels use dynamic shared memory, so usually 0).
    pub static_shared: u32,
}

/// The output of one compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub arch: Arch,
    /// The NVRTC options used (`--gpu-architecture=sm_90a` for arch-specific kernels).
    pub options: Vec<String>,
    pub cubin: Vec<u8>,
    pub ptx: String,
    pub log: String,
    /// `None` when this NVRTC's log carries no `ptxas info` lines.
    pub report: Option<ResourceReport>,
    pub millis: f64,
}

/// Whether libnvrtc can be loaded, with the error to show when it cannot.
pub fn check_available() -> Result<(), Error> {
    // cudarc panics on first use when the library is missing or is not NVRTC: ask first.
    crate::libs::check_nvrtc()
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32), Error> {
    check_available()?;
    let (mut major, mut minor) = (0, 0);
    // Safety: two out-parameters; libnvrtc was loaded by `check_available`.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Nvrtc { message: format!("nvrtcVersion: {e:?}"), log: String::new() })?;
    Ok((major, minor))
}

fn to_string(chars: Vec<c_char>) -> String {
    let bytes: Vec<u8> = chars.into_iter().take_while(|c| *c != 0).map(|c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn number_before(line: &str, word: &str) -> Option<u32> {
    let i = line.find(word)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas info` lines of the program log (`None` if there are none). A module with
/// several entry points reports each; the report holds the largest of each figure, so a spill
/// in any entry shows.
pub fn parse_report(log: &str) -> Option<ResourceReport> {
    if !log.contains("registers") {
        return None;
    }
    let mut r = ResourceReport::default();
    for line in log.lines() {
        for (word, field) in [
            ("registers", &mut r.registers),
            ("bytes spill stores", &mut r.spill_stores),
            ("bytes spill loads", &mut r.spill_loads),
            ("bytes stack frame", &mut r.stack_frame),
            ("bytes smem", &mut r.static_shared),
        ] {
            if let Some(n) = number_before(line, word) {
                *field = (*field).max(n);
            }
        }
    }
    Some(r)
}

/// Quotes the source lines NVRTC's errors point at (`name.cu(LINE): error: ...`).
fn annotate(log: &str, file: &str, source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    for l in log.lines() {
        out.push_str(l);
        out.push('\n');
        let at = l.strip_prefix(file).and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next());
        if let Some(n) = at.and_then(|n| n.parse::<usize>().ok()) {
            if let Some(text) = lines.get(n.wrapping_sub(1)) {
                out.push_str(&format!("    {n} | {}\n", text.trim_end()));
            }
        }
    }
    out
}

/// The NVRTC options weft compiles portable kernels with (arch-specific ones name `sm_90a`;
/// [`Compiled::options`] holds what a compile used).
pub fn options(arch: Arch) -> Vec<String> {
    options_for(&arch.name())
}

/// [`options`] for an architecture name (`sm_90`, or `sm_90a` for arch-specific features).
fn options_for(arch_name: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch_name}"),
        "--std=c++17".to_string(),
        "--use_fast_math".to_string(),
        "--ptxas-options=-v".to_string(),
    ]
}

/// Compiles `source` for `arch`, returning CUBIN, PTX, the log and the resource report.
pub fn compile(source: &str, name: &str, arch: Arch) -> Result<Compiled, Error> {
    compile_for(source, name, arch, &arch.name())
}

/// [`compile`] for `arch`'s arch-specific target (`sm_90a`): what `wgmma` and other features
/// that are not forward compatible need. The CUBIN runs on that exact architecture only.
pub fn compile_arch_specific(source: &str, name: &str, arch: Arch) -> Result<Compiled, Error> {
    compile_for(source, name, arch, &format!("{}a", arch.name()))
}

/// Compiles a generated kernel for `arch`: the portable target, or the arch-specific one when
/// the kernel needs it (`Kernel::arch_specific`: wgmma, sm_90 only).
pub fn compile_kernel(kernel: &weft_codegen::Kernel, arch: Arch) -> Result<Compiled, Error> {
    if !kernel.arch_specific {
        return compile(&kernel.source, &kernel.name, arch);
    }
    if arch.sm != 90 {
        return Err(Error::Usage(format!(
            "{} uses Hopper's wgmma and runs on sm_90 GPUs (H100, H200) only, not {}; use a config with \
             wgmma = false",
            kernel.name,
            arch.name()
        )));
    }
    compile_arch_specific(&kernel.source, &kernel.name, arch)
}

fn compile_for(source: &str, name: &str, arch: Arch, arch_name: &str) -> Result<Compiled, Error> {
    compile_with(source, name, arch, arch_name, &[])
}

/// Compiles a template file as it is, its `#include`s found in `include_dir` (the templates
/// folder, whose generated headers are samples): the check that every template is valid CUDA
/// on its own. Generated kernels need no include path.
pub fn compile_template(path: &std::path::Path, include_dir: &std::path::Path, arch: Arch) -> Result<Compiled, Error> {
    let source =
        std::fs::read_to_string(path).map_err(|e| Error::Usage(format!("reading template {}: {e}", path.display())))?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("template");
    let include = format!("--include-path={}", include_dir.display());
    compile_with(&source, name, arch, &format!("{}a", arch.name()), &[include])
}

fn compile_with(source: &str, name: &str, arch: Arch, arch_name: &str, extra: &[String]) -> Result<Compiled, Error> {
    check_available()?;
    let start = std::time::Instant::now();
    let file = format!("{name}.cu");
    let src = CString::new(source).map_err(|_| Error::Usage("the kernel source contains a NUL byte".into()))?;
    let file_c = CString::new(file.clone()).map_err(|_| Error::Usage("bad kernel name".into()))?;
    let nvrtc_err =
        |what: &str, e: result::NvrtcError| Error::Nvrtc { message: format!("{what}: {e:?}"), log: String::new() };
    let prog = result::create_program(&src, Some(&file_c)).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    let mut options = options_for(arch_name);
    options.extend_from_slice(extra);
    // Safety: `prog` is a live program created above; the options outlive the call.
    let compiled = unsafe { result::compile_program(prog, &options) };
    // Safety: `prog` is live (destroyed only by `finish`).
    let log = unsafe { result::get_program_log(prog) }.map(to_string).unwrap_or_default();
    let finish = |r: Result<Compiled, Error>| {
        // Safety: destroys `prog` once; nothing uses it afterwards.
        let _ = unsafe { result::destroy_program(prog) };
        r
    };
    if compiled.is_err() {
        return finish(Err(Error::Nvrtc {
            message: format!("NVRTC could not compile `{name}` for {arch_name}"),
            log: annotate(&log, &file, source),
        }));
    }
    // Safety: `prog` compiled successfully and is live.
    let ptx = match unsafe { result::get_ptx(prog) } {
        Ok(p) => to_string(p),
        Err(e) => return finish(Err(nvrtc_err("nvrtcGetPTX", e))),
    };
    let mut size = 0usize;
    // Safety: an out-parameter call on the live, compiled `prog`.
    let cubin = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().and_then(|_| {
        let mut buf = vec![0u8; size];
        // Safety: `buf` holds the `size` bytes NVRTC reported for this program's CUBIN.
        unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }.result().map(|_| buf)
    });
    let cubin = match cubin {
        Ok(c) => c,
        Err(e) => return finish(Err(nvrtc_err("nvrtcGetCUBIN", e))),
    };
    finish(Ok(Compiled {
        arch,
        options: options.clone(),
        cubin,
        ptx,
        report: parse_report(&log),
        log,
        millis: start.elapsed().as_secs_f64() * 1e3,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_parsing() {
        let log = "ptxas info    : Compiling entry function 'weft_attn_x' for 'sm_90'\n\
                   ptxas info    : Function properties for weft_attn_x\n\
                   \x20   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 384 bytes cmem[0]\n";
        let r = parse_report(log).unwrap();
        assert_eq!(
            r,
            ResourceReport { registers: 168, spill_stores: 8, spill_loads: 12, stack_frame: 16, static_shared: 0 }
        );
    }

    #[test]
    fn no_report_without_ptxas_lines() {
        assert_eq!(parse_report(""), None);
    }

    #[test]
    fn arch_names() {
        assert_eq!("sm_90".parse::<Arch>().unwrap(), Arch::SM90);
        assert!("sm_70".parse::<Arch>().is_err());
        assert!("hopper".parse::<Arch>().is_err());
    }
}
