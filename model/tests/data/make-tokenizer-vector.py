#!/usr/bin/env python3
"""Writes tokenizer-smollm2.json: the token ids that Hugging Face `tokenizers` gives a set of
test strings, with a BPE built from SmolLM2's GGUF vocabulary and merges and SmolLM2's
pre-tokenizer (Digits(individual_digits) then ByteLevel), so that rotq-model's tokenizer is
checked against an independent implementation.

    python3 -m venv /tmp/tokv && /tmp/tokv/bin/pip install tokenizers gguf
    /tmp/tokv/bin/python model/tests/data/make-tokenizer-vector.py MODEL.gguf > model/tests/data/tokenizer-smollm2.json
"""
import json
import sys

import gguf
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 3.14 and 1,000,000 items in 2024",
    "Don't stop; we'll see what you've done, isn't it? I'm sure they're fine, I'd say.",
    "multiple   spaces\tand\ttabs\n\nnew lines  \n  end ",
    "naïve café – 東京 🙂",
    "def add(a, b):\n    return a + b  # sum\n",
    "fn main() { println!(\"{}\", x[0] >> 2); }",
    "!!!??? ... --- ***",
    "   leading spaces",
    "trailing spaces   ",
    "Ünïcödé ÀÉÎÕÜ straße ﬁ ½ ² ٣",
    "e-mail: someone@example.com, https://example.org/a?b=c&d=e",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "",
    "\n",
    "a",
    "control \x07 bell, \x04 end of transmission (no token: dropped) and \x1b[0m",
]


def main():
    path = sys.argv[1]
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        # False where a byte has no token (the BPE drops it, having no unknown token).
        lossless = tok.decode(ids) == s
        cases.append({"text": s, "ids": ids, "lossless": lossless})
    out = {
        "made_by": "model/tests/data/make-tokenizer-vector.py",
        "reference": f"Hugging Face tokenizers {tokenizers.__version__}: "
        "BPE(vocab, merges) from the GGUF's tokenizer.ggml.tokens and tokenizer.ggml.merges, "
        "pre_tokenizers.Sequence([Digits(individual_digits=True), "
        "ByteLevel(add_prefix_space=False, use_regex=True)]), no special tokens",
        "model": path.rsplit("/", 1)[-1],
        "cases": cases,
    }
    # One case a line, so that a diff of the vector shows which strings changed.
    head = json.dumps({k: v for k, v in out.items() if k != "cases"}, ensure_ascii=False, indent=1)
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    sys.stdout.write(head[:-2] + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")


if __name__ == "__main__":
    main()
