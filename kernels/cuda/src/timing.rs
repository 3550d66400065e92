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
