#!/usr/bin/env bash
# Builds the C API's static library, compiles the C examples against it and the committed
# header (capi/include/rotq.h), and runs them: capi/examples/decode.c (one cache, one thread)
# and capi/examples/threads.c (8 POSIX threads on one cache handle and on a handle each, every
# result checked against exact attention). CFLAGS adds compiler flags (e.g. a sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p rotq-capi
out=target/c-example
mkdir -p "$out"
for example in decode threads; do
    # CFLAGS is split on purpose: several flags.
    # shellcheck disable=SC2086
    ${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror ${CFLAGS:-} -Icapi/include \
        "capi/examples/$example.c" target/release/librotq_capi.a -lm -lpthread -ldl \
        -o "$out/$example"
    "$out/$example"
done
