"""A tiny in-memory classification set for tests and smoke runs: one fixed random template per class
plus per-example noise, so a small model learns it in a few dozen steps."""

from __future__ import annotations

import numpy as np

from data.sources import ArraySource


def synthetic_classification(size: int = 512, *, image_size: int = 16, channels: int = 3, num_classes: int = 4,
                             seed: int = 0, split: str = "train", noise: float = 40.0) -> ArraySource:
    """Records ``{"image": uint8 [S, S, channels], "label": int32}``; splits share templates, not examples."""
    templates = np.random.default_rng(seed).integers(0, 256, (num_classes, image_size, image_size, channels))
    rng = np.random.default_rng([seed, {"train": 1, "val": 2, "test": 3}[split]])
    labels = rng.integers(0, num_classes, size).astype(np.int32)
    images = templates[labels] + rng.normal(0, noise, (size, image_size, image_size, channels))
    src = ArraySource({"image": np.clip(images, 0, 255).astype(np.uint8), "label": labels},
                      name=f"synthetic/{split}")
    src.num_classes = num_classes
    return src
