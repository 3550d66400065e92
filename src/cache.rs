//! One layer's rotated, quantized KV cache on the CPU, as an engine drives it: append keys and
//! values (rotated and quantized in one pass), run attention over the cache (prefill or
//! decode), move tokens' positions (context shift) and drop tokens.
//!
//! The bytes are the registry's formats, row `(token, head)` at `(token · n_heads + head) ·
//! row_bytes`, so an engine can also hand them to the CUDA kernels or write them out. The
//! kernels pick their tuned configurations from the tuning cache on their own.
//!
//! ```
//! use rotq::cache::{CacheSpec, RotatedKvCache};
//! use rotq::{AttentionParams, KvFormat, Rotation, RotationPlan};
//! let spec = CacheSpec {
//!     k_format: KvFormat::Q4_0,
//!     v_format: KvFormat::Q8_0,
//!     plan: RotationPlan { qk: Some(Rotation::hadamard(64)?), v: None },
//!     n_heads: 2,
//!     head_dim: 64,
//!     v_dim: 64,
//!     capacity: 100,
//! };
//! let mut cache = RotatedKvCache::new(spec)?;
//! let rows = |n: usize, s: f32| (0..n * 2 * 64).map(|i| ((i as f32) * s).sin()).collect::<Vec<_>>();
//! cache.append(&rows(10, 0.1), &rows(10, 0.2))?; // a 10-token prompt
//! let q = rows(1, 0.3); // one decode query of 2 heads (MHA here)
//! let params = AttentionParams { causal: true, pos_offset: 10, ..Default::default() };
//! let out = cache.attention(&q, 1, 2, &params)?;
//! assert_eq!(out.len(), 2 * 64);
//! # Ok::<(), rotq::reference::Error>(())
//! ```

use crate::reference::rope::Rope;
use crate::reference::{AttentionParams, Error, KvFormat, Result, RotationPlan};
use rotq_cpu::{CacheCodec, CpuAttention, Isa, KvCacheView};
use std::ops::Range;

/// What a layer's cache holds and how much.
///
/// ```
/// use rotq::cache::CacheSpec;
/// use rotq::{KvFormat, RotationPlan};
/// let spec = CacheSpec { k_format: KvFormat::Q8_0, v_format: KvFormat::Q8_0,
///     plan: RotationPlan::none(), n_heads: 8, head_dim: 128, v_dim: 128, capacity: 4096 };
/// assert_eq!(spec.capacity, 4096);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    /// Format of the K rows.
    pub k_format: KvFormat,
    /// Format of the V rows.
    pub v_format: KvFormat,
    /// Rotations: `qk` of Q and K, `v` of V (undone on the output by the attention).
    pub plan: RotationPlan,
    /// KV heads per token.
    pub n_heads: usize,
    /// Values per K row.
    pub head_dim: usize,
    /// Values per V row.
    pub v_dim: usize,
    /// Tokens the cache can hold (its buffers are allocated once, up front).
    pub capacity: usize,
}

/// One layer's K and V caches (see the module docs).
#[derive(Debug)]
pub struct RotatedKvCache {
    spec: CacheSpec,
    k: Vec<u8>,
    v: Vec<u8>,
    len: usize,
    k_codec: CacheCodec,
    v_codec: CacheCodec,
    attention: CpuAttention,
}

impl RotatedKvCache {
    /// An empty cache; an unsupported format, dimension or plan is an error.
    pub fn new(spec: CacheSpec) -> Result<Self> {
        spec.plan.check_dims(spec.head_dim, spec.v_dim)?;
        if spec.n_heads == 0 {
            return Err(Error::InvalidParameter {
                name: "n_heads",
                reason: "a cache needs at least one KV head".into(),
            });
        }
        let isa = Isa::best();
        let k_codec = CacheCodec::new(spec.k_format, spec.head_dim, spec.plan.qk.as_ref(), isa)?;
        let v_codec = CacheCodec::new(spec.v_format, spec.v_dim, spec.plan.v.as_ref(), isa)?;
        let rows = spec
            .capacity
            .checked_mul(spec.n_heads)
            .ok_or(Error::Overflow("cache rows"))?;
        // Allocated up front; a capacity the machine cannot hold is an error, not an abort.
        let buffer = |codec: &CacheCodec| -> Result<Vec<u8>> {
            let bytes = rows
                .checked_mul(codec.row_bytes())
                .ok_or(Error::Overflow("cache bytes"))?;
            let mut buf = Vec::new();
            buf.try_reserve_exact(bytes)
                .map_err(|e| Error::InvalidParameter {
                    name: "capacity",
                    reason: format!("{bytes} bytes of cache cannot be allocated: {e}"),
                })?;
            buf.resize(bytes, 0);
            Ok(buf)
        };
        let (k, v) = (buffer(&k_codec)?, buffer(&v_codec)?);
        let attention = CpuAttention::new(&spec.plan, isa);
        Ok(Self {
            spec,
            k,
            v,
            len: 0,
            k_codec,
            v_codec,
            attention,
        })
    }

    /// What the cache holds.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The K and V bytes of the tokens held (rows `(token, head)` in order).
    pub fn bytes(&self) -> (&[u8], &[u8]) {
        let rows = self.len * self.spec.n_heads;
        (
            &self.k[..rows * self.k_codec.row_bytes()],
            &self.v[..rows * self.v_codec.row_bytes()],
        )
    }

    /// Appends the keys `k` (`[n, n_heads, head_dim]`, unrotated) and values `v`
    /// (`[n, n_heads, v_dim]`) of `n` tokens at the end, rotating and quantizing each row in
    /// one pass. Shapes that disagree or a full cache are errors, and nothing is written.
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        let (h, d, dv) = (self.spec.n_heads, self.spec.head_dim, self.spec.v_dim);
        if !k.len().is_multiple_of(h * d) {
            return Err(Error::Shape(format!(
                "keys of {} values are not whole tokens of {h} heads x {d}",
                k.len()
            )));
        }
        let n = k.len() / (h * d);
        if v.len() != n * h * dv {
            return Err(Error::Shape(format!(
                "{n} tokens of keys but {} values of V (want {})",
                v.len(),
                n * h * dv
            )));
        }
        if n > self.spec.capacity - self.len {
            return Err(Error::InvalidParameter {
                name: "append",
                reason: format!(
                    "{n} tokens do not fit: {} held of a capacity of {}",
                    self.len, self.spec.capacity
                ),
            });
        }
        self.k_codec.quantize(k, &mut self.k, self.len * h)?;
        self.v_codec.quantize(v, &mut self.v, self.len * h)?;
        self.len += n;
        Ok(())
    }

    /// Attention of `n_q` query rows (`q` is `[n_q, h_q, head_dim]`, unrotated; `h_q` a
    /// multiple of the KV heads: GQA/MQA) against every token held; the first query sits at
    /// `params.pos_offset` (prefill: the prompt's first position; decode: the newest token's).
    /// Returns `[n_q, h_q, v_dim]`.
    pub fn attention(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
    ) -> Result<Vec<f32>> {
        let (k, v) = self.bytes();
        let (h, d, dv) = (self.spec.n_heads, self.spec.head_dim, self.spec.v_dim);
        let k = KvCacheView::new(self.spec.k_format, k, self.len, h, d)?;
        let v = KvCacheView::new(self.spec.v_format, v, self.len, h, dv)?;
        self.attention.run(q, n_q, h_q, &k, &v, params)
    }

    /// Context shift: the keys of `tokens` move by `delta` positions under `rope` (the cache's
    /// K rotation undone and redone around the RoPE turn, then re-quantized; see
    /// [`crate::reference::rope::shift_cache`]). V does not depend on the position.
    pub fn shift(&mut self, tokens: Range<usize>, delta: i64, rope: &Rope) -> Result<()> {
        self.check_range(&tokens)?;
        let rb = self.k_codec.row_bytes() * self.spec.n_heads;
        self.k_codec
            .shift(&mut self.k[tokens.start * rb..tokens.end * rb], rope, delta)
    }

    /// Drops `tokens`, moving the later ones down (their bytes, unchanged). An engine that
    /// keeps positions contiguous then shifts the moved keys by `-(tokens.len())`.
    pub fn remove(&mut self, tokens: Range<usize>) -> Result<()> {
        self.check_range(&tokens)?;
        let h = self.spec.n_heads;
        for (buf, rb) in [
            (&mut self.k, self.k_codec.row_bytes() * h),
            (&mut self.v, self.v_codec.row_bytes() * h),
        ] {
            buf.copy_within(tokens.end * rb..self.len * rb, tokens.start * rb);
        }
        self.len -= tokens.len();
        Ok(())
    }

    fn check_range(&self, tokens: &Range<usize>) -> Result<()> {
        if tokens.start > tokens.end || tokens.end > self.len {
            return Err(Error::InvalidParameter {
                name: "tokens",
                reason: format!("{tokens:?} is not a range of the {} tokens held", self.len),
            });
        }
        Ok(())
    }
}
