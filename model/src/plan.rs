//! The rotation plans an engine can pick for its cache, by name: a Q/K rotation (`none`,
//! `hadamard`, `randomized[:SEED]`, `block:B` for Hadamard blocks of B as llama.cpp's
//! scheme with B = 64), optionally followed by `+v:B`, V rotated by Hadamard blocks of B (the
//! attention output is rotated back). `v:B` alone rotates V only.
//!
//! ```
//! use rotq_model::plan::Plan;
//! let p: Plan = "hadamard+v:32".parse()?;
//! assert_eq!(p.to_string(), "hadamard+v:32");
//! let plan = p.build(64)?;
//! assert!(plan.qk.is_some() && plan.v.is_some());
//! assert!("hadamard+v".parse::<Plan>().is_err());
//! # Ok::<(), rotq_model::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use rotq::{Rotation, RotationPlan, RotationSpec};

use crate::Error;

/// The seed `randomized` takes when none is named.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// A named rotation plan (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Rotation of Q and K.
    pub qk: RotationSpec,
    /// Hadamard block size of the V rotation, if V is rotated.
    pub v_block: Option<usize>,
}

impl Plan {
    /// The plans `rotq eval --model` runs by default: none, each Q/K rotation, and V in blocks
    /// of 32 and 64 on top of the Hadamard.
    pub fn defaults() -> Vec<Plan> {
        [
            "none",
            "hadamard",
            "randomized",
            "block:32",
            "hadamard+v:32",
            "hadamard+v:64",
        ]
        .iter()
        .map(|s| s.parse().expect("the default plans parse"))
        .collect()
    }

    /// The rotations for heads of `head_dim` values (an error when a block does not divide
    /// the head or the head cannot be rotated).
    pub fn build(&self, head_dim: usize) -> Result<RotationPlan, Error> {
        let named = |e: rotq::reference::Error| {
            Error::Shape(format!("plan {self} for heads of {head_dim}: {e}"))
        };
        let qk = self.qk.build(head_dim).map_err(named)?;
        let v = match self.v_block {
            None => None,
            Some(b) => Some(Rotation::block_hadamard(head_dim, b).map_err(named)?),
        };
        Ok(RotationPlan { qk, v })
    }

    /// Whether Q and K are rotated.
    pub fn rotates_qk(&self) -> bool {
        self.qk != RotationSpec::None
    }
}

impl FromStr for Plan {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::Shape(format!(
                "plan {s:?}: {why} (plans: none, hadamard, randomized[:SEED], block:B, each \
                 optionally +v:B; or v:B)"
            ))
        };
        let (qk, v) = match s.split_once('+') {
            Some((qk, v)) => (qk, Some(v)),
            None if s.starts_with("v:") => ("none", Some(s)),
            None => (s, None),
        };
        let qk = match qk {
            "randomized" => RotationSpec::Randomized(DEFAULT_SEED),
            other => other.parse().map_err(|_| bad("unknown Q/K rotation"))?,
        };
        let v_block = match v {
            None => None,
            Some(v) => {
                let b = v.strip_prefix("v:").ok_or_else(|| bad("V takes v:B"))?;
                Some(b.parse().map_err(|_| bad("V's block is not a number"))?)
            }
        };
        Ok(Self { qk, v_block })
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let qk = match self.qk {
            RotationSpec::Randomized(DEFAULT_SEED) => "randomized".to_string(),
            other => other.to_string(),
        };
        match (self.qk, self.v_block) {
            (RotationSpec::None, Some(b)) => write!(f, "v:{b}"),
            (_, Some(b)) => write!(f, "{qk}+v:{b}"),
            (_, None) => write!(f, "{qk}"),
        }
    }
}
