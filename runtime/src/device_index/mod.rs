//! Vertical-vector indexes built on the device from Q and K (no host copy of Q or K).
//!
//! The static part comes from a [`ColumnPlan`] (CPU, once per pattern and shape); the
//! generated kernels of `weft_codegen::emit_index_module` pool each query group, score it against
//! every key on the tensor cores, choose the columns exactly as the CPU builder does
//! (approximate scores with a proven error bound, exact f64 scores for the keys near the
//! cut; top_p scores every pair in f64), and write the index's column lists through the
//! plan's column rules.
//!
//! Every builder only queues work: the host waits for nothing between selection and attention.
//! The lists are allocated at a bound the plan gives (every entry a row could hold), so no
//! count has to come back first; a group the selection's bounds cannot settle is ranked
//! exactly on the device, so no status has to either. [`IndexBuild::finish`] waits for a build
//! and reports it (tests and benchmarks; the layer path never calls it). One exception: when
//! a bound's lists would exceed [`LIST_BOUND_BYTES`], the builder reads that entry total once
//! instead, as the report says (`sized_by_read`). Threshold and top-p vertical vectors reach it
//! first (their bound is every candidate of every row: past about 27k tokens at 32 heads and
//! 128-query groups); top-k vertical vectors (rows x top_k, which grows with the square of the
//! length) past about 85k tokens at 10% kept.
//!
//! Kernel timings ([`IndexBuildReport::kernel_ms`]) need CUDA events around the launches, which
//! cost host time on every build; they are recorded only after [`GpuOptions::time_index_kernels`](crate::GpuOptions::time_index_kernels).

mod blocks;
mod columns;
mod slash;

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use weft_codegen::abi::{BlockRowsParams, ScanParams};
use weft_codegen::plan::{AnyPlan, BlockEntries};
use weft_codegen::{entry, DType};

use crate::launch::{Args, Module};
use crate::{driver, AttnShape, DeviceIndex, Error, Gpu};

/// The most key blocks whose keys `block_top` holds in shared memory (8 warps x 10 bytes each:
/// 120 KiB).
const TOP_CACHE_MAX_BLOCKS: usize = 1536;
/// Approximate scores held at once: heads are scored in chunks below this many bytes.
const SCORE_BYTES: usize = 2 << 30;

/// Scratch a threshold or top_p vertical-vector build may take (one head's scores and every
/// head's bitmaps): past it the build stops with an error instead of failing an allocation.
const BUDGET_MAX_BYTES: usize = 32 << 30;

/// Lists whose bound (entries x 6 bytes) is larger than this are sized by reading the entry
/// total mid-build instead (see the module doc): a wait of a few microseconds on builds that
/// take tens of milliseconds there, against gigabytes of list memory.
pub const LIST_BOUND_BYTES: usize = 1 << 30;

/// Where the time of one device index build went ([`IndexBuild::finish`]).
#[derive(Clone, Debug, Default)]
pub struct IndexBuildReport {
    /// Host milliseconds to queue the build (plan upload on first use, allocations, launches;
    /// with `sized_by_read`, also the wait for the entry total).
    pub enqueue_ms: f64,
    /// Milliseconds from the call until `finish` saw the stream idle (work queued after the
    /// build, such as the attention, counts too).
    pub total_ms: f64,
    /// Block entries of the index.
    pub blocks: usize,
    /// Column entries of the index.
    pub columns: usize,
    /// Heads scored per chunk.
    pub chunk_heads: usize,
    /// "list" or "dense" (see [`VvStrategy`]), "blocks" or "vertical-slash".
    pub strategy: &'static str,
    /// List strategy: groups whose list was incomplete (overflow, or the sampled threshold
    /// too high), so the selection scored all their candidates again (the slow path).
    pub slow_groups: usize,
    /// Vertical vectors: groups ranked exactly over all their keys, because more than 4096 keys
    /// scored too close to the cut to decide by the bounds (many near-equal keys), or because a
    /// bound failed (`bound_failed`). Slower, the same columns.
    pub exact_groups: usize,
    /// Whether an error bound of the approximate scores failed in some group (a bug, please
    /// report it with the inputs; the group was ranked exactly, so the index is still right).
    pub bound_failed: bool,
    /// Whether the lists were sized by reading the entry total mid-build (the bound was past
    /// [`LIST_BOUND_BYTES`]).
    pub sized_by_read: bool,
    /// Entries allocated for the block and the column lists (the plan's bounds, or the totals
    /// read); `blocks` and `columns` never exceed them.
    pub capacity: (usize, usize),
    /// GPU milliseconds per kernel (CUDA events; chunks summed), in launch order; empty unless
    /// [`GpuOptions::time_index_kernels`](crate::GpuOptions::time_index_kernels) was set before the build, and for block builds (not timed
    /// per kernel).
    pub kernel_ms: Vec<(&'static str, f64)>,
}

/// A device index build in flight: its kernels are queued on the GPU's stream and the host
/// waited for none of them. Launch attention over the index right away (same stream); call
/// [`IndexBuild::finish`] only to learn how the build went.
pub struct IndexBuild {
    timer: KernelTimer,
    started: Instant,
    enqueue_ms: f64,
    /// The vertical-vector selection's status words (see `index_columns.cuh`).
    status: Option<CudaSlice<i32>>,
    chunk_heads: usize,
    strategy: &'static str,
    sized_by_read: bool,
    capacity: (usize, usize),
}

impl IndexBuild {
    fn new(
        timer: KernelTimer,
        started: Instant,
        status: Option<CudaSlice<i32>>,
        chunk_heads: usize,
        strategy: &'static str,
        (sized_by_read, capacity): (bool, (usize, usize)),
    ) -> Self {
        let enqueue_ms = started.elapsed().as_secs_f64() * 1e3;
        IndexBuild { timer, started, enqueue_ms, status, chunk_heads, strategy, sized_by_read, capacity }
    }

    /// Waits for the build of `index` (the index it was returned with) and reports it.
    pub fn finish(self, index: &DeviceIndex) -> Result<IndexBuildReport, Error> {
        let s = &self.timer.stream;
        let read = "finishing an index build";
        s.synchronize().map_err(driver(read))?;
        let total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let status = match &self.status {
            Some(st) => s.clone_dtoh(st).map_err(driver(read))?,
            None => vec![0; 3],
        };
        Ok(IndexBuildReport {
            enqueue_ms: self.enqueue_ms,
            total_ms,
            blocks: entry_total(s, &index.block_ptr)?,
            columns: entry_total(s, &index.col_ptr)?,
            chunk_heads: self.chunk_heads,
            strategy: self.strategy,
            slow_groups: status[1].max(0) as usize,
            exact_groups: status[2].max(0) as usize,
            bound_failed: status[0] >= 2,
            sized_by_read: self.sized_by_read,
            capacity: self.capacity,
            kernel_ms: self.timer.times()?,
        })
    }
}

/// The entry total of row pointers `ptr` (their last value, 0 for none), read back: the
/// host waits for what fills them.
fn entry_total(s: &Arc<CudaStream>, ptr: &CudaSlice<u32>) -> Result<usize, Error> {
    let Some(at) = ptr.len().checked_sub(1) else { return Ok(0) };
    let last = s.clone_dtoh(&ptr.slice(at..)).map_err(driver("reading an index's entry total"))?;
    Ok(last.first().copied().unwrap_or(0) as usize)
}

/// Entries to allocate for lists of at most `bound` entries whose row pointers `ptr` a scan has
/// queued: the bound, or past [`LIST_BOUND_BYTES`] the total read back (the one wait, reported
/// as `sized_by_read`).
fn list_len(s: &Arc<CudaStream>, bound: usize, ptr: &CudaSlice<u32>) -> Result<(usize, bool), Error> {
    // A CUDA graph capture cannot wait for the read: it sizes the lists by the bound.
    if bound.saturating_mul(6) <= LIST_BOUND_BYTES || crate::capturing(s)? {
        return Ok((bound, false));
    }
    Ok((entry_total(s, ptr)?, true))
}

/// Uninitialised entry and mask lists of `n` (the index's readers stop at the row pointers).
fn alloc_lists(s: &Arc<CudaStream>, n: usize) -> Result<(CudaSlice<u32>, CudaSlice<u16>), Error> {
    let alloc = "allocating an index's lists";
    // Safety: the write pass fills every entry the row pointers cover; nothing reads past them.
    unsafe { Ok((s.alloc::<u32>(n.max(1)).map_err(driver(alloc))?, s.alloc::<u16>(n.max(1)).map_err(driver(alloc))?)) }
}

/// How the selection gets its approximate scores (see `build_vv_index_with`; the chosen
/// columns are the same whichever is used).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VvStrategy {
    /// List when its lists fit shared memory, else dense.
    #[default]
    Auto,
    /// Every approximate score stored, then read by the selection.
    Dense,
    /// A sampled threshold per group and lists of the keys above it; `capacity` overrides the
    /// list length, half of it held in shared memory (tests use small ones to exercise the
    /// in-place and overflow paths).
    List { capacity: Option<usize> },
}

/// The [`Gpu::plan_copy`] id of a device copy that is not a plan's (tag it, so that ids of
/// different kinds of copy do not meet).
fn copy_id(key: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// An index's sequence tables for one shape (one sequence), kept on the device.
struct SeqTables {
    seq_q: CudaSlice<i32>,
    seq_k: CudaSlice<i32>,
    seq_qb: CudaSlice<i32>,
    head_map: CudaSlice<i32>,
}

/// Copies `v` to the device; an empty list becomes one zero (kernels need a valid pointer).
fn upload<T: cudarc::driver::DeviceRepr + Default + Clone>(
    s: &Arc<CudaStream>,
    v: &[T],
    what: &str,
) -> Result<CudaSlice<T>, Error> {
    crate::refuse_in_capture(s, what)?;
    let one = [T::default()];
    s.clone_htod(if v.is_empty() { &one[..] } else { v }).map_err(driver(what))
}

/// Launches the module's `scan` (`m`): `row_count`'s `rows` counts to row pointers `ptr`.
fn scan(
    s: &Arc<CudaStream>,
    m: &Module,
    row_count: &CudaSlice<u32>,
    rows: usize,
    ptr: &mut CudaSlice<u32>,
) -> Result<(), Error> {
    let mut a = Args::new(s);
    let params = ScanParams { row_count: a.r(row_count), rows: rows as i32, col_ptr: a.w(ptr) };
    // Safety: addresses from `a`; `ptr` holds rows + 1 entries (the callers' allocations).
    unsafe { m.launch(s, &entry::SCAN, [1, 1, 1], 0, params, a) }
}

/// CUDA events around an index builder's launches, for [`IndexBuildReport::kernel_ms`].
/// Records nothing unless `on` (see [`GpuOptions::time_index_kernels`](crate::GpuOptions::time_index_kernels)).
struct KernelTimer {
    stream: Arc<CudaStream>,
    on: bool,
    /// (kernel, start, end)
    marks: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

impl KernelTimer {
    fn new(gpu: &Gpu) -> Self {
        let on = gpu.options().time_index_kernels;
        KernelTimer { stream: gpu.stream.clone(), on, marks: Vec::new() }
    }

    /// An event now (when timing): the start of what a later [`KernelTimer::mark`] times.
    fn start(&self) -> Result<Option<CudaEvent>, Error> {
        if !self.on {
            return Ok(None);
        }
        self.stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map(Some)
            .map_err(driver("recording a CUDA event"))
    }

    /// Times `name` from `start` to now.
    fn mark(&mut self, name: &'static str, start: Option<CudaEvent>) -> Result<(), Error> {
        if let (Some(start), Some(end)) = (start, self.start()?) {
            self.marks.push((name, start, end));
        }
        Ok(())
    }

    /// GPU milliseconds per name, summed over repeats, in first-launch order. Call after the
    /// stream is synchronised.
    fn times(&self) -> Result<Vec<(&'static str, f64)>, Error> {
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for (name, a, b) in &self.marks {
            let ms = f64::from(a.elapsed_ms(b).map_err(driver("reading CUDA event times"))?);
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 += ms,
                None => out.push((name, ms)),
            }
        }
        Ok(out)
    }
}

/// Plans whose device copies are kept (the least recently used are dropped past this many).
const PLAN_COPIES: usize = 16;

/// A plan's column rules on the device.
struct DeviceRules {
    ptr: CudaSlice<u32>,
    c0: CudaSlice<u32>,
    c1: CudaSlice<u32>,
    code: CudaSlice<u32>,
    codes: CudaSlice<u32>,
}

impl DeviceRules {
    fn upload(s: &Arc<CudaStream>, r: &weft_codegen::plan::ColumnRules, up: &str) -> Result<Self, Error> {
        Ok(DeviceRules {
            ptr: upload(s, &r.ptr, up)?,
            c0: upload(s, &r.c0, up)?,
            c1: upload(s, &r.c1, up)?,
            code: upload(s, &r.code, up)?,
            codes: upload(s, &r.codes, up)?,
        })
    }
}

/// A plan's block entries on the device (per row: key block, pattern key block, the codes
/// when chosen and not).
struct DeviceEntries {
    ptr: CudaSlice<u32>,
    kb: CudaSlice<u32>,
    pattern_kb: CudaSlice<u32>,
    code_sel: CudaSlice<u16>,
    code_not: CudaSlice<u16>,
    /// Line codes (one zero without row lines).
    code_line: CudaSlice<u32>,
}

/// The row-line arguments of `block_rows` and `columns` (see `LineCodes`): each head's
/// phase, the plan's line codes, stride, offsets per vector (`len`, 0 without row lines:
/// then nothing is read) and the first rule row of query blocks holding line rows.
#[derive(Clone, Copy)]
struct LineArgs<'a> {
    phase: &'a CudaSlice<i32>,
    codes: &'a CudaSlice<u16>,
    stride: i32,
    len: i32,
    rule_base: i32,
}

/// Buffers for [`LineArgs`] of a plan without row lines.
struct NoLines(CudaSlice<i32>, CudaSlice<u16>);

impl NoLines {
    fn new(s: &Arc<CudaStream>) -> Result<NoLines, Error> {
        let what = "allocating index builder buffers";
        Ok(NoLines(s.alloc_zeros(1).map_err(driver(what))?, s.alloc_zeros(1).map_err(driver(what))?))
    }

    fn args(&self) -> LineArgs<'_> {
        LineArgs { phase: &self.0, codes: &self.1, stride: 1, len: 0, rule_base: 0 }
    }
}

impl DeviceEntries {
    fn upload(s: &Arc<CudaStream>, e: &BlockEntries, up: &str) -> Result<Self, Error> {
        Ok(DeviceEntries {
            ptr: upload(s, &e.ptr, up)?,
            kb: upload(s, &e.kb, up)?,
            pattern_kb: upload(s, &e.pattern_kb, up)?,
            code_sel: upload(s, &e.code_sel, up)?,
            code_not: upload(s, &e.code_not, up)?,
            code_line: upload(s, &e.code_line, up)?,
        })
    }

    /// Launches `block_rows` (`f`) over these entries for the pattern key blocks set in
    /// `chosen` (bit words per head and query group). `dims` = (per_head, hq, q_blocks, block_m,
    /// block_q, groups, kblocks). Pass 0 counts each row's entries into `count`; pass 1 writes
    /// them at `ptr` into `idx` and `mask`.
    #[allow(clippy::too_many_arguments)]
    fn launch_rows(
        &self,
        s: &Arc<CudaStream>,
        m: &Module,
        chosen: &CudaSlice<u32>,
        lines: LineArgs<'_>,
        dims: [i32; 7],
        pass: i32,
        (count, ptr, idx, mask): (&mut CudaSlice<u32>, &CudaSlice<u32>, &mut CudaSlice<u32>, &mut CudaSlice<u16>),
    ) -> Result<(), Error> {
        let [per_head, hq, q_blocks, block_m, block_q, groups, kblocks] = dims;
        let mut a = Args::new(s);
        let params = BlockRowsParams {
            chosen: a.r(chosen),
            entry_ptr: a.r(&self.ptr),
            entry_kb: a.r(&self.kb),
            entry_pattern_kb: a.r(&self.pattern_kb),
            code_sel: a.r(&self.code_sel),
            code_not: a.r(&self.code_not),
            code_line: a.r(&self.code_line),
            line_phase: a.r(lines.phase),
            line_stride: lines.stride,
            line_len: lines.len,
            line_codes: a.r(lines.codes),
            per_head,
            hq,
            q_blocks,
            block_m,
            block_q,
            groups,
            kblocks,
            pass,
            row_count: a.w(count),
            block_ptr: a.r(ptr),
            block_idx: a.w(idx),
            block_mask: a.w(mask),
        };
        let rows = (hq * q_blocks).max(0) as usize;
        // Safety: addresses from `a`, each buffer with the length the entry indexes (checked by
        // the callers' allocations).
        unsafe { m.launch(s, &entry::BLOCK_ROWS, [rows.max(1), 1, 1], 0, params, a) }
    }
}

impl Gpu {
    /// The device copy of plan `id`, uploaded by `make` the first time: a plan is static per
    /// pattern and shape, so repeated builds (every layer call) do not upload it again.
    fn plan_copy<T: std::any::Any + Send + Sync>(
        &self,
        id: u64,
        make: impl FnOnce() -> Result<T, Error>,
    ) -> Result<Arc<T>, Error> {
        static USES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tick = USES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cached = self.plan_copies.lock().ok().and_then(|mut m| {
            let e = m.get_mut(&id)?;
            e.0 = tick;
            Some(e.1.clone())
        });
        if let Some(c) = cached.and_then(|c| c.downcast::<T>().ok()) {
            return Ok(c);
        }
        let made = Arc::new(make()?);
        if let Ok(mut m) = self.plan_copies.lock() {
            // The least recently used goes: never a copy this call has just used, which a
            // capture replaying the call needs (dropping them all once dropped a plan uploaded
            // moments before, so that the next call, under capture, had to upload it again).
            if m.len() >= PLAN_COPIES {
                if let Some(old) = m.iter().min_by_key(|(_, e)| e.0).map(|(k, _)| *k) {
                    m.remove(&old);
                }
            }
            m.insert(id, (tick, made.clone()));
        }
        Ok(made)
    }
}

/// A row list on the device: pointers, entries, mask ids.
type DeviceCsr = (CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u16>);

/// Checks a device index build's inputs: bf16, the plan's shape (`heads, nq, nk`), GQA and the
/// buffer lengths.
fn check_build_inputs(
    plan: &weft_codegen::plan::PlanShape,
    shape: AttnShape,
    dtype: DType,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
) -> Result<(), Error> {
    let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
    if dtype != DType::Bf16 {
        return Err(usage(format!(
            "GPU index building takes bf16 Q and K, got {}; convert them or build the index on the CPU",
            dtype.name()
        )));
    }
    if let Some(why) = plan.mismatch(hq, nq, nk) {
        return Err(Error::Shape(why));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::Shape(format!("{hq} query heads on {hkv} key heads: hq must be a multiple of hkv")));
    }
    if q.len() != hq * nq * d || k.len() != hkv * nk * d {
        return Err(Error::Shape(format!(
            "Q holds {} elements and K {}, the shape needs {} and {}",
            q.len(),
            k.len(),
            hq * nq * d,
            hkv * nk * d
        )));
    }
    Ok(())
}

impl Gpu {
    /// A one-sequence index over every query head (identity head map) from device row lists.
    fn single_index(
        &self,
        shape: AttnShape,
        (block_m, block_n): (usize, usize),
        (block_ptr, block_idx, block_mask): DeviceCsr,
        (col_ptr, col_idx, col_mask): DeviceCsr,
    ) -> Result<DeviceIndex, Error> {
        let s = &self.stream;
        let q_blocks = shape.nq.div_ceil(block_m);
        // The small sequence tables depend only on the shape: uploaded once, then copied on the
        // device, so that a build queues no host-to-device copy (which a CUDA graph would
        // capture as a read of host memory that is gone by the replay).
        let tables = self.plan_copy(copy_id(("sequence tables", shape.hq, shape.nq, shape.nk, q_blocks)), || {
            let up = "uploading the index's sequence tables";
            let map: Vec<i32> = (0..shape.hq as i32).collect();
            Ok(SeqTables {
                seq_q: upload(s, &[0, shape.nq as i32], up)?,
                seq_k: upload(s, &[0, shape.nk as i32], up)?,
                seq_qb: upload(s, &[0, q_blocks as i32], up)?,
                head_map: upload(s, &map, up)?,
            })
        })?;
        let up = "copying the index's sequence tables";
        Ok(DeviceIndex {
            heads: shape.hq,
            head_map: (0..shape.hq).collect(),
            nq: shape.nq,
            nk: shape.nk,
            block_m,
            block_n,
            batch: 1,
            q_blocks,
            seq_q: s.clone_dtod(&tables.seq_q).map_err(driver(up))?,
            seq_k: s.clone_dtod(&tables.seq_k).map_err(driver(up))?,
            seq_qb: s.clone_dtod(&tables.seq_qb).map_err(driver(up))?,
            block_ptr,
            block_idx,
            block_mask,
            col_ptr,
            col_idx,
            col_mask,
            head_map_dev: s.clone_dtod(&tables.head_map).map_err(driver(up))?,
            gathered: false,
        })
    }
}

fn usage(what: impl Into<String>) -> Error {
    Error::Usage(what.into())
}

impl Gpu {
    /// Builds `plan`'s index for the query heads `heads` of a layer with Q `[hq, nq, d]` and K
    /// `[hkv, nk, d]` on the device: in place when `heads` is every head in order; otherwise
    /// over device copies of those heads' Q and of the key head each reads (a problem of
    /// `heads.len()` heads without GQA, which `plan` must have been made for), the index's
    /// rows then mapped back to the layer's heads.
    pub fn build_index_of_heads(
        &self,
        plan: &AnyPlan,
        shape: AttnShape,
        heads: &[usize],
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let build = |shape: AttnShape, q: &CudaSlice<u16>, k: &CudaSlice<u16>| match plan {
            AnyPlan::Columns(cp) => self.build_vv_index(cp, shape, dtype, q, k),
            AnyPlan::Blocks(bp) => self.build_block_index(bp, shape, dtype, q, k),
            AnyPlan::Slashes(sp) => self.build_vs_index(sp, shape, dtype, q, k),
        };
        if heads.iter().copied().eq(0..shape.hq) {
            return build(shape, q, k);
        }
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        if hkv == 0
            || hq % hkv != 0
            || heads.iter().any(|&h| h >= hq)
            || q.len() < hq * nq * d
            || k.len() < hkv * nk * d
        {
            return Err(Error::Shape(format!("heads {heads:?} of a layer of {shape:?}")));
        }
        let (n, gqa) = (heads.len(), hq / hkv);
        let s = &self.stream;
        let what = "copying a group's heads for its index build";
        // Safety: the copies below write every element before the build reads any.
        let mut qs = unsafe { s.alloc::<u16>(n * nq * d) }.map_err(driver(what))?;
        // Safety: uninitialised; the kernels write it before reading it (see the allocations' comment).
        let mut ks = unsafe { s.alloc::<u16>(n * nk * d) }.map_err(driver(what))?;
        for (i, &h) in heads.iter().enumerate() {
            let kv = h / gqa;
            s.memcpy_dtod(&q.slice(h * nq * d..(h + 1) * nq * d), &mut qs.slice_mut(i * nq * d..(i + 1) * nq * d))
                .map_err(driver(what))?;
            s.memcpy_dtod(&k.slice(kv * nk * d..(kv + 1) * nk * d), &mut ks.slice_mut(i * nk * d..(i + 1) * nk * d))
                .map_err(driver(what))?;
        }
        let (mut index, report) = build(AttnShape { hq: n, hkv: n, ..shape }, &qs, &ks)?;
        // The head map's device copy is kept per head list: a build queues no host copy.
        let map = self.plan_copy(copy_id(("head map", heads)), || {
            let map: Vec<i32> = heads.iter().map(|&h| h as i32).collect();
            upload(s, &map, "uploading a head map")
        })?;
        index.head_map_dev = s.clone_dtod(map.as_ref()).map_err(driver("copying a head map"))?;
        index.head_map = heads.to_vec();
        index.gathered = true;
        Ok((index, report))
    }
}

impl DeviceIndex {
    /// Copies the index back (for checks): block and column lists of every row.
    pub fn to_host(&self, gpu: &Gpu) -> Result<weft_patterns::SparseIndex, Error> {
        let s = &gpu.stream;
        let read = "reading an index back";
        let block_ptr = s.clone_dtoh(&self.block_ptr).map_err(driver(read))?;
        let col_ptr = s.clone_dtoh(&self.col_ptr).map_err(driver(read))?;
        let nb = *block_ptr.last().unwrap_or(&0) as usize;
        let nc = *col_ptr.last().unwrap_or(&0) as usize;
        let mut ix = weft_patterns::SparseIndex::empty(self.heads, self.nq, self.nk, self.block_m, self.block_n);
        // Only the entries the pointers cover: the lists may be allocated at a bound, and past
        // the pointers they hold nothing written.
        let (nb, nc) = (nb.min(self.block_idx.len()), nc.min(self.col_idx.len()));
        if nb > 0 {
            ix.block_idx = s.clone_dtoh(&self.block_idx.slice(..nb)).map_err(driver(read))?;
            ix.block_mask = s.clone_dtoh(&self.block_mask.slice(..nb)).map_err(driver(read))?;
        }
        if nc > 0 {
            ix.col_idx = s.clone_dtoh(&self.col_idx.slice(..nc)).map_err(driver(read))?;
            ix.col_mask = s.clone_dtoh(&self.col_mask.slice(..nc)).map_err(driver(read))?;
        }
        ix.block_ptr = block_ptr;
        ix.col_ptr = col_ptr;
        Ok(ix)
    }
}
