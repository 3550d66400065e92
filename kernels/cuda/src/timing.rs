//! Timing on the GPU with CUDA events.

use crate::device::Device;
use crate::error::{Context, Result};
use cudarc::driver::sys::CUevent_flags;

/// Median milliseconds of `runs` calls of `f(i)` (i counts calls, so callers can rotate
/// between buffers), each timed by a pair of CUDA events, after `warmup` untimed calls.
///
/// ```no_run
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let ms = rotq_cuda::median_ms(&dev, 3, 20, |_| Ok(()))?;
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
pub fn median_ms(
    dev: &Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let stream = dev.stream();
    for i in 0..warmup {
        f(i)?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for i in 0..runs.max(1) {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream
            .record_event(flags)
            .context(|| "recording an event".into())?;
        f(warmup + i)?;
        let end = stream
            .record_event(flags)
            .context(|| "recording an event".into())?;
        end.synchronize()
            .context(|| "waiting for the timed work".into())?;
        times.push(f64::from(
            start
                .elapsed_ms(&end)
                .context(|| "reading an event timer".into())?,
        ));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Per-call milliseconds of `samples` samples after `warmup` calls of `f(i)`: each sample
/// times, between one pair of CUDA events, as many calls as last about `min_ms` (judged from
/// one timed call), so that short kernels are not timed by their launch gaps alone.
///
/// ```no_run
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let per_call = rotq_cuda::sample_ms(&dev, 2, 9, 5.0, |_| Ok(()))?;
/// assert_eq!(per_call.len(), 9);
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
pub fn sample_ms(
    dev: &Device,
    warmup: usize,
    samples: usize,
    min_ms: f64,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let one = median_ms(dev, warmup, 1, &mut f)?;
    let calls = (min_ms / one.max(1e-4)).ceil().clamp(1.0, 10_000.0) as usize;
    let stream = dev.stream();
    let mut i = warmup + 1;
    let mut out = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream
            .record_event(flags)
            .context(|| "recording an event".into())?;
        for _ in 0..calls {
            f(i)?;
            i += 1;
        }
        let end = stream
            .record_event(flags)
            .context(|| "recording an event".into())?;
        end.synchronize()
            .context(|| "waiting for the timed work".into())?;
        let ms = start
            .elapsed_ms(&end)
            .context(|| "reading an event timer".into())?;
        out.push(f64::from(ms) / calls as f64);
    }
    Ok(out)
}

/// Device-to-device copy bandwidth over `bytes` (GB/s counting bytes read + written): the
/// ceiling every memory-bound kernel is measured against.
pub fn copy_bandwidth(dev: &Device, bytes: usize, runs: usize) -> Result<f64> {
    let stream = dev.stream();
    let src = stream
        .alloc_zeros::<u8>(bytes)
        .context(|| format!("allocating {bytes} bytes"))?;
    let mut dst = stream
        .alloc_zeros::<u8>(bytes)
        .context(|| format!("allocating {bytes} bytes"))?;
    let ms = median_ms(dev, 3, runs, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .context(|| "copying on the device".into())
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}
