#!/usr/bin/env python3
"""Make a small real-activation fixture for `rotq eval --activations`.

Runs a small public causal LM (default Qwen/Qwen2.5-0.5B; SmolLM-135M works too) with
Hugging Face transformers on a fixed prompt, captures every attention layer's Q, K and V as the
attention kernel receives them (Q and K after RoPE, K and V before GQA's repeat: the values a
KV cache holds), keeps a few layers, KV heads and tokens, and writes them in f16 under rotq's
names to cli/tests/data/activations-<model>.safetensors:

    layers.{i}.q  [n_q, h_q, d]    the last n_q positions' queries (query heads of the kept KV heads)
    layers.{i}.k  [n_kv, h_kv, d]  every position's keys, after RoPE
    layers.{i}.v  [n_kv, h_kv, d_v]

Layer i of the file is the model layer listed in the file's metadata ("layers"). The output is
deterministic for a given model revision, transformers version and prompt (greedy forward pass,
fp32 on the CPU).

Needs: python3 with torch, transformers >= 4.48 (AttentionInterface) and safetensors, and the
model's weights (downloaded from the Hugging Face hub on first use, about 1 GB for Qwen2.5-0.5B).
Usage:

    pip install torch transformers safetensors
    python3 cli/scripts/make-activation-fixture.py                       # Qwen/Qwen2.5-0.5B
    python3 cli/scripts/make-activation-fixture.py --model HuggingFaceTB/SmolLM-135M
    cargo run --release --bin rotq -- eval --activations cli/tests/data/activations-qwen2.5-0.5b.safetensors

Defaults: 256 tokens, the last 128 as queries, the first, middle and last layers, the first 2
KV heads (and their query heads): about 1.1 MB for Qwen2.5-0.5B.
"""

import argparse
import json
import os
import sys

# A fixed prompt, written for this fixture (no third-party text): long enough for 256 tokens.
PROMPT = (
    "The lighthouse keeper wrote in her log every evening. On the first day of autumn she noted "
    "that the wind had turned to the north-east, that the supply boat was two days late, and "
    "that the lamp's clockwork needed oil. She listed the ships she had seen: a trawler heading "
    "home with gulls behind it, a grey freighter far out on the horizon, and a small sailing "
    "boat that tacked back and forth for an hour before it gave up and ran for the harbour. "
    "Then she counted what was left in the store room: eleven tins of beans, four of peaches, "
    "a sack of flour, half a wheel of cheese, coffee for a week and candles for a month. "
    "In the margin she did the sums again, because the boat was late, and decided that the "
    "peaches would wait for a worse day. Before she climbed the stairs to light the lamp she "
    "read the barometer, tapped it twice, and wrote down the number: it was falling. The radio "
    "said the storm would reach the coast after midnight, with gusts of ninety kilometres an hour "
    "and waves of six metres on the outer rocks. She checked the shutters, filled two buckets "
    "with fresh water, and carried the logbook up with her, because on nights like this she "
    "liked to write down the time of every change in the weather, the colour of the sea, and "
    "the name of every ship that called on the radio asking for the light."
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-0.5B")
    ap.add_argument("--revision", default=None, help="a model revision (commit) for reproducibility")
    ap.add_argument("--tokens", type=int, default=256, help="cached tokens kept")
    ap.add_argument("--queries", type=int, default=128, help="query positions kept (the last ones)")
    ap.add_argument("--layers", default="first,middle,last", help="comma list of layer indices, or first,middle,last")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads kept (the first ones)")
    ap.add_argument("--out", default=None, help="output file (default cli/tests/data/activations-<model>.safetensors)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        # query [b, h_q, s, d] and key/value [b, h_kv, s, d]: after RoPE, before repeat_kv.
        captured[module.layer_idx] = (query[0].detach(), key[0].detach(), value[0].detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rotq_capture", capture)
    tok = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, revision=args.revision, torch_dtype=torch.float32, attn_implementation="rotq_capture"
    )
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    if ids.shape[1] < args.tokens:
        print(f"the prompt has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}", file=sys.stderr)
        return 1
    ids = ids[:, : args.tokens]
    with torch.no_grad():
        model(ids, use_cache=False)

    n_layers = model.config.num_hidden_layers
    named = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
    layers = [named[x] if x in named else int(x) for x in args.layers.split(",")]
    tensors = {}
    shapes = []
    for i, layer in enumerate(layers):
        q, k, v = captured[layer]
        h_q, h_kv = q.shape[0], k.shape[0]
        group = h_q // h_kv
        kv = min(args.kv_heads, h_kv)
        # [heads, seq, d] -> [seq, heads, d]; the kept KV heads and their query heads.
        q = q[: kv * group, -args.queries :, :].transpose(0, 1)
        k = k[:kv].transpose(0, 1)
        v = v[:kv].transpose(0, 1)
        for t, x in (("q", q), ("k", k), ("v", v)):
            tensors[f"layers.{i}.{t}"] = x.to(torch.float16).contiguous()
        shapes.append({"layer": layer, "q": list(q.shape), "k": list(k.shape), "v": list(v.shape)})

    name = args.model.split("/")[-1].lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "tests", "data", f"activations-{name}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    import transformers

    metadata = {
        "model": args.model,
        "revision": str(args.revision),
        "transformers": transformers.__version__,
        "tokens": str(args.tokens),
        "layers": json.dumps(layers),
        "made_by": "cli/scripts/make-activation-fixture.py",
    }
    tmp = out + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {json.dumps(shapes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
