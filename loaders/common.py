"""Shared pieces of the checkpoint loaders: key reports, shape checks, writing into an NNX model.

A loader turns a foreign checkpoint into a flat ``{our_param_path: numpy array}`` dict (paths such as
``"blocks.3.attn.qkv.kernel"``), then :func:`assign_params` checks every shape against the model and writes
the values in. Checkpoint keys that were not used are *unexpected*; model parameters that received nothing
are *missing*; keys a format carries but inference never uses (e.g. HF's ``mask_token``) are *skipped*.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from flax import nnx


class LoadError(ValueError):
    """A strict load found missing or unexpected keys."""


@dataclasses.dataclass
class LoadReport:
    """What a loader did. ``print(report)`` gives a readable summary."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing and no unexpected keys."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"LoadReport({self.source}): {len(self.loaded)} parameters loaded, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.skipped)} skipped"]
        for name in ("missing", "unexpected", "skipped"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20})" if len(keys) > 20 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)

    def raise_if_strict(self, strict: bool) -> None:
        if strict and not self.ok:
            raise LoadError(f"strict load failed:\n{self}")


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield ".".join(prefix), tree


def model_params(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every ``nnx.Param`` in the model (paths joined with dots)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {k: tuple(np.shape(v)) for k, v in _flatten(pure)}


def check_shape(key: str, value: np.ndarray, expected: tuple[int, ...], *, source_key: str | None = None) -> None:
    """Raise ``ValueError`` naming the key and both shapes unless ``value.shape == expected``."""
    if tuple(value.shape) != tuple(expected):
        name = f"{source_key!r} -> {key!r}" if source_key else repr(key)
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(value.shape)}, "
                         f"model expects {tuple(expected)}")


def assign_params(model: nnx.Module, params: Mapping[str, np.ndarray], report: LoadReport, *,
                  origin: Mapping[str, str] | None = None, strict: bool = True) -> LoadReport:
    """Write ``params`` (``{our path: array}``) into ``model`` in place.

    Shapes are checked first (a mismatch raises ``ValueError`` naming both keys and shapes); paths the model
    does not have go to ``report.unexpected``; model parameters absent from ``params`` go to
    ``report.missing``. With ``strict`` the load raises :class:`LoadError` unless both lists are empty
    (nothing is written in that case).
    """
    origin = origin or {}
    target = model_params(model)
    for key, value in params.items():
        if key not in target:
            report.unexpected.append(origin.get(key, key))
            continue
        check_shape(key, np.asarray(value), target[key], source_key=origin.get(key))
    report.missing.extend(k for k in target if k not in params)
    report.raise_if_strict(strict)

    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for key, value in params.items():
        if key not in target:
            continue
        node = pure
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if part not in node and part.isdigit() and int(part) in node else node[part]
        leaf_key = int(leaf) if leaf not in node and leaf.isdigit() else leaf
        node[leaf_key] = np.asarray(value, dtype=np.asarray(node[leaf_key]).dtype)
        report.loaded.append(key)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return report


class KeyTracker:
    """Reads a source state dict and remembers which keys were consumed (the rest are unexpected)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = dict(tensors)
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise KeyError(key)
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def skip(self, key: str) -> bool:
        if key in self.tensors:
            self.used.add(key)
            return True
        return False

    def unused(self) -> list[str]:
        return sorted(k for k in self.tensors if k not in self.used)


def torch_linear(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Linear.weight [out, in]`` -> Flax kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(weight).T)


def torch_conv(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Conv2d.weight [O, I, kh, kw]`` -> Flax kernel ``[kh, kw, I, O]``."""
    return np.ascontiguousarray(np.transpose(np.asarray(weight), (2, 3, 1, 0)))


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes) -> dict[str, np.ndarray]:
    """Drop the first matching prefix (e.g. ``"vit."``) from every key that has one."""
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


__all__ = ["LoadReport", "LoadError", "KeyTracker", "model_params", "assign_params", "check_shape",
           "torch_linear", "torch_conv", "strip_prefix"]


def make_putter(src: "KeyTracker", out: dict, origin: dict):
    """``put(ours, theirs, fn=identity)``: if the checkpoint has key ``theirs``, store ``fn(value)`` as our
    parameter ``ours`` and remember where it came from (keys never read stay "unexpected")."""

    def put(ours, theirs, fn=lambda a: a):
        if theirs in src:
            out[ours] = fn(src.get(theirs))
            origin[ours] = theirs

    return put
