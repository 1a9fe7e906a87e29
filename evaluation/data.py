"""Evaluation subsets: fixed, seeded subsets of Fashion-MNIST, turned into RGB images for a backbone.

Images stay ``uint8 [B, 28, 28]`` in memory; :func:`to_rgb` upsamples a batch to ``[B, S, S, 3]`` float32
(bilinear, ImageNet mean/std normalisation) just before the model runs, outside the measured function.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _read_idx(path: pathlib.Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(split: str, root: Optional[str | pathlib.Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [B, 28, 28], labels int32 [B])`` for ``split`` in ``{"train", "test"}``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found at {img_path} (Debian package dataset-fashion-mnist)")
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int32)
    return images, labels


def subset(images: np.ndarray, labels: np.ndarray, count: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` examples drawn without replacement by a seeded permutation (same seed, same subset)."""
    if not 0 < count <= len(images):
        raise ValueError(f"count must be in [1, {len(images)}], got {count}")
    idx = np.random.default_rng(seed).permutation(len(images))[:count]
    return images[idx], labels[idx]


def to_rgb(images, image_size: int, mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD)) -> jax.Array:
    """``uint8 [B, h, w]`` (grey) or ``[B, h, w, 3]`` -> float32 ``[B, S, S, 3]``, normalised with
    ``mean``/``std`` (ImageNet by default; one value or one per channel)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    if x.ndim == 3:
        x = jnp.repeat(x[..., None], 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), method="bilinear")
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def batches(count: int, batch_size: int):
    """``(start, stop)`` of each batch; the last one may be short (callers pad it to ``batch_size``)."""
    for start in range(0, count, batch_size):
        yield start, min(start + batch_size, count)


def load_dataset(name: str, *, num_train: int, num_test: int, seed: int) -> tuple[tuple, tuple, int]:
    """``((train_images, train_labels), (test_images, test_labels), num_classes)`` for a named dataset.
    Train and test subsets are drawn from the official splits with seeds ``seed`` and ``seed + 1``."""
    if name == "fashion_mnist":
        tr = subset(*load_fashion_mnist("train"), num_train, seed=seed)
        te = subset(*load_fashion_mnist("test"), num_test, seed=seed + 1)
        return tr, te, len(FASHION_MNIST_CLASSES)
    if name == "animal_mnist":
        from data.animal_mnist import animal_mnist

        def arrays(split):
            src = animal_mnist(split, seed=0)
            items = [src[i] for i in range(len(src))]
            return (np.stack([np.asarray(it["image"]).reshape(28, 28) for it in items]),
                    np.asarray([int(it["label"]) for it in items], np.int32))

        tr = subset(*arrays("train"), num_train, seed=seed)
        te = subset(*arrays("test"), num_test, seed=seed + 1)
        return tr, te, 10
    raise ValueError(f"unknown dataset {name!r}; available: ['fashion_mnist', 'animal_mnist']")
