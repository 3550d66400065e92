"""rotq: rotated quantized KV caches for NumPy and torch.

Multiplying Q and K by the same orthonormal matrix (a Hadamard transform) leaves every
attention score unchanged but spreads K's outlier channels over all of them, so a 4- or
8-bit KV cache of the rotated K loses far less. This package is the Python face of the
rotq engine library (Rust): rotations, the cache formats, the paged pool engines use, batch
attention, and the f64 oracle the kernels are checked against.

Arrays come in through DLPack (NumPy arrays, torch CPU tensors), C-contiguous; results are
new arrays of the input's kind, or the ``out=`` array given (no copy). Kernels release the
GIL. Errors are :class:`RotqError` subclasses (also ``ValueError`` / ``MemoryError``).

>>> import numpy as np, rotq
>>> x = np.ones((2, 8), dtype=np.float32)
>>> rotq.hadamard_transform(x)[0, :2].round(4)  # unnormalized, as Dao-AILab's
array([8., 0.], dtype=float32)
>>> q = rotq.quantize(np.linspace(-1, 1, 64, dtype=np.float32), "q8_0", rotation="hadamard")
>>> q.shape, q.dtype
((68,), dtype('uint8'))
"""

from __future__ import annotations

import numpy as _np

from . import _rotq
from ._rotq import (
    AttentionPlan,
    CheckpointError,
    DeviceError,
    InvalidInputError,
    KvPool,
    RotatedKvCache,
    RotqError,
    RotqMemoryError,
    __version__,
    cpu_isa,
    formats,
    pool_bytes,
    rotation_disabled,
    row_bytes,
)

__all__ = [
    "AttentionPlan",
    "CheckpointError",
    "DeviceError",
    "InvalidInputError",
    "KvPool",
    "RotatedKvCache",
    "RotqError",
    "RotqMemoryError",
    "__version__",
    "checkpoint",
    "cpu_isa",
    "cuda_available",
    "dequantize",
    "formats",
    "hadamard_transform",
    "hadamard_transform_12N",
    "hadamard_transform_20N",
    "hadamard_transform_28N",
    "hadamard_transform_40N",
    "oracle",
    "pool_bytes",
    "quantize",
    "rotate",
    "rotation_disabled",
    "row_bytes",
]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def cuda_available() -> bool:
    """Whether this build has rotq's CUDA kernels and a CUDA device can run them (an NVIDIA
    driver and a device; kernels compile on first use with NVRTC, which torch's CUDA wheels
    bring).

    >>> import rotq
    >>> isinstance(rotq.cuda_available(), bool)
    True
    """
    return bool(getattr(_rotq, "cuda_available", lambda: False)())


def _cuda_ops(x):
    """``torch.ops.rotq`` when ``x`` is a CUDA tensor (the eager functions then run the
    ops' CUDA kernels), else None."""
    if _is_torch(x) and x.is_cuda:
        import torch

        from . import ops  # noqa: F401  (registers the ops)

        return torch.ops.rotq
    return None


def _op_rotation(rotation):
    """The torch ops' rotation string for ``rotation`` (``"none"`` for None), or None for an
    explicit matrix (the ops take names only)."""
    if rotation is None or isinstance(rotation, str):
        return rotation or "none"
    return None


def _into(out, result):
    """``result``, or copied into ``out`` when the caller passed one."""
    if out is None:
        return result
    out.copy_(result)
    return out


def _shape(x, what: str) -> tuple:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise InvalidInputError(
            f"{what}: expected a NumPy array or a torch tensor, got {type(x).__name__}"
        )
    return tuple(shape)


def _empty(like, shape, dtype: str):
    """A new array of ``shape`` and ``dtype`` (a NumPy name) of ``like``'s kind."""
    if _is_torch(like):
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    return _np.empty(shape, dtype=dtype)


def _empty_like(x):
    if _is_torch(x):
        import torch

        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if isinstance(x, _np.ndarray):
        return _np.empty(x.shape, dtype=x.dtype)
    raise InvalidInputError(
        f"x: expected a NumPy array or a torch tensor, got {type(x).__name__}"
    )


def rotate(x, rotation, inverse: bool = False, out=None):
    """Rotates the rows of ``x`` (its last axis; float32, float16 or bfloat16).

    ``rotation``: ``"hadamard"`` (normalized, orthonormal), ``"block:B"``,
    ``"randomized:SEED"``, ``"none"``, or an explicit ``[d, d]`` orthogonal matrix (rows are
    outputs). ``inverse=True`` applies the transpose. Returns ``out`` (a new array of ``x``'s
    kind and dtype when None; ``x`` itself for an in-place call).

    >>> import numpy as np, rotq
    >>> x = np.arange(4, dtype=np.float32)
    >>> rotq.rotate(rotq.rotate(x, "hadamard"), "hadamard", inverse=True)
    array([0., 1., 2., 3.], dtype=float32)
    """
    ops = _cuda_ops(x)
    if ops is not None:
        name = _op_rotation(rotation)
        if name is not None:
            return _into(out, ops.rotate(x, name, inverse))
        # An explicit matrix: one product on the GPU (rows are outputs: y = x Rᵀ).
        import torch

        matrix = _np.asarray(rotation.cpu() if _is_torch(rotation) else rotation,
                             dtype=_np.float64)
        # The library's checks (a square, orthogonal matrix over the rows), on one CPU row.
        probe = _np.zeros((1, x.shape[-1]), dtype=_np.float32)
        _rotq.rotate(probe, probe, matrix, False)
        m = torch.from_numpy(matrix).to(x.device)
        # In f64 (no TF32), rounded to x's dtype once.
        y = x.double() @ (m if inverse else m.T)
        return _into(out, y.to(x.dtype))
    out = _empty_like(x) if out is None else out
    _rotq.rotate(x, out, rotation, inverse)
    return out


def _dao(x, scale, base, out):
    ops = _cuda_ops(x)
    if ops is not None:
        return _into(out, ops.hadamard_transform(x, float(scale), base))
    out = _empty_like(x) if out is None else out
    _rotq.hadamard_transform(x, out, float(scale), base)
    return out


def hadamard_transform(x, scale: float = 1.0, out=None):
    """Dao-AILab's ``hadamard_transform(x, scale)``: ``x @ H * scale`` with the unnormalized
    Sylvester ``H`` over the last axis; a length that is not a power of two is zero-padded to
    the next one and the output cut back. Same dtype and shape as ``x``.

    >>> import numpy as np, rotq
    >>> rotq.hadamard_transform(np.array([1, 2], dtype=np.float32), scale=0.5).round(4)
    array([ 1.5, -0.5], dtype=float32)
    """
    return _dao(x, scale, 1, out)


def hadamard_transform_12N(x, scale: float = 1.0, out=None):
    """Dao-AILab's ``hadamard_transform_12N``: ``(M_12 ⊗ H_2^k)``, length ``12·2^k`` (padded)."""
    return _dao(x, scale, 12, out)


def hadamard_transform_20N(x, scale: float = 1.0, out=None):
    """Dao-AILab's ``hadamard_transform_20N``: ``(M_20 ⊗ H_2^k)``, length ``20·2^k`` (padded)."""
    return _dao(x, scale, 20, out)


def hadamard_transform_28N(x, scale: float = 1.0, out=None):
    """Dao-AILab's ``hadamard_transform_28N``: ``(M_28 ⊗ H_2^k)``, length ``28·2^k`` (padded)."""
    return _dao(x, scale, 28, out)


def hadamard_transform_40N(x, scale: float = 1.0, out=None):
    """Dao-AILab's ``hadamard_transform_40N``: ``(M_40 ⊗ H_2^k)``, length ``40·2^k`` (padded)."""
    return _dao(x, scale, 40, out)


def quantize(x, format: str, rotation=None, out=None):
    """Rotates (if ``rotation``) and quantizes the rows of ``x`` into cache bytes.

    Returns uint8 ``[..., row_bytes(format, d)]`` for ``x`` of shape ``[..., d]`` (float32,
    float16 or bfloat16): the bytes the kernels read (ggml's block layouts for the ``q*``
    formats).

    >>> import numpy as np, rotq
    >>> rotq.quantize(np.zeros((3, 32), dtype=np.float32), "q4_0").shape
    (3, 18)
    """
    ops, name = _cuda_ops(x), _op_rotation(rotation)
    if ops is not None and name is not None:
        return _into(out, ops.quantize(x, format, name))
    shape = _shape(x, "x")
    d = shape[-1] if shape else 1
    out_shape = (*shape[:-1], row_bytes(format, d))
    out = _empty(x, out_shape, "uint8") if out is None else out
    _rotq.quantize(x, out, format, rotation)
    return out


def dequantize(data, format: str, dim: int, rotation=None, out=None):
    """Decodes cache bytes (uint8 ``[..., rows · row_bytes]``) into float32 rows of ``dim``
    values, rotated back if ``rotation`` (the one they were quantized with).

    >>> import numpy as np, rotq
    >>> x = np.linspace(-1, 1, 32, dtype=np.float32)
    >>> y = rotq.dequantize(rotq.quantize(x, "q8_0"), "q8_0", 32)
    >>> float(abs(y - x).max()) < 0.01
    True
    """
    shape = _shape(data, "data")
    rb = row_bytes(format, dim)
    last = shape[-1] if shape else 1
    if last % rb:
        raise InvalidInputError(
            f"data: last axis of {last} bytes is not a multiple of a row's {rb} bytes"
        )
    # One row of bytes gives one row of values; more give a [rows, dim] block.
    tail = (dim,) if last == rb else (last // rb, dim)
    out_shape = (*shape[:-1], *tail)
    ops, name = _cuda_ops(data), _op_rotation(rotation)
    if ops is not None and name is not None:
        rows = data.reshape(*shape[:-1], last // rb, rb)
        return _into(out, ops.dequantize(rows, format, dim, name).reshape(out_shape))
    out = _empty(data, out_shape, "float32") if out is None else out
    _rotq.dequantize(data, out, format, rotation)
    return out


from . import checkpoint, oracle  # noqa: E402  (they use the names above)

import sys as _sys  # noqa: E402

if "torch" in _sys.modules:  # torch custom ops, where the program already uses torch
    from . import ops  # noqa: F401,E402
