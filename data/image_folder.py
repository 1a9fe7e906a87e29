"""ImageNet-style class folders: ``root/<split>/<class_name>/*.jpg`` (or ``root/<class_name>/...``)."""

from __future__ import annotations

import pathlib

from data.sources import DataError, FileImageSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def list_class_folder(root: str | pathlib.Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """``([(path, {"label": i}), ...], class_names)``; classes are the sorted sub-folder names."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append((str(f), {"label": label}))
    if not items:
        raise DataError(f"image folder {str(root)!r} has class sub-folders {classes[:10]} but no image files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return items, classes


def image_folder(root: str, split: str | None = "train", *, size: int = 224, resize: int | None = None,
                 channels: int = 3, on_error: str = "raise") -> FileImageSource:
    """Records ``{"image": uint8 [size, size, channels], "label": int32}`` decoded with Pillow.

    Uses ``root/split``; a requested split folder that does not exist raises :class:`DataError` naming it (before,
    the root's split folders silently became the classes). ``split=None`` reads ``root/<class_name>/`` directly.
    Images are resized (shorter side to
    ``resize``, default ``size * 8 // 7``) and centre-cropped; training crops/flips come from the pipeline.
    ``on_error``: ``"raise"`` (error names the file) or ``"skip"`` (counted in ``source.stats``).
    """
    base = pathlib.Path(root)
    if split is not None:
        if not base.is_dir():
            raise DataError(f"image folder {str(base)!r} does not exist")
        if not (base / split).is_dir():
            there = sorted(p.name for p in base.iterdir() if p.is_dir())
            raise DataError(f"image folder split {str(base / split)!r} does not exist (sub-folders of {str(base)!r}: "
                            f"{there[:10]}); pass the split that exists, or split=None for a root whose sub-folders "
                            f"are the classes")
        base = base / split
    items, classes = list_class_folder(base)
    src = FileImageSource(items, channels=channels, size=size, resize=resize or (size * 8 // 7),
                          on_error=on_error, name=f"image_folder/{base}")
    src.classes = classes
    return src
