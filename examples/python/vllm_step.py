"""A vLLM-style serving loop over rotq's Python batch API, on NumPy arrays.

One K/V pool per layer, in memory the engine owns (uint8 arrays sized by ``rotq.pool_bytes``),
shared by every sequence; a page allocator and block tables kept by the engine; each step's
new tokens written into every layer's pool in one call through a slot mapping (with ``-1``
padding, as CUDA-graph batches pad); the step's attention planned once and run per layer.
Steps mix decode rows with prefill and chunked-prefill rows. Each sequence's output is checked
against exact attention twice: over the pool's dequantized rows (``rotq.oracle.attention``:
the kernels' own error, tiny) and over the unquantized keys and values (NumPy, float64: the
error the 8-bit cache adds, about one percent with the Hadamard rotation).

    python examples/python/vllm_step.py
"""

from __future__ import annotations

import sys

import numpy as np

import rotq

LAYERS = 2
H_KV, H_Q = 2, 8  # grouped-query attention: 4 query heads per KV head
D = 128  # head dim (K and V)
PAGE, N_PAGES = 16, 64
K_FORMAT, V_FORMAT = "q8_0", "q8_0"
QK_ROTATION = "hadamard"  # Q and K rotated alike: scores unchanged, outliers spread
PAD = 3  # padding tokens per step (slot -1)

KERNEL_TOL = 1e-4  # f32 kernels vs f64 oracle over the same dequantized rows (max abs)
CACHE_TOL = 0.02  # relative L2 error vs attention over unquantized K/V


def exact_attention(q, k, v, pos_offset):
    """Causal softmax attention in float64 with GQA: q [n, H_Q, D], k/v [len, H_KV, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(q.shape[-1])
    visible = np.arange(k.shape[0])[None, :] <= pos_offset + np.arange(q.shape[0])[:, None]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hij,jhd->ihd", p / p.sum(-1, keepdims=True), v)


class Sequence:
    def __init__(self):
        self.pages: list[int] = []
        self.len = 0
        self.k = [[] for _ in range(LAYERS)]  # unquantized rows, to check the outputs
        self.v = [[] for _ in range(LAYERS)]


def main() -> int:
    rng = np.random.default_rng(0)
    k_bytes, v_bytes = rotq.pool_bytes(K_FORMAT, V_FORMAT, H_KV, D, D, N_PAGES, PAGE)
    # The engine's memory: one K and one V array per layer.
    memory = [(np.zeros(k_bytes, np.uint8), np.zeros(v_bytes, np.uint8)) for _ in range(LAYERS)]
    pools = [rotq.KvPool(K_FORMAT, V_FORMAT, H_KV, D, D, N_PAGES, PAGE, k=k, v=v,
                         qk_rotation=QK_ROTATION) for k, v in memory]
    print(f"rotq {rotq.__version__} ({rotq.cpu_isa()}): {LAYERS} layers, pools of "
          f"{N_PAGES} pages x {PAGE} tokens, K {K_FORMAT} / V {V_FORMAT}, "
          f"{(k_bytes + v_bytes) / 2**20:.2f} MiB a layer")

    free = list(rng.permutation(N_PAGES))  # the page allocator
    seqs: list[Sequence] = []
    # New tokens per sequence and step (a sequence joins when its index is first reached).
    steps = [[40, 7, 23], [1, 1, 30, 5], [1, 1, 1, 1], [1, 1, 1, 9], [1, 1, 1, 1]]
    worst_kernel = worst_cache = 0.0
    for step, new in enumerate(steps):
        while len(seqs) < len(new):
            seqs.append(Sequence())
        # The engine's bookkeeping: pages for the new tokens, their slots, the tables.
        slots, positions, loc = [], [], [0]
        for s, n in zip(seqs, new):
            for t in range(s.len, s.len + n):
                if t % PAGE == 0:
                    s.pages.append(int(free.pop()))
                slots.append(s.pages[t // PAGE] * PAGE + t % PAGE)
                positions.append(t)
            s.len += n
            loc.append(loc[-1] + n)
        rows = loc[-1]
        slots += [-1] * PAD  # padding tokens: computed by the model, never stored
        positions += [0] * PAD
        slot_mapping = np.array(slots, np.int64)
        positions = np.array(positions, np.int64)
        query_start_loc = np.array(loc, np.int32)
        max_blocks = max(len(s.pages) for s in seqs)
        block_table = np.full((len(seqs), max_blocks), -1, np.int32)
        for b, s in enumerate(seqs):
            block_table[b, :len(s.pages)] = s.pages
        seq_lens = np.array([s.len for s in seqs], np.int32)

        # Plan once per step: every layer's pool has the same spec and tables ...
        plan = pools[0].plan(query_start_loc, H_Q, block_table=block_table, seq_lens=seq_lens)
        out = np.empty(plan.out_shape, np.float32)
        for layer, pool in enumerate(pools):
            # ... write the step's keys and values in one call ...
            k = rng.standard_normal((len(slots), H_KV, D), dtype=np.float32)
            v = rng.standard_normal((len(slots), H_KV, D), dtype=np.float32)
            k[:, :, 7] *= 8.0  # an outlier channel, as real keys have
            pool.append(k, v, slot_mapping, positions)
            at = 0
            for s, n in zip(seqs, new):
                s.k[layer].extend(k[at:at + n])
                s.v[layer].extend(v[at:at + n])
                at += n
            # ... and run per layer, into the engine's output buffer.
            q = rng.standard_normal((rows, H_Q, D), dtype=np.float32)
            pool.run(plan, q, out)

            rk, rv = rotq.row_bytes(K_FORMAT, D), rotq.row_bytes(V_FORMAT, D)
            k_deq = rotq.dequantize(pool.k.reshape(-1, rk), K_FORMAT, D,
                                    QK_ROTATION).reshape(-1, H_KV, D)
            v_deq = rotq.dequantize(pool.v.reshape(-1, rv), V_FORMAT, D).reshape(-1, H_KV, D)
            # The queries as the pool's attention takes them: by default ("auto") rotated and
            # through q8_0 over this rotated q8_0 K (integer products), i.e. the rows
            # R^T q8(R q) against the unrotated keys.
            q_seen = rotq.oracle.rotate(rotq.oracle.quantized_query(rotq.rotate(q, QK_ROTATION)),
                                        QK_ROTATION, inverse=True)
            for b, s in enumerate(seqs):
                r0, r1 = loc[b], loc[b + 1]
                seq_slots = [s.pages[t // PAGE] * PAGE + t % PAGE for t in range(s.len)]
                pos = s.len - (r1 - r0)
                want, _ = rotq.oracle.attention(q_seen[r0:r1], k_deq[seq_slots], v_deq[seq_slots],
                                                causal=True, pos_offset=pos)
                worst_kernel = max(worst_kernel, float(np.abs(out[r0:r1] - want).max()))
                exact = exact_attention(q[r0:r1], np.stack(s.k[layer]), np.stack(s.v[layer]),
                                        pos)
                rel = np.linalg.norm(out[r0:r1] - exact) / np.linalg.norm(exact)
                worst_cache = max(worst_cache, float(rel))
        print(f"step {step}: {len(seqs)} sequences, {rows} query rows "
              f"({sum(n == 1 for n in new)} decode), {N_PAGES - len(free)} pages in use, "
              f"workspace {plan.workspace_len} floats; max |out - oracle| {worst_kernel:.2e}, "
              f"worst relative L2 error vs exact {worst_cache:.4f}")
    assert worst_kernel < KERNEL_TOL, f"kernel error {worst_kernel} >= {KERNEL_TOL}"
    assert worst_cache < CACHE_TOL, f"cache error {worst_cache} >= {CACHE_TOL}"
    print(f"ok: kernels within {KERNEL_TOL} of the oracle, {K_FORMAT} + {QK_ROTATION} within "
          f"{CACHE_TOL:.0%} of exact attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
