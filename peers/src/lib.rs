//! `rotq-peers`: safe wrappers over the ggml of the two C/C++ peers rotq's CPU kernels are
//! measured against, llama.cpp (vendored by the `llama-cpp-sys-2` crate) and ik_llama.cpp
//! (vendored by `ik-llama-cpp-sys`):
//!
//! * [`FlashAttn`]: `ggml_flash_attn_ext` with f32 queries `[n_q, h_q, d]` over K and V caches
//!   in f16, q4_0 or q8_0 laid out as llama.cpp lays its cache (token-major: each token's row
//!   holds all KV heads, read through ggml views), GQA, an all-visible or causal KQ mask (or
//!   none), several sequences (one node each) in one graph. The graph is built once by
//!   [`Peer::flash_attn`] and computed by each [`FlashAttn::run`].
//! * [`Rotate`]: f32 rows rotated by llama.cpp's dense `ggml_mul_mat` by the `n × n` Hadamard
//!   matrix (with or without its `GGML_HINT_SRC0_IS_HADAMARD`, which newer llama.cpp turns
//!   into a fast transform), or by ik_llama.cpp's `ggml_hadamard`; optionally followed by a
//!   quantizing `ggml_cpy` to q4_0/q8_0 (how llama.cpp writes a rotated cache).
//! * [`Peer::quantize`]: ggml's q4_0/q8_0 row quantizers.
//!
//! Both peers vendor ggml under the same symbol names, so they cannot be linked into one
//! binary. Each is linked statically into its own shared library (`shim/llama`, `shim/ik`:
//! a small C ABI over the `-sys` crate, its ggml symbols local to the `.so`) and loaded here
//! with `libloading`. `unsafe` is confined to the `ffi` module's calls into those libraries; every
//! wrapper checks its input and returns a [`PeerError`].

use rotq_reference::KvFormat;
use std::ffi::c_char;
use std::path::{Path, PathBuf};

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The shared library could not be loaded, or lacks a symbol.
    #[error("cannot load peer library {path}: {reason} (build it with scripts/peers-setup.sh)")]
    Load {
        /// The library's path.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The library speaks another version of the shim ABI.
    #[error("peer library {path} has ABI version {found}, expected {expected}")]
    Abi {
        /// The library's path.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// A format the peer's kernels do not take here.
    #[error("format {0} is not supported by the peer wrappers (f16, q4_0 and q8_0 are)")]
    Format(KvFormat),
    /// Bad shapes or sizes (checked before ggml sees them).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// What the peer has not (e.g. `ggml_hadamard` in llama.cpp).
    #[error("{peer} does not have {what}")]
    Unsupported {
        /// The peer.
        peer: String,
        /// The missing operation.
        what: &'static str,
    },
    /// ggml's graph computation returned a failure status.
    #[error("ggml_graph_compute failed with status {0}")]
    Compute(i32),
}

/// A `Result` with a [`PeerError`].
pub type Result<T> = std::result::Result<T, PeerError>;

/// Element types of the peers' caches and quantizers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    /// f32 (rotation output only).
    F32,
    /// IEEE half.
    F16,
    /// ggml q4_0 (32 values in 18 bytes).
    Q4_0,
    /// ggml q8_0 (32 values in 34 bytes).
    Q8_0,
}

impl ElemType {
    /// The type of a registry format, if the peers take it.
    ///
    /// ```
    /// use rotq_peers::ElemType;
    /// use rotq_reference::KvFormat;
    /// assert_eq!(ElemType::of(KvFormat::Q4_0).unwrap(), ElemType::Q4_0);
    /// assert!(ElemType::of(KvFormat::Fp8E4m3).is_err());
    /// ```
    pub fn of(format: KvFormat) -> Result<Self> {
        Ok(match format {
            KvFormat::F32 => Self::F32,
            KvFormat::F16 => Self::F16,
            KvFormat::Q4_0 => Self::Q4_0,
            KvFormat::Q8_0 => Self::Q8_0,
            other => return Err(PeerError::Format(other)),
        })
    }

    fn code(self) -> i32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 3,
        }
    }

    /// Bytes of a row of `n` values (`None` unless a whole number of blocks).
    ///
    /// ```
    /// use rotq_peers::ElemType;
    /// assert_eq!(ElemType::Q4_0.row_bytes(128), Some(72));
    /// assert_eq!(ElemType::Q8_0.row_bytes(100), None);
    /// ```
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        match self {
            Self::F32 => n.checked_mul(4),
            Self::F16 => n.checked_mul(2),
            Self::Q4_0 => n.is_multiple_of(32).then_some(n / 32 * 18),
            Self::Q8_0 => n.is_multiple_of(32).then_some(n / 32 * 34),
        }
    }
}

/// Which of the two peers a library is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// llama.cpp, from `llama-cpp-sys-2` (`shim/llama`).
    LlamaCpp,
    /// ik_llama.cpp, from `ik-llama-cpp-sys` (`shim/ik`).
    IkLlamaCpp,
}

impl PeerKind {
    /// The peer's name, as the benchmark's rows name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlamaCpp => "llama.cpp",
            Self::IkLlamaCpp => "ik_llama.cpp",
        }
    }

    /// The environment variable that overrides the library's path.
    pub fn env_var(self) -> &'static str {
        match self {
            Self::LlamaCpp => "ROTQ_PEER_LLAMA",
            Self::IkLlamaCpp => "ROTQ_PEER_IK",
        }
    }

    /// Where `scripts/peers-setup.sh` builds the library (`peers/target/native/release`),
    /// unless the environment variable [`Self::env_var`] names another path.
    pub fn default_path(self) -> PathBuf {
        if let Some(p) = std::env::var_os(self.env_var()) {
            return p.into();
        }
        let file = match self {
            Self::LlamaCpp => "librotq_peer_llama.so",
            Self::IkLlamaCpp => "librotq_peer_ik.so",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/native/release")
            .join(file)
    }
}

mod ffi;

/// One loaded peer library.
pub struct Peer {
    kind: PeerKind,
    api: ffi::Api,
    info: String,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("kind", &self.kind)
            .field("info", &self.info)
            .finish()
    }
}

/// A flash-attention problem for [`Peer::flash_attn`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashAttnSpec {
    /// K cache element type.
    pub k_type: ElemType,
    /// V cache element type.
    pub v_type: ElemType,
    /// Sequences, each with its own caches (its own `ggml_flash_attn_ext` node).
    pub n_seq: usize,
    /// Cached tokens per sequence.
    pub n_kv: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Head dimension (a multiple of 32).
    pub d: usize,
    /// Query heads (a multiple of `h_kv`: GQA).
    pub h_q: usize,
    /// Query rows per sequence (1 for decode).
    pub n_q: usize,
    /// The KQ mask passed to ggml.
    pub mask: MaskKind,
    /// Score scale (`1/√d` in llama.cpp).
    pub scale: f32,
    /// Threads of the graph computation.
    pub n_threads: usize,
}

/// The KQ mask of a [`FlashAttnSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// No mask (ik_llama.cpp then leaves its fast `iqk` path).
    None,
    /// Every key visible (a zero mask, what an engine passes at decode).
    AllVisible,
    /// Causal: query row `i` is at position `pos_offset + i` and sees keys up to it.
    Causal {
        /// Position of query row 0.
        pos_offset: usize,
    },
}

impl FlashAttnSpec {
    /// A decode step (one query row per sequence, all keys visible) with scale `1/√d`.
    pub fn decode(
        format: ElemType,
        n_seq: usize,
        n_kv: usize,
        h_kv: usize,
        d: usize,
        h_q: usize,
        n_threads: usize,
    ) -> Self {
        Self {
            k_type: format,
            v_type: format,
            n_seq,
            n_kv,
            h_kv,
            d,
            h_q,
            n_q: 1,
            mask: MaskKind::AllVisible,
            scale: 1.0 / (d as f32).sqrt(),
            n_threads,
        }
    }

    /// Bytes of the K and V caches of all sequences.
    pub fn cache_bytes(&self) -> Result<(usize, usize)> {
        let rows = self
            .n_seq
            .checked_mul(self.n_kv)
            .and_then(|r| r.checked_mul(self.h_kv))
            .ok_or_else(|| PeerError::Invalid("cache size overflows".into()))?;
        let size = |t: ElemType| {
            t.row_bytes(self.d)
                .and_then(|r| r.checked_mul(rows))
                .ok_or_else(|| {
                    PeerError::Invalid(format!(
                        "d = {} is not a whole number of {t:?} blocks",
                        self.d
                    ))
                })
        };
        Ok((size(self.k_type)?, size(self.v_type)?))
    }

    /// Values of the queries (and of the output): `n_seq · n_q · h_q · d`.
    pub fn q_len(&self) -> usize {
        self.n_seq * self.n_q * self.h_q * self.d
    }

    fn check(&self, k: &[u8], v: &[u8]) -> Result<()> {
        let bad = |m: String| Err(PeerError::Invalid(m));
        if [
            self.n_seq,
            self.n_kv,
            self.h_kv,
            self.d,
            self.h_q,
            self.n_q,
            self.n_threads,
        ]
        .contains(&0)
        {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if !self.h_q.is_multiple_of(self.h_kv) {
            return bad(format!(
                "h_q {} is not a multiple of h_kv {}",
                self.h_q, self.h_kv
            ));
        }
        if self.k_type == ElemType::F32 || self.v_type == ElemType::F32 {
            return bad("the caches must be f16, q4_0 or q8_0".into());
        }
        if !self.scale.is_finite() {
            return bad("scale must be finite".into());
        }
        let (kb, vb) = self.cache_bytes()?;
        if k.len() != kb || v.len() != vb {
            return bad(format!(
                "caches are {} and {} bytes, expected {kb} and {vb}",
                k.len(),
                v.len()
            ));
        }
        Ok(())
    }
}

/// Flash attention of one peer over caches it reads in place (see [`Peer::flash_attn`]).
pub struct FlashAttn<'a> {
    peer: &'a Peer,
    handle: ffi::FaHandle,
    spec: FlashAttnSpec,
    _caches: (&'a [u8], &'a [u8]),
}

impl FlashAttn<'_> {
    /// Computes the graph for queries `q` (`[n_seq, n_q, h_q, d]`, already rotated as the
    /// cache's keys are) into `out` (same shape).
    pub fn run(&mut self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.spec.q_len();
        if q.len() != n || out.len() != n {
            return Err(PeerError::Invalid(format!(
                "queries and output hold {} and {} values, expected {n}",
                q.len(),
                out.len()
            )));
        }
        self.peer.api.fa_run(&mut self.handle, q, out)
    }

    /// The problem.
    pub fn spec(&self) -> &FlashAttnSpec {
        &self.spec
    }
}

impl Drop for FlashAttn<'_> {
    fn drop(&mut self) {
        self.peer.api.fa_free(&mut self.handle);
    }
}

/// The rotation of a [`Rotate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationKind {
    /// llama.cpp's rotation as its PR 21038 introduced it: `ggml_mul_mat` of the rows by the
    /// dense `n × n` Hadamard matrix (an f32 GEMM).
    DenseMatmul,
    /// The same `ggml_mul_mat` tagged `GGML_HINT_SRC0_IS_HADAMARD`, which llama.cpp's CPU
    /// backend now computes as a fast Walsh–Hadamard transform (llama.cpp only).
    HintedMatmul,
    /// ik_llama.cpp's `ggml_hadamard` op (ik_llama.cpp only).
    HadamardOp,
}

impl RotationKind {
    fn code(self) -> i32 {
        match self {
            Self::DenseMatmul => 0,
            Self::HintedMatmul => 1,
            Self::HadamardOp => 2,
        }
    }
}

/// A rotation graph over rows it reads and an output it writes in place (see
/// [`Peer::rotate`]).
pub struct Rotate<'a> {
    peer: &'a Peer,
    handle: ffi::RotHandle,
    _x: &'a [f32],
    out: &'a mut [u8],
}

impl Rotate<'_> {
    /// Computes the graph: the output now holds the rotated (and maybe quantized) rows.
    pub fn run(&mut self) -> Result<()> {
        self.peer.api.rot_run(&mut self.handle)
    }

    /// The output buffer (what the last [`Self::run`] wrote).
    pub fn output(&self) -> &[u8] {
        self.out
    }
}

impl Drop for Rotate<'_> {
    fn drop(&mut self) {
        self.peer.api.rot_free(&mut self.handle);
    }
}

/// Which of ggml's quantizers [`Peer::quantize`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizePath {
    /// `ggml_quantize_chunk`: the reference rows (`quantize_row_*_ref`), as in model files.
    Reference,
    /// The CPU backend's `from_float` (`quantize_row_q4_0`/`quantize_row_q8_0`, SIMD where
    /// ggml has it): what a quantizing copy into the KV cache calls.
    CpuFromFloat,
}

impl Peer {
    /// Loads the peer's library from `path`.
    pub fn load(kind: PeerKind, path: &Path) -> Result<Self> {
        let api = ffi::Api::load(path)?;
        let info = api.info();
        Ok(Self { kind, api, info })
    }

    /// Loads the peer from its default path ([`PeerKind::default_path`]).
    pub fn load_default(kind: PeerKind) -> Result<Self> {
        Self::load(kind, &kind.default_path())
    }

    /// Which peer this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The library's own description: peer, crate version, CPU features ggml was built with.
    pub fn info(&self) -> &str {
        &self.info
    }

    /// Builds the flash-attention graph of `spec` over caches `k` and `v` (all sequences,
    /// sequence after sequence, each `[n_kv, h_kv, d]` in its format: rotq's cache layout and
    /// bytes), read in place for as long as the result lives.
    pub fn flash_attn<'a>(
        &'a self,
        spec: &FlashAttnSpec,
        k: &'a [u8],
        v: &'a [u8],
    ) -> Result<FlashAttn<'a>> {
        spec.check(k, v)?;
        let handle = self.api.fa_new(spec, k, v)?;
        Ok(FlashAttn {
            peer: self,
            handle,
            spec: *spec,
            _caches: (k, v),
        })
    }

    /// Builds a graph that rotates the rows of `x` (each `n` values, `n` a power of two) by
    /// `kind` and writes them to `out` as `out_type` (f32, or q4_0/q8_0 through a quantizing
    /// copy), with `n_threads` threads.
    pub fn rotate<'a>(
        &'a self,
        kind: RotationKind,
        n: usize,
        x: &'a [f32],
        out_type: ElemType,
        out: &'a mut [u8],
        n_threads: usize,
    ) -> Result<Rotate<'a>> {
        if !n.is_power_of_two()
            || n < 2
            || x.is_empty()
            || !x.len().is_multiple_of(n)
            || n_threads == 0
        {
            return Err(PeerError::Invalid(format!(
                "{} values are not whole rows of a power of two n = {n} (threads {n_threads})",
                x.len()
            )));
        }
        let supported = match kind {
            RotationKind::DenseMatmul => true,
            RotationKind::HintedMatmul => self.kind == PeerKind::LlamaCpp,
            RotationKind::HadamardOp => self.kind == PeerKind::IkLlamaCpp,
        };
        if !supported {
            return Err(PeerError::Unsupported {
                peer: self.kind.name().into(),
                what: match kind {
                    RotationKind::HintedMatmul => "the GGML_HINT_SRC0_IS_HADAMARD mul_mat hint",
                    _ => "ggml_hadamard",
                },
            });
        }
        if out_type == ElemType::F16 {
            return Err(PeerError::Invalid(
                "the output must be f32, q4_0 or q8_0".into(),
            ));
        }
        let rows = x.len() / n;
        let want = out_type
            .row_bytes(n)
            .and_then(|r| r.checked_mul(rows))
            .ok_or_else(|| {
                PeerError::Invalid(format!(
                    "n = {n} is not a whole number of {out_type:?} blocks"
                ))
            })?;
        if out.len() != want {
            return Err(PeerError::Invalid(format!(
                "output is {} bytes, expected {want}",
                out.len()
            )));
        }
        let handle = self
            .api
            .rot_new(kind.code(), n, rows, out_type.code(), n_threads, x, out)?;
        Ok(Rotate {
            peer: self,
            handle,
            _x: x,
            out,
        })
    }

    /// Quantizes `x` (a whole number of 32-value blocks) to `ty` (q4_0 or q8_0) with ggml's
    /// quantizer `path`.
    pub fn quantize(&self, ty: ElemType, path: QuantizePath, x: &[f32]) -> Result<Vec<u8>> {
        if !matches!(ty, ElemType::Q4_0 | ElemType::Q8_0) {
            return Err(PeerError::Invalid(format!("{ty:?} is not q4_0 or q8_0")));
        }
        let len = ty
            .row_bytes(x.len())
            .filter(|_| !x.is_empty())
            .ok_or_else(|| {
                PeerError::Invalid(format!("{} values are not whole blocks of 32", x.len()))
            })?;
        let mut out = vec![0u8; len];
        let path = match path {
            QuantizePath::Reference => 0,
            QuantizePath::CpuFromFloat => 1,
        };
        self.api.quantize(ty.code(), path, x, &mut out)?;
        Ok(out)
    }
}

/// The text of a nul-terminated message the shim wrote into `buf`.
fn c_message(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
