//! One call per layer: every query head's pattern, the tuned kernel for it (or the default
//! config, with a warning), and one launch per kernel group.
//!
//! A layer's heads may use different patterns (a pattern search picks one per head). Heads
//! whose tuned configs agree share one kernel: their rows are gathered from each pattern's
//! index into one index ([`SparseIndex::gather_heads`], which merges the mask tables), and the
//! kernel's head map sends each index head to its query head. So the launch count is the
//! number of distinct configs, not the number of heads.
//!
//! Static patterns' indexes are built once per shape and kept on the device. Dynamic ones are
//! built on the GPU where a builder takes them (one pattern over every head of a single
//! sequence, bf16), else on the host from copies of Q and K.
//!
//! A packed batch of sequences of different lengths ([`Runtime::attention_layer_varlen`])
//! runs in the same launches: each sequence's index is built at its own length and the
//! kernels walk the concatenation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::CudaSlice;
use weft_cache::{ShapeBucket, Toolchain, TuneKey, TuneRecord};
use weft_codegen::plan::AnyPlan;
use weft_codegen::{emit, DType, KernelConfig, KernelSpec};
use weft_dsl::{Pattern, PatternExpr};
use weft_patterns::{build_index, BatchIndex, IndexOptions, SparseIndex, Tensor};

use crate::{driver, AttnShape, DeviceIndex, Error, LoadSource, Runtime};

/// The tuning-database key of (pattern, head, shape): the tuner stores under it, the runtime
/// looks up under it. `seq` is the key length; `gqa` the query heads per key head.
pub fn tune_key(
    toolchain: Toolchain,
    pattern: &Pattern,
    head: Option<u32>,
    seq: usize,
    head_dim: u32,
    dtype: DType,
    gqa: usize,
) -> TuneKey {
    TuneKey { toolchain, pattern_hash: pattern.hash().to_hex(), head, bucket: bucket(seq, head_dim, dtype, gqa) }
}

/// The tuning key of decode steps over a paged KV cache ([`crate::PagedKvCache`]) of `batch`
/// sequences of `keys` tokens: `pattern` is the step's retrieval pattern, or `full()` for a
/// dense step; the bucket holds the batch too.
#[allow(clippy::too_many_arguments)]
pub fn paged_tune_key(
    toolchain: Toolchain,
    pattern: &Pattern,
    batch: usize,
    keys: usize,
    head_dim: u32,
    dtype: DType,
    gqa: usize,
) -> TuneKey {
    let key = tune_key(toolchain, pattern, None, keys, head_dim, dtype, gqa);
    TuneKey { bucket: key.bucket.with_batch(batch), ..key }
}

/// The shape bucket of a problem, as [`tune_key`] files it.
fn bucket(seq: usize, head_dim: u32, dtype: DType, gqa: usize) -> ShapeBucket {
    // Causality is part of the pattern (and of its hash), so the bucket does not repeat it.
    ShapeBucket::new(seq, head_dim, dtype.name(), gqa as u32, false)
}

/// The pattern of every query head of one layer, with each pattern's hash computed once
/// (a serving loop calls [`Runtime::attention_layer`] with the same plan for every layer and
/// step; hashing is tens of microseconds a pattern).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    patterns: Vec<Pattern>,
    hashes: Vec<String>,
}

impl LayerPlan {
    /// One pattern per query head.
    pub fn new(patterns: Vec<Pattern>) -> LayerPlan {
        let hashes = patterns.iter().map(|p| p.hash().to_hex()).collect();
        LayerPlan { patterns, hashes }
    }

    /// The same pattern for all `heads`.
    pub fn uniform(pattern: Pattern, heads: usize) -> LayerPlan {
        let hash = pattern.hash().to_hex();
        LayerPlan { patterns: vec![pattern; heads], hashes: vec![hash; heads] }
    }

    /// Each query head's pattern.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Each query head's pattern hash (hex).
    pub fn hashes(&self) -> &[String] {
        &self.hashes
    }

    /// The patterns a search stored for `model`'s `layer` (`weft search --model`).
    pub fn from_search(db: &weft_cache::Db, model: &str, layer: u32) -> Result<LayerPlan, Error> {
        let usage = |m: String| Error::Usage(m);
        let results = db.search_results(model)?;
        let mut heads: BTreeMap<u32, Pattern> = BTreeMap::new();
        for (key, record) in results.into_iter().filter(|(k, _)| k.layer == layer) {
            let p: Pattern = serde_json::from_value(record.pattern).map_err(|e| {
                usage(format!("search result {model} layer {layer} head {}: {e}; re-run `weft search`", key.head))
            })?;
            heads.insert(key.head, p);
        }
        if heads.is_empty() {
            return Err(usage(format!("no search results for model {model:?} layer {layer}; run `weft search` first")));
        }
        let n = heads.len() as u32;
        if heads.keys().copied().ne(0..n) {
            return Err(usage(format!(
                "search results for {model:?} layer {layer} miss some heads: have {:?}",
                heads.keys()
            )));
        }
        Ok(LayerPlan::new(heads.into_values().collect()))
    }
}

/// What one launch of [`Runtime::attention_layer`] ran.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    pub kernel: String,
    pub config: KernelConfig,
    /// The query heads it served.
    pub heads: Vec<usize>,
    /// The distinct pattern names among them.
    pub patterns: Vec<String>,
    /// Whether the config came from a tuning record (else it is the default).
    pub tuned: bool,
    /// Where the kernel came from, and how long finding and loading it took (no NVRTC call
    /// when the source is the database).
    pub source: LoadSource,
    pub load_ms: f64,
    /// Host time spent on the group's index: building it on the host and uploading it, or
    /// (built on the GPU) queueing its build, which the host does not wait for (the attention
    /// follows it on the same stream).
    pub index_ms: f64,
    /// Whether the index was built on the GPU from Q and K on the device (a vertical-vector,
    /// block, vertical-slash or grid pattern over every head in bf16; see
    /// `Gpu::build_vv_index`, `Gpu::build_block_index` and `Gpu::build_vs_index`), with no host
    /// copy. False also when the GPU builder declined the inputs (a warning says why) and the
    /// host built the same index.
    pub index_on_gpu: bool,
}

/// Static indexes and device plans kept across calls (each cache is emptied when it reaches
/// this size).
const STATIC_INDEX_CACHE: usize = 64;

/// (pattern hash, head, shape bucket).
type ConfigCacheKey = (String, usize, ShapeBucket);

/// A static pattern's index for one shape, kept across calls.
type IndexCacheKey = (String, usize, usize, usize, usize, usize);

/// A device plan's key: the index key and the scale's bits.
type PlanCacheKey = (IndexCacheKey, u32);

/// A static group's key: its heads with their pattern hashes, the shape (query heads, key
/// heads, head dim, each sequence's query and key lengths) and the config.
type StaticGroupKey = (Vec<(usize, String)>, (usize, usize, usize, Vec<(usize, usize)>), KernelConfig);

/// A gathered index on the device, with the mask table and permutation its kernel is
/// generated with.
struct UploadedIndex {
    device: DeviceIndex,
    masks: Vec<weft_dsl::Pred>,
    permutation: Option<weft_dsl::Permutation>,
}

/// A map kept across calls that empties itself when it reaches [`STATIC_INDEX_CACHE`]
/// entries: serving many lengths must not grow host memory without end. A poisoned lock
/// reads as empty and stores nothing (the caller computes afresh).
struct BoundedCache<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for BoundedCache<K, V> {
    fn default() -> Self {
        BoundedCache(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> BoundedCache<K, V> {
    fn get(&self, key: &K) -> Option<V> {
        self.0.lock().ok().and_then(|m| m.get(key).cloned())
    }

    fn insert(&self, key: K, value: V) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= STATIC_INDEX_CACHE {
                m.clear();
            }
            m.insert(key, value);
        }
    }
}

/// State [`Runtime`] keeps between layer calls.
#[derive(Default)]
pub(crate) struct LayerCache {
    static_indexes: BoundedCache<IndexCacheKey, Arc<SparseIndex>>,
    /// Static plans of GPU-built indexes, by the same key and the scale's bits; `None`
    /// records a pattern the GPU cannot build at that shape.
    device_plans: BoundedCache<PlanCacheKey, Option<Arc<AnyPlan>>>,
    /// Device indexes of groups whose patterns are all static, by the group's heads, their
    /// pattern hashes, the shape and the config: uploaded once, so that a call of a static
    /// layer copies nothing from the host (and can be captured in a CUDA graph).
    static_device_indexes: BoundedCache<StaticGroupKey, Arc<UploadedIndex>>,
    /// Generated kernels by their group's pattern names and hashes, masks, permutation and
    /// config.
    kernels: BoundedCache<String, Arc<weft_codegen::Kernel>>,
    /// Whether a pattern (by hash) reads the head index.
    reads_head: BoundedCache<String, bool>,
    /// Each (pattern, head, bucket)'s config and whether it was tuned, read from the
    /// database once per process (a tune stored later by another process is seen after a
    /// restart).
    configs: Mutex<HashMap<ConfigCacheKey, (KernelConfig, bool)>>,
}

impl Runtime {
    /// The patterns a search stored for `model`'s `layer`, from this runtime's database.
    pub fn plan_from_search(&self, model: &str, layer: u32) -> Result<LayerPlan, Error> {
        let (db, _) = self.gpu.db.as_ref().ok_or_else(|| Error::Usage("no kernel database is attached".into()))?;
        LayerPlan::from_search(db, model, layer)
    }

    /// Attention of one layer on device buffers: Q `[hq, nq, d]`, K and V `[hkv, nk, d]`,
    /// O `[hq, nq, d]`, LSE `[hq, nq]` (natural log), all contiguous, in `dtype`.
    ///
    /// For each head, the config tuned for (pattern, head, shape bucket) is used, else the one
    /// tuned for the pattern at that bucket, else the default config with a warning (run
    /// `weft autotune` to tune it). Heads whose configs agree run in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_layer(
        &self,
        plan: &LayerPlan,
        shape: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        scale: Option<f32>,
    ) -> Result<Vec<LaunchReport>, Error> {
        self.layer(plan, shape, &[(shape.nq, shape.nk)], dtype, q, k, v, out, lse, scale)
    }

    /// [`Runtime::attention_layer`] over a packed batch of sequences (cu_seqlens style):
    /// sequence `b` has `seqs[b] = (nq, nk)` tokens, at consecutive token offsets in Q
    /// `[hq, sum nq, d]`, K and V `[hkv, sum nk, d]`, O like Q and LSE `[hq, sum nq]`. Each
    /// sequence's pattern is evaluated at its own lengths (a causal pattern aligns its last
    /// query with its last key); one launch per kernel group covers every sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_layer_varlen(
        &self,
        plan: &LayerPlan,
        heads: (usize, usize),
        head_dim: usize,
        seqs: &[(usize, usize)],
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        scale: Option<f32>,
    ) -> Result<Vec<LaunchReport>, Error> {
        let shape = varlen_shape(heads, head_dim, seqs)?;
        self.layer(plan, shape, seqs, dtype, q, k, v, out, lse, scale)
    }

    /// The layer over `seqs` (one or more sequences; `shape` holds their token totals).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer(
        &self,
        plan: &LayerPlan,
        shape: AttnShape,
        seqs: &[(usize, usize)],
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        lse: &mut CudaSlice<f32>,
        scale: Option<f32>,
    ) -> Result<Vec<LaunchReport>, Error> {
        if plan.patterns.len() != shape.hq {
            return Err(Error::Shape(format!(
                "the plan has {} patterns for {} query heads; give one per head",
                plan.patterns.len(),
                shape.hq
            )));
        }
        if shape.hkv == 0 || shape.hq % shape.hkv != 0 {
            return Err(Error::Shape(format!("{} query heads on {} key heads", shape.hq, shape.hkv)));
        }
        let head_dim = u32::try_from(shape.head_dim).map_err(|_| Error::Shape("head dim too large".into()))?;
        let scale = scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
        crate::check_scale(scale)?;
        for p in &plan.patterns {
            p.validate().map_err(|e| Error::Usage(format!("pattern {}: {e}", p.name)))?;
            if p.expr.contains_retrieval() {
                return Err(Error::Usage(format!(
                    "pattern {} is a decode-time retrieval pattern; use the decode path",
                    p.name
                )));
            }
        }

        // Each head's config, and the groups of heads that share one.
        let gqa = shape.hq / shape.hkv;
        // The problem of a group's heads alone, as a GPU index build sees it: every layer head
        // when the group has them all, else each head with its own copy of its key head.
        let sub_shape = |heads: &[usize]| {
            if heads.len() == shape.hq {
                shape
            } else {
                AttnShape { hq: heads.len(), hkv: heads.len(), ..shape }
            }
        };
        // A sequence's shape; the longest key length picks the tuned configs' bucket.
        let seq_shape = |&(nq, nk): &(usize, usize)| AttnShape { nq, nk, ..shape };
        let longest = seqs.iter().map(|s| s.1).max().unwrap_or(shape.nk);
        // Each head's pattern hash: the config memo, the grouping and the index cache are keyed
        // by it.
        let hashes = plan.hashes();
        let mut groups: BTreeMap<GroupKey, Vec<usize>> = BTreeMap::new();
        let on_gpu = self.gpu_index.load(std::sync::atomic::Ordering::Relaxed);
        let gpu_eligible = on_gpu && seqs.len() == 1 && dtype == DType::Bf16;
        let mut tuned_of = vec![false; shape.hq];
        let mut warned: Vec<String> = Vec::new();
        for (h, p) in plan.patterns.iter().enumerate() {
            let (config, tuned, first) = self.config_for(p, &hashes[h], h, longest, head_dim, dtype, gqa)?;
            // Once per process and (pattern, head, bucket): a serving loop calls this per layer.
            if !tuned && first && !warned.contains(&p.name) {
                tracing::warn!(
                    pattern = %p.name,
                    seq = longest,
                    head_dim,
                    dtype = dtype.name(),
                    "no tuned kernel stored for this pattern and shape on this GPU; using the default config \
                     {config} (run `weft autotune` to tune it)"
                );
                warned.push(p.name.clone());
            }
            tuned_of[h] = tuned;
            let exclusive =
                matches!(p.expr, PatternExpr::Permuted { .. } | PatternExpr::Ring { .. }).then(|| hashes[h].clone());
            // A dynamic pattern a GPU builder may take gets a launch of its own heads, so that
            // its index is built on the GPU (over just those heads) rather than on the host.
            let own = (exclusive.is_none() && gpu_eligible && !p.expr.is_static() && !self.reads_head(p, &hashes[h]))
                .then(|| hashes[h].clone());
            groups.entry(GroupKey { config, exclusive, own }).or_default().push(h);
        }

        // A group of one dynamic pattern over every head of one sequence can have its index
        // built on the GPU (vertical vectors, block top-k or vertical-slash, bf16); Q and K go
        // to the host only for the other dynamic groups.
        let device_plans: Vec<Option<Arc<AnyPlan>>> = groups
            .iter()
            .map(|(key, heads)| {
                let p = &plan.patterns[heads[0]];
                let one_pattern = heads.iter().all(|&h| hashes[h] == hashes[heads[0]]);
                if !gpu_eligible || !one_pattern || p.expr.is_static() || key.exclusive.is_some() {
                    return None;
                }
                self.device_plan(p, &hashes[heads[0]], &key.config, sub_shape(heads), scale)
            })
            .collect();
        let dynamic = groups
            .iter()
            .zip(&device_plans)
            .any(|((_, heads), dp)| dp.is_none() && heads.iter().any(|&h| !plan.patterns[h].expr.is_static()));
        let host_seqs = |host: (Tensor, Tensor)| -> Vec<(Tensor, Tensor)> {
            if seqs.len() == 1 {
                return vec![host];
            }
            let (mut q0, mut k0) = (0, 0);
            seqs.iter()
                .map(|&(nq, nk)| {
                    let part = (token_range(&host.0, q0, q0 + nq), token_range(&host.1, k0, k0 + nk));
                    (q0, k0) = (q0 + nq, k0 + nk);
                    part
                })
                .collect()
        };
        let mut host = if dynamic { Some(host_seqs(self.host_qk(shape, dtype, q, k)?)) } else { None };

        let mut reports = Vec::new();
        for ((key, heads), device_plan) in groups.into_iter().zip(device_plans) {
            let config = key.config;
            let started = Instant::now();
            // The group's index on the device, its mask table and permutation, where it was built
            // and how long that took (host builds: before the upload).
            let gpu_built = match device_plan.as_deref() {
                Some(dp) => {
                    let built = self.gpu.build_index_of_heads(dp, shape, &heads, dtype, q, k);
                    match built {
                        Ok((device_index, _)) => Some((device_index, dp.masks().to_vec())),
                        // The builder declined these inputs (e.g. more scratch than it takes):
                        // the host builds the same index, numbered the same way.
                        Err(Error::Usage(why)) => {
                            tracing::warn!(heads = ?heads, %why, "GPU index building declined; building on the host");
                            if host.is_none() {
                                host = Some(host_seqs(self.host_qk(shape, dtype, q, k)?));
                            }
                            None
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => None,
            };
            let all_static = heads.iter().all(|&h| plan.patterns[h].expr.is_static());
            let static_key: StaticGroupKey = (
                heads.iter().map(|&h| (h, hashes[h].clone())).collect(),
                (shape.hq, shape.hkv, shape.head_dim, seqs.to_vec()),
                config,
            );
            let cached = if all_static { self.layer.static_device_indexes.get(&static_key) } else { None };
            let (uploaded, index_on_gpu, index_ms) = match (gpu_built, cached) {
                (Some((device, masks)), _) => (
                    Arc::new(UploadedIndex { device, masks, permutation: None }),
                    true,
                    started.elapsed().as_secs_f64() * 1e3,
                ),
                (None, Some(uploaded)) => (uploaded, false, started.elapsed().as_secs_f64() * 1e3),
                (None, None) => {
                    // Each sequence's index of the group's heads, gathered from one index per
                    // distinct pattern over every head of the layer.
                    let mut parts_by_seq = Vec::with_capacity(seqs.len());
                    for (b, seq) in seqs.iter().enumerate() {
                        let sshape = seq_shape(seq);
                        let mut by_hash: HashMap<&str, Arc<SparseIndex>> = HashMap::new();
                        for &h in &heads {
                            if let std::collections::hash_map::Entry::Vacant(slot) = by_hash.entry(&hashes[h]) {
                                // bf16 indexes of GPU-buildable patterns are numbered as a GPU
                                // build numbers them, wherever they are built, so one tuned
                                // kernel (its key holds the mask table) serves both.
                                let p = &plan.patterns[h];
                                let planned = if dtype == DType::Bf16 && !p.expr.is_static() {
                                    self.device_plan(p, &hashes[h], &config, sshape, scale)
                                } else {
                                    None
                                };
                                let qk = host.as_ref().and_then(|v| v.get(b));
                                let ix = self.index_for(p, &hashes[h], &config, sshape, scale, qk, planned)?;
                                slot.insert(ix);
                            }
                        }
                        let parts: Vec<(&SparseIndex, usize)> =
                            heads.iter().map(|&h| (by_hash[hashes[h].as_str()].as_ref(), h)).collect();
                        parts_by_seq.push(SparseIndex::gather_heads(&parts)?);
                    }
                    let batch = BatchIndex::concat(&parts_by_seq)?;
                    let index_ms = started.elapsed().as_secs_f64() * 1e3;
                    let device = self.gpu.upload_batch_mapped(&batch, heads.clone())?;
                    let uploaded =
                        Arc::new(UploadedIndex { device, masks: batch.masks, permutation: batch.permutation });
                    if all_static {
                        self.layer.static_device_indexes.insert(static_key, uploaded.clone());
                    }
                    (uploaded, false, index_ms)
                }
            };
            let (device_index, masks) = (&uploaded.device, &uploaded.masks);
            let permutation = uploaded.permutation;

            let mut names: Vec<String> = heads.iter().map(|&h| plan.patterns[h].name.clone()).collect();
            names.sort();
            names.dedup();
            // Generating a kernel's source takes about a millisecond: each (patterns, masks,
            // permutation, config) is generated once and kept.
            let mut group_hashes: Vec<&str> = heads.iter().map(|&h| hashes[h].as_str()).collect();
            group_hashes.sort_unstable();
            group_hashes.dedup();
            let kernel_key = format!("{names:?} {group_hashes:?} {masks:?} {permutation:?} {config:?}");
            let kernel = match self.layer.kernels.get(&kernel_key) {
                Some(k) => k,
                None => {
                    let label = if names.len() == 1 {
                        plan.patterns[heads[0]].clone()
                    } else {
                        group_label(&names, heads.iter().map(|&h| &plan.patterns[h]))
                    };
                    let k = Arc::new(emit(&KernelSpec { pattern: &label, masks, permutation, config })?);
                    self.layer.kernels.insert(kernel_key, k.clone());
                    k
                }
            };
            let loading = Instant::now();
            let (_, source) = self.gpu.load_traced(&kernel)?;
            let load_ms = loading.elapsed().as_secs_f64() * 1e3;
            let tuned = heads.iter().all(|&h| tuned_of[h]);
            if source == LoadSource::Compiled && tuned && !index_on_gpu {
                // Tuned, yet not stored under this key: the group's predicates depend on the
                // input (e.g. a grid phase chosen per head), which makes a kernel per input.
                tracing::warn!(
                    kernel = %kernel.name,
                    ms = load_ms,
                    "a tuned pattern's kernel was compiled at run time: its predicates depend on the input"
                );
            }
            self.gpu.attention(&kernel, &config, device_index, shape, q, k, v, out, lse, scale)?;
            tracing::debug!(kernel = %kernel.name, heads = ?heads, ?source, index_ms, index_on_gpu, "layer group launched");
            reports.push(LaunchReport {
                kernel: kernel.name.clone(),
                config,
                tuned,
                heads,
                patterns: names,
                source,
                load_ms,
                index_ms,
                index_on_gpu,
            });
        }
        Ok(reports)
    }

    /// The decode split count tuned for a retrieval pattern at this cache length (`weft
    /// autotune` on a retrieval pattern stores it), or 0, which [`crate::Gpu::decode`] reads as
    /// "choose automatically".
    pub fn decode_splits(&self, pattern: &Pattern, keys: usize, head_dim: u32, dtype: DType, gqa: usize) -> usize {
        self.tuning_record(pattern, None, keys, head_dim, dtype, gqa)
            .and_then(|r| r.best.get("splits").and_then(|s| s.as_u64()))
            .map_or(0, |s| s as usize)
    }

    /// The split count tuned for decode steps over `cache` with `retrieval` (`None`: dense)
    /// at its current longest sequence (`weft autotune` on a paged retrieval pattern, or on
    /// `full()` with `--batch`, stores it), or 0: [`crate::PagedKvCache::decode_step`]'s
    /// automatic choice. The answer is kept in the cache for its retrieval and length bucket,
    /// so that a decode loop hashes the pattern and reads the database once a bucket, not
    /// every step.
    pub fn paged_splits(&self, cache: &mut crate::PagedKvCache, retrieval: Option<&weft_dsl::Retrieval>) -> usize {
        let Some((db, toolchain)) = self.gpu.db.as_ref() else { return 0 };
        let keys = cache.lens().iter().copied().max().unwrap_or(0);
        let seq = weft_cache::ShapeBucket::seq_bucket(keys);
        if let Some(t) = cache.tuned.as_ref().filter(|t| t.seq == seq && t.retrieval.as_ref() == retrieval) {
            return t.splits;
        }
        let s = cache.shape();
        let pattern = match retrieval {
            Some(r) => Pattern::new("paged", weft_dsl::PatternExpr::Retrieval(r.clone())),
            None => Pattern::new("paged", weft_dsl::builder::full()),
        };
        let key = paged_tune_key(toolchain.clone(), &pattern, s.batch, keys, s.head_dim as u32, s.dtype, s.hq / s.hkv);
        let splits = match db.tuning(&key) {
            Ok(r) => r.and_then(|r| r.best.get("splits").and_then(|s| s.as_u64())).map_or(0, |s| s as usize),
            Err(e) => {
                tracing::warn!(error = %e, "tuning record ignored");
                0
            }
        };
        cache.tuned = Some(crate::paged::TunedSplits { retrieval: retrieval.cloned(), seq, splits });
        splits
    }

    /// The tuning record stored for (pattern, head, bucket) under this GPU's toolchain (read
    /// when the database was attached: no driver or NVRTC query here); an unreadable one is
    /// reported and skipped.
    fn tuning_record(
        &self,
        pattern: &Pattern,
        head: Option<u32>,
        seq: usize,
        head_dim: u32,
        dtype: DType,
        gqa: usize,
    ) -> Option<TuneRecord> {
        let (db, toolchain) = self.gpu.db.as_ref()?;
        match db.tuning(&tune_key(toolchain.clone(), pattern, head, seq, head_dim, dtype, gqa)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(pattern = %pattern.name, error = %e, "tuning record ignored");
                None
            }
        }
    }

    /// The tuned config for (pattern, head) at this shape, else the pattern's, else the
    /// default; whether it was tuned; and whether this is the first lookup in this process
    /// (the database is read once per process).
    #[allow(clippy::too_many_arguments)]
    fn config_for(
        &self,
        pattern: &Pattern,
        hash: &str,
        head: usize,
        seq: usize,
        head_dim: u32,
        dtype: DType,
        gqa: usize,
    ) -> Result<(KernelConfig, bool, bool), Error> {
        let memo = (hash.to_string(), head, bucket(seq, head_dim, dtype, gqa));
        if let Some((c, tuned)) = self.layer.configs.lock().ok().and_then(|m| m.get(&memo).copied()) {
            return Ok((c, tuned, false));
        }
        let tuned = [Some(head as u32), None].into_iter().find_map(|h| {
            let record = self.tuning_record(pattern, h, seq, head_dim, dtype, gqa)?;
            serde_json::from_value::<KernelConfig>(record.best)
                .ok()
                .filter(|c| c.head_dim == head_dim && c.dtype == dtype && c.validate_for(&pattern.expr).is_ok())
        });
        let found = match tuned {
            Some(c) => (c, true),
            None => (KernelConfig::default_for_arch(&pattern.expr, head_dim, dtype, self.gpu.arch.sm)?, false),
        };
        if let Ok(mut m) = self.layer.configs.lock() {
            m.insert(memo, found);
        }
        Ok((found.0, found.1, true))
    }

    /// The pattern's index over all of the layer's heads with the config's block sizes (through
    /// `planned` when given, for its mask numbering).
    #[allow(clippy::too_many_arguments)]
    fn index_for(
        &self,
        pattern: &Pattern,
        hash: &str,
        config: &KernelConfig,
        shape: AttnShape,
        scale: f32,
        host: Option<&(Tensor, Tensor)>,
        planned: Option<Arc<AnyPlan>>,
    ) -> Result<Arc<SparseIndex>, Error> {
        let opts = index_options(config, scale);
        let pattern_err = |e: weft_patterns::Error| Error::Usage(format!("pattern {}: {e}", pattern.name));
        let build = |q: &Tensor, k: &Tensor| build_index(&pattern.expr, q, k, &opts).map_err(pattern_err);
        if !pattern.expr.is_static() {
            let (q, k) = host.ok_or_else(|| Error::Usage("internal: Q and K were not copied back".into()))?;
            return Ok(Arc::new(match planned {
                Some(p) => p.index_on_cpu(&pattern.expr, q, k).map_err(pattern_err)?,
                None => build(q, k)?,
            }));
        }
        let key =
            (hash.to_string(), shape.hq, shape.nq, shape.nk, opts.block_m.unwrap_or(0), opts.block_n.unwrap_or(0));
        if let Some(ix) = self.layer.static_indexes.get(&key) {
            return Ok(ix);
        }
        // A static pattern reads only positions and shapes: one-wide placeholder inputs suffice.
        let ix = Arc::new(build(&Tensor::zeros(shape.hq, shape.nq, 1), &Tensor::zeros(shape.hkv, shape.nk, 1))?);
        self.layer.static_indexes.insert(key, ix.clone());
        Ok(ix)
    }

    /// The static plan for building `pattern`'s index on the GPU at this shape and config
    /// (cached), or `None` when the GPU builders do not take the pattern. Host builds of bf16
    /// layers use it too, for the plan's mask numbering.
    fn device_plan(
        &self,
        pattern: &Pattern,
        hash: &str,
        config: &KernelConfig,
        shape: AttnShape,
        scale: f32,
    ) -> Option<Arc<AnyPlan>> {
        // Plans hold the scale their CPU choice uses: it is part of the key.
        let key = (
            (hash.to_string(), shape.hq, shape.nq, shape.nk, config.block_m as usize, config.block_n as usize),
            scale.to_bits(),
        );
        if let Some(p) = self.layer.device_plans.get(&key) {
            return p;
        }
        let opts = index_options(config, scale);
        let (hq, nq, nk) = (shape.hq, shape.nq, shape.nk);
        // Each builder's plan refuses what it does not take; the first that takes it builds.
        let plan = AnyPlan::new(&pattern.expr, hq, nq, nk, &opts)
            .map(Arc::new)
            .map_err(|e| tracing::debug!(pattern = %pattern.name, error = %e, "index built on the host"))
            .ok();
        self.layer.device_plans.insert(key, plan.clone());
        plan
    }

    /// Whether `pattern` reads the head index (`h`): its index cannot be built over a subset
    /// of the heads renumbered from 0.
    fn reads_head(&self, pattern: &Pattern, hash: &str) -> bool {
        if let Some(r) = self.layer.reads_head.get(&hash.to_string()) {
            return r;
        }
        let r = serde_json::to_string(&pattern.expr).map_or(true, |j| j.contains("\"var\":\"h\""));
        self.layer.reads_head.insert(hash.to_string(), r);
        r
    }

    /// Q and K copied to the host as f32, for the CPU index builders.
    fn host_qk(
        &self,
        s: AttnShape,
        dtype: DType,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
    ) -> Result<(Tensor, Tensor), Error> {
        let d = s.head_dim;
        if q.len() != s.hq * s.nq * d || k.len() != s.hkv * s.nk * d {
            return Err(Error::Shape(format!(
                "`q` holds {} and `k` {} elements; the shape {s:?} needs other sizes",
                q.len(),
                k.len()
            )));
        }
        let what = "copying Q and K to the host for index building";
        crate::refuse_in_capture(&self.gpu.stream, what)?;
        let qh = self.gpu.stream.clone_dtoh(q).map_err(driver(what))?;
        let kh = self.gpu.stream.clone_dtoh(k).map_err(driver(what))?;
        let tensor = |heads, n, words: &[u16]| Tensor::new(heads, n, d, dtype.decode(words)).map_err(Error::from);
        Ok((tensor(s.hq, s.nq, &qh)?, tensor(s.hkv, s.nk, &kh)?))
    }
}

/// Index options for a kernel config's blocks and a scale.
fn index_options(config: &KernelConfig, scale: f32) -> IndexOptions {
    IndexOptions {
        block_m: Some(config.block_m as usize),
        block_n: Some(config.block_n as usize),
        scale: Some(f64::from(scale)),
        ..Default::default()
    }
}

/// Heads with equal keys share a launch: the same config (every field: heads whose configs
/// differ only in stages or schedule launch apart) and, for permuted or ring patterns (whose
/// index layout is their own), the same pattern. Ordered for a deterministic launch order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    config: KernelConfig,
    exclusive: Option<String>,
    /// A dynamic pattern whose heads launch on their own (its index built on the GPU).
    own: Option<String>,
}

/// The pattern a multi-pattern group's kernel is labelled with (its header and key): the
/// union of the group's patterns.
fn group_label<'a>(names: &[String], patterns: impl Iterator<Item = &'a Pattern>) -> Pattern {
    let mut exprs: Vec<PatternExpr> = Vec::new();
    for p in patterns {
        if !exprs.contains(&p.expr) {
            exprs.push(p.expr.clone());
        }
    }
    Pattern::new(format!("group({})", names.join(", ")), PatternExpr::Union(exprs))
}

/// The shape of a packed batch: its heads and head dim, and its sequences' token totals.
/// Refuses an empty batch, an empty sequence and totals that overflow.
pub(crate) fn varlen_shape(
    heads: (usize, usize),
    head_dim: usize,
    seqs: &[(usize, usize)],
) -> Result<AttnShape, Error> {
    if seqs.is_empty() {
        return Err(Error::Shape("a packed batch needs at least one sequence".into()));
    }
    if let Some(b) = seqs.iter().position(|&(nq, nk)| nq == 0 || nk == 0) {
        return Err(Error::Shape(format!("sequence {b} is empty ({:?} query and key tokens)", seqs[b])));
    }
    let total = |f: fn(&(usize, usize)) -> usize| {
        seqs.iter()
            .map(f)
            .try_fold(0usize, |a, n| a.checked_add(n))
            .ok_or_else(|| Error::Shape("too many tokens".into()))
    };
    Ok(AttnShape { hq: heads.0, hkv: heads.1, nq: total(|s| s.0)?, nk: total(|s| s.1)?, head_dim })
}

/// Tokens `lo..hi` of every head of `t` (`[heads, tokens, dim]`).
fn token_range(t: &Tensor, lo: usize, hi: usize) -> Tensor {
    let (n, d) = (t.tokens, t.dim);
    let mut data = Vec::with_capacity(t.heads * (hi - lo) * d);
    for h in 0..t.heads {
        data.extend_from_slice(&t.data[(h * n + lo) * d..(h * n + hi) * d]);
    }
    Tensor { heads: t.heads, tokens: hi - lo, dim: d, data }
}
