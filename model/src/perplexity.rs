//! Perplexity and token-level KL divergence of a model run on a quantized cache, the way
//! llama.cpp's `llama-perplexity` scores them: the text is cut into chunks of `ctx` tokens,
//! each chunk runs in a fresh context (positions `0..ctx`), and only the second half of each
//! chunk is scored (token `j + 1` from the logits at `j`, for `ctx/2 ≤ j < ctx − 1`), so that
//! every scored token sees at least half a context. The chunk's prefill goes through the
//! caches in pieces of `batch` tokens, as an engine's does.
//!
//! The KL divergence of a run is taken against a baseline run's distributions at the same
//! tokens (`KL(baseline ‖ run)`, as `llama-perplexity --kl-divergence` does), and the top-1
//! agreement counts the tokens where both runs' most likely tokens are the same.
//!
//! ```
//! use rotq::cache::CacheSpec;
//! use rotq_model::llama::{Config, Llama};
//! use rotq_model::perplexity::{chunk_log_probs, Tally};
//! let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 32, vocab: 40, ..Config::default() };
//! let model = Llama::random(config, 1)?;
//! let chunk: Vec<u32> = (0..16).collect();
//! let base = chunk_log_probs(&model, &chunk, &CacheSpec::default(), 4)?;
//! let mut tally = Tally::default();
//! tally.add(&base, &base)?;
//! let s = tally.summary(None);
//! assert_eq!(s.tokens, 7); // positions 8..15 predict tokens 9..16
//! assert!(s.kld_max.abs() < 1e-9 && s.top1 == 1.0);
//! # Ok::<(), rotq_model::Error>(())
//! ```

use rayon::prelude::*;
use rotq::cache::{Backend, CacheSpec};
use serde::Serialize;

use crate::llama::Llama;
use crate::Error;

/// The log-probabilities a run gave at a chunk's scored positions, and the tokens that came.
#[derive(Clone, Debug)]
pub struct ChunkLogProbs {
    /// `[scored, vocab]`: `ln p(token | context)` at each scored position.
    pub log_probs: Vec<f32>,
    /// The token that came next at each scored position.
    pub targets: Vec<u32>,
    /// Vocabulary size (the rows' length).
    pub vocab: usize,
}

impl ChunkLogProbs {
    /// Scored positions.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether no position was scored.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.log_probs[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Runs `chunk` (at positions `0..chunk.len()`) through fresh caches of `spec`, prefilling
/// `batch` tokens per forward pass, and keeps the log-probabilities of the scored second
/// half (see the module docs).
pub fn chunk_log_probs(
    model: &Llama,
    chunk: &[u32],
    spec: &CacheSpec,
    batch: usize,
) -> Result<ChunkLogProbs, Error> {
    chunk_log_probs_on(model, chunk, spec, batch, &Backend::Cpu)
}

/// [`chunk_log_probs`] with the caches on `backend`.
pub fn chunk_log_probs_on(
    model: &Llama,
    chunk: &[u32],
    spec: &CacheSpec,
    batch: usize,
    backend: &Backend,
) -> Result<ChunkLogProbs, Error> {
    if chunk.len() < 4 || batch == 0 {
        return Err(Error::Shape(format!(
            "a chunk of {} tokens in batches of {batch}: at least 4 tokens and a positive batch",
            chunk.len()
        )));
    }
    let vocab = model.config.vocab;
    let first = chunk.len() / 2;
    let mut caches = model.caches_on(spec, chunk.len(), backend)?;
    let mut log_probs = Vec::with_capacity((chunk.len() - 1 - first) * vocab);
    let mut at = 0;
    for piece in chunk.chunks(batch) {
        // Rows of this piece that are scored: positions first..len-1; their logits only.
        let lo = first.max(at).min(at + piece.len());
        let hi = (chunk.len() - 1).min(at + piece.len()).max(lo);
        let logits = model.forward_from(piece, &mut caches, None, lo - at)?;
        let rows = &logits[..(hi - lo) * vocab];
        let start = log_probs.len();
        log_probs.extend_from_slice(rows);
        log_probs[start..]
            .par_chunks_mut(vocab)
            .for_each(log_softmax);
        at += piece.len();
    }
    Ok(ChunkLogProbs {
        log_probs,
        targets: chunk[first + 1..].to_vec(),
        vocab,
    })
}

/// `x ← x − log Σ exp x`, summed in f64.
pub(crate) fn log_softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    for v in x {
        *v = (f64::from(*v) - lse) as f32;
    }
}

/// Running totals of one configuration's scores over chunks.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Each scored token's negative log-likelihood, in order.
    nll: Vec<f64>,
    kld: Vec<f64>,
    top1_same: usize,
}

/// A configuration's scores over all chunks.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// Scored tokens.
    pub tokens: usize,
    /// Perplexity, `exp(mean NLL)`.
    pub ppl: f64,
    /// Perplexity relative to the baseline's, minus one (`None` when there is no baseline
    /// to compare with).
    pub delta_ppl: Option<f64>,
    /// The standard error of `delta_ppl` from the token-by-token differences of the
    /// log-likelihoods (what a ± on it means: a gap smaller than twice this is noise).
    pub delta_ppl_se: Option<f64>,
    /// Mean token KL divergence from the baseline.
    pub kld_mean: f64,
    /// 99th percentile of the token KL divergences.
    pub kld_p99: f64,
    /// Largest token KL divergence.
    pub kld_max: f64,
    /// Share of tokens whose most likely next token is the baseline's.
    pub top1: f64,
}

impl Tally {
    /// Adds a chunk of `run` scored against the same chunk of `baseline` (an error if they
    /// scored different tokens).
    pub fn add(&mut self, baseline: &ChunkLogProbs, run: &ChunkLogProbs) -> Result<(), Error> {
        if baseline.targets != run.targets || baseline.vocab != run.vocab {
            return Err(Error::Shape(
                "runs of different chunks compared (other tokens or vocabulary)".into(),
            ));
        }
        for (i, &t) in run.targets.iter().enumerate() {
            let (p, q) = (baseline.row(i), run.row(i));
            self.nll.push(-f64::from(q[t as usize]));
            let kld: f64 = p
                .iter()
                .zip(q)
                .map(|(&lp, &lq)| {
                    let lp = f64::from(lp);
                    lp.exp() * (lp - f64::from(lq))
                })
                .sum();
            // Rounding can make a KL divergence of equal rows a hair negative; a NaN (a run
            // that broke) stays NaN, and a row with a NaN never counts as agreeing.
            self.kld.push(if kld < 0.0 { 0.0 } else { kld });
            let finite = |r: &[f32]| r.iter().all(|x| !x.is_nan());
            self.top1_same += usize::from(finite(p) && finite(q) && argmax(p) == argmax(q));
        }
        Ok(())
    }

    /// The scores so far; `baseline`, a tally of the same tokens, gives
    /// [`Summary::delta_ppl`] and its standard error.
    pub fn summary(&self, baseline: Option<&Tally>) -> Summary {
        let n = self.kld.len();
        let mut sorted = self.kld.clone();
        sorted.sort_by(f64::total_cmp);
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let ppl = mean(&self.nll).exp();
        let p99 = if n == 0 {
            0.0
        } else {
            sorted[((n - 1) as f64 * 0.99).round() as usize]
        };
        let delta = baseline.filter(|b| b.nll.len() == n && n > 1).map(|b| {
            let d: Vec<f64> = self.nll.iter().zip(&b.nll).map(|(a, b)| a - b).collect();
            let m = mean(&d);
            let var = d.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
            // ppl / ppl_base = exp(mean d); its error by the delta method.
            (m.exp() - 1.0, m.exp() * (var / n as f64).sqrt())
        });
        Summary {
            tokens: n,
            ppl,
            delta_ppl: delta.map(|d| d.0),
            delta_ppl_se: delta.map(|d| d.1),
            kld_mean: mean(&sorted),
            kld_p99: p99,
            kld_max: sorted.last().copied().unwrap_or(0.0),
            top1: self.top1_same as f64 / n.max(1) as f64,
        }
    }
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}
