//! The rotation rotq picks when the engine does not pick one, and the switch that turns it
//! off.
//!
//! `ROTQ_DISABLE_ROTATION=1` (any value but empty or `0`) is rotq's twin of llama.cpp's
//! `LLAMA_ATTN_ROT_DISABLE`: a user's way to rule out the rotation when a model misbehaves,
//! without rebuilding the engine. It is honoured where the engine leaves the choice to rotq
//! (the C ABI's default rotation, [`plan`]); a [`RotationPlan`] the engine builds itself,
//! [`RotationPlan::none`] included, is never overridden. `rotq info` reports it.

use crate::reference::{Rotation, RotationPlan};
use crate::Error;

/// The environment variable of the switch.
pub const DISABLE_ROTATION: &str = "ROTQ_DISABLE_ROTATION";

/// Whether the environment turns the default rotation off ([`DISABLE_ROTATION`] set to
/// anything but empty or `0`).
///
/// ```
/// // The switch is read on every call (engines read it once, at start-up, in practice).
/// let off = rotq::defaults::rotation_disabled();
/// assert_eq!(off, std::env::var("ROTQ_DISABLE_ROTATION").is_ok_and(|v| !v.is_empty() && v != "0"));
/// ```
pub fn rotation_disabled() -> bool {
    disabled_by(std::env::var(DISABLE_ROTATION).ok().as_deref())
}

/// The switch's reading of a value of the variable (`None`: unset).
fn disabled_by(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

/// The default plan for heads of `head_dim` (K) and `v_dim` (V) values: the Hadamard
/// transform on Q and K (the rotation both seed engines ship), V unrotated; no rotation when
/// [`rotation_disabled`]. A head dimension the Hadamard cannot take is an error.
///
/// ```
/// let plan = rotq::defaults::plan(128, 128)?;
/// if !rotq::defaults::rotation_disabled() {
///     assert!(plan.qk.is_some() && plan.v.is_none());
/// }
/// # Ok::<(), rotq::Error>(())
/// ```
pub fn plan(head_dim: usize, v_dim: usize) -> Result<RotationPlan, Error> {
    plan_when(rotation_disabled(), head_dim, v_dim)
}

fn plan_when(disabled: bool, head_dim: usize, v_dim: usize) -> Result<RotationPlan, Error> {
    let plan = if disabled {
        RotationPlan::none()
    } else {
        RotationPlan {
            qk: Some(Rotation::hadamard(head_dim)?),
            v: None,
        }
    };
    plan.check_dims(head_dim, v_dim)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_reads_like_llama_cpps() {
        for (value, off) in [
            (None, false),
            (Some(""), false),
            (Some("0"), false),
            (Some(" 0 "), false),
            (Some("1"), true),
            (Some("yes"), true),
        ] {
            assert_eq!(disabled_by(value), off, "{value:?}");
        }
        assert!(plan_when(true, 128, 128).unwrap().qk.is_none());
        assert!(plan_when(false, 128, 128).unwrap().qk.is_some());
        assert!(plan_when(false, 96, 96).is_ok()); // 96 = 12 · 8: Hadamard of 12
        assert!(plan_when(false, 7, 7).is_err());
        assert!(plan_when(true, 7, 7).is_ok());
    }
}
