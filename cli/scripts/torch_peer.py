"""The PyTorch peers of `rotq bench --device cuda:N`, timed with CUDA events on the same shapes
as ours: the dense rotation `x @ H` that engines use today, and decode attention with
`scaled_dot_product_attention` (its flash backend where it takes the shape) on an f16 cache.

Reads one JSON object from argv[1]:
  {"device": 0, "bytes": B, "runs": R, "cases": [CASE, ...]}
where CASE is {"id": ID, "kind": "rotate", "dtype": "f16"|"bf16", "n": N} or
{"id": ID, "kind": "sdpa", "batch": B, "h_q": HQ, "h_kv": HKV, "n": N, "d": D} (decode: one
query per sequence against N cached tokens) or {"id": ID, "kind": "sdpa_prefill", "h_q": HQ,
"h_kv": HKV, "n": N, "d": D} (causal prefill of N tokens of one sequence), and prints one
JSON object per case: {"id", "ms"} (median of R timed runs after warm-up, rotating between two
input buffers; "backend" too for sdpa), or {"id", "error"}.
"""
import json
import sys

import torch


def hadamard(n, dtype, device):
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype)


def timed(runs, fn):
    for i in range(3):
        fn(i)
    times = []
    for i in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def rotate(spec, case, device):
    dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}
    n, dtype = case["n"], dtypes[case["dtype"]]
    rows = spec["bytes"] // (2 * n)
    xs = [torch.randn(rows, n, dtype=dtype, device=device) for _ in range(2)]
    y = torch.empty_like(xs[0])
    h = hadamard(n, dtype, device)
    return {"ms": timed(spec["runs"], lambda i: torch.matmul(xs[i % 2], h, out=y))}


def sdpa(spec, case, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    b, hq, hkv, n, d = case["batch"], case["h_q"], case["h_kv"], case["n"], case["d"]
    qs = [torch.randn(b, hq, 1, d, dtype=torch.float16, device=device) for _ in range(2)]
    k = torch.randn(b, hkv, n, d, dtype=torch.float16, device=device)
    v = torch.randn(b, hkv, n, d, dtype=torch.float16, device=device)
    errors = []
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)]:
        try:
            with sdpa_kernel([backend]):
                ms = timed(spec["runs"], lambda i: F.scaled_dot_product_attention(
                    qs[i % 2], k, v, enable_gqa=True))
            return {"ms": ms, "backend": name}
        except Exception as e:  # noqa: BLE001 - try the next backend
            errors.append(f"{name}: {e}")
    raise RuntimeError("; ".join(errors))


def sdpa_prefill(spec, case, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    hq, hkv, n, d = case["h_q"], case["h_kv"], case["n"], case["d"]
    qs = [torch.randn(1, hq, n, d, dtype=torch.float16, device=device) for _ in range(2)]
    k = torch.randn(1, hkv, n, d, dtype=torch.float16, device=device)
    v = torch.randn(1, hkv, n, d, dtype=torch.float16, device=device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ms = timed(spec["runs"], lambda i: F.scaled_dot_product_attention(
            qs[i % 2], k, v, is_causal=True, enable_gqa=True))
    return {"ms": ms, "backend": "flash"}


def main():
    spec = json.loads(sys.argv[1])
    device = torch.device("cuda", spec["device"])
    for case in spec["cases"]:
        try:
            run = {"sdpa": sdpa, "sdpa_prefill": sdpa_prefill}.get(case.get("kind"), rotate)
            out = run(spec, case, device)
            out["id"] = case["id"]
            print(json.dumps(out))
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            print(json.dumps({"id": case["id"], "error": str(e)}))
        torch.cuda.empty_cache()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
