"""rotq.rotate against independent NumPy references (Sylvester by Kronecker products)."""

from __future__ import annotations

import numpy as np
import pytest

import rotq
from conftest import hadamard_normalized, sylvester

TOL = {np.float32: (2e-5, 2e-5), np.float16: (4e-3, 4e-3)}


def _rows(rng, n_rows, n, dtype=np.float32):
    return rng.standard_normal((n_rows, n)).astype(dtype)


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol,
                               atol=atol * scale)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hadamard_matches_kronecker(n, dtype, rng):
    x = _rows(rng, 5 if n < 4096 else 3, n, dtype)
    got = rotq.rotate(x, "hadamard")
    assert got.dtype == dtype and got.shape == x.shape and isinstance(got, np.ndarray)
    want = x.astype(np.float64) @ hadamard_normalized(n)
    _close(got, want, dtype)


def test_sylvester_helper_is_natural_order():
    # Entry (i, j) of natural-order Sylvester is (-1)^popcount(i & j): an independent check of
    # the helper the other tests trust.
    n = 32
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pop = np.vectorize(lambda v: bin(v).count("1"))(i & j)
    np.testing.assert_array_equal(sylvester(n), (-1.0) ** pop)


def test_hadamard_is_the_oracle_matrix():
    for n in (1, 2, 16, 256):
        np.testing.assert_allclose(rotq.oracle.hadamard(n), hadamard_normalized(n), atol=1e-15)


@pytest.mark.parametrize("n", [12, 20, 28, 40, 96, 160, 448])
def test_hadamard_non_power_of_two_matches_oracle_matrix(n, rng):
    x = _rows(rng, 4, n)
    h = rotq.oracle.hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    got = rotq.rotate(x, "hadamard")
    # Rows are outputs: y = H x, i.e. rows of x times H^T.
    _close(got, x.astype(np.float64) @ h.T, np.float32)
    back = rotq.rotate(got, "hadamard", inverse=True)
    _close(back, x.astype(np.float64), np.float32)


@pytest.mark.parametrize("rotation", ["hadamard", "block:16", "randomized:7", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_inverse_round_trip(rotation, dtype, rng):
    x = _rows(rng, 6, 128, dtype)
    y = rotq.rotate(x, rotation)
    back = rotq.rotate(y, rotation, inverse=True)
    # f16 rounds once after each transform
    _close(back, x.astype(np.float64), dtype if dtype == np.float16 else np.float32)
    if rotation != "none":
        assert not np.allclose(y.astype(np.float64), x.astype(np.float64), atol=1e-2)


def test_none_is_identity(rng):
    x = _rows(rng, 3, 64)
    np.testing.assert_array_equal(rotq.rotate(x, "none"), x)
    np.testing.assert_array_equal(rotq.rotate(x, None), x)


@pytest.mark.parametrize("n,block", [(128, 16), (256, 64), (96, 32), (64, 64), (64, 1)])
def test_block_is_block_diagonal(n, block, rng):
    x = _rows(rng, 4, n)
    hb = hadamard_normalized(block)
    bd = np.kron(np.eye(n // block), hb)
    got = rotq.rotate(x, f"block:{block}")
    _close(got, x.astype(np.float64) @ bd.T, np.float32)


def test_randomized_is_orthogonal_and_deterministic(rng):
    n = 256
    x = _rows(rng, 8, n)
    y = rotq.rotate(x, "randomized:42")
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(rotq.rotate(y, "randomized:42", inverse=True), x, atol=2e-5)
    # deterministic per seed, different across seeds
    np.testing.assert_array_equal(rotq.rotate(x, "randomized:42"), y)
    z = rotq.rotate(x, "randomized:43")
    assert not np.allclose(y, z, atol=1e-3)
    # and not the plain Hadamard
    assert not np.allclose(y, rotq.rotate(x, "hadamard"), atol=1e-3)


def test_randomized_is_hadamard_times_signs():
    # spec: H (s * x), s = +-1: column j of R is s_j * column j of H.
    n = 64
    r = rotq.rotate(np.eye(n, dtype=np.float32), "randomized:5").astype(np.float64)  # row j = R e_j
    h = hadamard_normalized(n)
    ratio = r / h  # row j: s_j everywhere
    s = ratio[:, 0]
    np.testing.assert_allclose(np.abs(s), 1.0, atol=1e-6)
    np.testing.assert_allclose(ratio, np.repeat(s[:, None], n, axis=1), atol=1e-5)
    assert (s > 0).any() and (s < 0).any()


@pytest.mark.parametrize("n", [8, 64, 100])
@pytest.mark.parametrize("mdtype", [np.float64, np.float32])
def test_explicit_matrix(n, mdtype, rng):
    r, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r = r.astype(mdtype)
    if mdtype == np.float32:
        # re-orthonormalize in float32 precision range: QR of the f32 matrix
        r = np.linalg.qr(r.astype(np.float64))[0].astype(np.float32)
    x = _rows(rng, 5, n)
    got = rotq.rotate(x, r)
    _close(got, x.astype(np.float64) @ r.astype(np.float64).T, np.float32)
    back = rotq.rotate(got, r, inverse=True)
    _close(back, x.astype(np.float64), np.float32)


def test_non_orthogonal_matrix_raises(rng):
    n = 16
    m = rng.standard_normal((n, n))
    x = _rows(rng, 2, n)
    with pytest.raises(rotq.InvalidInputError):
        rotq.rotate(x, m)
    with pytest.raises(ValueError):
        rotq.rotate(x, 1.5 * np.eye(n))
    with pytest.raises(rotq.RotqError):
        rotq.rotate(x, np.eye(n + 1))  # wrong size


def test_in_place(rng):
    x = _rows(rng, 4, 64)
    want = x.astype(np.float64) @ hadamard_normalized(64)
    ptr = x.ctypes.data
    ret = rotq.rotate(x, "hadamard", out=x)
    assert ret is x and x.ctypes.data == ptr
    _close(x, want, np.float32)


def test_out_argument(rng):
    x = _rows(rng, 4, 64)
    out = np.full_like(x, np.nan)
    ret = rotq.rotate(x, "hadamard", out=out)
    assert ret is out
    _close(out, x.astype(np.float64) @ hadamard_normalized(64), np.float32)


@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (2, 1, 2, 32)])
def test_leading_axes(shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    n = shape[-1]
    got = rotq.rotate(x, "hadamard")
    assert got.shape == shape
    _close(got.reshape(-1, n), x.reshape(-1, n).astype(np.float64) @ hadamard_normalized(n),
           np.float32)


def test_empty_rows():
    x = np.empty((0, 64), dtype=np.float32)
    assert rotq.rotate(x, "hadamard").shape == (0, 64)


@pytest.mark.parametrize("tdtype,tol", [("float32", 2e-5), ("float16", 4e-3), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("rotation", ["hadamard", "block:32", "randomized:3"])
def test_torch_tensors(tdtype, tol, rotation):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 128, generator=g).to(getattr(torch, tdtype))
    got = rotq.rotate(t, rotation)
    assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape
    want = rotq.oracle.rotate(t.float().numpy(), rotation)
    np.testing.assert_allclose(got.float().numpy(), want, rtol=tol, atol=tol * 4)
    # the same as NumPy's f32 path for the f32 case
    if tdtype == "float32":
        np.testing.assert_allclose(got.numpy(), rotq.rotate(t.numpy(), rotation), atol=1e-6)
    back = rotq.rotate(got, rotation, inverse=True)
    np.testing.assert_allclose(back.float().numpy(), t.float().numpy(), rtol=2 * tol,
                               atol=8 * tol)


def test_torch_in_place():
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    want = t.numpy().astype(np.float64) @ hadamard_normalized(64)
    ret = rotq.rotate(t, "hadamard", out=t)
    assert ret is t
    np.testing.assert_allclose(t.numpy(), want, atol=2e-5)


@pytest.mark.parametrize("rotation", ["hadamard", "block:8", "randomized:11", "none"])
@pytest.mark.parametrize("inverse", [False, True])
def test_oracle_rotate_agrees(rotation, inverse, rng):
    x = _rows(rng, 7, 256)
    got = rotq.rotate(x, rotation, inverse=inverse)
    want = rotq.oracle.rotate(x, rotation, inverse=inverse)
    assert want.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_oracle_rotate_matrix(rng):
    n = 24
    r, _ = np.linalg.qr(rng.standard_normal((n, n)))
    x = _rows(rng, 3, n).astype(np.float64)
    np.testing.assert_allclose(rotq.oracle.rotate(x, r), x @ r.T, atol=1e-12)
    np.testing.assert_allclose(rotq.oracle.rotate(x, r, inverse=True), x @ r, atol=1e-12)
