"""Checkpoint-driven rotations: the rotation plan of each attention layer that a
compressed-tensors checkpoint's ``transform_config`` asks for (SpinQuant R3 style).

>>> import rotq
>>> cfg = '''{"quantization_config": {"transform_config": {"config_groups": {"R3": {
...     "type": "hadamard", "head_dim": 64, "apply": [
...     {"targets": ["re:.*self_attn$"], "location": "q_attn"},
...     {"targets": ["re:.*self_attn$"], "location": "k_cache"}]}}}}}'''
>>> rotq.checkpoint.plans(cfg, n_layers=2, head_dim=64)[0]
{'qk': 'hadamard', 'v': None}
"""

from __future__ import annotations

import os

from . import _rotq

__all__ = ["plans"]


def plans(config_json, n_layers: int, head_dim: int, checkpoint_dir=None) -> list:
    """The rotation plan of each of ``n_layers`` attention layers.

    ``config_json``: the text of a model's ``config.json``, or its path. ``checkpoint_dir``:
    where the checkpoint's safetensors files are, for ``random-matrix`` transforms whose
    matrices are stored weights. Each plan is a dict ``{"qk": desc, "v": desc}``, ``desc``
    being None, a rotation string (``"hadamard"``, ``"randomized:SEED"``, ``"block:B"``) or
    a float64 matrix: what :class:`rotq.KvPool` and :class:`rotq.RotatedKvCache` take as
    ``qk_rotation`` / ``v_rotation``. A config without a transform gives no rotation.
    """
    if isinstance(config_json, os.PathLike):
        config_json = os.fspath(config_json)
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
    return _rotq.checkpoint_plans(config_json, n_layers, head_dim, checkpoint_dir)
