//! Which pages hold which sequence's tokens: the two forms engines use, checked and converted.
//!
//! * **Block table** (vLLM's `block_table[B, max_blocks]` + `seq_lens[B]`): row `b` lists the
//!   pages of sequence `b` in order; entries past its last page are padding and never read.
//! * **CSR** (FlashInfer's `indptr[B + 1]`, `indices`, `last_page_len[B]`): sequence `b`'s
//!   pages are `indices[indptr[b]..indptr[b + 1]]`, its last page holding `last_page_len[b]`
//!   tokens (a sequence of no pages has no tokens).
//!
//! Token `t` of a sequence lies in page `pages[t / page_tokens]`, slot `t % page_tokens`: the
//! layout [`rotq_cpu::KvCacheView::paged`] reads.

use crate::reference::Error as InputError;
use crate::Error;

/// A batch's page tables, borrowed from the engine (see the module docs).
///
/// ```
/// use rotq::pool::PageTables;
/// // Two sequences of 5 and 2 tokens in pages of 4: pages [3, 0] and [1].
/// let block = PageTables::Block { table: &[3, 0, 1, -1], max_blocks: 2, seq_lens: &[5, 2] };
/// let csr = PageTables::Csr { indptr: &[0, 2, 3], indices: &[3, 0, 1], last_page_len: &[1, 2] };
/// assert_eq!(block.check(4, 4)?, csr.check(4, 4)?);
/// # Ok::<(), rotq::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub enum PageTables<'a> {
    /// Rectangular: `table[b · max_blocks + i]` is sequence `b`'s page `i` (`i32`, as vLLM
    /// passes it; padding past the last page may be anything, e.g. −1).
    Block {
        /// `[B, max_blocks]`.
        table: &'a [i32],
        /// Columns of the table.
        max_blocks: usize,
        /// Tokens of each sequence (`B` values).
        seq_lens: &'a [u32],
    },
    /// Compressed rows: sequence `b`'s pages are `indices[indptr[b]..indptr[b + 1]]`.
    Csr {
        /// `B + 1` offsets into `indices`, from 0, never decreasing.
        indptr: &'a [u32],
        /// Page numbers.
        indices: &'a [u32],
        /// Tokens in each sequence's last page (1 to `page_tokens`; ignored for a sequence
        /// of no pages).
        last_page_len: &'a [u32],
    },
}

/// One sequence's pages and length, as the kernels take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqPages<'a> {
    /// Its pages in order (exactly the pages its tokens use).
    pub pages: &'a [u32],
    /// Its tokens.
    pub len: usize,
}

impl<'a> PageTables<'a> {
    /// Sequences in the batch.
    ///
    /// ```
    /// let t = rotq::pool::PageTables::Block { table: &[0, 1], max_blocks: 1, seq_lens: &[3, 1] };
    /// assert_eq!(t.len(), 2);
    /// ```
    pub fn len(&self) -> usize {
        match self {
            Self::Block { seq_lens, .. } => seq_lens.len(),
            Self::Csr { indptr, .. } => indptr.len().saturating_sub(1),
        }
    }

    /// Whether the batch has no sequence.
    ///
    /// ```
    /// let t = rotq::pool::PageTables::Csr { indptr: &[0], indices: &[], last_page_len: &[] };
    /// assert!(t.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence `b`'s pages and length, without the checks of [`Self::check`] beyond what
    /// keeps the slices in bounds (an error names what is out of range).
    ///
    /// ```
    /// use rotq::pool::{PageTables, SeqPages};
    /// let t = PageTables::Csr { indptr: &[0, 2], indices: &[5, 1], last_page_len: &[3] };
    /// assert_eq!(t.seq(0, 4)?, SeqPages { pages: &[5, 1], len: 7 });
    /// assert!(t.seq(1, 4).is_err());
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn seq(&self, b: usize, page_tokens: usize) -> Result<SeqPages<'a>, Error> {
        if page_tokens == 0 {
            return Err(bad("page_tokens", "a page holds at least one token".into()));
        }
        if b >= self.len() {
            return Err(bad(
                "sequence",
                format!("{b} is not in a batch of {}", self.len()),
            ));
        }
        match *self {
            Self::Block {
                table,
                max_blocks,
                seq_lens,
            } => {
                let len = seq_lens[b] as usize;
                let used = len.div_ceil(page_tokens);
                if used > max_blocks {
                    return Err(bad(
                        "seq_lens",
                        format!(
                            "sequence {b} has {len} tokens: {used} pages of {page_tokens}, more than the table's {max_blocks} columns"
                        ),
                    ));
                }
                let row = b
                    .checked_mul(max_blocks)
                    .and_then(|s| table.get(s..s + used))
                    .ok_or_else(|| {
                        Error::from(InputError::LengthMismatch {
                            what: "block table entries ([B, max_blocks])",
                            expected: seq_lens.len().saturating_mul(max_blocks),
                            actual: table.len(),
                        })
                    })?;
                if let Some(neg) = row.iter().find(|&&p| p < 0) {
                    return Err(bad(
                        "block table",
                        format!("sequence {b} names page {neg}, below 0"),
                    ));
                }
                Ok(SeqPages {
                    pages: as_u32(row),
                    len,
                })
            }
            Self::Csr {
                indptr,
                indices,
                last_page_len,
            } => {
                if last_page_len.len() != self.len() {
                    return Err(InputError::LengthMismatch {
                        what: "last_page_len (one per sequence)",
                        expected: self.len(),
                        actual: last_page_len.len(),
                    }
                    .into());
                }
                let (lo, hi) = (indptr[b] as usize, indptr[b + 1] as usize);
                if lo > hi || hi > indices.len() || (b == 0 && lo != 0) {
                    return Err(bad(
                        "indptr",
                        format!(
                            "sequence {b} spans indices {lo}..{hi}: indptr must start at 0 and never decrease, within the {} indices",
                            indices.len()
                        ),
                    ));
                }
                let pages = &indices[lo..hi];
                let last = last_page_len[b] as usize;
                let len = match pages.len() {
                    0 => 0,
                    n if (1..=page_tokens).contains(&last) => (n - 1) * page_tokens + last,
                    _ => {
                        let why = format!("sequence {b}'s last page holds {last} tokens");
                        return Err(bad(
                            "last_page_len",
                            format!("{why}, not 1 to {page_tokens}"),
                        ));
                    }
                };
                Ok(SeqPages { pages, len })
            }
        }
    }

    /// Checks every sequence against a pool of `n_pages` pages of `page_tokens` tokens: a
    /// page outside the pool, a page used twice by one sequence, a length beyond the table,
    /// or malformed offsets are typed errors. Returns the sequences' pages and lengths.
    ///
    /// ```
    /// use rotq::pool::PageTables;
    /// let twice = PageTables::Block { table: &[2, 2], max_blocks: 2, seq_lens: &[8] };
    /// assert!(twice.check(4, 4).is_err()); // page 2 twice in one sequence
    /// let outside = PageTables::Block { table: &[4], max_blocks: 1, seq_lens: &[1] };
    /// assert!(outside.check(4, 4).is_err()); // the pool has pages 0..4
    /// let long = PageTables::Block { table: &[0], max_blocks: 1, seq_lens: &[5] };
    /// assert!(long.check(4, 4).is_err()); // 5 tokens need 2 pages
    /// # Ok::<(), rotq::Error>(())
    /// ```
    pub fn check(&self, n_pages: usize, page_tokens: usize) -> Result<Vec<SeqPages<'a>>, Error> {
        if let Self::Block {
            table,
            max_blocks,
            seq_lens,
        } = self
        {
            let cells = seq_lens.len().checked_mul(*max_blocks);
            if cells != Some(table.len()) {
                return Err(InputError::LengthMismatch {
                    what: "block table entries ([B, max_blocks])",
                    expected: cells.unwrap_or(usize::MAX),
                    actual: table.len(),
                }
                .into());
            }
        }
        if let Self::Csr { indptr, .. } = self {
            if indptr.is_empty() {
                return Err(bad("indptr", "holds B + 1 offsets, at least one".into()));
            }
        }
        // Each sequence's pages, sorted in one scratch list to find a page named twice: memory
        // and time follow the pages the batch uses, not the pool's size.
        let mut scratch = Vec::new();
        (0..self.len())
            .map(|b| {
                let s = self.seq(b, page_tokens)?;
                if let Some(p) = s.pages.iter().find(|&&p| p as usize >= n_pages) {
                    return Err(bad(
                        "page table",
                        format!("sequence {b} names page {p}, outside the pool's {n_pages} pages"),
                    ));
                }
                scratch.clear();
                scratch.extend_from_slice(s.pages);
                if let Some(p) = super::first_repeat(&mut scratch) {
                    return Err(bad(
                        "page table",
                        format!("sequence {b} uses page {p} twice"),
                    ));
                }
                Ok(s)
            })
            .collect()
    }

    /// The same tables in CSR form (`indptr`, `indices`, `last_page_len`), checked.
    ///
    /// ```
    /// use rotq::pool::PageTables;
    /// let block = PageTables::Block { table: &[3, 0, 1, -1], max_blocks: 2, seq_lens: &[5, 2] };
    /// let (indptr, indices, last) = block.to_csr(4, 4)?;
    /// assert_eq!((indptr, indices, last), (vec![0, 2, 3], vec![3, 0, 1], vec![1, 2]));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn to_csr(
        &self,
        n_pages: usize,
        page_tokens: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>), Error> {
        let seqs = self.check(n_pages, page_tokens)?;
        let mut indptr = vec![0u32];
        let (mut indices, mut last) = (Vec::new(), Vec::new());
        for s in &seqs {
            indices.extend_from_slice(s.pages);
            let n = u32::try_from(indices.len())
                .map_err(|_| InputError::Overflow("CSR page indices (u32)"))?;
            indptr.push(n);
            last.push(match s.len {
                0 => 0,
                len => (len - (s.pages.len() - 1) * page_tokens) as u32,
            });
        }
        Ok((indptr, indices, last))
    }

    /// The same tables as a block table (`table` of `[B, max_blocks]` with −1 padding, and
    /// `seq_lens`), `max_blocks` the most pages a sequence uses; checked.
    ///
    /// ```
    /// use rotq::pool::PageTables;
    /// let csr = PageTables::Csr { indptr: &[0, 2, 3], indices: &[3, 0, 1], last_page_len: &[1, 2] };
    /// let (table, max_blocks, lens) = csr.to_block(4, 4)?;
    /// assert_eq!((table, max_blocks, lens), (vec![3, 0, 1, -1], 2, vec![5, 2]));
    /// # Ok::<(), rotq::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn to_block(
        &self,
        n_pages: usize,
        page_tokens: usize,
    ) -> Result<(Vec<i32>, usize, Vec<u32>), Error> {
        let seqs = self.check(n_pages, page_tokens)?;
        let max_blocks = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(0);
        let mut table = vec![-1i32; seqs.len() * max_blocks];
        let mut lens = Vec::with_capacity(seqs.len());
        // Row by row over the sequences (not the table's chunks: a batch of empty sequences
        // has a table of no columns, and every sequence still needs its length).
        for (b, s) in seqs.iter().enumerate() {
            let row = &mut table[b * max_blocks..(b + 1) * max_blocks];
            for (cell, &p) in row.iter_mut().zip(s.pages) {
                *cell = i32::try_from(p).map_err(|_| InputError::Overflow("page number (i32)"))?;
            }
            lens.push(u32::try_from(s.len).map_err(|_| InputError::Overflow("length (u32)"))?);
        }
        Ok((table, max_blocks, lens))
    }
}

/// Non-negative `i32` page numbers read as `u32` (the same bits).
fn as_u32(row: &[i32]) -> &[u32] {
    bytemuck::cast_slice(row)
}

fn bad(name: &'static str, reason: String) -> Error {
    InputError::InvalidParameter { name, reason }.into()
}
