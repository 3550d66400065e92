//! Where [`super::RotatedKvCache`]'s tokens live: a pool of pages, a block table mapping the
//! sequence's pages to the pool's, and the pages not in the table. A contiguous cache is one
//! page of its whole capacity, so both layouts share this bookkeeping and every backend only
//! sees token slots: token `t` is in slot `table[t / page_tokens] · page_tokens + t %
//! page_tokens`, its rows `slot · n_heads ..`.

use super::Paging;
use crate::reference::Error as InputError;
use crate::Error;
use std::ops::Range;

/// Tokens that sit in consecutive slots: logical tokens `token ..`, slots `slot ..`, `len` of
/// each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub token: usize,
    pub slot: usize,
    pub len: usize,
}

/// A copy of `len` token slots from slot `from` to slot `to` (the two spans disjoint, or
/// `to < from`: a copy from the front is right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Move {
    pub from: usize,
    pub to: usize,
    pub len: usize,
}

/// The block table and free pages of one cache.
#[derive(Clone, Debug)]
pub(super) struct Pages {
    /// Tokens per page (a contiguous cache: its capacity, at least 1).
    page_tokens: usize,
    /// Whether the engine sees pages (a contiguous cache's one page is an inner detail).
    paged: bool,
    /// Pages in the pool.
    n_pages: usize,
    /// Page `i` of the sequence is pool page `table[i]`.
    table: Vec<u32>,
    /// Pages given back, the next to take last.
    free: Vec<u32>,
    /// Pages from here to `n_pages` were never taken.
    fresh: usize,
}

impl Pages {
    /// The pages of a cache of `capacity` tokens laid out as `paging` says: whole pages, at
    /// least `capacity` tokens. A page of no tokens, more pages than a `u32` table entry names,
    /// or more slots than a `usize` counts, is an error.
    pub fn new(paging: Paging, capacity: usize) -> Result<Self, Error> {
        let (page_tokens, paged) = match paging {
            Paging::Contiguous => (capacity.max(1), false),
            Paging::Paged { page_tokens: 0 } => {
                return Err(InputError::InvalidParameter {
                    name: "page_tokens",
                    reason: "a page holds at least one token".into(),
                }
                .into())
            }
            Paging::Paged { page_tokens } => (page_tokens, true),
        };
        let n_pages = capacity.div_ceil(page_tokens);
        if u32::try_from(n_pages).is_err() || n_pages.checked_mul(page_tokens).is_none() {
            return Err(
                InputError::Overflow("cache pages (u32 table entries, usize slots)").into(),
            );
        }
        Ok(Self {
            page_tokens,
            paged,
            n_pages,
            table: Vec::new(),
            free: Vec::new(),
            fresh: 0,
        })
    }

    /// Tokens per page (a contiguous cache: its capacity, at least 1).
    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    /// Token slots of the pool (whole pages).
    pub fn slots(&self) -> usize {
        self.n_pages * self.page_tokens
    }

    /// The block table and tokens per page of a paged cache (`None`: contiguous, token `t` in
    /// slot `t`), as the kernels take them.
    pub fn paged(&self) -> Option<(&[u32], usize)> {
        self.paged.then_some((&self.table, self.page_tokens))
    }

    /// The slot of token `t` (whose page is in the table).
    fn slot(&self, t: usize) -> usize {
        self.table[t / self.page_tokens] as usize * self.page_tokens + t % self.page_tokens
    }

    /// The runs of `tokens` (whose pages are in the table), in order, split at page ends.
    pub fn runs(&self, tokens: Range<usize>) -> impl Iterator<Item = Run> + '_ {
        let mut t = tokens.start;
        std::iter::from_fn(move || {
            (t < tokens.end).then(|| {
                let len = (self.page_tokens - t % self.page_tokens).min(tokens.end - t);
                let run = Run {
                    token: t,
                    slot: self.slot(t),
                    len,
                };
                t += len;
                run
            })
        })
    }

    /// Takes pages into the table until it covers `len` tokens (at most the capacity): given
    /// back ones first.
    pub fn grow(&mut self, len: usize) -> Result<(), Error> {
        while self.table.len() < len.div_ceil(self.page_tokens) {
            let page = match self.free.pop() {
                Some(page) => page,
                None if self.fresh < self.n_pages => {
                    self.fresh += 1;
                    // Fits: n_pages fits a u32.
                    (self.fresh - 1) as u32
                }
                None => {
                    return Err(InputError::InvalidParameter {
                        name: "append",
                        reason: format!("{len} tokens need more than the pool's pages"),
                    }
                    .into())
                }
            };
            self.table.push(page);
        }
        Ok(())
    }

    /// Gives back the table's pages past those of `len` tokens.
    pub fn shrink(&mut self, len: usize) {
        let keep = len.div_ceil(self.page_tokens).min(self.table.len());
        self.free.extend(self.table.drain(keep..).rev());
    }

    /// Drops tokens `cut` of the `len` held (a checked range): returns the copies to make, in
    /// order, before the table changes (slots of the old table), and updates the table. A cut
    /// of whole pages' worth of tokens before the last token leaves the later tokens in their
    /// slots: the table loses those pages (given back), and only the kept tokens before the cut
    /// in its first page move, into the page of the token after the cut. Any other cut moves
    /// every later token down, run by run (none for a cut of the newest tokens), and gives back
    /// the pages no longer used.
    pub fn remove(&mut self, cut: Range<usize>, len: usize) -> Vec<Move> {
        let (pt, n) = (self.page_tokens, cut.len());
        let mut moves = Vec::new();
        if n == 0 {
            return moves;
        }
        if n.is_multiple_of(pt) && cut.end < len {
            let (first, pages, head) = (cut.start / pt, n / pt, cut.start % pt);
            if head > 0 {
                // Token cut.end sits at slot `head` of page first + pages, whose slots before
                // it hold cut tokens.
                moves.push(Move {
                    from: self.table[first] as usize * pt,
                    to: self.table[first + pages] as usize * pt,
                    len: head,
                });
            }
            let dropped: Vec<u32> = self.table.drain(first..first + pages).collect();
            self.free.extend(dropped.into_iter().rev());
            return moves;
        }
        let mut t = cut.end;
        while t < len {
            let run = (pt - t % pt).min(pt - (t - n) % pt).min(len - t);
            moves.push(Move {
                from: self.slot(t),
                to: self.slot(t - n),
                len: run,
            });
            t += run;
        }
        self.shrink(len - n);
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logical token → slot, for the first `len` tokens.
    fn slots(p: &Pages, len: usize) -> Vec<usize> {
        p.runs(0..len)
            .flat_map(|r| r.slot..r.slot + r.len)
            .collect()
    }

    /// Every cut of a paged and of a contiguous cache moves the token slots as a plain
    /// `Vec::drain` of the tokens would, and keeps every page either in the table or free.
    #[test]
    fn removal_keeps_tokens_in_order() {
        for paging in [Paging::Contiguous, Paging::Paged { page_tokens: 4 }] {
            for len in 0..=13 {
                for a in 0..=len {
                    for b in a..=len {
                        let mut p = Pages::new(paging, 13).unwrap();
                        p.grow(len).unwrap();
                        // What each slot holds: the token written there.
                        let mut pool = vec![usize::MAX; p.slots()];
                        for (t, s) in slots(&p, len).into_iter().enumerate() {
                            pool[s] = t;
                        }
                        for m in p.remove(a..b, len) {
                            pool.copy_within(m.from..m.from + m.len, m.to);
                        }
                        let mut want: Vec<usize> = (0..len).collect();
                        want.drain(a..b);
                        let got: Vec<usize> = slots(&p, len - (b - a))
                            .into_iter()
                            .map(|s| pool[s])
                            .collect();
                        assert_eq!(got, want, "{paging:?} len {len} cut {a}..{b}");
                        let mut all: Vec<u32> = p.table.iter().chain(&p.free).copied().collect();
                        all.extend(p.fresh as u32..p.n_pages as u32);
                        all.sort();
                        assert_eq!(all, (0..p.n_pages as u32).collect::<Vec<_>>());
                    }
                }
            }
        }
    }

    #[test]
    fn pages_given_back_are_taken_first() {
        let mut p = Pages::new(Paging::Paged { page_tokens: 4 }, 16).unwrap();
        p.grow(12).unwrap();
        assert_eq!(p.table, [0, 1, 2]);
        assert!(p.remove(4..8, 12).is_empty());
        assert_eq!(p.table, [0, 2]);
        p.grow(16).unwrap();
        assert_eq!(p.table, [0, 2, 1, 3]);
        assert!(p.grow(17).is_err());
        assert!(Pages::new(Paging::Paged { page_tokens: 0 }, 16).is_err());
    }
}
