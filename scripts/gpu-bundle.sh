#!/usr/bin/env bash
# Builds the CUDA test executables (rotq-cuda's, and the facade's cache_backends), the `rotq`
# CLI (for `rotq bench --device cuda:0`), `autotune` (for `autotune --device cuda:0`), the
# engine_cpu example (run with --device cuda:0) and the C ABI's device example into one folder, with a run script, ready to
# carry to a machine that has a GPU but no Rust.
#
#   scripts/gpu-bundle.sh [FOLDER]      (default: gpu-bundle, ignored by git)
#
# Then, on the GPU machine, from the folder's parent:
#   bash FOLDER/run.sh [--no-tests] [--python] [--sanitize] [--bench] [--autotune]
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
# The model runner with its caches on the GPU (model/tests/cuda.rs), renamed beside the tuner's.
cargo test --release --locked --no-run --message-format=json -p rotq-model --test cuda 2>/dev/null |
    grep -o '"executable":"[^"]*/deps/[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' |
    while read -r exe; do cp "$exe" "$out/test-model_cuda"; done
# The C ABI's device example (capi/examples/device.c), linked here against the static library
# and the CUDA runtime from PyPI wheels (pinned in scripts/cuda-runtime.txt): the GPU machine
# needs only its own libcudart.so.13.
cuda=target/cuda-runtime
if [ ! -f "$cuda/include/crt/host_config.h" ]; then
    rm -rf "$cuda"
    python3 -m pip download --quiet --no-deps --require-hashes -r scripts/cuda-runtime.txt \
        -d "$cuda/wheels"
    for w in "$cuda"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cuda/x"; done
    mkdir -p "$cuda/include" "$cuda/lib"
    cp -r "$cuda"/x/nvidia/cu13/include/. "$cuda/include/"
    cp "$cuda"/x/nvidia/cu13/lib/libcudart.so.13 "$cuda/lib/"
    ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
fi
cargo build --release --locked -p rotq-capi
cc -std=c11 -O2 -Wall -Wextra -Werror capi/examples/device.c -I capi/include -I "$cuda/include" \
    target/release/librotq_capi.a -L "$cuda/lib" -lcudart -lpthread -ldl -lm -o "$out/c-device"
# The Python package as a wheel (built as `pip install ./python` builds it) and its tests.
python3 -m pip wheel --quiet --no-deps -w "$out" ./python
cp -r python/tests "$out/python-tests"
strip "$out"/* 2>/dev/null || true

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every bundled CUDA test and the engine example on cuda:0, as parallel processes (the
# attention tests split by name, out of memory last and alone), each under a time guard
# (GUARD seconds, default 540); a summary line per process on stdout, the whole output in
# $OUT/tests.log (or /tmp/tests.log); --no-tests leaves them out. With --python, the Python
# package's CUDA tests (the torch ops) under the machine's torch. With --sanitize, the differential, attention and
# cache_backends tests (subsets of the first two) then run under compute-sanitizer's memcheck,
# racecheck and synccheck; with --bench, `rotq bench --device cuda:0`; with --autotune,
# `autotune --device cuda:0` twice, timed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# NVRTC: the CUDA toolkit's library folders, when present.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# This is a GPU machine: a missing device fails the tests instead of skipping them. The tests
# run the kernels' defaults (no tuning cache).
export ROTQ_REQUIRE_CUDA=1 ROTQ_TUNE_CACHE=/nonexistent/tuned.json
# The tuner's CLI test runs the bundled binary.
export ROTQ_AUTOTUNE_BIN="$here/autotune"
logs=$(mktemp -d)
run() { # name, command...
    local name=$1; shift
    local t0=$SECONDS
    timeout "${GUARD:-540}" "$@" > "$logs/$name.log" 2>&1
    echo "$name rc=$? $((SECONDS - t0))s $(grep -h 'test result' "$logs/$name.log" | tr '\n' ' ')" >> "$logs/summary"
}
status=0
A="$here/test-attention"
if [[ " $* " != *" --no-tests "* ]]; then
run attn-prefill "$A" --exact prefill_matches_the_oracle &
run attn-ws "$A" --exact warp_specialized_prefill_matches_the_oracle prefill_with_odd_warp_counts &
run attn-every "$A" --exact every_configuration &
run attn-decode "$A" --exact decode_matches_the_oracle automatic_splits_match_the_oracle \
    automatic_splits_fill_the_device_with_long_slices &
run attn-formats "$A" --exact every_format_as_k_and_as_v head_dimensions groups_and_half_types \
    paired_heads &
run attn-misc "$A" --exact masks_windows_and_softcap special_values_follow_the_oracle \
    bad_inputs_are_typed_errors attention_from_eight_threads_at_once handles_are_send_and_sync \
    explicit_matrix_plans_follow_the_oracle two_devices_from_their_own_threads &
# The codec's differential tests: each per-format test in a process of its own (each compiles
# a kernel set per format and rotation; together, beside the others, they ran past 470 s on an
# H200), the rest in one.
D="$here/test-differential"
for t in ggml other element turboquant; do
    run "diff-$t" "$D" --exact "rotate_quantize_and_dequantize_${t}_formats" &
done
run diff-vllm "$D" --exact rotate_quantize_and_dequantize_vllm_slot_parts &
run diff-rest "$D" --skip rotate_quantize_and_dequantize &
for t in "$here"/test-*; do
    name=$(basename "$t")
    case $name in test-attention | test-differential) ;; *) run "${name#test-}" "$t" & ;; esac
done
run engine "$here/engine_cpu" --device cuda:0 &
# The C example must not skip here: its last line says it ran.
run c-device bash -c 'set -o pipefail; "$0" | tee /dev/stderr | tail -1 | grep -q "example ok"' \
    "$here/c-device" &
wait
run attn-oom "$A" --exact out_of_memory_is_a_typed_error
# Every attention test ran in one of the groups above.
listed=$("$A" --list 2>/dev/null | grep -c ': test$')
ran=$(cat "$logs"/attn-*.log | grep -c '^test .* \.\.\. ')
[ "$listed" = "$ran" ] || echo "attention: $listed tests listed, $ran run" >> "$logs/summary"
sort "$logs/summary"
for f in "$logs"/*.log; do echo "==== $(basename "$f")"; cat "$f"; done > "${OUT:-/tmp}/tests.log"
grep -qv ' rc=0 ' "$logs/summary" && status=1
grep -h "FAILED\|panicked" "$logs"/*.log | head -20
fi
if [[ " $* " == *" --python "* ]]; then
    # The torch ops on CUDA (and on the CPU) under the machine's torch, from the wheel; NVRTC
    # is found the way a user's install finds it (no loader path set for it).
    echo "== python: pytest python-tests (torch $(python3 -c 'import torch; print(torch.__version__)'))"
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$here"/rotq-*.whl
    ( cd "$here/python-tests" && env -u LD_LIBRARY_PATH PYTHONPATH="$site" ROTQ_REQUIRE_CUDA=1 \
        timeout "${GUARD:-540}" python3 -m pytest -q -p no:cacheprovider test_cuda.py \
        test_torch_ops.py test_compile.py 2>&1 | tee "${OUT:-/tmp}/python.log" | tail -40 ) ||
        status=1
fi
if [[ " $* " == *" --sanitize "* ]]; then
    # memcheck, racecheck and synccheck over the cache-backend and batch-API tests and subsets of the
    # attention and codec tests that finish under the tools (3-4 minutes a set), all at once.
    # (API errors are not reported: the tests ask for an allocation that must fail with
    # out of memory, a typed error, and the sanitizer would count it.)
    declare -A sets=(
        [attention]="--exact masks_windows_and_softcap special_values_follow_the_oracle paired_heads groups_and_half_types"
        [differential]="--exact rotate_quantize_and_dequantize_ggml_formats paged_cache_holds_the_contiguous_rows context_shift_follows_the_oracle dequantize_into_half_types row_formats_on_edge_rows batch_append_through_a_device_slot_mapping batch_append_on_caller_buffers_and_stream rotate_and_dequantize_on_caller_buffers_and_stream explicit_matrix_rotations"
        [cache_backends]=""
        [batch]=""
    )
    for tool in memcheck racecheck synccheck; do
        for t in attention differential cache_backends batch; do
            ( timeout "${GUARD:-540}" compute-sanitizer --tool $tool --report-api-errors no \
                --error-exitcode 9 "$here/test-$t" ${sets[$t]} > "$logs/san-$tool-$t.log" 2>&1
              echo "$tool $t rc=$? $(grep -h 'test result\|SUMMARY' "$logs/san-$tool-$t.log" | tr '\n' ' ')" \
                  >> "$logs/sanitizers" ) &
        done
    done
    wait
    sort "$logs/sanitizers"
    grep -qv ' rc=0 ' "$logs/sanitizers" && status=1
fi
if [[ " $* " == *" --bench "* ]]; then
    echo "== rotq bench --device cuda:0"
    "$here/rotq" bench --device cuda:0 || status=1
fi
if [[ " $* " == *" --autotune "* ]]; then
    # Twice, timed: the target is under 3 minutes, and the same choices both times.
    for i in 1 2; do
        t0=$SECONDS
        "$here/autotune" --device cuda:0 --out "${OUT:-/tmp}/tuned$i.json" --json || status=1
        echo "== autotune run $i: $((SECONDS - t0)) s"
    done
fi
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
echo "bundle ready: carry '$out' and run: bash $out/run.sh [--no-tests] [--python] [--sanitize] [--bench] [--autotune]"
