//! Which attention modules a transform's `targets` and `ignore` select, by compressed-tensors'
//! rules (`compressed_tensors.utils.match`, 0.18.0), on module names taken from a checkpoint's
//! tensor names:
//!
//! * an entry `re:PATTERN` matches a module whose full name matches the Python regex at its
//!   start (`re.match`: anchored at the start only, so `re:.*self_attn` also matches
//!   `…self_attn_x`; published configs end their patterns in `$`). The pattern is compiled by
//!   the `regex` crate: Python syntax it does not have (look-around, back-references) is an
//!   error naming the field, never a silently different match;
//! * any other entry matches a module of exactly that name, or a module of that class: the
//!   class of the attention modules is the model's (`LlamaForCausalLM` → `LlamaAttention`, from
//!   `config.json`'s `architectures`), and `Module` matches every module;
//! * a module that a target matches and an `ignore` entry matches is left out (ignore wins);
//! * an entry that matches no module of the checkpoint is an error naming it (compressed-tensors
//!   says nothing and rotates nothing there; a misspelt target would leave a model silently
//!   unrotated).

use super::{CheckpointError, Result};
use regex::Regex;
use std::collections::BTreeSet;

/// The modules of a model as far as a transform config can name them.
#[derive(Debug)]
pub(super) struct Modules {
    /// Every module name: the proper dot-prefixes of the tensor names.
    pub all: BTreeSet<String>,
    /// The attention module of each decoder layer, by layer.
    pub attention: Vec<String>,
    /// The attention modules' class (`LlamaAttention`), if `config.json` names the model's.
    pub attention_class: Option<String>,
}

impl Modules {
    /// The modules of a checkpoint with `n_layers` decoder layers whose tensors are `names`:
    /// the attention module of layer `i` is the parent of its `k_proj` (under a
    /// `….layers.<i>` module); a checkpoint with attention under several stacks of layers
    /// (a vision tower beside the decoder) takes the stack of `n_layers` layers.
    pub fn from_tensor_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
        n_layers: usize,
        attention_class: Option<String>,
    ) -> Result<Self> {
        let mut all = BTreeSet::new();
        // (stack prefix, layer, attention module)
        let mut found: Vec<(String, usize, String)> = Vec::new();
        for name in names {
            let parts: Vec<&str> = name.split('.').collect();
            for i in 1..parts.len() {
                all.insert(parts[..i].join("."));
            }
            if parts.len() >= 4 && parts[parts.len() - 2] == "k_proj" {
                let module = parts[..parts.len() - 2].join(".");
                if let Some(at) = parts[..parts.len() - 2]
                    .iter()
                    .rposition(|p| *p == "layers")
                    .filter(|&at| at + 1 < parts.len() - 2)
                {
                    if let Ok(layer) = parts[at + 1].parse::<usize>() {
                        found.push((parts[..at].join("."), layer, module));
                    }
                }
            }
        }
        let mut stacks: BTreeSet<&str> = found.iter().map(|(p, _, _)| p.as_str()).collect();
        if stacks.len() > 1 {
            stacks.retain(|s| {
                let layers: BTreeSet<usize> = found
                    .iter()
                    .filter(|(p, _, _)| p == s)
                    .map(|(_, l, _)| *l)
                    .collect();
                layers.len() == n_layers
            });
        }
        let stack = match stacks.len() {
            // No attention weights (a file of the transforms alone, a shard): Llama's names.
            0 if n_layers > 0 => return Ok(Self::llama(n_layers, attention_class)),
            0 => String::new(),
            1 => stacks.into_iter().next().unwrap_or_default().to_string(),
            _ => {
                return Err(CheckpointError::Unsupported {
                    field: "tensor names".into(),
                    reason: format!(
                        "attention modules under several stacks of {n_layers} layers ({}): which is the decoder is ambiguous",
                        stacks.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                })
            }
        };
        let mut attention = vec![String::new(); n_layers];
        for (p, layer, module) in found {
            if p == stack {
                if let Some(slot) = attention.get_mut(layer) {
                    *slot = module;
                }
            }
        }
        if let Some(layer) = attention.iter().position(String::is_empty) {
            return Err(CheckpointError::Unsupported {
                field: "tensor names".into(),
                reason: format!(
                    "layer {layer} of {n_layers} has no attention module under `{stack}`"
                ),
            });
        }
        Ok(Self {
            all,
            attention,
            attention_class,
        })
    }

    /// A Llama-style model's modules (`model.layers.<i>.self_attn`), for a config read
    /// without its checkpoint's weights.
    pub fn llama(n_layers: usize, attention_class: Option<String>) -> Self {
        let attention: Vec<String> = (0..n_layers)
            .map(|i| format!("model.layers.{i}.self_attn"))
            .collect();
        let mut all: BTreeSet<String> = ["model", "model.layers"].map(String::from).into();
        for (i, a) in attention.iter().enumerate() {
            all.insert(format!("model.layers.{i}"));
            all.insert(a.clone());
        }
        Self {
            all,
            attention,
            attention_class,
        }
    }
}

/// The attention class of a model from its `architectures` entry (`LlamaForCausalLM` →
/// `LlamaAttention`, as transformers names them).
pub(super) fn attention_class(architecture: &str) -> Option<String> {
    ["ForCausalLM", "ForConditionalGeneration", "Model"]
        .iter()
        .find_map(|s| architecture.strip_suffix(s))
        .filter(|base| !base.is_empty())
        .map(|base| format!("{base}Attention"))
}

/// One `targets` or `ignore` entry.
#[derive(Debug)]
enum Entry {
    Regex(Regex),
    Name(String),
}

/// A compiled `targets` or `ignore` list, its field named for errors.
#[derive(Debug)]
pub(super) struct Selector {
    entries: Vec<(String, Entry)>,
}

impl Selector {
    /// Compiles `list` (the config's strings) for `field`.
    pub fn new(field: &str, list: &[String]) -> Result<Self> {
        let mut entries = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let entry = match s.strip_prefix("re:") {
                Some(p) => Entry::Regex(Regex::new(&format!("^(?:{p})")).map_err(|e| {
                    CheckpointError::BadRegex {
                        field: format!("{field}[{i}]"),
                        pattern: p.to_string(),
                        message: e.to_string(),
                    }
                })?),
                None => Entry::Name(s.clone()),
            };
            entries.push((format!("{field}[{i}]"), entry));
        }
        Ok(Self { entries })
    }

    fn entry_matches(entry: &Entry, module: &str, attention: bool, m: &Modules) -> bool {
        match entry {
            Entry::Regex(re) => re.is_match(module),
            Entry::Name(n) => {
                n == module
                    || n == "Module"
                    || (attention && m.attention_class.as_deref() == Some(n.as_str()))
            }
        }
    }

    /// Whether an entry selects `module` (an attention module when `attention`).
    pub fn matches(&self, module: &str, attention: bool, m: &Modules) -> bool {
        self.entries
            .iter()
            .any(|(_, e)| Self::entry_matches(e, module, attention, m))
    }

    /// Refuses an entry that matches no module of the model.
    pub fn check_all_match(&self, m: &Modules) -> Result<()> {
        for (field, e) in &self.entries {
            let hit = m
                .attention
                .iter()
                .any(|a| Self::entry_matches(e, a, true, m))
                || m.all.iter().any(|a| Self::entry_matches(e, a, false, m));
            if !hit {
                let value = match e {
                    Entry::Regex(re) => format!("re:{}", &re.as_str()[4..re.as_str().len() - 1]),
                    Entry::Name(n) => n.clone(),
                };
                return Err(CheckpointError::NoMatch {
                    field: field.clone(),
                    value,
                    class: m.attention_class.clone(),
                });
            }
        }
        Ok(())
    }
}
