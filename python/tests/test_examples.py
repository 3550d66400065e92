"""The Python examples run and check what they claim."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_STEP = ROOT / "examples" / "python" / "vllm_step.py"


def test_vllm_step_runs():
    r = subprocess.run([sys.executable, str(VLLM_STEP)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 5
    assert lines[-1].startswith("ok:")
    assert "max |out - oracle|" in r.stdout


def _load(path):
    spec = importlib.util.spec_from_file_location("vllm_step_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tol", ["KERNEL_TOL", "CACHE_TOL"])
def test_vllm_step_checks_its_tolerances(tol, capsys):
    # The example does compare: with an impossible tolerance it fails.
    mod = _load(VLLM_STEP)
    setattr(mod, tol, 1e-12)
    with pytest.raises(AssertionError):
        mod.main()
