"""The cache formats: the registry, ggml byte equality, kernel == oracle, error bounds.

Block formats (everything but the TurboQuant ``tq*`` formats) are checked value by value: a
worst-case error per value, a poisoned 32-value block. The TurboQuant **row formats** store a
whole head row (a codebook for the row's length ``d``, a multiple of 8, at most 4096, 1024
with QJL) with an f16 scale (MSE) or norms (QJL): they are checked row by row, against a
per-row distortion ``||y - x||^2 / ||x||^2`` on rotated (Gaussian-like) rows, and a non-finite
value poisons its whole row.
"""

from __future__ import annotations

import numpy as np
import pytest

import rotq
from conftest import (ggml_dequantize_q4_0, ggml_dequantize_q8_0, ggml_quantize_q4_0,
                      ggml_quantize_q8_0, ggml_scales)

FORMATS = [f["name"] for f in rotq.formats()]
SCALED = [f["name"] for f in rotq.formats() if f["scaled"]]
BLOCK = [f["name"] for f in rotq.formats() if not f["row_format"]]
# rotq's TurboQuant row formats; the parts of vLLM's TurboQuant slots (row formats too).
ROW = [f["name"] for f in rotq.formats() if f["row_format"] and f["name"].startswith("tq")]
VLLM = [f["name"] for f in rotq.formats() if f["row_format"] and f["name"].startswith("vllm_")]
GGML = {"q4_0": (ggml_quantize_q4_0, ggml_dequantize_q4_0, 18),
        "q8_0": (ggml_quantize_q8_0, ggml_dequantize_q8_0, 34)}
E16 = 2.0**-11  # f16 half-ulp, relative

# The row formats: (MSE bits, QJL sketch) of each, and their mean per-row distortion
# ||y - x||^2 / ||x||^2 on Gaussian (or rotated) rows of 64 to 256 values: the Lloyd-Max
# distortion of the MSE bits, and about pi/2 times the (b-1)-bit one with QJL (the sketch's
# variance; the QJL estimate is unbiased for inner products, not the closest reconstruction).
ROW_LAYOUT = {"tq2": (2, False), "tq3": (3, False), "tq4": (4, False),
              "tq2_qjl": (1, True), "tq3_qjl": (2, True), "tq4_qjl": (3, True)}
ROW_DISTORTION = {"tq2": 0.117, "tq3": 0.034, "tq4": 0.0093,
                  "tq2_qjl": 0.57, "tq3_qjl": 0.18, "tq4_qjl": 0.054}
ROW_BITS_AT_128 = {"tq2": 2.125, "tq3": 3.125, "tq4": 4.125,
                   "tq2_qjl": 2.25, "tq3_qjl": 3.25, "tq4_qjl": 4.25}
ROW_MEAN_TOL = 0.15  # the mean over a few hundred rows is within 15% of ROW_DISTORTION
ROW_WORST = 8.0  # and no row's exceeds 8 times it (7x seen over 60000 rows of 64, 5x of 128)
ROW_MAX_DIM = {f: (1024 if qjl else 4096) for f, (_, qjl) in ROW_LAYOUT.items()}


def row_layout_bytes(fmt: str, d: int) -> int:
    """Bytes of a row of ``d`` values (the layout of the module docs): ``ceil(d b / 8) + 2``
    for MSE; ``ceil(d (b-1) / 8) + 2 + d / 8 + 2`` with QJL."""
    b, qjl = ROW_LAYOUT[fmt]
    return -(-d * b // 8) + 2 + (d // 8 + 2 if qjl else 0)


def row_f16_fields(fmt: str, d: int) -> list:
    """Byte offsets of a row's f16 fields: the scale (MSE); the norm and the residual's norm
    (QJL)."""
    b, qjl = ROW_LAYOUT[fmt]
    codes = -(-d * b // 8)
    return [codes, codes + 2 + d // 8] if qjl else [codes]


def distortion(y, x) -> np.ndarray:
    """Per-row ``||y - x||^2 / ||x||^2`` over the last axis (float64)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ((y - x) ** 2).sum(-1) / (x**2).sum(-1)


def _data(rng, rows, dim, spread=2.0, offset=False):
    """Rows of normal values with per-row magnitudes over 10^-spread..10^spread."""
    x = rng.standard_normal((rows, dim)) * 10 ** rng.uniform(-spread, spread, (rows, 1))
    if offset:
        x[::3] += 3.0 * np.abs(x[::3]).max(axis=1, keepdims=True)  # one-signed rows
    return x.astype(np.float32)


def error_bound(fmt: str, x: np.ndarray) -> np.ndarray:
    """Worst-case |x - dequantize(quantize(x))| per value for finite ``x`` (float64, same
    shape): half a step (a full step at the clamped end of the symmetric 4/5/6-bit formats)
    plus the f16 rounding of the stored scale over the code range."""
    x = np.asarray(x, dtype=np.float64)
    if fmt == "f32":
        return np.zeros_like(x)
    if fmt == "f16":
        return np.abs(x) * E16 + 2.0**-25
    if fmt == "bf16":
        return np.abs(x) * 2.0**-8 + 2.0**-134
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    rng_ = hi - lo
    bound = {
        "q8_0": amax * (1 / 254 + E16),
        "q4_0": amax * (1 / 8 + E16),
        "q5_0": amax * (1 / 16 + E16),
        "q6_0": amax * (1 / 32 + E16),
        "q4_1": rng_ * (1 / 30 + E16) + np.abs(lo) * E16,
        "q5_1": rng_ * (1 / 62 + E16) + np.abs(lo) * E16,
        "iq4_nl": amax * (12 / 113 + E16),
        "int4": amax * (1 / 14 + E16),
        "fp8_e4m3": np.abs(b) / 16 + amax * 2.0**-12,
    }[fmt]
    bound = np.broadcast_to(bound, b.shape) + amax * 1e-6  # f32 slack
    return bound.reshape(x.shape)


# ------------------------------------------------------------------------------ registry


def test_formats_registry():
    fs = rotq.formats()
    names = [f["name"] for f in fs]
    assert len(names) == len(set(names))
    for want in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"):
        assert want in names
    assert sorted(ROW) == sorted(ROW_LAYOUT)
    assert sorted(VLLM) == ["vllm_fp8", "vllm_k3", "vllm_k4", "vllm_v3", "vllm_v4"]
    assert sorted(ROW + VLLM) == sorted(f["name"] for f in fs if f["row_format"])
    for f in fs:
        assert set(f) >= {"name", "block_size", "block_bytes", "bits_per_value", "origin",
                          "scaled", "row_format"}
        if f["row_format"]:
            continue  # test_row_formats_registry
        assert f["row_format"] is False
        assert f["block_size"] >= 1 and f["block_bytes"] >= 1
        assert f["bits_per_value"] == pytest.approx(8 * f["block_bytes"] / f["block_size"])
        assert f["scaled"] == (f["name"] not in ("f32", "f16", "bf16"))
        d = 4 * max(f["block_size"], 32)
        assert rotq.row_bytes(f["name"], d) == d // f["block_size"] * f["block_bytes"]


def test_row_formats_registry():
    """A row format has no blocks: block_size 8 (the granularity of a row's length), block_bytes
    0, no per-block scales; its bits per value are those of a row of 128 (they depend on d)."""
    by = {f["name"]: f for f in rotq.formats()}
    for name in ROW:
        f = by[name]
        assert f["row_format"] is True
        assert (f["block_size"], f["block_bytes"], f["scaled"]) == (8, 0, True)
        assert f["bits_per_value"] == ROW_BITS_AT_128[name]
        assert f["bits_per_value"] == 8 * rotq.row_bytes(name, 128) / 128
        assert f["origin"] == "rotq TurboQuant"


@pytest.mark.parametrize("fmt", ROW)
def test_row_format_row_bytes(fmt):
    for d in [8, 16, 24, 64, 96, 128, 200, 256, 512, 1000, 1024, 2048, 4096]:
        if d > ROW_MAX_DIM[fmt]:
            continue
        assert rotq.row_bytes(fmt, d) == row_layout_bytes(fmt, d), d
    assert rotq.row_bytes(fmt.upper(), 128) == rotq.row_bytes(fmt, 128)


@pytest.mark.parametrize("fmt", ROW)
@pytest.mark.parametrize("d", [0, 4, 12, 33, 100, 1020, 4100, 4104, 8192])
def test_row_format_refuses_other_lengths(fmt, d):
    """Lengths that are not a multiple of 8, or longer than the codebooks (4096; 1024 with
    QJL: test_row_format_qjl_length_limit), are refused everywhere: no call quantizes or
    decodes them."""
    for call in (lambda: rotq.row_bytes(fmt, d),
                 lambda: rotq.quantize(np.ones((2, d), np.float32), fmt),
                 lambda: rotq.dequantize(np.zeros((2, 64), np.uint8), fmt, d),
                 lambda: rotq.oracle.quantize(np.ones((2, d), np.float32), fmt),
                 lambda: rotq.oracle.dequantize(np.zeros((2, 64), np.uint8), fmt, d)):
        with pytest.raises(rotq.InvalidInputError, match="8"):
            call()


@pytest.mark.parametrize("fmt", ROW)
def test_row_format_qjl_length_limit(fmt):
    """With QJL rows stop at 1024 (the sketch is d x d); MSE rows go on to 4096."""
    if ROW_LAYOUT[fmt][1]:
        for d in (1032, 2048, 4096):
            with pytest.raises(rotq.InvalidInputError):
                rotq.row_bytes(fmt, d)
            with pytest.raises(rotq.InvalidInputError):
                rotq.quantize(np.ones((1, d), np.float32), fmt)
            with pytest.raises(rotq.InvalidInputError):
                rotq.oracle.quantize(np.ones((1, d), np.float32), fmt)
    else:
        assert rotq.row_bytes(fmt, 4096) == row_layout_bytes(fmt, 4096)


@pytest.mark.parametrize("fmt", ROW)
def test_row_format_wrong_byte_counts(fmt, rng):
    d = 64
    rb = rotq.row_bytes(fmt, d)
    x = rng.standard_normal((3, d)).astype(np.float32)
    for n in (rb - 1, rb + 1, 2 * rb + 1):
        with pytest.raises(rotq.InvalidInputError):
            rotq.dequantize(np.zeros(n, np.uint8), fmt, d)
    with pytest.raises(rotq.InvalidInputError):
        rotq.quantize(x, fmt, out=np.zeros((3, rb + 1), np.uint8))
    with pytest.raises(rotq.InvalidInputError):
        rotq.dequantize(np.zeros((3, rb), np.uint8), fmt, d, out=np.zeros((3, d + 8), np.float32))
    with pytest.raises(rotq.InvalidInputError):
        rotq.oracle.dequantize(np.zeros((3, rb + 1), np.uint8), fmt, d)


def test_ggml_layouts():
    by = {f["name"]: f for f in rotq.formats()}
    assert (by["q4_0"]["block_size"], by["q4_0"]["block_bytes"]) == (32, 18)
    assert (by["q8_0"]["block_size"], by["q8_0"]["block_bytes"]) == (32, 34)
    assert (by["q4_1"]["block_bytes"], by["q5_0"]["block_bytes"],
            by["q5_1"]["block_bytes"], by["iq4_nl"]["block_bytes"]) == (20, 22, 24, 18)
    assert (by["f16"]["block_size"], by["f16"]["block_bytes"]) == (1, 2)


def test_format_name_aliases_and_case():
    assert rotq.row_bytes("Q4_0", 64) == rotq.row_bytes("q4_0", 64)
    assert rotq.row_bytes("fp8", 64) == rotq.row_bytes("fp8_e4m3", 64)


# ------------------------------------------------------------------------------ ggml bytes


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ggml_byte_equality_random(fmt, seed):
    rng = np.random.default_rng(seed)
    x = _data(rng, 96, 128, spread=3, offset=True)
    quant, dequant, bb = GGML[fmt]
    got = rotq.quantize(x, fmt)
    want = quant(x)
    assert got.shape == want.shape == (96, 128 // 32 * bb)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rotq.dequantize(got, fmt, 128), dequant(want, 128))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_ggml_byte_equality_ties(fmt):
    """Values that land exactly on x*id + 8.5 = integer (q4_0) or x*id = k + 0.5 (q8_0): the
    truncation / roundf (half away from zero) ties."""
    rng = np.random.default_rng(7)
    rows = []
    for scale in (1.0, 0.5, 0.37, 3.3e-3, 128.0):
        x = np.zeros((6, 32))
        if fmt == "q4_0":
            x[:, 0] = -8  # d = 1: codes are trunc(x + 8.5)
            x[:, 1:] = rng.integers(-16, 16, (6, 31)) * 0.5
        else:
            x[:, 0] = 127  # d = 1: codes are roundf(x)
            x[:, 1:] = rng.integers(-254, 255, (6, 31)) * 0.5
        rows.append(x * scale)
        rows.append(-x * scale)
    x = np.concatenate(rows).astype(np.float32)
    quant, dequant, _ = GGML[fmt]
    np.testing.assert_array_equal(rotq.quantize(x, fmt), quant(x))
    np.testing.assert_array_equal(rotq.oracle.quantize(x, fmt), quant(x))


def test_q4_0_signed_max_and_first_of_equal_magnitudes():
    # ggml keeps the sign of the value of largest |x|, the first one where two tie in |x|.
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
    x[0, 3], x[0, 20] = 2.0, -2.0
    got = rotq.quantize(x, "q4_0")
    np.testing.assert_array_equal(got, ggml_quantize_q4_0(x))
    assert ggml_scales(got, 18)[0] == np.float32(np.float16(2.0 / -8))
    x[0, 3], x[0, 20] = -2.0, 2.0
    got = rotq.quantize(x, "q4_0")
    np.testing.assert_array_equal(got, ggml_quantize_q4_0(x))
    assert ggml_scales(got, 18)[0] == np.float32(np.float16(2.0 / 8))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_ggml_dequantize_of_arbitrary_bytes(fmt):
    # Any bytes with a finite scale decode as ggml's dequantize_row_* does.
    rng = np.random.default_rng(3)
    _, dequant, bb = GGML[fmt]
    data = rng.integers(0, 256, (40, 4 * bb), dtype=np.uint8)
    blocks = data.reshape(-1, bb)
    blocks[:, :2] = (rng.standard_normal(len(blocks)).astype(np.float16)
                     .view(np.uint8).reshape(-1, 2))
    np.testing.assert_array_equal(rotq.dequantize(data, fmt, 128), dequant(data, 128))


@pytest.mark.parametrize("fmt", ROW)
@pytest.mark.parametrize("dim", [8, 128])
def test_row_format_dequantize_of_arbitrary_bytes(fmt, dim):
    """Any bytes decode as the oracle decodes them, bit for bit: random codes (and sketch
    signs) under finite f16 scales / norms over six decades, and wholly random rows (f16 NaN,
    infinities and subnormals among them)."""
    rng = np.random.default_rng(3)
    rb = rotq.row_bytes(fmt, dim)
    data = rng.integers(0, 256, (2, 64, rb), dtype=np.uint8)
    for o in row_f16_fields(fmt, dim):
        f16 = (rng.standard_normal(64) * 10 ** rng.uniform(-3, 3, 64)).astype(np.float16)
        data[0, :, o:o + 2] = f16.view(np.uint8).reshape(-1, 2)
    with np.errstate(all="ignore"):
        got = rotq.dequantize(data, fmt, dim)
        want = rotq.oracle.dequantize(data.reshape(-1, rb), fmt, dim).reshape(got.shape)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isfinite(got[0]).all()


# ------------------------------------------------------------------------------ kernel == oracle


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dim", [32, 256])
def test_kernel_equals_oracle(fmt, dim):
    rng = np.random.default_rng(11)
    x = _data(rng, 64, dim, spread=3, offset=True)
    got = rotq.quantize(x, fmt)
    want = rotq.oracle.quantize(x, fmt)
    assert got.dtype == np.uint8 and got.shape == (64, rotq.row_bytes(fmt, dim))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rotq.dequantize(got, fmt, dim),
                                  rotq.oracle.dequantize(want, fmt, dim))


@pytest.mark.parametrize("fmt,dim", [(f, d) for f in ROW for d in (8, 24, 64, 128, 1024, 4096)
                                      if d <= ROW_MAX_DIM[f]])
def test_row_format_kernel_equals_oracle(fmt, dim):
    """Bytes and values bit for bit, on Gaussian rows of magnitudes over four decades (and a
    batch large enough to be split over threads at 128)."""
    rng = np.random.default_rng(12)
    rows = {8: 256, 24: 64, 64: 64, 128: 1200, 1024: 16, 4096: 4}[dim]
    x = _data(rng, rows, dim, spread=2)
    got = rotq.quantize(x, fmt)
    want = rotq.oracle.quantize(x, fmt)
    assert got.dtype == np.uint8 and got.shape == (rows, row_layout_bytes(fmt, dim))
    np.testing.assert_array_equal(got, want)
    y = rotq.dequantize(got, fmt, dim)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, rotq.oracle.dequantize(want, fmt, dim))
    assert np.isfinite(y).all()


# ------------------------------------------------------------------------------ error bounds


@pytest.mark.parametrize("fmt", BLOCK)
def test_round_trip_error_bounded(fmt):
    rng = np.random.default_rng(5)
    x = _data(rng, 128, 128, spread=2, offset=True)
    y = rotq.dequantize(rotq.quantize(x, fmt), fmt, 128)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x)
    bound = error_bound(fmt, x)
    assert (err <= bound).all(), f"{fmt}: worst error/bound {np.max(err / (bound + 1e-300))}"
    if fmt != "f32":
        assert err.max() > 0  # it does quantize


@pytest.mark.parametrize("fmt", ROW)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_row_format_round_trip_distortion(fmt, dim):
    """Row formats bound no single value: each row's squared error is a fraction of its
    squared norm, ROW_DISTORTION on average over Gaussian rows (what a rotated head row looks
    like), whatever the row's magnitude."""
    rng = np.random.default_rng(5)
    x = _data(rng, 512, dim, spread=2)
    y = rotq.dequantize(rotq.quantize(x, fmt), fmt, dim)
    assert y.dtype == np.float32 and y.shape == x.shape
    r = distortion(y, x)
    want = ROW_DISTORTION[fmt]
    assert abs(r.mean() / want - 1) <= ROW_MEAN_TOL, f"{fmt}: mean distortion {r.mean():.4f}"
    assert r.max() <= ROW_WORST * want, f"{fmt}: worst row {r.max():.4f}"
    assert r.min() > 0  # it does quantize
    # the same distortion at every magnitude: the scale is the row's, and a power of two
    # (scales staying in f16's normal range) scales the decoded row exactly
    small = rotq.dequantize(rotq.quantize(x / np.float32(16), fmt), fmt, dim)
    np.testing.assert_array_equal(small, y / np.float32(16))


@pytest.mark.parametrize("fmt", [f for f in ROW if not ROW_LAYOUT[f][1]])
def test_mse_row_formats_keep_the_norm(fmt):
    """Norm correction: an MSE row decodes to the input row's norm, within the f16 rounding of
    the stored scale (and f32 sums)."""
    rng = np.random.default_rng(13)
    x = _data(rng, 256, 128, spread=2)
    y = rotq.dequantize(rotq.quantize(x, fmt), fmt, 128)
    ratio = np.linalg.norm(y.astype(np.float64), axis=1) / np.linalg.norm(
        x.astype(np.float64), axis=1)
    assert np.abs(ratio - 1).max() <= E16 + 2e-5


def _rotated_rows(fmt, rotation, d=128):
    """Rows with an outlier channel (what the rotation is for) quantized under `rotation`, with
    the checks every format shares: the row size, and bytes that are those of the rotated rows
    (the kernels' and the oracle's). Returns (x, its rotation, the bytes)."""
    rng = np.random.default_rng(6)
    x = _data(rng, 48, d, spread=1)
    x[:, 5] *= 30.0
    q = rotq.quantize(x, fmt, rotation=rotation)
    assert q.shape == (48, rotq.row_bytes(fmt, d))
    xr = rotq.rotate(x, rotation)
    np.testing.assert_array_equal(q, rotq.quantize(xr, fmt))
    np.testing.assert_array_equal(q, rotq.oracle.quantize(xr, fmt))
    return x, xr, q


@pytest.mark.parametrize("fmt", BLOCK)
@pytest.mark.parametrize("rotation", ["hadamard", "block:32", "randomized:9"])
def test_rotated_round_trip(fmt, rotation):
    d = 128
    x, xr, q = _rotated_rows(fmt, rotation, d)
    y = rotq.dequantize(q, fmt, d, rotation=rotation)
    # The rotation is orthonormal: each row's L2 error is that of the rotated row, within the
    # L2 norm of the rotated row's per-value bounds.
    err = np.linalg.norm(y.astype(np.float64) - x, axis=1)
    bound = np.linalg.norm(error_bound(fmt, xr), axis=1) * (1 + 1e-4) + 1e-5 * np.linalg.norm(
        x, axis=1)
    assert (err <= bound).all()
    # and the rotation is undone: without it the values are the rotated ones
    y_rot = rotq.dequantize(q, fmt, d)
    assert np.abs(y_rot - xr).max() <= error_bound(fmt, xr).max() + 1e-6
    if fmt not in ("f32", "f16", "bf16"):
        assert not np.allclose(y_rot, y, atol=1e-2 * np.abs(x).max())


@pytest.mark.parametrize("fmt", ROW)
@pytest.mark.parametrize("rotation", ["hadamard", "block:32", "randomized:9"])
def test_row_format_rotated_round_trip(fmt, rotation):
    d = 128
    x, xr, q = _rotated_rows(fmt, rotation, d)
    y = rotq.dequantize(q, fmt, d, rotation=rotation)
    y_rot = rotq.dequantize(q, fmt, d)
    np.testing.assert_array_equal(y_rot, rotq.oracle.dequantize(q, fmt, d))
    # the rotation is undone: the decoded rotated rows, rotated back
    np.testing.assert_allclose(y, rotq.rotate(y_rot, rotation, inverse=True), rtol=0,
                               atol=1e-6 * np.abs(y_rot).max())
    assert not np.allclose(y_rot, y, atol=1e-2 * np.abs(x).max())
    # The rotation is orthonormal: each row's distortion is that of the rotated row.
    r = distortion(y, x)
    np.testing.assert_allclose(r, distortion(y_rot, xr), rtol=1e-4, atol=1e-7)
    # A full-row rotation makes the row Gaussian-like: the format's distortion, far below
    # that of the row as it is; block:32 spreads the outlier over its 32 values only.
    want = ROW_DISTORTION[fmt]
    assert r.max() <= ROW_WORST * want
    assert r.mean() <= want * (1.5 if rotation == "block:32" else 1 + ROW_MEAN_TOL)
    if rotation != "block:32":
        plain = distortion(rotq.dequantize(rotq.quantize(x, fmt), fmt, d), x)
        assert plain.mean() > 2 * r.mean()


def test_rotation_lowers_q4_error_with_outliers():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[:, [3, 77]] *= 40.0
    plain = rotq.dequantize(rotq.quantize(x, "q4_0"), "q4_0", 128)
    rot = rotq.dequantize(rotq.quantize(x, "q4_0", "hadamard"), "q4_0", 128, "hadamard")
    # errors on the non-outlier channels: the rotation spreads the outliers' scale away
    mask = np.ones(128, bool)
    mask[[3, 77]] = False
    assert np.linalg.norm((rot - x)[:, mask]) < 0.7 * np.linalg.norm((plain - x)[:, mask])


def test_explicit_matrix_rotation(rng):
    d = 64
    r, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = rng.standard_normal((8, d)).astype(np.float32)
    q = rotq.quantize(x, "q8_0", rotation=r)
    np.testing.assert_array_equal(q, rotq.quantize(rotq.rotate(x, r), "q8_0"))
    y = rotq.dequantize(q, "q8_0", d, rotation=r)
    assert np.abs(y - x).max() < 0.05


# ------------------------------------------------------------------------------ dtypes, shapes


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "iq4_nl", "fp8_e4m3", "f16", "bf16", "tq4",
                                 "tq2_qjl"])
def test_f16_input_is_widened_exactly(fmt, rng):
    x = rng.standard_normal((16, 64)).astype(np.float16)
    np.testing.assert_array_equal(rotq.quantize(x, fmt), rotq.quantize(x.astype(np.float32), fmt))
    np.testing.assert_array_equal(rotq.quantize(x, fmt, "hadamard"),
                                  rotq.quantize(x.astype(np.float32), fmt, "hadamard"))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "q5_1", "bf16", "tq3", "tq3_qjl"])
def test_torch_bf16_and_f16_inputs(fmt):
    torch = pytest.importorskip("torch")
    t = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        td = t.to(dtype)
        got = rotq.quantize(td, fmt)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), rotq.quantize(td.float().numpy(), fmt))
        back = rotq.dequantize(got, fmt, 64)
        assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
        np.testing.assert_array_equal(back.numpy(), rotq.dequantize(got.numpy(), fmt, 64))


@pytest.mark.parametrize("fmt", ["q8_0", "tq4", "tq2_qjl"])
@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 96), (2, 1, 3, 32)])
def test_shapes(shape, fmt, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    d = shape[-1]
    q = rotq.quantize(x, fmt)
    assert q.shape == (*shape[:-1], rotq.row_bytes(fmt, d))
    np.testing.assert_array_equal(q.reshape(-1, q.shape[-1]),
                                  rotq.quantize(x.reshape(-1, d), fmt))
    y = rotq.dequantize(q, fmt, d)
    assert y.shape == shape
    # bytes of several rows in one last axis give [rows, dim]
    flat = rotq.dequantize(q.reshape(-1), fmt, d)
    rows = int(np.prod(shape[:-1], dtype=int))
    assert flat.shape == ((rows, d) if rows > 1 else (d,))
    np.testing.assert_array_equal(flat.reshape(shape), y)


@pytest.mark.parametrize("fmt", ROW)
def test_row_format_out_arguments(fmt, rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    out = np.zeros((4, rotq.row_bytes(fmt, 64)), dtype=np.uint8)
    assert rotq.quantize(x, fmt, out=out) is out
    np.testing.assert_array_equal(out, rotq.oracle.quantize(x, fmt))
    vals = np.zeros((4, 64), dtype=np.float32)
    assert rotq.dequantize(out, fmt, 64, out=vals) is vals
    np.testing.assert_array_equal(vals, rotq.oracle.dequantize(out, fmt, 64))


def test_out_arguments(rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    out = np.zeros((4, 36), dtype=np.uint8)
    assert rotq.quantize(x, "q4_0", out=out) is out
    np.testing.assert_array_equal(out, ggml_quantize_q4_0(x))
    vals = np.zeros((4, 64), dtype=np.float32)
    assert rotq.dequantize(out, "q4_0", 64, out=vals) is vals
    np.testing.assert_array_equal(vals, ggml_dequantize_q4_0(out, 64))


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros(fmt):
    x = np.zeros((3, 64), dtype=np.float32)
    q = rotq.quantize(x, fmt)
    np.testing.assert_array_equal(q, rotq.oracle.quantize(x, fmt))
    y = rotq.dequantize(q, fmt, 64)
    np.testing.assert_array_equal(y, 0.0)  # (-0.0 for ggml's d = 0 / -8 blocks, as ggml)
    np.testing.assert_array_equal(rotq.dequantize(rotq.quantize(x, fmt, "hadamard"), fmt, 64,
                                                  "hadamard"), 0.0)


def test_zeros_in_ggml():
    x = np.zeros((2, 64), dtype=np.float32)
    for fmt, (quant, _, _) in GGML.items():
        np.testing.assert_array_equal(rotq.quantize(x, fmt), quant(x))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["huge", "tiny", "tiny_subnormal_scale", "f32_max"])
def test_extreme_magnitudes_match_oracle(fmt, case):
    rng = np.random.default_rng(9)
    base = rng.standard_normal((4, 64)).astype(np.float32)
    x = {"huge": base * np.float32(1e30), "tiny": base * np.float32(1e-30),
         "tiny_subnormal_scale": base * np.float32(1e-38),
         "f32_max": np.where(base > 0, np.float32(3.4e38), np.float32(-3.4e38))}[case]
    x = x.astype(np.float32)
    with np.errstate(all="ignore"):
        q = rotq.quantize(x, fmt)
        np.testing.assert_array_equal(q, rotq.oracle.quantize(x, fmt))
        y = rotq.dequantize(q, fmt, 64)
        np.testing.assert_array_equal(y, rotq.oracle.dequantize(q, fmt, 64))
    if fmt in GGML and case != "f32_max":
        np.testing.assert_array_equal(q, GGML[fmt][0](x))


@pytest.mark.parametrize("fmt", BLOCK)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(fmt, bad):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 5] = bad  # block 0 of row 1
    q = rotq.quantize(x, fmt)  # must not crash
    np.testing.assert_array_equal(q, rotq.oracle.quantize(x, fmt))
    y = rotq.dequantize(q, fmt, 64)
    np.testing.assert_array_equal(y, rotq.oracle.dequantize(q, fmt, 64))
    clean = np.ones(x.shape, bool)
    if fmt in SCALED:
        # the block holding it is poisoned (all NaN), never silently replaced
        assert np.isnan(y[1, :32]).all()
        clean[1, :32] = False
    else:
        assert np.isnan(y[1, 5]) if np.isnan(bad) else y[1, 5] == bad
        clean[1, 5] = False
    # every other block is as without the bad value
    assert np.isfinite(y[clean]).all()
    x_ok = x.copy()
    x_ok[1] = 0.5
    y_ok = rotq.dequantize(rotq.quantize(x_ok, fmt), fmt, 64)
    np.testing.assert_array_equal(y[[0, 2, 3]], y_ok[[0, 2, 3]])
    np.testing.assert_array_equal(y[1, 32:], rotq.dequantize(rotq.quantize(x[1:2, 32:].copy(), fmt),
                                                              fmt, 32)[0])


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_non_finite_with_rotation_does_not_crash(fmt):
    x = np.ones((2, 64), dtype=np.float32)
    x[0, 0] = np.nan
    q = rotq.quantize(x, fmt, "hadamard")
    y = rotq.dequantize(q, fmt, 64, "hadamard")
    assert np.isnan(y[0]).all()  # the rotation spreads NaN over the whole row
    assert np.abs(y[1] - 1).max() < 0.05


@pytest.mark.parametrize("fmt", ROW)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_row_format_non_finite_input(fmt, bad):
    """A row holding a NaN or an infinity is poisoned as a whole (a row is the unit): NaN
    stores the one f16 NaN 0x7E00 as its scale (MSE) or norms (QJL) and decodes to NaN
    everywhere; an infinity stores an infinite (or NaN) scale and decodes to no finite value.
    The other rows are as without it."""
    rng = np.random.default_rng(10)
    d = 64
    x = rng.standard_normal((4, d)).astype(np.float32)
    x[1, 5] = bad
    q = rotq.quantize(x, fmt)  # must not crash
    np.testing.assert_array_equal(q, rotq.oracle.quantize(x, fmt))
    y = rotq.dequantize(q, fmt, d)
    np.testing.assert_array_equal(y, rotq.oracle.dequantize(q, fmt, d))
    fields = row_f16_fields(fmt, d)
    stored = [int(q[1, o]) | int(q[1, o + 1]) << 8 for o in fields]
    if np.isnan(bad):
        assert np.isnan(y[1]).all()
        assert stored == [0x7E00] * len(fields)
        # every code and sign bit 0: one encoding of a NaN row, wherever its NaN is
        codes = np.ones(q.shape[1], bool)
        for o in fields:
            codes[o:o + 2] = False
        assert (q[1, codes] == 0).all()
        x_elsewhere = x.copy()
        x_elsewhere[1] = rng.standard_normal(d)
        x_elsewhere[1, d - 1] = np.nan
        np.testing.assert_array_equal(rotq.quantize(x_elsewhere, fmt)[1], q[1])
    else:
        assert not np.isfinite(y[1]).any()
        assert stored[0] & 0x7C00 == 0x7C00  # the scale / norm: an f16 infinity or NaN
    # every other row is as without the bad value, and as quantized alone
    assert np.isfinite(y[[0, 2, 3]]).all()
    x_ok = x.copy()
    x_ok[1] = 0.5
    q_ok = rotq.quantize(x_ok, fmt)
    np.testing.assert_array_equal(q[[0, 2, 3]], q_ok[[0, 2, 3]])
    np.testing.assert_array_equal(y[[0, 2, 3]], rotq.dequantize(q_ok, fmt, d)[[0, 2, 3]])
    np.testing.assert_array_equal(y[[0, 2, 3]],
                                  rotq.dequantize(rotq.quantize(x[[0, 2, 3]], fmt), fmt, d))
    # through a rotation too: the row is lost as a whole, the others are not
    yr = rotq.dequantize(rotq.quantize(x, fmt, "hadamard"), fmt, d, "hadamard")
    assert not np.isfinite(yr[1]).any()
    assert np.isfinite(yr[[0, 2, 3]]).all()


@pytest.mark.parametrize("fmt", ROW)
def test_row_format_norm_range(fmt, rng):
    """A row's scale is stored as f16: rows of norm up to about 65504 decode finite, beyond it
    they decode to no finite value (never a silently wrong finite one); rows of norm below
    about 3e-8 decode to zeros."""
    d = 128
    x = rng.standard_normal((6, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    norms = np.array([1e4, 4e4, 1e5, 1e7, 1e-9, 1e-20])[:, None]
    x = (x * norms).astype(np.float32)
    q = rotq.quantize(x, fmt)
    np.testing.assert_array_equal(q, rotq.oracle.quantize(x, fmt))
    with np.errstate(all="ignore"):
        y = rotq.dequantize(q, fmt, d)
    np.testing.assert_array_equal(y, rotq.oracle.dequantize(q, fmt, d))
    assert np.isfinite(y[:2]).all()
    assert (distortion(y[:2], x[:2]) <= ROW_WORST * ROW_DISTORTION[fmt]).all()
    assert not np.isfinite(y[2:4]).any()
    np.testing.assert_array_equal(y[4:], 0.0)


# ------------------------------------------------------------------------------ vLLM's slot parts

# Bytes of a row of 128 in vLLM's slots (its test's PRESET_EXPECTED offsets).
VLLM_BYTES_128 = {"vllm_fp8": 128, "vllm_k4": 66, "vllm_k3": 50, "vllm_v4": 68, "vllm_v3": 52}


@pytest.mark.parametrize("fmt", VLLM)
@pytest.mark.parametrize("dim", [64, 128])
def test_vllm_parts_kernel_equals_oracle(fmt, dim):
    """The CPU path writes and reads the oracle's bytes and values; a row of 128 has the size
    of its part of vLLM's slot; a row with a NaN or an infinity decodes to NaN, the others as
    without it."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((40, dim)).astype(np.float32)
    got = rotq.quantize(x, fmt)
    np.testing.assert_array_equal(got, rotq.oracle.quantize(x, fmt))
    y = rotq.dequantize(got, fmt, dim)
    np.testing.assert_array_equal(y, rotq.oracle.dequantize(got, fmt, dim))
    assert np.isfinite(y).all()
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    # About the format's own error on Gaussian rows: 3 mantissa bits; codebooks of 16 and 8
    # levels (sqrt of 0.0095, 0.034); min-max steps of range / 15 and range / 7.
    bound = {"vllm_fp8": 0.05, "vllm_k4": 0.12, "vllm_k3": 0.22, "vllm_v4": 0.12,
             "vllm_v3": 0.25}[fmt]
    assert rel < bound, f"{fmt}: {rel}"
    assert rotq.row_bytes(fmt, 128) == VLLM_BYTES_128[fmt]
    bad = x.copy()
    bad[3, 5] = np.nan
    bad[7, 1] = np.inf
    yb = rotq.dequantize(rotq.quantize(bad, fmt), fmt, dim)
    assert np.isnan(yb[3]).all() and np.isnan(yb[7]).all()
    keep = [i for i in range(40) if i not in (3, 7)]
    np.testing.assert_array_equal(yb[keep], y[keep])


@pytest.mark.parametrize("fmt", ["vllm_k4", "vllm_k3"])
def test_vllm_keys_take_powers_of_two(fmt):
    """vLLM rotates its keys by the Sylvester Hadamard inside the format: powers of two only."""
    x = np.ones((2, 96), np.float32)
    with pytest.raises(rotq.InvalidInputError):
        rotq.quantize(x, fmt)
    with pytest.raises(rotq.InvalidInputError):
        rotq.row_bytes(fmt, 96)
