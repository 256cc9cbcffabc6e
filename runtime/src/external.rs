//! Tensors and streams owned by another library (PyTorch): weft's kernels read and write their
//! memory in place, on that library's stream, in the device's primary context (the one the
//! CUDA runtime, and so PyTorch, uses).
//!
//! cudarc's buffers own their memory; a [`Borrowed`] buffer wraps a foreign address as one for
//! the length of a call and gives it back (never frees it) when dropped.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DeviceRepr};
use weft_codegen::DType;

use crate::{driver, AttnShape, Error, LaunchReport, LayerPlan, PagedKvCache, PagedShape, Runtime};

/// A device buffer owned elsewhere, seen as a [`CudaSlice`] for one call.
pub struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T: DeviceRepr> Borrowed<T> {
    /// # Safety
    /// `addr` must be device memory of `stream`'s context holding at least `len` elements of
    /// `T`, valid (and not used by anyone else in a conflicting way) until the work queued on
    /// `stream` with it has run. Event tracking must be off in the context (see
    /// [`Runtime::open_external`]): a tracked slice would create events here.
    unsafe fn new(stream: &Arc<CudaStream>, addr: u64, len: usize) -> Self {
        // Safety: the caller's contract; the slice is never dropped as such (see Drop).
        let slice = unsafe { stream.upgrade_device_ptr::<T>(addr as sys::CUdeviceptr, len) };
        Borrowed { slice: ManuallyDrop::new(slice) }
    }
}

impl<T> Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // Safety: taken once, here; `leak` hands the address back without freeing it.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let _ = slice.leak();
    }
}

/// Device addresses of one attention call's tensors, each contiguous in the layout
/// [`Runtime::attention_layer`] takes: Q `[hq, nq, d]`, K and V `[hkv, nk, d]`, O like Q, LSE
/// `[hq, nq]` in f32.
#[derive(Clone, Copy, Debug)]
pub struct ExternalTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
}

impl Runtime {
    /// The runtime for device `ordinal` of a process where another library (PyTorch) owns the
    /// memory and the streams: the device's primary context (shared with the CUDA runtime),
    /// no event tracking (the caller orders its work on its own streams), and the kernel
    /// database at `db` (default: `$WEFT_DB`, else the per-user cache directory).
    pub fn open_external(ordinal: usize, db: Option<&std::path::Path>) -> Result<Runtime, Error> {
        let rt = Runtime::open_on(ordinal, db)?;
        // Safety: this runtime works on one stream at a time (`use_stream` orders a switch),
        // so the per-buffer events cudarc records for work across streams are not needed.
        unsafe { rt.gpu.ctx.disable_event_tracking() };
        Ok(rt)
    }

    /// Queues the following work on the foreign stream `stream` (a `CUstream`/`cudaStream_t`
    /// of this runtime's device; 0 is the legacy default stream). When it differs from the
    /// last one, the last is waited for once, so that buffers this runtime keeps across calls
    /// (index plans, static indexes) are complete before another stream reads them.
    ///
    /// # Safety
    /// `stream` must be a live stream of this device's primary context, kept alive by its
    /// owner while work queued here may run.
    pub unsafe fn use_stream(&mut self, stream: u64) -> Result<(), Error> {
        let raw = stream as sys::CUstream;
        if self.gpu.stream.cu_stream() == raw {
            return Ok(());
        }
        // A stream being captured into a CUDA graph may not wait for the host; PyTorch
        // synchronises the device before it starts a capture, so the old stream is idle then.
        // Safety: the caller's contract.
        let next = unsafe { self.gpu.ctx.wrap_borrowed_stream(raw) };
        if !crate::capturing(&next)? {
            self.gpu.stream.synchronize().map_err(driver("waiting for the previous stream"))?;
        }
        self.gpu.stream = next;
        Ok(())
    }

    /// [`Runtime::attention_layer`] on foreign memory, queued on the stream given to
    /// [`Runtime::use_stream`]; nothing here waits for the device.
    ///
    /// # Safety
    /// Each address must be device memory of this context holding the elements `shape` and
    /// `dtype` give it (16-bit Q, K, V and O; f32 LSE), alive until the queued work has run;
    /// the runtime must come from [`Runtime::open_external`].
    pub unsafe fn attention_layer_external(
        &self,
        plan: &LayerPlan,
        shape: AttnShape,
        dtype: DType,
        t: ExternalTensors,
        scale: Option<f32>,
    ) -> Result<Vec<LaunchReport>, Error> {
        // Safety: the caller's contract.
        let (q, k, v, mut out, mut lse) = unsafe { self.borrow(shape, t)? };
        self.attention_layer(plan, shape, dtype, &q, &k, &v, &mut out, &mut lse, scale)
    }

    /// [`Runtime::attention_layer_varlen`] on foreign memory (packed `[heads, total tokens,
    /// d]`), queued on the stream given to [`Runtime::use_stream`].
    ///
    /// # Safety
    /// As [`Runtime::attention_layer_external`], for the token totals of `seqs`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_layer_varlen_external(
        &self,
        plan: &LayerPlan,
        heads: (usize, usize),
        head_dim: usize,
        seqs: &[(usize, usize)],
        dtype: DType,
        t: ExternalTensors,
        scale: Option<f32>,
    ) -> Result<Vec<LaunchReport>, Error> {
        let shape = crate::layer::varlen_shape(heads, head_dim, seqs)?;
        // Safety: the caller's contract.
        let (q, k, v, mut out, mut lse) = unsafe { self.borrow(shape, t)? };
        self.layer(plan, shape, seqs, dtype, &q, &k, &v, &mut out, &mut lse, scale)
    }

    /// A paged KV cache on this runtime's GPU ([`crate::Gpu::paged_cache`]).
    pub fn paged_cache(&self, shape: PagedShape) -> Result<PagedKvCache, Error> {
        self.gpu.paged_cache(shape)
    }

    /// A paged KV cache kept as `options` say on this runtime's GPU
    /// ([`crate::Gpu::paged_cache_with_options`]).
    pub fn paged_cache_with_options(
        &self,
        shape: PagedShape,
        options: crate::PagedOptions,
    ) -> Result<PagedKvCache, Error> {
        self.gpu.paged_cache_with_options(shape, options)
    }

    /// The hot pages' counters of a cache in host memory ([`PagedKvCache::hot_stats`]).
    pub fn paged_hot_stats(&self, cache: &PagedKvCache) -> Result<Option<crate::HotStats>, Error> {
        cache.hot_stats(&self.gpu)
    }

    /// [`PagedKvCache::fill`] from foreign memory: K and V `[hkv, n, head_dim]` at `k` and `v`,
    /// queued on the stream given to [`Runtime::use_stream`].
    ///
    /// # Safety
    /// As [`Runtime::attention_layer_external`], for those shapes.
    pub unsafe fn paged_fill_external(
        &self,
        cache: &mut PagedKvCache,
        seq: usize,
        k: u64,
        v: u64,
        n: usize,
    ) -> Result<(), Error> {
        let s = cache.shape();
        let len = s.hkv * n * s.head_dim;
        self.check_external()?;
        // Safety: the caller's contract.
        let (k, v) = unsafe { (self.borrowed::<u16>(k, len), self.borrowed::<u16>(v, len)) };
        cache.fill(&self.gpu, seq, &k, &v, n)
    }

    /// [`PagedKvCache::append`] from foreign memory: K and V `[batch, hkv, head_dim]`.
    ///
    /// # Safety
    /// As [`Runtime::attention_layer_external`], for those shapes.
    pub unsafe fn paged_append_external(&self, cache: &mut PagedKvCache, k: u64, v: u64) -> Result<(), Error> {
        let s = cache.shape();
        let len = s.batch * s.hkv * s.head_dim;
        self.check_external()?;
        // Safety: the caller's contract.
        let (k, v) = unsafe { (self.borrowed::<u16>(k, len), self.borrowed::<u16>(v, len)) };
        cache.append(&self.gpu, &k, &v)
    }

    /// [`PagedKvCache::decode_step`] on foreign memory: Q and O `[batch, hq, head_dim]`, LSE
    /// `[batch, hq]` (f32). `splits` 0 takes the count tuned for this step's shape
    /// ([`Runtime::paged_splits`]), else the automatic choice.
    ///
    /// # Safety
    /// As [`Runtime::attention_layer_external`], for those shapes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn paged_decode_external(
        &self,
        cache: &mut PagedKvCache,
        q: u64,
        out: u64,
        lse: u64,
        retrieval: Option<&weft_dsl::Retrieval>,
        scale: f32,
        splits: usize,
    ) -> Result<(), Error> {
        let s = cache.shape();
        let rows = s.batch * s.hq;
        self.check_external()?;
        // Safety: the caller's contract.
        let (q, mut out, mut lse) = unsafe {
            (
                self.borrowed::<u16>(q, rows * s.head_dim),
                self.borrowed::<u16>(out, rows * s.head_dim),
                self.borrowed::<f32>(lse, rows),
            )
        };
        let splits = if splits == 0 { self.paged_splits(cache, retrieval) } else { splits };
        cache.decode_step(&self.gpu, &q, &mut out, &mut lse, retrieval, scale, splits)
    }

    fn check_external(&self) -> Result<(), Error> {
        if !self.gpu.ctx.is_primary() || self.gpu.ctx.is_event_tracking() {
            return Err(Error::Usage("foreign tensors need a runtime from Runtime::open_external".into()));
        }
        Ok(())
    }

    /// A foreign buffer of `len` elements on the current stream.
    ///
    /// # Safety
    /// As [`Borrowed::new`].
    unsafe fn borrowed<T: DeviceRepr>(&self, addr: u64, len: usize) -> Borrowed<T> {
        // Safety: the caller's contract.
        unsafe { Borrowed::new(&self.gpu.stream, addr, len) }
    }

    /// The call's tensors as borrowed buffers of the lengths `shape` gives them.
    ///
    /// # Safety
    /// As [`Runtime::attention_layer_external`].
    #[allow(clippy::type_complexity)]
    unsafe fn borrow(
        &self,
        shape: AttnShape,
        t: ExternalTensors,
    ) -> Result<(Borrowed<u16>, Borrowed<u16>, Borrowed<u16>, Borrowed<u16>, Borrowed<f32>), Error> {
        if !self.gpu.ctx.is_primary() || self.gpu.ctx.is_event_tracking() {
            return Err(Error::Usage("foreign tensors need a runtime from Runtime::open_external".into()));
        }
        let len = |a: usize, b: usize, c: usize| {
            a.checked_mul(b).and_then(|x| x.checked_mul(c)).ok_or_else(|| Error::Shape(format!("{shape:?} overflows")))
        };
        let (q_len, kv_len) = (len(shape.hq, shape.nq, shape.head_dim)?, len(shape.hkv, shape.nk, shape.head_dim)?);
        let lse_len = len(shape.hq, shape.nq, 1)?;
        let s = &self.gpu.stream;
        // Safety: the caller's contract on addresses and lengths; event tracking is off.
        unsafe {
            Ok((
                Borrowed::<u16>::new(s, t.q, q_len),
                Borrowed::<u16>::new(s, t.k, kv_len),
                Borrowed::<u16>::new(s, t.v, kv_len),
                Borrowed::<u16>::new(s, t.out, q_len),
                Borrowed::<f32>::new(s, t.lse, lse_len),
            ))
        }
    }
}
