//! The CPU side of [`super::RotatedKvCache`]: a [`KvPool`] in host memory (the batch API's
//! pool, its codecs and kernels: one implementation) whose pages the cache's block table
//! names. The facade checks every call and keeps the pages; this side reads and writes token
//! slots.

use super::pages::{Move, Pages};
use super::CacheSpec;
use crate::pool::{KvPool, PoolSpec};
use crate::reference::rope::Rope;
use crate::reference::{AttentionParams, Error as InputError, KvFormat};
use crate::Error;
use rotq_cpu::attention::MAX_HEAD_DIM;
use rotq_cpu::KvCacheView;
use std::ops::Range;

/// K and V bytes in host memory: one pool of the cache's pages.
#[derive(Debug)]
pub(super) struct CpuStore {
    pool: KvPool,
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
    /// A pool of the cache's pages, allocated up front: a capacity the machine cannot hold is
    /// an error, not an abort; so is a head dimension the attention kernels cannot take.
    pub(super) fn new(spec: &CacheSpec, pages: &Pages) -> Result<Self, Error> {
        check_head_dims(spec)?;
        let pool = KvPool::new(PoolSpec {
            k_format: spec.k_format,
            v_format: spec.v_format,
            plan: spec.plan.clone(),
            n_kv_heads: spec.n_heads,
            head_dim: spec.head_dim,
            v_dim: spec.v_dim,
            n_pages: pages.slots() / pages.page_tokens(),
            page_tokens: pages.page_tokens(),
            query: spec.query,
        })
        .map_err(|e| match e {
            Error::Reference(InputError::InvalidParameter {
                name: "n_pages",
                reason,
            }) => InputError::InvalidParameter {
                name: "capacity",
                reason,
            }
            .into(),
            other => other,
        })?;
        Ok(Self { pool })
    }

    /// The K and V bytes of token slots `slots`.
    pub(super) fn read(&self, slots: Range<usize>) -> (&[u8], &[u8]) {
        let (kt, vt) = self.pool.token_bytes();
        (
            &self.pool.k()[slots.start * kt..slots.end * kt],
            &self.pool.v()[slots.start * vt..slots.end * vt],
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
            let at = run.token - tokens.start;
            let span = |per: usize| at * per..(at + run.len) * per;
            self.pool.write_run(run.slot, &k[span(kt)], &v[span(vt)])?;
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
        let (h, (kt, vt)) = (spec.n_heads, self.pool.token_bytes());
        let view =
            |format: KvFormat, buf: &'a [u8], token_bytes: usize, dim: usize| match pages.paged() {
                None => KvCacheView::new(format, &buf[..len * token_bytes], len, h, dim),
                Some((table, pt)) => KvCacheView::paged(format, buf, table, pt, len, h, dim),
            };
        let k = view(spec.k_format, self.pool.k(), kt, spec.head_dim)?;
        let v = view(spec.v_format, self.pool.v(), vt, spec.v_dim)?;
        Ok(self.pool.kernels().run(q, n_q, h_q, &k, &v, params)?)
    }

    /// The context shift of the keys of `tokens` (a checked range), page by page.
    pub(super) fn shift(
        &mut self,
        pages: &Pages,
        tokens: Range<usize>,
        delta: i64,
        rope: &Rope,
    ) -> Result<(), Error> {
        for run in pages.runs(tokens) {
            self.pool.shift_run(run.slot, run.len, delta, rope)?;
        }
        Ok(())
    }

    /// Copies token slots as `moves` say, in order.
    pub(super) fn remove(&mut self, moves: &[Move]) {
        for m in moves {
            self.pool.move_run(m.from, m.to, m.len);
        }
    }
}
