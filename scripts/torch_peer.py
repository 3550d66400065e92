"""The PyTorch peer of `rotq bench --device cuda:N`: the dense rotation `x @ H` that engines
use today, timed with CUDA events on the same shapes as ours.

Reads one JSON object from argv[1]:
  {"device": 0, "bytes": B, "runs": R, "cases": [{"dtype": "f16"|"bf16", "n": N}, ...]}
and prints one JSON object per case: {"dtype", "n", "ms"} (median of R timed products after
warm-up, rotating between two input buffers), or {"dtype", "n", "error"}.
"""
import json
import sys

import torch


def hadamard(n, dtype, device):
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype)


def main():
    spec = json.loads(sys.argv[1])
    device = torch.device("cuda", spec["device"])
    dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}
    for case in spec["cases"]:
        n, dtype = case["n"], dtypes[case["dtype"]]
        try:
            rows = spec["bytes"] // (2 * n)
            xs = [torch.randn(rows, n, dtype=dtype, device=device) for _ in range(2)]
            y = torch.empty_like(xs[0])
            h = hadamard(n, dtype, device)
            for i in range(3):
                torch.matmul(xs[i % 2], h, out=y)
            times = []
            for i in range(spec["runs"]):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(xs[i % 2], h, out=y)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            times.sort()
            print(json.dumps({"dtype": case["dtype"], "n": n, "ms": times[len(times) // 2]}))
            del xs, y, h
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            print(json.dumps({"dtype": case["dtype"], "n": n, "error": str(e)}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
