"""The examples in the package's docstrings hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["rotq", "rotq.oracle", "rotq.checkpoint", "rotq.ops"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "rotq.ops":
        pytest.importorskip("torch")
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
