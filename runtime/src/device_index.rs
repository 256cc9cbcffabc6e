//! Vertical-vector indexes built on the device from Q and K (no host copy of Q or K).
//!
//! The static part comes from a [`ColumnPlan`] (CPU, once per pattern and shape); the
//! generated kernels of `weft_codegen::emit_vv_index` pool each query group, score it against
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
//! cost host time on every build; they are recorded only after [`Gpu::time_index_kernels`].

mod slash;

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use weft_codegen::{
    block_select_shared_bytes, emit_vv_index, pool_groups_per_cta, vv_score_shared_bytes, vv_select_shared_bytes,
    DType, VS_LOGITS_KEYS, VS_LOGITS_ROWS, VV_COLLECT_MAX, VV_INDEX_MAX_SHARED, VV_TWO_CTA_SHARED,
};
use weft_dsl::Budget;
use weft_patterns::device_plan::{AnyPlan, BlockEntries, BlockPlan, ColumnPlan};

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
    /// [`Gpu::time_index_kernels`] was set before the build, and for block builds (not timed
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
    /// The vertical-vector selection's status words (see `vv_index.cu`).
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

/// A launch of `threads`-thread CTAs with `smem` bytes of dynamic shared memory.
fn launch_cfg(grid: (u32, u32, u32), threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

/// CUDA events around an index builder's launches, for [`IndexBuildReport::kernel_ms`].
/// Records nothing unless `on` (see [`Gpu::time_index_kernels`]).
struct KernelTimer {
    stream: Arc<CudaStream>,
    on: bool,
    /// (kernel, start, end)
    marks: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

impl KernelTimer {
    fn new(gpu: &Gpu) -> Self {
        let on = gpu.index_timing.load(std::sync::atomic::Ordering::Relaxed);
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
    fn upload(s: &Arc<CudaStream>, r: &weft_patterns::device_plan::ColumnRules, up: &str) -> Result<Self, Error> {
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
        f: &cudarc::driver::CudaFunction,
        chosen: &CudaSlice<u32>,
        lines: LineArgs<'_>,
        dims: [i32; 7],
        pass: i32,
        (count, ptr, idx, mask): (&mut CudaSlice<u32>, &CudaSlice<u32>, &mut CudaSlice<u32>, &mut CudaSlice<u16>),
    ) -> Result<(), Error> {
        let mut b = s.launch_builder(f);
        b.arg(chosen).arg(&self.ptr).arg(&self.kb).arg(&self.pattern_kb).arg(&self.code_sel).arg(&self.code_not);
        b.arg(&self.code_line).arg(lines.phase).arg(&lines.stride).arg(&lines.len).arg(lines.codes);
        for d in &dims {
            b.arg(d);
        }
        b.arg(&pass).arg(count).arg(ptr).arg(idx).arg(mask);
        let rows = (dims[1] * dims[2]).max(0) as u32;
        // Safety: the argument list matches the template's `block_rows`, and the buffers have
        // the lengths it indexes (checked by the callers' allocations).
        unsafe { b.launch(launch_cfg((rows.div_ceil(4).max(1), 1, 1), 128, 0)) }
            .map_err(driver("launching the index builder's block_rows kernel"))?;
        Ok(())
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

    /// The index builders' module for head dim `d` ([`emit_vv_index`]), generated on first use.
    pub(crate) fn index_kernel(&self, d: u32) -> Result<Arc<weft_codegen::Kernel>, Error> {
        if let Some(k) = self.index_kernels.lock().ok().and_then(|m| m.get(&d).cloned()) {
            return Ok(k);
        }
        let kernel = Arc::new(emit_vv_index(d).map_err(|e| usage(e.to_string()))?);
        if let Ok(mut m) = self.index_kernels.lock() {
            m.insert(d, kernel.clone());
        }
        Ok(kernel)
    }
}

/// A vertical-vector plan on the device.
struct ColumnPlanCopy {
    cand_lo: CudaSlice<u32>,
    cand_hi: CudaSlice<u32>,
    rules: DeviceRules,
    /// The skeleton's block lists (copied into each index built).
    skeleton: DeviceCsr,
}

/// A row list on the device: pointers, entries, mask ids.
type DeviceCsr = (CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u16>);

/// Checks a device index build's inputs: bf16, the plan's shape (`heads, nq, nk`), GQA and the
/// buffer lengths.
fn check_build_inputs(
    plan: &weft_patterns::device_plan::PlanShape,
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

    /// Builds the index of `plan` for Q `[hq, nq, d]` and K `[hkv, nk, d]` (bf16, on the
    /// device): the index `weft_patterns::build_index` builds for the same inputs, mask ids
    /// numbered as in `plan.skeleton.masks` (generate the attention kernel with those).
    pub fn build_vv_index(
        &self,
        plan: &ColumnPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        self.build_vv_index_with(plan, shape, dtype, q, k, VvStrategy::Auto)
    }

    /// [`Gpu::build_vv_index`] with a chosen strategy.
    pub fn build_vv_index_with(
        &self,
        plan: &ColumnPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        strategy: VvStrategy,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let started = Instant::now();
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        check_build_inputs(&plan.shape, shape, dtype, q, k)?;
        let base_smem = vv_select_shared_bytes(d as u32, nk, 0);
        if base_smem > VV_INDEX_MAX_SHARED as usize {
            return Err(usage(format!("{nk} keys are more than GPU index building takes (about 1.2 million)")));
        }
        // Two strategies (the same keys either way):
        // - list: a sampled threshold per group, then one scoring pass that keeps only the keys
        //   above it (about keep + 16 sqrt(keep) + 256 per group; room for 25% more), selected
        //   in shared memory. Nothing of size groups x keys is stored.
        // - dense (keep too large for the list to fit shared memory): every approximate score is
        //   stored, and the selection reads them (collecting into shared memory when two CTAs
        //   still fit on an SM: with one, its memory-bound passes lose more than they save).
        // Threshold and top-p budgets: a `budget` pass counts what each group keeps (exact
        // scores where the bounds leave it open), then `select` chooses that many as for top_k,
        // into a bitmap per group (the counts are not known before). They score densely: the
        // budget reads every score. Their scores must rank as the dots do.
        let top_k = match plan.budget {
            Budget::TopK(n) => Some(n as usize),
            _ if plan.shape.scale <= 0.0 || plan.shape.scale.is_nan() => {
                return Err(usage(format!(
                    "GPU index building takes threshold and top_p budgets with a positive scale, not {}",
                    plan.shape.scale
                )))
            }
            _ => None,
        };
        let top_p = matches!(plan.budget, Budget::TopP(_));
        // Bytes per stored (group, key) score: the approximate f32, and for top_p also the
        // exact f64 score and the fixed-point weight.
        let pair_bytes = if top_p { 16 } else { 4 };
        let keep = top_k.unwrap_or(nk).min(nk) as f64;
        let want = ((1.25 * (keep + 32.0 * keep.sqrt() + 512.0)) as usize).next_multiple_of(256);
        let fits = want <= VV_COLLECT_MAX && vv_select_shared_bytes(d as u32, nk, want) <= VV_INDEX_MAX_SHARED as usize;
        // Keys a budgeted select collects: as many as two CTAs per SM leave room for.
        let base_two = vv_select_shared_bytes(d as u32, nk, 0);
        let budget_collect = (VV_TWO_CTA_SHARED.saturating_sub(base_two) / 8).min(VV_COLLECT_MAX) / 256 * 256;
        // (list mode, keys held in shared memory, list length in global memory)
        let (list_mode, collect, list_cap) = match strategy {
            VvStrategy::List { .. } if top_k.is_none() => {
                return Err(usage("threshold and top_p budgets score densely; use VvStrategy::Auto or Dense"))
            }
            _ if top_k.is_none() => (false, budget_collect, 1),
            VvStrategy::Auto | VvStrategy::List { capacity: None } if fits => (true, want, 2 * want),
            VvStrategy::List { capacity: Some(c) } if c / 2 <= want => (true, c / 2, c.max(1)),
            VvStrategy::List { .. } => {
                return Err(usage(format!(
                    "lists of {want} keys per group do not fit shared memory; use VvStrategy::Auto"
                )))
            }
            _ if vv_select_shared_bytes(d as u32, nk, want) <= VV_TWO_CTA_SHARED => (false, want, 1),
            _ => (false, 0, 1),
        };
        let strategy_name = if list_mode { "list" } else { "dense" };
        let select_smem = vv_select_shared_bytes(d as u32, nk, collect);
        let (collect_i, list_cap_i) = (collect as i32, list_cap as i32);
        // Sample columns: one run of 32 keys per 512 (some past nk in the last block).
        let samples = nk.div_ceil(512) * 32;
        let samples_i = samples as i32;
        let kernel = self.index_kernel(d as u32)?;
        let f = self.load_entries(&kernel, &weft_codegen::VV_INDEX_ENTRIES)?;
        let (f_pool, f_kstats, f_score, f_threshold, f_exact, f_budget, f_select, f_columns, f_scan) =
            (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &f[7], &f[8]);

        let s = &self.stream;
        let up = "uploading the index plan";
        let alloc = "allocating index-building buffers";
        let (groups, q_blocks) = (plan.groups, plan.shape.q_blocks());
        let rows = hq * q_blocks;
        // Chosen keys per group: a list of top_k, or (cap 0) a bitmap of `words` words.
        let words = nk.div_ceil(32);
        let (cap, chosen_len) = match top_k {
            Some(n) => (n.min(nk).max(1), n.min(nk).max(1)),
            None => (0, words),
        };
        if top_k.is_none() {
            // The budgets hold every (group, key) score of at least one head at once, and a
            // bitmap per group for every head.
            let need = groups * nk * pair_bytes + hq * groups * words * 4;
            if need > BUDGET_MAX_BYTES {
                return Err(usage(format!(
                    "GPU index building for {} over {nq} queries and {nk} keys needs {:.1} GiB of scratch (at \
                     most {} GiB); use top_k, larger query groups, or build this index on the CPU",
                    plan.budget,
                    need as f64 / (1u64 << 30) as f64,
                    BUDGET_MAX_BYTES >> 30
                )));
            }
        }
        let copy = self.plan_copy(plan.shape.id, || {
            let sk = &plan.skeleton;
            Ok(ColumnPlanCopy {
                cand_lo: upload(s, &plan.cand_lo, up)?,
                cand_hi: upload(s, &plan.cand_hi, up)?,
                rules: DeviceRules::upload(s, &plan.rules, up)?,
                skeleton: (
                    upload(s, &sk.block_ptr, up)?,
                    upload(s, &sk.block_idx, up)?,
                    upload(s, &sk.block_mask, up)?,
                ),
            })
        })?;
        let (cand_lo, cand_hi) = (&copy.cand_lo, &copy.cand_hi);
        let DeviceRules { ptr: rule_ptr, c0: rule_c0, c1: rule_c1, code: rule_code, codes } = &copy.rules;

        // Safety (the unsafe allocations here): pool writes every pooled element, kstats every
        // key's maximum, select each group's chosen keys up to the count the column pass reads,
        // and the emission each list entry below its count before select reads it; buffers
        // that atomics or partial writes fill are cleared.
        let mut pooled = unsafe { s.alloc::<f32>(hq * groups * d) }.map_err(driver(alloc))?;
        let mut pq_hi = unsafe { s.alloc::<u16>(hq * groups * d) }.map_err(driver(alloc))?;
        let mut pq_lo = unsafe { s.alloc::<u16>(hq * groups * d) }.map_err(driver(alloc))?;
        let mut pq_l1 = unsafe { s.alloc::<f32>(hq * groups) }.map_err(driver(alloc))?;
        let mut kinf = unsafe { s.alloc::<f32>(hkv * nk) }.map_err(driver(alloc))?;
        let mut kmax = s.alloc_zeros::<u32>(hkv).map_err(driver(alloc))?;
        let mut chosen = unsafe { s.alloc::<u32>(hq * groups * chosen_len) }.map_err(driver(alloc))?;
        let mut chosen_count = s.alloc_zeros::<i32>(hq * groups).map_err(driver(alloc))?;
        // [largest exact-ranking code, groups on the slow path, groups ranked exactly]
        let mut status = s.alloc_zeros::<i32>(3).map_err(driver(alloc))?;
        let mut row_count = s.alloc_zeros::<u32>(rows.max(1)).map_err(driver(alloc))?;
        let mut col_ptr = s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?;
        // Scores held at once: dense stores groups x keys per head, list only the sample.
        let head_pairs = groups * if list_mode { samples } else { nk };
        let chunk = (SCORE_BYTES / (head_pairs * pair_bytes).max(1)).clamp(1, hq);
        let mut approx = s.alloc_zeros::<f32>(chunk * head_pairs).map_err(driver(alloc))?;
        let pairs = if top_p { chunk * head_pairs } else { 1 };
        // Safety: vv_exact writes every pair's exact score, and the budget pass each
        // candidate's weight, before they are read.
        let mut exact = unsafe { s.alloc::<f64>(pairs) }.map_err(driver(alloc))?;
        let mut weights = unsafe { s.alloc::<u32>(pairs) }.map_err(driver(alloc))?;
        let mut best = s.alloc_zeros::<u64>(if top_p { chunk * groups } else { 1 }).map_err(driver(alloc))?;
        let mut keep_count =
            unsafe { s.alloc::<u32>(if top_k.is_none() { hq * groups } else { 1 }) }.map_err(driver(alloc))?;
        // (mode, argument) of the budget pass: threshold(t) takes ln t, top_p(p) takes p.
        let (budget_mode, budget_arg) = match plan.budget {
            Budget::Threshold(t) => (0i32, t.ln()),
            Budget::TopP(p) => (1i32, p),
            Budget::TopK(_) => (-1, 0.0),
        };
        let lists = if list_mode { hq * groups } else { 1 };
        let mut thresh = s.alloc_zeros::<f32>(2 * lists).map_err(driver(alloc))?;
        let mut list_key = unsafe { s.alloc::<u32>(lists * list_cap) }.map_err(driver(alloc))?;
        let mut list_val = unsafe { s.alloc::<f32>(lists * list_cap) }.map_err(driver(alloc))?;
        let mut list_count = s.alloc_zeros::<u32>(lists).map_err(driver(alloc))?;
        let mut list_high = s.alloc_zeros::<u32>(lists).map_err(driver(alloc))?;
        let (nq_i, nk_i, hq_i, hkv_i) = (nq as i32, nk as i32, hq as i32, hkv as i32);
        let (groups_i, q_block_i, cap_i, top_k_i) =
            (groups as i32, plan.q_block as i32, cap as i32, top_k.unwrap_or(0).min(i32::MAX as usize) as i32);
        let per_head = i32::from(plan.shape.per_head);
        let launch = |what: &str| driver(format!("launching the index builder's {what} kernel"));
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): the argument lists match the template's signatures, and
        // each buffer was allocated above (or checked) with the length the kernel indexes.
        let t0 = timer.start()?;
        let mut b = s.launch_builder(f_pool);
        b.arg(q).arg(&nq_i).arg(&q_block_i).arg(&groups_i);
        b.arg(&mut pooled).arg(&mut pq_hi).arg(&mut pq_lo).arg(&mut pq_l1);
        let pool_grid = (groups.div_ceil(pool_groups_per_cta(d as u32)) as u32, hq as u32, 1);
        unsafe { b.launch(launch_cfg(pool_grid, 128, 0)) }.map_err(launch("pool"))?;
        timer.mark("pool", t0)?;
        let t0 = timer.start()?;
        let mut b = s.launch_builder(f_kstats);
        b.arg(k).arg(&nk_i).arg(&mut kinf).arg(&mut kmax);
        unsafe { b.launch(launch_cfg((nk.div_ceil(64) as u32, hkv as u32, 1), 256, 0)) }.map_err(launch("kstats"))?;
        timer.mark("kstats", t0)?;
        let score_smem = vv_score_shared_bytes(d as u32);
        let (dense_mode, sample_mode, emit_mode) = (0i32, 1i32, 2i32);
        let select_mode = i32::from(list_mode);
        for h0 in (0..hq).step_by(chunk) {
            let hc = chunk.min(hq - h0);
            let h0_i = h0 as i32;
            // One scoring launch: `mode` over `cols` columns.
            macro_rules! score {
                ($mode:expr, $cols:expr) => {{
                    let cols_i = $cols as i32;
                    let mut b = s.launch_builder(f_score);
                    b.arg(&pq_hi).arg(&pq_lo).arg(k).arg(&mut approx);
                    b.arg(&h0_i).arg(&hq_i).arg(&hkv_i).arg(&groups_i).arg(&nk_i).arg(&$mode).arg(&cols_i);
                    b.arg(cand_lo).arg(cand_hi).arg(&per_head).arg(&thresh);
                    b.arg(&mut list_key).arg(&mut list_val).arg(&mut list_count).arg(&mut list_high).arg(&list_cap_i);
                    let grid = (groups.div_ceil(64) as u32, ($cols as usize).div_ceil(128) as u32, hc as u32);
                    unsafe { b.launch(launch_cfg(grid, 128, score_smem)) }.map_err(launch("score"))?;
                }};
            }
            let t0 = timer.start()?;
            if list_mode {
                score!(sample_mode, samples);
                timer.mark("sample score", t0)?;
                let t0 = timer.start()?;
                let mut b = s.launch_builder(f_threshold);
                b.arg(&approx).arg(&samples_i).arg(&pq_l1).arg(&kmax).arg(cand_lo).arg(cand_hi).arg(&per_head);
                b.arg(&h0_i).arg(&hq_i).arg(&hkv_i).arg(&groups_i).arg(&top_k_i).arg(&mut thresh);
                unsafe { b.launch(launch_cfg((groups as u32, hc as u32, 1), 512, 0)) }.map_err(launch("threshold"))?;
                timer.mark("threshold", t0)?;
                let t0 = timer.start()?;
                score!(emit_mode, nk);
                timer.mark("emit score", t0)?;
            } else {
                score!(dense_mode, nk);
                timer.mark("score", t0)?;
            }
            if top_p {
                let t0 = timer.start()?;
                s.memset_zeros(&mut best).map_err(driver("clearing the best scores"))?;
                let mut b = s.launch_builder(f_exact);
                b.arg(&pooled).arg(k).arg(&groups_i).arg(&nk_i).arg(&hq_i).arg(&hkv_i).arg(&h0_i);
                b.arg(cand_lo).arg(cand_hi).arg(&per_head).arg(&plan.shape.scale).arg(&mut exact).arg(&mut best);
                let grid = (nk.div_ceil(VS_LOGITS_KEYS) as u32, groups.div_ceil(VS_LOGITS_ROWS) as u32, hc as u32);
                unsafe { b.launch(launch_cfg(grid, 256, 0)) }.map_err(launch("exact score"))?;
                timer.mark("exact", t0)?;
            }
            if top_k.is_none() {
                let t0 = timer.start()?;
                let mut b = s.launch_builder(f_budget);
                b.arg(&approx).arg(&pooled).arg(&pq_l1).arg(k).arg(&kinf).arg(&kmax);
                b.arg(cand_lo).arg(cand_hi).arg(&per_head);
                b.arg(&h0_i).arg(&hq_i).arg(&hkv_i).arg(&groups_i).arg(&nk_i).arg(&plan.shape.scale);
                b.arg(&budget_mode).arg(&budget_arg).arg(&exact).arg(&best).arg(&mut weights).arg(&mut keep_count);
                unsafe { b.launch(launch_cfg((groups as u32, hc as u32, 1), 512, 0)) }.map_err(launch("budget"))?;
                timer.mark("budget", t0)?;
            }
            let t0 = timer.start()?;
            let mut b = s.launch_builder(f_select);
            b.arg(&approx).arg(&pooled).arg(&pq_l1).arg(k).arg(&kinf).arg(&kmax);
            b.arg(cand_lo).arg(cand_hi).arg(&per_head);
            b.arg(&h0_i).arg(&hq_i).arg(&hkv_i).arg(&groups_i).arg(&nk_i).arg(&top_k_i);
            // Budgets pass their counts; top_k a null pointer.
            if top_k.is_none() {
                b.arg(&keep_count);
            } else {
                b.arg(&0u64);
            }
            b.arg(&plan.shape.scale);
            b.arg(&cap_i).arg(&collect_i).arg(&select_mode);
            b.arg(&list_key).arg(&list_val).arg(&list_count).arg(&list_high).arg(&list_cap_i);
            b.arg(&mut chosen).arg(&mut chosen_count).arg(&mut status);
            unsafe { b.launch(launch_cfg((groups as u32, hc as u32, 1), 512, select_smem as u32)) }
                .map_err(launch("select"))?;
            timer.mark("select", t0)?;
        }
        let no_tiles = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let no_lines = NoLines::new(s)?;
        let (one, zero) = (1i32, 0i32);
        let words_i = if top_k.is_none() { words as i32 } else { 0 };
        let columns_pass = |pass: i32,
                            row_count: &mut CudaSlice<u32>,
                            col_ptr: &CudaSlice<u32>,
                            col_idx: &mut CudaSlice<u32>,
                            col_mask: &mut CudaSlice<u16>|
         -> Result<(), Error> {
            let (q_blocks_i, bm_i) = (q_blocks as i32, plan.shape.block_m as i32);
            let mut b = s.launch_builder(f_columns);
            b.arg(&chosen).arg(&chosen_count).arg(&cap_i).arg(&words_i);
            b.arg(rule_ptr).arg(rule_c0).arg(rule_c1).arg(rule_code).arg(codes).arg(&per_head);
            b.arg(&hq_i).arg(&q_blocks_i).arg(&bm_i).arg(&q_block_i).arg(&groups_i).arg(&pass);
            // No slash tiles here (tile_words = 0), and no row lines.
            b.arg(&no_tiles).arg(&one).arg(&one).arg(&zero);
            let lines = no_lines.args();
            b.arg(lines.phase).arg(&lines.stride).arg(&lines.len).arg(&lines.rule_base).arg(lines.codes);
            b.arg(row_count).arg(col_ptr).arg(col_idx).arg(col_mask);
            unsafe { b.launch(launch_cfg((rows.div_ceil(4).max(1) as u32, 1, 1), 128, 0)) }
                .map_err(launch("columns"))?;
            Ok(())
        };
        let mut none_idx = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let mut none_mask = s.alloc_zeros::<u16>(1).map_err(driver(alloc))?;
        let t0 = timer.start()?;
        columns_pass(0, &mut row_count, &col_ptr, &mut none_idx, &mut none_mask)?;
        let rows_i = rows as i32;
        let mut b = s.launch_builder(f_scan);
        b.arg(&row_count).arg(&rows_i).arg(&mut col_ptr);
        unsafe { b.launch(launch_cfg((1, 1, 1), 1024, 0)) }.map_err(launch("scan"))?;
        timer.mark("count+scan", t0)?;

        let (len, sized_by_read) = list_len(s, plan.column_bound(), &col_ptr)?;
        let (mut col_idx, mut col_mask) = alloc_lists(s, len)?;
        let t0 = timer.start()?;
        columns_pass(1, &mut row_count, &col_ptr, &mut col_idx, &mut col_mask)?;
        timer.mark("write", t0)?;

        let copy_of = "copying the index skeleton";
        let (sk_ptr, sk_idx, sk_mask) = &copy.skeleton;
        let blocks = (
            s.clone_dtod(sk_ptr).map_err(driver(copy_of))?,
            s.clone_dtod(sk_idx).map_err(driver(copy_of))?,
            s.clone_dtod(sk_mask).map_err(driver(copy_of))?,
        );
        let index =
            self.single_index(shape, (plan.shape.block_m, plan.shape.block_n), blocks, (col_ptr, col_idx, col_mask))?;
        let capacity = (plan.skeleton.block_idx.len(), len);
        let build = IndexBuild::new(timer, started, Some(status), chunk, strategy_name, (sized_by_read, capacity));
        Ok((index, build))
    }
}

impl Gpu {
    /// Builds the index of a block top-k (top-p, threshold) `plan` for Q `[hq, nq, d]` and K
    /// `[hkv, nk, d]` (bf16, on the device): pooled query and key blocks, every candidate's
    /// score in f64 exactly as the CPU builder computes it (tiled over groups and key blocks),
    /// the selection sorted on the GPU,
    /// then the rows' block lists through the plan's codes. Mask ids index `plan.masks`.
    pub fn build_block_index(
        &self,
        plan: &BlockPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(DeviceIndex, IndexBuild), Error> {
        let started = Instant::now();
        let AttnShape { hq, hkv, nq, nk, head_dim: d } = shape;
        check_build_inputs(&plan.shape, shape, dtype, q, k)?;
        // (Only top_p's block_select sorts in shared memory; block_top needs none.)
        let select_smem = block_select_shared_bytes(plan.kblocks);
        if matches!(plan.budget, Budget::TopP(_)) && select_smem > VV_INDEX_MAX_SHARED as usize {
            return Err(usage(format!("{} key blocks are more than GPU top_p block selection takes", plan.kblocks)));
        }
        // (mode, n for top_k, ln t for threshold or p for top_p)
        let (mode, top_k, budget_arg) = match plan.budget {
            Budget::TopK(n) => (0i32, n.min(i32::MAX as u32) as i32, 0f64),
            Budget::Threshold(t) => (1, 0, t.ln()),
            Budget::TopP(p) => (2, 0, p),
        };
        let kernel = self.index_kernel(d as u32)?;
        let f = self.load_entries(&kernel, &weft_codegen::BLOCK_INDEX_ENTRIES)?;
        let (f_pool, f_scores, f_select, f_rows, f_scan, f_top) = (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5]);
        let s = &self.stream;
        let (up, alloc) = ("uploading the block index plan", "allocating block index buffers");
        let (groups, kblocks, q_blocks) = (plan.groups, plan.kblocks, plan.shape.q_blocks());
        let rows = hq * q_blocks;
        let words = kblocks.div_ceil(32);
        let copy = self.plan_copy(plan.shape.id, || {
            Ok((upload(s, &plan.allowed, up)?, DeviceEntries::upload(s, &plan.entries, up)?))
        })?;
        let (allowed, entries) = (&copy.0, &copy.1);
        // Safety (the unsafe allocations here): pool writes every pooled element (and its
        // unused halves), block_select every word of each group's choice.
        let mut pooled_q = unsafe { s.alloc::<f32>(hq * groups * d) }.map_err(driver(alloc))?;
        let mut pooled_k = unsafe { s.alloc::<f32>(hkv * kblocks * d) }.map_err(driver(alloc))?;
        // The pool kernel also writes bf16 halves and norms, unused here.
        let mut scratch16 =
            unsafe { s.alloc::<u16>(2 * (hq * groups).max(hkv * kblocks) * d) }.map_err(driver(alloc))?;
        let mut scratch_l1 = unsafe { s.alloc::<f32>((hq * groups).max(hkv * kblocks)) }.map_err(driver(alloc))?;
        let launch = |what: &str| driver(format!("launching the block index builder's {what} kernel"));
        let (nq_i, nk_i, hq_i) = (nq as i32, nk as i32, hq as i32);
        let (groups_i, kblocks_i, bq_i, bk_i) =
            (groups as i32, kblocks as i32, plan.block_q as i32, plan.block_k as i32);
        let per_head = i32::from(plan.shape.per_head);
        let mut timer = KernelTimer::new(self);
        // Safety (every launch below): argument lists match the template's signatures and each
        // buffer has the length the kernel indexes.
        let t0 = timer.start()?;
        for (src, n, rows_per, count, heads, out) in
            [(q, nq_i, bq_i, groups_i, hq, &mut pooled_q), (k, nk_i, bk_i, kblocks_i, hkv, &mut pooled_k)]
        {
            let (mut hi, mut lo) = scratch16.split_at_mut(scratch16.len() / 2);
            let mut b = s.launch_builder(f_pool);
            b.arg(src).arg(&n).arg(&rows_per).arg(&count).arg(out).arg(&mut hi).arg(&mut lo).arg(&mut scratch_l1);
            let grid = ((count as usize).div_ceil(pool_groups_per_cta(d as u32)) as u32, heads as u32, 1);
            unsafe { b.launch(launch_cfg(grid, 128, 0)) }.map_err(launch("pool"))?;
        }
        timer.mark("pool", t0)?;
        // (Allocated once the pool is queued: the GPU starts while the host allocates.)
        let mut chosen = unsafe { s.alloc::<u32>(hq * groups * words) }.map_err(driver(alloc))?;
        let mut row_count = s.alloc_zeros::<u32>(rows.max(1)).map_err(driver(alloc))?;
        let mut block_ptr = s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?;
        // Every (group, key block) score, for `chunk` heads at a time (a multiple of the GQA
        // group, so each chunk's query heads map to whole key heads): the kernels index from
        // the chunk's first head, so they get views that start there.
        let gqa = hq / hkv;
        let per_head_bytes = (groups * kblocks * 8).max(1);
        let chunk = ((SCORE_BYTES / per_head_bytes).clamp(1, hq) / gqa).max(1) * gqa;
        // Safety: block_scores writes every score of the chunk before block_select reads it.
        let mut scores = unsafe { s.alloc::<f64>((chunk * groups * kblocks).max(1)) }.map_err(driver(alloc))?;
        // block_top keeps each warp's row of keys (8 bytes each) and the list of those still in
        // the running (2 bytes) in shared memory when 8 rows fit in 120 KiB (up to 1536 key
        // blocks: 98304 tokens in 64-token blocks); else it rereads the scores on every pass.
        let cache_limit = self.block_top_cache.load(std::sync::atomic::Ordering::Relaxed).min(TOP_CACHE_MAX_BLOCKS);
        let top_cache = if words * 32 <= cache_limit { words * 32 } else { 0 };
        let (top_cache_i, top_smem) = (top_cache as i32, (8 * top_cache * 10) as u32);
        for h0 in (0..hq).step_by(chunk) {
            let hc = chunk.min(hq - h0);
            let (hc_i, hkv_c) = (hc as i32, (hc / gqa) as i32);
            let q_view = pooled_q.slice(h0 * groups * d..);
            let k_view = pooled_k.slice(h0 / gqa * kblocks * d..);
            let t0 = timer.start()?;
            let mut b = s.launch_builder(f_scores);
            b.arg(&q_view).arg(&k_view).arg(&hc_i).arg(&hkv_c).arg(&groups_i).arg(&kblocks_i).arg(&plan.shape.scale);
            b.arg(&mut scores);
            let grid = (groups.div_ceil(64) as u32, kblocks.div_ceil(64) as u32, hc as u32);
            unsafe { b.launch(launch_cfg(grid, 256, 0)) }.map_err(launch("block_scores"))?;
            timer.mark("score", t0)?;
            let t0 = timer.start()?;
            let allowed_view = allowed.slice(if plan.shape.per_head { h0 * groups * words } else { 0 }..);
            let mut chosen_view = chosen.slice_mut(h0 * groups * words..);
            // top_k and threshold: block_top, a radix select with a warp per group (block_select's
            // bitonic sort took 0.62 of the 1.40 ms of a 64k build, block_top 0.18); top_p needs
            // the candidates in order (its weights are summed best first): block_select.
            let top = mode != 2;
            let mut b = s.launch_builder(if top { f_top } else { f_select });
            b.arg(&scores).arg(&allowed_view).arg(&per_head).arg(&groups_i).arg(&kblocks_i);
            b.arg(&mode).arg(&top_k).arg(&budget_arg).arg(&mut chosen_view);
            if top {
                b.arg(&top_cache_i);
            }
            let cfg = if top {
                launch_cfg((groups.div_ceil(8) as u32, hc as u32, 1), 256, top_smem)
            } else {
                launch_cfg((groups as u32, hc as u32, 1), 256, select_smem as u32)
            };
            unsafe { b.launch(cfg) }.map_err(launch("block_select"))?;
            timer.mark("select", t0)?;
        }
        let (q_blocks_i, bm_i) = (q_blocks as i32, plan.shape.block_m as i32);
        let dims = [per_head, hq_i, q_blocks_i, bm_i, bq_i, groups_i, kblocks_i];
        let no_lines = NoLines::new(s)?;
        let mut none_idx = s.alloc_zeros::<u32>(1).map_err(driver(alloc))?;
        let mut none_mask = s.alloc_zeros::<u16>(1).map_err(driver(alloc))?;
        let t0 = timer.start()?;
        entries.launch_rows(
            s,
            f_rows,
            &chosen,
            no_lines.args(),
            dims,
            0,
            (&mut row_count, &block_ptr, &mut none_idx, &mut none_mask),
        )?;
        let rows_i = rows as i32;
        let mut b = s.launch_builder(f_scan);
        b.arg(&row_count).arg(&rows_i).arg(&mut block_ptr);
        unsafe { b.launch(launch_cfg((1, 1, 1), 1024, 0)) }.map_err(launch("scan"))?;
        timer.mark("count+scan", t0)?;
        let (len, sized_by_read) = list_len(s, plan.entries.bound(&plan.shape), &block_ptr)?;
        let (mut block_idx, mut block_mask) = alloc_lists(s, len)?;
        let t0 = timer.start()?;
        entries.launch_rows(
            s,
            f_rows,
            &chosen,
            no_lines.args(),
            dims,
            1,
            (&mut row_count, &block_ptr, &mut block_idx, &mut block_mask),
        )?;
        timer.mark("write", t0)?;
        let columns = (
            s.alloc_zeros::<u32>(rows + 1).map_err(driver(alloc))?,
            s.alloc_zeros::<u32>(1).map_err(driver(alloc))?,
            s.alloc_zeros::<u16>(1).map_err(driver(alloc))?,
        );
        let index = self.single_index(
            shape,
            (plan.shape.block_m, plan.shape.block_n),
            (block_ptr, block_idx, block_mask),
            columns,
        )?;
        let sizing = (sized_by_read, (len, 0));
        Ok((index, IndexBuild::new(timer, started, None, hq, "blocks", sizing)))
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
