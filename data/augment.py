"""Host-side (numpy + Pillow) training augmentations of the DeiT recipe, run per record in the grain pipeline.

Every op takes a uint8 ``[H, W, C]`` image (``C`` = 1 or 3) and a ``numpy.random.Generator`` and returns a uint8
image; all randomness comes from that generator, which grain's ``random_map`` seeds from ``(seed, element index)``,
so a record's augmentation is the same after a resume.

- :func:`random_resized_crop`: torchvision's RandomResizedCrop sampling (area fraction ``scale``, log-uniform aspect
  ``ratio``, 10 tries, then a centre crop clamped to the ratio range), resized bicubically to ``out_size``.
- :func:`rand_augment`: timm's RandAugment with the "increasing" op set (``rand-m9-mstd0.5-inc1``): ``n`` ops drawn
  with replacement, each applied with probability 0.5 at a magnitude drawn once per image from
  ``N(m, mstd)`` clipped to ``[0, 10]``.
- :func:`random_erase`: timm's RandomErasing (``mode="pixel"``, one box of area fraction in ``[0.02, 1/3]``,
  log-uniform aspect in ``[0.3, 1/0.3]``). timm fills the normalised tensor with ``N(0, 1)`` noise; here the noise is
  drawn in pixel space as ``N(mean, std) * 255`` per channel and rounded into ``[0, 255]``, which equals it after
  normalisation up to clipping at about +-2 standard deviations and uint8 rounding.

Normalisation stays on device (``training.tasks.batch_images``), after these ops.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# -- random resized crop ------------------------------------------------------------------------------------


def rrc_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``(top, left, height, width)`` of a RandomResizedCrop box inside an ``h x w`` image."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h          # fallback: the largest centre crop whose aspect lies in the ratio range
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img, np.uint8)
    return a[..., None] if channels == 1 else a


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, out_size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """A RandomResizedCrop of ``image`` resized (bicubic) to ``out_size x out_size``."""
    h, w, c = image.shape
    top, left, ch, cw = rrc_box(h, w, rng, scale, ratio)
    crop = np.ascontiguousarray(image[top:top + ch, left:left + cw])
    if (ch, cw) == (out_size, out_size):
        return crop
    return _from_pil(_to_pil(crop).resize((out_size, out_size), Image.BICUBIC), c)


# -- RandAugment ---------------------------------------------------------------------------------------------

MAX_LEVEL = 10.0
FILL = (124, 116, 104)   # timm's fill for the geometric ops: the ImageNet mean in pixels


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img, matrix, fill):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


def _posterize(img, bits):
    """Keep the top ``bits`` bits of every channel; ``bits = 0`` gives black (Pillow's posterize refuses 0, which
    the increasing set reaches at magnitude 10)."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(kind):
    def op(img, level, rng, fill):
        return kind(img).enhance(1.0 + _signed(0.9 * level, rng))
    return op


# name -> op(pil_image, level in [0, 1], rng, fill); the "increasing" set of timm (stronger as the level grows)
RAND_OPS = {
    "AutoContrast": lambda img, level, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, level, rng, fill: ImageOps.invert(img),
    "Rotate": lambda img, level, rng, fill: img.rotate(_signed(30.0 * level, rng), resample=Image.BILINEAR,
                                                       fillcolor=fill),
    "PosterizeIncreasing": lambda img, level, rng, fill: _posterize(img, 4 - int(4 * level)),
    "SolarizeIncreasing": lambda img, level, rng, fill: ImageOps.solarize(img, 256 - int(256 * level)),
    "SolarizeAdd": lambda img, level, rng, fill: _solarize_add(img, int(110 * level)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, rng, fill: _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda img, level, rng, fill: _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0), fill),
    "TranslateXRel": lambda img, level, rng, fill: _affine(
        img, (1, 0, _signed(0.45 * level, rng) * img.size[0], 0, 1, 0), fill),
    "TranslateYRel": lambda img, level, rng, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * img.size[1]), fill),
}


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    n: int = 2
    m: float = 9.0
    mstd: float = 0.0
    p: float = 0.5


def parse_randaugment(spec: str) -> Optional[RandAugmentSpec]:
    """timm's ``"rand-m9-mstd0.5-inc1"`` string -> :class:`RandAugmentSpec` (``""`` -> ``None``). Keys: ``m``
    (magnitude, 0..10), ``n`` (ops per image), ``mstd`` (magnitude noise), ``p`` (per-op probability), ``inc``
    (only ``inc1``, the increasing op set, is implemented). Raises ``ValueError`` naming the bad part."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment spec {spec!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    fields = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
        if match is None:
            raise ValueError(f"randaugment spec {spec!r}: unknown part {part!r} (known: m<mag>, n<ops>, mstd<std>, "
                             f"p<prob>, inc1)")
        fields[match.group(1)] = float(match.group(2))
    if fields.pop("inc", 1.0) != 1.0:
        raise ValueError(f"randaugment spec {spec!r}: only inc1 (the increasing op set) is implemented")
    out = RandAugmentSpec(n=int(fields.get("n", 2)), m=fields.get("m", 9.0), mstd=fields.get("mstd", 0.0),
                          p=fields.get("p", 0.5))
    if out.n < 1 or not 0 <= out.m <= MAX_LEVEL or out.mstd < 0 or not 0 <= out.p <= 1:
        raise ValueError(f"randaugment spec {spec!r} is out of range: n >= 1, 0 <= m <= 10, mstd >= 0, 0 <= p <= 1")
    return out


def rand_augment(image: np.ndarray, rng: np.random.Generator, spec: RandAugmentSpec) -> np.ndarray:
    """``spec.n`` ops of :data:`RAND_OPS` (drawn with replacement), each applied with probability ``spec.p``."""
    c = image.shape[-1]
    img = _to_pil(image)
    fill = FILL if c == 3 else int(round(sum(FILL) / 3))
    names = list(RAND_OPS)
    m = spec.m
    if spec.mstd > 0:
        m = float(np.clip(rng.normal(spec.m, spec.mstd), 0.0, MAX_LEVEL))
    for idx in rng.integers(0, len(names), size=spec.n):
        if rng.random() < spec.p:
            img = RAND_OPS[names[int(idx)]](img, m / MAX_LEVEL, rng, fill)
    return _from_pil(img, c)


# -- random erasing ------------------------------------------------------------------------------------------


def erase_box(h: int, w: int, rng: np.random.Generator, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
    """``(top, left, height, width)`` of a RandomErasing box, or ``None`` when 10 tries found none that fits."""
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(10):
        target = h * w * rng.uniform(area[0], area[1])
        a = math.exp(rng.uniform(log_lo, log_hi))
        eh = int(round(math.sqrt(target * a)))
        ew = int(round(math.sqrt(target / a)))
        if 0 < eh < h and 0 < ew < w:
            return int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew
    return None


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float, mean, std) -> np.ndarray:
    """With probability ``prob``, one :func:`erase_box` filled with per-pixel noise ``N(mean, std)`` (in [0, 1]
    units, per channel; a grey image uses the channel averages), in uint8."""
    if not rng.random() < prob:
        return image
    h, w, c = image.shape
    box = erase_box(h, w, rng)
    if box is None:
        return image
    top, left, eh, ew = box
    mean = np.asarray(mean, np.float64).reshape(-1)
    std = np.asarray(std, np.float64).reshape(-1)
    if c == 1 or mean.size != c:
        mean, std = np.full(c, mean.mean()), np.full(c, std.mean())
    noise = rng.standard_normal((eh, ew, c)) * std + mean
    out = image.copy()
    out[top:top + eh, left:left + ew] = np.clip(np.round(noise * 255.0), 0, 255).astype(np.uint8)
    return out
