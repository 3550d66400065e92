#!/usr/bin/env bash
# Builds gpu-eval/ (ignored by git), what a GPU machine needs for `rotq eval --model … --device
# cuda:0 --against cpu`: the `rotq` CLI, SmolLM2-135M cut to its first LAYERS blocks (default 4:
# the whole model is 98 MB, more than a device call may carry; the cut is the real weights,
# about 41 MB, through model/examples/gguf_cut.rs) and the evaluation text, with a run script.
#
#   scripts/gpu-eval.sh [LAYERS]        (the model from ROTQ_SMOLLM2_GGUF, else fetched by
#                                        cli/scripts/fetch-models.sh into target/models)
#
# Then, on the GPU machine, from the folder's parent: bash gpu-eval/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${1:-4}
out=gpu-eval
if [ -z "${ROTQ_SMOLLM2_GGUF:-}" ]; then
    eval "$(ROTQ_MODEL_DIR="${ROTQ_MODEL_DIR:-$PWD/target/models}" bash cli/scripts/fetch-models.sh)"
fi
rm -rf "$out"
mkdir -p "$out"
cargo build --release --locked --bin rotq
cargo run --release --locked -p rotq-model --example gguf_cut -- \
    "$ROTQ_SMOLLM2_GGUF" "$out/smollm2-$layers.gguf" "$layers"
cp target/release/rotq "$out/"
strip "$out/rotq" 2>/dev/null || true
cp cli/tests/data/eval-text/text.txt "$out/"
cat > "$out/run.sh" <<RUN
#!/usr/bin/env bash
# The CUDA run of every configuration scored token by token against the CPU run: the f16
# cache's KL divergence is the kernels' and products' disagreement (target: below 1e-6).
set -euo pipefail
here=\$(cd "\$(dirname "\$0")" && pwd)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "\$d" ] && export LD_LIBRARY_PATH="\$d:\${LD_LIBRARY_PATH:-}"
done
export ROTQ_TUNE_CACHE=/nonexistent/tuned.json
"\$here/rotq" eval --model "\$here/smollm2-$layers.gguf" --text "\$here/text.txt" \\
    --device cuda:0 --against cpu --ctx 512 --chunks 2 \\
    --k-formats f16,q8_0,q4_0 --v-formats f16,q8_0,q4_0 --plans none,hadamard "\$@"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
echo "ready: carry '$out' and run: bash $out/run.sh"
