//! # weft-runtime: NVRTC, module loading and launches
//!
//! The only crate that touches the GPU.
//!
//! - [`nvrtc`]: CUDA C++ to CUBIN for the device's architecture (PTX kept alongside), with
//!   the compiler's register/shared-memory/spill report; needs libnvrtc but no GPU.
//! - [`Gpu`]: a device, its stream, and an in-memory module cache keyed by (kernel key,
//!   architecture); [`Gpu::attention`] launches a generated attention kernel over device
//!   buffers (one sequence or a packed batch) after checking every shape, head dim and index
//!   against the kernel's config; [`Gpu::decode`] runs split-KV decode and its merge;
//!   [`Gpu::merge`] combines partial results (e.g. ring steps).
//!
//! A missing libcuda or libnvrtc, or no GPU, is an [`Error`] that says what to install or
//! check; cudarc would panic on first use, so the libraries are probed first.
//!
//! - The `device_index` module: indexes built on the device from Q and K, each equal to the
//!   CPU builder's, from a static plan (`weft_codegen::plan`) whose device copy is
//!   kept: [`Gpu::build_vv_index`] (vertical vectors: approximate tensor-core scores with a
//!   proven bound, exact f64 scores at the cut, every pair's for top-p),
//!   [`Gpu::build_block_index`] (block top-k / top-p / threshold, exact f64 scores) and
//!   [`Gpu::build_vs_index`] (vertical-slash and grid column lines, an exact f64 estimate in
//!   `weft_patterns::repro`'s arithmetic). A build only queues work; an [`IndexBuild`] waits
//!   for it and reports it on request.
//! - [`Runtime`]: GPU 0 with the kernel database; [`Runtime::attention_layer`] runs one layer,
//!   each head with the config tuned for its pattern and shape (or the default, with a
//!   warning), one launch per group of heads sharing a kernel (see the `layer` module).

#![deny(clippy::undocumented_unsafe_blocks)]

mod device_index;
mod external;
mod host_memory;
mod launch;
mod layer;
mod libs;
pub mod nvrtc;
mod paged;
pub mod timing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream};
use weft_codegen::abi::{AttentionParams, DecodeParams, DevPtr, MergeParams};
use weft_codegen::{Kernel, KernelConfig, ATTENTION_ENTRY, DECODE_ENTRY, MERGE_ENTRY};

use launch::{launch, launch_threads, Args};
use weft_patterns::{BatchIndex, SparseIndex};

pub use device_index::{IndexBuild, IndexBuildReport, VvStrategy, LIST_BOUND_BYTES};
pub use external::{Borrowed, ExternalTensors};
pub use layer::{paged_tune_key, tune_key, LaunchReport, LayerPlan};
pub use nvrtc::{Arch, Compiled, ResourceReport};
pub use paged::{HotStats, PagedKvCache, PagedOptions, PagedShape};

/// Everything that can go wrong compiling, loading or launching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared library is not installed or not on the loader path.
    #[error("{library} could not be loaded: {help}")]
    MissingLibrary { library: &'static str, help: String },
    /// NVRTC rejected a program.
    #[error("{message}\n{log}")]
    Nvrtc { message: String, log: String },
    /// The CUDA driver failed.
    #[error("CUDA driver: {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// Buffers or an index that do not fit the kernel.
    #[error("launch: {0}")]
    Shape(String),
    /// A bad argument from the caller.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Codegen(#[from] weft_codegen::Error),
    /// The kernel database.
    #[error(transparent)]
    Cache(#[from] weft_cache::Error),
    /// An index or its inputs (building, gathering heads, packing a batch).
    #[error("index: {0}")]
    Index(#[from] weft_patterns::Error),
}

fn driver(what: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    let what = what.into();
    move |source| Error::Driver { what, source }
}

/// Checks that libcuda can be loaded and is a driver for the CUDA 13 API.
pub fn check_driver() -> Result<(), Error> {
    libs::check_driver()
}

/// The sparse index of a packed batch (one sequence or more) on the device.
pub struct DeviceIndex {
    /// Heads of the index (the launch grid's second axis, or with a persistent kernel a factor
    /// of the rows its CTAs walk).
    pub heads: usize,
    /// The layer's query head each index head serves (identity unless heads were gathered).
    pub head_map: Vec<usize>,
    /// Query and key tokens over all sequences.
    pub nq: usize,
    pub nk: usize,
    pub block_m: usize,
    pub block_n: usize,
    /// Sequences, and query blocks over all of them (the launch grid).
    pub batch: usize,
    pub q_blocks: usize,
    seq_q: CudaSlice<i32>,
    seq_k: CudaSlice<i32>,
    seq_qb: CudaSlice<i32>,
    block_ptr: CudaSlice<u32>,
    block_idx: CudaSlice<u32>,
    block_mask: CudaSlice<u16>,
    col_ptr: CudaSlice<u32>,
    col_idx: CudaSlice<u32>,
    col_mask: CudaSlice<u16>,
    head_map_dev: CudaSlice<i32>,
    /// Built by [`Gpu::upload_gathered`]: may serve a subset of the layer's heads.
    gathered: bool,
}

impl DeviceIndex {
    /// The six CSR arrays' addresses: block_ptr, block_idx, block_mask, col_ptr, col_idx,
    /// col_mask.
    fn csr<'a>(&'a self, a: &mut Args<'a>) -> [DevPtr; 6] {
        [
            a.r(&self.block_ptr),
            a.r(&self.block_idx),
            a.r(&self.block_mask),
            a.r(&self.col_ptr),
            a.r(&self.col_idx),
            a.r(&self.col_mask),
        ]
    }
}

/// Shapes of one attention call: Q `[hq, nq, d]`, K and V `[hkv, nk, d]`, O `[hq, nq, d]`,
/// LSE `[hq, nq]`, all contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub head_dim: usize,
}

/// The module cache key of one entry point of `kernel`.
fn entry_key(kernel: &Kernel, entry: Option<&str>) -> String {
    match entry {
        None => kernel.key.clone(),
        Some(e) => format!("{}#{e}", kernel.key),
    }
}

/// A device copy of an index-building plan (its type is the builder's).
type PlanCopy = Arc<dyn std::any::Any + Send + Sync>;

/// Knobs of a [`Gpu`] for tests and benchmarks ([`Gpu::set_options`]); the defaults are what
/// every user gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// Index builds time each kernel with CUDA events, for [`IndexBuildReport::kernel_ms`]
    /// (benchmarks); off by default, since the events cost host time on every build.
    pub time_index_kernels: bool,
    /// The most CTAs persistent kernels ([`KernelConfig::persistent`]) run on; 0 (the
    /// default): one per SM. Fewer leave SMs to concurrent work, and in tests make each CTA
    /// walk many rows.
    pub persistent_ctas: usize,
    /// Block index builds (top_k and threshold) cache each row's keys in shared memory when
    /// its key blocks, rounded up to a multiple of 32, are at most this many (and at most 1536,
    /// what fits), and read the scores on every selection pass beyond: 0 makes every build take
    /// that path (tests). Default: no limit of its own.
    pub block_top_cache: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { time_index_kernels: false, persistent_ctas: 0, block_top_cache: usize::MAX }
    }
}

/// One GPU with its stream and loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub arch: Arch,
    pub name: String,
    pub sm_count: u32,
    modules: Mutex<HashMap<(String, Arch), CudaFunction>>,
    /// Device copies of index-building plans, by plan id, with when each was last used (see
    /// `device_index`).
    plan_copies: Mutex<HashMap<u64, (u64, PlanCopy)>>,
    /// The kernel database and this GPU's toolchain (its key prefix), when attached.
    db: Option<(weft_cache::Db, weft_cache::Toolchain)>,
    /// [`GpuOptions`] (a lock: launches read it once each).
    options: Mutex<GpuOptions>,
    /// [`Gpu::decode`]'s split-KV partials, kept for the next call of the same size on the
    /// same stream (a decode loop allocates them once).
    decode_partials: Mutex<Option<DecodePartials>>,
}

/// Partial outputs and log-sum-exps of a split-KV decode, and the stream they were last used
/// on.
struct DecodePartials {
    stream: usize,
    opart: CudaSlice<f32>,
    lpart: CudaSlice<f32>,
}

/// Where [`Gpu::load_traced`] found a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadSource {
    /// Already loaded in this process.
    Memory,
    /// CUBIN from the kernel database: no NVRTC call.
    Database,
    /// Compiled with NVRTC now (and stored, when a database is attached).
    Compiled,
}

/// Refuses a host transfer (`what`) on a stream that is being captured into a CUDA graph: the
/// graph would replay a copy of host memory that no longer holds the data, or wait for the
/// host. The first call at a shape does such transfers (static indexes, index plans); calls
/// after it at the same shape do none.
pub(crate) fn refuse_in_capture(s: &CudaStream, what: &str) -> Result<(), Error> {
    if !capturing(s)? {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{what} needs the host, which a CUDA graph capture cannot record: run this call once at the same \
         shapes before capturing (it prepares the indexes and plans the capture then reuses), or use a \
         pattern whose index weft builds on the GPU"
    )))
}

/// Whether `s` is being captured into a CUDA graph.
pub(crate) fn capturing(s: &CudaStream) -> Result<bool, Error> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // Safety: a query on a live stream.
    unsafe { sys::cuStreamIsCapturing(s.cu_stream(), &mut status) }
        .result()
        .map_err(driver("asking whether the stream is capturing"))?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// The kernels take a positive finite softmax scale: they fold it into base-2 exponents and
/// mask scores with -inf before scaling, which a negative scale would turn into +inf.
fn check_scale(scale: f32) -> Result<(), Error> {
    if scale > 0.0 && scale.is_finite() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "the softmax scale must be positive and finite, got {scale}; the usual one is 1/sqrt(head_dim)"
    )))
}

/// Memory the device's stream-ordered pool keeps after frees, for the next allocations.
const POOL_KEEP_BYTES: u64 = 8 << 30;

/// Lets the device's default memory pool keep up to [`POOL_KEEP_BYTES`] of freed memory
/// instead of returning it to the driver at every synchronisation (its default): index builds
/// allocate their lists and scratch afresh on each call, and remapping them each time would
/// cost more than the work. Best effort: without memory pools nothing changes. The pool is the
/// process's: other libraries in it that allocate with `cudaMallocAsync` on the default pool
/// share the setting (and the kept memory is not available to allocators outside the pool).
fn keep_freed_memory(ctx: &CudaContext) {
    let mut pool = std::ptr::null_mut();
    let mut keep = POOL_KEEP_BYTES;
    // Safety: plain driver calls on this context's device; `keep` outlives the call.
    let set = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().and_then(|()| {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
            .result()
        })
    };
    if let Err(e) = set {
        tracing::debug!(error = %e, "the device's memory pool keeps its default release threshold");
    }
}

impl Gpu {
    /// Opens device `ordinal`.
    pub fn open(ordinal: usize) -> Result<Gpu, Error> {
        check_driver()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Driver {
            what: format!("cannot open GPU {ordinal} (is there an NVIDIA GPU and a working driver?)"),
            source: e,
        })?;
        let (major, minor) = ctx.compute_capability().map_err(driver("compute capability"))?;
        let name = ctx.name().map_err(driver("device name"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("multiprocessor count"))? as u32;
        let stream = ctx.default_stream();
        keep_freed_memory(&ctx);
        Ok(Gpu {
            ctx,
            stream,
            arch: Arch { sm: (major * 10 + minor) as u32 },
            name,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            plan_copies: Mutex::new(HashMap::new()),
            db: None,
            options: Mutex::new(GpuOptions::default()),
            decode_partials: Mutex::new(None),
        })
    }

    /// The stream every launch and copy of this GPU is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The test and benchmark knobs now in force.
    pub fn options(&self) -> GpuOptions {
        self.options.lock().map(|o| *o).unwrap_or_default()
    }

    /// Sets the test and benchmark knobs.
    pub fn set_options(&self, options: GpuOptions) {
        if let Ok(mut o) = self.options.lock() {
            *o = options;
        }
    }

    /// What kernels compiled here are valid for: the key prefix of every cache entry.
    pub fn toolchain(&self) -> Result<weft_cache::Toolchain, Error> {
        let mut driver_version = 0;
        // Safety: a plain out-parameter call; libcuda was loaded by `Gpu::open`.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result().map_err(driver("driver version"))?;
        Ok(weft_cache::Toolchain {
            gpu_name: self.name.clone(),
            sm: self.arch.sm,
            sm_count: self.sm_count,
            driver_version,
            nvrtc_version: nvrtc::version()?,
            codegen_version: weft_codegen::CODEGEN_VERSION,
        })
    }

    /// Attaches a kernel database: [`Gpu::load`] then takes stored CUBIN for this exact
    /// toolchain before compiling, and stores what it compiles.
    pub fn attach_db(&mut self, db: weft_cache::Db) -> Result<(), Error> {
        let tc = self.toolchain()?;
        self.db = Some((db, tc));
        Ok(())
    }

    /// Loads `kernel` from a CUBIN (and its PTX) compiled elsewhere, e.g. by the tuner's
    /// parallel compile, so later launches find it in memory.
    pub fn load_cubin(&self, kernel: &Kernel, cubin: Vec<u8>, ptx: String) -> Result<CudaFunction, Error> {
        self.install(kernel, cubin, ptx)
    }

    /// Loads a module from CUBIN for this device (the PTX, JIT-compiled by the driver, if the
    /// CUBIN is refused), raises its shared-memory limit and keeps it in the module cache.
    fn install(&self, kernel: &Kernel, cubin: Vec<u8>, ptx: String) -> Result<CudaFunction, Error> {
        let mut f = self.install_entries(kernel, cubin, ptx, &[None])?;
        f.pop().ok_or_else(|| Error::Usage(format!("{} has no entry point", kernel.name)))
    }

    /// [`Gpu::install`] for several entry points of one module: `None` is `kernel.name`,
    /// `Some(e)` is `{kernel.name}_{e}` (cached under the kernel key plus `#e`).
    fn install_entries(
        &self,
        kernel: &Kernel,
        cubin: Vec<u8>,
        ptx: String,
        entries: &[Option<&str>],
    ) -> Result<Vec<CudaFunction>, Error> {
        let module = match self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(kernel = %kernel.name, error = %e, "CUBIN refused, loading PTX");
                self.ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(driver(format!("loading {} (CUBIN and PTX)", kernel.name)))?
            }
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let name = match entry {
                None => kernel.name.clone(),
                Some(e) => format!("{}_{e}", kernel.name),
            };
            let f = module.load_function(&name).map_err(driver(format!("finding {name}")))?;
            // The dynamic limit is what the kernel may ask for, within what the entry's own
            // static shared memory leaves of the device's per-block maximum (entries of one
            // module differ).
            let optin = self
                .ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .unwrap_or(kernel.shared_bytes as i32);
            let fixed = f.get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).unwrap_or(0);
            let limit = (kernel.shared_bytes as i32).min(optin - fixed).max(0);
            f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit)
                .map_err(driver(format!("raising the shared-memory limit of {name} to {limit} bytes")))?;
            if let Ok(mut m) = self.modules.lock() {
                m.insert((entry_key(kernel, *entry), self.arch), f.clone());
            }
            out.push(f);
        }
        Ok(out)
    }

    /// Loads the entry points `entries` of a multi-entry kernel (e.g. the index builder):
    /// one compile (or database read) for all of them.
    pub fn load_entries(&self, kernel: &Kernel, entries: &[&str]) -> Result<Vec<CudaFunction>, Error> {
        if let Ok(m) = self.modules.lock() {
            let cached: Option<Vec<CudaFunction>> =
                entries.iter().map(|e| m.get(&(entry_key(kernel, Some(e)), self.arch)).cloned()).collect();
            if let Some(fs) = cached {
                return Ok(fs);
            }
        }
        let (cubin, ptx) = match self.stored(kernel) {
            Some(r) => (r.cubin, r.ptx),
            None => {
                let compiled = nvrtc::compile_kernel(kernel, self.arch)?;
                self.store(kernel, &compiled)?;
                (compiled.cubin, compiled.ptx)
            }
        };
        let entries: Vec<Option<&str>> = entries.iter().map(|e| Some(*e)).collect();
        self.install_entries(kernel, cubin, ptx, &entries)
    }

    /// [`Gpu::load_entries`] for the entry points of a codegen table.
    pub(crate) fn load_module(
        &self,
        kernel: &Kernel,
        entries: &[weft_codegen::abi::Entry],
    ) -> Result<launch::Module, Error> {
        let names: Vec<&str> = entries.iter().map(|e| e.name).collect();
        Ok(launch::Module::new(entries, self.load_entries(kernel, &names)?))
    }

    /// Takes the kernel database back (to hand it to another `Gpu`: sled allows one opener).
    pub fn detach_db(&mut self) -> Option<weft_cache::Db> {
        self.db.take().map(|(db, _)| db)
    }

    /// Compiles (once per kernel key and architecture) and loads `kernel`.
    pub fn load(&self, kernel: &Kernel) -> Result<CudaFunction, Error> {
        self.load_traced(kernel).map(|(f, _)| f)
    }

    /// [`Gpu::load`], saying where the kernel came from.
    pub fn load_traced(&self, kernel: &Kernel) -> Result<(CudaFunction, LoadSource), Error> {
        if let Some(f) = self.loaded(kernel)? {
            return Ok((f, LoadSource::Memory));
        }
        let (cubin, ptx, source) = match self.stored(kernel) {
            Some(r) => (r.cubin, r.ptx, LoadSource::Database),
            None => {
                let compiled = nvrtc::compile_kernel(kernel, self.arch)?;
                self.store(kernel, &compiled)?;
                (compiled.cubin, compiled.ptx, LoadSource::Compiled)
            }
        };
        let f = self.install(kernel, cubin, ptx)?;
        Ok((f, source))
    }

    /// `kernel` from the module cache, if it is loaded already.
    fn loaded(&self, kernel: &Kernel) -> Result<Option<CudaFunction>, Error> {
        let modules = self.modules.lock().map_err(|_| Error::Usage("module cache poisoned".into()))?;
        Ok(modules.get(&(kernel.key.clone(), self.arch)).cloned())
    }

    /// `kernel`'s key in the attached database, with the database.
    fn db_key(&self, kernel: &Kernel) -> Option<(&weft_cache::Db, weft_cache::KernelKey)> {
        let (db, tc) = self.db.as_ref()?;
        Some((db, weft_cache::KernelKey { toolchain: tc.clone(), kernel: kernel.key.clone(), arch: self.arch.name() }))
    }

    /// `kernel`'s record in the attached database, if one is stored under this toolchain.
    fn stored(&self, kernel: &Kernel) -> Option<weft_cache::KernelRecord> {
        let (db, key) = self.db_key(kernel)?;
        match db.kernel(&key) {
            Ok(r) => r.filter(|r| r.name == kernel.name),
            Err(e) => {
                // An unreadable entry is re-compiled and overwritten, not fatal.
                tracing::warn!(kernel = %kernel.name, error = %e, "kernel database entry ignored");
                None
            }
        }
    }

    /// Stores a freshly compiled kernel in the attached database (if any).
    fn store(&self, kernel: &Kernel, compiled: &Compiled) -> Result<(), Error> {
        tracing::debug!(kernel = %kernel.name, ms = compiled.millis, report = ?compiled.report, "compiled");
        let Some((db, key)) = self.db_key(kernel) else { return Ok(()) };
        let record = kernel_record(kernel, &compiled.cubin, &compiled.ptx, &compiled.options);
        db.put_kernel(&key, &record).map_err(|e| Error::Usage(format!("storing {}: {e}", kernel.name)))
    }

    /// Loads several kernels, compiling those that are neither loaded nor stored in parallel
    /// (NVRTC runs on every core), so a batch of new kernels costs about one compile.
    pub fn load_all(&self, kernels: &[&Kernel]) -> Result<(), Error> {
        use rayon::prelude::*;
        // Loaded ones stay, stored ones load from their record (read once), the rest compile.
        let mut missing: Vec<&Kernel> = Vec::new();
        for k in kernels {
            if self.loaded(k)?.is_some() || missing.iter().any(|m| m.key == k.key) {
                continue;
            }
            match self.stored(k) {
                Some(r) => {
                    self.install(k, r.cubin, r.ptx)?;
                }
                None => missing.push(k),
            }
        }
        let compiled: Vec<Result<Compiled, Error>> =
            missing.par_iter().map(|k| nvrtc::compile_kernel(k, self.arch)).collect();
        for (k, c) in missing.iter().zip(compiled) {
            let c = c?;
            self.store(k, &c)?;
            self.install(k, c.cubin, c.ptx)?;
        }
        Ok(())
    }

    /// Copies the index of one sequence to the device.
    pub fn upload_index(&self, ix: &SparseIndex) -> Result<DeviceIndex, Error> {
        let b = BatchIndex::single(ix)?;
        self.upload_batch(&b)
    }

    /// Copies the index of a packed batch to the device.
    pub fn upload_batch(&self, ix: &BatchIndex) -> Result<DeviceIndex, Error> {
        self.upload_mapped(ix, (0..ix.heads).collect(), false)
    }

    /// Copies an index whose heads serve the layer's query heads `head_map` (one entry per
    /// index head, e.g. from [`SparseIndex::gather_heads`]) to the device.
    pub fn upload_gathered(&self, ix: &SparseIndex, head_map: Vec<usize>) -> Result<DeviceIndex, Error> {
        let b = BatchIndex::single(ix)?;
        self.upload_mapped(&b, head_map, true)
    }

    /// Uploads a packed batch's index of the query heads `head_map` (index head `i` serves
    /// query head `head_map[i]`).
    pub fn upload_batch_mapped(&self, ix: &BatchIndex, head_map: Vec<usize>) -> Result<DeviceIndex, Error> {
        self.upload_mapped(ix, head_map, true)
    }

    fn upload_mapped(&self, ix: &BatchIndex, head_map: Vec<usize>, gathered: bool) -> Result<DeviceIndex, Error> {
        if head_map.len() != ix.heads || head_map.iter().any(|h| *h > i32::MAX as usize) {
            return Err(Error::Shape(format!(
                "a head map of {} entries for an index of {} heads",
                head_map.len(),
                ix.heads
            )));
        }
        let s = &self.stream;
        refuse_in_capture(s, "uploading an index")?;
        // Empty lists still need a valid pointer.
        let nonempty_u32 = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
        let nonempty_u16 = |v: &[u16]| if v.is_empty() { vec![0u16] } else { v.to_vec() };
        let up = "uploading the index";
        let last = |v: &[i32]| v.last().copied().unwrap_or(0).max(0) as usize;
        let map: Vec<i32> = head_map.iter().map(|h| *h as i32).collect();
        Ok(DeviceIndex {
            heads: ix.heads,
            head_map_dev: s.clone_htod(&map).map_err(driver(up))?,
            head_map,
            gathered,
            nq: last(&ix.seq_q),
            nk: last(&ix.seq_k),
            block_m: ix.block_m,
            block_n: ix.block_n,
            batch: ix.batch(),
            q_blocks: last(&ix.seq_qb),
            seq_q: s.clone_htod(&ix.seq_q).map_err(driver(up))?,
            seq_k: s.clone_htod(&ix.seq_k).map_err(driver(up))?,
            seq_qb: s.clone_htod(&ix.seq_qb).map_err(driver(up))?,
            block_ptr: s.clone_htod(&ix.block_ptr).map_err(driver(up))?,
            block_idx: s.clone_htod(&nonempty_u32(&ix.block_idx)).map_err(driver(up))?,
            block_mask: s.clone_htod(&nonempty_u16(&ix.block_mask)).map_err(driver(up))?,
            col_ptr: s.clone_htod(&ix.col_ptr).map_err(driver(up))?,
            col_idx: s.clone_htod(&nonempty_u32(&ix.col_idx)).map_err(driver(up))?,
            col_mask: s.clone_htod(&nonempty_u16(&ix.col_mask)).map_err(driver(up))?,
        })
    }

    /// Launches `kernel` (generated for `config`) over `index` on the stream. For a packed
    /// batch, `shape.nq` and `shape.nk` are the token totals.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        kernel: &Kernel,
        config: &KernelConfig,
        index: &DeviceIndex,
        shape: AttnShape,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        scale: f32,
    ) -> Result<(), Error> {
        check_kernel(kernel, config)?;
        check_launch(config, index, shape, [q.len(), k.len(), v.len(), out.len(), lse.len()])?;
        check_scale(scale)?;
        let f = self.load(kernel)?;
        if index.q_blocks == 0 {
            return Ok(());
        }
        // A persistent kernel takes one CTA per SM (or fewer: `GpuOptions::persistent_ctas`; at most
        // one per row) and walks the rows.
        let rows = index.q_blocks * index.heads;
        let extents = if config.persistent {
            let limit = self.options().persistent_ctas;
            let ctas = if limit == 0 { self.sm_count.max(1) as usize } else { limit };
            [rows.min(ctas), 1, 1]
        } else {
            [index.q_blocks, index.heads, 1]
        };
        let mut a = Args::new(&self.stream);
        let [block_ptr, block_idx, block_mask, col_ptr, col_idx, col_mask] = index.csr(&mut a);
        let params = AttentionParams {
            q: a.r(q),
            k: a.r(k),
            v: a.r(v),
            o: a.w(out),
            lse: a.w(lse),
            block_ptr,
            block_idx,
            block_mask,
            col_ptr,
            col_idx,
            col_mask,
            seq_q: a.r(&index.seq_q),
            seq_k: a.r(&index.seq_k),
            seq_qb: a.r(&index.seq_qb),
            head_map: a.r(&index.head_map_dev),
            batch: index.batch as i32,
            total_q: shape.nq as i32,
            total_k: shape.nk as i32,
            hq: shape.hq as i32,
            hkv: shape.hkv as i32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            index_heads: index.heads as i32,
        };
        // Safety: every address comes from `a`, and `check_launch` verified each buffer's
        // length against the shapes the kernel indexes with.
        unsafe {
            launch_threads(
                &self.stream,
                &f,
                &ATTENTION_ENTRY,
                extents,
                config.threads(),
                config.shared_bytes(),
                params,
                a,
            )
        }
    }
}

impl Gpu {
    /// Runs the wgmma probe `kernel` ([`weft_codegen::emit_wgmma_probe`]): S = Q K^T and
    /// O = bf16(S) V for Q `[64, d]`, K and V `[keys, d]` (bf16 bits), S and O in f32.
    pub fn wgmma_probe(
        &self,
        kernel: &Kernel,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        s: &mut CudaSlice<f32>,
        o: &mut CudaSlice<f32>,
    ) -> Result<(), Error> {
        let (d, keys) = (kernel.head_dim as usize, weft_codegen::WGMMA_PROBE_KEYS as usize);
        if q.len() != 64 * d || k.len() != keys * d || v.len() != keys * d || s.len() != 64 * keys || o.len() != 64 * d
        {
            return Err(Error::Shape(format!(
                "the wgmma probe takes Q [64, {d}], K and V [{keys}, {d}], S and O to match"
            )));
        }
        let f = self.load(kernel)?;
        let mut a = Args::new(&self.stream);
        let params = weft_codegen::abi::ProbeParams { q: a.r(q), k: a.r(k), v: a.r(v), s: a.w(s), o: a.w(o) };
        // Safety: addresses from `a`, lengths checked above.
        unsafe { launch(&self.stream, &f, &weft_codegen::PROBE_ENTRY, [1, 1, 1], kernel.shared_bytes, params, a) }
    }

    /// Decode over an index with one query per row (`block_m = 1`): `splits` CTAs per row
    /// write f32 partials that `merge` (from `emit_merge(.., Partial::F32)`) combines into
    /// `out` and `lse`. `splits` = 0 picks enough splits to fill the GPU.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        kernel: &Kernel,
        merge: &Kernel,
        index: &DeviceIndex,
        shape: AttnShape,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        scale: f32,
        splits: usize,
    ) -> Result<(), Error> {
        if shape.head_dim != kernel.head_dim as usize || shape.head_dim != merge.head_dim as usize {
            return Err(Error::Shape(format!(
                "head dim {} but the kernels were generated for {} and {}",
                shape.head_dim, kernel.head_dim, merge.head_dim
            )));
        }
        if index.gathered {
            return Err(Error::Shape("decode runs over an index of every query head, not gathered heads".into()));
        }
        if index.block_m != 1 {
            return Err(Error::Shape(format!(
                "decode needs an index with one query per row, this one has {}",
                index.block_m
            )));
        }
        check_shapes(index, shape, [q.len(), k.len(), v.len(), out.len(), lse.len()])?;
        check_scale(scale)?;
        let rows = shape.hq * shape.nq;
        let splits = self.decode_splits_for(rows, splits);
        let s = &self.stream;
        // The partials of the last call when they fit and were used on this stream (its work
        // is ordered before this call's), else new ones.
        let (olen, llen) = (splits * rows * shape.head_dim, splits * rows);
        let mut kept =
            self.decode_partials.lock().map_err(|_| Error::Usage("the decode partials' lock is poisoned".into()))?;
        let id = s.cu_stream() as usize;
        if !kept.as_ref().is_some_and(|p| p.stream == id && p.opart.len() == olen && p.lpart.len() == llen) {
            let what = "allocating decode partials";
            *kept = Some(DecodePartials {
                stream: id,
                opart: s.alloc_zeros::<f32>(olen).map_err(driver(what))?,
                lpart: s.alloc_zeros::<f32>(llen).map_err(driver(what))?,
            });
        }
        let DecodePartials { opart, lpart, .. } = kept.as_mut().expect("just made");
        let f = self.load(kernel)?;
        let mut a = Args::new(s);
        let [block_ptr, block_idx, block_mask, col_ptr, col_idx, col_mask] = index.csr(&mut a);
        let params = DecodeParams {
            q: a.r(q),
            k: a.r(k),
            v: a.r(v),
            opart: a.w(opart),
            lsepart: a.w(lpart),
            block_ptr,
            block_idx,
            block_mask,
            col_ptr,
            col_idx,
            col_mask,
            nq: shape.nq as i32,
            nk: shape.nk as i32,
            hq: shape.hq as i32,
            hkv: shape.hkv as i32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            splits: splits as i32,
        };
        // Safety: addresses from `a`; lengths checked above, partials allocated for them.
        unsafe { launch(s, &f, &DECODE_ENTRY, [shape.nq * splits, shape.hq, 1], 0, params, a) }?;
        self.merge(merge, opart, lpart, splits, rows, shape.head_dim, out, lse)
    }

    /// Key ranges per row of a split-KV decode over `rows` rows: `requested` (at most 1024),
    /// or for 0 enough CTAs to give each SM about four (1 to 64).
    pub(crate) fn decode_splits_for(&self, rows: usize, requested: usize) -> usize {
        if requested == 0 {
            (4 * self.sm_count as usize).div_ceil(rows.max(1)).clamp(1, 64)
        } else {
            requested.min(1024)
        }
    }

    /// Merges `parts` partial results (`[parts, rows, head_dim]` and `[parts, rows]`).
    #[allow(clippy::too_many_arguments)]
    pub fn merge<T: cudarc::driver::DeviceRepr>(
        &self,
        merge: &Kernel,
        partials: &CudaSlice<T>,
        lses: &CudaSlice<f32>,
        parts: usize,
        rows: usize,
        head_dim: usize,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), Error> {
        if head_dim != merge.head_dim as usize {
            return Err(Error::Shape(format!(
                "head dim {head_dim} but the merge kernel was generated for {}",
                merge.head_dim
            )));
        }
        if partials.len() != parts * rows * head_dim
            || lses.len() != parts * rows
            || out.len() != rows * head_dim
            || lse.len() != rows
        {
            return Err(Error::Shape(format!(
                "merge of {parts} parts x {rows} rows x {head_dim}: got {} partial values, {} partial lse, {} outputs, {} lse",
                partials.len(),
                lses.len(),
                out.len(),
                lse.len()
            )));
        }
        let f = self.load(merge)?;
        let mut a = Args::new(&self.stream);
        let params = MergeParams {
            parts: a.r(partials),
            lses: a.r(lses),
            o: a.w(out),
            lse: a.w(lse),
            nparts: parts as i32,
            rows: rows as i32,
        };
        // Safety: addresses from `a`; lengths checked above.
        unsafe { launch(&self.stream, &f, &MERGE_ENTRY, [rows, 1, 1], 0, params, a) }
    }
}

/// The user-facing runtime: GPU 0 with the kernel database attached, so kernels compiled once
/// load from their stored CUBIN afterwards, with no compiler in the path, and
/// [`Runtime::attention_layer`] runs a layer with each head's tuned kernel.
pub struct Runtime {
    pub gpu: Gpu,
    layer: layer::LayerCache,
    /// Whether `attention_layer` builds indexes on the GPU where it can (default: yes).
    gpu_index: std::sync::atomic::AtomicBool,
}

impl Runtime {
    /// Opens GPU 0 and the kernel database at `db` (default: `$WEFT_DB`, else the per-user
    /// cache directory).
    pub fn open(db: Option<&std::path::Path>) -> Result<Runtime, Error> {
        Runtime::open_on(0, db)
    }

    /// [`Runtime::open`] on device `ordinal`.
    pub fn open_on(ordinal: usize, db: Option<&std::path::Path>) -> Result<Runtime, Error> {
        let path = match db {
            Some(p) => p.to_path_buf(),
            None => weft_cache::default_path()?,
        };
        let db = weft_cache::Db::open(&path)?;
        let mut gpu = Gpu::open(ordinal)?;
        gpu.attach_db(db)?;
        Ok(Runtime { gpu, layer: Default::default(), gpu_index: true.into() })
    }

    /// Whether [`Runtime::attention_layer`] builds dynamic indexes on the GPU where a builder
    /// takes the pattern (vertical vectors, blocks, vertical-slash, grids: the default) or
    /// always on the host (for comparison, or to rule the GPU builders out).
    pub fn set_gpu_index(&self, on: bool) {
        self.gpu_index.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The database record of `kernel` compiled to `cubin` and `ptx` with NVRTC `options`.
pub fn kernel_record(kernel: &Kernel, cubin: &[u8], ptx: &str, options: &[String]) -> weft_cache::KernelRecord {
    weft_cache::KernelRecord {
        name: kernel.name.clone(),
        cubin: cubin.to_vec(),
        ptx: ptx.to_string(),
        options: options.to_vec(),
        threads: kernel.threads,
        shared_bytes: kernel.shared_bytes,
        head_dim: kernel.head_dim,
        created: weft_cache::timestamp(),
    }
}

/// Checks that `kernel` was generated for `config`, whose tiles and schedule give the launch
/// shape: a kernel of another schedule would compute only some rows (or some many times).
pub fn check_kernel(kernel: &Kernel, config: &KernelConfig) -> Result<(), Error> {
    if kernel.head_dim != config.head_dim {
        return Err(Error::Shape(format!(
            "the kernel was generated for head dim {}, the config says {}",
            kernel.head_dim, config.head_dim
        )));
    }
    // Tiles, stages and schedule all show in these two.
    if (kernel.threads, kernel.shared_bytes) != (config.threads(), config.shared_bytes()) {
        return Err(Error::Usage(format!(
            "the kernel was generated for another config than [{config}] ({} threads and {} bytes of shared memory, \
             the config {} and {}): launch it with the config it was generated for",
            kernel.threads,
            kernel.shared_bytes,
            config.threads(),
            config.shared_bytes()
        )));
    }
    Ok(())
}

/// Validates a launch: config against index, buffer lengths against shapes.
pub fn check_launch(config: &KernelConfig, ix: &DeviceIndex, s: AttnShape, lens: [usize; 5]) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Shape(m));
    // The problem itself (sizes, GQA, buffers) is `check_shapes`'s, below.
    if s.head_dim != config.head_dim as usize {
        return bad(format!("head dim {} but the kernel was generated for {}", s.head_dim, config.head_dim));
    }
    if (ix.block_m, ix.block_n) != (config.block_m as usize, config.block_n as usize) {
        return bad(format!(
            "the index has {} x {} blocks but the kernel tiles are {} x {}; generate the kernel with the index's block sizes",
            ix.block_m, ix.block_n, config.block_m, config.block_n
        ));
    }
    check_shapes(ix, s, lens)
}

/// Validates buffer lengths and the index against the problem's shapes.
pub fn check_shapes(ix: &DeviceIndex, s: AttnShape, lens: [usize; 5]) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Shape(m));
    if s.hq == 0 || s.hkv == 0 || s.nq == 0 || s.nk == 0 || s.hq % s.hkv != 0 {
        return bad(format!("bad problem {s:?}: every size at least 1, query heads a multiple of key heads"));
    }
    let mut seen = vec![false; s.hq];
    let heads_ok = (ix.gathered || ix.heads == s.hq)
        && ix.head_map.iter().all(|h| *h < s.hq && !std::mem::replace(&mut seen[*h], true));
    if (ix.nq, ix.nk) != (s.nq, s.nk) || !heads_ok {
        return bad(format!(
            "the index is for {} x {} tokens and query heads {:?}, the call for {:?}",
            ix.nq, ix.nk, ix.head_map, s
        ));
    }
    if s.nq.max(s.nk) >= i32::MAX as usize / 2 {
        return bad("sequences over 2^30 tokens are not supported".into());
    }
    let d = s.head_dim;
    let want = [s.hq * s.nq * d, s.hkv * s.nk * d, s.hkv * s.nk * d, s.hq * s.nq * d, s.hq * s.nq];
    for ((name, have), want) in ["q", "k", "v", "out", "lse"].iter().zip(lens).zip(want) {
        if have != want {
            return bad(format!("`{name}` holds {have} elements, the shape needs {want}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
    use weft_dsl::{builder::causal, Pattern};

    #[test]
    fn a_kernel_launches_only_with_the_config_it_was_generated_for() {
        let p = Pattern::new("causal", causal());
        let producer =
            KernelConfig { producer: true, ..KernelConfig::for_blocks(128, 128, 128, DType::Bf16).with_wgmma() };
        let persistent = KernelConfig { persistent: true, ..producer };
        let kernel = emit(&KernelSpec { pattern: &p, masks: &[], permutation: None, config: persistent }).unwrap();
        assert!(super::check_kernel(&kernel, &persistent).is_ok());
        for other in [producer, KernelConfig { stages: 3, ..KernelConfig::for_blocks(128, 64, 128, DType::Bf16) }] {
            let e = super::check_kernel(&kernel, &other).unwrap_err().to_string();
            assert!(e.contains("generated for another config"), "{e}");
        }
        let e = super::check_kernel(&kernel, &KernelConfig { head_dim: 64, ..persistent }).unwrap_err().to_string();
        assert!(e.contains("head dim"), "{e}");
    }
}
