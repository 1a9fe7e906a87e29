"""Named backbones for ``eval.py``: ``name -> builder(cfg) -> Backbone``.

Builders import their model code lazily, so a missing optional piece (an asset wheel, a checkpoint)
only fails the backbone that needs it.
"""

from __future__ import annotations

from typing import Callable

_BACKBONES: dict[str, Callable] = {}


def register_backbone(name: str):
    """Register ``fn(cfg) -> Backbone`` under ``name`` (``cfg`` is the resolved eval config)."""

    def wrap(fn):
        _BACKBONES[name] = fn
        return fn

    return wrap


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, cfg):
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return _BACKBONES[name](cfg)
