"""Linear probe: closed-form ridge regression on one-hot labels, fitted once on unreduced features.

Deterministic (no random init, no iterative solver): features are standardised with the training
mean/std, the ridge strength is picked on a fixed held-out slice of the training set from a small grid,
then the probe is refitted on the whole training set. Everything is float64 NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DEFAULT_L2 = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class RidgeProbe:
    """``features [B, F] -> scores [B, num_classes]``; ``predict`` gives the arg-max class."""

    mean: np.ndarray   # [F]
    scale: np.ndarray  # [F]
    weight: np.ndarray  # [F, num_classes]
    bias: np.ndarray   # [num_classes]
    l2: float
    val_accuracy: float

    def scores(self, features) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def predict(self, features) -> np.ndarray:
        return np.argmax(self.scores(features), axis=-1)

    def accuracy(self, features, labels) -> float:
        return float(np.mean(self.predict(features) == np.asarray(labels)))


def _solve_ridge(z: np.ndarray, y: np.ndarray, l2s: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge weights for each strength, via one eigendecomposition of the centred Gram matrix."""
    zm, ym = z.mean(0), y.mean(0)
    zc, yc = z - zm, y - ym
    evals, evecs = np.linalg.eigh(zc.T @ zc)
    proj = evecs.T @ (zc.T @ yc)
    out = []
    for l2 in l2s:
        w = evecs @ (proj / (evals + l2 * len(z))[:, None])
        out.append((w, ym - zm @ w))
    return out


def fit_ridge_probe(features, labels, *, num_classes: int, l2_grid: Sequence[float] = DEFAULT_L2,
                    val_fraction: float = 0.2) -> RidgeProbe:
    """Fit on ``features [B, F]`` with integer ``labels [B]``.

    The last ``val_fraction`` of the rows choose the ridge strength (ties: the smaller one); the final
    probe is refitted on all rows with that strength.
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"features must be [B, F] and labels [B], got {x.shape} and {labels.shape}")
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z = (x - mean) / scale
    y = np.eye(num_classes)[labels]
    n_val = int(round(len(z) * val_fraction))
    best_l2, best_acc = float(l2_grid[0]), -1.0
    if n_val > 0 and len(z) - n_val > 1:
        fits = _solve_ridge(z[:-n_val], y[:-n_val], l2_grid)
        for l2, (w, b) in zip(l2_grid, fits):
            acc = float(np.mean(np.argmax(z[-n_val:] @ w + b, -1) == labels[-n_val:]))
            if acc > best_acc:
                best_l2, best_acc = float(l2), acc
    (w, b), = _solve_ridge(z, y, [best_l2])
    return RidgeProbe(mean=mean, scale=scale, weight=w, bias=b, l2=best_l2, val_accuracy=best_acc)
