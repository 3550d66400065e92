//! Running the same work on several threads at once, for the tests of what may be shared.

/// Runs `work(thread)` on `n` threads released together (a barrier, so that they really
/// overlap), and returns their results in thread order. A panic in a thread is re-raised.
///
/// ```
/// let squares = rotq_testkit::threads::at_once(8, |t| t * t);
/// assert_eq!(squares, (0..8).map(|t| t * t).collect::<Vec<u64>>());
/// ```
pub fn at_once<T: Send>(n: u64, work: impl Fn(u64) -> T + Sync) -> Vec<T> {
    let start = std::sync::Barrier::new(n as usize);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|t| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    start.wait();
                    work(t)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
