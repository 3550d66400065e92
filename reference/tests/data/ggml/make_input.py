#!/usr/bin/env python3
"""Writes input.f32: the blocks of 32 values on which the ggml/ik_llama golden bytes were made.

Categories (blocks of 32, little-endian f32): Gaussian at unit and at widely varying scales,
zeros and constant rows, exact rounding ties for every format's step, negative maxima and
equal-magnitude maxima of both signs, tiny (f16-subnormal and f32-subnormal scales) and huge
(scales near and past the f16 maximum) magnitudes, single outliers, and negative zeros.
The block count is a multiple of 4 (rows of 128 values). Deterministic (seeded).
"""
import random
import struct
import sys

rng = random.Random(20261124)
blocks = []


def add(b):
    assert len(b) == 32
    blocks.append([float(struct.unpack("<f", struct.pack("<f", v))[0]) for v in b])


for _ in range(160):
    add([rng.gauss(0, 1) for _ in range(32)])
for _ in range(160):
    s = 10 ** rng.uniform(-6, 4)
    add([rng.gauss(0, 1) * s for _ in range(32)])
add([0.0] * 32)
for c in (1.0, -1.0, 0.5, 3.3, -1e-3, 7.0):
    add([c] * 32)
# Exact ties: a first value that fixes the step at 1, the rest at k + 0.5 steps.
for first, lo, hi in ((127.0, -127, 126), (-8.0, -8, 7), (-16.0, -16, 15), (-32.0, -32, 31)):
    for _ in range(4):
        add([first] + [rng.randint(lo, hi) + 0.5 for _ in range(31)])
for top, levels in ((15.0, 15), (31.0, 31)):
    for _ in range(4):
        add([0.0, top] + [rng.randint(0, levels - 1) + 0.5 for _ in range(30)])
# Negative maxima, and maxima of equal magnitude with both signs (the first one wins).
for _ in range(8):
    b = [rng.uniform(-1, 1) for _ in range(32)]
    b[rng.randrange(32)] = -rng.uniform(2, 5)
    add(b)
for first in (5.0, -5.0):
    b = [rng.uniform(-1, 1) for _ in range(32)]
    b[3], b[10] = first, -first
    add(b)
# Tiny and huge.
for s in (1e-30, 1e-40, 1e-7, 3e-6, 1e-4):
    add([rng.gauss(0, 1) * s for _ in range(32)])
for s in (1e4, 6e4, 1e6, 5e6, 1e7):
    add([rng.gauss(0, 1) * s for _ in range(32)])
# Outliers and negative zeros.
for _ in range(6):
    b = [rng.gauss(0, 1) for _ in range(32)]
    b[rng.randrange(32)] = rng.choice((-1, 1)) * 100.0
    add(b)
add([-0.0] * 16 + [rng.gauss(0, 1) for _ in range(16)])
while len(blocks) % 4:
    add([rng.gauss(0, 2) for _ in range(32)])

out = sys.argv[1] if len(sys.argv) > 1 else "input.f32"
with open(out, "wb") as f:
    for b in blocks:
        f.write(struct.pack("<32f", *b))
print(f"{len(blocks)} blocks -> {out}")
