"""rotq.KvPool as a vLLM-style engine drives it: block tables, slot mappings, plan/run, checked
against exact attention over the pool's dequantized rows (rotq.oracle and plain NumPy)."""

from __future__ import annotations

import numpy as np
import pytest

import rotq
from conftest import softmax_attention

H_KV, H_Q, D, DV = 2, 8, 64, 64
PAGE, N_PAGES = 16, 40
ATOL = 3e-5  # f32 kernels vs the f64 oracle over the same dequantized rows


class Engine:
    """An engine's bookkeeping: a shuffled free list of pages, each sequence's pages and
    length; per step, the slot mapping (with -1 padding tokens), positions and tables."""

    def __init__(self, rng, n_pages=N_PAGES, page=PAGE):
        self.page = page
        self.free = list(rng.permutation(n_pages))
        self.pages: list[list[int]] = []
        self.lens: list[int] = []

    def step(self, new, pad=0):
        while len(self.lens) < len(new):
            self.pages.append([])
            self.lens.append(0)
        slots, pos, loc = [], [], [0]
        for b, n in enumerate(new):
            for t in range(self.lens[b], self.lens[b] + n):
                if t % self.page == 0:
                    self.pages[b].append(int(self.free.pop()))
                slots.append(self.pages[b][t // self.page] * self.page + t % self.page)
                pos.append(t)
            self.lens[b] += n
            loc.append(loc[-1] + n)
        slots += [-1] * pad  # CUDA-graph padding tokens: never written
        pos += [0] * pad
        return np.array(slots, np.int64), np.array(pos, np.int64), np.array(loc, np.int32)

    def block_table(self):
        mb = max(len(p) for p in self.pages)
        t = np.full((len(self.pages), mb + 1), -1, np.int32)  # an extra padding column
        for b, p in enumerate(self.pages):
            t[b, :len(p)] = p
        return t, np.array(self.lens, np.int32)

    def csr(self):
        indptr = np.cumsum([0] + [len(p) for p in self.pages]).astype(np.int32)
        indices = np.array([x for p in self.pages for x in p], np.int32)
        last = np.array([n - (len(p) - 1) * self.page for p, n in zip(self.pages, self.lens)],
                        np.int32)
        return indptr, indices, last

    def seq_slots(self, b):
        return np.array([self.pages[b][t // self.page] * self.page + t % self.page
                         for t in range(self.lens[b])])


def dequantized_pool(pool, k_fmt, v_fmt, qk_rot=None, v_rot=None, h=H_KV, d=D, dv=DV):
    """The pool's K and V rows, dequantized and rotated back: [slots, h, d]."""
    rk, rv = rotq.row_bytes(k_fmt, d), rotq.row_bytes(v_fmt, dv)
    k = rotq.dequantize(pool.k.reshape(-1, rk), k_fmt, d, qk_rot).reshape(-1, h, d)
    v = rotq.dequantize(pool.v.reshape(-1, rv), v_fmt, dv, v_rot).reshape(-1, h, dv)
    return k, v


def run(pool, plan, q, lse=True):
    out = np.full(plan.out_shape, np.nan, np.float32)
    l = np.full(plan.lse_shape, np.nan, np.float32) if lse else None
    pool.run(plan, q, out, l)
    return out, l


def reference(engine, pool, loc, q, fmts, rots=(None, None), causal=True, pos_offset=None,
              mask=None, **kw):
    """Per sequence, oracle attention over the pool's dequantized rows: sequence ``b``'s
    rows ``loc[b]:loc[b+1]`` of ``q`` at position ``pos_offset[b]`` (default: its newest
    rows), ``mask`` rows sliced to its keys."""
    k, v = dequantized_pool(pool, *fmts, *rots)
    outs, lses = [], []
    for b in range(len(engine.lens)):
        r0, r1 = loc[b], loc[b + 1]
        s = engine.seq_slots(b)
        m = None if mask is None else mask[r0:r1, :len(s)]
        pos = engine.lens[b] - (r1 - r0) if pos_offset is None else pos_offset[b]
        o, l = rotq.oracle.attention(q[r0:r1], k[s], v[s], causal=causal, pos_offset=pos,
                                     mask=m, **kw)
        outs.append(o)
        lses.append(l)
    return np.concatenate(outs), np.concatenate(lses)


def _rows(rng, n, h, d):
    return rng.standard_normal((n, h, d)).astype(np.float32)


@pytest.mark.parametrize("k_fmt,v_fmt,qk_rot,v_rot", [
    ("q8_0", "q8_0", "hadamard", None),
    ("q4_0", "q8_0", "hadamard", "hadamard"),
    ("iq4_nl", "q4_0", "randomized:5", "block:16"),
    ("f16", "f32", None, None),
])
def test_decode_steps_match_oracle(k_fmt, v_fmt, qk_rot, v_rot):
    rng = np.random.default_rng(100)
    pool = rotq.KvPool(k_fmt, v_fmt, H_KV, D, DV, N_PAGES, PAGE, qk_rotation=qk_rot,
                       v_rotation=v_rot, query="exact")
    eng = Engine(rng)
    keys = {}  # unquantized rows by slot, for the exact reference
    for new, pad in [([40, 7, 23], 0), ([1, 1, 1, 17], 3), ([1, 1, 1, 1], 4)]:
        slots, pos, loc = eng.step(new, pad)
        k, v = _rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV)
        k[len(slots) - pad:] = np.nan  # padding rows: garbage that must never be read
        v[len(slots) - pad:] = np.nan
        pool.append(k, v, slots, pos)
        for i, s in enumerate(slots):
            if s >= 0:
                keys[s] = (k[i], v[i])
        table, seq_lens = eng.block_table()
        plan = pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens)
        rows = int(loc[-1])
        assert plan.out_shape == (rows, H_Q, DV) and plan.lse_shape == (rows, H_Q)
        q = _rows(rng, rows, H_Q, D)
        out, lse = run(pool, plan, q)
        want, want_lse = reference(eng, pool, loc, q, (k_fmt, v_fmt), (qk_rot, v_rot))
        np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
        np.testing.assert_allclose(lse, want_lse, atol=ATOL, rtol=1e-5)
        # close to exact attention over the unquantized rows, within the formats' error
        worst = 0.0
        for b in range(len(eng.lens)):
            s = eng.seq_slots(b)
            ke = np.stack([keys[x][0] for x in s])
            ve = np.stack([keys[x][1] for x in s])
            r0, r1 = loc[b], loc[b + 1]
            exact, _ = softmax_attention(q[r0:r1], ke, ve, causal=True,
                                         pos_offset=eng.lens[b] - (r1 - r0))
            worst = max(worst, np.linalg.norm(out[r0:r1] - exact) / np.linalg.norm(exact))
        limit = {"q8_0": 0.02, "q4_0": 0.15, "iq4_nl": 0.15, "f16": 1e-3}[k_fmt]
        assert worst < limit
        assert np.isfinite(out).all()


def test_numpy_softmax_reference_gqa():
    """The pool against plain NumPy softmax attention (GQA: query head h reads KV head
    h // 4), independent of rotq.oracle."""
    rng = np.random.default_rng(101)
    pool = rotq.KvPool("q8_0", "q8_0", H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard", query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([20, 33, 3])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    slots, pos, loc = eng.step([1, 1, 1])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    table, seq_lens = eng.block_table()
    plan = pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens)
    q = _rows(rng, 3, H_Q, D)
    out, lse = run(pool, plan, q)
    k, v = dequantized_pool(pool, "q8_0", "q8_0", "hadamard")
    for b in range(3):
        s = eng.seq_slots(b)
        o, l = softmax_attention(q[b:b + 1], k[s], v[s], causal=True, pos_offset=len(s) - 1)
        np.testing.assert_allclose(out[b:b + 1], o, atol=ATOL)
        np.testing.assert_allclose(lse[b:b + 1], l, atol=ATOL)
    # a query head of group 0 differs from one of group 1 (the heads do map to KV heads)
    assert not np.allclose(out[:, 0], out[:, 4])


def test_csr_tables_equal_block_tables():
    rng = np.random.default_rng(102)
    pool = rotq.KvPool("q4_0", "q8_0", H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard", query="exact")
    eng = Engine(rng)
    for new in ([50, 1, 17, 32], [1, 5, 1, 1]):
        slots, pos, loc = eng.step(new)
        pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots,
                    pos)
    table, seq_lens = eng.block_table()
    indptr, indices, last = eng.csr()
    q = _rows(rng, int(loc[-1]), H_Q, D)
    a, la = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens), q)
    b, lb = run(pool, pool.plan(loc, H_Q, indptr=indptr, indices=indices, last_page_len=last), q)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(la, lb, atol=1e-6, rtol=0)


def test_int64_tables_and_lse_optional():
    rng = np.random.default_rng(103)
    pool = rotq.KvPool("q8_0", "q8_0", H_KV, D, DV, N_PAGES, PAGE, query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([9, 30])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    table, seq_lens = eng.block_table()
    q = _rows(rng, int(loc[-1]), H_Q, D)
    a, _ = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens), q, lse=False)
    b, _ = run(pool, pool.plan(loc.astype(np.int64), H_Q, block_table=table.astype(np.int64),
                               seq_lens=seq_lens.astype(np.int64)), q)
    np.testing.assert_array_equal(a, b)


def test_chunked_prefill_mixed_with_decode():
    rng = np.random.default_rng(104)
    fmts = ("q8_0", "q4_0")
    pool = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard",
                       v_rotation="hadamard", query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([24, 3, 40])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    # next step: a decode row, a chunk of 7 prefill rows, a decode row, a new 19-token prompt
    slots, pos, loc = eng.step([1, 7, 1, 19])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    table, seq_lens = eng.block_table()
    assert list(loc) == [0, 1, 8, 9, 28]
    plan = pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens)
    q = _rows(rng, 28, H_Q, D)
    out, lse = run(pool, plan, q)
    want, want_lse = reference(eng, pool, loc, q, fmts, ("hadamard", "hadamard"))
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=ATOL, rtol=1e-5)
    # causality: the first prompt row of the new sequence sees only its own key
    s3 = eng.seq_slots(3)
    k, v = dequantized_pool(pool, *fmts, "hadamard", "hadamard")
    np.testing.assert_allclose(out[9], np.broadcast_to(v[s3[0]].repeat(4, axis=0), (H_Q, DV)),
                               atol=1e-5)


def test_non_causal_and_q_positions():
    rng = np.random.default_rng(105)
    fmts = ("q8_0", "q8_0")
    pool = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([30, 12])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    table, seq_lens = eng.block_table()
    loc = np.array([0, 2, 5], np.int32)
    q = _rows(rng, 5, H_Q, D)
    # queries at explicit positions: 4 and 9 (seeing 5..6 and 10..12 keys when causal)
    qpos = np.array([4, 9], np.int32)
    out, lse = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens,
                                   q_positions=qpos), q)
    want, want_lse = reference(eng, pool, loc, q, fmts, pos_offset=[4, 9])
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=ATOL, rtol=1e-5)
    out_nc, _ = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens,
                                    causal=False), q)
    want_nc, _ = reference(eng, pool, loc, q, fmts, causal=False)
    np.testing.assert_allclose(out_nc, want_nc, atol=ATOL, rtol=1e-4)
    assert not np.allclose(out, out_nc, atol=1e-3)


@pytest.mark.parametrize("kw", [{"scale": 0.05}, {"window": 8}, {"softcap": 2.0},
                                {"scale": 0.3, "softcap": 5.0, "window": 20}])
def test_scale_window_softcap(kw):
    rng = np.random.default_rng(106)
    fmts = ("q8_0", "q8_0")
    pool = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard", query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([45, 9, 1])
    pool.append(_rows(rng, len(slots), H_KV, D) * 2, _rows(rng, len(slots), H_KV, DV), slots,
                pos)
    table, seq_lens = eng.block_table()
    loc = np.array([0, 4, 5, 6], np.int32)
    q = _rows(rng, 6, H_Q, D)
    out, lse = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens, **kw), q)
    want, want_lse = reference(eng, pool, loc, q, fmts, ("hadamard", None), **kw)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=ATOL, rtol=1e-5)
    plain, _ = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens), q)
    assert not np.allclose(out, plain, atol=1e-3)


def test_additive_mask():
    rng = np.random.default_rng(107)
    fmts = ("q4_0", "q8_0")
    pool = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard", query="exact")
    eng = Engine(rng)
    slots, pos, loc = eng.step([21, 34, 5])
    pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots, pos)
    table, seq_lens = eng.block_table()
    loc = np.array([0, 3, 4, 6], np.int32)
    stride = 40  # at least the longest sequence
    mask = rng.uniform(-2, 0, (6, stride)).astype(np.float32)
    mask[rng.uniform(size=mask.shape) < 0.2] = -np.inf
    mask[:, 0] = 0.0  # every row sees a key
    q = _rows(rng, 6, H_Q, D)
    out, lse = run(pool, pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens, mask=mask),
                   q)
    want, want_lse = reference(eng, pool, loc, q, fmts, ("hadamard", None), mask=mask)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(lse, want_lse, atol=ATOL, rtol=1e-5)
    # numpy reference of one masked row
    k, v = dequantized_pool(pool, *fmts, "hadamard")
    s = eng.seq_slots(1)
    o, l = softmax_attention(q[3:4], k[s], v[s], causal=True, pos_offset=len(s) - 1,
                             mask=mask[3:4, :len(s)])
    np.testing.assert_allclose(out[3:4], o, atol=ATOL)
    np.testing.assert_allclose(lse[3:4], l, atol=ATOL)


def test_row_seeing_no_key_has_minus_inf_lse():
    rng = np.random.default_rng(108)
    pool = rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 8, query="exact")
    pool.append(_rows(rng, 5, 1, 32), _rows(rng, 5, 1, 32), np.arange(5), np.arange(5))
    mask = np.zeros((1, 8), np.float32)
    mask[0, :5] = -np.inf
    plan = pool.plan(np.array([0, 1], np.int32), 2, block_table=np.array([[0]], np.int32),
                     seq_lens=np.array([5], np.int32), mask=mask)
    out = np.full(plan.out_shape, np.nan, np.float32)
    lse = np.zeros(plan.lse_shape, np.float32)
    pool.run(plan, _rows(rng, 1, 2, 32), out, lse)
    assert np.all(lse == -np.inf)
    _, want = rotq.oracle.attention(np.ones((1, 2, 32)), np.ones((5, 1, 32)),
                                    np.ones((5, 1, 32)), mask=mask[:, :5].astype(np.float64))
    assert np.all(want == -np.inf)
    assert np.isfinite(out).all()  # no NaN from 0/0


def test_plan_once_run_per_layer():
    rng = np.random.default_rng(109)
    fmts = ("q8_0", "q4_0")
    layers = [rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard", query="exact")
              for _ in range(3)]
    eng = Engine(rng)
    slots, pos, loc = eng.step([17, 2, 33])
    for pool in layers:
        pool.append(_rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV), slots,
                    pos)
    table, seq_lens = eng.block_table()
    plan = layers[0].plan(loc, H_Q, block_table=table, seq_lens=seq_lens)
    assert plan.workspace_len >= 0
    outs = []
    for pool in layers:
        q = _rows(rng, int(loc[-1]), H_Q, D)
        out, lse = run(pool, plan, q)
        want, want_lse = reference(eng, pool, loc, q, fmts, ("hadamard", None))
        np.testing.assert_allclose(out, want, atol=ATOL, rtol=1e-4)
        again, _ = run(pool, plan, q)
        np.testing.assert_array_equal(out, again)  # deterministic, no state kept
        outs.append(out)
    assert not np.allclose(outs[0], outs[1])


def test_caller_buffers():
    rng = np.random.default_rng(110)
    fmts = ("q4_0", "q8_0")
    kb, vb = rotq.pool_bytes(*fmts, H_KV, D, DV, N_PAGES, PAGE)
    assert kb == N_PAGES * PAGE * H_KV * rotq.row_bytes("q4_0", D)
    assert vb == N_PAGES * PAGE * H_KV * rotq.row_bytes("q8_0", DV)
    buf_k = np.full(kb, 0xAB, np.uint8)
    buf_v = np.full(vb, 0xCD, np.uint8)
    pool = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, k=buf_k, v=buf_v,
                       qk_rotation="hadamard", query="exact")
    assert pool.k is buf_k and pool.v is buf_v
    assert pool.slots == N_PAGES * PAGE
    slots = np.array([5, 17, -1, 300], np.int64)
    k = _rows(rng, 4, H_KV, D)
    v = _rows(rng, 4, H_KV, DV)
    pool.append(k, v, slots, np.array([0, 1, 2, 3], np.int64))
    rk, rv = rotq.row_bytes("q4_0", D) * H_KV, rotq.row_bytes("q8_0", DV) * H_KV
    written_k = np.zeros(kb, bool)
    written_v = np.zeros(vb, bool)
    for i, s in enumerate(slots):
        if s < 0:
            continue
        # the bytes are the rows rotated and quantized, at (slot * h + head) * row_bytes
        np.testing.assert_array_equal(buf_k[s * rk:(s + 1) * rk],
                                      rotq.quantize(k[i], "q4_0", "hadamard").ravel())
        np.testing.assert_array_equal(buf_v[s * rv:(s + 1) * rv],
                                      rotq.quantize(v[i], "q8_0").ravel())
        written_k[s * rk:(s + 1) * rk] = True
        written_v[s * rv:(s + 1) * rv] = True
    assert (buf_k[~written_k] == 0xAB).all() and (buf_v[~written_v] == 0xCD).all()
    assert pool.position(17) == 1 and pool.position(300) == 3 and pool.position(6) is None


def test_caller_buffers_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(111)
    kb, vb = rotq.pool_bytes("q8_0", "q8_0", 1, 32, 32, 4, 4)
    buf_k, buf_v = torch.zeros(kb, dtype=torch.uint8), torch.zeros(vb, dtype=torch.uint8)
    pool = rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4, k=buf_k, v=buf_v, query="exact")
    k = torch.from_numpy(_rows(rng, 2, 1, 32))
    pool.append(k, k, torch.tensor([3, 9]), torch.tensor([0, 1]))
    np.testing.assert_array_equal(buf_k.numpy()[9 * 34:10 * 34],
                                  rotq.quantize(k[1].numpy(), "q8_0").ravel())
    assert pool.k is buf_k


def test_default_buffers_are_zeroed_numpy():
    pool = rotq.KvPool("q8_0", "f16", 2, 32, 64, 3, 4, query="exact")
    assert isinstance(pool.k, np.ndarray) and pool.k.dtype == np.uint8
    assert pool.k.shape == (rotq.pool_bytes("q8_0", "f16", 2, 32, 64, 3, 4)[0],)
    assert pool.v.nbytes == 3 * 4 * 2 * 64 * 2
    assert not pool.k.any() and not pool.v.any()


def test_append_then_overwrite_slot():
    rng = np.random.default_rng(112)
    pool = rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 2, 4, query="exact")
    a, b = _rows(rng, 1, 1, 32), _rows(rng, 1, 1, 32)
    pool.append(a, a, np.array([2]), np.array([7]))
    pool.append(b, b, np.array([2]), np.array([8]))
    np.testing.assert_array_equal(pool.k[2 * 34:3 * 34], rotq.quantize(b[0, 0], "q8_0"))
    assert pool.position(2) == 8


def test_long_prefill_spans_staging_chunks():
    # more tokens than one staging chunk (4 MiB of rows): every slot still written right
    rng = np.random.default_rng(113)
    h, d, n = 4, 256, 1100  # 1100 tokens * 4 heads * 2 * 1024 B > 4 MiB in f32
    pool = rotq.KvPool("f32", "f32", h, d, d, 80, 16, query="exact")
    k = _rows(rng, n, h, d)
    slots = rng.permutation(80 * 16)[:n]
    pool.append(k, -k, slots, np.arange(n))
    kk = pool.k.view(np.float32).reshape(-1, h, d)
    vv = pool.v.view(np.float32).reshape(-1, h, d)
    np.testing.assert_array_equal(kk[slots], k)
    np.testing.assert_array_equal(vv[slots], -k)


# ---------------------------------------------------------------------------- shift, copy_slots


def rope(x, delta, neox=False, base=10000.0, scale=1.0, dims=None):
    """RoPE by ``delta`` positions over the last axis (float64): pairs (2i, 2i+1), or
    (i, i + dims/2) for NeoX; angle ``scale * delta * base^(-2i/dims)``; values past
    ``dims`` unchanged."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    dims = dims or d
    y = x.copy()
    for i in range(dims // 2):
        th = scale * delta * base ** (-2 * i / dims)
        a, b = (i, i + dims // 2) if neox else (2 * i, 2 * i + 1)
        c, s = np.cos(th), np.sin(th)
        y[..., a] = x[..., a] * c - x[..., b] * s
        y[..., b] = x[..., a] * s + x[..., b] * c
    return y


@pytest.mark.parametrize("kw", [{}, {"neox": True}, {"rope_dims": 16},
                                {"freq_base": 500000.0, "freq_scale": 0.5}])
def test_shift_is_rope_of_keys(kw):
    rng = np.random.default_rng(114)
    d = 32
    pool = rotq.KvPool("f32", "f32", 2, d, d, 2, 4, query="exact")
    k, v = _rows(rng, 3, 2, d), _rows(rng, 3, 2, d)
    slots = np.array([1, 2, 6])
    pool.append(k, v, slots, np.array([10, 11, 12]))
    v_before = pool.v.copy()
    pool.shift(np.array([1, 6, -1]), -4, **kw)
    assert [pool.position(s) for s in (1, 2, 6)] == [6, 11, 8]
    kk = pool.k.view(np.float32).reshape(-1, 2, d)
    args = dict(neox=kw.get("neox", False), base=kw.get("freq_base", 10000.0),
                scale=kw.get("freq_scale", 1.0), dims=kw.get("rope_dims"))
    np.testing.assert_allclose(kk[1], rope(k[0], -4, **args), atol=2e-6)
    np.testing.assert_allclose(kk[6], rope(k[2], -4, **args), atol=2e-6)
    np.testing.assert_array_equal(kk[2], k[1])  # not shifted
    np.testing.assert_array_equal(pool.v, v_before)  # values never move


@pytest.mark.parametrize("fmt,rot", [("q8_0", "hadamard"), ("q8_0", None), ("f16", "block:8")])
def test_shift_inside_rotation_and_quantization(fmt, rot):
    rng = np.random.default_rng(115)
    d = 64
    pool = rotq.KvPool(fmt, fmt, 1, d, d, 2, 8, qk_rotation=rot, query="exact")
    k = _rows(rng, 4, 1, d)
    slots = np.array([0, 3, 9, 12])
    pool.append(k, k, slots, np.array([100, 101, 102, 103]))
    before, _ = dequantized_pool(pool, fmt, fmt, rot, None, h=1, d=d, dv=d)
    pool.shift(slots, 37)
    after, _ = dequantized_pool(pool, fmt, fmt, rot, None, h=1, d=d, dv=d)
    want = rope(before[slots], 37)
    step = 0.02 if fmt == "q8_0" else 2e-3  # one requantization
    assert np.abs(after[slots] - want).max() < step * np.abs(want).max()
    assert np.abs(after[slots] - before[slots]).max() > 0.1  # it did move
    # and back again
    pool.shift(slots, -37)
    back, _ = dequantized_pool(pool, fmt, fmt, rot, None, h=1, d=d, dv=d)
    assert np.abs(back[slots] - before[slots]).max() < 2 * step * np.abs(want).max()
    assert [pool.position(int(s)) for s in slots] == [100, 101, 102, 103]


def test_copy_slots():
    rng = np.random.default_rng(116)
    pool = rotq.KvPool("q8_0", "q4_0", 2, 32, 32, 2, 4, query="exact")
    k, v = _rows(rng, 3, 2, 32), _rows(rng, 3, 2, 32)
    pool.append(k, v, np.array([0, 1, 2]), np.array([5, 6, 7]))
    rk, rv = 2 * 34, 2 * 18
    kb, vb = pool.k.copy(), pool.v.copy()
    pool.copy_slots(np.array([0, -1, 2]), np.array([7, 6, 4]))
    assert pool.k[7 * rk:8 * rk].tobytes() == kb[0:rk].tobytes()
    assert pool.v[4 * rv:5 * rv].tobytes() == vb[2 * rv:3 * rv].tobytes()
    assert pool.position(7) == 5 and pool.position(4) == 7 and pool.position(6) is None
    assert (pool.k[6 * rk:7 * rk] == 0).all()  # skipped pair
    # overlapping lists: a swap reads every source before writing
    pool.copy_slots(np.array([0, 1]), np.array([1, 0]))
    assert pool.k[0:rk].tobytes() == kb[rk:2 * rk].tobytes()
    assert pool.k[rk:2 * rk].tobytes() == kb[0:rk].tobytes()
    assert pool.position(0) == 6 and pool.position(1) == 5


# ---------------------------------------------------------------------------- RotatedKvCache


@pytest.mark.parametrize("page_tokens", [None, 16, 4])
@pytest.mark.parametrize("k_fmt,v_fmt,rot,atol", [
    ("q8_0", "q4_0", "hadamard", 2e-3),
    ("q4_0", "q4_0", None, 2e-5),
    ("f32", "f32", "randomized:1", 2e-5),
    ("iq4_nl", "q8_0", "block:32", 5e-3),
])
def test_rotated_cache_matches_oracle(page_tokens, k_fmt, v_fmt, rot, atol):
    rng = np.random.default_rng(117)
    h, hq, d = 2, 4, 64
    cache = rotq.RotatedKvCache(k_fmt, v_fmt, h, d, d, 64, qk_rotation=rot, v_rotation=rot,
                                page_tokens=page_tokens, query="exact")
    assert len(cache) == 0
    k, v = _rows(rng, 41, h, d), _rows(rng, 41, h, d)
    cache.append(k[:30], v[:30])
    cache.append(k[30:], v[30:])
    assert len(cache) == 41
    q = _rows(rng, 5, hq, d)
    out = cache.attention(q)
    assert out.shape == (5, hq, d) and out.dtype == np.float32
    # f32 kernels may flip a code where the f64 oracle's rotation lands next to a rounding
    # boundary: a tolerance of one such flip (the rotation-free rows are exact).
    want = rotq.oracle.rotated_quantized_attention(q, k, v, k_fmt, v_fmt, rot, rot,
                                                   causal=True, pos_offset=36)
    np.testing.assert_allclose(out, want, atol=atol, rtol=0)
    exact, _ = softmax_attention(q, k, v, causal=True, pos_offset=36)
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.2


def test_rotated_cache_options():
    rng = np.random.default_rng(118)
    h, d = 1, 32
    cache = rotq.RotatedKvCache("q8_0", "q8_0", h, d, d, 32, qk_rotation="hadamard", query="exact")
    k, v = _rows(rng, 20, h, d), _rows(rng, 20, h, d)
    cache.append(k, v)
    q = _rows(rng, 3, 2, d)
    for kw in ({"causal": False}, {"pos_offset": 4}, {"window": 5}, {"softcap": 1.5},
               {"scale": 0.9}):
        out = cache.attention(q, **kw)
        args = dict(causal=True, pos_offset=17)
        args.update(kw)
        want = rotq.oracle.rotated_quantized_attention(q, k, v, "q8_0", "q8_0", "hadamard",
                                                       None, **args)
        np.testing.assert_allclose(out, want, atol=2e-3, rtol=0, err_msg=str(kw))


@pytest.mark.parametrize("query", ["auto", "q8_0"])
def test_quantized_queries_match_the_oracle_on_round_tripped_queries(query):
    """By default ("auto") a pool over rotated q8_0 K takes its queries through q8_0, as the
    kernels rotate them: the oracle on ``R^T q8(R q)`` over the unrotated rows; "exact" does
    not (the outputs differ)."""
    rng = np.random.default_rng(40)
    fmts = ("q8_0", "q8_0")
    pools = {}
    for mode in (query, "exact"):
        pools[mode] = rotq.KvPool(*fmts, H_KV, D, DV, N_PAGES, PAGE, qk_rotation="hadamard",
                                  query=mode)
    engine = Engine(rng)
    slots, pos, loc = engine.step([19, 1, 6])
    k, v = _rows(rng, len(slots), H_KV, D), _rows(rng, len(slots), H_KV, DV)
    q = _rows(rng, int(loc[-1]), H_Q, D)
    outs = {}
    for mode, pool in pools.items():
        pool.append(k, v, slots, pos)
        table, seq_lens = engine.block_table()
        plan = pool.plan(loc, H_Q, block_table=table, seq_lens=seq_lens)
        outs[mode], _ = run(pool, plan, q)
    seen = rotq.oracle.rotate(rotq.oracle.quantized_query(rotq.rotate(q, "hadamard")),
                              "hadamard", inverse=True)
    want, _ = reference(engine, pools[query], loc, seen, fmts, ("hadamard", None))
    np.testing.assert_allclose(outs[query], want, atol=ATOL, rtol=1e-4)
    assert not np.allclose(outs[query], outs["exact"], atol=ATOL, rtol=1e-4)


def test_rotated_cache_capacity_is_enforced():
    rng = np.random.default_rng(119)
    cache = rotq.RotatedKvCache("q8_0", "q8_0", 1, 32, 32, 4, query="exact")
    cache.append(_rows(rng, 4, 1, 32), _rows(rng, 4, 1, 32))
    with pytest.raises(rotq.RotqError):
        cache.append(_rows(rng, 1, 1, 32), _rows(rng, 1, 1, 32))
    assert len(cache) == 4
