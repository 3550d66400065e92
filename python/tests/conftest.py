"""Shared helpers of rotq's test suite: references written independently of rotq.

* :func:`sylvester` -- the unnormalized Sylvester Hadamard matrix built by Kronecker
  products (``H_1 = [[1]]``, ``H_2n = kron(H_2, H_n)``), natural order.
* :func:`ggml_quantize_q4_0` / :func:`ggml_quantize_q8_0` and their dequantizers -- NumPy
  transcriptions of ggml's ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref`` (ggml-quants.c)
  in float32 arithmetic, operation for operation.
* :func:`softmax_attention` -- plain NumPy (float64) softmax attention with GQA.
"""

from __future__ import annotations

import numpy as np
import pytest

QK = 32  # values per block of q4_0 / q8_0

_H2 = np.array([[1.0, 1.0], [1.0, -1.0]])


def sylvester(n: int) -> np.ndarray:
    """Unnormalized Sylvester Hadamard matrix of order ``n`` (a power of two), float64."""
    assert n >= 1 and n & (n - 1) == 0, n
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(_H2, h)
    return h


def hadamard_normalized(n: int) -> np.ndarray:
    return sylvester(n) / np.sqrt(n)


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# ---------------------------------------------------------------------------------------------
# ggml reference codecs (ggml-quants.c, *_ref), float32 arithmetic.
# ---------------------------------------------------------------------------------------------

def _blocks(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.shape[-1] % QK == 0
    return x.reshape(-1, QK)


def _c_int8(f: np.ndarray) -> np.ndarray:
    """C's ``(int8_t)f`` as ggml's x86-64 builds compute it: truncation toward zero to int32
    (``cvttss2si``: NaN and out-of-range values give INT32_MIN, whose low byte is 0), low byte.
    Only the overflow of ``1/d`` for blocks below ~1e-36 reaches the out-of-range case."""
    f = np.asarray(f, dtype=np.float32)
    ok = np.isfinite(f) & (np.abs(f) < 2.0**31)
    t = np.trunc(np.where(ok, f, 0)).astype(np.int64)
    return (t & 0xFF).astype(np.uint8).view(np.int8)


def _roundf(f: np.ndarray) -> np.ndarray:
    """C's ``roundf``: half away from zero (computed exactly in float64)."""
    f64 = f.astype(np.float64)
    return np.sign(f64) * np.floor(np.abs(f64) + 0.5)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1)),
                        np.float32(0)).astype(np.float32)


def ggml_quantize_q4_0(x) -> np.ndarray:
    """``quantize_row_q4_0_ref`` over the last axis: uint8 ``[..., d/32 * 18]``."""
    with np.errstate(all="ignore"):  # f16 overflow of d, 1/d overflow: as ggml computes them
        return _q4_0(x)


def _q4_0(x) -> np.ndarray:
    shape = np.shape(x)
    b = _blocks(x)
    idx = np.argmax(np.abs(b), axis=1)  # first element of largest |x|, as ggml's `<` scan
    mx = b[np.arange(len(b)), idx]
    d = (mx / np.float32(-8)).astype(np.float32)
    inv = _inverse(d)[:, None]
    x0 = (b[:, :16] * inv).astype(np.float32) + np.float32(8.5)
    x1 = (b[:, 16:] * inv).astype(np.float32) + np.float32(8.5)
    q0 = np.minimum(15, _c_int8(x0)).astype(np.uint8)
    q1 = np.minimum(15, _c_int8(x1)).astype(np.uint8)
    out = np.empty((len(b), 18), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q0 | (q1 << 4)
    return out.reshape(*shape[:-1], shape[-1] // QK * 18)


def ggml_dequantize_q4_0(data, dim: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    shape = data.shape
    b = data.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    lo = (b[:, 2:] & 0x0F).astype(np.int32) - 8
    hi = (b[:, 2:] >> 4).astype(np.int32) - 8
    vals = np.concatenate([lo, hi], axis=1).astype(np.float32) * d
    return vals.astype(np.float32).reshape(*shape[:-1], dim)


def ggml_quantize_q8_0(x) -> np.ndarray:
    """``quantize_row_q8_0_ref`` over the last axis: uint8 ``[..., d/32 * 34]``."""
    with np.errstate(all="ignore"):
        return _q8_0(x)


def _q8_0(x) -> np.ndarray:
    shape = np.shape(x)
    b = _blocks(x)
    amax = np.max(np.abs(b), axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = _inverse(d)[:, None]
    q = _c_int8(_roundf((b * inv).astype(np.float32)))  # int8_t = roundf(x)
    out = np.empty((len(b), 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*shape[:-1], shape[-1] // QK * 34)


def ggml_dequantize_q8_0(data, dim: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    shape = data.shape
    b = data.reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).astype(np.float32).reshape(*shape[:-1], dim)


def ggml_scales(data, block_bytes: int) -> np.ndarray:
    """The f16 scale ``d`` of each block (float32), for q4_0/q8_0 bytes."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, block_bytes)
    return b[:, :2].copy().view(np.float16).astype(np.float32).ravel()


# ---------------------------------------------------------------------------------------------
# Attention reference.
# ---------------------------------------------------------------------------------------------

def softmax_attention(q, k, v, causal=False, pos_offset=0, scale=None, mask=None):
    """Plain float64 softmax attention: ``q [n_q, h_q, d]``, ``k [n_kv, h_kv, d]``,
    ``v [n_kv, h_kv, d_v]``; GQA (query head ``h`` reads KV head ``h // (h_q / h_kv)``); query
    ``i`` at position ``pos_offset + i`` sees keys ``j <= pos_offset + i`` when causal.
    Returns ``(out [n_q, h_q, d_v], lse [n_q, h_q])``."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n_q, h_q, d = q.shape
    n_kv, h_kv, _ = k.shape
    group = h_q // h_kv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kh = np.repeat(k, group, axis=1)  # [n_kv, h_q, d]
    vh = np.repeat(v, group, axis=1)
    s = np.einsum("ihd,jhd->hij", q, kh) * scale  # [h_q, n_q, n_kv]
    if mask is not None:
        s = s + np.asarray(mask, dtype=np.float64)[None]
    if causal:
        pos = pos_offset + np.arange(n_q)[:, None]
        s = np.where(np.arange(n_kv)[None, :] <= pos, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    out = np.einsum("hij,jhd->ihd", p / den, vh)
    lse = (np.log(den) + m)[..., 0].T  # [n_q, h_q]
    return out, lse


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def fwht_kron(x) -> np.ndarray:
    """``x @ sylvester(n)`` over the last axis without forming the matrix: ``H_n`` is the
    Kronecker power of ``H_2``, so the product applies ``H_2`` along each binary axis of the
    reshaped rows (float64)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    k = n.bit_length() - 1
    assert 1 << k == n
    y = x.reshape(-1, *([2] * k))
    for axis in range(1, k + 1):
        a = np.take(y, 0, axis=axis)
        b = np.take(y, 1, axis=axis)
        y = np.stack([a + b, a - b], axis=axis)
    return y.reshape(x.shape)


def dao_reference(x, scale: float, base: int = 1) -> np.ndarray:
    """Dao-AILab's ``hadamard_transform{,_mN}(x, scale)`` in float64: ``x`` zero-padded to
    ``n = base * 2^k`` (the smallest such ``n >= dim``), ``y = (M_base kron H_2^k) x`` per row
    (rows are outputs, as ``F.linear``), times ``scale``, cut back to ``dim``. ``M_base`` is
    the unnormalized base matrix (``rotq.oracle.hadamard(m) * sqrt(m)``; ``[[1]]`` for 1)."""
    import rotq

    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[-1]
    p = next_pow2(-(-max(dim, 1) // base))
    n = base * p
    rows = x.reshape(-1, dim)
    padded = np.zeros((rows.shape[0], n))
    padded[:, :dim] = rows
    if base == 1:
        y = fwht_kron(padded)  # H symmetric
    else:
        m = rotq.oracle.hadamard(base) * np.sqrt(base)
        y = padded @ np.kron(m, sylvester(p)).T
    return (y[:, :dim] * scale).reshape(x.shape)
