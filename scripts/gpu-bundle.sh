#!/usr/bin/env bash
# Builds the CUDA test executables (rotq-cuda's, and the facade's cache_backends), the `rotq`
# CLI (for `rotq bench --device cuda:0`), `autotune` (for `autotune --device cuda:0`) and the
# engine_cpu example (run with --device cuda:0) into one folder, with a run script, ready to
# carry to a machine that has a GPU but no Rust.
#
#   scripts/gpu-bundle.sh [FOLDER]      (default: gpu-bundle, ignored by git)
#
# Then, on the GPU machine, from the folder's parent: bash FOLDER/run.sh [--sanitize] [--bench]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bundle}
rm -rf "$out"
mkdir -p "$out"

cargo build --release --locked --bin rotq --bin autotune --example engine_cpu
cp target/release/rotq target/release/autotune target/release/examples/engine_cpu "$out/"
# Test executables, each as test-NAME: those `cargo test --no-run "$@"` builds (in deps/; a
# package's binaries, built for its integration tests, are left out).
copy_tests() {
    cargo test --release --locked --no-run --message-format=json "$@" 2>/dev/null |
        grep -o '"executable":"[^"]*/deps/[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' |
        while read -r exe; do
            name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
            cp "$exe" "$out/test-$name"
        done
}
# Every test executable of rotq-cuda (its unit tests and tests/*.rs).
copy_tests -p rotq-cuda
# The engine library's cache on both backends (tests/cache_backends.rs).
copy_tests -p rotq --test cache_backends
# The CUDA tunables under the tuner, timed with CUDA events (autotune/tests/cuda.rs).
copy_tests -p rotq-autotune --test cuda
strip "$out"/* 2>/dev/null || true

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled CUDA tests and the engine example on cuda:0 (and, with --sanitize, the
# differential, attention and cache_backends tests under compute-sanitizer's memcheck; with
# --bench, `rotq bench --device cuda:0`).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# NVRTC: the CUDA toolkit's library folders, when present.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# This is a GPU machine: a missing device fails the tests instead of skipping them.
export ROTQ_REQUIRE_CUDA=1
status=0
for t in "$here"/test-*; do
    echo "== $(basename "$t")"
    "$t" || status=1
done
echo "== engine_cpu --device cuda:0"
"$here/engine_cpu" --device cuda:0 || status=1
if [[ " $* " == *" --sanitize "* ]]; then
    # (API errors are not reported: the tests ask for an allocation that must fail with
    # out of memory, a typed error, and the sanitizer would count it.)
    for t in differential attention cache_backends; do
        echo "== compute-sanitizer --tool memcheck test-$t"
        compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 "$here/test-$t" || status=1
    done
fi
if [[ " $* " == *" --bench "* ]]; then
    echo "== rotq bench --device cuda:0"
    "$here/rotq" bench --device cuda:0 || status=1
fi
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
echo "bundle ready: carry '$out' and run: bash $out/run.sh [--sanitize] [--bench]"
