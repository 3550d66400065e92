"""The torch ops on CUDA tensors: against the CPU ops on the same inputs, against Dao-AILab's
definition and torch's SDPA on the dequantized cache; on a side stream, captured in a CUDA
graph and replayed with other tables and lengths, and compiled by torch.compile.

Every test needs a CUDA device: where there is none (or no torch), the module skips
("skipped: no CUDA device"); with ROTQ_REQUIRE_CUDA=1 (a GPU machine) it fails instead."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import rotq  # noqa: E402
import rotq.ops  # noqa: E402,F401
from conftest import dao_reference  # noqa: E402

if not (torch.cuda.is_available() and rotq.cuda_available()):
    if os.environ.get("ROTQ_REQUIRE_CUDA") == "1":
        raise RuntimeError("ROTQ_REQUIRE_CUDA=1, but torch or rotq sees no CUDA device")
    pytest.skip("skipped: no CUDA device", allow_module_level=True)

DEV = torch.device("cuda:0")
OPS = torch.ops.rotq
# Relative error allowed between two float paths, by the element type they round to.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(got, want) -> float:
    """The relative L2 error of ``got`` against ``want`` (float64, on the CPU)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotation", ["hadamard", "block:16", "randomized:3", "none"])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotate_matches_the_cpu_op_and_the_oracle(dtype, rotation, inverse):
    x = _randn(3, 5, 128, seed=1, dtype=dtype)
    got = OPS.rotate(x.to(DEV), rotation, inverse)
    assert got.device == DEV and got.dtype == dtype and got.shape == x.shape
    assert _rel(got, OPS.rotate(x, rotation, inverse)) < TOL[dtype]
    want = rotq.oracle.rotate(x.float().numpy(), rotation, inverse=inverse)
    assert _rel(got, torch.from_numpy(want)) < TOL[dtype]


@pytest.mark.parametrize("base,dim", [(1, 256), (1, 137), (1, 4096), (12, 96), (20, 80),
                                      (20, 160), (28, 56), (40, 160)])
def test_hadamard_transform_follows_dao(base, dim):
    x = _randn(6, dim, seed=base + dim)
    got = OPS.hadamard_transform(x.to(DEV), 0.25, base)
    want = dao_reference(x.numpy(), 0.25, base)
    assert _rel(got, torch.from_numpy(want)) < 1e-6
    # Integers stay exact (the butterflies add and subtract; the scale is a power of two).
    ints = torch.randint(-8, 8, (4, dim), generator=torch.Generator().manual_seed(2)).float()
    got = OPS.hadamard_transform(ints.to(DEV), 0.5, base)
    np.testing.assert_array_equal(got.cpu().numpy(), dao_reference(ints.numpy(), 0.5, base))
    # The eager drop-in runs the same kernels on a CUDA tensor.
    eager = {1: rotq.hadamard_transform, 12: rotq.hadamard_transform_12N,
             20: rotq.hadamard_transform_20N, 28: rotq.hadamard_transform_28N,
             40: rotq.hadamard_transform_40N}[base]
    assert torch.equal(eager(ints.to(DEV), 0.5), got)


def test_hadamard_transform_gradient_on_cuda():
    x = _randn(4, 256, seed=5).to(DEV).requires_grad_()
    OPS.hadamard_transform(x, 256 ** -0.5, 1).square().sum().backward()
    # An orthonormal transform keeps the norm: d/dx |Hx|^2 = 2x.
    assert _rel(x.grad, 2 * x.detach()) < 1e-6


FORMATS = [f["name"] for f in rotq.formats()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_and_dequantize_match_the_cpu_ops(fmt):
    x = _randn(9, 128, seed=7)
    # Without a rotation: the bytes of the CPU kernels (ties may round apart in the
    # formats whose encoders search: almost all bytes are equal there).
    got = OPS.quantize(x.to(DEV), fmt, "none")
    want = OPS.quantize(x, fmt, "none")
    assert got.shape == want.shape and got.dtype == torch.uint8
    same = float((got.cpu() == want).float().mean())
    assert same == 1.0 if fmt in ("q4_0", "q8_0") else same > 0.99, (fmt, same)
    # The same bytes decode to the same values.
    back = OPS.dequantize(want.to(DEV), fmt, 128, "none")
    assert _rel(back, OPS.dequantize(want, fmt, 128, "none")) < 1e-6
    # With a rotation: the round trip as close to the CPU's as the CPU's is to x.
    rt_gpu = OPS.dequantize(OPS.quantize(x.to(DEV), fmt, "hadamard"), fmt, 128, "hadamard")
    rt_cpu = OPS.dequantize(OPS.quantize(x, fmt, "hadamard"), fmt, 128, "hadamard")
    assert _rel(rt_gpu, rt_cpu) <= 0.5 * _rel(rt_cpu, x) + 1e-6, fmt
    # The eager functions run the ops on CUDA tensors (a [rows, k·row_bytes] block too).
    q = rotq.quantize(x.to(DEV), fmt, rotation="hadamard")
    assert torch.equal(q, OPS.quantize(x.to(DEV), fmt, "hadamard"))
    two = rotq.dequantize(q.reshape(3, -1), fmt, 128, rotation="hadamard")
    assert two.shape == (3, 3, 128) and torch.equal(two.reshape(9, 128), rt_gpu)


# A mixed batch over a paged pool: three sequences of 13, 7 and 21 tokens; sequence 1's last 3
# tokens are a prefill chunk, the others decode one row each.
H_KV, H_Q, D, PAGES, PAGE = 2, 8, 64, 16, 8
LENS, N_Q = [13, 7, 21], [1, 3, 1]
TABLE = [[3, 0, -1], [7, -1, -1], [1, 9, 12]]


def _spec(k_fmt="q4_0", v_fmt="q8_0", rotation="hadamard"):
    return rotq.ops.pool_spec(k_fmt, v_fmt, H_KV, D, D, PAGES, PAGE, rotation, rotation)


def _slots(lens=LENS, table=TABLE):
    """Every token's slot: token t of sequence b sits in page table[b][t // PAGE]."""
    return torch.tensor([table[b][t // PAGE] * PAGE + t % PAGE
                         for b, n in enumerate(lens) for t in range(n)], dtype=torch.int64)


def _pools(spec, device, k, v, slots):
    s = rotq.pool_bytes(*[json.loads(spec)[n] for n in
                          ("k_format", "v_format", "n_kv_heads", "head_dim", "v_dim",
                           "n_pages", "page_tokens")])
    kp, vp = (torch.zeros(n, dtype=torch.uint8, device=device) for n in s)
    OPS.pool_append(kp, vp, k.to(device), v.to(device), slots.to(device), spec)
    return kp, vp


def _step_args(lens=LENS, n_q=N_Q, table=TABLE, seed=11, dtype=torch.float32):
    q = _randn(sum(n_q), H_Q, D, seed=seed, dtype=dtype)
    loc = torch.tensor(np.concatenate([[0], np.cumsum(n_q)]), dtype=torch.int32)
    tab = torch.tensor([[max(p, 0) for p in row] for row in table], dtype=torch.int32)
    return q, loc, tab, torch.tensor(lens, dtype=torch.int32)


def _sdpa(q, kp, vp, loc, lens, spec, table=TABLE):
    """torch's SDPA on the dequantized cache, sequence by sequence (causal, GQA), on the GPU."""
    s = json.loads(spec)
    out = []
    for b, n in enumerate(lens):
        slots = _slots([n], [table[b]]).to(DEV)
        rb_k, rb_v = rotq.row_bytes(s["k_format"], D), rotq.row_bytes(s["v_format"], D)
        k = OPS.dequantize(kp.view(-1, H_KV, rb_k)[slots], s["k_format"], D, s["qk_rotation"])
        v = OPS.dequantize(vp.view(-1, H_KV, rb_v)[slots], s["v_format"], D, s["v_rotation"])
        qb = q[loc[b]:loc[b + 1]].float()
        n_q = qb.shape[0]
        # Row i is at position n - n_q + i and sees keys up to it.
        mask = torch.arange(n, device=DEV)[None] <= (n - n_q + torch.arange(n_q, device=DEV))[:, None]
        g = H_Q // H_KV
        o = torch.nn.functional.scaled_dot_product_attention(
            qb.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
            v.repeat_interleave(g, 1).transpose(0, 1), attn_mask=mask)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("formats", [("q4_0", "q8_0"), ("q8_0", "q8_0"), ("f16", "q4_0")])
def test_batch_attention_matches_the_cpu_op_and_sdpa(dtype, formats):
    spec = _spec(*formats)
    k = _randn(sum(LENS), H_KV, D, seed=3, dtype=dtype)
    v = _randn(sum(LENS), H_KV, D, seed=4, dtype=dtype)
    slots = _slots()
    kp_cpu, vp_cpu = _pools(spec, "cpu", k, v, slots)
    kp, vp = _pools(spec, DEV, k, v, slots)
    # The append: the CPU's bytes (but for ties of the rotated values' rounding).
    for gpu, cpu in ((kp, kp_cpu), (vp, vp_cpu)):
        assert float((gpu.cpu() == cpu).float().mean()) > 0.99
    q, loc, tab, lens = _step_args(dtype=dtype)
    step = (loc.to(DEV), tab.to(DEV), lens.to(DEV), H_Q, spec)
    got = OPS.batch_attention(q.to(DEV), kp, vp, *step)
    assert got.dtype == dtype and got.shape == (sum(N_Q), H_Q, D)
    # SDPA on the dequantized cache (Q and K rotated alike leave the scores as they are).
    ref = _sdpa(q.to(DEV), kp, vp, loc, LENS, spec)
    assert _rel(got, ref) < max(TOL[dtype], 1e-4)
    # The CPU op on the CPU's bytes: its query is quantized to q8_0 for the integer dot
    # products with a quantized K, so the GPU is as close to it as it is to SDPA, no closer.
    got = OPS.batch_attention(q.to(DEV), kp_cpu.to(DEV), vp_cpu.to(DEV), *step)
    want = OPS.batch_attention(q, kp_cpu, vp_cpu, loc, tab, lens, H_Q, spec)
    assert want.dtype == dtype
    ref = _sdpa(q.to(DEV), kp_cpu.to(DEV), vp_cpu.to(DEV), loc, LENS, spec)
    assert _rel(got, want) <= 2 * _rel(want, ref) + max(TOL[dtype], 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_batch_attention_with_a_mask_matches_the_cpu_op(dtype):
    spec = _spec("q8_0", "q8_0")
    k = _randn(sum(LENS), H_KV, D, seed=3, dtype=dtype)
    v = _randn(sum(LENS), H_KV, D, seed=4, dtype=dtype)
    kp, vp = _pools(spec, "cpu", k, v, _slots())
    q, loc, tab, lens = _step_args(dtype=dtype)
    # Biases on every key, one key of row 0 hidden, row 2 with every key hidden (zeros).
    mask = _randn(sum(N_Q), tab.shape[1] * PAGE + 5, seed=14)
    mask[0, 4] = -float("inf")
    mask[2] = -float("inf")
    want = OPS.batch_attention(q, kp, vp, loc, tab, lens, H_Q, spec, mask)
    got = OPS.batch_attention(q.to(DEV), kp.to(DEV), vp.to(DEV), loc.to(DEV), tab.to(DEV),
                              lens.to(DEV), H_Q, spec, mask.to(DEV))
    assert torch.all(got[2] == 0)
    # The CPU quantizes q8_0 queries over a q8_0 K: as close as its SDPA distance allows.
    plain = OPS.batch_attention(q, kp, vp, loc, tab, lens, H_Q, spec)
    assert _rel(got, want) < 2e-2 and _rel(want, plain) > 5e-2
    with pytest.raises(rotq.InvalidInputError, match="stride"):
        OPS.batch_attention(q.to(DEV), kp.to(DEV), vp.to(DEV), loc.to(DEV), tab.to(DEV),
                            lens.to(DEV), H_Q, spec, mask[:, :8].to(DEV))


def test_ops_run_on_a_side_stream():
    spec = _spec()
    k, v = _randn(sum(LENS), H_KV, D, seed=3), _randn(sum(LENS), H_KV, D, seed=4)
    q, loc, tab, lens = (t.to(DEV) for t in _step_args())
    kp, vp = _pools(spec, DEV, k, v, _slots())
    want = OPS.batch_attention(q, kp, vp, loc, tab, lens, H_Q, spec)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kp2, vp2 = _pools(spec, DEV, k, v, _slots())
        got = OPS.batch_attention(q, kp2, vp2, loc, tab, lens, H_Q, spec)
        rot = OPS.rotate(q, "hadamard", False)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(kp2, kp) and torch.equal(vp2, vp) and torch.equal(got, want)
    assert torch.equal(rot, OPS.rotate(q, "hadamard", False))


def _decode_step(q, k_pool, v_pool, k_new, v_new, slots, loc, table, lens, spec):
    # The step's K/V appended, the batch's attention (which rotates Q as the pool rotates K),
    # then the online Hadamard QuaRot applies to the output before the output projection.
    torch.ops.rotq.pool_append(k_pool, v_pool, k_new, v_new, slots, spec)
    out = torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, lens, q.shape[1], spec)
    return torch.ops.rotq.rotate(out, "hadamard", False)


def _decode_inputs(step: int):
    """Step `step` of decoding the three sequences one token each: the new token's slot, the
    longer lengths, the query and the new K/V rows. Sequence 1 reaches its second page at
    step 1: the table changes between replays."""
    lens = [n + step + 1 for n in LENS]
    table = [row[:] for row in TABLE]
    if lens[1] > PAGE:
        table[1][1] = 14
    slots = torch.tensor([table[b][(n - 1) // PAGE] * PAGE + (n - 1) % PAGE
                          for b, n in enumerate(lens)], dtype=torch.int64)
    q, loc, tab, lens_t = _step_args(lens, [1, 1, 1], table, seed=20 + step)
    g = torch.Generator().manual_seed(40 + step)
    k_new = torch.randn(3, H_KV, D, generator=g)
    v_new = torch.randn(3, H_KV, D, generator=g)
    return [t.to(DEV) for t in (q, k_new, v_new, slots, loc, tab, lens_t)]


def _replayed(step_fn, spec, after_capture=lambda: None):
    """Runs `step_fn` eagerly step by step on one pool, and captured once in a CUDA graph,
    replayed with each step's inputs copied into the captured ones, on another: both outputs
    of each step, and both pools at the end. `after_capture` runs between the capture and the
    replays."""
    k, v = _randn(sum(LENS), H_KV, D, seed=3), _randn(sum(LENS), H_KV, D, seed=4)
    eager_pools = _pools(spec, DEV, k, v, _slots())
    graph_pools = _pools(spec, DEV, k, v, _slots())
    static = _decode_inputs(0)
    # Warm-up on a side stream (plans and compiles), as torch asks before a capture.
    warm = _pools(spec, DEV, k, v, _slots())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_fn(static[0], *warm, *static[1:], spec)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step_fn(static[0], *graph_pools, *static[1:], spec)
    after_capture()
    results = []
    for step in range(3):
        inputs = _decode_inputs(step)
        for s, x in zip(static, inputs):
            s.copy_(x)
        graph.replay()
        want = step_fn(inputs[0], *eager_pools, *inputs[1:], spec)
        results.append((out.clone(), want))
    torch.cuda.synchronize()
    return results, graph_pools, eager_pools


def test_a_decode_step_replays_in_a_cuda_graph():
    results, graph_pools, eager_pools = _replayed(_decode_step, _spec())
    for got, want in results:
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(graph_pools, eager_pools))


def test_a_replay_outlives_its_plan_in_the_pool_cache():
    """A pool keeps the plans of its last 256 step shapes; a graph captured with a plan that
    has since been dropped replays as before (a plan owns no device memory the graph reads),
    and the eager steps plan the dropped shape again."""
    spec = _spec()
    pool = rotq.ops._cuda_pool(spec, 0)

    def flood():
        for seqs in range(1, 301):
            pool.workspace_bytes("float32", seqs, seqs, 3 * PAGE, H_Q, 3)
        assert pool.cached_plans == 256

    results, graph_pools, eager_pools = _replayed(_decode_step, spec, flood)
    for got, want in results:
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(graph_pools, eager_pools))


def test_a_compiled_decode_step_matches_eager_and_replays():
    compiled = torch.compile(_decode_step, fullgraph=True)
    spec = _spec()
    inputs = _decode_inputs(0)
    k, v = _randn(sum(LENS), H_KV, D, seed=3), _randn(sum(LENS), H_KV, D, seed=4)
    pools = [_pools(spec, DEV, k, v, _slots()) for _ in range(2)]
    eager = _decode_step(inputs[0], *pools[0], *inputs[1:], spec)
    got = compiled(inputs[0], *pools[1], *inputs[1:], spec)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(*pools))
    # The compiled step in a CUDA graph, replayed with each step's inputs.
    results, graph_pools, eager_pools = _replayed(compiled, spec)
    for got, want in results:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(graph_pools, eager_pools))


def test_bad_inputs_on_cuda_are_typed_errors():
    spec = _spec()
    k, v = _randn(sum(LENS), H_KV, D, seed=3), _randn(sum(LENS), H_KV, D, seed=4)
    kp, vp = _pools(spec, DEV, k, v, _slots())
    q, loc, tab, lens = (t.to(DEV) for t in _step_args())
    # A table on the CPU beside CUDA tensors.
    with pytest.raises(rotq.InvalidInputError, match="CUDA tensor"):
        OPS.batch_attention(q, kp, vp, loc, tab.cpu(), lens, H_Q, spec)
    # A pool that is not 16-byte aligned (of the right length), and one too short.
    shifted = torch.zeros(kp.numel() + 16, dtype=torch.uint8, device=DEV)[1:1 + kp.numel()]
    with pytest.raises(rotq.InvalidInputError, match="aligned"):
        OPS.batch_attention(q, shifted, vp, loc, tab, lens, H_Q, spec)
    with pytest.raises(rotq.InvalidInputError):
        OPS.batch_attention(q, kp[:-64], vp, loc, tab, lens, H_Q, spec)
    with pytest.raises(rotq.InvalidInputError):
        OPS.quantize(torch.ones(3, 100, device=DEV), "q4_0", "none")
    with pytest.raises(rotq.InvalidInputError):
        OPS.hadamard_transform(torch.ones(3, 64, device=DEV), 1.0, 3)
    with pytest.raises(rotq.InvalidInputError):
        OPS.batch_attention(q[:, :3], kp, vp, loc, tab, lens, H_Q, spec)
    with pytest.raises(rotq.InvalidInputError, match="orthogonal"):
        rotq.rotate(q, np.ones((D, D)))
    # A page outside the pool, and a length past the table: those sequences see no key
    # (zeros), the other keeps its output; nothing is read out of place.
    want = OPS.batch_attention(q, kp, vp, loc, tab, lens, H_Q, spec)
    bad_tab, bad_lens = tab.clone(), lens.clone()
    bad_tab[0, 0] = PAGES + 5
    bad_lens[2] = 3 * PAGE + 1
    got = OPS.batch_attention(q, kp, vp, loc, bad_tab, bad_lens, H_Q, spec)
    torch.cuda.synchronize()
    assert torch.all(got[0] == 0) and torch.all(got[4] == 0)
    assert torch.equal(got[1:4], want[1:4])
