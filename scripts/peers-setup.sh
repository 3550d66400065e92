#!/usr/bin/env bash
# Builds the peers crate (peers/: rotq's CPU kernels beside llama.cpp and ik_llama.cpp) on a
# Debian machine, installing what the build needs where it is missing (CMake, a C++ compiler,
# libclang for bindgen), then runs its benchmark with --json into the file given as argument.
#
#   scripts/peers-setup.sh OUT.jsonl [peer_bench arguments, e.g. --threads 2 --runs 7]
#
# The peers' ggml is built with GGML_NATIVE=ON (-march=native) into two shared libraries
# (peers/target/native/release/librotq_peer_{llama,ik}.so); rotq's side is built as it ships
# (runtime ISA dispatch, no target-cpu), and loads them. PEERS_JOBS (default 2) bounds the
# build's parallelism.
set -euo pipefail

out="${1:?usage: scripts/peers-setup.sh OUT.jsonl [peer_bench arguments]}"
out="$(realpath -m "$out")"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${PEERS_JOBS:-2}"

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
# bindgen (in both -sys crates' build scripts) loads libclang and needs clang's headers.
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ "${#need[@]}" -gt 0 ]; then
    echo "peers-setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y --no-install-recommends "${need[@]}"
fi

cd "$root/peers"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
start=$(date +%s)
# The two peer libraries, ggml compiled for this CPU (target-cpu=native makes
# llama-cpp-sys-2 set GGML_NATIVE=ON; ik-llama-cpp-sys's `native` feature does the same).
RUSTFLAGS="-C target-cpu=native" cargo build --release --locked -j "$jobs" \
    --target-dir target/native -p rotq-peer-llama -p rotq-peer-ik
# rotq's side and the benchmark, as rotq ships (no target-cpu).
cargo build --release --locked -j "$jobs" --bin peer_bench
echo "peers-setup: built in $(( $(date +%s) - start )) s" >&2

mkdir -p "$(dirname "$out")"
./target/release/peer_bench --json "$@" > "$out"
echo "peers-setup: $(wc -l < "$out") rows in $out" >&2
