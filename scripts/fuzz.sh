#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/fuzz_targets) with libFuzzer and AddressSanitizer on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets it take the sanitizer flags cargo-fuzz would pass)
# and runs each for SECONDS from its corpus.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 30 seconds, every target)
#
# New inputs go to a scratch copy of the corpus; set FUZZ_KEEP=1 to add them to
# fuzz/corpus/<target> instead (then `cargo test --test fuzz_corpus` replays them). A crash
# leaves its input as fuzz/artifacts/<target>/crash-* and makes the script fail.
#
# FUZZ_MERGE=1 then minimizes fuzz/corpus/<target> with what a run that failed nothing found
# (libFuzzer's -set_cover_merge=1): every named file (a seed or a kept find: a regression
# input) stays, and of the hash-named ones a small set (a greedy set cover) that keeps all
# their coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(dequantize rotation rotate_quantize attention tune_cache transform_config gguf)
fi
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks"
cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --bins
status=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    if [ "${FUZZ_KEEP:-0}" = 1 ]; then
        work=$corpus
    else
        work=$(mktemp -d)
    fi
    mkdir -p "fuzz/artifacts/$t"
    echo "== $t: ${secs}s"
    if ! "fuzz/target/$host/release/$t" "$work" "$corpus" -max_total_time="$secs" \
        -max_len=8192 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" 2>&1 | grep -E "^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss|==[0-9]+==|SUMMARY|.*panicked)" ; then
        :
    fi
    if ls "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/leak-* "fuzz/artifacts/$t"/timeout-* >/dev/null 2>&1; then
        echo "$t: failing inputs in fuzz/artifacts/$t"
        status=1
    elif [ "${FUZZ_MERGE:-0}" = 1 ]; then
        merged=$(mktemp -d)
        found=("$corpus")
        [ "$work" = "$corpus" ] || found+=("$work")
        find "$corpus" -maxdepth 1 -type f -regextype posix-extended ! -regex '.*/[0-9a-f]{40}' \
            -exec cp {} "$merged" \;
        "fuzz/target/$host/release/$t" -set_cover_merge=1 "$merged" "${found[@]}" -max_len=8192 \
            -timeout=20 -rss_limit_mb=4096 2>&1 | grep -E "^MERGE-OUTER: [0-9]+ new files"
        find "$corpus" -maxdepth 1 -type f -delete
        cp "$merged"/* "$corpus"/
        rm -r "$merged"
        echo "$t: $(find "$corpus" -type f | wc -l) files after merging"
    fi
done
exit $status
