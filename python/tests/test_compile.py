"""torch.compile traces the rotq ops through their fake implementations (fullgraph: no graph
break), and the compiled step gives the eager step's results."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import rotq  # noqa: E402
import rotq.ops  # noqa: E402,F401


def _decode_step(q, k_pool, v_pool, k_new, v_new, slots, loc, table, lens, spec):
    # The step's K/V appended, the batch's attention (which rotates Q as the pool rotates K),
    # then the online Hadamard QuaRot applies to the output before the output projection.
    torch.ops.rotq.pool_append(k_pool, v_pool, k_new, v_new, slots, spec)
    out = torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, lens, q.shape[1], spec)
    return torch.ops.rotq.rotate(out, "hadamard", False)


def test_a_compiled_decode_step_matches_the_eager_one():
    rng = np.random.default_rng(3)
    h_kv, h_q, d, pages, page_tokens = 2, 4, 64, 8, 4
    spec = rotq.ops.pool_spec("q8_0", "q8_0", h_kv, d, d, pages, page_tokens, "hadamard")
    kb, vb = rotq.pool_bytes("q8_0", "q8_0", h_kv, d, d, pages, page_tokens)
    # Two sequences of 5 and 3 tokens: prefill them, then one decode token each.
    table = torch.tensor([[0, 1, -1], [2, -1, -1]], dtype=torch.int32)
    prompt = torch.from_numpy(rng.standard_normal((8, h_kv, d), dtype=np.float32))
    pools = []
    for _ in range(2):
        k_pool, v_pool = torch.zeros(kb, dtype=torch.uint8), torch.zeros(vb, dtype=torch.uint8)
        slots = torch.tensor([0, 1, 2, 3, 4, 8, 9, 10], dtype=torch.int64)
        torch.ops.rotq.pool_append(k_pool, v_pool, prompt, prompt * 0.5, slots, spec)
        pools.append((k_pool, v_pool))
    q = torch.from_numpy(rng.standard_normal((2, h_q, d), dtype=np.float32))
    k_new = torch.from_numpy(rng.standard_normal((2, h_kv, d), dtype=np.float32))
    v_new = torch.from_numpy(rng.standard_normal((2, h_kv, d), dtype=np.float32))
    args = (k_new, v_new, torch.tensor([5, 11]), torch.tensor([0, 1, 2], dtype=torch.int32),
            table, torch.tensor([6, 4], dtype=torch.int32), spec)
    eager = _decode_step(q, *pools[0], *args)
    compiled = torch.compile(_decode_step, backend="aot_eager", fullgraph=True)
    got = compiled(q, *pools[1], *args)
    assert got.shape == (2, h_q, d)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    # The compiled step appended into its own pool exactly as the eager one did.
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])


def test_compiled_transforms_match_eager():
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((8, 128), dtype=np.float32))

    def f(x):
        y = torch.ops.rotq.hadamard_transform(x, 128 ** -0.5, 1)
        b = torch.ops.rotq.quantize(y, "q4_0", "none")
        return torch.ops.rotq.dequantize(b, "q4_0", 128, "none")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
