#!/usr/bin/env bash
# Builds the C API's static library, lays it out as an installation would under
# target/c-example/prefix (lib/librotq_capi.a, include/rotq.h: the committed header, and
# lib/pkgconfig/rotq.pc filled from capi/rotq.pc.in), compiles the C examples with
# `pkg-config --cflags --libs rotq`, and runs them: capi/examples/decode.c (ABI v1: one cache,
# one thread), capi/examples/threads.c (ABI v1: 8 POSIX threads on one cache handle and on a
# handle each, every result checked against exact attention) and capi/examples/batch.c (ABI
# v2: stateless batch calls on pools in the program's memory, every rotation choice,
# checkpoints, errors). CFLAGS adds compiler flags (e.g. a sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v pkg-config >/dev/null || { echo "pkg-config is needed (apt-get install pkg-config)" >&2; exit 1; }
cargo build --release --locked -p rotq-capi
out=target/c-example
prefix="$PWD/$out/prefix"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
# Only the static library in libdir, so that -lrotq_capi links it (not librotq_capi.so).
cp target/release/librotq_capi.a "$prefix/lib/"
cp capi/include/rotq.h "$prefix/include/"
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
sed -e "s|@prefix@|$prefix|" -e "s|@version@|$version|" capi/rotq.pc.in \
    >"$prefix/lib/pkgconfig/rotq.pc"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
echo "pkg-config rotq $(pkg-config --modversion rotq): $(pkg-config --cflags --libs rotq)"
for example in decode threads batch; do
    # CFLAGS and pkg-config's output are split on purpose: several flags.
    # shellcheck disable=SC2046,SC2086
    ${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror ${CFLAGS:-} "capi/examples/$example.c" \
        $(pkg-config --cflags --libs rotq) -o "$out/$example"
    "$out/$example"
done
