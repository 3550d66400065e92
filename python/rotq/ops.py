"""rotq's kernels as torch custom ops (``torch.ops.rotq.*``), with fake (meta) implementations
so that ``torch.compile`` and CUDA-graph capture can trace them.

Importing this module registers them (``import rotq`` does so itself when torch is already
imported). On CPU tensors they run rotq's CPU kernels now; their CUDA implementations come with
the CUDA backend of the engine API.

* ``rotq::rotate(Tensor x, str rotation, bool inverse) -> Tensor``
* ``rotq::hadamard_transform(Tensor x, float scale, int base) -> Tensor`` (Dao-AILab's)
* ``rotq::quantize(Tensor x, str format, str rotation) -> Tensor`` (uint8 rows)
* ``rotq::dequantize(Tensor data, str format, int dim, str rotation) -> Tensor`` (float32)
* ``rotq::pool_append(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v,
  Tensor slot_mapping, str spec) -> ()``: a step's K/V rows into a pool (``spec``:
  :func:`pool_spec`)
* ``rotq::batch_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor query_start_loc,
  Tensor block_table, Tensor seq_lens, int h_q, str spec) -> Tensor``: causal paged
  attention of a mixed batch

>>> import torch, rotq.ops
>>> x = torch.ones(2, 8)
>>> torch.ops.rotq.hadamard_transform(x, 1.0, 1)[0, :2].round(decimals=4)
tensor([8., 0.])
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

from . import _rotq, row_bytes

__all__ = ["pool_spec"]

_NONE = "none"


def _rotation(rotation: str):
    return None if rotation == _NONE else rotation


@torch.library.custom_op("rotq::rotate", mutates_args=())
def rotate(x: torch.Tensor, rotation: str, inverse: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _rotq.rotate(x, out, rotation, inverse)
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


@quantize.register_fake
def _(x, format, rotation):
    return x.new_empty((*x.shape[:-1], row_bytes(format, x.shape[-1])), dtype=torch.uint8)


@torch.library.custom_op("rotq::dequantize", mutates_args=())
def dequantize(data: torch.Tensor, format: str, dim: int, rotation: str) -> torch.Tensor:
    data = data.contiguous()
    out = torch.empty((*data.shape[:-1], dim), dtype=torch.float32)
    _rotq.dequantize(data, out, format, _rotation(rotation))
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
    _pool(k_pool, v_pool, spec).append(k.contiguous(), v.contiguous(),
                                       slot_mapping.contiguous(), positions)


@pool_append.register_fake
def _(k_pool, v_pool, k, v, slot_mapping, spec):
    return None


@torch.library.custom_op("rotq::batch_attention", mutates_args=())
def batch_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    query_start_loc: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, h_q: int, spec: str) -> torch.Tensor:
    pool = _pool(k_pool, v_pool, spec)
    plan = pool.plan(query_start_loc.contiguous(), h_q, block_table=block_table.contiguous(),
                     seq_lens=seq_lens.contiguous())
    out = torch.empty(plan.out_shape, dtype=torch.float32)
    pool.run(plan, q.contiguous(), out)
    return out


@batch_attention.register_fake
def _(q, k_pool, v_pool, query_start_loc, block_table, seq_lens, h_q, spec):
    v_dim = json.loads(spec)["v_dim"]
    return q.new_empty((q.shape[0], h_q, v_dim), dtype=torch.float32)
