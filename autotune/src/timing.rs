//! How rotq times a kernel: the one timing module, used by the autotuner and by `rotq bench`.
//!
//! A measurement is a warm-up, then samples, each as many calls as last a minimum duration
//! (so that a short kernel is not timed by its launch gaps alone), reported per call. What
//! tells the time is a [`Clock`]: the wall clock on the CPU ([`WallClock`]), CUDA events on a
//! GPU stream ([`EventClock`], which times the device's work, not the host's), or a
//! [`FakeClock`] that the code under test advances itself. The tuner's decisions ("is this
//! candidate faster beyond the noise?") depend only on what its clock says, so tests run them
//! on a fake clock, where they cannot fail because the machine is busy.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use serde::Serialize;
use std::cell::Cell;
use std::fmt::Display;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A measurement that could not be taken: the timed call failed, or the clock did.
///
/// ```
/// use rotq_autotune::timing::{median_ms, WallClock};
/// let err = median_ms(&mut WallClock::new(), 0, 3, |_| Err("no device")).unwrap_err();
/// assert_eq!(err.to_string(), "no device");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimingError(pub String);

impl TimingError {
    fn of(e: impl Display) -> Self {
        Self(e.to_string())
    }
}

/// What a measurement reads the time from.
pub trait Clock {
    /// A point in time: an `Instant`, a recorded CUDA event, a virtual time.
    type Mark;
    /// Marks now (on a GPU: after the work queued so far on the stream).
    fn mark(&mut self) -> Result<Self::Mark, TimingError>;
    /// Milliseconds from `start` to `end` (on a GPU this waits for `end`).
    fn ms_between(&mut self, start: &Self::Mark, end: &Self::Mark) -> Result<f64, TimingError>;
    /// Time since the clock was made, for budgets: wall time for the real clocks (a GPU's
    /// budget counts compiles and host work too), virtual time for a fake one.
    fn elapsed(&self) -> Duration;
}

/// The host's monotonic clock.
///
/// ```
/// use rotq_autotune::timing::{Clock, WallClock};
/// let mut c = WallClock::new();
/// let (a, b) = (c.mark().unwrap(), c.mark().unwrap());
/// assert!(c.ms_between(&a, &b).unwrap() >= 0.0);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    born: Instant,
}

impl WallClock {
    /// A clock whose [`Clock::elapsed`] counts from now.
    pub fn new() -> Self {
        Self {
            born: Instant::now(),
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for WallClock {
    type Mark = Instant;
    fn mark(&mut self) -> Result<Instant, TimingError> {
        Ok(Instant::now())
    }
    fn ms_between(&mut self, start: &Instant, end: &Instant) -> Result<f64, TimingError> {
        Ok(end.saturating_duration_since(*start).as_secs_f64() * 1e3)
    }
    fn elapsed(&self) -> Duration {
        self.born.elapsed()
    }
}

/// CUDA events recorded on a stream: the device's time between two points of the stream's
/// work, whatever the host does meanwhile.
///
/// ```no_run
/// use rotq_autotune::timing::{median_ms, EventClock};
/// let dev = rotq_cuda::Device::open("cuda:0")?;
/// let ms = median_ms(&mut EventClock::new(dev.stream().clone()), 3, 20, |_| Ok::<(), String>(()));
/// # Ok::<(), rotq_cuda::CudaError>(())
/// ```
pub struct EventClock {
    stream: Arc<CudaStream>,
    born: Instant,
}

impl EventClock {
    /// A clock on `stream` (the stream the timed kernels are launched on).
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Self {
            stream,
            born: Instant::now(),
        }
    }
}

impl Clock for EventClock {
    type Mark = CudaEvent;
    fn mark(&mut self) -> Result<CudaEvent, TimingError> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| TimingError(format!("recording a CUDA event: {e}")))
    }
    fn ms_between(&mut self, start: &CudaEvent, end: &CudaEvent) -> Result<f64, TimingError> {
        end.synchronize()
            .map_err(|e| TimingError(format!("waiting for the timed work: {e}")))?;
        start
            .elapsed_ms(end)
            .map(f64::from)
            .map_err(|e| TimingError(format!("reading a CUDA event timer: {e}")))
    }
    fn elapsed(&self) -> Duration {
        self.born.elapsed()
    }
}

/// A virtual clock for tests: time moves only when [`FakeClock::advance`] is called (by the
/// fake kernel being timed). Clones share the same time.
///
/// ```
/// use rotq_autotune::timing::{median_ms, FakeClock};
/// let clock = FakeClock::new();
/// let kernel_clock = clock.clone();
/// let ms = median_ms(&mut clock.clone(), 1, 5, |_| {
///     kernel_clock.advance(2.5); // each call "takes" 2.5 ms
///     Ok::<(), String>(())
/// }).unwrap();
/// assert_eq!(ms, 2.5);
/// assert_eq!(clock.now_ms(), 6.0 * 2.5);
/// ```
#[derive(Clone, Debug, Default)]
pub struct FakeClock {
    now_ms: Rc<Cell<f64>>,
}

impl FakeClock {
    /// A clock at time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the time on by `ms`.
    pub fn advance(&self, ms: f64) {
        self.now_ms.set(self.now_ms.get() + ms);
    }

    /// The time, in milliseconds since the clock was made.
    pub fn now_ms(&self) -> f64 {
        self.now_ms.get()
    }
}

impl Clock for FakeClock {
    type Mark = f64;
    fn mark(&mut self) -> Result<f64, TimingError> {
        Ok(self.now_ms())
    }
    fn ms_between(&mut self, start: &f64, end: &f64) -> Result<f64, TimingError> {
        Ok(end - start)
    }
    fn elapsed(&self) -> Duration {
        Duration::from_secs_f64(self.now_ms().max(0.0) / 1e3)
    }
}

/// How long to time a kernel: the tuner's default (the CPU's) is 1 warm-up call, then 9
/// samples of at least 20 ms each; [`TimingPlan::gpu`] is a GPU's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimingPlan {
    /// Untimed calls first (compiles, caches, clocks ramping up).
    pub warmup: usize,
    /// Samples per measurement (at least 3 are taken).
    pub samples: usize,
    /// Least duration of one sample.
    pub min_sample: Duration,
    /// Most calls in one sample, whatever one call took (a call timed at 0 would ask for
    /// infinitely many).
    pub max_calls: usize,
}

impl Default for TimingPlan {
    fn default() -> Self {
        Self {
            warmup: 1,
            samples: 9,
            min_sample: Duration::from_millis(20),
            max_calls: 1_000_000,
        }
    }
}

impl TimingPlan {
    /// A GPU's plan: 2 warm-up launches (the first compiles and loads the kernel), 7 samples of
    /// at least 5 ms (CUDA events time a sample to a microsecond, so short samples leave the
    /// budget to the candidates), at most 10,000 launches a sample, so that a kernel of a
    /// microsecond or two is not timed by the host's launch rate alone.
    ///
    /// ```
    /// let p = rotq_autotune::timing::TimingPlan::gpu();
    /// assert_eq!((p.warmup, p.samples, p.max_calls), (2, 7, 10_000));
    /// ```
    pub fn gpu() -> Self {
        Self {
            warmup: 2,
            samples: 7,
            min_sample: Duration::from_millis(5),
            max_calls: 10_000,
        }
    }
}

/// A median and its spread.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Timing {
    /// Median milliseconds per call.
    pub median_ms: f64,
    /// Interquartile range over the median (0.05 = ±5% noise).
    pub spread: f64,
}

impl Timing {
    /// The median and interquartile spread of per-call milliseconds (NaN for no samples).
    ///
    /// ```
    /// let t = rotq_autotune::timing::Timing::of(vec![1.0, 2.0, 2.0, 2.0, 10.0]);
    /// assert_eq!(t.median_ms, 2.0);
    /// assert_eq!(t.spread, 0.0);
    /// ```
    pub fn of(samples: Vec<f64>) -> Self {
        let [q1, median, q3] = quartiles(samples);
        Self {
            median_ms: median,
            spread: (q3 - q1) / median,
        }
    }
}

/// The lower quartile, the median and the upper quartile of `v` (each the value at the rounded
/// rank `(len − 1) · p`, so the upper one of two middles); NaN for no values. The one rule for
/// every median rotq reports.
///
/// ```
/// assert_eq!(rotq_autotune::timing::quartiles(vec![5.0, 1.0, 4.0, 2.0, 3.0]), [2.0, 3.0, 4.0]);
/// assert_eq!(rotq_autotune::timing::quartiles(vec![1.0, 2.0])[1], 2.0);
/// assert!(rotq_autotune::timing::quartiles(vec![])[1].is_nan());
/// ```
pub fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    if v.is_empty() {
        return [f64::NAN; 3];
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    [q(0.25), q(0.5), q(0.75)]
}

/// Per-call milliseconds of `plan.samples` samples of `f(i)` (`i` counts calls, so that a
/// kernel can alternate between input buffers and no cache flatters it): `plan.warmup`
/// untimed calls, one timed call to size the samples, then samples of as many calls as last
/// `plan.min_sample`.
///
/// ```
/// use rotq_autotune::timing::{sample, FakeClock, TimingPlan};
/// use std::time::Duration;
/// let clock = FakeClock::new();
/// let plan = TimingPlan { min_sample: Duration::from_millis(10), samples: 4, ..Default::default() };
/// let k = clock.clone();
/// let per_call = sample(&mut clock.clone(), plan, |_| { k.advance(3.0); Ok::<(), String>(()) }).unwrap();
/// assert_eq!(per_call, vec![3.0; 4]); // 4 samples of 4 calls (12 ms >= 10 ms)
/// assert_eq!(clock.now_ms(), 3.0 * (1 + 1 + 4 * 4) as f64);
/// ```
pub fn sample<C: Clock, E: Display>(
    clock: &mut C,
    plan: TimingPlan,
    mut f: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<f64>, TimingError> {
    let mut i = 0;
    let mut call = |i: &mut usize| {
        let r = f(*i).map_err(TimingError::of);
        *i += 1;
        r
    };
    for _ in 0..plan.warmup {
        call(&mut i)?;
    }
    let one = {
        let start = clock.mark()?;
        call(&mut i)?;
        let end = clock.mark()?;
        clock.ms_between(&start, &end)?
    };
    let min_ms = plan.min_sample.as_secs_f64() * 1e3;
    let most = plan.max_calls.max(1);
    let calls = if one > 0.0 {
        (min_ms / one).ceil().clamp(1.0, most as f64) as usize
    } else {
        most
    };
    let mut out = Vec::with_capacity(plan.samples.max(3));
    for _ in 0..plan.samples.max(3) {
        let start = clock.mark()?;
        for _ in 0..calls {
            call(&mut i)?;
        }
        let end = clock.mark()?;
        out.push(clock.ms_between(&start, &end)? / calls as f64);
    }
    Ok(out)
}

/// [`sample`] as a [`Timing`].
pub fn time<C: Clock, E: Display>(
    clock: &mut C,
    plan: TimingPlan,
    f: impl FnMut(usize) -> Result<(), E>,
) -> Result<Timing, TimingError> {
    sample(clock, plan, f).map(Timing::of)
}

/// Median milliseconds of `runs` calls of `f(i)`, each timed alone, after `warmup` untimed
/// calls (for calls long enough to time one by one).
///
/// ```
/// use rotq_autotune::timing::{median_ms, FakeClock};
/// let clock = FakeClock::new();
/// let k = clock.clone();
/// let costs = [5.0, 1.0, 2.0, 9.0, 3.0];
/// let ms = median_ms(&mut clock.clone(), 0, 5, |i| { k.advance(costs[i]); Ok::<(), String>(()) });
/// assert_eq!(ms.unwrap(), 3.0);
/// ```
pub fn median_ms<C: Clock, E: Display>(
    clock: &mut C,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut(usize) -> Result<(), E>,
) -> Result<f64, TimingError> {
    for i in 0..warmup {
        f(i).map_err(TimingError::of)?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for i in 0..runs.max(1) {
        let start = clock.mark()?;
        f(warmup + i).map_err(TimingError::of)?;
        let end = clock.mark()?;
        times.push(clock.ms_between(&start, &end)?);
    }
    Ok(median(times))
}

/// Median milliseconds of `a` and of `b`, timed alternately (a, b, a, b, …) after one warm-up
/// call of each, so that a change in the machine's load during the run affects both alike:
/// how a kernel is compared with its peer.
///
/// ```
/// use rotq_autotune::timing::{paired, FakeClock};
/// let clock = FakeClock::new();
/// let (ka, kb) = (clock.clone(), clock.clone());
/// let (a, b) = paired(&mut clock.clone(), 3,
///     |_| { ka.advance(2.0); Ok::<(), String>(()) },
///     |_| { kb.advance(4.0); Ok::<(), String>(()) }).unwrap();
/// assert_eq!((a, b), (2.0, 4.0));
/// ```
pub fn paired<C: Clock, E: Display>(
    clock: &mut C,
    runs: usize,
    mut a: impl FnMut(usize) -> Result<(), E>,
    mut b: impl FnMut(usize) -> Result<(), E>,
) -> Result<(f64, f64), TimingError> {
    a(0).map_err(TimingError::of)?;
    b(0).map_err(TimingError::of)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for i in 1..=runs.max(1) {
        for (f, t) in [
            (&mut a as &mut dyn FnMut(usize) -> Result<(), E>, &mut ta),
            (&mut b, &mut tb),
        ] {
            let start = clock.mark()?;
            f(i).map_err(TimingError::of)?;
            let end = clock.mark()?;
            t.push(clock.ms_between(&start, &end)?);
        }
    }
    Ok((median(ta), median(tb)))
}

/// The median of `v` (the upper one of an even count).
fn median(v: Vec<f64>) -> f64 {
    quartiles(v)[1]
}
