"""A generated dense (per-patch) labelling set: the scenes of :class:`data.synth_vqa.SynthVQA` with a label for
every ``patch x patch`` cell of the image, for dense heads and token recovery (HoT, ``configs/hot_dense.py``).

Each pixel's class is the object painted there (``classes="colour"``: ``1 + colour index``, 8 colours;
``"shape"``: ``1 + shape index``, 3 shapes) where the sprite's alpha is at least 0.5, else background ``0``. A
patch's label is the most frequent pixel class in it (ties to the lower class, i.e. background first). The images
are exactly SynthVQA's for the same arguments.

Records: ``{"image": uint8 [S, S, 3], "patch_labels": int32 [(S / patch)^2] (raster order), "label": int32 the
object count}``. The set is generated in memory once per argument tuple (a few thousand scenes take about a second).
"""

from __future__ import annotations

import functools

import numpy as np

from data.sources import ArraySource
from data.synth_vqa import COLOURS, SHAPES, SynthVQA, sprites

CLASSES = {"colour": ("background",) + COLOURS, "shape": ("background",) + SHAPES}


def num_seg_classes(classes: str = "colour") -> int:
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {sorted(CLASSES)}, got {classes!r}")
    return len(CLASSES[classes])


def pixel_labels(scenes: SynthVQA, index: int, classes: str = "colour") -> np.ndarray:
    """``uint8 [S, S]`` class of every pixel of scene ``index``."""
    num_seg_classes(classes)
    placed, _ = scenes.placements(index)
    table = sprites(scenes.style, scenes.obj)
    out = np.zeros((scenes.image_size, scenes.image_size), np.uint8)
    for colour, shape, _, _, top, left in placed:
        alpha = table[(colour, shape)][:, :, 3] >= 128
        cls = 1 + (COLOURS.index(colour) if classes == "colour" else SHAPES.index(shape))
        h, w = alpha.shape
        region = out[top:top + h, left:left + w]
        region[alpha] = cls
    return out


def patch_majority(labels: np.ndarray, patch: int, num_classes: int) -> np.ndarray:
    """``[S, S]`` pixel classes -> ``int32 [(S / patch)^2]`` most frequent class per patch (lowest on ties)."""
    s = labels.shape[0]
    if s % patch:
        raise ValueError(f"image size {s} is not a multiple of patch={patch}")
    g = s // patch
    blocks = labels.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = np.stack([(blocks == c).sum(-1) for c in range(num_classes)], axis=-1)
    return np.argmax(counts, axis=-1).astype(np.int32)


@functools.lru_cache(maxsize=8)
def _generate(split, size, seed, image_size, grid, patch, min_objects, max_objects, style, classes):
    scenes = SynthVQA(split, size=size, seed=seed, image_size=image_size, grid=grid, min_objects=min_objects,
                      max_objects=max_objects, style=style)
    k = num_seg_classes(classes)
    images = np.empty((size, image_size, image_size, 3), np.uint8)
    labels = np.empty((size, (image_size // patch) ** 2), np.int32)
    counts = np.empty((size,), np.int32)
    for i in range(size):
        image, objects, _ = scenes.scene(i)
        images[i] = image
        labels[i] = patch_majority(pixel_labels(scenes, i, classes), patch, k)
        counts[i] = len(objects)
    return images, labels, counts


def synth_seg(split: str = "train", *, size: int = 2000, seed: int = 0, image_size: int = 48, grid: int = 3,
              patch: int = 6, min_objects: int = 2, max_objects: int = 7, style: str = "shapes",
              classes: str = "colour") -> ArraySource:
    """The per-patch labelling set (module docstring); ``patch`` must divide ``image_size`` and match the ViT's
    patch size."""
    if image_size % patch:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
    images, labels, counts = _generate(split, int(size), int(seed), int(image_size), int(grid), int(patch),
                                       int(min_objects), int(max_objects), style, classes)
    return ArraySource({"image": images, "patch_labels": labels, "label": counts}, name=f"synth_seg/{split}")


__all__ = ["CLASSES", "num_seg_classes", "pixel_labels", "patch_majority", "synth_seg"]
