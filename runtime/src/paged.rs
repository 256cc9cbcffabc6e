//! A paged KV cache, on the device or in host memory, and decode steps over it: dense, or with
//! Quest's retrieval of pages chosen on the device. A step is a fixed number of launches on the
//! GPU's stream with no host synchronisation and no allocation (its buffers are kept between
//! steps), so a step of a fixed batch can be captured in a CUDA graph. See
//! `codegen/src/templates/paged.cu`.
//!
//! A cache in host memory ([`Gpu::paged_cache_in_host`]) keeps K and V pinned and mapped, read
//! by the kernels over the bus, and its metadata, page table and lengths on the GPU, with a GPU
//! cache of hot pages (RetroInfer's wave buffer): a retrieval step copies the pages it keeps
//! there unless they are already there, and reads them from there.

use cudarc::driver::CudaSlice;
use weft_codegen::abi::{
    DevPtr, PagedAdvanceParams, PagedAppendParams, PagedAttendParams, PagedFillParams, PagedRetrieveParams,
    PagedScoreParams, PagedStageParams,
};
use weft_codegen::paged::{emit_paged, entry, heads_per_cta};
use weft_codegen::{emit_merge, DType, Kernel, Partial};
use weft_dsl::{Budget, Retrieval, Score, Unit};

use crate::host_memory::MappedHost;
use crate::launch::{Args, Module};
use crate::{driver, Error, Gpu};

/// The shape of a [`PagedKvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedShape {
    /// Sequences decoded together.
    pub batch: usize,
    /// Query heads and key/value heads (GQA: `hkv` divides `hq`).
    pub hq: usize,
    pub hkv: usize,
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages a sequence may hold: its capacity is `max_pages * page_size` tokens.
    pub max_pages: usize,
    pub dtype: DType,
}

impl PagedShape {
    fn check(&self) -> Result<(), Error> {
        let s = self;
        if s.batch == 0 || s.hq == 0 || s.hkv == 0 || s.max_pages == 0 {
            return Err(Error::Shape(format!("a paged cache needs at least one of everything, got {s:?}")));
        }
        if s.hq % s.hkv != 0 {
            return Err(Error::Shape(format!("{} key/value heads must divide {} query heads", s.hkv, s.hq)));
        }
        if !(1..=1024).contains(&s.page_size) {
            return Err(Error::Shape(format!("page_size must be 1 to 1024 tokens, got {}", s.page_size)));
        }
        if s.batch > 65535 || s.hq > 65535 || s.hkv > 65535 {
            return Err(Error::Shape(format!("at most 65535 sequences and heads, got {s:?}")));
        }
        let tokens = s.max_pages.checked_mul(s.page_size).filter(|t| *t <= i32::MAX as usize);
        let pages = s.batch.checked_mul(s.max_pages).filter(|p| *p <= u32::MAX as usize);
        if tokens.is_none() || pages.is_none() {
            return Err(Error::Shape(format!("{s:?}: too many tokens per sequence or pages in all")));
        }
        Ok(())
    }

    /// Physical pages: every sequence its own `max_pages` (the default page table).
    pub fn pages(&self) -> usize {
        self.batch * self.max_pages
    }

    /// Elements of the K (or V) cache: `[pages, page_size, hkv, head_dim]`.
    pub fn cache_len(&self) -> usize {
        self.pages() * self.page_size * self.hkv * self.head_dim
    }
}

/// What a decode step keeps: every token, or Quest's pages.
#[derive(Clone, Copy, Debug)]
enum Keep {
    Dense,
    /// `mode` 0: top_k; 1: threshold (`budget_arg` = ln t); 2: top_p (`budget_arg` = p).
    Quest {
        sink: i32,
        recent: i32,
        /// 0: Quest's bound; 1: the best token over quantized keys.
        score_mode: i32,
        /// Query heads per choice: 1, or the group size when the heads of a KV head choose
        /// together (`per = kv_head`).
        group: usize,
        mode: i32,
        top_k: i32,
        budget_arg: f64,
        cap: usize,
    },
}

impl Keep {
    /// The step for `retrieval` on pages of `page_size` (keys quantized to `key_bits`, 0: not
    /// kept), or why the device cannot take it.
    fn of(retrieval: Option<&Retrieval>, s: &PagedShape, key_bits: u32) -> Result<Keep, Error> {
        let Some(r) = retrieval else { return Ok(Keep::Dense) };
        let usage = |why: String| Err(Error::Usage(format!("paged retrieval decode: {why}")));
        if r.unit != Unit::Page(s.page_size as u32) {
            return usage(format!(
                "the device retrieves the cache's pages (unit = page({})), got {:?}",
                s.page_size, r.unit
            ));
        }
        let score_mode = match r.score {
            Score::MinMax => 0,
            Score::Quantized(b) if b == key_bits => 1,
            Score::Quantized(b) => {
                return usage(format!(
                    "score = quantized({b}) needs a cache that keeps its keys quantized to {b} bits (PagedOptions::key_bits; this one: {key_bits})"
                ))
            }
            other => return usage(format!("the device scores pages by min_max or quantized(bits), got {other:?}")),
        };
        let (mode, top_k, budget_arg, kept) = match r.budget {
            Budget::TopK(n) => (0, n.min(i32::MAX as u32) as i32, 0.0, (n as usize).min(s.max_pages)),
            Budget::Threshold(t) if t > 0.0 && t.is_finite() => (1, 0, t.ln(), s.max_pages),
            Budget::TopP(p) if p > 0.0 && p <= 1.0 => (2, 0, p, s.max_pages),
            other => {
                return usage(format!("budgets are top_k(n), threshold(t > 0) and top_p(0 < p <= 1), got {other:?}"))
            }
        };
        let (sink, recent) = (r.sink as usize, r.recent as usize);
        // Chunks: the sink's and the recent tokens' (a page each, one more where unaligned)
        // and the kept pages'.
        // A row never holds more than max_pages + 2 chunks (its candidate pages, and a sink and a
        // recent chunk that share a page with them), whatever sink and recent are.
        let cap = (sink.div_ceil(s.page_size) + recent.div_ceil(s.page_size) + 1 + kept).min(s.max_pages + 2);
        let clamp = |x: usize| x.min(i32::MAX as usize) as i32;
        let group = if r.per == weft_dsl::Per::KvHead { s.hq / s.hkv } else { 1 };
        Ok(Keep::Quest { sink: clamp(sink), recent: clamp(recent), score_mode, group, mode, top_k, budget_arg, cap })
    }

    fn cap(&self) -> usize {
        match self {
            Keep::Dense => 0,
            Keep::Quest { cap, .. } => *cap,
        }
    }
}

/// The buffers of a decode step, kept between steps.
struct Workspace {
    splits: usize,
    cap: usize,
    /// The row stride of the chunks the last step wrote and its query heads per choice (`None`
    /// after a dense step).
    last_cap: Option<(usize, usize)>,
    scores: CudaSlice<u64>,
    chunks: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    opart: CudaSlice<f32>,
    lpart: CudaSlice<f32>,
}

/// Where a cache's K and V live.
enum Store {
    Device { k: CudaSlice<u16>, v: CudaSlice<u16> },
    Host { k: MappedHost, v: MappedHost, hot: Box<Hot> },
}

/// Quantized keys ([`PagedOptions::key_bits`]): codes `[pages, page_size, hkv, head_dim]` and
/// scales `[pages, page_size, hkv]` (one element each when `bits` is 0).
struct Codes {
    bits: u32,
    codes: CudaSlice<i8>,
    scale: CudaSlice<f32>,
}

/// The GPU's cache of hot pages of a cache in host memory: `slots` pages of one KV head, K and
/// V `[slots, page_size, head_dim]`, each slot's tag (`page * hkv + kv_head + 1`, 0 empty), the
/// claims of the current step, the step counter and the counters of [`HotStats`].
struct Hot {
    slots: usize,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    tag: CudaSlice<u32>,
    claim: CudaSlice<u64>,
    step: CudaSlice<u32>,
    stats: CudaSlice<u64>,
}

/// The hot pages' counters since the cache was made, summed over retrieval steps: per (query
/// head, kept page) `lookups`, `hits` (a hot copy was there), `copied` (pages brought from host
/// memory; one per page whatever the heads that asked) and `conflicts` (pages read from host
/// memory because another page took their slot in the same step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotStats {
    pub lookups: u64,
    pub hits: u64,
    pub copied: u64,
    pub conflicts: u64,
}

impl HotStats {
    /// The share of lookups that found their page on the GPU.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// The kernels' view of the hot pages (all zero: none).
#[derive(Clone, Copy, Default)]
struct HotPtrs {
    k: DevPtr,
    v: DevPtr,
    tag: DevPtr,
    slots: i32,
    step: DevPtr,
}

impl Store {
    /// K and V for a kernel that writes them, the hot tags for one that drops stale hot copies,
    /// and the hot slots.
    fn fill_ptrs<'a>(&'a mut self, a: &mut Args<'a>) -> (DevPtr, DevPtr, DevPtr, i32) {
        match self {
            Store::Device { k, v } => (a.w(k), a.w(v), 0, 0),
            Store::Host { k, v, hot } => (k.device_ptr(), v.device_ptr(), a.w(&mut hot.tag), hot.slots as i32),
        }
    }

    /// K and V for `append`, and the hot pages it writes through (their tags read).
    fn append_ptrs<'a>(&'a mut self, a: &mut Args<'a>) -> (DevPtr, DevPtr, HotPtrs) {
        match self {
            Store::Device { k, v } => (a.w(k), a.w(v), HotPtrs::default()),
            Store::Host { k, v, hot } => {
                let Hot { slots, k: hk, v: hv, tag, .. } = &mut **hot;
                let ptrs = HotPtrs { k: a.w(hk), v: a.w(hv), tag: a.r(tag), slots: *slots as i32, step: 0 };
                (k.device_ptr(), v.device_ptr(), ptrs)
            }
        }
    }

    /// K and V for `attend`, and the hot pages it reads (its step counter written).
    fn attend_ptrs<'a>(&'a mut self, a: &mut Args<'a>) -> (DevPtr, DevPtr, HotPtrs) {
        match self {
            Store::Device { k, v } => (a.r(k), a.r(v), HotPtrs::default()),
            Store::Host { k, v, hot } => {
                let Hot { slots, k: hk, v: hv, tag, step, .. } = &mut **hot;
                let ptrs = HotPtrs { k: a.r(hk), v: a.r(hv), tag: a.r(tag), slots: *slots as i32, step: a.w(step) };
                (k.device_ptr(), v.device_ptr(), ptrs)
            }
        }
    }
}

/// A paged KV cache on one GPU: K and V `[pages, page_size, hkv, head_dim]` (vLLM's and
/// FlashInfer's layout), a page table per sequence, the sequences' lengths on the device, and
/// Quest's per-page key minimum and maximum, kept current by [`PagedKvCache::fill`] and
/// [`PagedKvCache::append`]. K and V are in GPU memory ([`Gpu::paged_cache`]) or in pinned host
/// memory with a GPU cache of hot pages ([`Gpu::paged_cache_in_host`]).
///
/// Lengths live on the device (an append advances them there, so steps need no host copy)
/// and in a host mirror that bounds-checks appends.
pub struct PagedKvCache {
    shape: PagedShape,
    store: Store,
    codes: Codes,
    kmin: CudaSlice<u16>,
    kmax: CudaSlice<u16>,
    page_table: CudaSlice<u32>,
    seq_lens: CudaSlice<i32>,
    lens: Vec<usize>,
    module: Module,
    merge: Kernel,
    work: Option<Workspace>,
    /// The split count [`crate::Runtime::paged_splits`] last found, for the retrieval and
    /// sequence-length bucket it was found for: a decode loop reads the database once a bucket.
    pub(crate) tuned: Option<TunedSplits>,
}

/// A tuned split count and what it was looked up for.
pub(crate) struct TunedSplits {
    pub(crate) retrieval: Option<Retrieval>,
    pub(crate) seq: u32,
    pub(crate) splits: usize,
}

/// Where a [`PagedKvCache`] keeps K and V, and what it keeps beside them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagedOptions {
    /// K and V in pinned host memory (for contexts larger than the GPU's memory), read by the
    /// kernels over the bus; the metadata, page table and lengths stay on the GPU.
    pub host: bool,
    /// With `host`: the GPU's cache of hot pages, in pages of one KV head
    /// (`hot_pages * page_size * head_dim` elements each of K and V; 0: every read goes over
    /// the bus).
    pub hot_pages: usize,
    /// Every key also quantized to this many bits (1, 2, 4 or 8; 0: none), kept on the GPU
    /// and current on fill and append, for retrieval that scores pages by their best token over
    /// quantized keys (`score = quantized(bits)`, ParisKV): a byte per element and an f32 scale
    /// per token and KV head.
    pub key_bits: u32,
}

impl Gpu {
    /// An empty paged cache of `shape` in GPU memory (every sequence of length 0), its pages
    /// allocated now.
    pub fn paged_cache(&self, shape: PagedShape) -> Result<PagedKvCache, Error> {
        self.paged_cache_with_options(shape, PagedOptions::default())
    }

    /// An empty paged cache of `shape` whose K and V live in pinned host memory, with a GPU
    /// cache of `hot_pages` pages of one KV head ([`PagedOptions`]).
    pub fn paged_cache_in_host(&self, shape: PagedShape, hot_pages: usize) -> Result<PagedKvCache, Error> {
        self.paged_cache_with_options(shape, PagedOptions { host: true, hot_pages, ..PagedOptions::default() })
    }

    /// An empty paged cache of `shape` kept as `options` say. Host memory is allocated and
    /// pinned now, and not zeroed: only filled and appended tokens are read.
    pub fn paged_cache_with_options(&self, shape: PagedShape, options: PagedOptions) -> Result<PagedKvCache, Error> {
        shape.check()?;
        let PagedOptions { host, hot_pages, key_bits } = options;
        if ![0, 1, 2, 4, 8].contains(&key_bits) {
            return Err(Error::Shape(format!("quantized keys take 1, 2, 4 or 8 bits (0: none), got {key_bits}")));
        }
        if hot_pages > 0 && !host {
            return Err(Error::Usage("hot pages are for a cache in host memory".into()));
        }
        let s = self.stream();
        let what = |x: &str| format!("allocating the paged cache's {x} ({shape:?}, {options:?})");
        let store = if !host {
            Store::Device {
                k: s.alloc_zeros(shape.cache_len()).map_err(driver(what("keys")))?,
                v: s.alloc_zeros(shape.cache_len()).map_err(driver(what("values")))?,
            }
        } else {
            // Hot pages are keyed by `page * hkv + kv_head + 1` in 32 bits.
            if shape.pages().checked_mul(shape.hkv).is_none_or(|k| k >= u32::MAX as usize) {
                return Err(Error::Shape(format!(
                    "{shape:?}: a cache in host memory holds fewer than 2^32 pages x KV heads"
                )));
            }
            if hot_pages > i32::MAX as usize || hot_pages.checked_mul(shape.page_size * shape.head_dim).is_none() {
                return Err(Error::Shape(format!("{hot_pages} hot pages: too many")));
            }
            let bytes =
                shape.cache_len().checked_mul(2).ok_or_else(|| Error::Shape(format!("{shape:?}: too large")))?;
            let hot_len = hot_pages * shape.page_size * shape.head_dim;
            let hot = Box::new(Hot {
                slots: hot_pages,
                k: s.alloc_zeros(hot_len.max(1)).map_err(driver(what("hot keys")))?,
                v: s.alloc_zeros(hot_len.max(1)).map_err(driver(what("hot values")))?,
                tag: s.alloc_zeros(hot_pages.max(1)).map_err(driver(what("hot tags")))?,
                claim: s.alloc_zeros(hot_pages.max(1)).map_err(driver(what("hot claims")))?,
                step: s.alloc_zeros(1).map_err(driver(what("hot step")))?,
                stats: s.alloc_zeros(4).map_err(driver(what("hot counters")))?,
            });
            Store::Host {
                k: MappedHost::new(s, bytes, &what("keys in host memory"))?,
                v: MappedHost::new(s, bytes, &what("values in host memory"))?,
                hot,
            }
        };
        // Quantized keys: a byte per element, a scale per token and KV head (one of each when none).
        let rows = if key_bits > 0 { shape.cache_len() / shape.head_dim } else { 1 };
        let codes = Codes {
            bits: key_bits,
            codes: s
                .alloc_zeros(rows * if key_bits > 0 { shape.head_dim } else { 1 })
                .map_err(driver(what("key codes")))?,
            scale: s.alloc_zeros(rows).map_err(driver(what("key code scales")))?,
        };
        self.paged_cache_with(shape, store, codes)
    }

    fn paged_cache_with(&self, shape: PagedShape, store: Store, codes: Codes) -> Result<PagedKvCache, Error> {
        let host = matches!(store, Store::Host { .. });
        let kernel = emit_paged(shape.head_dim as u32, shape.dtype, (shape.hq / shape.hkv) as u32, host)?;
        let merge = emit_merge(shape.head_dim as u32, shape.dtype, Partial::F32)?;
        let module = self.load_module(&kernel, &entry::ALL)?;
        let s = self.stream();
        let what = |x: &str| format!("allocating the paged cache's {x} ({shape:?})");
        let meta = shape.pages() * shape.hkv * shape.head_dim;
        let table: Vec<u32> = (0..shape.pages() as u32).collect();
        Ok(PagedKvCache {
            store,
            codes,
            kmin: s.alloc_zeros(meta).map_err(driver(what("page minima")))?,
            kmax: s.alloc_zeros(meta).map_err(driver(what("page maxima")))?,
            page_table: s.clone_htod(&table).map_err(driver(what("page table")))?,
            seq_lens: s.alloc_zeros(shape.batch).map_err(driver(what("lengths")))?,
            lens: vec![0; shape.batch],
            module,
            merge,
            work: None,
            tuned: None,
            shape,
        })
    }
}

impl PagedKvCache {
    pub fn shape(&self) -> PagedShape {
        self.shape
    }

    /// The sequences' lengths (the host's mirror of the device's).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Replaces the page table: sequence `b`'s logical page `i` is physical page
    /// `table[b * max_pages + i]` (pages may be shared, e.g. by sequences with one prefix).
    pub fn set_page_table(&mut self, gpu: &Gpu, table: &[u32]) -> Result<(), Error> {
        let s = self.shape;
        if table.len() != s.pages() || table.iter().any(|p| *p as usize >= s.pages()) {
            return Err(Error::Shape(format!(
                "a page table of {} entries below {} expected, got {} entries",
                s.pages(),
                s.pages(),
                table.len()
            )));
        }
        gpu.stream().memcpy_htod(table, &mut self.page_table).map_err(driver("uploading the page table"))
    }

    /// Writes sequence `seq`'s first `n` tokens from `k` and `v` (`[hkv, n, head_dim]`, weft's
    /// layout), replacing what it held, and sets its length to `n`.
    pub fn fill(
        &mut self,
        gpu: &Gpu,
        seq: usize,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        n: usize,
    ) -> Result<(), Error> {
        let s = self.shape;
        if seq >= s.batch {
            return Err(Error::Shape(format!("sequence {seq} of a cache of {}", s.batch)));
        }
        if n > s.max_pages * s.page_size {
            return Err(Error::Shape(format!(
                "{n} tokens do not fit a sequence of {} pages of {}",
                s.max_pages, s.page_size
            )));
        }
        let want = s.hkv * n * s.head_dim;
        if k.len() < want || v.len() < want {
            return Err(Error::Shape(format!("{n} tokens x {} heads x {}: k or v is short", s.hkv, s.head_dim)));
        }
        let stream = gpu.stream();
        if n > 0 {
            let mut a = Args::new(stream);
            let (kc, vc, hot_tag, hot_slots) = self.store.fill_ptrs(&mut a);
            let params = PagedFillParams {
                ksrc: a.r(k),
                vsrc: a.r(v),
                n: n as i32,
                seq: seq as i32,
                page_table: a.r(&self.page_table),
                max_pages: s.max_pages as i32,
                page_size: s.page_size as i32,
                hkv: s.hkv as i32,
                kc,
                vc,
                kmin: a.w(&mut self.kmin),
                kmax: a.w(&mut self.kmax),
                codes: a.w(&mut self.codes.codes),
                cscale: a.w(&mut self.codes.scale),
                key_bits: self.codes.bits as i32,
                hot_tag,
                hot_slots,
            };
            // Safety: addresses from `a`; the sources hold `n` tokens (checked), the pages
            // `max_pages` per sequence, the table entries are below `pages` (checked on upload).
            unsafe { self.module.launch(stream, &entry::FILL, [n.div_ceil(s.page_size), s.hkv, 1], 0, params, a) }?;
        }
        self.lens[seq] = n;
        let lens: Vec<i32> = self.lens.iter().map(|l| *l as i32).collect();
        stream.memcpy_htod(&lens, &mut self.seq_lens).map_err(driver("uploading the lengths"))
    }

    /// Appends one token to every sequence: `k` and `v` are `[batch, hkv, head_dim]`.
    pub fn append(&mut self, gpu: &Gpu, k: &CudaSlice<u16>, v: &CudaSlice<u16>) -> Result<(), Error> {
        let s = self.shape;
        let want = s.batch * s.hkv * s.head_dim;
        if k.len() != want || v.len() != want {
            return Err(Error::Shape(format!(
                "append takes [batch {}, hkv {}, head_dim {}] keys and values, got {} and {} elements",
                s.batch,
                s.hkv,
                s.head_dim,
                k.len(),
                v.len()
            )));
        }
        if let Some(b) = self.lens.iter().position(|l| *l >= s.max_pages * s.page_size) {
            return Err(Error::Shape(format!("sequence {b} is full ({} tokens)", self.lens[b])));
        }
        let stream = gpu.stream();
        let mut a = Args::new(stream);
        let (kc, vc, hot) = self.store.append_ptrs(&mut a);
        let params = PagedAppendParams {
            knew: a.r(k),
            vnew: a.r(v),
            seq_lens: a.r(&self.seq_lens),
            page_table: a.r(&self.page_table),
            max_pages: s.max_pages as i32,
            page_size: s.page_size as i32,
            hkv: s.hkv as i32,
            kc,
            vc,
            kmin: a.w(&mut self.kmin),
            kmax: a.w(&mut self.kmax),
            codes: a.w(&mut self.codes.codes),
            cscale: a.w(&mut self.codes.scale),
            key_bits: self.codes.bits as i32,
            hot_k: hot.k,
            hot_v: hot.v,
            hot_tag: hot.tag,
            hot_slots: hot.slots,
        };
        // Safety: addresses from `a`; every sequence has room for the token (checked above on
        // the host's mirror of the lengths).
        unsafe { self.module.launch(stream, &entry::APPEND, [s.batch, s.hkv, 1], 0, params, a) }?;
        let mut a = Args::new(stream);
        let params = PagedAdvanceParams { seq_lens: a.w(&mut self.seq_lens), batch: s.batch as i32 };
        // Safety: `seq_lens` holds `batch` lengths.
        unsafe { self.module.launch(stream, &entry::ADVANCE, [s.batch, 1, 1], 0, params, a) }?;
        for l in &mut self.lens {
            *l += 1;
        }
        Ok(())
    }

    /// One decode step: `q` `[batch, hq, head_dim]` attends over each sequence's cache (its
    /// last query sees every token), into `out` `[batch, hq, head_dim]` and `lse` `[batch,
    /// hq]` (natural log). `retrieval`: pages (unit = page of the cache's page size) scored
    /// by Quest's bound (min_max) or by quantized keys (quantized(bits), when the cache keeps
    /// them: [`PagedOptions::key_bits`]), any budget, sink and recent tokens always kept, chosen
    /// on the device exactly as `weft_patterns::retrieval` chooses; `None` keeps every token.
    /// `scale` is the softmax scale (the retrieval ranks `f64::from(scale) * score`). `splits`: key
    /// ranges per (sequence, head) merged afterwards (0: enough to fill the GPU).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_step(
        &mut self,
        gpu: &Gpu,
        q: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        retrieval: Option<&Retrieval>,
        scale: f32,
        splits: usize,
    ) -> Result<(), Error> {
        let s = self.shape;
        let rows = s.batch * s.hq;
        if q.len() != rows * s.head_dim || out.len() != rows * s.head_dim || lse.len() != rows {
            return Err(Error::Shape(format!(
                "decode of [batch {}, hq {}, head_dim {}]: q {}, out {}, lse {} elements",
                s.batch,
                s.hq,
                s.head_dim,
                q.len(),
                out.len(),
                lse.len()
            )));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::Usage(format!("the softmax scale must be positive and finite, got {scale}")));
        }
        let keep = Keep::of(retrieval, &s, self.codes.bits)?;
        let splits = gpu.decode_splits_for(rows, splits);
        self.workspace(gpu, splits, keep.cap())?;
        let stream = gpu.stream();
        let work = self.work.as_mut().expect("the workspace was just made");
        work.last_cap = match keep {
            Keep::Dense => None,
            Keep::Quest { cap, group, .. } => Some((cap, group)),
        };
        let (dense, cap, group) = match keep {
            Keep::Dense => (1, 0, 1),
            Keep::Quest { sink, recent, score_mode, group, mode, top_k, budget_arg, cap } => {
                let mut a = Args::new(stream);
                let params = PagedScoreParams {
                    q: a.r(q),
                    kmin: a.r(&self.kmin),
                    kmax: a.r(&self.kmax),
                    codes: a.r(&self.codes.codes),
                    cscale: a.r(&self.codes.scale),
                    score_mode,
                    page_table: a.r(&self.page_table),
                    seq_lens: a.r(&self.seq_lens),
                    max_pages: s.max_pages as i32,
                    page_size: s.page_size as i32,
                    hq: s.hq as i32,
                    hkv: s.hkv as i32,
                    sink,
                    recent,
                    scale: f64::from(scale),
                    shared: i32::from(group > 1),
                    scores: a.w(&mut work.scores),
                };
                // Safety: addresses from `a`; the workspace holds `max_pages` scores per
                // (sequence, head), and a sequence's candidates are among its `max_pages` pages.
                unsafe { self.module.launch(stream, &entry::SCORE, [s.max_pages, s.hkv, s.batch], 0, params, a) }?;
                let mut a = Args::new(stream);
                let params = PagedRetrieveParams {
                    seq_lens: a.r(&self.seq_lens),
                    max_pages: s.max_pages as i32,
                    page_size: s.page_size as i32,
                    hq: s.hq as i32,
                    group: group as i32,
                    sink,
                    recent,
                    mode,
                    top_k,
                    budget_arg,
                    scores: a.r(&work.scores),
                    chunks: a.w(&mut work.chunks),
                    chunk_count: a.w(&mut work.counts),
                    cap: cap as i32,
                };
                // Safety: addresses from `a`; the workspace holds `max_pages` scores and `cap`
                // chunks per (sequence, head), which bound what the kernel reads and writes.
                unsafe { self.module.launch(stream, &entry::RETRIEVE, [s.hq / group, s.batch, 1], 0, params, a) }?;
                (0, cap, group)
            }
        };
        if let (Store::Host { k, v, hot }, Keep::Quest { .. }) = (&mut self.store, keep) {
            if hot.slots > 0 {
                let mut a = Args::new(stream);
                let params = PagedStageParams {
                    kc: k.device_ptr(),
                    vc: v.device_ptr(),
                    page_table: a.r(&self.page_table),
                    max_pages: s.max_pages as i32,
                    page_size: s.page_size as i32,
                    hq: s.hq as i32,
                    hkv: s.hkv as i32,
                    chunks: a.r(&work.chunks),
                    chunk_count: a.r(&work.counts),
                    cap: cap as i32,
                    group: group as i32,
                    hot_k: a.w(&mut hot.k),
                    hot_v: a.w(&mut hot.v),
                    hot_tag: a.w(&mut hot.tag),
                    hot_claim: a.w(&mut hot.claim),
                    hot_slots: hot.slots as i32,
                    hot_step: a.r(&hot.step),
                    hot_stats: a.w(&mut hot.stats),
                };
                // Safety: addresses from `a` and the mapped cache; the chunks were written by
                // `retrieve` (at most `cap` per row, tokens below each length, so pages below
                // `max_pages`); the hot buffers hold `slots` pages.
                unsafe { self.module.launch(stream, &entry::STAGE, [s.hq / group, s.batch, 1], 0, params, a) }?;
            }
        }
        let mut a = Args::new(stream);
        let (kc, vc, hot) = self.store.attend_ptrs(&mut a);
        let params = PagedAttendParams {
            q: a.r(q),
            kc,
            vc,
            page_table: a.r(&self.page_table),
            seq_lens: a.r(&self.seq_lens),
            max_pages: s.max_pages as i32,
            page_size: s.page_size as i32,
            batch: s.batch as i32,
            hq: s.hq as i32,
            hkv: s.hkv as i32,
            chunks: a.r(&work.chunks),
            chunk_count: a.r(&work.counts),
            cap: cap as i32,
            dense,
            shared: i32::from(group > 1),
            splits: splits as i32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            hot_k: hot.k,
            hot_v: hot.v,
            hot_tag: hot.tag,
            hot_slots: hot.slots,
            hot_step: hot.step,
            opart: a.w(&mut work.opart),
            lsepart: a.w(&mut work.lpart),
        };
        // A dense step's CTA, and a step whose KV heads' heads choose together, serve the
        // heads_per_cta query heads of one KV head that share their rows.
        let grouped = dense == 1 || group > 1;
        let heads = if grouped { s.hq / heads_per_cta((s.hq / s.hkv) as u32) as usize } else { s.hq };
        // Safety: addresses from `a`; the partials hold `splits` x rows; chunks (when read)
        // were written by `retrieve` with at most `cap` per row and tokens below each length.
        unsafe { self.module.launch(stream, &entry::ATTEND, [splits, heads, s.batch], 0, params, a) }?;
        gpu.merge(&self.merge, &work.opart, &work.lpart, splits, rows, s.head_dim, out, lse)
    }

    /// Whether K and V live in host memory ([`Gpu::paged_cache_in_host`]).
    pub fn in_host(&self) -> bool {
        matches!(self.store, Store::Host { .. })
    }

    /// The hot pages' counters of a cache in host memory (`None` for one in GPU memory). Waits
    /// for the device.
    pub fn hot_stats(&self, gpu: &Gpu) -> Result<Option<HotStats>, Error> {
        let Store::Host { hot, .. } = &self.store else { return Ok(None) };
        let c = gpu.stream().clone_dtoh(&hot.stats).map_err(driver("reading the hot pages' counters"))?;
        Ok(Some(HotStats { lookups: c[0], hits: c[1], copied: c[2], conflicts: c[3] }))
    }

    /// The tokens the last step kept per (sequence, query head), ascending (rows `b * hq +
    /// h`; heads that chose together have the same), when it was a retrieval step; `None`
    /// otherwise. Waits for the device: for tests and reports (recall of the kept set), not for
    /// the decode loop.
    pub fn last_kept(&self, gpu: &Gpu) -> Result<Option<Vec<Vec<u32>>>, Error> {
        let Some((w, (cap, group))) = self.work.as_ref().and_then(|w| w.last_cap.map(|c| (w, c))) else {
            return Ok(None);
        };
        let st = gpu.stream();
        let counts = st.clone_dtoh(&w.counts).map_err(driver("reading the kept chunks"))?;
        let chunks = st.clone_dtoh(&w.chunks).map_err(driver("reading the kept chunks"))?;
        let rows = counts.len();
        Ok(Some(
            (0..rows)
                .map(|row| {
                    // The row that holds the choice: the head's, or its group's first head's.
                    let row = row - row % group;
                    let n = (counts[row].max(0) as usize).min(cap);
                    (0..n)
                        .flat_map(|c| {
                            let at = 2 * (row * cap + c);
                            chunks[at].max(0) as u32..chunks[at + 1].max(0) as u32
                        })
                        .collect()
                })
                .collect(),
        ))
    }

    /// Makes the step's buffers fit `splits` and `cap` (kept when they do).
    fn workspace(&mut self, gpu: &Gpu, splits: usize, cap: usize) -> Result<(), Error> {
        let s = self.shape;
        if self.work.as_ref().is_some_and(|w| w.splits == splits && w.cap >= cap) {
            return Ok(());
        }
        let rows = s.batch * s.hq;
        let cap = cap.max(1);
        let st = gpu.stream();
        let what = "allocating the decode step's buffers";
        self.work = Some(Workspace {
            splits,
            cap,
            last_cap: None,
            scores: st.alloc_zeros(rows * s.max_pages).map_err(driver(what))?,
            chunks: st.alloc_zeros(rows * cap * 2).map_err(driver(what))?,
            counts: st.alloc_zeros(rows).map_err(driver(what))?,
            opart: st.alloc_zeros(splits * rows * s.head_dim).map_err(driver(what))?,
            lpart: st.alloc_zeros(splits * rows).map_err(driver(what))?,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> PagedShape {
        PagedShape { batch: 2, hq: 8, hkv: 2, head_dim: 128, page_size: 16, max_pages: 10, dtype: DType::Bf16 }
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_errors() {
        assert!(shape().check().is_ok());
        for (bad, why) in [
            (PagedShape { hkv: 3, ..shape() }, "must divide"),
            (PagedShape { page_size: 0, ..shape() }, "page_size"),
            (PagedShape { batch: 0, ..shape() }, "at least one"),
            (PagedShape { max_pages: usize::MAX / 8, ..shape() }, "too many tokens"),
            (PagedShape { hq: 70_000, hkv: 70_000, ..shape() }, "65535"),
        ] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn quest_and_quantized_pages_run_on_the_device_and_other_retrievals_say_why_not() {
        let quest =
            Retrieval { unit: Unit::Page(16), budget: Budget::TopK(3), sink: 20, recent: 5, ..Retrieval::default() };
        match Keep::of(Some(&quest), &shape(), 0).unwrap() {
            // Chunks: two for the sink, one for the recent tokens, one for an unaligned start,
            // and the three pages.
            Keep::Quest { score_mode: 0, mode: 0, top_k: 3, cap, .. } => assert_eq!(cap, 2 + 1 + 1 + 3),
            other => panic!("{other:?}"),
        }
        let threshold = Retrieval { budget: Budget::Threshold(0.5), ..quest };
        assert!(matches!(Keep::of(Some(&threshold), &shape(), 0).unwrap(), Keep::Quest { mode: 1, cap: 12, .. }));
        assert!(matches!(Keep::of(None, &shape(), 0).unwrap(), Keep::Dense));
        let top_p = Retrieval { budget: Budget::TopP(0.9), ..quest };
        assert!(matches!(Keep::of(Some(&top_p), &shape(), 0).unwrap(), Keep::Quest { mode: 2, cap: 12, .. }));
        let paris = Retrieval { score: Score::Quantized(4), ..quest };
        assert!(matches!(Keep::of(Some(&paris), &shape(), 4).unwrap(), Keep::Quest { score_mode: 1, group: 1, .. }));
        let shared = Retrieval { per: weft_dsl::Per::KvHead, ..quest.clone() };
        let group = shape().hq / shape().hkv;
        assert!(matches!(Keep::of(Some(&shared), &shape(), 0).unwrap(), Keep::Quest { group: g, .. } if g == group));
        for (r, bits, why) in [
            (Retrieval { unit: Unit::Page(32), ..quest }, 0, "the cache's pages (unit = page(16))"),
            (Retrieval { unit: Unit::Token, ..quest }, 0, "the cache's pages"),
            (Retrieval { score: Score::Centroid, ..quest }, 0, "min_max or quantized(bits)"),
            (paris.clone(), 0, "quantized to 4 bits (PagedOptions::key_bits; this one: 0)"),
            (paris, 8, "this one: 8"),
            (Retrieval { budget: Budget::TopP(1.5), ..quest }, 0, "top_p(0 < p <= 1)"),
            (Retrieval { budget: Budget::Threshold(0.0), ..quest }, 0, "threshold(t > 0)"),
        ] {
            let e = Keep::of(Some(&r), &shape(), bits).unwrap_err().to_string();
            assert!(e.contains(why), "{r:?}: {e}");
        }
    }
}
