"""Synthetic checkpoints in published layouts, shared by the loader tests (tiny shapes, seeded).

``timm_dict``: a timm ``VisionTransformer`` state dict (``cls_token``, ``pos_embed``, ``blocks.{i}.*``, ``head``) of
``depth`` blocks, width ``c``, MLP width ``mlp``, a ``grid x grid`` patch grid; float32 arrays, or zero-stride
stand-ins of the right shapes with ``shapes_only=True``.
"""

from __future__ import annotations

import numpy as np


class _Shapes:
    """Stand-in generator for shape-only checks: zero-stride arrays of the requested shape (no memory)."""

    def normal(self, size):
        return np.broadcast_to(np.float32(0), size)


def timm_dict(c=16, depth=1, mlp=8, patch=4, grid=2, classes=3, seed=0, shapes_only=False):
    rng = _Shapes() if shapes_only else np.random.default_rng(seed)
    sd = {"cls_token": rng.normal(size=(1, 1, c)), "pos_embed": rng.normal(size=(1, 1 + grid * grid, c)),
          "patch_embed.proj.weight": rng.normal(size=(c, 3, patch, patch)), "patch_embed.proj.bias": np.zeros(c),
          "norm.weight": np.ones(c), "norm.bias": np.zeros(c),
          "head.weight": rng.normal(size=(classes, c)), "head.bias": np.zeros(classes)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": np.ones(c), b + "norm1.bias": np.zeros(c), b + "norm2.weight": np.ones(c),
                   b + "norm2.bias": np.zeros(c), b + "attn.qkv.weight": rng.normal(size=(3 * c, c)),
                   b + "attn.qkv.bias": np.zeros(3 * c), b + "attn.proj.weight": rng.normal(size=(c, c)),
                   b + "attn.proj.bias": np.zeros(c), b + "mlp.fc1.weight": rng.normal(size=(mlp, c)),
                   b + "mlp.fc1.bias": np.zeros(mlp), b + "mlp.fc2.weight": rng.normal(size=(c, mlp)),
                   b + "mlp.fc2.bias": np.zeros(c)})
    if shapes_only:
        return {k: np.broadcast_to(np.float32(0), np.shape(v)) for k, v in sd.items()}
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def without(sd, *prefixes):
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}
