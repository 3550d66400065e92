//! How a cache's token rows are laid out in pages for tests of paged caches.

/// `bytes` (whole tokens of `token_bytes`) moved into a pool of pages of `page_tokens`
/// tokens, in reverse order after a spare page, every byte not written 0xFF (NaN in f16 and in
/// the formats' scales, so a read of a wrong page or slot shows): `(pool, block table)`.
///
/// ```
/// let (pool, table) = rotq_testkit::layout::scatter(&[1, 2, 3, 4, 5, 6], 2, 2);
/// assert_eq!(table, [2, 1]); // page 0 of the sequence is page 2 of the pool
/// assert_eq!(pool, [0xFF, 0xFF, 0xFF, 0xFF, 5, 6, 0xFF, 0xFF, 1, 2, 3, 4]);
/// ```
pub fn scatter(bytes: &[u8], token_bytes: usize, page_tokens: usize) -> (Vec<u8>, Vec<u32>) {
    let page_bytes = page_tokens * token_bytes;
    let n_pages = (bytes.len() / token_bytes).div_ceil(page_tokens);
    let mut pool = vec![0xFF; (n_pages + 1) * page_bytes];
    let table: Vec<u32> = (0..n_pages).map(|i| (n_pages - i) as u32).collect();
    for (chunk, &page) in bytes.chunks(page_bytes).zip(&table) {
        let at = page as usize * page_bytes;
        pool[at..at + chunk.len()].copy_from_slice(chunk);
    }
    (pool, table)
}
