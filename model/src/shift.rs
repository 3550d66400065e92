//! A context shift on a real model, checked against recomputing the cache. A text longer
//! than the context runs as llama.cpp's main loop runs it: batches of tokens are appended
//! until the next batch would not fit; then the first `keep` tokens stay, half of the rest is
//! dropped ([`RotatedKvCache::remove`]) and the remainder moves back by as many positions
//! ([`RotatedKvCache::shift`]: the cached keys turn by the RoPE angle of the move, inside the
//! cache's rotation, and are quantized again). The tokens after the first shift are scored,
//! until the next shift; the same tokens are then scored by a run that computes a fresh cache
//! from the tokens the shifted cache holds, at the same positions. In one layer the two agree
//! up to the requantization; deeper, the kept tokens' keys and values were computed with the
//! dropped tokens in their context and a recomputed cache's were not, so the two differ even on
//! an f32 cache: that floor (the f32 cache's figure) is what a shift costs the model, and a
//! cache format or rotation is judged by what it adds to it. A wrong shift (another RoPE
//! pairing, say) adds far more.
//!
//! ```
//! use rotq::cache::CacheSpec;
//! use rotq_model::llama::{Config, Llama};
//! use rotq_model::shift::{compare, ShiftOptions};
//! let config = Config { n_layers: 1, dim: 64, ffn_dim: 64, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 32, vocab: 40, ..Config::default() };
//! let model = Llama::random(config, 1)?;
//! let tokens: Vec<u32> = (0..44).map(|i| (i * 7) % 40).collect();
//! let opts = ShiftOptions { ctx: 32, keep: 4, batch: 8, rope: None };
//! let r = compare(&model, &tokens, &CacheSpec::default(), &opts)?;
//! assert_eq!((r.scored, r.dropped), (11, 14)); // tokens 33..44, after 14 were dropped
//! assert!((r.ppl_shifted / r.ppl_recomputed - 1.0).abs() < 0.01);
//! # Ok::<(), rotq_model::Error>(())
//! ```

use rotq::cache::{CacheSpec, RotatedKvCache};
use rotq::reference::rope::Rope;
use serde::Serialize;

use crate::llama::Llama;
use crate::perplexity::{ChunkLogProbs, Tally};
use crate::Error;

/// How the context is shifted.
#[derive(Clone, Debug)]
pub struct ShiftOptions {
    /// Tokens the cache holds.
    pub ctx: usize,
    /// First tokens never dropped (llama.cpp's `n_keep`).
    pub keep: usize,
    /// Tokens per forward pass.
    pub batch: usize,
    /// The RoPE the shift applies (`None`: the model's own; another one is a wrong shift,
    /// for tests).
    pub rope: Option<Rope>,
}

impl ShiftOptions {
    /// Checks that a shift leaves room for two batches after the kept tokens (`keep + 2 ×
    /// batch ≤ ctx`, without overflow) and that the batch is not empty.
    ///
    /// ```
    /// use rotq_model::shift::ShiftOptions;
    /// assert!(ShiftOptions { ctx: 32, keep: 4, batch: 8, rope: None }.check().is_ok());
    /// assert!(ShiftOptions { ctx: 32, keep: usize::MAX, batch: 8, rope: None }.check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), Error> {
        let Self {
            ctx, keep, batch, ..
        } = *self;
        let fits = batch
            .checked_mul(2)
            .and_then(|b| b.checked_add(keep))
            .is_some_and(|need| need <= ctx);
        if batch == 0 || !fits {
            return Err(Error::Shape(format!(
                "a shift needs a batch > 0 and keep + 2 batches <= ctx: ctx {ctx}, keep {keep}, \
                 batch {batch}"
            )));
        }
        Ok(())
    }
}

/// The two runs' scores on the tokens after the first shift.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ShiftReport {
    /// Tokens scored.
    pub scored: usize,
    /// Perplexity with the shifted cache.
    pub ppl_shifted: f64,
    /// Perplexity with the cache recomputed at the shifted positions.
    pub ppl_recomputed: f64,
    /// Mean token KL divergence of the shifted run from the recomputed one.
    pub kld_mean: f64,
    /// Tokens dropped by the shift.
    pub dropped: usize,
}

/// Runs `tokens` with a context shift on caches of `spec` and against a recomputed cache
/// (see the module docs). The text must be long enough for a shift and a batch after it.
pub fn compare(
    model: &Llama,
    tokens: &[u32],
    spec: &CacheSpec,
    opts: &ShiftOptions,
) -> Result<ShiftReport, Error> {
    opts.check()?;
    let ShiftOptions {
        ctx, keep, batch, ..
    } = *opts;
    if tokens.len() <= ctx {
        return Err(Error::Shape(format!(
            "a shift needs more tokens than ctx: ctx {ctx}, {} tokens",
            tokens.len()
        )));
    }
    let rope = opts.rope.unwrap_or_else(|| model.config.rope());
    let mut caches = model.caches(spec, ctx)?;
    // The tokens the caches hold, in order.
    let mut held: Vec<u32> = Vec::new();
    let mut at = 0;
    // After the first shift: the recomputed run's caches, and both runs' scores.
    let mut fresh: Option<Vec<RotatedKvCache>> = None;
    let (mut shifted, mut recomputed) = (Vec::new(), Vec::new());
    let mut targets = Vec::new();
    let mut dropped = 0;
    while at + 1 < tokens.len() {
        let piece = &tokens[at..(at + batch).min(tokens.len() - 1)];
        if held.len() + piece.len() > ctx {
            if fresh.is_some() {
                break; // the second shift: the comparison ends here
            }
            let discard = (held.len() - keep) / 2;
            for cache in caches.iter_mut() {
                cache.remove(keep..keep + discard)?;
                cache.shift(keep..held.len() - discard, -(discard as i64), &rope)?;
            }
            held.drain(keep..keep + discard);
            dropped = discard;
            let mut f = model.caches(spec, ctx)?;
            for part in held.chunks(batch) {
                model.forward(part, &mut f, None)?;
            }
            fresh = Some(f);
        }
        let logits = model.forward(piece, &mut caches, None)?;
        if let Some(f) = fresh.as_mut() {
            shifted.extend(logits);
            recomputed.extend(model.forward(piece, f, None)?);
            targets.extend_from_slice(&tokens[at + 1..at + 1 + piece.len()]);
        }
        held.extend_from_slice(piece);
        at += piece.len();
    }
    if targets.is_empty() {
        return Err(Error::Shape("no token was scored after the shift".into()));
    }
    let vocab = model.config.vocab;
    let log_probs = |mut l: Vec<f32>| {
        l.chunks_mut(vocab).for_each(crate::perplexity::log_softmax);
        ChunkLogProbs {
            log_probs: l,
            targets: targets.clone(),
            vocab,
        }
    };
    let (a, b) = (log_probs(shifted), log_probs(recomputed));
    let (mut ta, mut tb) = (Tally::default(), Tally::default());
    ta.add(&b, &a)?;
    tb.add(&b, &b)?;
    let (sa, sb) = (ta.summary(None), tb.summary(None));
    Ok(ShiftReport {
        scored: targets.len(),
        ppl_shifted: sa.ppl,
        ppl_recomputed: sb.ppl,
        kld_mean: sa.kld_mean,
        dropped,
    })
}
