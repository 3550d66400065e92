"""The f64 reference of rotq's spec, to check other kernels against what rotq's kernels are
checked against: the normalized Hadamard matrix, rotations, the formats' reference codecs,
exact attention (with its log-sum-exp) and the rotated, quantized attention of a cache.

>>> import numpy as np, rotq
>>> h = rotq.oracle.hadamard(4)
>>> bool(np.allclose(h @ h.T, np.eye(4)))
True
"""

from __future__ import annotations

import numpy as np

from . import _rotq

__all__ = ["attention", "dequantize", "hadamard", "quantize", "quantized_query", "rotate",
           "rotated_quantized_attention"]


def hadamard(n: int) -> np.ndarray:
    """The normalized Hadamard matrix ``H_n`` of the spec (float64, ``[n, n]``): Sylvester for
    powers of two, ``M_m ⊗ H_2^k / √n`` for ``n = m·2^k``, ``m`` in 12, 20, 28, 40."""
    out = np.empty((n, n), dtype=np.float64)
    _rotq.oracle_hadamard(out, n)
    return out


def rotate(x, rotation, inverse: bool = False) -> np.ndarray:
    """The rows of ``x`` (last axis) rotated in float64."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _rotq.oracle_rotate(x, out, rotation, inverse)
    return out


def quantize(x, format: str) -> np.ndarray:
    """The reference encoding of the rows of ``x`` (float32) in ``format``: uint8
    ``[..., row_bytes]``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((*x.shape[:-1], _rotq.row_bytes(format, x.shape[-1])), dtype=np.uint8)
    _rotq.oracle_quantize(x, out, format)
    return out


def dequantize(data, format: str, dim: int) -> np.ndarray:
    """The reference decoding of rows of cache bytes (uint8 ``[..., row_bytes]``) into
    float32 ``[..., dim]``."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((*data.shape[:-1], dim), dtype=np.float32)
    _rotq.oracle_dequantize(data, out, format)
    return out


def quantized_query(q) -> np.ndarray:
    """Query rows (last axis a multiple of 32) through q8_0 and back, float32: what a kernel
    with q8_0 queries (``query="q8_0"``, or ``"auto"`` over rotated q4_0/q8_0 K) multiplies.
    Give it the rows as the kernel rotated them (``rotq.rotate``), then attend with them.

    >>> import numpy as np, rotq
    >>> q = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> bool(np.abs(rotq.oracle.quantized_query(q) - q).max() <= 1 / 226)
    True
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    return dequantize(quantize(q, "q8_0"), "q8_0", q.shape[-1])


def attention(q, k, v, causal: bool = False, pos_offset: int = 0, scale=None, window=None,
              softcap=None, mask=None):
    """Exact attention in float64: ``q [n_q, h_q, d]``, ``k [n_kv, h_kv, d]``,
    ``v [n_kv, h_kv, d_v]`` (GQA when ``h_q`` is a multiple of ``h_kv``). Query ``i`` sits at
    position ``pos_offset + i``; ``window``, ``softcap`` and an additive ``mask``
    ``[n_q, n_kv]`` as in the kernels. Returns ``(out [n_q, h_q, d_v], lse [n_q, h_q])``
    (natural log-sum-exp of each row's scores; -inf for a row that sees no key)."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.float64) for a in (q, k, v))
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.float64)
    out = np.empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=np.float64)
    lse = np.empty((q.shape[0], q.shape[1]), dtype=np.float64)
    _rotq.oracle_attention(q, k, v, out, lse, causal, pos_offset, scale, window, softcap,
                           mask)
    return out, lse


def rotated_quantized_attention(q, k, v, k_format: str, v_format: str, qk_rotation=None,
                                v_rotation=None, causal: bool = False, pos_offset: int = 0,
                                scale=None, window=None, softcap=None) -> np.ndarray:
    """The spec's attention over a rotated, quantized cache (what a cache's kernels must
    match within the tolerance table): float64 ``[n_q, h_q, d_v]``."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    out = np.empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=np.float64)
    _rotq.oracle_rotated_quantized_attention(q, k, v, out, k_format, v_format, qk_rotation,
                                             v_rotation, causal, pos_offset, scale, window,
                                             softcap)
    return out
