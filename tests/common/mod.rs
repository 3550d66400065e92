//! What the cache tests share: the layouts every test runs for, and rows with outliers.

use rotq::cache::Paging;
use rotq::reference::rotation::SplitMix64;

/// Both layouts: contiguous, and pages of 16 tokens.
pub const LAYOUTS: [Paging; 2] = [Paging::Contiguous, Paging::Paged { page_tokens: 16 }];

/// Values in [-1, 1) with a large outlier every 31 (what rotation is for).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut g = SplitMix64::new(seed);
    (0..len)
        .map(|i| {
            let v = (g.next_f64() * 2.0 - 1.0) as f32;
            if i % 31 == 7 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}
