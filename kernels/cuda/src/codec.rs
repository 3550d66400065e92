//! Fused rotate-quantize into a KV cache (contiguous or paged), and dequantize with the
//! inverse rotation, for every format of the registry.

use crate::device::Device;
use crate::error::{Context, Result};
use crate::kernel::{self, RowConfig, Transform};
use crate::rotation::{CudaRotation, GpuElement};
use cudarc::driver::{CudaSlice, PushKernelArg};
use rotq_reference::{Error, KvFormat, Rotation};

/// Where quantized rows go: rows of new tokens (token-major, `n_heads` rows each) land at
/// cache positions `start_pos ..`.
///
/// ```
/// let t = rotq_cuda::CacheTarget::contiguous(8, 100);
/// assert_eq!(t.start_pos, 100);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct CacheTarget<'a> {
    /// KV heads per token.
    pub n_heads: usize,
    /// The position of the first new token.
    pub start_pos: usize,
    /// `Some((table, page_tokens))`: position `p` lives in page `table[p / page_tokens]` at
    /// slot `p % page_tokens`; a page holds `page_tokens × n_heads` rows. `None`: position `p`
    /// is row block `p` of a contiguous cache.
    pub pages: Option<(&'a [u32], usize)>,
}

impl CacheTarget<'_> {
    /// A contiguous cache.
    pub fn contiguous(n_heads: usize, start_pos: usize) -> Self {
        Self {
            n_heads,
            start_pos,
            pages: None,
        }
    }
}

/// Rotate-quantize and dequantize for one format, row length and optional rotation.
///
/// ```no_run
/// use rotq_cuda::{CacheTarget, CudaCodec, Device};
/// use rotq_reference::{KvFormat, Rotation};
/// let dev = Device::open("cuda:0")?;
/// let codec = CudaCodec::new(&dev, KvFormat::Q4_0, 128, Some(&Rotation::hadamard(128)?))?;
/// let rows = dev.stream().clone_htod(&vec![half::f16::from_f32(0.5); 8 * 128]).unwrap();
/// let mut cache = dev.stream().alloc_zeros::<u8>(8 * codec.row_bytes()).unwrap();
/// codec.quantize(&dev, &rows, &mut cache, CacheTarget::contiguous(8, 0))?;
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct CudaCodec {
    format: KvFormat,
    dim: usize,
    row_bytes: usize,
    rotation: Option<CudaRotation>,
    identity: Transform,
    config: RowConfig,
}

impl CudaCodec {
    /// A codec for rows of `dim` values in `format`, rotated by `rotation` first.
    pub fn new(
        dev: &Device,
        format: KvFormat,
        dim: usize,
        rotation: Option<&Rotation>,
    ) -> Result<Self> {
        let row_bytes = format.row_bytes(dim)?;
        let rotation = match rotation {
            Some(r) if r.dim() != dim => {
                return Err(Error::LengthMismatch {
                    what: "rotation dimension",
                    expected: dim,
                    actual: r.dim(),
                }
                .into())
            }
            Some(r) => Some(CudaRotation::new(dev, r)?),
            None => None,
        };
        Ok(Self {
            format,
            dim,
            row_bytes,
            rotation,
            identity: Transform::identity(dim)?,
            config: RowConfig::codec_default(),
        })
    }

    /// The same codec with other tuning knobs.
    pub fn with_config(mut self, config: RowConfig) -> Self {
        self.config = config;
        self
    }

    /// Bytes of one cache row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    fn transform(&self) -> &Transform {
        self.rotation
            .as_ref()
            .map_or(&self.identity, |r| r.transform())
    }

    /// Rotates the rows of `input` and writes their blocks into `cache` at `target`.
    pub fn quantize<T: GpuElement>(
        &self,
        dev: &Device,
        input: &CudaSlice<T>,
        cache: &mut CudaSlice<u8>,
        target: CacheTarget<'_>,
    ) -> Result<()> {
        let n_rows = self.rows_of(input.len())?;
        let h = target.n_heads;
        if h == 0 || n_rows % h != 0 {
            return Err(Error::Shape(format!(
                "{n_rows} input rows are not whole tokens of {h} heads"
            ))
            .into());
        }
        let n_tokens = n_rows / h;
        let token_bytes = h * self.row_bytes;
        let end = target
            .start_pos
            .checked_add(n_tokens)
            .ok_or(Error::Overflow("cache position"))?;
        let stream = dev.stream();
        let (table, page_tokens) = match target.pages {
            None => {
                let needed = end
                    .checked_mul(token_bytes)
                    .ok_or(Error::Overflow("cache size"))?;
                if needed > cache.len() {
                    return Err(Error::LengthMismatch {
                        what: "KV cache bytes (at least) for the target positions",
                        expected: needed,
                        actual: cache.len(),
                    }
                    .into());
                }
                (None, 1usize)
            }
            Some((table, page_tokens)) => {
                if page_tokens == 0 {
                    return Err(Error::InvalidParameter {
                        name: "page_tokens",
                        reason: "a page holds at least one token".into(),
                    }
                    .into());
                }
                let n_pages = cache.len() / (page_tokens * token_bytes).max(1);
                let pages_used = if n_tokens == 0 {
                    0
                } else {
                    (end - 1) / page_tokens + 1
                };
                if pages_used > table.len() {
                    return Err(Error::LengthMismatch {
                        what: "block table entries (at least) for the target positions",
                        expected: pages_used,
                        actual: table.len(),
                    }
                    .into());
                }
                if let Some(bad) = table[target.start_pos / page_tokens..pages_used]
                    .iter()
                    .find(|&&p| p as usize >= n_pages)
                {
                    return Err(Error::InvalidParameter {
                        name: "block table",
                        reason: format!("page {bad} is outside the cache's {n_pages} pages"),
                    }
                    .into());
                }
                let t: Vec<i32> = table.iter().map(|&p| p as i32).collect();
                let t = stream
                    .clone_htod(&t)
                    .context(|| "uploading the block table".into())?;
                (Some(t), page_tokens)
            }
        };
        if n_rows == 0 {
            return Ok(());
        }
        let (signs, scale, rotate) = self.rotation_args(dev)?;
        let transform = self.transform();
        let g = kernel::geometry(transform, self.config, true, self.row_bytes, dev)?;
        let (key, src) = kernel::source(transform, g, T::ELEM, rotate, Some(self.format));
        let f = kernel::function(dev, &key, &src, "rotate_quantize", g)?;
        let cfg = kernel::launch_config(g, n_rows)?;
        let null_table;
        let table = match &table {
            Some(t) => t,
            None => {
                null_table = stream.null::<i32>().context(|| "a null pointer".into())?;
                &null_table
            }
        };
        let (rows, heads, start) = (n_rows as i64, h as i32, target.start_pos as i64);
        let page_tokens = i32::try_from(page_tokens).map_err(|_| Error::Overflow("page size"))?;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(input)
            .arg(&rows)
            .arg(&heads)
            .arg(&start)
            .arg(table)
            .arg(&page_tokens)
            .arg(cache)
            .arg(&signs)
            .arg(&scale);
        // SAFETY: the kernel reads `n_rows` rows of `dim` values of `input` and writes whole
        // rows of the cache at positions start_pos..end, each checked above to lie inside
        // `cache` (contiguous) or in a page of the table that lies inside `cache` (paged).
        unsafe { launch.launch(cfg) }
            .context(|| kernel::describe("rotate_quantize", &f, g, &key))?;
        Ok(())
    }

    /// Decodes the rows of `cache` (contiguous, whole rows) into `out`, rotating them back.
    pub fn dequantize<T: GpuElement>(
        &self,
        dev: &Device,
        cache: &CudaSlice<u8>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let n_rows = self.rows_of(out.len())?;
        if cache.len() != n_rows * self.row_bytes {
            return Err(Error::LengthMismatch {
                what: "cache bytes for the output rows",
                expected: n_rows * self.row_bytes,
                actual: cache.len(),
            }
            .into());
        }
        if n_rows == 0 {
            return Ok(());
        }
        let (signs, scale, rotate) = self.rotation_args(dev)?;
        let transform = self.transform();
        let g = kernel::geometry(transform, self.config, true, self.row_bytes, dev)?;
        let (key, src) = kernel::source(transform, g, T::ELEM, rotate, Some(self.format));
        let f = kernel::function(dev, &key, &src, "dequantize_rows", g)?;
        let cfg = kernel::launch_config(g, n_rows)?;
        let rows = n_rows as i64;
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(cache)
            .arg(&rows)
            .arg(out)
            .arg(&signs)
            .arg(&scale);
        // SAFETY: the kernel reads `n_rows` whole rows of `cache` (its length checked above)
        // and writes `n_rows` rows of `dim` values of `out`.
        unsafe { launch.launch(cfg) }
            .context(|| kernel::describe("dequantize_rows", &f, g, &key))?;
        Ok(())
    }

    fn rows_of(&self, len: usize) -> Result<usize> {
        if len % self.dim != 0 {
            return Err(Error::RowNotMultipleOfBlock {
                format: "codec rows",
                row_len: len,
                block: self.dim,
            }
            .into());
        }
        Ok(len / self.dim)
    }

    /// The signs buffer (a copy, or a null pointer), the scale and whether to rotate.
    fn rotation_args(&self, dev: &Device) -> Result<(CudaSlice<f32>, f32, bool)> {
        let stream = dev.stream();
        match &self.rotation {
            Some(r) => {
                let signs = match r.signs() {
                    Some(s) => s.try_clone().context(|| "sharing the signs".into())?,
                    None => stream.null::<f32>().context(|| "a null pointer".into())?,
                };
                Ok((signs, r.scale(), true))
            }
            None => Ok((
                stream.null::<f32>().context(|| "a null pointer".into())?,
                1.0,
                false,
            )),
        }
    }
}
