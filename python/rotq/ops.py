"""rotq's kernels as torch custom ops (``torch.ops.rotq.*``), with fake (meta) implementations
so that ``torch.compile`` and CUDA-graph capture can trace them.

Importing this module registers them (``import rotq`` does so itself when torch is already
imported). On CPU tensors they run rotq's CPU kernels; on CUDA tensors its CUDA kernels, queued
on torch's current stream with nothing waited for, so a step with them can be captured in a
CUDA graph (run it once before capturing: the first call of a shape plans it and compiles its
kernels) and compiled by ``torch.compile``.

* ``rotq::rotate(Tensor x, str rotation, bool inverse) -> Tensor``
* ``rotq::hadamard_transform(Tensor x, float scale, int base) -> Tensor`` (Dao-AILab's)
* ``rotq::quantize(Tensor x, str format, str rotation) -> Tensor`` (uint8 rows)
* ``rotq::dequantize(Tensor data, str format, int dim, str rotation) -> Tensor`` (float32)
* ``rotq::pool_append(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v,
  Tensor slot_mapping, str spec) -> ()``: a step's K/V rows into a pool (``spec``:
  :func:`pool_spec`)
* ``rotq::batch_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor query_start_loc,
  Tensor block_table, Tensor seq_lens, int h_q, str spec, Tensor? mask=None) -> Tensor``:
  causal paged attention of a mixed batch (``[rows, h_q, v_dim]``, q's dtype); ``mask``, an
  additive float mask ``[rows, stride]`` (query row, key of its sequence), added after the
  soft-cap (−∞ hides a key; on CUDA its stride is at least the block table's tokens). On CUDA the work is split
  for sequences as long as the block table allows (``block_table.shape[1] · page_tokens``),
  and every page entry is checked on the device: a sequence whose table points outside the
  pool, or whose length exceeds its table, gets no key (zeros) instead of reading out of place.

>>> import torch, rotq.ops
>>> x = torch.ones(2, 8)
>>> torch.ops.rotq.hadamard_transform(x, 1.0, 1)[0, :2].round(decimals=4)
tensor([8., 0.])
"""

from __future__ import annotations

import functools
import json
import math
from typing import Optional
from collections import OrderedDict

import torch

from . import InvalidInputError, _rotq, row_bytes

__all__ = ["pool_spec"]

_NONE = "none"


def _rotation(rotation: str):
    return None if rotation == _NONE else rotation


def _stream(t: torch.Tensor) -> int:
    """torch's current stream on ``t``'s device: the CUDA kernels are queued on it."""
    _nvrtc()
    return torch.cuda.current_stream(t.device).cuda_stream


def _cuda(op):
    """Registers the decorated function as ``op``'s CUDA kernel, run with its first tensor's
    device current (torch's stream and allocations are per device; rotq's calls make the
    device's context current, which would otherwise leak into the caller's thread)."""
    def register(fn):
        @functools.wraps(fn)
        def kernel(*args):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            with torch.cuda.device(device):
                return fn(*args)

        op.register_kernel("cuda")(kernel)
        return fn

    return register


@functools.lru_cache(maxsize=None)
def _nvrtc() -> None:
    """Makes NVRTC loadable: rotq's CUDA kernels compile on first use, loading it by name
    (``libnvrtc.so.13``); where the loader's path has none, the copy torch's CUDA wheels
    install (nvidia-cuda-nvrtc) is loaded first, so the name finds it."""
    import ctypes
    import glob
    import os

    try:
        ctypes.CDLL("libnvrtc.so.13")
        return
    except OSError:
        pass
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return  # the kernels' first compile then says NVRTC is missing
    for root in list(nvidia.__path__):
        for lib in sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so.13*"), recursive=True)):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _base_matrix(m: int, device: torch.device) -> torch.Tensor:
    """The unnormalized ``M_m`` (entries ±1), float64 on ``device`` (made on the first call,
    which must come before a graph capture: it copies from the host)."""
    from . import oracle

    return torch.from_numpy((oracle.hadamard(m) * m ** 0.5).round()).to(device)


@torch.library.custom_op("rotq::rotate", mutates_args=())
def rotate(x: torch.Tensor, rotation: str, inverse: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _rotq.rotate(x, out, rotation, inverse)
    return out


@_cuda(rotate)
def _(x, rotation, inverse):
    out = x.clone(memory_format=torch.contiguous_format)
    if rotation != _NONE and out.numel():
        _rotq.cuda_rotate_(out, rotation, inverse, _stream(out))
    return out


@rotate.register_fake
def _(x, rotation, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("rotq::hadamard_transform", mutates_args=())
def hadamard_transform(x: torch.Tensor, scale: float, base: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _rotq.hadamard_transform(x, out, scale, base)
    return out


@_cuda(hadamard_transform)
def _(x, scale, base):
    if base not in (1, 12, 20, 28, 40):
        raise InvalidInputError(f"base: {base} is not one of 1, 12, 20, 28, 40")
    if not math.isfinite(scale):
        raise InvalidInputError(f"scale: {scale} is not finite")
    dim = x.shape[-1] if x.dim() else 1
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    # Zero-padded to n = base · 2^k, transformed unnormalized times `scale`, cut back.
    p = _next_pow2(-(-dim // base))
    n = base * p
    mix = base == 20 and p >= 2
    rows = x.reshape(-1, dim)
    if n == dim and not mix:
        # In place on a copy (the kernel computes in f32 and rounds once).
        buf = rows.clone(memory_format=torch.contiguous_format)
        _rotq.cuda_rotate_(buf, "hadamard", False, _stream(buf), float(scale))
        return buf.reshape(x.shape)
    # Padded, or mixed after: in f32, rounded to x's dtype once at the end.
    buf = torch.zeros((rows.shape[0], n), dtype=torch.float32, device=x.device)
    buf[:, :dim] = rows
    if mix:
        # rotq's own size for a multiple of 40 is 40·2^k: H_p in blocks, then M_20 across
        # them, in f64 (exact on integers, and no TF32).
        _rotq.cuda_rotate_(buf, f"block:{p}", False, _stream(buf), 1.0)
        m = _base_matrix(20, x.device)
        mixed = torch.einsum("ac,rcp->rap", m, buf.view(-1, 20, p).double()) * scale
        buf = mixed.reshape(-1, n)
    else:
        _rotq.cuda_rotate_(buf, "hadamard", False, _stream(buf), float(scale))
    return buf[:, :dim].to(x.dtype).reshape(x.shape)


@hadamard_transform.register_fake
def _(x, scale, base):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_hadamard_backward(ctx, inputs, output):
    ctx.scale, ctx.base = inputs[1], inputs[2]


def _hadamard_backward(ctx, grad):
    # Sylvester's H is symmetric; M_m ⊗ H is its own transpose only for m = 12.
    if ctx.base not in (1, 12):
        raise NotImplementedError("the gradient of the 20N/28N/40N transforms")
    return torch.ops.rotq.hadamard_transform(grad, ctx.scale, ctx.base), None, None


hadamard_transform.register_autograd(_hadamard_backward, setup_context=_setup_hadamard_backward)


@torch.library.custom_op("rotq::quantize", mutates_args=())
def quantize(x: torch.Tensor, format: str, rotation: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], row_bytes(format, x.shape[-1])), dtype=torch.uint8)
    _rotq.quantize(x, out, format, _rotation(rotation))
    return out


@_cuda(quantize)
def _(x, format, rotation):
    x = x.contiguous()
    dim = x.shape[-1] if x.dim() else 1
    out = torch.empty((*x.shape[:-1], row_bytes(format, dim)), dtype=torch.uint8,
                      device=x.device)
    # Row i into row i: the slot-mapping kernel with one head a token.
    slots = torch.arange(x.numel() // max(dim, 1), dtype=torch.int64, device=x.device)
    _rotq.cuda_quantize(x, out, format, rotation, slots, _stream(x))
    return out


@quantize.register_fake
def _(x, format, rotation):
    return x.new_empty((*x.shape[:-1], row_bytes(format, x.shape[-1])), dtype=torch.uint8)


@torch.library.custom_op("rotq::dequantize", mutates_args=())
def dequantize(data: torch.Tensor, format: str, dim: int, rotation: str) -> torch.Tensor:
    data = data.contiguous()
    out = torch.empty((*data.shape[:-1], dim), dtype=torch.float32)
    _rotq.dequantize(data, out, format, _rotation(rotation))
    return out


@_cuda(dequantize)
def _(data, format, dim, rotation):
    data = data.contiguous()
    out = torch.empty((*data.shape[:-1], dim), dtype=torch.float32, device=data.device)
    _rotq.cuda_dequantize(data, out, format, rotation, _stream(data))
    return out


@dequantize.register_fake
def _(data, format, dim, rotation):
    return data.new_empty((*data.shape[:-1], dim), dtype=torch.float32)


def pool_spec(k_format: str, v_format: str, n_kv_heads: int, head_dim: int, v_dim: int,
              n_pages: int, page_tokens: int, qk_rotation: str = _NONE,
              v_rotation: str = _NONE) -> str:
    """The ``spec`` string the pool ops take (JSON: the ops' arguments must be plain types)."""
    return json.dumps(dict(k_format=k_format, v_format=v_format, n_kv_heads=n_kv_heads,
                           head_dim=head_dim, v_dim=v_dim, n_pages=n_pages,
                           page_tokens=page_tokens, qk_rotation=qk_rotation,
                           v_rotation=v_rotation), sort_keys=True)


# Pools built over the engine's tensors, by (spec, data pointers): building one builds its
# codecs and kernels, so each step reuses it. Bounded: the oldest is dropped past _POOLS_MAX
# (it holds the tensors alive).
_POOLS: OrderedDict = OrderedDict()
_POOLS_MAX = 256


def _pool(k_pool: torch.Tensor, v_pool: torch.Tensor, spec: str) -> _rotq.KvPool:
    key = (spec, k_pool.data_ptr(), k_pool.numel(), v_pool.data_ptr(), v_pool.numel())
    pool = _POOLS.get(key)
    if pool is None:
        s = json.loads(spec)
        pool = _rotq.KvPool(s["k_format"], s["v_format"], s["n_kv_heads"], s["head_dim"],
                            s["v_dim"], s["n_pages"], s["page_tokens"], k=k_pool, v=v_pool,
                            qk_rotation=_rotation(s["qk_rotation"]),
                            v_rotation=_rotation(s["v_rotation"]))
        _POOLS[key] = pool
        while len(_POOLS) > _POOLS_MAX:
            _POOLS.popitem(last=False)
    else:
        _POOLS.move_to_end(key)
    return pool


@torch.library.custom_op("rotq::pool_append", mutates_args=("k_pool", "v_pool"))
def pool_append(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot_mapping: torch.Tensor, spec: str) -> None:
    # Positions are not recorded through the op (engines that shift use KvPool.append).
    n = slot_mapping.shape[0]
    positions = torch.zeros(n, dtype=torch.int64)
    f32 = torch.float32
    _pool(k_pool, v_pool, spec).append(k.contiguous().to(f32), v.contiguous().to(f32),
                                       slot_mapping.contiguous(), positions)


@functools.lru_cache(maxsize=None)
def _cuda_pool(spec: str, device: int) -> _rotq.CudaPool:
    """A pool's CUDA kernels, rotations and plans (of its last 256 step shapes), by (spec,
    device): made once, then each step only queues kernels (the pool bytes stay the caller's
    tensors). Kept for the life of the process: queued work and captured graphs use its
    rotations' device memory by address."""
    _nvrtc()
    s = json.loads(spec)
    return _rotq.CudaPool(s["k_format"], s["v_format"], s["n_kv_heads"], s["head_dim"],
                          s["v_dim"], s["n_pages"], s["page_tokens"], s["qk_rotation"],
                          s["v_rotation"], device)


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Rows the kernels read: float32, float16 or bfloat16 (float64 is narrowed), contiguous."""
    return (t.float() if t.dtype == torch.float64 else t).contiguous()


@_cuda(pool_append)
def _(k_pool, v_pool, k, v, slot_mapping, spec):
    _cuda_pool(spec, _index(k_pool)).append(
        k_pool, v_pool, _rows(k), _rows(v), slot_mapping.to(torch.int64).contiguous(),
        _stream(k_pool))


@pool_append.register_fake
def _(k_pool, v_pool, k, v, slot_mapping, spec):
    return None


@torch.library.custom_op("rotq::batch_attention", mutates_args=())
def batch_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    query_start_loc: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, h_q: int, spec: str,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    pool = _pool(k_pool, v_pool, spec)
    plan = pool.plan(query_start_loc.contiguous(), h_q, block_table=block_table.contiguous(),
                     seq_lens=seq_lens.contiguous(),
                     mask=None if mask is None else mask.contiguous().to(torch.float32))
    out = torch.empty(plan.out_shape, dtype=torch.float32)
    pool.run(plan, q.contiguous().to(torch.float32), out)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


@_cuda(batch_attention)
def _(q, k_pool, v_pool, query_start_loc, block_table, seq_lens, h_q, spec, mask=None):
    s = json.loads(spec)
    pool = _cuda_pool(spec, _index(q))
    rows = q.shape[0] if q.dim() else 0
    if q.numel() != rows * h_q * s["head_dim"] or block_table.dim() != 2:
        raise InvalidInputError(
            f"q {tuple(q.shape)} must hold [rows, h_q={h_q}, head_dim={s['head_dim']}] and "
            f"block_table {tuple(block_table.shape)} be [B, max_blocks]")
    out = torch.empty((rows, h_q, s["v_dim"]), dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    q = q.contiguous().view(rows, h_q, s["head_dim"])
    table = block_table.to(torch.int32).contiguous()
    seqs, max_blocks = table.shape
    max_seq_len = max_blocks * s["page_tokens"]
    stride = 0
    if mask is not None:
        stride = mask.shape[-1] if mask.dim() == 2 else -1
        if mask.dim() != 2 or mask.shape[0] != rows or stride < max_seq_len:
            raise InvalidInputError(
                f"mask {tuple(mask.shape)} must be [rows={rows}, stride] with a stride of at "
                f"least the block table's {max_seq_len} tokens")
        mask = mask.contiguous().to(torch.float32)
    dtype = str(q.dtype).removeprefix("torch.")
    ws = torch.empty(pool.workspace_bytes(dtype, seqs, rows, max_seq_len, h_q, max_blocks,
                                          stride),
                     dtype=torch.uint8, device=q.device)
    pool.run(q, k_pool, v_pool, query_start_loc.to(torch.int32).contiguous(), table,
             seq_lens.to(torch.int32).contiguous(), ws, out, max_seq_len, _stream(q), mask)
    return out


@batch_attention.register_fake
def _(q, k_pool, v_pool, query_start_loc, block_table, seq_lens, h_q, spec, mask=None):
    v_dim = json.loads(spec)["v_dim"]
    return q.new_empty((q.shape[0], h_q, v_dim))
