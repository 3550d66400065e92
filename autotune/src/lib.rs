//! `rotq-autotune`: picks each kernel's configuration per device and shape bucket, safely.
//!
//! A kernel takes part by implementing [`Tunable`]: its default configuration, its candidates
//! for a shape, a run on a gate problem (compared with the oracle) and a timed run. [`tune`]
//! walks the candidates until the time budget runs out: first the kernel's leads
//! ([`Tunable::leads`], configurations that won on devices measured before), then the rest: all
//! of them, in order, when there are at most [`EXHAUSTIVE`]; otherwise in a fixed pseudo-random
//! order (a random search, so that a budget too small for the whole space still samples all of
//! it evenly). Candidates left when the budget runs out are reported as untried. Each candidate
//! is:
//!
//! 1. **gates** every candidate: its output on the gate problem must match the oracle within
//!    the tolerance table, else it is rejected and reported with the mismatch, never chosen;
//! 2. **times** the default and each gated candidate ([`timing`]): a warm-up, then the median
//!    of several samples, each sample enough calls to last a few milliseconds, read from the
//!    clock the caller gives (the wall clock on the CPU, CUDA events on a GPU, a fake clock
//!    in tests); the spread (interquartile range over the median) is kept with the median;
//! 3. **keeps the default** unless the fastest candidate still beats it when the two are timed
//!    again, alternately, over five rounds: the median of the per-round time ratios must be
//!    below 1 by more than their interquartile range (and 2%). Picking the fastest of many
//!    noisy timings flatters the winner; the paired rounds are what decide.
//!
//! Results go to the tuning cache ([`cache`] writes it; its schema is `rotq_reference::tuned`).

pub mod cache;
pub mod cpu;
pub mod cuda;
pub mod timing;

use rotq_reference::rotation::SplitMix64;
use serde::Serialize;
use std::fmt::Debug;
use std::time::Duration;
pub use timing::{Clock, Timing, TimingPlan};

/// Spaces up to this size are searched exhaustively in order; larger ones at random.
pub const EXHAUSTIVE: usize = 32;

/// A kernel the autotuner can tune at one shape.
pub trait Tunable {
    /// The kernel's configuration type.
    type Config: Clone + Debug + PartialEq + Serialize;
    /// The kernel's name in the cache (`fwht_f32`, `decode_attention_q4_0`, …).
    fn kernel(&self) -> String;
    /// The shape bucket (see `rotq_reference::tuned::bucket`).
    fn bucket(&self) -> String;
    /// The configuration the kernel uses untuned.
    fn default_config(&self) -> Self::Config;
    /// The candidates, in the order to try them.
    fn candidates(&self) -> Vec<Self::Config>;
    /// Candidates to try before the others, in this order: configurations that won on devices
    /// measured before, so that a budget too small for a large space still reaches them.
    /// Leads that are not candidates (or are the default) are ignored. Default: none.
    fn leads(&self) -> Vec<Self::Config> {
        Vec::new()
    }
    /// Runs `config` on the gate problem; `Err` describes how it disagrees with the oracle.
    fn gate(&mut self, config: &Self::Config) -> Result<(), String>;
    /// One call with `config` on the timed problem; `i` counts the calls, so that the kernel
    /// can alternate between input buffers. On a GPU the call is only launched: the tuner's
    /// clock (CUDA events on the kernel's stream) times the device's work.
    fn run(&mut self, config: &Self::Config, i: usize) -> Result<(), String>;
}

/// An error as the tuner reports it.
pub(crate) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The timing of `config` on `t`, on `clock`.
fn measure<T: Tunable, C: Clock>(
    t: &mut T,
    clock: &mut C,
    config: &T::Config,
    plan: TimingPlan,
) -> Result<Timing, String> {
    timing::time(clock, plan, |i| t.run(config, i)).map_err(|e| e.to_string())
}

/// A candidate the gate rejected, and why.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct Rejected<C> {
    /// The candidate.
    pub config: C,
    /// How its output disagreed with the oracle.
    pub reason: String,
}

/// What tuning one kernel at one bucket found.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize)]
pub struct Outcome<C> {
    /// The kernel.
    pub kernel: String,
    /// The bucket.
    pub bucket: String,
    /// The default configuration's timing.
    pub default: Timing,
    /// The chosen configuration (the default unless one beat it beyond the noise).
    pub chosen: C,
    /// The chosen configuration's timing.
    pub chosen_timing: Timing,
    /// Candidates that passed the gate and were timed.
    pub tried: usize,
    /// Candidates the gate rejected.
    pub rejected: Vec<Rejected<C>>,
    /// Candidates left when the budget ran out.
    pub untried: usize,
}

impl<C> Outcome<C> {
    /// Default time over chosen time.
    pub fn speedup(&self) -> f64 {
        self.default.median_ms / self.chosen_timing.median_ms
    }
}

/// Tunes `t` within `budget` of `clock`'s time (see the crate docs), timing on `clock`;
/// `progress` hears each step.
///
/// The default must pass the gate itself, and run: a kernel whose default disagrees with the
/// oracle or fails is an error, not something to tune around. A candidate that fails when
/// timed is rejected with the reason.
pub fn tune<T: Tunable, C: Clock>(
    t: &mut T,
    clock: &mut C,
    budget: Duration,
    plan: TimingPlan,
    mut progress: impl FnMut(&str),
) -> Result<Outcome<T::Config>, String> {
    let start = clock.elapsed();
    let default_config = t.default_config();
    t.gate(&default_config).map_err(|e| {
        format!(
            "{} {}: the default fails the gate: {e}",
            t.kernel(),
            t.bucket()
        )
    })?;
    let default = measure(t, clock, &default_config, plan)
        .map_err(|e| format!("{} {}: the default fails: {e}", t.kernel(), t.bucket()))?;
    let mut best = (default_config.clone(), default);
    let mut out = Outcome {
        kernel: t.kernel(),
        bucket: t.bucket(),
        default,
        chosen: default_config.clone(),
        chosen_timing: default,
        tried: 0,
        rejected: Vec::new(),
        untried: 0,
    };
    let mut candidates: Vec<T::Config> = t
        .candidates()
        .into_iter()
        .filter(|c| *c != default_config)
        .collect();
    if candidates.len() > EXHAUSTIVE {
        // Fisher–Yates with a fixed seed: reproducible, and even over the space.
        let mut g = SplitMix64::new(0x5eed);
        for i in (1..candidates.len()).rev() {
            let j = (g.next_u64() % (i as u64 + 1)) as usize;
            candidates.swap(i, j);
        }
    }
    // The leads first, in their order.
    let mut order: Vec<T::Config> = Vec::with_capacity(candidates.len());
    for lead in t.leads() {
        if candidates.contains(&lead) && !order.contains(&lead) {
            order.push(lead);
        }
    }
    candidates.retain(|c| !order.contains(c));
    order.append(&mut candidates);
    let candidates = order;
    for (i, c) in candidates.iter().enumerate() {
        if clock.elapsed().saturating_sub(start) > budget {
            out.untried = candidates.len() - i;
            break;
        }
        if let Err(reason) = t.gate(c) {
            progress(&format!("rejected {c:?}: {reason}"));
            out.rejected.push(Rejected {
                config: c.clone(),
                reason,
            });
            continue;
        }
        let timing = match measure(t, clock, c, plan) {
            Ok(timing) => timing,
            Err(e) => {
                let reason = format!("failed when timed: {e}");
                progress(&format!("rejected {c:?}: {reason}"));
                out.rejected.push(Rejected {
                    config: c.clone(),
                    reason,
                });
                continue;
            }
        };
        out.tried += 1;
        if timing.median_ms < best.1.median_ms {
            best = (c.clone(), timing);
        }
        progress(&format!(
            "{}/{} best x{:.2}",
            i + 1,
            candidates.len(),
            default.median_ms / best.1.median_ms
        ));
    }
    if best.0 == default_config {
        return Ok(out);
    }
    // The fastest of many noisy timings is flattered (the winner's curse): time the default
    // and the best again, alternately, and keep the best only if it wins beyond the noise of
    // those paired rounds.
    progress("confirming the best against the default");
    let rounds = 5;
    let (mut d, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let half = TimingPlan {
        samples: plan.samples.div_ceil(2),
        ..plan
    };
    for _ in 0..rounds {
        let pair = measure(t, clock, &default_config, half)
            .and_then(|td| Ok((td, measure(t, clock, &best.0, half)?)));
        let (td, tb) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                // Not confirmed: the default stays.
                progress(&format!("keeping the default: re-timing failed: {e}"));
                return Ok(out);
            }
        };
        ratios.push(tb.median_ms / td.median_ms);
        d.push(td.median_ms);
        b.push(tb.median_ms);
    }
    let [r1, ratio, r3] = timing::quartiles(ratios);
    let noise = (r3 - r1).max(0.02);
    if ratio < 1.0 - noise {
        out.default = Timing {
            median_ms: timing::quartiles(d)[1],
            spread: default.spread,
        };
        out.chosen = best.0;
        out.chosen_timing = Timing {
            median_ms: timing::quartiles(b)[1],
            spread: best.1.spread,
        };
    }
    Ok(out)
}
