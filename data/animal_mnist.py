"""Animal-MNIST: 10k 28x28 animal silhouettes in 10 classes, read from the ``animal-mnist`` wheel's pickles.

The wheel's own loader imports TensorFlow, so the two ``.gz`` pickles are read directly. There is no
official split: a seeded, class-stratified split gives ``train`` / ``test`` (``test_fraction``).
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
import pickle

import numpy as np

from data.sources import ArraySource, DataError


def animal_mnist_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package animal-mnist is not installed (pip install --no-deps animal-mnist==0.4)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"


def _load_pickle(path: pathlib.Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.asarray(pickle.load(f))
    except Exception as err:
        raise DataError(f"cannot read {str(path)!r}: {type(err).__name__}: {err}") from err


def animal_mnist(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """Records ``{"image": uint8 [28, 28, 1], "label": int32}``; the split is stratified and seeded."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = animal_mnist_dir()
    images = _load_pickle(d / "animal_data_version_3.gz").astype(np.uint8)
    labels = _load_pickle(d / "animal_label_version_3.gz").astype(np.int32)
    if split != "all":
        rng = np.random.default_rng(seed)
        test_idx = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            test_idx.append(rng.permutation(idx)[: int(round(len(idx) * test_fraction))])
        is_test = np.zeros(len(labels), bool)
        is_test[np.concatenate(test_idx)] = True
        keep = is_test if split == "test" else ~is_test
        images, labels = images[keep], labels[keep]
    src = ArraySource({"image": images[:, :, :, None], "label": labels}, name=f"animal_mnist/{split}")
    src.num_classes = 10
    return src
