//! What the cache tests share: the layouts every test runs for, and rows with outliers.

use rotq::cache::Paging;
use rotq_testkit::data::Rows;

/// Both layouts: contiguous, and pages of 16 tokens.
pub const LAYOUTS: [Paging; 2] = [Paging::Contiguous, Paging::Paged { page_tokens: 16 }];

/// Values in [-1, 1) with a large outlier every 31 (what rotation is for).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    Rows::outliers().f32s(len, seed)
}
