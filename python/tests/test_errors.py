"""Bad input raises rotq.InvalidInputError (a ValueError and a rotq.RotqError) with a one-line
message naming the argument; failed calls change nothing."""

from __future__ import annotations

import numpy as np
import pytest

import rotq

RNG = np.random.default_rng(4)
X = RNG.standard_normal((4, 64)).astype(np.float32)


def _ro(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


def check(call, *names, cls=None):
    """``call()`` raises InvalidInputError (or ``cls``) whose message is one line holding one
    of ``names`` (case-insensitive)."""
    cls = cls or rotq.InvalidInputError
    with pytest.raises(cls) as info:
        call()
    e = info.value
    assert isinstance(e, rotq.RotqError)
    if cls is rotq.InvalidInputError:
        assert isinstance(e, ValueError)
    msg = str(e)
    assert msg and "\n" not in msg.strip(), f"not one line: {msg!r}"
    if names:
        assert any(n.lower() in msg.lower() for n in names), f"{names} not in {msg!r}"
    return msg


def test_exception_hierarchy():
    assert issubclass(rotq.InvalidInputError, rotq.RotqError)
    assert issubclass(rotq.InvalidInputError, ValueError)
    assert issubclass(rotq.CheckpointError, rotq.RotqError)
    assert issubclass(rotq.CheckpointError, ValueError)
    assert issubclass(rotq.RotqMemoryError, rotq.RotqError)
    assert issubclass(rotq.RotqMemoryError, MemoryError)
    assert issubclass(rotq.DeviceError, rotq.RotqError)
    assert issubclass(rotq.RotqError, Exception)
    for cls in (rotq.RotqError, rotq.InvalidInputError, rotq.RotqMemoryError):
        assert cls.__module__ == "rotq", cls


# ------------------------------------------------------------------------------ arrays


@pytest.mark.parametrize("func", ["rotate", "hadamard_transform", "quantize"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64, np.uint8])
def test_wrong_dtype(func, dtype):
    x = X.astype(dtype)
    call = {"rotate": lambda: rotq.rotate(x, "hadamard"),
            "hadamard_transform": lambda: rotq.hadamard_transform(x),
            "quantize": lambda: rotq.quantize(x, "q8_0")}[func]
    msg = check(call, "x:")
    assert "float32" in msg


def test_wrong_dtype_torch():
    torch = pytest.importorskip("torch")
    check(lambda: rotq.rotate(torch.zeros(2, 64, dtype=torch.int32), "hadamard"), "x:")
    check(lambda: rotq.rotate(torch.zeros(2, 64, dtype=torch.float64), "hadamard"), "x:")


def test_dequantize_wrong_dtypes():
    q = rotq.quantize(X, "q8_0")
    check(lambda: rotq.dequantize(q.view(np.int8), "q8_0", 64), "data")
    check(lambda: rotq.dequantize(q, "q8_0", 64, out=np.empty((4, 64), np.float16)), "out")


@pytest.mark.parametrize("func", ["rotate", "hadamard_transform", "quantize", "dequantize"])
def test_non_contiguous(func):
    x = np.ascontiguousarray(np.concatenate([X, X], axis=1))[:, ::2]
    assert not x.flags.c_contiguous
    call = {"rotate": lambda: rotq.rotate(x, "hadamard"),
            "hadamard_transform": lambda: rotq.hadamard_transform(x),
            "quantize": lambda: rotq.quantize(x, "q8_0"),
            "dequantize": lambda: rotq.dequantize(
                np.zeros((4, 136), np.uint8)[:, ::2], "q8_0", 64)}[func]
    msg = check(call, "x:", "data:")
    assert "contiguous" in msg


def test_non_contiguous_torch():
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(X).t()
    check(lambda: rotq.rotate(t, "block:4"), "x:")


def test_transposed_out():
    out = np.empty((64, 4), np.float32).T
    check(lambda: rotq.rotate(X, "hadamard", out=out), "out")


@pytest.mark.parametrize("func", ["rotate", "hadamard_transform", "quantize", "dequantize"])
def test_read_only_out(func):
    q = rotq.quantize(X, "q4_0")
    call = {"rotate": lambda: rotq.rotate(X, "hadamard", out=_ro(np.empty_like(X))),
            "hadamard_transform": lambda: rotq.hadamard_transform(X, out=_ro(np.empty_like(X))),
            "quantize": lambda: rotq.quantize(X, "q4_0", out=_ro(np.empty_like(q))),
            "dequantize": lambda: rotq.dequantize(q, "q4_0", 64, out=_ro(np.empty_like(X)))}
    msg = check(call[func], "out")
    assert "read-only" in msg


def test_read_only_in_place():
    x = _ro(X)
    check(lambda: rotq.rotate(x, "hadamard", out=x), "out")
    np.testing.assert_array_equal(x, X)


def test_read_only_inputs_are_fine():
    x = _ro(X)
    np.testing.assert_array_equal(rotq.rotate(x, "hadamard"), rotq.rotate(X, "hadamard"))
    q = _ro(rotq.quantize(x, "q8_0"))
    np.testing.assert_array_equal(rotq.dequantize(q, "q8_0", 64),
                                  rotq.dequantize(np.array(q), "q8_0", 64))


@pytest.mark.parametrize("out_shape", [(3, 64), (4, 32), (4, 65), (256,)])
def test_out_wrong_size(out_shape):
    out = np.empty(out_shape, np.float32)
    check(lambda: rotq.rotate(X, "hadamard", out=out), "out")
    check(lambda: rotq.hadamard_transform(X, out=out), "out")


def test_out_wrong_size_quantize_dequantize():
    check(lambda: rotq.quantize(X, "q8_0", out=np.empty((4, 60), np.uint8)), "out")
    check(lambda: rotq.quantize(X, "q8_0", out=np.empty((3, 68), np.uint8)), "out")
    q = rotq.quantize(X, "q8_0")
    # out's shape gives the rows and their length, so a mismatch may be told from either side
    check(lambda: rotq.dequantize(q, "q8_0", 64, out=np.empty((3, 64), np.float32)), "out",
          "data")
    check(lambda: rotq.dequantize(q, "q8_0", 64, out=np.empty((4, 96), np.float32)), "out",
          "data")


def test_out_of_the_wrong_dtype():
    check(lambda: rotq.rotate(X, "hadamard", out=np.empty((4, 64), np.float16)), "out")
    check(lambda: rotq.quantize(X, "q8_0", out=np.empty((4, 68), np.int8)), "out")


def test_out_overlapping_input():
    x = np.ones((1, 32), np.float32)
    check(lambda: rotq.quantize(x, "f32", out=x.view(np.uint8)), "out")
    d = np.zeros(128, np.uint8)
    check(lambda: rotq.dequantize(d, "f32", 32, out=d.view(np.float32)), "out")


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0, 2.0), 3.0, "x", None])
def test_not_an_array(bad):
    check(lambda: rotq.rotate(bad, "hadamard"), "x")
    check(lambda: rotq.hadamard_transform(bad), "x")


def test_list_names_the_argument():
    check(lambda: rotq.quantize([1.0] * 32, "q8_0"), "x:")
    check(lambda: rotq.dequantize([1] * 34, "q8_0", 32), "data:")


def test_device_tensor_message_is_one_line():
    torch = pytest.importorskip("torch")
    t = torch.empty(2, 64, device="meta")
    check(lambda: rotq.rotate(t, "hadamard"), "x")


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize("fmt", ["q3_k", "", "q8", "int8", "fp16"])
def test_unknown_format(fmt):
    msg = check(lambda: rotq.quantize(X, fmt), "format")
    assert f"`{fmt}`" in msg
    check(lambda: rotq.row_bytes(fmt, 64), "format")
    check(lambda: rotq.dequantize(np.zeros((1, 68), np.uint8), fmt, 64), "format")
    check(lambda: rotq.KvPool(fmt, "q8_0", 1, 32, 32, 2, 2), "format")
    check(lambda: rotq.pool_bytes("q8_0", fmt, 1, 32, 32, 2, 2), "format")


@pytest.mark.parametrize("rotation", ["hadamard:3", "blocks:4", "Hadamard", "block:x",
                                      "randomized:", "randomized:-1", "random:1", ""])
def test_unknown_rotation(rotation):
    check(lambda: rotq.rotate(X, rotation), "rotation")
    check(lambda: rotq.quantize(X, "q8_0", rotation=rotation), "rotation")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 64, 64, 2, 2, qk_rotation=rotation),
          "rotation")


@pytest.mark.parametrize("rotation", ["block:3", "block:128", "block:0"])
def test_rotation_that_does_not_fit(rotation):
    check(lambda: rotq.rotate(X, rotation), "block")


def test_hadamard_of_unsupported_length():
    x = RNG.standard_normal((2, 100)).astype(np.float32)
    check(lambda: rotq.rotate(x, "hadamard"), "hadamard", "dimension")


def test_rotation_matrix_errors():
    check(lambda: rotq.rotate(X, np.eye(32)), "rotation")
    check(lambda: rotq.rotate(X, np.eye(64)[:, :32].copy()), "rotation")
    check(lambda: rotq.rotate(X, 2 * np.eye(64)), "orthogonal")
    bad = np.eye(64)
    bad[3, 3] = np.nan
    check(lambda: rotq.rotate(X, bad), "orthogonal")
    check(lambda: rotq.rotate(X, np.eye(64, dtype=np.int64)), "rotation")
    check(lambda: rotq.rotate(X, 3), "rotation")


def test_quantize_row_length_not_a_block_multiple():
    check(lambda: rotq.quantize(X[:, :48].copy(), "q8_0"), "row length", "48")
    check(lambda: rotq.dequantize(np.zeros((4, 67), np.uint8), "q8_0", 64), "data")


def test_dao_errors():
    check(lambda: rotq._rotq.hadamard_transform(X, np.empty_like(X), 1.0, 3), "base")
    check(lambda: rotq.hadamard_transform(X, float("inf")), "scale")


# ------------------------------------------------------------------------------ pool


def _pool():
    pool = rotq.KvPool("q8_0", "q4_0", 2, 32, 32, 4, 4, qk_rotation="hadamard")
    k = RNG.standard_normal((6, 2, 32)).astype(np.float32)
    pool.append(k, k, np.arange(6, dtype=np.int64), np.arange(6, dtype=np.int64))
    return pool


def _plan(pool, loc=(0, 1), h_q=4, **kw):
    args = {"block_table": np.array([[0, 1]], np.int32), "seq_lens": np.array([6], np.int32)}
    args.update(kw)
    return pool.plan(np.array(loc, np.int32), h_q, **args)


def test_plan_table_errors():
    pool = _pool()
    _plan(pool)  # the valid call
    check(lambda: _plan(pool, block_table=np.array([[0, 4]], np.int32)), "page")
    check(lambda: _plan(pool, block_table=np.array([[0, -1]], np.int32)), "page", "table")
    check(lambda: _plan(pool, block_table=np.array([[1, 1]], np.int32)), "page")
    check(lambda: _plan(pool, seq_lens=np.array([9], np.int32)), "seq_lens")
    check(lambda: _plan(pool, block_table=np.array([0, 1], np.int32)), "block_table")
    check(lambda: _plan(pool, block_table=np.array([[0, 1]], np.float32)), "block_table")
    check(lambda: _plan(pool, seq_lens=np.array([6, 6], np.int32)), "block table", "seq_lens")
    check(lambda: _plan(pool, block_table=None), "block_table")
    check(lambda: _plan(pool, indptr=np.array([0, 2], np.int32)), "block_table")


def test_plan_csr_errors():
    pool = _pool()
    csr = dict(block_table=None, seq_lens=None, indptr=np.array([0, 2], np.int32),
               indices=np.array([0, 1], np.int32), last_page_len=np.array([2], np.int32))
    _plan(pool, **csr)
    check(lambda: _plan(pool, **{**csr, "last_page_len": np.array([5], np.int32)}),
          "last_page_len")
    check(lambda: _plan(pool, **{**csr, "indptr": np.array([0, 3], np.int32)}), "indptr")
    check(lambda: _plan(pool, **{**csr, "indices": np.array([0, 9], np.int32)}), "page")


def test_plan_row_and_parameter_errors():
    pool = _pool()
    check(lambda: _plan(pool, loc=(0, 7)), "query_start_loc")
    check(lambda: _plan(pool, loc=(0, 1, 2)), "query_start_loc")
    check(lambda: _plan(pool, loc=(1, 1)), "query_start_loc")
    check(lambda: _plan(pool, h_q=3), "h_q")
    check(lambda: _plan(pool, q_positions=np.array([1, 2], np.int32)), "q_positions")
    check(lambda: _plan(pool, window=0), "window")
    check(lambda: _plan(pool, softcap=-1.0), "softcap")
    check(lambda: _plan(pool, scale=float("nan")), "scale")


def test_plan_mask_errors():
    pool = _pool()
    _plan(pool, mask=np.zeros((1, 6), np.float32))
    check(lambda: _plan(pool, mask=np.zeros((1, 5), np.float32)), "mask")  # stride < length
    check(lambda: _plan(pool, mask=np.zeros(6, np.float32)), "mask")  # 1-D
    check(lambda: _plan(pool, mask=np.zeros((1, 6), np.float64)), "mask")
    check(lambda: _plan(pool, loc=(0, 2), mask=np.zeros((1, 6), np.float32)), "mask")  # rows
    check(lambda: _plan(pool, mask=np.zeros((0, 6), np.float32)), "mask")


def test_run_errors():
    pool = _pool()
    plan = _plan(pool)
    q = np.ones((1, 4, 32), np.float32)
    out = np.zeros((1, 4, 32), np.float32)
    pool.run(plan, q, out)
    check(lambda: pool.run(plan, np.ones((2, 4, 32), np.float32), out), "q", "quer")
    check(lambda: pool.run(plan, q.astype(np.float64), out), "q")
    check(lambda: pool.run(plan, q, np.zeros((1, 4, 31), np.float32)), "out")
    check(lambda: pool.run(plan, q, _ro(out)), "out")
    check(lambda: pool.run(plan, q, out, np.zeros(3, np.float32)), "lse")
    check(lambda: pool.run(plan, q, q), "out")
    with pytest.raises(TypeError):
        pool.run("plan", q, out)


def test_plan_of_another_spec_is_refused():
    pool = _pool()
    plan = _plan(pool)
    other = rotq.KvPool("q8_0", "q4_0", 2, 64, 64, 4, 4)
    with pytest.raises(rotq.InvalidInputError):
        other.run(plan, np.ones((1, 4, 64), np.float32), np.zeros((1, 4, 64), np.float32))


def test_append_errors():
    pool = _pool()
    k = np.ones((2, 2, 32), np.float32)
    pos = np.array([0, 1], np.int64)
    check(lambda: pool.append(k, k, np.array([16, 3]), pos), "slot")
    check(lambda: pool.append(k, k, np.array([-2, 3]), pos), "slot")
    check(lambda: pool.append(k, k, np.array([7, 7]), pos), "slot")
    check(lambda: pool.append(k, k[:1], np.array([7, 8]), pos), "values", "v")
    check(lambda: pool.append(k[:, :, :16].copy(), k, np.array([7, 8]), pos), "keys", "k")
    check(lambda: pool.append(k, k, np.array([7, 8]), pos[:1]), "positions")
    check(lambda: pool.append(k, k, np.array([7, 8]), np.array([0, -1])), "positions")
    check(lambda: pool.append(k, k, np.array([7.0, 8.0]), pos), "slot_mapping")
    check(lambda: pool.append(k, k, [7, 8], pos), "slot_mapping")
    check(lambda: pool.append(k.astype(np.float64), k, np.array([7, 8]), pos), "k")


@pytest.mark.parametrize("case", ["outside", "twice", "shape", "positions", "dtype"])
def test_failed_append_changes_nothing(case):
    pool = _pool()
    kb, vb = pool.k.copy(), pool.v.copy()
    positions = [pool.position(s) for s in range(pool.slots)]
    k = RNG.standard_normal((3, 2, 32)).astype(np.float32)
    slots = {"outside": [8, 9, 16], "twice": [8, 9, 8]}.get(case, [8, 9, 10])
    vals = k[:2] if case == "shape" else k
    pos = np.array([1, 2] if case == "positions" else [1, 2, 3], np.int64)
    sl = np.array(slots, np.float64 if case == "dtype" else np.int64)
    with pytest.raises(rotq.InvalidInputError):
        pool.append(k, vals, sl, pos)
    np.testing.assert_array_equal(pool.k, kb)
    np.testing.assert_array_equal(pool.v, vb)
    assert [pool.position(s) for s in range(pool.slots)] == positions


def test_failed_shift_and_copy_change_nothing():
    pool = _pool()
    kb, vb = pool.k.copy(), pool.v.copy()
    check(lambda: pool.shift(np.array([0, 9]), 1), "slot")  # 9 never written
    check(lambda: pool.shift(np.array([0, 1]), -1), "delta")  # position 0 -> -1
    check(lambda: pool.shift(np.array([1, 1]), 1), "slot")
    check(lambda: pool.shift(np.array([1]), 1, rope_dims=33), "rope")
    check(lambda: pool.copy_slots(np.array([0]), np.array([99])), "slot")
    check(lambda: pool.copy_slots(np.array([0, 1]), np.array([3])), "slot", "dst")
    check(lambda: pool.copy_slots(np.array([0, 1]), np.array([9, 9])), "slot")
    np.testing.assert_array_equal(pool.k, kb)
    np.testing.assert_array_equal(pool.v, vb)
    assert [pool.position(s) for s in range(6)] == list(range(6))


def test_copy_slots_duplicate_target_names_dst():
    # copy_slots(src, dst): a target named twice is dst's fault (not "slot_mapping", which is
    # append's argument)
    pool = _pool()
    check(lambda: pool.copy_slots(np.array([0, 1]), np.array([9, 9])), "dst", "target")


def test_pool_construction_errors():
    kb, vb = rotq.pool_bytes("q8_0", "q8_0", 1, 32, 32, 4, 4)
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4, k=np.zeros(kb - 1, np.uint8)),
          "k pool", "k:")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4, v=np.zeros(vb + 1, np.uint8)),
          "v pool", "v:")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4,
                              k=np.zeros(kb // 4, np.float32)), "k")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4, k=_ro(np.zeros(kb, np.uint8))),
          "k")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4,
                              k=np.zeros(2 * kb, np.uint8)[::2]), "k")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 48, 32, 4, 4), "48")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 0, 32, 32, 4, 4), "n_kv_heads")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 0), "page_tokens")
    check(lambda: rotq.KvPool("q8_0", "q8_0", 1, 32, 32, 4, 4, qk_rotation=np.eye(16)),
          "rotation")
    check(lambda: rotq.pool_bytes("q8_0", "q8_0", 1 << 40, 32, 32, 1 << 40, 4),
          cls=rotq.RotqMemoryError)


def test_cache_errors():
    cache = rotq.RotatedKvCache("q8_0", "q8_0", 1, 32, 32, 8)
    check(lambda: cache.attention(np.zeros((1, 2, 16), np.float32)), "q")
    check(lambda: cache.append(np.zeros((2, 1, 32), np.float32), np.zeros((1, 1, 32),
                                                                             np.float32)))
    check(lambda: rotq.RotatedKvCache("q8_0", "q8_0", 1, 40, 32, 8), "40")


def test_oracle_errors():
    check(lambda: rotq.oracle.hadamard(100), "hadamard", "dimension")
    check(lambda: rotq.oracle.attention(np.zeros((1, 2, 32)), np.zeros((3, 1, 16)),
                                        np.zeros((3, 1, 32))), "dim")
    check(lambda: rotq.oracle.attention(np.zeros((1, 2, 32)), np.zeros((3, 1, 32)),
                                        np.zeros((3, 1, 32)), mask=np.zeros((2, 3))), "mask")
    check(lambda: rotq.oracle.quantize(X, "q9"), "format")


def test_checkpoint_errors():
    check(lambda: rotq.checkpoint.plans('{"x": ', 2, 64), cls=rotq.CheckpointError)
