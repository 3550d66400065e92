"""``python -m rotq.bench_cuda``: the torch ops' decode step on a CUDA device, in one run.

A decode batch of 16 sequences × 32k tokens (32 query heads, 8 KV heads of 128) over a paged
q4_0 pool: ``torch.ops.rotq.batch_attention`` called eagerly and replayed from a CUDA graph,
beside torch's SDPA on the same batch held in float16 (its fastest backend, GQA), checked
against SDPA on the dequantized cache first; GB/s over the bytes each reads, beside the
device's copy bandwidth (``Tensor.copy_``, the ceiling); and the host time of one eager call
and of one graph launch. CUDA events time the device; the median of ``--repeats`` runs.

Options: ``--seqs N``, ``--tokens N``, ``--format F`` (K and V), ``--repeats N`` (default 20).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rotq
import rotq.ops  # noqa: F401


def _device_ms(fn, repeats: int) -> float:
    """The median device time of ``fn`` in ms (CUDA events), after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _host_us(fn, calls: int = 200) -> float:
    """Host time of one call of ``fn`` in µs (the device left to run behind)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rotq.bench_cuda",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--format", default="q4_0")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and rotq.cuda_available()):
        raise SystemExit("skipped: no CUDA device")
    dev = torch.device("cuda:0")
    b, n, fmt = args.seqs, args.tokens, args.format
    h_kv, h_q, d, page = 8, 32, 128, 16
    pages = b * n // page
    spec = rotq.ops.pool_spec(fmt, fmt, h_kv, d, d, pages, page, "hadamard", "hadamard")
    kb, vb = rotq.pool_bytes(fmt, fmt, h_kv, d, d, pages, page)
    k_pool = torch.empty(kb, dtype=torch.uint8, device=dev)
    v_pool = torch.empty(vb, dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    # Sequence s owns pages s·n/page …; its tokens fill them in order. Appended in chunks,
    # the f16 rows kept for SDPA.
    k16 = torch.empty((b, h_kv, n, d), dtype=torch.float16, device=dev)
    v16 = torch.empty_like(k16)
    chunk = 4096
    for s in range(b):
        for t0 in range(0, n, chunk):
            k = torch.randn((chunk, h_kv, d), generator=g, device=dev, dtype=torch.float16)
            v = torch.randn((chunk, h_kv, d), generator=g, device=dev, dtype=torch.float16)
            slots = torch.arange(s * n + t0, s * n + t0 + chunk, device=dev)
            torch.ops.rotq.pool_append(k_pool, v_pool, k, v, slots, spec)
            k16[s, :, t0:t0 + chunk] = k.transpose(0, 1)
            v16[s, :, t0:t0 + chunk] = v.transpose(0, 1)
    q = torch.randn((b, h_q, d), generator=g, device=dev, dtype=torch.float16)
    loc = torch.arange(b + 1, dtype=torch.int32, device=dev)
    table = torch.arange(pages, dtype=torch.int32, device=dev).view(b, n // page)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)

    def rotq_step():
        return torch.ops.rotq.batch_attention(q, k_pool, v_pool, loc, table, lens, h_q, spec)

    def sdpa_step():
        return torch.nn.functional.scaled_dot_product_attention(
            q.view(b, h_q, 1, d), k16, v16, enable_gqa=True)

    # Checked first: sequence 0 against SDPA on its dequantized cache.
    out = rotq_step()
    rows = k_pool.view(-1, h_kv, rotq.row_bytes(fmt, d))[:n]
    kd = torch.ops.rotq.dequantize(rows, fmt, d, "hadamard").transpose(0, 1)
    rows = v_pool.view(-1, h_kv, rotq.row_bytes(fmt, d))[:n]
    vd = torch.ops.rotq.dequantize(rows, fmt, d, "hadamard").transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:1].float().view(1, h_q, 1, d), kd[None], vd[None], enable_gqa=True)
    err = float((out[0].float() - want.view(h_q, d)).norm() / want.norm())
    assert err < 1e-2, f"rotq against SDPA on the dequantized cache: relative error {err}"
    ref = sdpa_step().view(b, h_q, d)

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rotq_step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = rotq_step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out), "the replayed step differs from the eager one"

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = _device_ms(lambda: dst.copy_(src), args.repeats)
    ceiling = 2 * src.numel() / copy_ms / 1e6
    cache_bytes = kb + vb
    f16_bytes = 2 * k16.numel() * 2
    print(f"rotq {rotq.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"decode {b} x {n} tokens, {h_q}/{h_kv} heads x {d}, {fmt} K and V "
          f"(rotq vs SDPA on f16: {float((out.float() - ref.float()).norm() / ref.float().norm()):.2e} "
          f"apart, the format's error); median of {args.repeats}")
    print(f"{'copy (Tensor.copy_, 1 GiB)':40s} {ceiling:8.1f} GB/s   ceiling")
    t_eager = _device_ms(rotq_step, args.repeats)
    t_graph = _device_ms(graph.replay, args.repeats)
    t_sdpa = _device_ms(sdpa_step, args.repeats)
    for name, t, nbytes in (("torch.ops.rotq.batch_attention", t_eager, cache_bytes),
                            ("  the same, CUDA graph replay", t_graph, cache_bytes),
                            ("torch SDPA on f16 K/V (GQA)", t_sdpa, f16_bytes)):
        bw = nbytes / t / 1e6
        print(f"{name:40s} {t * 1e3:8.1f} us {bw:8.1f} GB/s {100 * bw / ceiling:5.1f}% of copy"
              f"   SDPA x{t_sdpa / t:5.2f}")
    print(f"{'host: one eager call':40s} {_host_us(rotq_step):8.1f} us")
    print(f"{'host: one graph launch':40s} {_host_us(graph.replay):8.1f} us")


if __name__ == "__main__":
    main()
