#!/usr/bin/env bash
# Builds the C API's static library, compiles capi/examples/decode.c against it and the
# committed header (capi/include/rotq.h), and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p rotq-capi
out=target/c-example
mkdir -p "$out"
${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror -Icapi/include capi/examples/decode.c \
    target/release/librotq_capi.a -lm -lpthread -ldl -o "$out/decode"
"$out/decode"
