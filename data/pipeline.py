"""Grain pipelines: per-host sharding, seeded shuffling, augmentation, batching, padded evaluation.

Training: ``source -> shard by process -> shuffle(seed) -> repeat -> random_map(augment) -> drop
unreadable records -> batch(drop_remainder)``. Each epoch is reshuffled (grain reseeds per epoch) and
the augmentation of element ``i`` depends only on ``(seed, i)``, so the stream is reproducible and the
iterator state (``get_state``/``set_state``) is a tiny dict that checkpoints with the model.

Evaluation: every example exactly once, padded to whole global batches with ``mask = False`` rows so
all hosts run the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation of ``image``, in this order: random crop (zero-pad by ``crop_padding`` then crop back),
    RandomResizedCrop to ``out_size`` (``rrc``, with ``rrc_scale`` / ``rrc_ratio``), horizontal flip, RandAugment
    (``randaugment``, a timm spec such as ``"rand-m9-mstd0.5-inc1"``) and random erasing (``erase_prob``, noise of
    ``mean`` / ``std``). The ops are in :mod:`data.augment`; with only ``crop_padding`` and ``flip`` set the draws
    are the same as before the others existed."""

    crop_padding: int = 0
    flip: bool = False
    rrc: bool = False
    out_size: int = 0                # RandomResizedCrop output side (0 = the input's height)
    rrc_scale: tuple = (0.08, 1.0)
    rrc_ratio: tuple = (3 / 4, 4 / 3)
    randaugment: str = ""
    erase_prob: float = 0.0
    mean: tuple = (0.5,)
    std: tuple = (0.5,)

    def __post_init__(self):
        from data.augment import parse_randaugment

        parse_randaugment(self.randaugment)   # a bad spec fails here, before the pipeline runs

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.rrc or self.randaugment or self.erase_prob > 0)

    def __call__(self, record: dict | None, rng: np.random.Generator) -> dict | None:
        from data import augment as A

        if record is None:
            return None
        image = record["image"]
        if self.crop_padding > 0:
            p = self.crop_padding
            h, w = image.shape[:2]
            padded = np.pad(image, ((p, p), (p, p), (0, 0)))
            top, left = rng.integers(0, 2 * p + 1, size=2)
            image = padded[top:top + h, left:left + w]
        if self.rrc:
            image = A.random_resized_crop(image, rng, self.out_size or image.shape[0], tuple(self.rrc_scale),
                                          tuple(self.rrc_ratio))
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        spec = A.parse_randaugment(self.randaugment)
        if spec is not None:
            image = A.rand_augment(np.ascontiguousarray(image), rng, spec)
        if self.erase_prob > 0:
            image = A.random_erase(image, rng, self.erase_prob, self.mean, self.std)
        return {**record, "image": np.ascontiguousarray(image)}


def augment_from_config(aug, data) -> Augment:
    """The :class:`Augment` of a ``data.augment`` config block (fields absent from older configs take their off
    value); ``data`` gives the erasing noise's ``mean`` / ``std`` and the crop's output size (``data.image_size``)."""
    get = (lambda k, d: aug[k] if k in aug else d)
    return Augment(crop_padding=int(get("crop_padding", 0)), flip=bool(get("flip", False)),
                   rrc=bool(get("random_resized_crop", False)), out_size=int(data.image_size),
                   rrc_scale=tuple(float(v) for v in get("rrc_scale", (0.08, 1.0))),
                   rrc_ratio=tuple(float(v) for v in get("rrc_ratio", (3 / 4, 4 / 3))),
                   randaugment=str(get("randaugment", "")), erase_prob=float(get("erase_prob", 0.0)),
                   mean=tuple(float(v) for v in data.mean), std=tuple(float(v) for v in data.std))


def shard_options(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """``(index, count)`` of this host's shard: ``grain.sharding.ShardByJaxProcess`` unless given."""
    if shard_index is None or shard_count is None:
        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        return opts.shard_index, opts.shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return shard_index, shard_count


def _read_options(num_threads: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(8, 4 * num_threads))


class _HostRows(grain.MapDataset):
    """This host's rows of a global batch stream: record ``j`` is row ``index * local + j % local`` of global
    batch ``j // local`` (``local = batch // count``), so the hosts together see exactly the batches one process
    would, in the same order and with the same augmentation, whatever the host count."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, batch: int, index: int, count: int):
        super().__init__(parent)
        self._batch, self._index, self._local = batch, index, batch // count
        self._length = (len(parent) // batch) * self._local

    def __len__(self) -> int:
        return self._length

    def _row(self, j: int) -> int:
        b, r = divmod(j, self._local)
        return b * self._batch + self._index * self._local + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._row(index)]

    def __str__(self) -> str:
        return f"_HostRows(batch={self._batch}, index={self._index}, local={self._local})"


def train_dataset(source, *, batch_size: int, seed: int, augment: Augment | None = None, shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                  num_threads: int = 2) -> grain.IterDataset:
    """The training stream of this host: batches of ``batch_size // shard_count`` records.

    Args:
      source: random-access records (``None`` for a skipped unreadable file: dropped here).
      batch_size: the GLOBAL batch; each host yields ``batch_size // shard_count`` rows.
      seed: shuffling and augmentation seed (same on every host).
      num_epochs: ``None`` repeats forever.

    With one host the stream is the shuffled, augmented source batched by ``batch_size``. With several, every
    host shuffles and augments the same global stream and reads only its rows of each global batch (host ``i``
    rows ``[i * local, (i + 1) * local)``, ``local = batch_size // shard_count``), so the global batches, and a
    run's result, do not depend on the number of hosts.
    """
    index, count = shard_options(shard_index, shard_count)
    if batch_size % count:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of hosts ({count})")
    ds = grain.MapDataset.source(source)
    if len(ds) < count:
        raise ValueError(f"source has {len(ds)} records, fewer than the {count} hosts")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if augment is not None and augment.active:
        ds = ds.random_map(augment, seed=seed + 1)
    if count > 1:   # this host's rows of each global batch (one host: the stream itself)
        ds = _HostRows(ds, batch=batch_size, index=index, count=count)
    it = ds.to_iter_dataset(_read_options(num_threads))  # drops None (skipped) records
    return it.batch(batch_size // count, drop_remainder=True)


def eval_batches(source, *, batch_size: int, shard_index: int | None = None, shard_count: int | None = None,
                 limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Every record once (or the first ``limit``), in order, as this host's part of padded global batches.

    Each batch has ``batch_size // shard_count`` rows and a bool ``mask``; padding rows (and records
    whose file was skipped) repeat a real record with ``mask = False``.
    """
    index, count = shard_options(shard_index, shard_count)
    n = len(source) if limit is None else min(limit, len(source))
    total = math.ceil(n / batch_size) * batch_size
    local = batch_size // count
    template = None
    for start in range(index * local, total, batch_size):
        rows = []
        for i in range(start, start + local):
            rec = source[i] if i < n else None
            if rec is not None and template is None:
                template = rec
            rows.append((rec, i < n and rec is not None))
        if template is None:  # nothing readable yet: look ahead for a template
            template = next((r for r in (source[j] for j in range(n)) if r is not None), None)
            if template is None:
                raise ValueError("evaluation source has no readable record")
        recs = [r if ok else template for r, ok in rows]
        batch = {k: np.stack([np.asarray(r[k]) for r in recs]) for k in template}
        batch["mask"] = np.array([ok for _, ok in rows], bool)
        yield batch


def num_eval_batches(source, batch_size: int, limit: int | None = None) -> int:
    n = len(source) if limit is None else min(limit, len(source))
    return math.ceil(n / batch_size)
