//! Captured Q and K from a safetensors file.
//!
//! Layout: tensors named `q` and `k`, or `layers.{L}.q` and `layers.{L}.k` for layer `L`,
//! each `[heads, tokens, head_dim]` in f32, bf16 or f16, taken after rotary embedding. K may
//! have fewer heads than Q (GQA) as long as it divides them.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use weft_patterns::Tensor;

/// A problem with a Q/K file, naming the tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum QkError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: String, message: String },
    #[error("{path} has no tensor `{name}` (it has: {present}); expected `q`/`k` or `layers.<L>.q`/`layers.<L>.k`")]
    Missing { path: String, name: String, present: String },
    #[error("tensor `{name}` in {path}: {message}")]
    Bad { path: String, name: String, message: String },
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn tensor(st: &SafeTensors<'_>, path: &str, name: &str) -> Result<Tensor, QkError> {
    let bad = |message: String| QkError::Bad { path: path.into(), name: name.into(), message };
    let view = st.tensor(name).map_err(|_| {
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        names.truncate(8);
        QkError::Missing { path: path.into(), name: name.into(), present: names.join(", ") }
    })?;
    let shape = view.shape();
    let [heads, tokens, dim] = shape else {
        return Err(bad(format!("shape {shape:?} is not [heads, tokens, head_dim]")));
    };
    let data = to_f32(view.dtype(), view.data())
        .ok_or_else(|| bad(format!("dtype {:?} is not supported; use f32, bf16 or f16", view.dtype())))?;
    let t = Tensor::new(*heads, *tokens, *dim, data).map_err(|e| bad(e.to_string()))?;
    t.check_finite(name).map_err(|e| bad(e.to_string()))?;
    Ok(t)
}

/// What is wrong with a file safetensors refused, as a sentence (its errors name variants).
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "it is shorter than the 8-byte header length safetensors files begin with".into(),
        E::HeaderTooLarge => "its first 8 bytes announce a header larger than safetensors allows (100 MB)".into(),
        E::InvalidHeaderLength => "its first 8 bytes announce a header longer than the file".into(),
        E::InvalidHeader => "its header is not UTF-8 text".into(),
        E::InvalidHeaderStart => "its header does not start with `{` (not a JSON object)".into(),
        E::InvalidHeaderDeserialization => {
            "its header is not the JSON safetensors expects ({name: {dtype, shape, data_offsets}})".into()
        }
        E::InvalidOffset(name) => {
            format!(
                "tensor `{name}`'s data offsets do not fit the file or its dtype and shape (cut short, or overlapping)"
            )
        }
        E::TensorInvalidInfo => "a tensor's dtype, shape and byte length disagree".into(),
        E::MetadataIncompleteBuffer => "its tensors do not cover the data that follows the header".into(),
        E::ValidationOverflow => "a tensor's shape overflows when multiplied out".into(),
        other => other.to_string(),
    }
}

/// Reads Q and K (of `layer`, when given) from a safetensors file.
pub fn load(path: &Path, layer: Option<usize>) -> Result<(Tensor, Tensor), QkError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| QkError::Io { path: p.clone(), source })?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| QkError::Format { path: p.clone(), message: describe(&e) })?;
    let (qn, kn) = match layer {
        Some(l) => (format!("layers.{l}.q"), format!("layers.{l}.k")),
        None => ("q".to_string(), "k".to_string()),
    };
    let q = tensor(&st, &p, &qn)?;
    let k = tensor(&st, &p, &kn)?;
    weft_patterns::tensor::check_qkv(&q, &k, None).map_err(|e| QkError::Bad {
        path: p,
        name: kn,
        message: e.to_string(),
    })?;
    Ok((q, k))
}

/// The largest layer number a Q/K file may use.
pub const MAX_LAYER: usize = 65_535;

/// The layers a file holds: the `L` of every `layers.L.q`, ascending; `[None]` when it holds
/// plain `q`/`k` instead.
pub fn layers(path: &Path) -> Result<Vec<Option<usize>>, QkError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| QkError::Io { path: p.clone(), source })?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| QkError::Format { path: p.clone(), message: describe(&e) })?;
    let mut found = Vec::new();
    for name in meta.tensors().keys() {
        let Some(l) = name.strip_prefix("layers.").and_then(|n| n.strip_suffix(".q")) else { continue };
        // Layer numbers key stored search results (as u32) and size the heads x layers picture.
        match l.parse::<usize>() {
            Ok(l) if l <= MAX_LAYER => found.push(l),
            _ => {
                return Err(QkError::Bad {
                    path: p.clone(),
                    name: name.clone(),
                    message: format!("layer numbers are integers from 0 to {MAX_LAYER}"),
                })
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    if found.is_empty() {
        Ok(vec![None])
    } else {
        Ok(found.into_iter().map(Some).collect())
    }
}

/// Writes Q and K of several layers as f32 tensors `layers.L.q` and `layers.L.k`.
pub fn save_layers(path: &Path, layers: &[(Tensor, Tensor)]) -> Result<(), QkError> {
    let p = path.display().to_string();
    let bytes = |t: &Tensor| t.data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, (q, k))| {
            [
                (format!("layers.{l}.q"), bytes(q), vec![q.heads, q.tokens, q.dim]),
                (format!("layers.{l}.k"), bytes(k), vec![k.heads, k.tokens, k.dim]),
            ]
        })
        .collect();
    let mut views = Vec::new();
    for (name, b, shape) in &data {
        let v = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| QkError::Format { path: p.clone(), message: e.to_string() })?;
        views.push((name.clone(), v));
    }
    safetensors::serialize_to_file(views, &None, path).map_err(|e| QkError::Format { path: p, message: e.to_string() })
}

/// Writes Q and K as f32 tensors `q` and `k` (used by tests and the quickstart).
pub fn save(path: &Path, q: &Tensor, k: &Tensor) -> Result<(), QkError> {
    let p = path.display().to_string();
    let bytes = |t: &Tensor| t.data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (qb, kb) = (bytes(q), bytes(k));
    let views = [
        ("q", safetensors::tensor::TensorView::new(Dtype::F32, vec![q.heads, q.tokens, q.dim], &qb)),
        ("k", safetensors::tensor::TensorView::new(Dtype::F32, vec![k.heads, k.tokens, k.dim], &kb)),
    ];
    let mut ok = Vec::new();
    for (n, v) in views {
        ok.push((n, v.map_err(|e| QkError::Format { path: p.clone(), message: e.to_string() })?));
    }
    safetensors::serialize_to_file(ok, &None, path).map_err(|e| QkError::Format { path: p, message: e.to_string() })
}
