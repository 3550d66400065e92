//! The CUDA side of [`super::RotatedKvCache`]: device buffers and the `rotq-cuda` kernels,
//! which read and write a paged cache through its block table. Every call is checked by the
//! facade first (which keeps the pages); the kernels check again before any launch.

use super::pages::{Move, Pages};
use super::CacheSpec;
use crate::reference::rope::Rope;
use crate::reference::{AttentionParams, Error as InputError};
use crate::Error;
use cudarc::driver::sys::cudaError_enum;
use cudarc::driver::{CudaSlice, DriverError};
use rotq_cuda::{
    CacheLayout, CacheTarget, CudaAttention, CudaCodec, CudaError, CudaKvCache, DecodeSeq, Device,
    GpuElement,
};
use std::ops::Range;
use std::sync::Arc;

/// The most bytes [`move_tokens`] moves through its temporary buffer at a time.
const MOVE_CHUNK: usize = 16 << 20;

/// K and V bytes in device memory (the CPU layout: token slots of `n_heads` rows), with their
/// codecs and the attention kernels, all on one device.
#[derive(Debug)]
pub(super) struct CudaStore {
    dev: Arc<Device>,
    n_heads: usize,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    k_codec: CudaCodec,
    v_codec: CudaCodec,
    attention: CudaAttention,
}

/// Refuses a head dimension (K or V) the CUDA attention kernels cannot take, as they would at
/// the first attention call.
fn check_head_dims(spec: &CacheSpec) -> Result<(), Error> {
    rotq_cuda::check_format(spec.k_format, spec.head_dim)?;
    rotq_cuda::check_format(spec.v_format, spec.v_dim)?;
    rotq_cuda::check_head_dim(spec.head_dim, "a KV cache's K head on CUDA")?;
    rotq_cuda::check_head_dim(spec.v_dim, "a KV cache's V head on CUDA")?;
    Ok(())
}

impl CudaStore {
    /// Buffers of `rows` rows each, zeroed, in device memory; a head dimension the attention
    /// kernels cannot take is an error.
    pub(super) fn new(dev: Arc<Device>, spec: &CacheSpec, rows: usize) -> Result<Self, Error> {
        check_head_dims(spec)?;
        let k_codec = CudaCodec::new(&dev, spec.k_format, spec.head_dim, spec.plan.qk.as_ref())
            .map_err(cuda)?;
        let v_codec =
            CudaCodec::new(&dev, spec.v_format, spec.v_dim, spec.plan.v.as_ref()).map_err(cuda)?;
        let attention = CudaAttention::new(&dev, &spec.plan).map_err(cuda)?;
        let buffer = |codec: &CudaCodec| -> Result<CudaSlice<u8>, Error> {
            let bytes = rows
                .checked_mul(codec.row_bytes())
                .ok_or(InputError::Overflow("cache bytes"))?;
            // At least one byte: CUDA refuses empty allocations.
            dev.stream()
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(driver("allocating the KV cache"))
        };
        Ok(Self {
            k: buffer(&k_codec)?,
            v: buffer(&v_codec)?,
            dev,
            n_heads: spec.n_heads,
            k_codec,
            v_codec,
            attention,
        })
    }

    /// The K and V buffers.
    pub(super) fn pool(&self) -> (&CudaSlice<u8>, &CudaSlice<u8>) {
        (&self.k, &self.v)
    }

    /// Bytes of one token's K rows and V rows.
    fn token_bytes(&self) -> (usize, usize) {
        (
            self.n_heads * self.k_codec.row_bytes(),
            self.n_heads * self.v_codec.row_bytes(),
        )
    }

    /// A copy of the K and V bytes of token slots `slots`.
    pub(super) fn read(&self, slots: Range<usize>) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let copy = |buf: &CudaSlice<u8>, token_bytes: usize| -> Result<Vec<u8>, Error> {
            if slots.is_empty() {
                return Ok(Vec::new());
            }
            self.dev
                .stream()
                .clone_dtoh(&buf.slice(slots.start * token_bytes..slots.end * token_bytes))
                .map_err(driver("copying the KV cache to the host"))
        };
        let (kt, vt) = self.token_bytes();
        Ok((copy(&self.k, kt)?, copy(&self.v, vt)?))
    }

    /// Where the kernels write tokens from `start` (through the table when paged).
    fn target<'a>(&self, pages: &'a Pages, start: usize) -> CacheTarget<'a> {
        CacheTarget {
            n_heads: self.n_heads,
            start_pos: start,
            pages: pages.paged(),
        }
    }

    /// Uploads host rows (whole tokens that fit, at least one) and appends them as `tokens`.
    pub(super) fn append_host(
        &mut self,
        k: &[f32],
        v: &[f32],
        pages: &Pages,
        tokens: Range<usize>,
    ) -> Result<(), Error> {
        let stream = self.dev.stream();
        let upload = |x: &[f32]| {
            stream
                .clone_htod(x)
                .map_err(driver("uploading K and V rows"))
        };
        let (k, v) = (upload(k)?, upload(v)?);
        self.append(&k, &v, pages, tokens)
    }

    /// Rotates and quantizes device rows (whole tokens that fit, at least one) into the slots
    /// of `tokens`: one kernel for K, one for V (through the block table when paged).
    pub(super) fn append<T: GpuElement>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        pages: &Pages,
        tokens: Range<usize>,
    ) -> Result<(), Error> {
        let target = self.target(pages, tokens.start);
        for (codec, rows, cache) in [
            (&self.k_codec, k, &mut self.k),
            (&self.v_codec, v, &mut self.v),
        ] {
            codec
                .quantize(&self.dev, rows, cache, target)
                .map_err(cuda)?;
        }
        Ok(())
    }

    /// Attention of checked host queries (at least one row) over the first `len` tokens (at
    /// least one).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_host(
        &self,
        q: &[f32],
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
        spec: &CacheSpec,
        pages: &Pages,
        len: usize,
    ) -> Result<Vec<f32>, Error> {
        let stream = self.dev.stream();
        let q = stream
            .clone_htod(q)
            .map_err(driver("uploading the queries"))?;
        let mut out = stream
            .alloc_zeros::<f32>(n_q * h_q * spec.v_dim)
            .map_err(driver("allocating the attention output"))?;
        self.attention(&q, n_q, h_q, params, &mut out, spec, pages, len)?;
        stream
            .clone_dtoh(&out)
            .map_err(driver("copying the attention output to the host"))
    }

    /// Attention of checked device queries over the first `len` tokens into `out` (of the
    /// checked length): the decode kernel for one row, the prefill kernels for several, both
    /// reading a paged cache through its block table.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention<T: GpuElement>(
        &self,
        q: &CudaSlice<T>,
        n_q: usize,
        h_q: usize,
        params: &AttentionParams,
        out: &mut CudaSlice<T>,
        spec: &CacheSpec,
        pages: &Pages,
        len: usize,
    ) -> Result<(), Error> {
        if n_q == 0 {
            return Ok(());
        }
        if len == 0 {
            // No token to see: every row is zeros, as on the CPU.
            return self
                .dev
                .stream()
                .memset_zeros(out)
                .map_err(driver("clearing the attention output"));
        }
        let layout = match pages.paged() {
            None => CacheLayout::Contiguous {
                tokens_per_seq: pages.slots(),
            },
            Some((table, page_tokens)) => CacheLayout::Paged {
                table,
                pages_per_seq: table.len(),
                page_tokens,
            },
        };
        let k = CudaKvCache {
            format: spec.k_format,
            bytes: &self.k,
            n_heads: spec.n_heads,
            dim: spec.head_dim,
            layout,
        };
        let v = CudaKvCache {
            format: spec.v_format,
            bytes: &self.v,
            dim: spec.v_dim,
            ..k
        };
        let dev = &self.dev;
        let done = if n_q == 1 {
            // Decode takes the query's position per sequence.
            let seq = [DecodeSeq {
                n_tokens: len,
                pos: params.pos_offset,
            }];
            let params = AttentionParams {
                pos_offset: 0,
                ..params.clone()
            };
            self.attention
                .decode(dev, q, h_q, &k, &v, &seq, &params, out)
        } else {
            self.attention
                .prefill(dev, q, n_q, h_q, &k, &v, len, params, out)
        };
        done.map_err(cuda)
    }

    /// The context shift of the keys of `tokens` (a checked range), in place: one kernel
    /// (through the block table when paged).
    pub(super) fn shift(
        &mut self,
        pages: &Pages,
        tokens: Range<usize>,
        delta: i64,
        rope: &Rope,
    ) -> Result<(), Error> {
        let target = self.target(pages, tokens.start);
        self.k_codec
            .shift(&self.dev, &mut self.k, target, tokens.len(), rope, delta)
            .map_err(cuda)
    }

    /// Copies token slots as `moves` say, in order, on the device.
    pub(super) fn remove(&mut self, moves: &[Move]) -> Result<(), Error> {
        let (kt, vt) = self.token_bytes();
        move_tokens(&self.dev, &mut self.k, moves, kt)?;
        move_tokens(&self.dev, &mut self.v, moves, vt)
    }
}

/// Copies token slots of `token_bytes` bytes in `buf` as `moves` say, in order, each through a
/// temporary buffer of at most [`MOVE_CHUNK`] bytes, chunk by chunk from the front (right for
/// disjoint spans and for moves down).
fn move_tokens(
    dev: &Device,
    buf: &mut CudaSlice<u8>,
    moves: &[Move],
    token_bytes: usize,
) -> Result<(), Error> {
    let longest = moves.iter().map(|m| m.len).max().unwrap_or(0) * token_bytes;
    if longest == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let what = "moving cached tokens";
    let mut temp = stream
        .alloc_zeros::<u8>(longest.min(MOVE_CHUNK))
        .map_err(driver(what))?;
    for m in moves {
        let (from, to, len) = (
            m.from * token_bytes,
            m.to * token_bytes,
            m.len * token_bytes,
        );
        let mut done = 0;
        while done < len {
            let n = (len - done).min(temp.len());
            let (src, dst) = (from + done, to + done);
            stream
                .memcpy_dtod(&buf.slice(src..src + n), &mut temp.slice_mut(..n))
                .map_err(driver(what))?;
            stream
                .memcpy_dtod(&temp.slice(..n), &mut buf.slice_mut(dst..dst + n))
                .map_err(driver(what))?;
            done += n;
        }
    }
    Ok(())
}

/// A CUDA error as the facade's: bad input as [`Error::Reference`] (as on the CPU), the rest
/// as [`Error::Cuda`].
fn cuda(e: CudaError) -> Error {
    match e {
        CudaError::Input(e) => Error::Reference(e),
        other => Error::Cuda(other),
    }
}

/// A failed driver call while doing `what`, out-of-memory singled out.
fn driver(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |source| {
        Error::Cuda(if source.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory { what: what.into() }
        } else {
            CudaError::Driver {
                what: what.into(),
                source,
            }
        })
    }
}
