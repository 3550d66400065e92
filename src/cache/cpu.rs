//! The CPU side of [`super::RotatedKvCache`]: host buffers and the `rotq-cpu` kernels. The
//! facade checks every call and keeps the pages; this side reads and writes token slots.

use super::pages::{Move, Pages};
use super::CacheSpec;
use crate::reference::rope::Rope;
use crate::reference::{AttentionParams, Error as InputError, KvFormat};
use crate::Error;
use rotq_cpu::attention::MAX_HEAD_DIM;
use rotq_cpu::{CacheCodec, CpuAttention, Isa, KvCacheView};
use std::ops::Range;

/// K and V bytes in host memory, with their codecs and the attention kernels.
pub(super) struct CpuStore {
    n_heads: usize,
    k: Vec<u8>,
    v: Vec<u8>,
    k_codec: CacheCodec,
    v_codec: CacheCodec,
    attention: CpuAttention,
}

/// The buffers' lengths, not their bytes (a cache may hold gigabytes).
impl std::fmt::Debug for CpuStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuStore")
            .field("n_heads", &self.n_heads)
            .field("k_bytes", &self.k.len())
            .field("v_bytes", &self.v.len())
            .field("k_codec", &self.k_codec)
            .field("v_codec", &self.v_codec)
            .field("attention", &self.attention)
            .finish()
    }
}

// The hint below names the CPU kernels' limit.
const _: () = assert!(MAX_HEAD_DIM == 1 << 16);

/// Refuses a head dimension (K or V) over what the CPU attention kernels take.
fn check_head_dims(spec: &CacheSpec) -> Result<(), Error> {
    match [spec.head_dim, spec.v_dim]
        .into_iter()
        .find(|&d| d > MAX_HEAD_DIM)
    {
        Some(n) => Err(InputError::UnsupportedDim {
            n,
            what: "a KV cache head on the CPU",
            hint: "the CPU attention kernels take head dimensions from 1 to 65536",
        }
        .into()),
        None => Ok(()),
    }
}

impl CpuStore {
    /// Buffers of `rows` rows each, allocated up front: a capacity the machine cannot hold is
    /// an error, not an abort; so is a head dimension the attention kernels cannot take.
    pub(super) fn new(spec: &CacheSpec, rows: usize) -> Result<Self, Error> {
        check_head_dims(spec)?;
        let isa = Isa::best();
        let k_codec = CacheCodec::new(spec.k_format, spec.head_dim, spec.plan.qk.as_ref(), isa)?;
        let v_codec = CacheCodec::new(spec.v_format, spec.v_dim, spec.plan.v.as_ref(), isa)?;
        let buffer = |codec: &CacheCodec| -> Result<Vec<u8>, Error> {
            let bytes = rows
                .checked_mul(codec.row_bytes())
                .ok_or(InputError::Overflow("cache bytes"))?;
            let mut buf = Vec::new();
            buf.try_reserve_exact(bytes)
                .map_err(|e| InputError::InvalidParameter {
                    name: "capacity",
                    reason: format!("{bytes} bytes of cache cannot be allocated: {e}"),
                })?;
            buf.resize(bytes, 0);
            Ok(buf)
        };
        Ok(Self {
            n_heads: spec.n_heads,
            k: buffer(&k_codec)?,
            v: buffer(&v_codec)?,
            attention: CpuAttention::new(&spec.plan, isa),
            k_codec,
            v_codec,
        })
    }

    /// Bytes of one token's K rows and V rows.
    fn token_bytes(&self) -> (usize, usize) {
        (
            self.n_heads * self.k_codec.row_bytes(),
            self.n_heads * self.v_codec.row_bytes(),
        )
    }

    /// The K and V bytes of token slots `slots`.
    pub(super) fn read(&self, slots: Range<usize>) -> (&[u8], &[u8]) {
        let (kt, vt) = self.token_bytes();
        (
            &self.k[slots.start * kt..slots.end * kt],
            &self.v[slots.start * vt..slots.end * vt],
        )
    }

    /// Rotates and quantizes `k` and `v` (whole tokens that fit, at least one) into the slots
    /// of `tokens`: one codec call per page.
    pub(super) fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        pages: &Pages,
        tokens: Range<usize>,
    ) -> Result<(), Error> {
        let (kt, vt) = (k.len() / tokens.len(), v.len() / tokens.len());
        for run in pages.runs(tokens.clone()) {
            let (at, row) = (run.token - tokens.start, run.slot * self.n_heads);
            let span = |per: usize| at * per..(at + run.len) * per;
            self.k_codec.quantize(&k[span(kt)], &mut self.k, row)?;
            self.v_codec.quantize(&v[span(vt)], &mut self.v, row)?;
        }
        Ok(())
    }

    /// Attention of checked queries over the first `len` tokens, read in place (through the
    /// block table when paged).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention<'a>(
        &'a self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
        spec: &CacheSpec,
        pages: &'a Pages,
        len: usize,
    ) -> Result<Vec<f32>, Error> {
        let (h, (kt, vt)) = (spec.n_heads, self.token_bytes());
        let view =
            |format: KvFormat, buf: &'a [u8], token_bytes: usize, dim: usize| match pages.paged() {
                None => KvCacheView::new(format, &buf[..len * token_bytes], len, h, dim),
                Some((table, pt)) => KvCacheView::paged(format, buf, table, pt, len, h, dim),
            };
        let k = view(spec.k_format, &self.k, kt, spec.head_dim)?;
        let v = view(spec.v_format, &self.v, vt, spec.v_dim)?;
        Ok(self.attention.run(q, n_q, h_q, &k, &v, params)?)
    }

    /// The context shift of the keys of `tokens` (a checked range), page by page.
    pub(super) fn shift(
        &mut self,
        pages: &Pages,
        tokens: Range<usize>,
        delta: i64,
        rope: &Rope,
    ) -> Result<(), Error> {
        let (kt, _) = self.token_bytes();
        for run in pages.runs(tokens) {
            let keys = &mut self.k[run.slot * kt..(run.slot + run.len) * kt];
            self.k_codec.shift(keys, rope, delta)?;
        }
        Ok(())
    }

    /// Copies token slots as `moves` say, in order.
    pub(super) fn remove(&mut self, moves: &[Move]) {
        let (kt, vt) = self.token_bytes();
        for (buf, tb) in [(&mut self.k, kt), (&mut self.v, vt)] {
            for m in moves {
                buf.copy_within(m.from * tb..(m.from + m.len) * tb, m.to * tb);
            }
        }
    }
}
