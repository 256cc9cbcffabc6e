//! `weft._weft`: the Rust side of weft's Python package.
//!
//! CPU functions take NumPy arrays `[heads, tokens, head_dim]` (float32) and give the same
//! answers as the `weft` command, through the same library functions. The GPU runtime takes
//! device addresses and a stream from PyTorch (see `weft/torch.py`): it never allocates the
//! tensors it reads or writes, and never waits for the device.
//!
//! Everything that can fail returns a Python exception; the GIL is released around work that
//! takes long (index building, reference attention, search, kernel launches).

use std::sync::{Arc, Mutex};

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use weft::analysis::{AnalysisOptions, UniverseChoice};
use weft::dsl::Pattern;
use weft::patterns::{IndexOptions, SparseIndex, Tensor};
use weft::runtime::{AttnShape, ExternalTensors, LayerPlan, PagedKvCache, PagedShape, Runtime};

pyo3::create_exception!(
    _weft,
    WeftError,
    PyRuntimeError,
    "The GPU, its driver, NVRTC or the kernel database failed (bad arguments raise ValueError)."
);

/// The largest dense mask `mask()` returns (elements): 256 Mi booleans.
const MAX_DENSE_MASK: usize = 1 << 28;

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn lib_error(e: weft::Error) -> PyErr {
    match e {
        weft::Error::Qk(weft::qk::QkError::Io { .. }) | weft::Error::Pattern(weft::dsl::Error::Io { .. }) => {
            PyOSError::new_err(e.to_string())
        }
        e => value_error(e),
    }
}

fn runtime_error(e: weft::runtime::Error) -> PyErr {
    use weft::runtime::Error as E;
    match e {
        E::Shape(_) | E::Usage(_) | E::Codegen(_) | E::Index(_) => value_error(e),
        E::MissingLibrary { .. } | E::Driver { .. } | E::Nvrtc { .. } | E::Cache(_) => {
            WeftError::new_err(e.to_string())
        }
    }
}

/// An attention pattern: parsed from DSL text, a built-in name or a pattern file (.toml or
/// .json), validated, with its content hash.
#[pyclass(module = "weft._weft", name = "Pattern", frozen, eq, hash)]
#[derive(Clone)]
struct PyPattern {
    inner: Pattern,
    hash: String,
}

impl PartialEq for PyPattern {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.inner.name == other.inner.name
    }
}

impl std::hash::Hash for PyPattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
    }
}

impl PyPattern {
    fn from_pattern(inner: Pattern) -> PyResult<Self> {
        inner.validate().map_err(value_error)?;
        let hash = inner.hash().to_hex();
        Ok(PyPattern { inner, hash })
    }
}

#[pymethods]
impl PyPattern {
    /// `Pattern("causal & window(1024)")`, `Pattern("vertical-slash")` (built-in), or a file
    /// path; `name` names it (default: the file's or built-in's name, "pattern" for text).
    #[new]
    #[pyo3(signature = (spec, name = None))]
    fn new(spec: &str, name: Option<String>) -> PyResult<Self> {
        let mut p = weft::analysis::load_pattern(spec, "pattern").map_err(lib_error)?;
        if let Some(n) = name {
            p.name = n;
        }
        PyPattern::from_pattern(p)
    }

    /// A pattern from its JSON form (`Pattern.json`, or a search result's `pattern`).
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let p: Pattern = serde_json::from_str(text).map_err(|e| value_error(format!("not a pattern's JSON: {e}")))?;
        PyPattern::from_pattern(p)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// The DSL text.
    #[getter]
    fn text(&self) -> String {
        self.inner.to_string()
    }

    /// The canonical form's DSL text (what the hash is computed over).
    #[getter]
    fn canonical(&self) -> String {
        self.inner.canonical().to_string()
    }

    /// The content hash (hex), as `weft explain` and the kernel database show it.
    #[getter]
    fn hash(&self) -> &str {
        &self.hash
    }

    /// The pattern (name and IR) as JSON.
    #[getter]
    fn json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner).map_err(value_error)
    }

    /// The IR alone as JSON.
    #[getter]
    fn ir(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.expr).map_err(value_error)
    }

    /// Whether the pattern reads only positions (no Q/K-dependent choice).
    #[getter]
    fn is_static(&self) -> bool {
        self.inner.expr.is_static()
    }

    /// Whether it is a decode-time retrieval pattern.
    #[getter]
    fn is_retrieval(&self) -> bool {
        self.inner.expr.contains_retrieval()
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self) -> String {
        format!("Pattern({:?}, name={:?})", self.inner.to_string(), self.inner.name)
    }
}

/// A `[heads, tokens, dim]` float32 array as a tensor (copied; any memory layout).
fn tensor(name: &str, a: &PyReadonlyArray3<'_, f32>) -> PyResult<Tensor> {
    let [h, n, d] = [a.shape()[0], a.shape()[1], a.shape()[2]];
    let data: Vec<f32> = a.as_array().iter().copied().collect();
    let t = Tensor::new(h, n, d, data).map_err(|e| value_error(format!("`{name}`: {e}")))?;
    t.check_finite(name).map_err(value_error)?;
    Ok(t)
}

fn universe(name: &str) -> PyResult<UniverseChoice> {
    match name {
        "auto" => Ok(UniverseChoice::Auto),
        "all" => Ok(UniverseChoice::All),
        "causal" => Ok(UniverseChoice::Causal),
        other => Err(value_error(format!("universe must be \"auto\", \"all\" or \"causal\", got {other:?}"))),
    }
}

/// `weft explain --json` on given Q and K: the document, as JSON text.
#[pyfunction]
#[pyo3(signature = (pattern, q, k, block_m = None, block_n = None, universe = "auto", recall_rows = 256))]
#[allow(clippy::too_many_arguments)]
fn explain_json(
    py: Python<'_>,
    pattern: &PyPattern,
    q: PyReadonlyArray3<'_, f32>,
    k: PyReadonlyArray3<'_, f32>,
    block_m: Option<usize>,
    block_n: Option<usize>,
    universe: &str,
    recall_rows: usize,
) -> PyResult<String> {
    let (q, k) = (tensor("q", &q)?, tensor("k", &k)?);
    let opts = AnalysisOptions { block_m, block_n, universe: self::universe(universe)?, recall_rows };
    let description =
        format!("NumPy arrays: q [{}, {}, {}], k [{}, {}, {}]", q.heads, q.tokens, q.dim, k.heads, k.tokens, k.dim);
    let p = &pattern.inner;
    let report = py.detach(|| weft::analysis::analyse(p, &q, &k, &opts)).map_err(lib_error)?;
    serde_json::to_string(&report.to_json(p, &description)).map_err(value_error)
}

/// A pattern's sparse index over given Q and K: CSR lists of key blocks and key columns per
/// (head, query block), the format the kernels read.
#[pyclass(module = "weft._weft", name = "SparseIndex", frozen)]
struct PyIndex {
    inner: Arc<SparseIndex>,
}

fn index_options(block_m: Option<usize>, block_n: Option<usize>, scale: Option<f64>) -> IndexOptions {
    IndexOptions { block_m, block_n, scale, ..Default::default() }
}

#[pyfunction]
#[pyo3(signature = (pattern, q, k, block_m = None, block_n = None, scale = None))]
fn sparse_index(
    py: Python<'_>,
    pattern: &PyPattern,
    q: PyReadonlyArray3<'_, f32>,
    k: PyReadonlyArray3<'_, f32>,
    block_m: Option<usize>,
    block_n: Option<usize>,
    scale: Option<f64>,
) -> PyResult<PyIndex> {
    let (q, k) = (tensor("q", &q)?, tensor("k", &k)?);
    let opts = index_options(block_m, block_n, scale);
    let expr = &pattern.inner.expr;
    let ix = py.detach(|| weft::patterns::build_index(expr, &q, &k, &opts)).map_err(value_error)?;
    Ok(PyIndex { inner: Arc::new(ix) })
}

fn u32_array<'py>(py: Python<'py>, v: &[u32]) -> Bound<'py, PyArray1<u32>> {
    v.to_vec().into_pyarray(py)
}

fn u16_array<'py>(py: Python<'py>, v: &[u16]) -> Bound<'py, PyArray1<u16>> {
    v.to_vec().into_pyarray(py)
}

#[pymethods]
impl PyIndex {
    #[getter]
    fn heads(&self) -> usize {
        self.inner.heads
    }
    #[getter]
    fn nq(&self) -> usize {
        self.inner.nq
    }
    #[getter]
    fn nk(&self) -> usize {
        self.inner.nk
    }
    #[getter]
    fn block_m(&self) -> usize {
        self.inner.block_m
    }
    #[getter]
    fn block_n(&self) -> usize {
        self.inner.block_n
    }
    /// Kept pairs over all `nq x nk` pairs of every head.
    #[getter]
    fn density(&self) -> f64 {
        self.inner.density()
    }
    /// Kept pairs per head.
    #[getter]
    fn pairs(&self) -> Vec<u64> {
        (0..self.inner.heads).map(|h| self.inner.head_pairs(h)).collect()
    }
    /// The residual predicates of partial entries (`block_mask` / `col_mask` index them;
    /// 65535 marks an entry that needs none).
    #[getter]
    fn masks(&self) -> Vec<String> {
        self.inner.masks.iter().map(|m| m.to_string()).collect()
    }
    #[getter]
    fn block_ptr<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        u32_array(py, &self.inner.block_ptr)
    }
    #[getter]
    fn block_idx<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        u32_array(py, &self.inner.block_idx)
    }
    #[getter]
    fn block_mask<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u16>> {
        u16_array(py, &self.inner.block_mask)
    }
    #[getter]
    fn col_ptr<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        u32_array(py, &self.inner.col_ptr)
    }
    #[getter]
    fn col_idx<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        u32_array(py, &self.inner.col_idx)
    }
    #[getter]
    fn col_mask<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u16>> {
        u16_array(py, &self.inner.col_mask)
    }

    /// Head `head` as a dense boolean `[nq, nk]` mask in token order (`weft mask --npy`).
    fn dense_mask<'py>(&self, py: Python<'py>, head: usize) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let ix = &self.inner;
        if head >= ix.heads {
            return Err(value_error(format!("head {head} is out of range: the index has {} heads", ix.heads)));
        }
        if ix.nq.saturating_mul(ix.nk) > MAX_DENSE_MASK {
            return Err(value_error(format!(
                "a dense {} x {} mask is over {MAX_DENSE_MASK} elements; read the CSR lists instead",
                ix.nq, ix.nk
            )));
        }
        let m = py.detach(|| weft::viz::dense_mask(ix, head));
        m.into_pyarray(py).reshape([ix.nq, ix.nk])
    }

    fn __repr__(&self) -> String {
        let ix = &self.inner;
        format!(
            "SparseIndex(heads={}, nq={}, nk={}, block_m={}, block_n={}, density={:.4})",
            ix.heads,
            ix.nq,
            ix.nk,
            ix.block_m,
            ix.block_n,
            ix.density()
        )
    }
}

/// Reference attention (f64 accumulation) over the pairs `pattern` keeps: the output
/// `[hq, nq, dv]` (float32) and the natural-log log-sum-exp `[hq, nq]` (float64; -inf where a
/// row keeps no key).
#[pyfunction]
#[pyo3(signature = (pattern, q, k, v, scale = None, block_m = None, block_n = None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn reference_attention<'py>(
    py: Python<'py>,
    pattern: &PyPattern,
    q: PyReadonlyArray3<'_, f32>,
    k: PyReadonlyArray3<'_, f32>,
    v: PyReadonlyArray3<'_, f32>,
    scale: Option<f64>,
    block_m: Option<usize>,
    block_n: Option<usize>,
) -> PyResult<(Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<f64>>)> {
    let (q, k, v) = (tensor("q", &q)?, tensor("k", &k)?, tensor("v", &v)?);
    let scale = scale.unwrap_or(1.0 / (q.dim as f64).sqrt());
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(value_error(format!("the scale must be positive and finite, got {scale}")));
    }
    let opts = index_options(block_m, block_n, Some(scale));
    let expr = &pattern.inner.expr;
    let att = py
        .detach(|| {
            let ix = weft::patterns::build_index(expr, &q, &k, &opts)?;
            weft::patterns::reference::attention(&ix, &q, &k, &v, scale)
        })
        .map_err(value_error)?;
    let (h, n, d) = (att.out.heads, att.out.tokens, att.out.dim);
    let out = att.out.data.into_pyarray(py).reshape([h, n, d])?;
    let lse = att.lse.into_pyarray(py).reshape([h, n])?;
    Ok((out, lse))
}

/// Every family with its parameters: `[(name, summary, [(param, default, accepted)])]`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn families() -> Vec<(String, String, Vec<(String, String, String)>)> {
    weft::catalog::families()
        .into_iter()
        .map(|f| {
            let params = f.params.into_iter().map(|p| (p.name.into(), p.default, p.accepted.into())).collect();
            (f.name.into(), f.summary.into(), params)
        })
        .collect()
}

/// The built-in patterns: `[(name, DSL text)]`.
#[pyfunction]
fn builtins() -> Vec<(String, String)> {
    weft::catalog::builtins().into_iter().map(|(n, e)| (n.to_string(), e.to_string())).collect()
}

/// `weft search` over a Q/K safetensors file: a JSON list of choices (layer, head, family,
/// pattern, density, recall) and a summary. `progress(done, total)` is called as candidate
/// indexes are built (from worker threads, holding the GIL for the call).
#[pyfunction]
#[pyo3(signature = (path, target_recall = 0.95, budget = None, causal = true, cpu = false, progress = None))]
fn search_json(
    py: Python<'_>,
    path: std::path::PathBuf,
    target_recall: f64,
    budget: Option<f64>,
    causal: bool,
    cpu: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, usize, usize, usize, String)> {
    let opts = weft::search::SearchOptions { target_recall, budget, causal, cpu };
    let report = |p: weft::search::Progress| {
        if let Some(f) = &progress {
            Python::attach(|py| {
                if let Err(e) = f.call1(py, (p.done, p.total)) {
                    e.write_unraisable(py, None);
                }
            });
        }
    };
    let outcome = py.detach(|| weft::search::run(&path, &opts, &report)).map_err(lib_error)?;
    let json = serde_json::to_string(&outcome.choices).map_err(value_error)?;
    Ok((json, outcome.layers, outcome.candidates, outcome.rows_per_head, outcome.backend))
}

/// The choices `weft search --model MODEL` stored in the kernel database `db` (default:
/// `$WEFT_DB`, else the per-user cache directory), as the JSON list `search_json` returns.
#[pyfunction]
#[pyo3(signature = (model, db = None))]
fn search_results_json(py: Python<'_>, model: String, db: Option<std::path::PathBuf>) -> PyResult<String> {
    let results = py
        .detach(|| -> Result<_, weft::cache::Error> {
            let path = match db {
                Some(p) => p,
                None => weft::cache::default_path()?,
            };
            let records = weft::cache::Db::open(&path)?.search_results(&model)?;
            Ok((path, records))
        })
        .map_err(value_error)?;
    let (path, records) = results;
    if records.is_empty() {
        return Err(value_error(format!(
            "the kernel database {} holds no search results for model `{model}`: run `weft search --qk FILE --model {model}` \
             (see `weft cache ls` for the models it holds)",
            path.display()
        )));
    }
    let choices: Vec<serde_json::Value> = records
        .into_iter()
        .map(|(k, r)| {
            serde_json::json!({
                "layer": k.layer, "head": k.head, "family": r.family, "pattern": r.pattern,
                "density": r.density, "recall": r.recall, "recall_se": r.recall_se,
            })
        })
        .collect();
    serde_json::to_string(&choices).map_err(value_error)
}

/// The patterns of one layer's query heads, built once and reused for every call.
#[pyclass(module = "weft._weft", name = "LayerPlan", frozen)]
struct PyPlan {
    inner: LayerPlan,
    /// The patterns' hashes and names, joined: equal keys, equal plans.
    key: String,
}

#[pymethods]
impl PyPlan {
    #[new]
    fn new(patterns: Vec<Bound<'_, PyPattern>>) -> PyResult<Self> {
        let patterns: Vec<&PyPattern> = patterns.iter().map(|p| p.get()).collect();
        if patterns.is_empty() {
            return Err(value_error("a plan needs one pattern per query head, got none"));
        }
        if let Some(p) = patterns.iter().find(|p| p.inner.expr.contains_retrieval()) {
            return Err(value_error(format!(
                "pattern {} is a decode-time retrieval pattern; a prefill plan takes attention patterns",
                p.inner.name
            )));
        }
        let key = patterns.iter().map(|p| format!("{}:{}", p.hash, p.inner.name)).collect::<Vec<_>>().join(",");
        Ok(PyPlan { inner: LayerPlan::new(patterns.into_iter().map(|p| p.inner.clone()).collect()), key })
    }

    #[getter]
    fn heads(&self) -> usize {
        self.inner.patterns().len()
    }

    /// Equal for plans of equal patterns, head by head.
    #[getter]
    fn key(&self) -> &str {
        &self.key
    }

    #[getter]
    fn patterns(&self) -> PyResult<Vec<PyPattern>> {
        self.inner.patterns().iter().cloned().map(PyPattern::from_pattern).collect()
    }
}

/// One GPU in this process's primary context with the kernel database: launches on device
/// memory owned by PyTorch, on PyTorch's stream.
#[pyclass(module = "weft._weft", name = "Runtime", frozen)]
struct PyRuntime {
    inner: Mutex<Runtime>,
    device: usize,
}

#[pymethods]
impl PyRuntime {
    /// Opens GPU `device` and the kernel database `db` (default: `$WEFT_DB`, else the per-user
    /// cache directory).
    #[new]
    #[pyo3(signature = (device = 0, db = None))]
    fn new(py: Python<'_>, device: usize, db: Option<std::path::PathBuf>) -> PyResult<Self> {
        let rt = py.detach(|| Runtime::open_external(device, db.as_deref())).map_err(runtime_error)?;
        Ok(PyRuntime { inner: Mutex::new(rt), device })
    }

    #[getter]
    fn device(&self) -> usize {
        self.device
    }

    /// The GPU's name and compute capability, e.g. ("NVIDIA H100", 90).
    #[getter]
    fn gpu(&self) -> PyResult<(String, u32)> {
        let rt = self.inner.lock().map_err(|_| WeftError::new_err("the runtime's lock is poisoned"))?;
        Ok((rt.gpu.name.clone(), rt.gpu.arch.sm))
    }

    /// Queues one layer's attention on `stream`: Q `[hq, nq, d]`, K and V `[hkv, nk, d]`, O like
    /// Q (16-bit `dtype`: "bf16" or "fp16") and LSE `[hq, nq]` (f32), contiguous, at the
    /// given device addresses. With `report`, returns what each launch ran.
    ///
    /// The caller (weft.torch) guarantees that the addresses are live CUDA memory of this
    /// device with those shapes; nothing here checks memory it cannot see.
    ///
    /// `batch` > 1: that many such problems back to back in each tensor (`[batch, hq, nq, d]`
    /// and so on), one launch each.
    #[pyo3(signature = (plan, shape, dtype, q, k, v, out, lse, stream, scale = None, report = false, repeat = 1, batch = 1))]
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        py: Python<'_>,
        plan: &PyPlan,
        shape: (usize, usize, usize, usize, usize),
        dtype: &str,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        stream: u64,
        scale: Option<f32>,
        report: bool,
        repeat: usize,
        batch: usize,
    ) -> PyResult<Option<Vec<Py<PyDict>>>> {
        let dtype = parse_dtype(dtype)?;
        let (hq, hkv, nq, nk, head_dim) = shape;
        let shape = AttnShape { hq, hkv, nq, nk, head_dim };
        if [q, k, v, out, lse].contains(&0) {
            return Err(value_error("a tensor's device address is 0"));
        }
        // Byte steps from one batch element to the next (16-bit Q, K, V, O; f32 LSE).
        let (q_step, kv_step, lse_step) = (hq * nq * head_dim * 2, hkv * nk * head_dim * 2, hq * nq * 4);
        let overflow = || value_error("the tensors' sizes overflow a device address");
        let mut calls = Vec::with_capacity(batch);
        for i in 0..batch {
            let at = |base: u64, step: usize| {
                i.checked_mul(step).and_then(|o| base.checked_add(o as u64)).ok_or_else(overflow)
            };
            calls.push(ExternalTensors {
                q: at(q, q_step)?,
                k: at(k, kv_step)?,
                v: at(v, kv_step)?,
                out: at(out, q_step)?,
                lse: at(lse, lse_step)?,
            });
        }
        let reports = py.detach(|| {
            let mut rt = self.inner.lock().map_err(|_| WeftError::new_err("the runtime's lock is poisoned"))?;
            // Safety: weft.torch passes the current stream of this runtime's device and
            // the addresses of live contiguous tensors of these shapes on it.
            // `repeat` > 1 queues the same call again: benchmarks read the host cost of a call
            // with no Python in between.
            unsafe {
                rt.use_stream(stream).map_err(runtime_error)?;
                let mut reports = Vec::new();
                for _ in 0..repeat.max(1) {
                    for &tensors in &calls {
                        reports = rt
                            .attention_layer_external(&plan.inner, shape, dtype, tensors, scale)
                            .map_err(runtime_error)?;
                    }
                }
                Ok::<_, PyErr>(reports)
            }
        })?;
        if !report {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(reports.len());
        for r in reports {
            let d = PyDict::new(py);
            d.set_item("kernel", r.kernel)?;
            d.set_item("config", r.config.to_string())?;
            d.set_item("heads", r.heads)?;
            d.set_item("patterns", r.patterns)?;
            d.set_item("tuned", r.tuned)?;
            d.set_item("source", format!("{:?}", r.source).to_lowercase())?;
            d.set_item("load_ms", r.load_ms)?;
            d.set_item("index_ms", r.index_ms)?;
            d.set_item("index_on_gpu", r.index_on_gpu)?;
            out.push(d.unbind());
        }
        Ok(Some(out))
    }

    /// Queues one layer's attention over a packed batch on `stream`: sequence `b` has
    /// `seqs[b] = (nq, nk)` tokens; Q `[hq, sum nq, d]`, K and V `[hkv, sum nk, d]`, O like Q
    /// and LSE `[hq, sum nq]`, contiguous, at the given device addresses (see `attention`).
    #[pyo3(signature = (plan, heads, head_dim, seqs, dtype, q, k, v, out, lse, stream, scale = None))]
    #[allow(clippy::too_many_arguments)]
    fn attention_varlen(
        &self,
        py: Python<'_>,
        plan: &PyPlan,
        heads: (usize, usize),
        head_dim: usize,
        seqs: Vec<(usize, usize)>,
        dtype: &str,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        stream: u64,
        scale: Option<f32>,
    ) -> PyResult<()> {
        let dtype = parse_dtype(dtype)?;
        if [q, k, v, out, lse].contains(&0) {
            return Err(value_error("a tensor's device address is 0"));
        }
        let tensors = ExternalTensors { q, k, v, out, lse };
        py.detach(|| {
            let mut rt = self.inner.lock().map_err(|_| WeftError::new_err("the runtime's lock is poisoned"))?;
            // Safety: as `attention`: weft.torch passes live contiguous tensors of these shapes
            // on the current stream of this runtime's device.
            unsafe {
                rt.use_stream(stream).map_err(runtime_error)?;
                rt.attention_layer_varlen_external(&plan.inner, heads, head_dim, &seqs, dtype, tensors, scale)
                    .map_err(runtime_error)?;
            }
            Ok(())
        })
    }

    /// An empty paged cache: `batch` sequences of up to `max_pages` pages of `page_size`
    /// tokens, `hq` query heads over `hkv` key/value heads of `head_dim`, 16-bit `dtype`; with
    /// `host`, K and V in pinned host memory and `hot_pages` pages of one KV head cached on the
    /// GPU; with `key_bits`, every key also quantized to that many bits on the GPU.
    #[pyo3(signature = (batch, hq, hkv, head_dim, page_size, max_pages, dtype, host = false, hot_pages = 0, key_bits = 0))]
    #[allow(clippy::too_many_arguments)]
    fn paged_cache(
        &self,
        py: Python<'_>,
        batch: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        page_size: usize,
        max_pages: usize,
        dtype: &str,
        host: bool,
        hot_pages: usize,
        key_bits: u32,
    ) -> PyResult<PyPagedCache> {
        let dtype = parse_dtype(dtype)?;
        let shape = PagedShape { batch, hq, hkv, head_dim, page_size, max_pages, dtype };
        let options = weft::runtime::PagedOptions { host, hot_pages, key_bits };
        let cache = py.detach(|| {
            let rt = self.inner.lock().map_err(|_| WeftError::new_err("the runtime's lock is poisoned"))?;
            rt.paged_cache_with_options(shape, options).map_err(runtime_error)
        })?;
        Ok(PyPagedCache { inner: Mutex::new(cache), device: self.device })
    }

    /// Writes sequence `seq`'s first `n` tokens: K and V `[hkv, n, head_dim]` at `k` and `v`
    /// (device addresses, contiguous), on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn paged_fill(
        &self,
        py: Python<'_>,
        cache: &PyPagedCache,
        seq: usize,
        k: u64,
        v: u64,
        n: usize,
        stream: u64,
    ) -> PyResult<()> {
        // Safety: weft.torch passes live contiguous tensors of these shapes on the current
        // stream of this runtime's device.
        self.on_cache(py, cache, stream, |rt, c| unsafe { rt.paged_fill_external(c, seq, k, v, n) })
    }

    /// Appends one token per sequence: K and V `[batch, hkv, head_dim]` at `k` and `v`.
    fn paged_append(&self, py: Python<'_>, cache: &PyPagedCache, k: u64, v: u64, stream: u64) -> PyResult<()> {
        // Safety: as `paged_fill`.
        self.on_cache(py, cache, stream, |rt, c| unsafe { rt.paged_append_external(c, k, v) })
    }

    /// One decode step: Q `[batch, hq, head_dim]` at `q` into O (same shape) at `out` and LSE
    /// `[batch, hq]` (f32) at `lse`; `retrieval` (a `retrieval(...)` pattern) keeps Quest's
    /// pages, chosen on the device; none keeps every token.
    #[pyo3(signature = (cache, q, out, lse, stream, scale, retrieval = None, splits = 0))]
    #[allow(clippy::too_many_arguments)]
    fn paged_decode(
        &self,
        py: Python<'_>,
        cache: &PyPagedCache,
        q: u64,
        out: u64,
        lse: u64,
        stream: u64,
        scale: f32,
        retrieval: Option<&PyPattern>,
        splits: usize,
    ) -> PyResult<()> {
        let retrieval = retrieval.map(retrieval_of).transpose()?;
        if [q, out, lse].contains(&0) {
            return Err(value_error("a tensor's device address is 0"));
        }
        // Safety: as `paged_fill`.
        self.on_cache(py, cache, stream, |rt, c| unsafe {
            rt.paged_decode_external(c, q, out, lse, retrieval.as_ref(), scale, splits)
        })
    }

    /// The hot pages' counters of a cache in host memory since it was made, as a dict
    /// (`lookups`, `hits`, `copied`, `conflicts`, `hit_rate`), after the work queued on
    /// `stream`; None for a cache in GPU memory.
    fn paged_hot_stats<'py>(
        &self,
        py: Python<'py>,
        cache: &PyPagedCache,
        stream: u64,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyDict>>> {
        let stats = self.on_cache(py, cache, stream, |rt, c| rt.paged_hot_stats(c))?;
        stats
            .map(|h| {
                let d = pyo3::types::PyDict::new(py);
                d.set_item("lookups", h.lookups)?;
                d.set_item("hits", h.hits)?;
                d.set_item("copied", h.copied)?;
                d.set_item("conflicts", h.conflicts)?;
                d.set_item("hit_rate", h.hit_rate())?;
                Ok(d)
            })
            .transpose()
    }
}

/// A paged KV cache on the GPU (`weft.torch.PagedCache` wraps it): made by
/// `Runtime.paged_cache`, filled, appended to and decoded through the runtime's `paged_*`
/// methods.
#[pyclass(module = "weft._weft", name = "PagedCache", frozen)]
struct PyPagedCache {
    inner: Mutex<PagedKvCache>,
    device: usize,
}

#[pymethods]
impl PyPagedCache {
    /// The sequences' lengths.
    #[getter]
    fn lens(&self) -> PyResult<Vec<usize>> {
        Ok(self.inner.lock().map_err(|_| WeftError::new_err("the cache's lock is poisoned"))?.lens().to_vec())
    }
}

/// The retrieval operator of a pattern that is one (`retrieval(...)`), for paged decode.
fn retrieval_of(p: &PyPattern) -> PyResult<weft::dsl::Retrieval> {
    match &p.inner.expr {
        weft::dsl::PatternExpr::Retrieval(r) => Ok(r.clone()),
        _ => Err(value_error(format!(
            "paged decode takes a retrieval pattern (`retrieval(unit = page(n), ...)`), got `{}`",
            p.inner.expr
        ))),
    }
}

impl PyRuntime {
    /// Runs `f` on this runtime and `cache` (both locked, the GIL released) after switching
    /// the runtime to `stream`, which weft.torch gives as torch's current stream of this
    /// device (as for `attention`).
    fn on_cache<R: Send>(
        &self,
        py: Python<'_>,
        cache: &PyPagedCache,
        stream: u64,
        f: impl FnOnce(&mut Runtime, &mut PagedKvCache) -> Result<R, weft::runtime::Error> + Send,
    ) -> PyResult<R> {
        if cache.device != self.device {
            return Err(value_error(format!(
                "the cache lives on device {}, this runtime on {}",
                cache.device, self.device
            )));
        }
        py.detach(|| {
            let mut rt = self.inner.lock().map_err(|_| WeftError::new_err("the runtime's lock is poisoned"))?;
            let mut c = cache.inner.lock().map_err(|_| WeftError::new_err("the cache's lock is poisoned"))?;
            // Safety: weft.torch passes the current stream of this runtime's device.
            unsafe { rt.use_stream(stream) }.map_err(runtime_error)?;
            f(&mut rt, &mut c).map_err(runtime_error)
        })
    }
}

/// "bf16" or "fp16" as a kernel dtype.
fn parse_dtype(dtype: &str) -> PyResult<weft::codegen::DType> {
    match dtype {
        "bf16" => Ok(weft::codegen::DType::Bf16),
        "fp16" => Ok(weft::codegen::DType::F16),
        other => Err(value_error(format!("dtype must be \"bf16\" or \"fp16\", got {other:?}"))),
    }
}

/// Whether libcuda can be loaded here (a GPU may still be missing).
#[pyfunction]
fn driver_present() -> bool {
    weft::runtime::check_driver().is_ok()
}

#[pymodule]
fn _weft(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("WeftError", m.py().get_type::<WeftError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyPattern>()?;
    m.add_class::<PyIndex>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyRuntime>()?;
    m.add_class::<PyPagedCache>()?;
    m.add_function(wrap_pyfunction!(explain_json, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_index, m)?)?;
    m.add_function(wrap_pyfunction!(reference_attention, m)?)?;
    m.add_function(wrap_pyfunction!(families, m)?)?;
    m.add_function(wrap_pyfunction!(builtins, m)?)?;
    m.add_function(wrap_pyfunction!(search_json, m)?)?;
    m.add_function(wrap_pyfunction!(search_results_json, m)?)?;
    m.add_function(wrap_pyfunction!(driver_present, m)?)?;
    Ok(())
}
