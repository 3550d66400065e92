"""Dao-AILab fast_hadamard_transform semantics: unnormalized, zero-padded, cut back."""

from __future__ import annotations

import math

import numpy as np
import pytest

import rotq
from conftest import dao_reference, fwht_kron, next_pow2, sylvester

# Dao-AILab's test tolerances, per dtype (rtol, atol), with atol relative to the output's
# magnitude (the tests there scale by 1/sqrt(dim) so outputs are O(1)).
TOL = {"float32": (3e-4, 3e-3), "float16": (3e-3, 5e-3), "bfloat16": (1e-2, 5e-2)}

FUNCS = {
    1: rotq.hadamard_transform,
    12: rotq.hadamard_transform_12N,
    20: rotq.hadamard_transform_20N,
    28: rotq.hadamard_transform_28N,
    40: rotq.hadamard_transform_40N,
}


def _check(got, want, dtype_name):
    rtol, atol = TOL[dtype_name]
    mag = max(1.0, float(np.sqrt(np.mean(want**2))))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol,
                               atol=atol * mag)


def test_fwht_helper_matches_kronecker_matrix(rng):
    x = rng.standard_normal((3, 64))
    np.testing.assert_allclose(fwht_kron(x), x @ sylvester(64), atol=1e-12)


def test_docstring_examples():
    x = np.ones((2, 8), dtype=np.float32)
    np.testing.assert_array_equal(rotq.hadamard_transform(x)[0], [8, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        rotq.hadamard_transform(np.array([1, 2], dtype=np.float32), scale=0.5), [1.5, -0.5])


@pytest.mark.parametrize("dim,rows", [(1, 4), (2, 4), (8, 5), (137, 6), (256, 7), (1024, 3),
                                      (32768, 2)])
@pytest.mark.parametrize("scale_kind", ["one", "inv_sqrt"])
def test_hadamard_transform_f32(dim, rows, scale_kind, rng):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    scale = 1.0 if scale_kind == "one" else 1.0 / math.sqrt(next_pow2(dim))
    got = rotq.hadamard_transform(x, scale)
    assert got.dtype == np.float32 and got.shape == x.shape
    want = dao_reference(x, scale)
    _check(got, want, "float32")


def test_hadamard_transform_pads_with_zeros(rng):
    # dim 137 pads to 256: out = (pad(x) @ H)[:, :137], checked against the explicit matrix
    dim = 137
    x = rng.standard_normal((3, dim)).astype(np.float32)
    h = sylvester(256)[:dim, :dim]  # only the first `dim` rows of H meet non-zero inputs
    np.testing.assert_allclose(rotq.hadamard_transform(x), x.astype(np.float64) @ h,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dim", [2, 8, 16, 32, 64, 100])
def test_hadamard_transform_integer_results_are_exact(dim):
    # Unnormalized +-1 sums of small integers are exact in f32 (as Dao-AILab's kernel gives
    # them): no drift from a 1/sqrt(n) normalization undone in f32.
    x = (np.arange(2 * dim, dtype=np.float32) - dim).reshape(2, dim)
    np.testing.assert_array_equal(rotq.hadamard_transform(x), dao_reference(x, 1.0))


@pytest.mark.parametrize("base", [12, 20, 28, 40])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_xN_exact_sizes(base, k, rng):
    dim = base * 2**k
    x = rng.standard_normal((4, dim)).astype(np.float32)
    scale = 1.0 / math.sqrt(dim)
    got = FUNCS[base](x, scale)
    assert got.dtype == np.float32 and got.shape == x.shape
    _check(got, dao_reference(x, scale, base), "float32")


@pytest.mark.parametrize("base,dim", [(12, 100), (12, 13), (20, 100), (20, 21), (28, 30),
                                      (28, 200), (40, 50), (40, 10), (12, 1), (20, 7)])
def test_xN_padded(base, dim, rng):
    p = next_pow2(-(-dim // base))
    assert base * p >= dim and (p == 1 or base * p // 2 < dim)
    x = rng.standard_normal((3, dim)).astype(np.float32)
    got = FUNCS[base](x, 0.25)
    assert got.shape == x.shape
    _check(got, dao_reference(x, 0.25, base), "float32")


def test_20N_at_multiples_of_40_uses_M20(rng):
    # rotq's own Hadamard takes the base 40 at 80 = 40 * 2; Dao's 20N must stay M_20 (x) H_4.
    dim = 80
    x = rng.standard_normal((5, dim)).astype(np.float32)
    got = rotq.hadamard_transform_20N(x, 1.0)
    want20 = x.astype(np.float64) @ np.kron(rotq.oracle.hadamard(20) * math.sqrt(20),
                                            sylvester(4)).T
    want40 = x.astype(np.float64) @ np.kron(rotq.oracle.hadamard(40) * math.sqrt(40),
                                            sylvester(2)).T
    assert not np.allclose(want20, want40, atol=1e-2)  # the two readings differ
    _check(got, want20, "float32")
    # and 40N at the same size is the M_40 one
    _check(rotq.hadamard_transform_40N(x, 1.0), want40, "float32")


def test_base_matrices_are_hadamard():
    for m in (12, 20, 28, 40):
        mm = rotq.oracle.hadamard(m) * math.sqrt(m)
        np.testing.assert_allclose(np.abs(mm), 1.0, atol=1e-12)
        np.testing.assert_allclose(mm @ mm.T, m * np.eye(m), atol=1e-9)


@pytest.mark.parametrize("base,dim", [(1, 256), (1, 100), (12, 96), (20, 160), (28, 112),
                                      (40, 80)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_dtypes(base, dim, dtype):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(base * 1000 + dim)
    x = torch.randn(4, dim, generator=g).to(getattr(torch, dtype))
    scale = 1.0 / math.sqrt(dim)
    got = FUNCS[base](x, scale)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = dao_reference(x.float().numpy(), scale, base)
    _check(got.float().numpy(), want, dtype)


@pytest.mark.parametrize("base,dim", [(1, 512), (12, 48), (40, 160)])
def test_numpy_f16(base, dim, rng):
    x = rng.standard_normal((3, dim)).astype(np.float16)
    got = FUNCS[base](x, 1.0 / math.sqrt(dim))
    assert got.dtype == np.float16 and got.shape == x.shape
    _check(got, dao_reference(x, 1.0 / math.sqrt(dim), base), "float16")


@pytest.mark.parametrize("base,dim", [(1, 64), (1, 33), (12, 24), (28, 28)])
def test_extra_leading_axes(base, dim, rng):
    x = rng.standard_normal((2, 3, dim)).astype(np.float32)
    got = FUNCS[base](x, 0.5)
    assert got.shape == (2, 3, dim)
    _check(got, dao_reference(x, 0.5, base), "float32")
    # the same as the flattened rows
    np.testing.assert_array_equal(got.reshape(-1, dim), FUNCS[base](x.reshape(-1, dim), 0.5))


def test_out_argument_and_in_place(rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    want = dao_reference(x, 0.125)
    out = np.empty_like(x)
    assert rotq.hadamard_transform(x, 0.125, out=out) is out
    _check(out, want, "float32")
    ret = rotq.hadamard_transform(x, 0.125, out=x)
    assert ret is x
    _check(x, want, "float32")


def test_scale_is_linear(rng):
    x = rng.standard_normal((2, 128)).astype(np.float32)
    a = rotq.hadamard_transform(x, 1.0)
    b = rotq.hadamard_transform(x, -3.0)
    np.testing.assert_allclose(b, -3.0 * a, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(rotq.hadamard_transform(x, 0.0), np.zeros_like(x))


def test_too_long_is_an_error(rng):
    x = rng.standard_normal((1, 32769)).astype(np.float32)
    with pytest.raises(rotq.InvalidInputError):
        rotq.hadamard_transform(x)


def test_non_finite_scale_is_an_error(rng):
    x = rng.standard_normal((1, 8)).astype(np.float32)
    with pytest.raises(rotq.InvalidInputError, match="scale"):
        rotq.hadamard_transform(x, float("nan"))
