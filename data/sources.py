"""Random-access data sources (grain ``RandomAccessDataSource`` protocol: ``__len__`` + ``__getitem__``).

Every source returns a record dict. Image records hold ``image: uint8 [H, W, C]`` (C = 1 or 3) and
``label: int32``; VQA records add ``question: int32 [L]`` (0 = padding) and ``answer: int32``.
Decoding happens lazily in ``__getitem__`` so only the examples a host reads are decoded.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image


class DataError(RuntimeError):
    """A file that cannot be read or decoded. The message names the file."""


class ArraySource:
    """In-memory records: ``arrays`` maps field names to arrays with a common leading length.

    Used for IDX/pickle datasets that fit in memory and for the synthetic test data.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, name: str = "arrays"):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource {name!r}: fields have different lengths {lengths}")
        self.arrays = dict(arrays)
        self.name = name
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArraySource({self.name}, n={self._len})"


@dataclasses.dataclass
class SkipStats:
    """Counts records dropped because their file could not be decoded (``on_error="skip"``)."""

    skipped: int = 0
    files: list = dataclasses.field(default_factory=list)
    distinct: set = dataclasses.field(default_factory=set, repr=False)   # indices that failed at least once
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, path: str, index: int | None = None) -> int:
        """Count one skip; returns how many distinct indices have failed so far."""
        with self._lock:
            self.skipped += 1
            if len(self.files) < 100:
                self.files.append(path)
            if index is not None:
                self.distinct.add(index)
            return len(self.distinct)


def load_image(path: str | pathlib.Path, *, channels: int = 3, size: int | None = None,
               resize: int | None = None) -> np.ndarray:
    """Decode one image file to ``uint8 [H, W, channels]``.

    ``resize``: scale so the shorter side is ``resize`` pixels; ``size``: then centre-crop to
    ``size x size`` (``resize`` defaults to ``size``). Raises :class:`DataError` naming the file.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None:
                short = resize or size
                w, h = im.size
                scale = short / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise DataError(f"cannot decode image file {str(path)!r}: {type(err).__name__}: {err}") from err
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


class FileImageSource:
    """Records decoded from image files: ``items`` is a list of ``(path, extra_fields)``.

    ``on_error="raise"`` (default) raises :class:`DataError` naming the file. ``on_error="skip"``
    returns ``None`` for that record and counts it in :attr:`stats`; the pipeline filters ``None``. Once every
    file of the source has failed to decode, the next failure raises :class:`DataError` (a stream that filters
    ``None`` would otherwise wait forever for a readable record).
    """

    def __init__(self, items: Sequence[tuple[str, Mapping[str, Any]]], *, channels: int = 3,
                 size: int | None = None, resize: int | None = None, on_error: str = "raise",
                 name: str = "files"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.items = list(items)
        self.channels, self.size, self.resize = channels, size, resize
        self.on_error = on_error
        self.stats = SkipStats()
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        path, extra = self.items[index]
        try:
            image = load_image(path, channels=self.channels, size=self.size, resize=self.resize)
        except DataError:
            if self.on_error == "raise":
                raise
            if self.stats.add(str(path), index) >= len(self.items):
                raise DataError(f"{self.name}: none of its {len(self.items)} image file(s) can be decoded "
                                f"(on_error='skip' skipped them all; first: {self.stats.files[:3]})") from None
            return None
        out = {"image": image}
        for k, v in extra.items():
            v = np.asarray(v)
            out[k] = v.astype(np.int32) if np.issubdtype(v.dtype, np.integer) else v
        return out

    def __repr__(self) -> str:
        return f"FileImageSource({self.name}, n={len(self)})"


class MappedSource:
    """``fn(source[i])`` for every index: a cheap per-record transform applied at read time."""

    def __init__(self, source, fn: Callable[[Any], Any]):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        rec = self.source[index]
        return None if rec is None else self.fn(rec)


def class_count(source) -> tuple[int | None, int | None]:
    """``(declared, labels)`` of a classification source: ``declared`` is ``len(source.classes)`` or
    ``source.num_classes`` when the source states it (``None`` otherwise); ``labels`` is the largest label + 1 when
    the labels can be read without decoding (:class:`ArraySource`, :class:`FileImageSource`), else ``None``."""
    declared = None
    if getattr(source, "classes", None) is not None:
        declared = len(source.classes)
    elif getattr(source, "num_classes", None) is not None:
        declared = int(source.num_classes)
    labels = None
    if isinstance(source, ArraySource) and "label" in source.arrays and len(source):
        labels = int(np.max(source.arrays["label"])) + 1
    elif isinstance(source, FileImageSource):
        found = [int(extra["label"]) for _, extra in source.items if "label" in extra]
        labels = max(found) + 1 if found else None
    return declared, labels
