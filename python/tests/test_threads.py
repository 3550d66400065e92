"""The kernels release the GIL: another Python thread runs while a long call is in progress,
and calls from several threads at once give the serial results.

How "during the call" is told apart from "just before or after it" without any clock: the
watcher thread counts loop iterations and, every few of them, looks at the call's output
array. Before the call no row of it is written, after the call every row is (both checked);
so a look that finds it *partly* written can only happen while the call is running, which a
call that held the GIL throughout would never allow. (Counting alone would not do: a thread
waiting for the GIL gets it right after the call returns, before the caller can stop it.)"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import rotq

STRIDE = 128  # counter iterations between two looks at the output


class Watcher:
    """A Python thread incrementing a counter; it records the counter at the first and the
    last look that found ``written()`` (a boolean per row) partly true."""

    def __init__(self, written):
        self.written = written
        self.count = 0
        self.first = self.last = None
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        self.started.set()
        while not self.stop.is_set():
            self.count += 1
            if self.count % STRIDE == 0:
                w = self.written()
                if w.any() and not w.all():
                    if self.first is None:
                        self.first = self.count
                    self.last = self.count

    def run(self, call):
        assert not self.written().any()
        self.thread.start()
        self.started.wait()  # the counter runs before the call starts ...
        try:
            result = call()
        finally:
            self.stop.set()  # ... and stops after it returns
            self.thread.join()
        assert self.written().all()
        return result

    @property
    def advanced_during_call(self):
        """Counter increments seen while the call was in progress (0 if never seen)."""
        return 0 if self.first is None else self.last - self.first + STRIDE


@pytest.fixture(autouse=True)
def long_switch_interval():
    # Fewer forced GIL hand-offs: the watcher runs mostly when the GIL is free.
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    yield
    sys.setswitchinterval(old)


def test_gil_released_during_hadamard_transform():
    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)  # 16M floats
    out = np.full_like(x, np.nan)
    w = Watcher(lambda: ~np.isnan(out[:, 0]) & (out[:, 0] != x[:, 0]))
    # rows are transformed in place in `out` (a copy of x first), chunk after chunk
    ret = w.run(lambda: rotq.hadamard_transform(x, 1 / 64, out=out))
    assert ret is out
    assert w.advanced_during_call > 100, (
        f"the counter thread never ran while the call was in progress ({w.count} in all)")
    np.testing.assert_allclose(out[:2], rotq.rotate(x[:2], "hadamard"), atol=1e-4)


def test_gil_released_during_quantize():
    x = np.random.default_rng(1).standard_normal((16384, 1024), dtype=np.float32)
    q = np.full((16384, rotq.row_bytes("q4_0", 1024)), 0xEE, np.uint8)  # an f16 scale of -7e3
    w = Watcher(lambda: (q[:, :2] != 0xEE).any(axis=1))
    w.run(lambda: rotq.quantize(x, "q4_0", rotation="hadamard", out=q))
    assert w.advanced_during_call > 100
    np.testing.assert_array_equal(q[:4], rotq.quantize(x[:4], "q4_0", rotation="hadamard"))


def test_gil_released_during_pool_append():
    # append stages a long prefill through the codec a few MiB at a time, writing each part
    # into the caller's buffer before the next: its progress is visible in the buffer.
    rng = np.random.default_rng(2)
    h, d, page, n_pages = 8, 128, 16, 1024
    kb, vb = rotq.pool_bytes("f32", "f32", h, d, d, n_pages, page)
    buf_k = np.full(kb, 0xFF, np.uint8)  # NaN in every float until written
    buf_v = np.full(vb, 0xFF, np.uint8)
    pool = rotq.KvPool("f32", "f32", h, d, d, n_pages, page, k=buf_k, v=buf_v,
                       qk_rotation="hadamard")
    n = n_pages * page
    k = rng.standard_normal((n, h, d), dtype=np.float32)
    rows = buf_k.view(np.float32).reshape(n, h * d)
    w = Watcher(lambda: ~np.isnan(rows[:, 0]))
    w.run(lambda: pool.append(k, k, np.arange(n), np.arange(n)))
    assert w.advanced_during_call > 100


@pytest.mark.parametrize("fn", ["rotate", "quantize", "dao"])
def test_concurrent_calls_match_serial(fn):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((256, 512), dtype=np.float32) for _ in range(8)]
    call = {"rotate": lambda x: rotq.rotate(x, "randomized:4"),
            "quantize": lambda x: rotq.quantize(x, "iq4_nl", rotation="hadamard"),
            "dao": lambda x: rotq.hadamard_transform_12N(x[:, :384].copy(), 0.5)}[fn]
    serial = [call(x) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(call, xs))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_concurrent_runs_on_shared_pool():
    # `run` only reads the pool: several threads may run planned batches at once, each with
    # its own plan (a plan holds the run's workspace).
    rng = np.random.default_rng(5)
    pool = rotq.KvPool("q4_0", "q8_0", 2, 64, 64, 16, 16, qk_rotation="hadamard")
    k = rng.standard_normal((200, 2, 64), dtype=np.float32)
    pool.append(k, k, np.arange(200), np.arange(200))
    table = np.arange(16, dtype=np.int32).reshape(1, 16)

    def one(seed):
        r = np.random.default_rng(seed)
        plan = pool.plan(np.array([0, 3], np.int32), 8, block_table=table,
                         seq_lens=np.array([200], np.int32))
        q = r.standard_normal((3, 8, 64), dtype=np.float32)
        out = np.zeros(plan.out_shape, np.float32)
        pool.run(plan, q, out)
        return out

    serial = [one(s) for s in range(8)]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(one, range(8)))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
