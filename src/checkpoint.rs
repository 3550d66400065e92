//! A model quantized with compressed-tensors / llm-compressor (e.g. SpinQuant's R3) says in its
//! `config.json`, under `quantization_config.transform_config`, which transforms it was
//! calibrated with:
//!
//! ```json
//! {"quantization_config": {"transform_config": {"config_groups": {
//!   "R3": {"type": "hadamard", "head_dim": 128, "apply": [
//!     {"targets": ["re:.*self_attn$"], "location": "q_attn"},
//!     {"targets": ["re:.*self_attn$"], "location": "k_cache"}]}}}}}
//! ```
//!
//! ## What is read
//! As compressed-tensors (0.11 to 0.18) reads it, field by field:
//! * The groups: `config_groups`, name → scheme. An empty `transform_config` (`{}`, which
//!   compressed-tensors writes into every checkpoint it saves without transforms) means none.
//!   Any other field is refused by name (`transform_groups`, an early name no release reads).
//! * A scheme: `type` (`hadamard`, `random-hadamard`, `random-matrix`; `_`, spaces and case are
//!   normalized as compressed-tensors' registry does), `apply` (a list of args), `randomize`,
//!   `requires_grad` (read, no effect on values), `head_dim` (required for `q_attn` and
//!   `k_cache`; a divisor of the model's head dimension applies the transform block by block
//!   along the head), `precision` (a torch dtype name, `torch.` optional; read, not used:
//!   rotq builds in f64). Unknown fields are refused, as the format itself does.
//! * An arg: `targets` and `ignore` (a string or a list; `null` refused), `location` (`input`,
//!   `weight_input`, `weight_output`, `output`, `k_cache`, `q_attn`), `inverse`.
//!
//! ## Which layers
//! Module names are the checkpoint's (the dot-prefixes of its tensor names; without weights,
//! a Llama-style model's `model.layers.<i>.self_attn`); the attention module of decoder layer
//! `i` is the parent of its `k_proj`. A scheme's `q_attn` and `k_cache` args select modules as
//! compressed-tensors' `match_named_modules` does (the rules in `checkpoint/matching.rs`:
//! `re:` patterns matched at the start of the full name, other entries by exact name or by
//! class, the model's attention class from `architectures` or `Module`; ignore wins). A layer
//! that both select is rotated, one that neither selects is not, one that only one selects is
//! an error naming the module ([`CheckpointError::OneSided`]); a target that matches no module
//! is an error naming it ([`CheckpointError::NoMatch`]), where compressed-tensors would silently
//! rotate nothing; two schemes on one layer are refused (composition is not supported).
//!
//! ## What becomes a rotation
//! compressed-tensors applies an online transform as `value @ A` on row vectors, with `A = W`
//! or, for `inverse`, `Wᵀ`; the Hadamard types divide by `√n` (their stored `W` holds ±1).
//! A scheme applied at **both** `q_attn` and `k_cache`, with the same `inverse` flag (SpinQuant's
//! R3 sets it on neither), keeps every score `(q A)·(k A)` equal to `q·k` when `A` is orthogonal,
//! so it is [`RotationPlan::qk`] with `R = Aᵀ` (our rotations act on columns). The format has
//! **no location for V** (R2 rotates V offline, fused into `v_proj`/`o_proj`), so
//! [`RotationPlan::v`] is always `None`. The other locations act on linear layers and are fused
//! into weights or applied there: they do not touch the cache and are skipped.
//!
//! * `hadamard`, not randomized: compressed-tensors' matrix is Sylvester's, in natural order,
//!   scaled by `1/√n`: exactly [`Rotation::hadamard`], at powers of two only (compressed-tensors
//!   builds no other; [`CheckpointOptions::extended_hadamard`] allows rotq's 12, 20, 28 and 40
//!   times a power of two). A stored matrix, if the checkpoint has one, is loaded and
//!   compared; a permuted (`randomize`) one becomes an explicit matrix. Its `inverse` flags may
//!   differ between `q_attn` and `k_cache`: a (permuted) Sylvester matrix is symmetric.
//! * `random-hadamard`, `random-matrix`: the matrix is read from the checkpoint's safetensors,
//!   where compressed-tensors saves it as `<attention module>.<group>_<location>.weight` (e.g.
//!   `model.layers.3.self_attn.R3_q_attn.weight`) and a randomized Hadamard's permutation as
//!   `….perm`. A layer without its own tensor uses the one of the lowest layer that has one
//!   (compressed-tensors shares one matrix, and one permutation, between all applications of
//!   a size and ties them, so a file may hold a single copy). Matrices
//!   must be `head_dim × head_dim` and orthogonal (f64, f32, f16 or bf16, within the storage
//!   rounding); the `q_attn` and `k_cache` tensors of a layer, when both are stored, must agree.
//!   (compressed-tensors' `random-matrix` draws uniform entries in `[0, 1)`: not a rotation,
//!   refused with that reason.)

mod matching;

use crate::{Rotation, RotationPlan};
use matching::{Modules, Selector};
use ndarray::Array2;
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What can go wrong reading a transform config or its weights. Every message names the
/// config field (`config_groups.<name>.…`) or the tensor at fault.
///
/// ```
/// use rotq::checkpoint::{CheckpointError, TransformConfig};
/// let err = TransformConfig::from_config_json("{").unwrap_err();
/// assert!(matches!(err, CheckpointError::Json { .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// JSON that does not parse, or a field of the wrong shape.
    #[error("{field}: {message}")]
    Json {
        /// Where (e.g. `quantization_config.transform_config.config_groups.R3.apply[0]`).
        field: String,
        /// What serde said.
        message: String,
    },
    /// A transform `type` that rotq cannot build.
    #[error("{field}: unsupported transform type `{value}` (expected hadamard, random-hadamard or random-matrix)")]
    UnsupportedType {
        /// The field.
        field: String,
        /// Its value.
        value: String,
    },
    /// A `location` that the format does not define.
    #[error("{field}: unsupported location `{value}` (expected input, weight_input, weight_output, output, k_cache or q_attn)")]
    UnsupportedLocation {
        /// The field.
        field: String,
        /// Its value.
        value: String,
    },
    /// An attention transform that rotq cannot map to a rotation plan.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A scheme's `head_dim` that differs from the model's.
    #[error("{field} = {config} differs from the model's head dim {model}")]
    HeadDimMismatch {
        /// The field.
        field: String,
        /// The scheme's value.
        config: usize,
        /// The model's.
        model: usize,
    },
    /// A transform whose matrix must come from the checkpoint, and no tensor was found.
    #[error(
        "{field}: needs the tensor {tensor} from the checkpoint's safetensors, which {reason}"
    )]
    MissingWeights {
        /// The field whose value needs it.
        field: String,
        /// The tensor looked for.
        tensor: String,
        /// Why it is missing (no weights given, not found).
        reason: String,
    },
    /// A safetensors file that does not parse.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor of a dtype rotq does not read here.
    #[error("tensor {tensor}: dtype {dtype} is not supported here (expected {expected})")]
    Dtype {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A tensor of the wrong shape.
    #[error("tensor {tensor}: shape {shape:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The shape required.
        expected: Vec<usize>,
    },
    /// A tensor whose values are not a valid transform (not orthogonal, not a permutation, …).
    #[error("tensor {tensor}: {reason}")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A `re:` target or ignore entry that does not compile.
    #[error("{field}: regex `{pattern}` does not compile: {message}")]
    BadRegex {
        /// The entry (e.g. `config_groups.R3.apply[0].targets[0]`).
        field: String,
        /// The pattern after `re:`.
        pattern: String,
        /// What the regex engine said.
        message: String,
    },
    /// A target or ignore entry that matches no module of the model.
    #[error("{field}: `{value}` matches no module of the model (names are matched whole, `re:` patterns at the start; class names: the attention modules' {})", class.as_deref().map_or("class is unknown without config.json's `architectures`".to_string(), |c| format!("class is `{c}`")))]
    NoMatch {
        /// The entry.
        field: String,
        /// Its value.
        value: String,
        /// The attention class the model has, if known.
        class: Option<String>,
    },
    /// A layer that one of `q_attn` and `k_cache` selects and the other does not.
    #[error(
        "{field}: selects {module} for {location} but not for {other}: the scores would change"
    )]
    OneSided {
        /// The args entry that selects it.
        field: String,
        /// The attention module.
        module: String,
        /// The location that selects it.
        location: &'static str,
        /// The one that does not.
        other: &'static str,
    },
}

/// How a config is read: strictly as compressed-tensors builds its transforms (the default),
/// or with rotq's wider Hadamard sizes.
///
/// ```
/// let strict = rotq::checkpoint::CheckpointOptions::default();
/// assert!(!strict.extended_hadamard);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Build `hadamard` at 12, 20, 28 and 40 times a power of two as well (rotq's sizes;
    /// compressed-tensors builds powers of two only, so no checkpoint it wrote needs this).
    pub extended_hadamard: bool,
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Where a transform is applied (compressed-tensors' `TransformLocation`).
///
/// ```
/// use rotq::checkpoint::TransformLocation;
/// assert_eq!(TransformLocation::parse("k_cache"), Some(TransformLocation::KCache));
/// assert_eq!(TransformLocation::parse("v_cache"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformLocation {
    /// `input`: a linear layer's input activations (online).
    Input,
    /// `weight_input`: fused into a weight's input side (offline).
    WeightInput,
    /// `weight_output`: fused into a weight's output side (offline).
    WeightOutput,
    /// `output`: a linear layer's output activations (online).
    Output,
    /// `k_cache`: keys, before they enter the cache (online).
    KCache,
    /// `q_attn`: queries, before attention (online).
    QAttn,
}

impl TransformLocation {
    /// The location of a config string, `None` if the format has no such location.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "input" => Self::Input,
            "weight_input" => Self::WeightInput,
            "weight_output" => Self::WeightOutput,
            "output" => Self::Output,
            "k_cache" => Self::KCache,
            "q_attn" => Self::QAttn,
            _ => return None,
        })
    }

    /// The config string (also the suffix of the saved weight's module name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::WeightInput => "weight_input",
            Self::WeightOutput => "weight_output",
            Self::Output => "output",
            Self::KCache => "k_cache",
            Self::QAttn => "q_attn",
        }
    }
}

/// Which modules a transform applies to, and where (compressed-tensors' `TransformArgs`).
///
/// ```
/// use rotq::checkpoint::{TransformArgs, TransformLocation};
/// let a = TransformArgs { targets: vec!["re:.*self_attn$".into()], location: TransformLocation::QAttn,
///                         inverse: false, ignore: vec![] };
/// assert_eq!(a.location.as_str(), "q_attn");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformArgs {
    /// Module names, `re:` patterns or class names.
    pub targets: Vec<String>,
    /// Where on those modules.
    pub location: TransformLocation,
    /// Apply the transform's inverse.
    pub inverse: bool,
    /// Modules excluded from `targets`.
    pub ignore: Vec<String>,
}

/// One transform group (compressed-tensors' `TransformScheme`).
///
/// ```
/// let json = r#"{"quantization_config": {"transform_config": {"config_groups": {"R3":
///     {"type": "random_hadamard", "apply": [{"targets": "Attention", "location": "q_attn"}]}}}}}"#;
/// let cfg = rotq::checkpoint::TransformConfig::from_config_json(json).unwrap().unwrap();
/// assert_eq!(cfg.groups["R3"].kind, "random-hadamard");
/// assert_eq!(cfg.groups["R3"].apply[0].targets, ["Attention"]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformScheme {
    /// The `type`, normalized (lower case, `-` for `_` and spaces).
    pub kind: String,
    /// Where it is applied.
    pub apply: Vec<TransformArgs>,
    /// Distinct weights per application.
    pub randomize: bool,
    /// Trained weights.
    pub requires_grad: bool,
    /// Block size of the (block-diagonal) transform, `None`: the module's size.
    pub head_dim: Option<usize>,
}

/// A model's `transform_config`: the groups by name.
///
/// ```no_run
/// use rotq::checkpoint::TransformConfig;
/// let dir = std::path::Path::new("/models/llama-r3");
/// if let Some(cfg) = TransformConfig::from_config_file(&dir.join("config.json")).unwrap() {
///     let plans = cfg.plans(32, 128, Some(dir)).unwrap();
///     assert_eq!(plans.len(), 32);
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformConfig {
    /// Scheme by group name (`config_groups`).
    pub groups: BTreeMap<String, TransformScheme>,
    /// The class of the model's attention modules, for class-name targets: from
    /// `config.json`'s first `architectures` entry (`LlamaForCausalLM` → `LlamaAttention`).
    pub attention_class: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheme {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    apply: Vec<Value>,
    #[serde(default)]
    randomize: bool,
    #[serde(default)]
    requires_grad: bool,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    precision: Option<Value>,
}

/// torch dtypes a `precision` may name (compressed-tensors' `TorchDtype`: `torch.` optional).
const DTYPES: [&str; 12] = [
    "float64", "float32", "float16", "bfloat16", "double", "float", "half", "int8", "int16",
    "int32", "int64", "uint8",
];

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArgs {
    targets: OneOrMany,
    location: String,
    #[serde(default)]
    inverse: bool,
    #[serde(default)]
    ignore: Option<Value>,
}

const PREFIX: &str = "quantization_config.transform_config";

fn json_err(field: impl Into<String>, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Json {
        field: field.into(),
        message: e.to_string(),
    }
}

impl TransformConfig {
    /// Reads `quantization_config.transform_config` from the text of a `config.json`;
    /// `Ok(None)` when there is none (or it is `null`).
    ///
    /// ```
    /// use rotq::checkpoint::TransformConfig;
    /// assert!(TransformConfig::from_config_json(r#"{"head_dim": 128}"#).unwrap().is_none());
    /// let err = TransformConfig::from_config_json(
    ///     r#"{"quantization_config": {"transform_config": {"config_groups": {"R3": {"typ": "hadamard"}}}}}"#,
    /// ).unwrap_err();
    /// assert!(err.to_string().contains("config_groups.R3"));
    /// ```
    pub fn from_config_json(json: &str) -> Result<Option<Self>> {
        let root: Value = serde_json::from_str(json).map_err(|e| json_err("config.json", e))?;
        let Some(qc) = root.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        if !qc.is_object() {
            return Err(json_err("quantization_config", "expected an object"));
        }
        let Some(tc) = qc.get("transform_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let Some(tc) = tc.as_object() else {
            return Err(json_err(PREFIX, "expected an object"));
        };
        // compressed-tensors writes `{}` into every checkpoint it saves without transforms.
        if tc.is_empty() {
            return Ok(None);
        }
        if let Some(k) = tc.keys().find(|k| *k != "config_groups") {
            let why = if k == "transform_groups" {
                "unknown field `transform_groups` (an early name of `config_groups` that no \
                 compressed-tensors release reads)"
                    .to_string()
            } else {
                format!("unknown field `{k}`")
            };
            return Err(json_err(PREFIX, why));
        }
        let key = "config_groups";
        let Some(groups) = tc.get(key) else {
            return Err(json_err(PREFIX, "missing field `config_groups`"));
        };
        let attention_class = root
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .and_then(matching::attention_class);
        let Some(groups) = groups.as_object() else {
            return Err(json_err(format!("{PREFIX}.{key}"), "expected an object"));
        };
        let mut out = BTreeMap::new();
        for (name, scheme) in groups {
            let field = format!("{PREFIX}.{key}.{name}");
            let raw = RawScheme::deserialize(scheme).map_err(|e| json_err(&field, e))?;
            let mut apply = Vec::with_capacity(raw.apply.len());
            for (i, a) in raw.apply.iter().enumerate() {
                let field = format!("{field}.apply[{i}]");
                if a.get("ignore").is_some_and(Value::is_null) {
                    return Err(json_err(
                        format!("{field}.ignore"),
                        "null (compressed-tensors takes a string or a list)",
                    ));
                }
                let a = RawArgs::deserialize(a).map_err(|e| json_err(&field, e))?;
                let location = TransformLocation::parse(&a.location).ok_or_else(|| {
                    CheckpointError::UnsupportedLocation {
                        field: format!("{field}.location"),
                        value: a.location.clone(),
                    }
                })?;
                let ignore = match a.ignore {
                    None => Vec::new(),
                    Some(v) => OneOrMany::deserialize(&v)
                        .map_err(|e| json_err(format!("{field}.ignore"), e))?
                        .into_vec(),
                };
                apply.push(TransformArgs {
                    targets: a.targets.into_vec(),
                    location,
                    inverse: a.inverse,
                    ignore,
                });
            }
            match &raw.precision {
                None => {}
                Some(Value::String(p))
                    if DTYPES.contains(&p.strip_prefix("torch.").unwrap_or(p)) => {}
                Some(v) => {
                    return Err(json_err(
                        format!("{field}.precision"),
                        format!("`{v}` names no torch dtype (e.g. \"torch.float64\")"),
                    ))
                }
            }
            let kind = raw.kind.replace(['_', ' '], "-").to_lowercase();
            out.insert(
                name.clone(),
                TransformScheme {
                    kind,
                    apply,
                    randomize: raw.randomize,
                    requires_grad: raw.requires_grad,
                    head_dim: raw.head_dim,
                },
            );
        }
        Ok(Some(Self {
            groups: out,
            attention_class,
        }))
    }

    /// [`TransformConfig::from_config_json`] on a file.
    ///
    /// ```
    /// let err = rotq::checkpoint::TransformConfig::from_config_file("/no/such/config.json".as_ref());
    /// assert!(err.unwrap_err().to_string().starts_with("/no/such/config.json"));
    /// ```
    pub fn from_config_file(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_config_json(&text)
    }

    /// The rotation plan of each of `n_layers` attention layers of head dim `head_dim`, reading
    /// matrices from `weights` (a `.safetensors` file, or a folder of them) where the scheme
    /// needs them, as compressed-tensors builds them ([`CheckpointOptions::default`]). Module
    /// names come from the tensor names of `weights` (without them: a Llama-style model's,
    /// `model.layers.<i>.self_attn`); a layer that no scheme's `q_attn` and `k_cache` args
    /// select gets no rotation.
    ///
    /// ```
    /// use rotq::checkpoint::TransformConfig;
    /// use rotq::Rotation;
    /// let json = r#"{"quantization_config": {"transform_config": {"config_groups": {"R3": {
    ///     "type": "hadamard", "head_dim": 64, "apply": [
    ///     {"targets": ["re:.*self_attn$"], "location": "q_attn", "ignore": ["re:model\\.layers\\.0\\."]},
    ///     {"targets": ["re:.*self_attn$"], "location": "k_cache", "ignore": ["re:model\\.layers\\.0\\."]}]}}}}}"#;
    /// let plans = TransformConfig::from_config_json(json).unwrap().unwrap().plans(2, 64, None).unwrap();
    /// assert_eq!(plans[0].qk, None); // ignored
    /// assert_eq!(plans[1].qk, Some(Rotation::hadamard(64).unwrap()));
    /// assert_eq!(plans[1].v, None);
    /// ```
    pub fn plans(
        &self,
        n_layers: usize,
        head_dim: usize,
        weights: Option<&Path>,
    ) -> Result<Vec<RotationPlan>> {
        self.plans_with(n_layers, head_dim, weights, &CheckpointOptions::default())
    }

    /// [`Self::plans`] with `options`.
    ///
    /// ```
    /// use rotq::checkpoint::{CheckpointOptions, TransformConfig};
    /// let json = r#"{"quantization_config": {"transform_config": {"config_groups": {"R3": {
    ///     "type": "hadamard", "head_dim": 96, "apply": [
    ///     {"targets": "re:.*self_attn$", "location": "q_attn"},
    ///     {"targets": "re:.*self_attn$", "location": "k_cache"}]}}}}}"#;
    /// let cfg = TransformConfig::from_config_json(json).unwrap().unwrap();
    /// assert!(cfg.plans(1, 96, None).is_err()); // compressed-tensors builds powers of two only
    /// let wide = CheckpointOptions { extended_hadamard: true };
    /// assert!(cfg.plans_with(1, 96, None, &wide).unwrap()[0].qk.is_some());
    /// ```
    pub fn plans_with(
        &self,
        n_layers: usize,
        head_dim: usize,
        weights: Option<&Path>,
        options: &CheckpointOptions,
    ) -> Result<Vec<RotationPlan>> {
        if n_layers == 0 {
            return Ok(Vec::new());
        }
        let store = weights.map(WeightStore::open).transpose()?;
        let modules = match &store {
            Some(s) => Modules::from_tensor_names(
                s.module_tensor_names().iter().map(String::as_str),
                n_layers,
                self.attention_class.clone(),
            )?,
            None => Modules::llama(n_layers, self.attention_class.clone()),
        };
        let mut plans = vec![RotationPlan::none(); n_layers];
        let mut owner: Vec<Option<&str>> = vec![None; n_layers];
        for (name, scheme) in &self.groups {
            let Some(spec) = attention_spec(name, scheme, head_dim, options)? else {
                continue;
            };
            for layer in spec.selected_layers(&modules)? {
                if let Some(first) = owner[layer] {
                    return Err(CheckpointError::Unsupported {
                        field: format!("config_groups.{name}"),
                        reason: format!(
                            "rotates {} too (config_groups.{first} does); composing two rotations of a layer is not supported",
                            modules.attention[layer]
                        ),
                    });
                }
                owner[layer] = Some(name);
                plans[layer].qk = Some(spec.rotation(layer, store.as_ref())?);
            }
        }
        Ok(plans)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hadamard,
    RandomHadamard,
    RandomMatrix,
}

/// A validated scheme that rotates Q and K.
struct AttentionSpec<'a> {
    name: &'a str,
    kind: Kind,
    randomize: bool,
    inverse: bool,
    /// The transform's size (`head_dim`): the model's head, or blocks of it.
    block: usize,
    /// The model's head dimension.
    d: usize,
    /// `targets` and `ignore` of the `q_attn` and the `k_cache` args, and their fields.
    q: (Selector, Selector, String),
    k: (Selector, Selector, String),
}

fn attention_spec<'a>(
    name: &'a str,
    scheme: &TransformScheme,
    head_dim: usize,
    options: &CheckpointOptions,
) -> Result<Option<AttentionSpec<'a>>> {
    let field = format!("config_groups.{name}");
    let find = |loc| {
        let mut hits = scheme
            .apply
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.location == loc);
        let first = hits.next();
        match hits.next() {
            Some((i, _)) => Err(CheckpointError::Unsupported {
                field: format!("{field}.apply[{i}].location"),
                reason: format!("`{}` appears more than once", loc.as_str()),
            }),
            None => Ok(first),
        }
    };
    let (q, k) = (
        find(TransformLocation::QAttn)?,
        find(TransformLocation::KCache)?,
    );
    let ((qi, q), (ki, k)) = match (q, k) {
        (None, None) => return Ok(None),
        (Some(q), Some(k)) => (q, k),
        (Some((i, _)), None) | (None, Some((i, _))) => {
            return Err(CheckpointError::Unsupported {
                field: format!("{field}.apply[{i}].location"),
                reason: "q_attn and k_cache must both be rotated (else the scores change)".into(),
            })
        }
    };
    let kind = match scheme.kind.as_str() {
        "hadamard" => Kind::Hadamard,
        "random-hadamard" => Kind::RandomHadamard,
        "random-matrix" => Kind::RandomMatrix,
        other => {
            return Err(CheckpointError::UnsupportedType {
                field: format!("{field}.type"),
                value: other.to_string(),
            })
        }
    };
    // A (permuted) Sylvester matrix is symmetric: its inverse is the same map, whatever the
    // flags say. The other types need the same flag on both sides.
    if q.inverse != k.inverse && kind != Kind::Hadamard {
        return Err(CheckpointError::Unsupported {
            field: format!("{field}.apply[{ki}].inverse"),
            reason: format!(
                "differs from {field}.apply[{qi}].inverse: q_attn and k_cache need the same matrix for the scores to be kept"
            ),
        });
    }
    let Some(block) = scheme.head_dim else {
        return Err(CheckpointError::Unsupported {
            field: format!("{field}.head_dim"),
            reason: "missing: compressed-tensors needs it for q_attn and k_cache".into(),
        });
    };
    if block == 0 || block > head_dim || !head_dim.is_multiple_of(block) {
        return Err(CheckpointError::HeadDimMismatch {
            field: format!("{field}.head_dim"),
            config: block,
            model: head_dim,
        });
    }
    if kind == Kind::Hadamard {
        // compressed-tensors' deterministic Hadamard is Sylvester's: powers of two only.
        let built = if options.extended_hadamard || block.is_power_of_two() {
            Rotation::hadamard(block).map(|_| ())
        } else {
            Err(rotq_reference::Error::InvalidParameter {
                name: "hadamard size",
                reason: format!(
                    "compressed-tensors builds `hadamard` at powers of two only, not {block} (CheckpointOptions::extended_hadamard builds rotq's m·2^k sizes)"
                ),
            })
        };
        built.map_err(|e| CheckpointError::Unsupported {
            field: format!("{field}.head_dim"),
            reason: e.to_string(),
        })?;
    }
    let selectors = |i: usize, a: &TransformArgs| -> Result<(Selector, Selector, String)> {
        let at = format!("{field}.apply[{i}]");
        Ok((
            Selector::new(&format!("{at}.targets"), &a.targets)?,
            Selector::new(&format!("{at}.ignore"), &a.ignore)?,
            at,
        ))
    };
    Ok(Some(AttentionSpec {
        name,
        kind,
        randomize: scheme.randomize,
        inverse: q.inverse,
        block,
        d: head_dim,
        q: selectors(qi, q)?,
        k: selectors(ki, k)?,
    }))
}

impl AttentionSpec<'_> {
    /// The layers whose attention module both the `q_attn` and the `k_cache` args select
    /// (matching.rs): a layer one selects and the other not is an error, and so is a target
    /// that matches no module.
    fn selected_layers(&self, modules: &Modules) -> Result<Vec<usize>> {
        for (targets, _, _) in [&self.q, &self.k] {
            targets.check_all_match(modules)?;
        }
        let picks = |(t, i, _): &(Selector, Selector, String), m: &str| {
            t.matches(m, true, modules) && !i.matches(m, true, modules)
        };
        let mut out = Vec::new();
        for (layer, m) in modules.attention.iter().enumerate() {
            match (picks(&self.q, m), picks(&self.k, m)) {
                (true, true) => out.push(layer),
                (false, false) => {}
                (q, _) => {
                    let (field, location, other) = if q {
                        (&self.q.2, "q_attn", "k_cache")
                    } else {
                        (&self.k.2, "k_cache", "q_attn")
                    };
                    return Err(CheckpointError::OneSided {
                        field: field.clone(),
                        module: m.clone(),
                        location,
                        other,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The rotation of `layer`'s heads: the transform of `head_dim` values, repeated along
    /// the head when it is smaller (compressed-tensors applies it block by block).
    fn rotation(&self, layer: usize, store: Option<&WeightStore>) -> Result<Rotation> {
        let r = self.block_rotation(layer, store)?;
        if self.block == self.d {
            return Ok(r);
        }
        if r == Rotation::hadamard(self.block).unwrap_or_else(|_| r.clone()) {
            if let Ok(b) = Rotation::block_hadamard(self.d, self.block) {
                return Ok(b);
            }
        }
        let m = r.to_matrix();
        let b = self.block;
        let full = Array2::from_shape_fn((self.d, self.d), |(i, j)| {
            if i / b == j / b {
                m[[i % b, j % b]]
            } else {
                0.0
            }
        });
        Rotation::matrix(full).map_err(|e| CheckpointError::Unsupported {
            field: format!("config_groups.{}.head_dim", self.name),
            reason: e.to_string(),
        })
    }

    fn suffix(&self, loc: TransformLocation, param: &str) -> String {
        format!(".{}_{}.{param}", self.name, loc.as_str())
    }

    /// The tensor for `layer`: its own (q_attn first), else the group's shared one (that of
    /// the lowest layer). Both of a layer's tensors are compared when present.
    fn tensor(
        &self,
        layer: usize,
        store: Option<&WeightStore>,
        param: &str,
    ) -> Result<Option<Loaded>> {
        let Some(store) = store else {
            return Ok(None);
        };
        let locs = [TransformLocation::QAttn, TransformLocation::KCache];
        let own: Vec<_> = locs
            .iter()
            .filter_map(|&l| store.find(&self.suffix(l, param), Some(layer)))
            .collect();
        let chosen = match own.as_slice() {
            [] => match locs
                .iter()
                .find_map(|&l| store.find(&self.suffix(l, param), None))
            {
                Some(t) => vec![t],
                None => return Ok(None),
            },
            _ => own,
        };
        let mut loaded = Vec::with_capacity(chosen.len());
        for t in chosen {
            loaded.push(store.load(t)?);
        }
        if let [(qn, qs, qv), (kn, ks, kv)] = loaded.as_slice() {
            let same = qs == ks
                && qv
                    .iter()
                    .zip(kv)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0));
            if !same {
                return Err(CheckpointError::BadTensor {
                    tensor: kn.clone(),
                    reason: format!("differs from {qn}: q_attn and k_cache need the same matrix"),
                });
            }
        }
        Ok(loaded.into_iter().next())
    }

    fn missing(&self, layer: usize, store: Option<&WeightStore>, param: &str) -> CheckpointError {
        let (field, what) = if param == "perm" {
            ("randomize", "a randomized Hadamard's permutation")
        } else {
            ("type", "this type's matrix")
        };
        CheckpointError::MissingWeights {
            field: format!("config_groups.{}.{field}", self.name),
            tensor: format!(
                "*layers.{layer}.*{}",
                self.suffix(TransformLocation::QAttn, param)
            ),
            reason: match store {
                None => format!("is not given ({what} is stored there)"),
                Some(s) => format!("is not in {}", s.describe()),
            },
        }
    }

    /// The transform of `head_dim` values of `layer`.
    fn block_rotation(&self, layer: usize, store: Option<&WeightStore>) -> Result<Rotation> {
        let d = self.block;
        let weight = self.tensor(layer, store, "weight")?;
        let perm = if self.kind != Kind::RandomMatrix && self.randomize {
            match self.tensor(layer, store, "perm")? {
                Some(p) => Some(p),
                None => return Err(self.missing(layer, store, "perm")),
            }
        } else {
            None
        };
        let (name, mut w) = match weight {
            Some((name, shape, values)) => {
                if shape != [d, d] {
                    return Err(CheckpointError::Shape {
                        tensor: name,
                        shape,
                        expected: vec![d, d],
                    });
                }
                let w = Array2::from_shape_vec((d, d), values).map_err(|e| {
                    CheckpointError::BadTensor {
                        tensor: name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                (name, w)
            }
            None if self.kind == Kind::Hadamard => {
                let h = Rotation::hadamard(d).map_err(|e| CheckpointError::Unsupported {
                    field: format!("config_groups.{}.head_dim", self.name),
                    reason: e.to_string(),
                })?;
                if perm.is_none() {
                    return Ok(h);
                }
                // Unscaled, as stored, so that the permuted matrix is scaled below.
                let m = h.to_matrix() * (d as f64).sqrt();
                ("hadamard".to_string(), m)
            }
            None => return Err(self.missing(layer, store, "weight")),
        };
        if let Some((pname, pshape, p)) = perm {
            w = permute(&w, &pname, &pshape, &p)?;
        }
        // The applied matrix A (value @ A), then R = Aᵀ.
        let a = match self.kind {
            Kind::RandomMatrix => w,
            _ => {
                let scaled = w / (d as f64).sqrt();
                if self.inverse {
                    scaled.reversed_axes()
                } else {
                    scaled
                }
            }
        };
        let r = a.reversed_axes().as_standard_layout().into_owned();
        if self.kind == Kind::Hadamard && !self.randomize {
            let h = Rotation::hadamard(d).map_err(|e| CheckpointError::Unsupported {
                field: format!("config_groups.{}.head_dim", self.name),
                reason: e.to_string(),
            })?;
            let hm = h.to_matrix();
            if hm.iter().zip(r.iter()).all(|(x, y)| (x - y).abs() <= 1e-6) {
                return Ok(h);
            }
        }
        let tolerance = store.map_or(rotq_reference::tolerance::ORTHOGONALITY_TOLERANCE, |s| {
            s.tolerance(&name)
        });
        Rotation::matrix_with_tolerance(r, tolerance).map_err(|e| CheckpointError::BadTensor {
            tensor: name,
            reason: if self.kind == Kind::RandomMatrix {
                format!(
                    "{e} (compressed-tensors' `random-matrix` draws uniform entries in [0, 1): \
                     not a rotation, so it changes every score and has no rotated-cache form)"
                )
            } else {
                e.to_string()
            },
        })
    }
}

/// `W[perm][:, perm]`, after checking that `p` is a permutation of `0..n`.
fn permute(w: &Array2<f64>, name: &str, shape: &[usize], p: &[f64]) -> Result<Array2<f64>> {
    let n = w.nrows();
    if shape != [n] {
        return Err(CheckpointError::Shape {
            tensor: name.to_string(),
            shape: shape.to_vec(),
            expected: vec![n],
        });
    }
    let mut seen = vec![false; n];
    let mut idx = Vec::with_capacity(n);
    for &v in p {
        let i = v as usize;
        if v < 0.0 || v.fract() != 0.0 || i >= n || seen[i] {
            return Err(CheckpointError::BadTensor {
                tensor: name.to_string(),
                reason: format!("not a permutation of 0..{n} (entry {v})"),
            });
        }
        seen[i] = true;
        idx.push(i);
    }
    Ok(Array2::from_shape_fn((n, n), |(i, j)| w[[idx[i], idx[j]]]))
}

/// The safetensors files of a checkpoint, headers read, data read on demand.
struct WeightStore {
    root: PathBuf,
    files: Vec<WeightFile>,
    /// The attention-transform tensors: (file index, name, layer).
    names: Vec<(usize, String, Option<usize>)>,
}

struct WeightFile {
    path: PathBuf,
    data_start: u64,
    file_len: u64,
    meta: Metadata,
}

/// A tensor found: file index and name.
type Found = (usize, String);

/// A tensor read: name, shape, values as f64.
type Loaded = (String, Vec<usize>, Vec<f64>);

/// The number after the last `layers` component of a tensor name.
fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .rev()
        .find(|w| w[0] == "layers")
        .and_then(|w| w[1].parse().ok())
}

impl WeightStore {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut paths = Vec::new();
        if path.is_dir() {
            for e in std::fs::read_dir(path).map_err(io)? {
                let p = e.map_err(io)?.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    paths.push(p);
                }
            }
            paths.sort();
        } else {
            paths.push(path.to_path_buf());
        }
        let files: Vec<WeightFile> = paths
            .into_iter()
            .map(WeightFile::open)
            .collect::<Result<_>>()?;
        let mut names = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            for name in f.meta.tensors().into_keys() {
                let module = name.rsplit('.').nth(1).unwrap_or("");
                if module.ends_with("_q_attn") || module.ends_with("_k_cache") {
                    let layer = layer_of(&name);
                    names.push((fi, name, layer));
                }
            }
        }
        // The lowest layer first, names without a layer last, then by name.
        names.sort_by(|a, b| (a.2.is_none(), a.2, &a.1).cmp(&(b.2.is_none(), b.2, &b.1)));
        Ok(Self {
            root: path.to_path_buf(),
            files,
            names,
        })
    }

    /// Every tensor name but the transforms' own (`…<group>_q_attn.weight`, …): the model's
    /// modules as compressed-tensors matched them, before it added its transforms.
    fn module_tensor_names(&self) -> Vec<String> {
        let locations = [
            "input",
            "weight_input",
            "weight_output",
            "output",
            "k_cache",
            "q_attn",
        ];
        self.files
            .iter()
            .flat_map(|f| f.meta.tensors().into_keys())
            .filter(|n| {
                let module = n.rsplit('.').nth(1).unwrap_or("");
                !locations.iter().any(|l| module.ends_with(&format!("_{l}")))
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} safetensors files)",
            self.root.display(),
            self.files.len()
        )
    }

    /// The tensor ending in `suffix` of this layer (`None`: of the lowest layer, or of none).
    fn find(&self, suffix: &str, layer: Option<usize>) -> Option<Found> {
        self.names
            .iter()
            .find(|(_, name, l)| name.ends_with(suffix) && (layer.is_none() || *l == layer))
            .map(|(fi, name, _)| (*fi, name.clone()))
    }

    /// The orthogonality tolerance for a tensor: the default, or what its storage rounding
    /// allows (`|R̂R̂ᵀ − I| ≤ 2u + u²` entrywise for rows of unit norm rounded with unit `u`).
    fn tolerance(&self, name: &str) -> f64 {
        let default = rotq_reference::tolerance::ORTHOGONALITY_TOLERANCE;
        let dtype = self
            .files
            .iter()
            .find_map(|f| f.meta.info(name).map(|i| i.dtype));
        let u: f64 = match dtype {
            Some(Dtype::F16) => 2f64.powi(-11),
            Some(Dtype::BF16) => 2f64.powi(-8),
            _ => 0.0,
        };
        default.max(2.5 * u)
    }

    /// The tensor's shape and values as f64.
    fn load(&self, (fi, name): Found) -> Result<Loaded> {
        let Some(f) = self.files.get(fi) else {
            return Err(CheckpointError::BadTensor {
                tensor: name,
                reason: "not in this checkpoint".into(),
            });
        };
        let (shape, values) = f.read(&name)?;
        Ok((name, shape, values))
    }
}

const MAX_HEADER: u64 = 100_000_000;

impl WeightFile {
    fn open(path: PathBuf) -> Result<Self> {
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let bad = |message: String| CheckpointError::Safetensors {
            path: path.clone(),
            message,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || n > file_len.saturating_sub(8) {
            return Err(bad(format!("header length {n} exceeds the file")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + n;
        if (meta.data_len() as u64) > file_len.saturating_sub(data_start) {
            return Err(bad(format!(
                "the header describes {} bytes of data, the file holds {}",
                meta.data_len(),
                file_len.saturating_sub(data_start)
            )));
        }
        Ok(Self {
            path,
            data_start,
            file_len,
            meta,
        })
    }

    fn read(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let Some(info) = self.meta.info(name) else {
            return Err(CheckpointError::BadTensor {
                tensor: name.to_string(),
                reason: format!("not in {}", self.path.display()),
            });
        };
        let (begin, end) = info.data_offsets;
        let width = match info.dtype {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(CheckpointError::Dtype {
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                    expected: "F64, F32, F16 or BF16 (I64 or I32 for a permutation)",
                })
            }
        };
        // The header was validated when parsed: offsets are contiguous and sized.
        let len = end.saturating_sub(begin);
        if self.data_start + end as u64 > self.file_len {
            return Err(CheckpointError::Safetensors {
                path: self.path.clone(),
                message: format!("tensor {name} extends past the end of the file"),
            });
        }
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.data_start + begin as u64))
            .map_err(io)?;
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes).map_err(io)?;
        let values = bytes
            .chunks_exact(width)
            .map(|c| match info.dtype {
                Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap_or_default()),
                Dtype::I64 => i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                Dtype::F32 => f64::from(f32::from_le_bytes(c.try_into().unwrap_or_default())),
                Dtype::I32 => f64::from(i32::from_le_bytes(c.try_into().unwrap_or_default())),
                Dtype::F16 => f64::from(half::f16::from_le_bytes([c[0], c[1]])),
                _ => f64::from(half::bf16::from_le_bytes([c[0], c[1]])),
            })
            .collect();
        Ok((info.shape.clone(), values))
    }
}
