//! A llama model from a GGUF file: the `llama.*` keys give the shape, the `blk.N.*` tensors
//! the weights, dequantized to f32 through rotq's format registry. Anything the runner cannot
//! run (another architecture, partial RoPE, a head dimension rotq cannot rotate, a tensor of
//! the wrong shape) is refused with the file's name and the reason.
//!
//! ```no_run
//! use rotq_model::{gguf::Gguf, load};
//! let file = Gguf::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! println!("{} MB in f32", load::f32_bytes(&file) >> 20);
//! let model = load::llama(&file)?;
//! assert_eq!(model.config.head_dim, 64);
//! # Ok::<(), rotq_model::Error>(())
//! ```

use rotq::reference::rope::RopeVariant;
use rotq::Rotation;

use crate::gguf::Gguf;
use crate::llama::{Config, Layer, Llama, Matrix};
use crate::Error;

/// Bytes the model's tensors take once dequantized to f32 (what [`llama`] allocates), so
/// that a caller can refuse a model too large for memory before loading it.
pub fn f32_bytes(file: &Gguf) -> u64 {
    file.tensors()
        .iter()
        .map(|t| t.n_elements().saturating_mul(4))
        .fold(0, u64::saturating_add)
}

/// The shape of the llama model in `file`.
pub fn config(file: &Gguf) -> Result<Config, Error> {
    let refuse = |reason: String| Error::Model {
        path: file.path().to_path_buf(),
        reason,
    };
    let arch = file.str("general.architecture")?;
    if arch != "llama" {
        return Err(refuse(format!(
            "architecture {arch:?} is not supported (the runner runs llama models)"
        )));
    }
    let n = |key: &str| -> Result<usize, Error> {
        let v = file.u64(&format!("llama.{key}"))?;
        usize::try_from(v).map_err(|_| refuse(format!("llama.{key} = {v} is too large")))
    };
    let (dim, n_heads) = (n("embedding_length")?, n("attention.head_count")?);
    if n_heads == 0 || !dim.is_multiple_of(n_heads) {
        return Err(refuse(format!(
            "hidden size {dim} is not a multiple of {n_heads} heads"
        )));
    }
    let head_dim = dim / n_heads;
    let vocab = match file.get("llama.vocab_size") {
        Some(_) => n("vocab_size")?,
        None => file
            .tensor("token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize,
    };
    let config = Config {
        n_layers: n("block_count")?,
        dim,
        ffn_dim: n("feed_forward_length")?,
        n_heads,
        n_kv_heads: match file.get("llama.attention.head_count_kv") {
            Some(_) => n("attention.head_count_kv")?,
            None => n_heads,
        },
        head_dim,
        vocab,
        rope_base: match file.get("llama.rope.freq_base") {
            Some(_) => file.f32("llama.rope.freq_base")?,
            None => 10_000.0,
        },
        rope_variant: RopeVariant::Normal,
        rms_eps: file.f32("llama.attention.layer_norm_rms_epsilon")?,
        train_ctx: n("context_length")?,
    };
    if file.get("llama.rope.dimension_count").is_some() {
        let rot = n("rope.dimension_count")?;
        if rot != head_dim {
            return Err(refuse(format!(
                "RoPE on {rot} of {head_dim} dimensions (partial RoPE) is not supported"
            )));
        }
    }
    if file.get("llama.rope.scaling.type").is_some() {
        return Err(refuse("RoPE scaling is not supported".into()));
    }
    config.check().map_err(|e| refuse(e.to_string()))?;
    Rotation::hadamard(head_dim).map_err(|e| {
        refuse(format!(
            "head dim {head_dim} cannot be Hadamard-rotated by rotq: {e}"
        ))
    })?;
    Ok(config)
}

/// Loads the llama model in `file`, every weight dequantized to f32.
pub fn llama(file: &Gguf) -> Result<Llama, Error> {
    let c = config(file)?;
    let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix, Error> {
        let info = file.tensor(name)?;
        if info.dims != [cols as u64, rows as u64] {
            return Err(Error::Model {
                path: file.path().to_path_buf(),
                reason: format!(
                    "tensor {name} has dims {:?}, the model needs [{cols}, {rows}]",
                    info.dims
                ),
            });
        }
        Matrix::new(rows, cols, file.tensor_f32(name)?)
    };
    let vector = |name: &str, len: usize| -> Result<Vec<f32>, Error> {
        let info = file.tensor(name)?;
        if info.dims != [len as u64] {
            return Err(Error::Model {
                path: file.path().to_path_buf(),
                reason: format!(
                    "tensor {name} has dims {:?}, the model needs [{len}]",
                    info.dims
                ),
            });
        }
        Ok(file.tensor_f32(name)?)
    };
    let (d, kv, f) = (c.dim, c.kv_dim(), c.ffn_dim);
    let layers = (0..c.n_layers)
        .map(|i| {
            let t = |s: &str| format!("blk.{i}.{s}.weight");
            Ok(Layer {
                attn_norm: vector(&t("attn_norm"), d)?,
                wq: matrix(&t("attn_q"), d, d)?,
                wk: matrix(&t("attn_k"), kv, d)?,
                wv: matrix(&t("attn_v"), kv, d)?,
                wo: matrix(&t("attn_output"), d, d)?,
                ffn_norm: vector(&t("ffn_norm"), d)?,
                w_gate: matrix(&t("ffn_gate"), f, d)?,
                w_up: matrix(&t("ffn_up"), f, d)?,
                w_down: matrix(&t("ffn_down"), d, f)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let output = match file.tensor("output.weight") {
        Ok(_) => Some(matrix("output.weight", c.vocab, d)?),
        Err(_) => None,
    };
    Llama::new(
        c.clone(),
        matrix("token_embd.weight", c.vocab, d)?,
        layers,
        vector("output_norm.weight", d)?,
        output,
    )
}
