#!/usr/bin/env bash
# Runs the CPU-kernel differential tests as an aarch64 build under QEMU user emulation, so the
# NEON paths are checked against the oracle on an x86-64 machine. Installs what it needs
# (Debian's cross gcc and qemu-user, rustup's aarch64 standard library) when it can; prints
# "skipped: ..." and exits 0 when they cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user) >/dev/null 2>&1 || true
    fi
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >/dev/null 2>&1 || true
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
    || ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "skipped: aarch64 cross toolchain or qemu-user unavailable (NEON paths not run)"
    exit 0
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --target "$target" -p rotq-cpu --all-targets --locked -- -D warnings
cargo test --release --locked --target "$target" -p rotq-cpu
cargo test --release --locked --target "$target" --test cpu_rotation --test cpu_quant --test cpu_attention
