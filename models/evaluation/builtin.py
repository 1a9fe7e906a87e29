"""The repo's backbones for ``eval.py``; filled in as the model code lands (see docs/eval.md)."""

from __future__ import annotations

from models.evaluation.backbones import register_backbone


@register_backbone("dinov2_small")
def dinov2_small(cfg):
    raise NotImplementedError("dinov2_small backbone: waiting for models.loaders")
