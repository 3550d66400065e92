#!/usr/bin/env bash
# Builds and installs the Python package as a user would (`pip install ./python`, maturin
# through pip's build isolation) into a fresh virtual environment, then runs its tests
# (python/tests, the docstrings' examples) and the Python example.
#
#   scripts/python-tests.sh [VENV]      (default: target/ci-python)
#
# torch (for the torch.library ops' tests) is installed where the disk has room for it
# (about 5 GB with its CUDA libraries, which PyPI's Linux wheels depend on); elsewhere those
# tests print why they skip. ROTQ_PYTHON_TORCH=0 leaves it out, =1 requires it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-target/ci-python}
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" "numpy==2.4.6" "pytest==8.4.2"
want_torch=${ROTQ_PYTHON_TORCH:-auto}
if [ "$want_torch" = auto ]; then
    free_kb=$(df --output=avail -k "$venv" | tail -1)
    if [ "$free_kb" -gt $((12 * 1024 * 1024)) ]; then want_torch=1; else
        echo "torch: not installed ($((free_kb / 1024)) MiB free on the disk; its wheels need ~5 GB)"
        want_torch=0
    fi
fi
if [ "$want_torch" = 1 ]; then
    "${pip[@]}" "torch==2.11.0"
fi
echo "-- pip install ./python"
"${pip[@]}" ./python
echo "-- pytest python/tests"
"$venv/bin/python" -m pytest -q python/tests
echo "-- the docstrings' examples"
skip_ops=()
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # rotq.ops (torch's custom ops) and rotq.bench_cuda need torch: importing them without it
    # fails by design.
    echo "rotq.ops, rotq.bench_cuda: their examples skipped (no torch in this environment)"
    skip_ops=(--ignore-glob="*/rotq/ops.py" --ignore-glob="*/rotq/bench_cuda.py")
fi
(cd "$venv" && bin/python -m pytest -q --doctest-modules "${skip_ops[@]}" --pyargs rotq)
