"""torch.ops.rotq.*: registered by ``import rotq.ops``, equal to the eager functions, and
passing torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rotq  # noqa: E402
import rotq.ops  # noqa: E402,F401
from conftest import dao_reference  # noqa: E402

OPS = ["rotate", "hadamard_transform", "quantize", "dequantize", "pool_append",
       "batch_attention"]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_ops_are_registered():
    for name in OPS:
        assert hasattr(torch.ops.rotq, name), name
        assert isinstance(getattr(torch.ops.rotq, name).default, torch._ops.OpOverload)


def test_schemas():
    s = {n: str(getattr(torch.ops.rotq, n).default._schema) for n in OPS}
    assert s["rotate"] == "rotq::rotate(Tensor x, str rotation, bool inverse) -> Tensor"
    assert s["hadamard_transform"] == (
        "rotq::hadamard_transform(Tensor x, float scale, SymInt base) -> Tensor")
    assert s["quantize"] == "rotq::quantize(Tensor x, str format, str rotation) -> Tensor"
    assert s["dequantize"] == (
        "rotq::dequantize(Tensor data, str format, SymInt dim, str rotation) -> Tensor")
    # the pools are mutated in place (alias annotations "(a0!)", "(a1!)"), the others not
    assert "!) k_pool" in s["pool_append"] and "!) v_pool" in s["pool_append"]
    assert "Tensor k," in s["pool_append"] and s["pool_append"].endswith("-> ()")


def _import_in_subprocess(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_rotq_registers_ops_when_torch_is_loaded():
    r = _import_in_subprocess("import torch, rotq; print(torch.ops.rotq.rotate.default)")
    assert r.returncode == 0, r.stderr
    r = _import_in_subprocess("import sys, rotq; print('torch' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotation", ["hadamard", "block:16", "randomized:3", "none"])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotate_matches_eager(dtype, rotation, inverse):
    x = _randn(3, 5, 128, seed=1, dtype=dtype)
    got = torch.ops.rotq.rotate(x, rotation, inverse)
    assert got.dtype == dtype and got.shape == x.shape
    want = rotq.rotate(x, None if rotation == "none" else rotation, inverse=inverse)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not got.data_ptr() == x.data_ptr()
    # and right, by the f64 oracle (an independent code path)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    ref = rotq.oracle.rotate(x.float().numpy(), rotation, inverse=inverse)
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=tol, atol=4 * tol)


def test_rotate_non_contiguous_input():
    x = _randn(128, 6, seed=2).t()
    got = torch.ops.rotq.rotate(x, "hadamard", False)
    torch.testing.assert_close(got, rotq.rotate(x.contiguous(), "hadamard"), rtol=0, atol=0)


@pytest.mark.parametrize("base,dim", [(1, 256), (1, 137), (12, 96), (20, 80), (28, 56),
                                      (40, 160), (12, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hadamard_transform_matches_eager(base, dim, dtype):
    x = _randn(4, dim, seed=base + dim, dtype=dtype)
    scale = 1 / math.sqrt(dim)
    got = torch.ops.rotq.hadamard_transform(x, scale, base)
    assert got.dtype == dtype and got.shape == x.shape
    eager = {1: rotq.hadamard_transform, 12: rotq.hadamard_transform_12N,
             20: rotq.hadamard_transform_20N, 28: rotq.hadamard_transform_28N,
             40: rotq.hadamard_transform_40N}[base]
    torch.testing.assert_close(got, eager(x, scale), rtol=0, atol=0)
    if dtype == torch.float32:
        np.testing.assert_allclose(got.numpy(), dao_reference(x.numpy(), scale, base),
                                   rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize("base,dim", [(1, 64), (1, 100), (12, 48), (12, 30)])
def test_hadamard_transform_backward(base, dim):
    x = _randn(3, dim, seed=5).requires_grad_()
    g = _randn(3, dim, seed=6)
    y = torch.ops.rotq.hadamard_transform(x, 0.25, base)
    (y * g).sum().backward()
    # d/dx of (K pad(x))[:dim] . g = (K^T pad(g))[:dim]: the transform itself (K symmetric)
    k_t_g = dao_reference(g.numpy(), 0.25, base)
    np.testing.assert_allclose(x.grad.numpy(), k_t_g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base", [20, 28, 40])
def test_hadamard_transform_backward_of_non_symmetric_bases_is_refused(base):
    x = _randn(2, base * 2, seed=7).requires_grad_()
    y = torch.ops.rotq.hadamard_transform(x, 1.0, base)
    with pytest.raises(NotImplementedError):
        y.sum().backward()


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "iq4_nl", "fp8_e4m3", "f16"])
@pytest.mark.parametrize("rotation", ["hadamard", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_match_eager(fmt, rotation, dtype):
    x = _randn(2, 3, 64, seed=8, dtype=dtype)
    rot = None if rotation == "none" else rotation
    q = torch.ops.rotq.quantize(x, fmt, rotation)
    assert q.dtype == torch.uint8 and q.shape == (2, 3, rotq.row_bytes(fmt, 64))
    torch.testing.assert_close(q, rotq.quantize(x, fmt, rotation=rot), rtol=0, atol=0)
    if rot is None:  # the reference codec's bytes
        np.testing.assert_array_equal(q.numpy(), rotq.oracle.quantize(x.float().numpy(), fmt))
    y = torch.ops.rotq.dequantize(q, fmt, 64, rotation)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, rotq.dequantize(q, fmt, 64, rotation=rot), rtol=0, atol=0)
    assert (y - x.float()).abs().max() < 0.5


def _pool_args(seed=9):
    rng = np.random.default_rng(seed)
    spec = rotq.ops.pool_spec("q8_0", "q4_0", 2, 64, 64, 8, 16, qk_rotation="hadamard")
    kb, vb = rotq.pool_bytes("q8_0", "q4_0", 2, 64, 64, 8, 16)
    k_pool, v_pool = torch.zeros(kb, dtype=torch.uint8), torch.zeros(vb, dtype=torch.uint8)
    k = torch.from_numpy(rng.standard_normal((21, 2, 64), dtype=np.float32))
    v = torch.from_numpy(rng.standard_normal((21, 2, 64), dtype=np.float32))
    # sequence 0: 17 tokens in pages 5, 2; sequence 1: 3 tokens in page 7; one padding token
    slots = [5 * 16 + t for t in range(16)] + [2 * 16] + [7 * 16 + t for t in range(3)] + [-1]
    return spec, k_pool, v_pool, k, v, torch.tensor(slots, dtype=torch.int64)


def test_pool_ops_match_kv_pool():
    spec, k_pool, v_pool, k, v, slots = _pool_args()
    torch.ops.rotq.pool_append(k_pool, v_pool, k, v, slots, spec)
    ref = rotq.KvPool("q8_0", "q4_0", 2, 64, 64, 8, 16, qk_rotation="hadamard")
    ref.append(k.numpy(), v.numpy(), slots.numpy(), np.zeros(len(slots), np.int64))
    np.testing.assert_array_equal(k_pool.numpy(), ref.k)
    np.testing.assert_array_equal(v_pool.numpy(), ref.v)

    loc = torch.tensor([0, 2, 3], dtype=torch.int32)
    table = torch.tensor([[5, 2], [7, -1]], dtype=torch.int32)
    seq_lens = torch.tensor([17, 3], dtype=torch.int32)
    q = _randn(3, 8, 64, seed=10)
    out = torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, seq_lens, 8, spec)
    assert out.shape == (3, 8, 64) and out.dtype == torch.float32
    plan = ref.plan(loc.numpy(), 8, block_table=table.numpy(), seq_lens=seq_lens.numpy())
    want = np.zeros(plan.out_shape, np.float32)
    ref.run(plan, q.numpy(), want)
    np.testing.assert_array_equal(out.numpy(), want)


def test_batch_attention_takes_a_mask():
    spec, k_pool, v_pool, k, v, slots = _pool_args()
    torch.ops.rotq.pool_append(k_pool, v_pool, k, v, slots, spec)
    ref = rotq.KvPool("q8_0", "q4_0", 2, 64, 64, 8, 16, qk_rotation="hadamard")
    ref.append(k.numpy(), v.numpy(), slots.numpy(), np.zeros(len(slots), np.int64))
    loc = torch.tensor([0, 2, 3], dtype=torch.int32)
    table = torch.tensor([[5, 2], [7, -1]], dtype=torch.int32)
    seq_lens = torch.tensor([17, 3], dtype=torch.int32)
    q = _randn(3, 8, 64, seed=10)
    # Row 0 sees keys with biases, key 3 hidden; row 2 has every key hidden (zeros).
    mask = _randn(3, 20, seed=13)
    mask[0, 3] = -math.inf
    mask[2] = -math.inf
    out = torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, seq_lens, 8, spec, mask)
    plan = ref.plan(loc.numpy(), 8, block_table=table.numpy(), seq_lens=seq_lens.numpy(),
                    mask=mask.numpy())
    want = np.zeros(plan.out_shape, np.float32)
    ref.run(plan, q.numpy(), want)
    np.testing.assert_array_equal(out.numpy(), want)
    assert torch.all(out[2] == 0)
    plain = torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, seq_lens, 8, spec)
    assert not torch.allclose(out[0], plain[0])
    assert "Tensor? mask=None" in str(torch.ops.rotq.batch_attention.default._schema)


def test_pool_op_tracks_new_buffers():
    # a second pool of the same spec over other memory is another pool, not the cached one
    spec, k_pool, v_pool, k, v, slots = _pool_args()
    torch.ops.rotq.pool_append(k_pool, v_pool, k, v, slots, spec)
    k2, v2 = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    torch.ops.rotq.pool_append(k2, v2, k * 2, v * 2, slots, spec)
    assert not torch.equal(k_pool, k2)
    ref = rotq.KvPool("q8_0", "q4_0", 2, 64, 64, 8, 16, qk_rotation="hadamard")
    ref.append((k * 2).numpy(), (v * 2).numpy(), slots.numpy(), np.zeros(len(slots), np.int64))
    np.testing.assert_array_equal(k2.numpy(), ref.k)


OPCHECK_CASES = {
    "rotate": lambda: (torch.ops.rotq.rotate.default, (_randn(4, 64), "hadamard", False)),
    "rotate_bf16": lambda: (torch.ops.rotq.rotate.default,
                            (_randn(2, 3, 32, dtype=torch.bfloat16), "block:8", True)),
    "dao": lambda: (torch.ops.rotq.hadamard_transform.default, (_randn(4, 100), 0.5, 1)),
    "dao_grad": lambda: (torch.ops.rotq.hadamard_transform.default,
                         (_randn(4, 48).requires_grad_(), 0.5, 12)),
    "dao_40": lambda: (torch.ops.rotq.hadamard_transform.default, (_randn(4, 80), 1.0, 40)),
    "quantize": lambda: (torch.ops.rotq.quantize.default, (_randn(3, 64), "q4_0", "hadamard")),
    "dequantize": lambda: (torch.ops.rotq.dequantize.default,
                           (rotq.quantize(_randn(3, 64), "q8_0"), "q8_0", 64, "none")),
    "pool_append": lambda: (torch.ops.rotq.pool_append.default,
                            (*_pool_args()[1:], _pool_args()[0])),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]()
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_batch_attention():
    spec, k_pool, v_pool, k, v, slots = _pool_args()
    torch.ops.rotq.pool_append(k_pool, v_pool, k, v, slots, spec)
    args = (_randn(3, 8, 64, seed=11), k_pool, v_pool, torch.tensor([0, 2, 3], dtype=torch.int32),
            torch.tensor([[5, 2], [7, -1]], dtype=torch.int32),
            torch.tensor([17, 3], dtype=torch.int32), 8, spec)
    result = torch.library.opcheck(torch.ops.rotq.batch_attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_traces_the_ops():
    def f(x):
        q = torch.ops.rotq.quantize(x, "q8_0", "hadamard")
        return torch.ops.rotq.dequantize(q, "q8_0", x.shape[-1], "hadamard") * 2

    x = _randn(4, 64, seed=12)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    torch.testing.assert_close(f(x), x * 2, rtol=0, atol=0.1)


def test_fake_tensors_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, 96)
        assert torch.ops.rotq.rotate(x, "hadamard", False).shape == (5, 3, 96)
        assert torch.ops.rotq.hadamard_transform(x, 1.0, 12).shape == (5, 3, 96)
        q = torch.ops.rotq.quantize(x, "q4_0", "none")
        assert q.shape == (5, 3, rotq.row_bytes("q4_0", 96)) and q.dtype == torch.uint8
        y = torch.ops.rotq.dequantize(q, "q4_0", 96, "none")
        assert y.shape == (5, 3, 96) and y.dtype == torch.float32


def test_op_errors_are_rotq_errors():
    with pytest.raises(rotq.InvalidInputError):
        torch.ops.rotq.rotate(_randn(2, 64), "hadamard:3", False)
    with pytest.raises(rotq.InvalidInputError):
        torch.ops.rotq.quantize(_randn(2, 48), "q4_0", "none")
    with pytest.raises(rotq.InvalidInputError):
        torch.ops.rotq.hadamard_transform(_randn(2, 64), 1.0, 3)
