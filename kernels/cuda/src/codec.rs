//! Fused rotate-quantize into a KV cache (contiguous or paged), and dequantize with the
//! inverse rotation, for every format of the registry.

use crate::batch::{DeviceBuf, DeviceStream};
use crate::device::Device;
use crate::error::{Context, CudaError, Result};
use crate::kernel::{self, RowConfig, Transform};
use crate::rotation::{CudaRotation, GpuElement};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use rotq_reference::rope::{Rope, RopeVariant};
use rotq_reference::{Error, KvFormat, Rotation};
use std::sync::Arc;

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
    /// Whether to look up the tuning cache (no explicit `with_config`).
    tuned: bool,
    ordinal: usize,
    /// The rotation's signs' device address (0: none), taken once, so that a launch on a
    /// caller's stream touches no cudarc buffer (a graph capture may be under way).
    signs_ptr: u64,
}

impl CudaCodec {
    /// A codec for rows of `dim` values in `format`, rotated by `rotation` first.
    pub fn new(
        dev: &Device,
        format: KvFormat,
        dim: usize,
        rotation: Option<&Rotation>,
    ) -> Result<Self> {
        crate::check_format(format, dim)?;
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
        let signs_ptr = match rotation.as_ref().and_then(kernel_argument) {
            Some(s) => s.device_ptr(s.stream()).0,
            None => 0,
        };
        Ok(Self {
            format,
            dim,
            row_bytes,
            rotation,
            identity: Transform::identity(dim)?,
            config: RowConfig::codec_default(),
            tuned: true,
            ordinal: dev.context().ordinal(),
            signs_ptr,
        })
    }

    /// The same codec with other tuning knobs (instead of the tuning cache's).
    pub fn with_config(mut self, config: RowConfig) -> Self {
        self.config = config;
        self.tuned = false;
        self
    }

    /// The knobs of rotate-quantize on `dev`: the tuning cache's, unless
    /// [`Self::with_config`] set them, else the default.
    pub fn config_for(&self, dev: &Device) -> RowConfig {
        let tuned = || {
            dev.tuned(
                &format!("rotate_quantize_{}", self.format),
                &crate::tuned::quantize_bucket(self.dim),
                &RowConfig::search_space(),
            )
        };
        self.tuned.then(tuned).flatten().unwrap_or(self.config)
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

    /// What the codec kernels rotate by: the fast transform, or an explicit matrix in place of
    /// it (the same kernels, so every path, caller buffers included, takes both).
    fn rotate(&self) -> kernel::Rotate {
        match &self.rotation {
            None => kernel::Rotate::None,
            Some(r) if r.matrix().is_some() => kernel::Rotate::Matrix,
            Some(_) => kernel::Rotate::Transform,
        }
    }

    /// Rotates the rows of `input` and writes their blocks into `cache` at `target`.
    pub fn quantize<T: GpuElement>(
        &self,
        dev: &Device,
        input: &CudaSlice<T>,
        cache: &mut CudaSlice<u8>,
        target: CacheTarget<'_>,
    ) -> Result<()> {
        self.check_device(dev, input.ordinal())?;
        self.check_device(dev, cache.ordinal())?;
        let n_rows = self.rows_of(input.len())?;
        let h = target.n_heads;
        if h == 0 || n_rows % h != 0 {
            return Err(Error::Shape(format!(
                "{n_rows} input rows are not whole tokens of {h} heads"
            ))
            .into());
        }
        let n_tokens = n_rows / h;
        let Some((table, page_tokens)) = self.locate(dev, cache, &target, n_tokens)? else {
            return Ok(());
        };
        self.launch_quantize(dev, input, cache, table, page_tokens, n_rows, &target)
    }

    /// The rotate-quantize kernel over `n_rows` rows of `input` into `cache` (located).
    #[allow(clippy::too_many_arguments)]
    fn launch_quantize<T: GpuElement>(
        &self,
        dev: &Device,
        input: &CudaSlice<T>,
        cache: &mut CudaSlice<u8>,
        table: Option<CudaSlice<u32>>,
        page_tokens: usize,
        n_rows: usize,
        target: &CacheTarget<'_>,
    ) -> Result<()> {
        let h = target.n_heads;
        let stream = dev.stream();
        let k = self.compiled::<T>(dev, "rotate_quantize", n_rows)?;
        let null_table;
        let table = match &table {
            Some(t) => t,
            None => {
                null_table = stream.null::<u32>().context(|| "a null pointer".into())?;
                &null_table
            }
        };
        // All fit i64 (checked above).
        let (rows, heads, start) = (n_rows as i64, h as i64, target.start_pos as i64);
        let page_tokens = page_tokens as i64;
        let mut launch = stream.launch_builder(&k.function);
        launch
            .arg(input)
            .arg(&rows)
            .arg(&heads)
            .arg(&start)
            .arg(table)
            .arg(&page_tokens)
            .arg(cache)
            .arg(k.signs.as_ref())
            .arg(&k.scale);
        // SAFETY: the kernel reads `n_rows` rows of `dim` values of `input` and writes whole
        // rows of the cache at positions start_pos..end, each checked above to lie inside
        // `cache` (contiguous) or in a page of the table that lies inside `cache` (paged).
        unsafe { launch.launch(k.launch) }.context(|| k.describe())?;
        Ok(())
    }

    /// Context shift in place: the keys of the `n_tokens` tokens from `target.start_pos` (all
    /// heads; contiguous or paged as [`Self::quantize`] writes them) move by `delta` positions
    /// under `rope`. One kernel per row does what the oracle's
    /// [`rotq_reference::rope::shift_cache`] specifies: dequantize, rotate back, turn each RoPE
    /// pair, rotate again, re-quantize. Positions outside the cache are an error before any
    /// launch.
    ///
    /// ```no_run
    /// use rotq_cuda::{CacheTarget, CudaCodec, Device};
    /// use rotq_reference::rope::{Rope, RopeVariant};
    /// use rotq_reference::{KvFormat, Rotation};
    /// let dev = Device::open("cuda:0")?;
    /// let codec = CudaCodec::new(&dev, KvFormat::Q4_0, 128, Some(&Rotation::hadamard(128)?))?;
    /// let mut cache = dev.stream().alloc_zeros::<u8>(1024 * 8 * codec.row_bytes())?;
    /// // Tokens 64..1024 of a contiguous cache of 8 KV heads move down by 64 positions.
    /// codec.shift(&dev, &mut cache, CacheTarget::contiguous(8, 64), 960, &Rope::new(RopeVariant::Neox, 128), -64)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn shift(
        &self,
        dev: &Device,
        cache: &mut CudaSlice<u8>,
        target: CacheTarget<'_>,
        n_tokens: usize,
        rope: &Rope,
        delta: i64,
    ) -> Result<()> {
        self.check_device(dev, cache.ordinal())?;
        rope.check(self.dim)?;
        let n_rows = n_tokens
            .checked_mul(target.n_heads)
            .ok_or(CudaError::Input(Error::Overflow("cache rows")))?;
        if target.n_heads == 0 {
            return Err(Error::Shape("a cache target of 0 heads".into()).into());
        }
        let Some((table, page_tokens)) = self.locate(dev, cache, &target, n_tokens)? else {
            return Ok(());
        };
        let stream = dev.stream();
        let angles: Vec<f32> = rope
            .angles(delta)
            .into_iter()
            .flat_map(|(c, s)| [c as f32, s as f32])
            .collect();
        let cs = stream
            .clone_htod(&angles)
            .context(|| "uploading the RoPE angles".into())?;
        let k = self.compiled::<f32>(dev, "shift_rows", n_rows)?;
        let null_table;
        let table = match &table {
            Some(t) => t,
            None => {
                null_table = stream.null::<u32>().context(|| "a null pointer".into())?;
                &null_table
            }
        };
        // All fit i64 and i32 (checked by `locate` and `rope.check`).
        let (rows, heads, start) = (
            n_rows as i64,
            target.n_heads as i64,
            target.start_pos as i64,
        );
        let (page_tokens, rot_dims) = (page_tokens as i64, rope.dims as i32);
        let neox = i32::from(rope.variant == RopeVariant::Neox);
        let mut launch = stream.launch_builder(&k.function);
        launch
            .arg(cache)
            .arg(&rows)
            .arg(&heads)
            .arg(&start)
            .arg(table)
            .arg(&page_tokens)
            .arg(k.signs.as_ref())
            .arg(&k.scale)
            .arg(&cs)
            .arg(&rot_dims)
            .arg(&neox);
        // SAFETY: the kernel reads and writes whole rows of the cache at positions
        // start_pos..start_pos + n_tokens, each checked by `locate` to lie inside `cache`
        // (contiguous) or in a page of the table inside `cache` (paged); `cs` holds the
        // rot_dims / 2 (cos, sin) pairs it reads, and rot_dims <= dim (`rope.check`).
        unsafe { launch.launch(k.launch) }.context(|| k.describe())?;
        Ok(())
    }

    /// The batch append: rotates the rows of `input` (`[n, n_heads, dim]`, `n` tokens of any
    /// sequences) and writes token `i`'s rows into slot `slots[i]` of the pool `cache` (rows
    /// `(slot, head)`; its length a whole number of slots), `-1` skipping the token, in one
    /// launch, as vLLM's `reshape_and_cache` does. The slots are on the device and are not
    /// read here: a slot outside the pool is the caller's error, whose rows the kernel does not
    /// write, setting bit 0 of `status[0]` when `status` is given (the kernel only sets it; the
    /// caller clears and reads it). Everything else is checked before the launch.
    ///
    /// ```no_run
    /// use rotq_cuda::{CudaCodec, Device};
    /// use rotq_reference::{KvFormat, Rotation};
    /// let dev = Device::open("cuda:0")?;
    /// let codec = CudaCodec::new(&dev, KvFormat::Q4_0, 128, Some(&Rotation::hadamard(128)?))?;
    /// let s = dev.stream();
    /// // A pool of 64 slots of 8 KV heads; three tokens of three sequences, the second padding.
    /// let mut pool = s.alloc_zeros::<u8>(64 * 8 * codec.row_bytes()).unwrap();
    /// let rows = s.clone_htod(&vec![half::f16::from_f32(0.5); 3 * 8 * 128]).unwrap();
    /// let slots = s.clone_htod(&[17i64, -1, 40]).unwrap();
    /// let mut status = s.alloc_zeros::<u32>(1).unwrap();
    /// codec.quantize_slots(&dev, &rows, &mut pool, 8, &slots, Some(&mut status))?;
    /// assert_eq!(s.clone_dtoh(&status).unwrap()[0], 0);
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    pub fn quantize_slots<T: GpuElement>(
        &self,
        dev: &Device,
        input: &CudaSlice<T>,
        cache: &mut CudaSlice<u8>,
        n_heads: usize,
        slots: &CudaSlice<i64>,
        status: Option<&mut CudaSlice<u32>>,
    ) -> Result<()> {
        self.check_device(dev, input.ordinal())?;
        self.check_device(dev, cache.ordinal())?;
        self.check_device(dev, slots.ordinal())?;
        if let Some(s) = &status {
            self.check_device(dev, s.ordinal())?;
        }
        let n_rows = self.rows_of(input.len())?;
        let n_slots = self.check_slots(
            n_rows,
            n_heads,
            slots.len(),
            cache.len(),
            status.as_ref().map(|s| s.len()),
        )?;
        if n_rows == 0 {
            return Ok(());
        }
        self.launch_slots(dev, input, cache, n_heads, slots, n_slots, status)
    }

    /// The batch append's checks (the inputs' whole tokens, one slot each, a pool of whole
    /// slots, a status word if asked for); returns the slots in the pool.
    fn check_slots(
        &self,
        n_rows: usize,
        n_heads: usize,
        n_slot_entries: usize,
        pool_len: usize,
        status_len: Option<usize>,
    ) -> Result<usize> {
        if n_heads == 0 || !n_rows.is_multiple_of(n_heads) {
            return Err(Error::Shape(format!(
                "{n_rows} input rows are not whole tokens of {n_heads} heads"
            ))
            .into());
        }
        if n_slot_entries != n_rows / n_heads {
            return Err(Error::LengthMismatch {
                what: "slot mapping (one slot per token)",
                expected: n_rows / n_heads,
                actual: n_slot_entries,
            }
            .into());
        }
        let slot_bytes = n_heads
            .checked_mul(self.row_bytes)
            .ok_or(CudaError::Input(Error::Overflow("bytes per slot")))?;
        if !pool_len.is_multiple_of(slot_bytes) {
            return Err(Error::Shape(format!(
                "a pool of {pool_len} bytes is not whole slots of {slot_bytes} bytes"
            ))
            .into());
        }
        if status_len == Some(0) {
            return Err(Error::LengthMismatch {
                what: "append status words",
                expected: 1,
                actual: 0,
            }
            .into());
        }
        Ok(pool_len / slot_bytes)
    }

    /// [`Self::quantize_slots`] on an engine's own device buffers and stream (the batch API's
    /// [`DeviceBuf`] and [`DeviceStream`]): the same kernel, queued with no allocation, upload
    /// or synchronisation, so it can be captured in a CUDA graph. The first call for an
    /// element type may compile the kernel, which a capture does not allow: make one before
    /// capturing. A pool not 16-byte aligned is refused.
    ///
    /// # Safety
    /// The work is queued, not done: the buffers must stay allocated, and the input and slots
    /// unchanged, until it has run on `stream` (and, captured in a graph, until the last
    /// replay has run). The codec's rotation was uploaded on the device's stream when it was
    /// made: a non-blocking stream must not run this before that upload completed (the
    /// device's `stream().synchronize()` once after making the codec).
    ///
    /// ```no_run
    /// use rotq_cuda::batch::{DeviceBuf, DeviceStream};
    /// use rotq_cuda::{CudaCodec, Device};
    /// use rotq_reference::{KvFormat, Rotation};
    /// let dev = Device::open("cuda:0")?;
    /// let codec = CudaCodec::new(&dev, KvFormat::Q4_0, 128, Some(&Rotation::hadamard(128)?))?;
    /// let s = dev.stream();
    /// let pool = s.alloc_zeros::<u8>(64 * 8 * codec.row_bytes()).unwrap();
    /// let rows = s.clone_htod(&vec![half::f16::from_f32(0.5); 2 * 8 * 128]).unwrap();
    /// let slots = s.clone_htod(&[17i64, 40]).unwrap();
    /// // SAFETY: the buffers outlive the queued work (synchronised below).
    /// unsafe {
    ///     codec.quantize_slots_on(&dev, &DeviceStream::of(s), &DeviceBuf::of(&rows),
    ///         &DeviceBuf::of(&pool), 8, &DeviceBuf::of(&slots), None)?;
    /// }
    /// s.synchronize().unwrap();
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn quantize_slots_on<T: GpuElement>(
        &self,
        dev: &Device,
        stream: &DeviceStream<'_>,
        input: &DeviceBuf<'_, T>,
        pool: &DeviceBuf<'_, u8>,
        n_heads: usize,
        slots: &DeviceBuf<'_, i64>,
        status: Option<&DeviceBuf<'_, u32>>,
    ) -> Result<()> {
        for o in [
            input.ordinal(),
            pool.ordinal(),
            slots.ordinal(),
            stream.ordinal(),
        ]
        .into_iter()
        .chain(status.map(|s| s.ordinal()))
        {
            self.check_device(dev, o)?;
        }
        if !pool.ptr().is_multiple_of(16) {
            return Err(Error::InvalidParameter {
                name: "pool",
                reason: format!("the pool at {:#x} is not 16-byte aligned", pool.ptr()),
            }
            .into());
        }
        let n_rows = self.rows_of(input.len())?;
        let n_slots = self.check_slots(
            n_rows,
            n_heads,
            slots.len(),
            pool.len(),
            status.map(|s| s.len()),
        )?;
        if n_rows == 0 {
            return Ok(());
        }
        let params = [
            input.ptr(),
            n_rows as u64,
            n_heads as u64,
            slots.ptr(),
            n_slots as u64,
            pool.ptr(),
            self.signs_ptr,
            u64::from(self.scale().to_bits()),
            status.map_or(0, |s| s.ptr()),
        ];
        // SAFETY: the parameters are the kernel's, in order (input, n_rows, n_heads, slots,
        // n_slots, cache, signs, scale, status); the kernel reads `n_rows` rows of `dim` values
        // of `input` and one slot per token (both lengths checked), writes whole rows only of
        // slots in 0..n_slots (checked on the device), which the pool holds, and sets bits of
        // `status` when given (at least one word). `signs` stays alive with this codec.
        unsafe { self.queue_on::<T>(dev, stream, "rotate_quantize_slots", n_rows, &params) }
    }

    /// The slot-mapping kernel over the rows of `input` (checked by the caller).
    #[allow(clippy::too_many_arguments)]
    fn launch_slots<T: GpuElement>(
        &self,
        dev: &Device,
        input: &CudaSlice<T>,
        cache: &mut CudaSlice<u8>,
        n_heads: usize,
        slots: &CudaSlice<i64>,
        n_slots: usize,
        status: Option<&mut CudaSlice<u32>>,
    ) -> Result<()> {
        let n_rows = input.len() / self.dim;
        let stream = dev.stream();
        let k = self.compiled::<T>(dev, "rotate_quantize_slots", n_rows)?;
        let mut null_status;
        let status: &mut CudaSlice<u32> = match status {
            Some(s) => s,
            None => {
                null_status = stream.null::<u32>().context(|| "a null pointer".into())?;
                &mut null_status
            }
        };
        let (rows, heads, n_slots) = (n_rows as i64, n_heads as i64, n_slots as i64);
        let mut launch = stream.launch_builder(&k.function);
        launch
            .arg(input)
            .arg(&rows)
            .arg(&heads)
            .arg(slots)
            .arg(&n_slots)
            .arg(cache)
            .arg(k.signs.as_ref())
            .arg(&k.scale)
            .arg(status);
        // SAFETY: the kernel reads `n_rows` rows of `dim` values of `input` and one slot per
        // token of `slots` (its length checked), and writes whole rows only of slots in
        // 0..n_slots (it checks each slot on the device), which `cache` holds; `status`, when
        // not null, holds at least one word.
        unsafe { launch.launch(k.launch) }.context(|| k.describe())?;
        Ok(())
    }

    /// Checks that the `n_tokens` positions from `target.start_pos` lie inside `cache` (through
    /// the block table's pages when paged) and uploads the table: (the table or none, tokens per
    /// page), or `None` when there are no tokens.
    fn locate(
        &self,
        dev: &Device,
        cache: &CudaSlice<u8>,
        target: &CacheTarget<'_>,
        n_tokens: usize,
    ) -> Result<Option<(Option<CudaSlice<u32>>, usize)>> {
        let h = target.n_heads;
        let overflow = |what| CudaError::Input(Error::Overflow(what));
        let token_bytes = h
            .checked_mul(self.row_bytes)
            .ok_or(overflow("bytes per token"))?;
        let end = target
            .start_pos
            .checked_add(n_tokens)
            .ok_or(overflow("cache position"))?;
        // Every position, head and page index the kernel computes fits its 64-bit arithmetic.
        let fits = |v: usize| i64::try_from(v).is_ok();
        if !fits(end) || !fits(h) || !fits(cache.len()) {
            return Err(overflow("cache position"));
        }
        if n_tokens == 0 {
            return Ok(None);
        }
        let stream = dev.stream();
        let located = match target.pages {
            None => {
                let needed = end.checked_mul(token_bytes).ok_or(overflow("cache size"))?;
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
                let page_bytes = page_tokens
                    .checked_mul(token_bytes)
                    .ok_or(overflow("page size"))?;
                if page_tokens == 0 || !fits(page_tokens) {
                    return Err(Error::InvalidParameter {
                        name: "page_tokens",
                        reason: format!("{page_tokens}: a page holds at least one token"),
                    }
                    .into());
                }
                let n_pages = cache.len() / page_bytes;
                let pages_used = (end - 1) / page_tokens + 1;
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
                let t = stream
                    .clone_htod(table)
                    .context(|| "uploading the block table".into())?;
                (Some(t), page_tokens)
            }
        };
        Ok(Some(located))
    }

    /// Decodes the rows of `cache` (contiguous, whole rows) into `out`, rotating them back.
    pub fn dequantize<T: GpuElement>(
        &self,
        dev: &Device,
        cache: &CudaSlice<u8>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.check_device(dev, cache.ordinal())?;
        self.check_device(dev, out.ordinal())?;
        let n_rows = self.decoded_rows(cache.len(), out.len())?;
        if n_rows == 0 {
            return Ok(());
        }
        self.launch_dequantize(dev, cache, out, n_rows)
    }

    /// Decodes the rows of a caller's `cache` buffer (whole contiguous rows) into its `out`,
    /// rotating them back, queued on the caller's stream with nothing allocated, uploaded or
    /// awaited (so it can be captured in a CUDA graph).
    ///
    /// # Safety
    /// The work is queued, not done: the buffers must stay allocated, and `cache` unchanged,
    /// until it has run on `stream` (and, captured in a graph, until the last replay has run).
    /// The rotation's signs were uploaded on the device's stream when the codec was made: a
    /// non-blocking stream must not run this before that upload completed.
    ///
    /// ```no_run
    /// use rotq_cuda::batch::{DeviceBuf, DeviceStream};
    /// use rotq_cuda::{CudaCodec, Device};
    /// use rotq_reference::KvFormat;
    /// let dev = Device::open("cuda:0")?;
    /// let codec = CudaCodec::new(&dev, KvFormat::Q8_0, 128, None)?;
    /// let s = dev.stream();
    /// let cache = s.alloc_zeros::<u8>(4 * codec.row_bytes()).unwrap();
    /// let out = s.alloc_zeros::<f32>(4 * 128).unwrap();
    /// // SAFETY: the buffers outlive the queued work (synchronised below).
    /// unsafe {
    ///     codec.dequantize_on(&dev, &DeviceStream::of(s), &DeviceBuf::of(&cache),
    ///         &DeviceBuf::of(&out))?;
    /// }
    /// s.synchronize().unwrap();
    /// # Ok::<(), rotq_cuda::CudaError>(())
    /// ```
    pub unsafe fn dequantize_on<T: GpuElement>(
        &self,
        dev: &Device,
        stream: &DeviceStream<'_>,
        cache: &DeviceBuf<'_, u8>,
        out: &DeviceBuf<'_, T>,
    ) -> Result<()> {
        for o in [cache.ordinal(), out.ordinal(), stream.ordinal()] {
            self.check_device(dev, o)?;
        }
        let n_rows = self.decoded_rows(cache.len(), out.len())?;
        if n_rows == 0 {
            return Ok(());
        }
        let params = [
            cache.ptr(),
            n_rows as u64,
            out.ptr(),
            self.signs_ptr,
            u64::from(self.scale().to_bits()),
        ];
        // SAFETY: the parameters are the kernel's, in order (cache, n_rows, output, signs,
        // scale); it reads `n_rows` whole rows of `cache` and writes `n_rows` rows of `dim`
        // values of `out` (both lengths checked); `signs` stays alive with this codec.
        unsafe { self.queue_on::<T>(dev, stream, "dequantize_rows", n_rows, &params) }
    }

    /// The dequantize kernel over `n_rows` rows of `cache` into `out`.
    fn launch_dequantize<T: GpuElement>(
        &self,
        dev: &Device,
        cache: &CudaSlice<u8>,
        out: &mut CudaSlice<T>,
        n_rows: usize,
    ) -> Result<()> {
        let k = self.compiled::<T>(dev, "dequantize_rows", n_rows)?;
        let rows = n_rows as i64;
        let mut launch = dev.stream().launch_builder(&k.function);
        launch
            .arg(cache)
            .arg(&rows)
            .arg(out)
            .arg(k.signs.as_ref())
            .arg(&k.scale);
        // SAFETY: the kernel reads `n_rows` whole rows of `cache` (its length checked above)
        // and writes `n_rows` rows of `dim` values of `out`.
        unsafe { launch.launch(k.launch) }.context(|| k.describe())?;
        Ok(())
    }

    /// Refuses a device, or a buffer of a device, other than the one the codec was made for.
    fn check_device(&self, dev: &Device, buffer: usize) -> Result<()> {
        let ours = dev.context().ordinal();
        if ours != self.ordinal || buffer != self.ordinal {
            return Err(CudaError::WrongDevice {
                expected: self.ordinal,
                actual: if ours != self.ordinal { ours } else { buffer },
            });
        }
        Ok(())
    }

    /// The rows `out_len` values hold, `cache_len` being their bytes (a dequantize's check).
    fn decoded_rows(&self, cache_len: usize, out_len: usize) -> Result<usize> {
        let n_rows = self.rows_of(out_len)?;
        if cache_len != n_rows * self.row_bytes {
            return Err(Error::LengthMismatch {
                what: "cache bytes for the output rows",
                expected: n_rows * self.row_bytes,
                actual: cache_len,
            }
            .into());
        }
        Ok(n_rows)
    }

    fn rows_of(&self, len: usize) -> Result<usize> {
        if !len.is_multiple_of(self.dim) {
            return Err(Error::RowNotMultipleOfBlock {
                format: "codec rows",
                row_len: len,
                block: self.dim,
            }
            .into());
        }
        Ok(len / self.dim)
    }

    /// Kernel `name` of this codec for element type `T`, compiled, with its launch shape for
    /// `n_rows` rows and its rotation arguments.
    fn compiled<T: GpuElement>(
        &self,
        dev: &Device,
        name: &'static str,
        n_rows: usize,
    ) -> Result<Compiled> {
        let stream = dev.stream();
        let signs = match self.rotation.as_ref().and_then(kernel_argument) {
            Some(s) => s.clone(),
            None => Arc::new(stream.null::<f32>().context(|| "a null pointer".into())?),
        };
        let (function, geometry, key, launch) = self.kernel_for::<T>(dev, name, n_rows)?;
        Ok(Compiled {
            name,
            function,
            geometry,
            key,
            launch,
            signs,
            scale: self.scale(),
        })
    }

    /// The rotation's scale (1 without one).
    fn scale(&self) -> f32 {
        self.rotation.as_ref().map_or(1.0, CudaRotation::scale)
    }

    /// Queues kernel `name` for `T` over `n_rows` rows with raw `params` on a caller's stream
    /// (the launches of the caller-buffer calls, which touch no cudarc buffer).
    ///
    /// # Safety
    /// `params` are the kernel's, in order, and the memory they address holds what the kernel
    /// reads and writes over `n_rows` rows, alive until the work has run.
    unsafe fn queue_on<T: GpuElement>(
        &self,
        dev: &Device,
        stream: &DeviceStream<'_>,
        name: &'static str,
        n_rows: usize,
        params: &[u64],
    ) -> Result<()> {
        let (function, geometry, key, l) = self.kernel_for::<T>(dev, name, n_rows)?;
        // SAFETY: the caller's promise.
        unsafe {
            kernel::queue(
                dev,
                name,
                (&function, geometry, &key, &l),
                stream.raw(),
                params,
            )
        }
    }

    /// Kernel `name` for element type `T`, compiled, with its geometry, module key and launch
    /// shape for `n_rows` rows.
    fn kernel_for<T: GpuElement>(
        &self,
        dev: &Device,
        name: &'static str,
        n_rows: usize,
    ) -> Result<(CudaFunction, kernel::Geometry, String, LaunchConfig)> {
        let transform = self.transform();
        let config = if name.starts_with("rotate_quantize") {
            self.config_for(dev)
        } else {
            self.config
        };
        let geometry = kernel::geometry(
            transform,
            config,
            true,
            self.row_bytes,
            dev.info().max_shared_per_block,
        )?;
        let (key, src) = kernel::source(
            transform,
            geometry,
            T::ELEM,
            self.rotate(),
            Some(self.format),
        );
        let function = kernel::function(dev, &key, &src, name, geometry.smem)?;
        let launch = kernel::launch_config(geometry, n_rows)?;
        Ok((function, geometry, key, launch))
    }
}

/// What the codec kernels take as their `signs` argument: a randomized transform's signs, or
/// an explicit matrix's `Rᵀ` (the kernels read it transposed for the inverse).
fn kernel_argument(r: &CudaRotation) -> Option<&Arc<CudaSlice<f32>>> {
    match r.matrix() {
        Some(m) => Some(m.transposed()),
        None => r.signs(),
    }
}

/// A codec kernel ready to launch.
struct Compiled {
    name: &'static str,
    function: CudaFunction,
    geometry: kernel::Geometry,
    key: String,
    launch: LaunchConfig,
    signs: Arc<CudaSlice<f32>>,
    scale: f32,
}

impl Compiled {
    /// What a failed launch was.
    fn describe(&self) -> String {
        kernel::describe(self.name, &self.function, self.geometry, &self.key)
    }
}
