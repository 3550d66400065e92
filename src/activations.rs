//! Activation dumps: per-layer Q, K and V read from a safetensors file, for `rotq eval`.
//!
//! The expected tensors, for each layer `L` (0, 1, … until a layer is missing), are named by a
//! template whose `{layer}` becomes `L` and `{t}` becomes `q`, `k` or `v` (default
//! `layers.{layer}.{t}`). Shapes: Q `[n_q, h_q, d]`, K `[n_kv, h_kv, d]`, V `[n_kv, h_kv, d_v]`,
//! the keys after RoPE as the cache would hold them, and the queries at the last `n_q`
//! positions (causal). dtypes f32, f16 or bf16.
//!
//! ```
//! use rotq::activations::read_activations;
//! let err = read_activations(std::path::Path::new("/no/such.safetensors"), "layers.{layer}.{t}");
//! assert!(err.is_err());
//! ```

use crate::eval::Activations;
use crate::Error;
use half::{bf16, f16};
use ndarray::Array3;
use rotq_reference::AttentionParams;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// The name of tensor `t` (`q`, `k` or `v`) of `layer` under `template`.
///
/// ```
/// assert_eq!(rotq::activations::tensor_name("model.{layer}.attn_{t}", 3, "k"), "model.3.attn_k");
/// ```
pub fn tensor_name(template: &str, layer: usize, t: &str) -> String {
    template
        .replace("{layer}", &layer.to_string())
        .replace("{t}", t)
}

/// Reads every layer's Q, K and V from the safetensors file at `path` (names from `template`,
/// see the module docs). A missing file, a template without `{layer}` and `{t}`, no layer 0, a
/// layer with only some of its tensors, a tensor of another rank or dtype, or shapes that do
/// not fit together are errors naming the tensor.
pub fn read_activations(path: &Path, template: &str) -> Result<Vec<Activations>, Error> {
    if !template.contains("{layer}") || !template.contains("{t}") {
        return Err(Error::Input(format!(
            "the tensor name template `{template}` needs both {{layer}} and {{t}}"
        )));
    }
    let bytes = crate::io::read_bytes(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Input(format!("{}: not a safetensors file: {e}", path.display())))?;
    let mut layers = Vec::new();
    for layer in 0.. {
        let names = ["q", "k", "v"].map(|t| tensor_name(template, layer, t));
        let present = names.iter().filter(|n| file.tensor(n).is_ok()).count();
        if present == 0 {
            break;
        }
        if present < 3 {
            return Err(Error::Input(format!(
                "layer {layer} has only some of {}, {} and {}",
                names[0], names[1], names[2]
            )));
        }
        let [q, k, v] = names.map(|n| array(&file, &n));
        let (q, k, v) = (q?, k?, v?);
        let ((n_q, h_q, d), (n_kv, h_kv, dk), (n_v, h_v, _)) = (q.dim(), k.dim(), v.dim());
        if dk != d || n_v != n_kv || h_v != h_kv || h_kv == 0 || h_q % h_kv != 0 || n_q > n_kv {
            return Err(Error::Input(format!(
                "layer {layer}: shapes Q {:?}, K {:?}, V {:?} do not fit (Q [n_q, h_q, d] with \
                 n_q <= n_kv and h_q a multiple of h_kv, K [n_kv, h_kv, d], V [n_kv, h_kv, d_v])",
                q.dim(),
                k.dim(),
                v.dim()
            )));
        }
        layers.push(Activations {
            q,
            k,
            v,
            params: AttentionParams {
                causal: true,
                pos_offset: n_kv - n_q,
                ..Default::default()
            },
        });
    }
    if layers.is_empty() {
        return Err(Error::Input(format!(
            "{}: no tensor named {} (the template is `{template}`)",
            path.display(),
            tensor_name(template, 0, "q")
        )));
    }
    Ok(layers)
}

/// One tensor as `[a, b, c]` f32.
fn array(file: &SafeTensors<'_>, name: &str) -> Result<Array3<f32>, Error> {
    let t = file
        .tensor(name)
        .map_err(|e| Error::Input(format!("{name}: {e}")))?;
    let shape = t.shape();
    if shape.len() != 3 {
        return Err(Error::Input(format!(
            "{name}: shape {shape:?}, want [tokens, heads, dim]"
        )));
    }
    let data = t.data();
    let values: Vec<f32> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Input(format!(
                "{name}: dtype {other:?}, want f32, f16 or bf16"
            )))
        }
    };
    Array3::from_shape_vec((shape[0], shape[1], shape[2]), values)
        .map_err(|e| Error::Input(format!("{name}: {e}")))
}
