"""``python -m rotq.bench``: rotq's ``hadamard_transform`` beside NumPy in one run.

On a 64 MiB float32 array (rows of 128 and of 4096 values): rotq, NumPy's dense ``x @ H``
(BLAS) and a vectorized NumPy FWHT (log2 n butterfly passes), each checked against the dense
product before it is timed, as GB/s over the array's bytes read and written, beside the
measured copy bandwidth (``numpy.copyto``, the ceiling). Then the overhead of a tiny call (one
row of 128 values into ``out=``) over the kernel's own time for that row.

Options: ``--mib N`` (array size, default 64), ``--repeats N`` (default 5; the median is
reported).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import rotq


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm: pages touched, thread pools started
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def numpy_fwht(x: np.ndarray) -> np.ndarray:
    """The unnormalized FWHT over the last axis, in log2(n) vectorized butterfly passes."""
    n = x.shape[-1]
    y = x.reshape(-1, n).copy()
    h = 1
    while h < n:
        v = y.reshape(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :].copy(), v[:, :, 1, :]
        v[:, :, 0, :] += b
        v[:, :, 1, :] = a - b
        h *= 2
    return y.reshape(x.shape)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rotq.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    values = args.mib * (1 << 20) // 4
    print(f"rotq {rotq.__version__} ({rotq.cpu_isa()}), numpy {np.__version__}; "
          f"{args.mib} MiB float32, median of {args.repeats}")
    src = rng.standard_normal(values, dtype=np.float32)
    dst = np.empty_like(src)
    copy = _median_seconds(lambda: np.copyto(dst, src), args.repeats)
    ceiling = 2 * src.nbytes / copy / 1e9
    print(f"{'copy (numpy.copyto, one thread)':38s} {ceiling:8.2f} GB/s   ceiling")
    for n in (128, 4096):
        x = src.reshape(-1, n)
        out = np.empty_like(x)
        gb = 2 * x.nbytes / 1e9
        h = _sylvester(n)
        # Every contender is checked against the dense product on the first rows first.
        rows = min(x.shape[0], 256)
        want = x[:rows] @ h
        tol = 1e-3 * np.sqrt(n) * float(np.abs(x[:rows]).max())
        got = {
            "rotq.hadamard_transform": rotq.hadamard_transform(x[:rows]),
            "numpy FWHT (butterflies)": numpy_fwht(x[:rows]),
        }
        for name, y in got.items():
            err = float(np.abs(y - want).max())
            assert err <= tol, f"{name} at n={n}: max error {err} > {tol}"
        t_rotq = _median_seconds(lambda: rotq.hadamard_transform(x, out=out), args.repeats)
        t_fwht = _median_seconds(lambda: numpy_fwht(x), max(1, args.repeats // 2))
        # The dense product costs 2·n flops a value: timed on a slice at n = 4096.
        part = x if n <= 512 else x[: max(1, x.shape[0] // 16)]
        t_dense = _median_seconds(lambda: np.matmul(part, h), max(1, args.repeats // 2))
        t_dense *= x.shape[0] / part.shape[0]
        r = gb / t_rotq
        for name, t in (("rotq.hadamard_transform", t_rotq),
                        ("numpy FWHT (butterflies)", t_fwht),
                        ("numpy dense x @ H (BLAS)", t_dense)):
            bw = gb / t
            print(f"{name + f' n={n}':38s} {bw:8.2f} GB/s   rotq x{r / bw:6.2f}   "
                  f"{100 * bw / ceiling:5.1f}% of copy")
    # The tiny call: one row of 128 values, into out=.
    tiny = src[:128].reshape(1, 128).copy()
    tiny_out = np.empty_like(tiny)
    calls = 20000

    def loop():
        for _ in range(calls):
            rotq.hadamard_transform(tiny, out=tiny_out)

    per_call = _median_seconds(loop, 3) / calls
    x = src.reshape(-1, 128)
    per_row = _median_seconds(lambda: rotq.hadamard_transform(x, out=dst.reshape(-1, 128)),
                              args.repeats) / x.shape[0]
    print(f"{'tiny call (1 x 128, out=)':38s} {per_call * 1e6:8.2f} us a call; the kernel's "
          f"share {per_row * 1e9:.0f} ns a row; overhead {(per_call - per_row) * 1e6:.2f} us "
          f"(target < 5 us)")


if __name__ == "__main__":
    main()
