"""Fashion-MNIST from the four original IDX files (Debian ``dataset-fashion-mnist`` by default)."""

from __future__ import annotations

import pathlib

from data.idx import read_idx
from data.sources import ArraySource, DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {str(directory)!r} "
                    f"(install the Debian package dataset-fashion-mnist or set data.path)")


def fashion_mnist(split: str = "train", path: str | None = None) -> ArraySource:
    """Records ``{"image": uint8 [28, 28, 1], "label": int32}``; split ``"train"`` (60k) or ``"test"`` (10k).

    ``path``: any folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (gz or not).
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    directory = pathlib.Path(path or DEFAULT_DIR)
    images = read_idx(_find(directory, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{_PREFIX[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST {split} in {str(directory)!r}: images {images.shape} and labels "
                        f"{labels.shape} do not match")
    src = ArraySource({"image": images[:, :, :, None], "label": labels.astype("int32")},
                      name=f"fashion_mnist/{split}")
    src.num_classes = 10
    return src
