//! `rotq checkpoint MODEL_DIR`: the rotation plan of each attention layer of a compressed-tensors
//! checkpoint, as the engine library reads it (`rotq::checkpoint`), for a person to check before
//! serving the model.

use crate::Error;
use rotq::checkpoint::{CheckpointOptions, TransformConfig};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One layer's plan, as printed.
#[derive(Debug, Serialize, PartialEq)]
pub struct LayerPlan {
    /// The decoder layer.
    pub layer: usize,
    /// The Q/K rotation (`hadamard(128)`, …), or `None`.
    pub qk: Option<String>,
}

/// The decoder's layer count and head dimension from `config.json` (top level, else its
/// `text_config`): `num_hidden_layers`; `head_dim`, else `hidden_size / num_attention_heads`.
fn model_dims(config: &Value) -> Option<(usize, usize)> {
    let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let dims = |v: &Value| {
        let layers = get(v, "num_hidden_layers")?;
        let head = get(v, "head_dim").or_else(|| {
            let heads = get(v, "num_attention_heads").filter(|&h| h > 0)?;
            Some(get(v, "hidden_size")? / heads)
        })?;
        Some((layers, head))
    };
    dims(config).or_else(|| config.get("text_config").and_then(dims))
}

/// The plans of the checkpoint in `dir` (its `config.json` and `.safetensors` files).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 2, "head_dim": 64,
///     "quantization_config": {"transform_config": {"config_groups": {"R3": {"type": "hadamard",
///     "head_dim": 64, "apply": [{"targets": "re:.*self_attn$", "location": "q_attn"},
///     {"targets": "re:.*self_attn$", "location": "k_cache"}]}}}}}"#).unwrap();
/// let plans = rotq_cli::checkpoint::plans(dir.path(), &Default::default()).unwrap();
/// assert_eq!(plans[1].qk.as_deref(), Some("hadamard(64)"));
/// ```
pub fn plans(dir: &Path, options: &CheckpointOptions) -> Result<Vec<LayerPlan>, Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let (n_layers, head_dim) = model_dims(&config).ok_or_else(|| {
        Error::Input(format!(
            "{}: needs num_hidden_layers and head_dim (or hidden_size and num_attention_heads)",
            path.display()
        ))
    })?;
    let Some(transforms) = TransformConfig::from_config_json(&text).map_err(rotq::Error::from)?
    else {
        return Ok((0..n_layers)
            .map(|layer| LayerPlan { layer, qk: None })
            .collect());
    };
    let plans = transforms
        .plans_with(n_layers, head_dim, Some(dir), options)
        .map_err(rotq::Error::from)?;
    Ok(plans
        .into_iter()
        .enumerate()
        .map(|(layer, p)| LayerPlan {
            layer,
            qk: p.qk.map(|r| r.to_string()),
        })
        .collect())
}
