//! Batch attention over a pool: a step's sequences, each with its own query rows (decode rows
//! and prefill or chunked-prefill rows mixed), planned once and run per layer.
//!
//! **Semantics** (the oracle's, sequence by sequence: a batch gives exactly what its
//! sequences give run one by one). Sequence `b`'s query rows are
//! `query_start_loc[b]..query_start_loc[b + 1]` of `q` (`[rows, h_q, head_dim]`); its keys are
//! its `len` tokens, key `j` at position `j`. Its first query row sits at position
//! `q_positions[b]` when given, else at `len − n_q` (the rows are the sequence's newest tokens,
//! appended before the attention, as vLLM does), so a causal mask lets row `i` see keys
//! `0..=pos + i`. Window and soft-cap apply to every sequence; an additive [`Mask`] adds a
//! value per (row, key) after the soft-cap, `−∞` hiding the key. The output is
//! `[rows, h_q, v_dim]`, V's rotation undone; the log-sum-exp is `[rows, h_q]`, natural log
//! of the sum of exponentiated scores (scale, soft-cap and mask applied): `−∞` for a row that
//! sees no key.

use super::tables::PageTables;
use super::KvPool;
use crate::reference::{AttentionParams, Error as InputError};
use crate::Error;
use rotq_cpu::{AttentionMask, BatchPlan, KvCacheView, SeqAttention};

/// An additive mask over a batch's query rows and their sequences' keys (llama.cpp's KQ
/// mask): the value for the batch's query row `r` (a global row, counted across sequences)
/// and key `j` of its sequence is `values[r · row_stride + j]`. `row_stride` is at least the
/// longest sequence's length.
///
/// ```
/// use rotq::pool::Mask;
/// // 2 query rows over keys of sequences of at most 3 tokens.
/// let values = [0.0, 0.0, f32::NEG_INFINITY, 0.0, -1.0, 0.0];
/// let mask = Mask { values: &values, row_stride: 3 };
/// assert_eq!(mask.row_stride, 3);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// `[rows, row_stride]`.
    pub values: &'a [f32],
    /// Values per query row.
    pub row_stride: usize,
}

/// One step's batch (see the module docs).
///
/// ```
/// use rotq::pool::{Batch, PageTables};
/// let tables = PageTables::Block { table: &[0, 1], max_blocks: 1, seq_lens: &[9, 3] };
/// // Sequence 0 prefills its last 4 tokens, sequence 1 decodes one; 8 query heads.
/// let batch = Batch::new(&[0, 4, 5], tables, 8);
/// assert_eq!(batch.rows(), 5);
/// assert!(batch.params.causal);
/// ```
#[derive(Clone, Debug)]
pub struct Batch<'a> {
    /// `B + 1` offsets of the sequences' query rows, from 0, never decreasing.
    pub query_start_loc: &'a [u32],
    /// The sequences' pages and lengths.
    pub tables: PageTables<'a>,
    /// Query heads (a multiple of the pool's KV heads).
    pub h_q: usize,
    /// Scale, causality, window and soft-cap for every sequence (`pos_offset` is not read:
    /// see `q_positions`).
    pub params: AttentionParams,
    /// Position of each sequence's first query row (`None`: `len − n_q`).
    pub q_positions: Option<&'a [u32]>,
    /// An additive mask, if any.
    pub mask: Option<Mask<'a>>,
}

impl<'a> Batch<'a> {
    /// A causal batch with no window, soft-cap or mask, and the default scale.
    pub fn new(query_start_loc: &'a [u32], tables: PageTables<'a>, h_q: usize) -> Self {
        Self {
            query_start_loc,
            tables,
            h_q,
            params: AttentionParams {
                causal: true,
                ..Default::default()
            },
            q_positions: None,
            mask: None,
        }
    }

    /// Query rows in the batch.
    pub fn rows(&self) -> usize {
        self.query_start_loc.last().map_or(0, |&r| r as usize)
    }

    /// Checks the query offsets against the tables: `B + 1` of them, from 0, never
    /// decreasing, and (without `q_positions`) no sequence with more rows than tokens.
    fn check_rows(&self, lens: &[usize]) -> Result<(), Error> {
        let loc = self.query_start_loc;
        if loc.len() != lens.len() + 1 {
            return Err(InputError::LengthMismatch {
                what: "query_start_loc (B + 1 offsets)",
                expected: lens.len() + 1,
                actual: loc.len(),
            }
            .into());
        }
        if loc[0] != 0 || loc.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad(
                "query_start_loc",
                "must start at 0 and never decrease".into(),
            ));
        }
        if let Some(p) = self.q_positions {
            if p.len() != lens.len() {
                return Err(InputError::LengthMismatch {
                    what: "q_positions (one per sequence)",
                    expected: lens.len(),
                    actual: p.len(),
                }
                .into());
            }
        } else if let Some(b) = (0..lens.len()).find(|&b| (loc[b + 1] - loc[b]) as usize > lens[b])
        {
            return Err(bad(
                "query_start_loc",
                format!(
                    "sequence {b} has {} query rows but {} tokens: append the rows' keys first, or give q_positions",
                    loc[b + 1] - loc[b],
                    lens[b]
                ),
            ));
        }
        if let Some(m) = self.mask {
            let longest = lens.iter().copied().max().unwrap_or(0);
            if m.row_stride < longest {
                return Err(bad(
                    "mask",
                    format!(
                        "a row stride of {} is shorter than the longest sequence ({longest} tokens)",
                        m.row_stride
                    ),
                ));
            }
            let need = self
                .rows()
                .checked_mul(m.row_stride)
                .ok_or(InputError::Overflow("mask"))?;
            if m.values.len() < need {
                return Err(InputError::LengthMismatch {
                    what: "mask values [rows, row_stride]",
                    expected: need,
                    actual: m.values.len(),
                }
                .into());
            }
        }
        self.params.validate()?;
        Ok(())
    }
}

/// A batch's attention, planned: the kernels' partition and the sizes of the buffers
/// [`KvPool::run`] takes. Made by [`KvPool::plan`] once per step; valid for every layer's pool
/// of the same spec and the same batch.
#[derive(Clone, Debug)]
pub struct AttentionPlan {
    kernel: BatchPlan,
    /// Each sequence's (query rows, tokens), to refuse another batch.
    shape: Vec<(usize, usize)>,
    /// Each sequence's parameters (the batch's, at its first row's position).
    params: Vec<AttentionParams>,
    /// What they were made from, to refuse a batch whose parameters changed.
    base: (AttentionParams, Option<Vec<u32>>),
    q_len: usize,
}

impl AttentionPlan {
    /// `f32` values of workspace `run` needs.
    pub fn workspace_len(&self) -> usize {
        self.kernel.workspace_len()
    }

    /// `f32` values of output (`[rows, h_q, v_dim]`).
    pub fn out_len(&self) -> usize {
        self.kernel.out_len()
    }

    /// `f32` values of log-sum-exp (`[rows, h_q]`).
    pub fn lse_len(&self) -> usize {
        self.kernel.lse_len()
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> KvPool<B> {
    /// Checks a batch (its tables against this pool: pages inside it, none twice in a
    /// sequence, lengths within the tables; its rows, mask and parameters) and plans its
    /// attention. Everything wrong is a typed error here, before any step runs.
    pub fn plan(&self, batch: &Batch<'_>) -> Result<AttentionPlan, Error> {
        let seqs = batch
            .tables
            .check(self.spec.n_pages, self.spec.page_tokens)?;
        let lens: Vec<usize> = seqs.iter().map(|s| s.len).collect();
        batch.check_rows(&lens)?;
        let q_len = batch
            .rows()
            .checked_mul(batch.h_q)
            .and_then(|x| x.checked_mul(self.spec.head_dim))
            .ok_or(InputError::Overflow("queries"))?;
        // The kernels plan from shapes: stand-in queries of the right length.
        let q = vec![0f32; q_len];
        let params = self.params_of(batch, &lens);
        let views = self.seqs(batch, &q, &params)?;
        let kernel = self.attention.plan(&views)?;
        drop(views);
        let loc = batch.query_start_loc;
        Ok(AttentionPlan {
            kernel,
            shape: (0..lens.len())
                .map(|b| ((loc[b + 1] - loc[b]) as usize, lens[b]))
                .collect(),
            params,
            base: (batch.params.clone(), batch.q_positions.map(<[u32]>::to_vec)),
            q_len,
        })
    }

    /// Runs a planned batch's attention on this pool: `q` is `[rows, h_q, head_dim]`
    /// (unrotated), `out` receives `[rows, h_q, v_dim]` and `lse`, if given, `[rows, h_q]`.
    /// `workspace` holds [`AttentionPlan::workspace_len`] values. Buffers of the wrong length,
    /// or a batch of other shapes than the plan's, are typed errors before any work.
    pub fn run(
        &self,
        plan: &AttentionPlan,
        batch: &Batch<'_>,
        q: &[f32],
        workspace: &mut [f32],
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<(), Error> {
        if q.len() != plan.q_len {
            return Err(InputError::LengthMismatch {
                what: "queries [rows, h_q, head_dim]",
                expected: plan.q_len,
                actual: q.len(),
            }
            .into());
        }
        let pt = self.spec.page_tokens;
        let loc = batch.query_start_loc;
        let same = batch.params == plan.base.0
            && batch.q_positions == plan.base.1.as_deref()
            && batch.tables.len() == plan.shape.len()
            && loc.len() == plan.shape.len() + 1
            && plan.shape.iter().enumerate().all(|(b, &(n_q, len))| {
                batch.tables.seq(b, pt).is_ok_and(|s| s.len == len)
                    && loc[b + 1].checked_sub(loc[b]).map(|n| n as usize) == Some(n_q)
            });
        if !same {
            return Err(bad(
                "plan",
                "the batch's sequences or parameters differ from the ones it was planned for"
                    .into(),
            ));
        }
        let views = self.seqs(batch, q, &plan.params)?;
        Ok(self
            .attention
            .run_planned(&plan.kernel, &views, workspace, out, lse)?)
    }

    /// Each sequence's parameters: the batch's, at its first query row's position.
    fn params_of(&self, batch: &Batch<'_>, lens: &[usize]) -> Vec<AttentionParams> {
        let loc = batch.query_start_loc;
        (0..lens.len())
            .map(|b| AttentionParams {
                pos_offset: match batch.q_positions {
                    Some(p) => p[b] as usize,
                    None => lens[b] - (loc[b + 1] - loc[b]) as usize,
                },
                ..batch.params.clone()
            })
            .collect()
    }

    /// The kernels' view of each sequence (pages read in place).
    fn seqs<'s>(
        &'s self,
        batch: &Batch<'s>,
        q: &'s [f32],
        params: &'s [AttentionParams],
    ) -> Result<Vec<SeqAttention<'s>>, Error> {
        let (s, pt) = (&self.spec, self.spec.page_tokens);
        let loc = batch.query_start_loc;
        let per_row = batch.h_q * s.head_dim;
        (0..params.len())
            .map(|b| {
                let pages = batch.tables.seq(b, pt)?;
                let (r0, r1) = (loc[b] as usize, loc[b + 1] as usize);
                let view = |format, bytes, dim| {
                    KvCacheView::paged(format, bytes, pages.pages, pt, pages.len, s.n_kv_heads, dim)
                };
                Ok(SeqAttention {
                    q: &q[r0 * per_row..r1 * per_row],
                    n_q: r1 - r0,
                    h_q: batch.h_q,
                    k: view(s.k_format, self.k.as_ref(), s.head_dim)?,
                    v: view(s.v_format, self.v.as_ref(), s.v_dim)?,
                    params: &params[b],
                    mask: batch.mask.map(|m| AttentionMask {
                        values: &m.values[(r0 * m.row_stride).min(m.values.len())..],
                        row_stride: m.row_stride,
                    }),
                })
            })
            .collect()
    }
}

fn bad(name: &'static str, reason: String) -> Error {
    InputError::InvalidParameter { name, reason }.into()
}
