"""Argument checks shared by every op.

All checks run on static information (Python values, array shapes and dtypes), so they fire at trace
time under ``jax.jit`` and name the offending argument in a ``ValueError``.
"""

from __future__ import annotations

import numbers
from typing import Any


def check_rank(arr: Any, rank: int, name: str) -> None:
    """Raise ``ValueError`` unless ``arr`` has exactly ``rank`` dimensions."""
    ndim = getattr(arr, "ndim", None)
    if ndim != rank:
        shape = getattr(arr, "shape", None)
        raise ValueError(f"{name} must have rank {rank}, got shape {shape}")


def check_count(value: Any, name: str, *, allow_zero: bool = True) -> int:
    """A static, non-negative Python int (``r``, ``keep``, a capacity). Returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a Python int resolved before tracing, got {type(value).__name__}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_ratio(value: Any, name: str, *, low_open: float = 0.0, high: float = 1.0) -> float:
    """A static float in ``(low_open, high]`` (keep ratios, PiToMe ratios)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not (low_open < value <= high):
        raise ValueError(f"{name} must be in ({low_open}, {high}], got {value}")
    return value


def check_leading(arr: Any, expected: tuple[int, ...], name: str, reference: str) -> None:
    """Raise unless ``arr.shape`` starts with ``expected`` (the leading dims of ``reference``)."""
    shape = tuple(getattr(arr, "shape", ()))
    if shape[: len(expected)] != tuple(expected):
        raise ValueError(f"{name} has shape {shape}; its leading dims must match {reference} {tuple(expected)}")
