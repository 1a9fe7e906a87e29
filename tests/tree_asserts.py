"""Shared assertions on pytrees of (device) arrays, for the resume and checkpoint tests."""

from __future__ import annotations

import jax
import numpy as np


def host_leaves(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` (any pytree of arrays, or a list of them) as host numpy arrays, in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_bitwise(a, b) -> None:
    """``a`` and ``b`` have the same number of leaves and every pair is equal bit for bit (dtype and shape too)."""
    a, b = host_leaves(a), host_leaves(b)
    assert len(a) == len(b) > 0, (len(a), len(b))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
        np.testing.assert_array_equal(x, y)
