"""CLIP-style image preprocessing (the ``preprocessor_config.json`` of a Hugging Face LLaVA), NumPy + PIL only.

:class:`ClipImageProcessor` follows transformers' ``CLIPImageProcessor`` (PIL backend) step by step:

1. convert to RGB (``do_convert_rgb``; transparent images are composited over white first);
2. resize with PIL (``resample``, 3 = bicubic) so the shortest edge is ``shortest_edge`` and the long edge
   ``int(shortest_edge * long / short)``, or to a fixed ``(height, width)`` when the config gives one;
3. center crop to ``crop_size``: offsets ``(H - h) // 2`` and ``(W - w) // 2``; an image smaller than the
   crop is zero-padded around its centre first;
4. multiply by ``rescale_factor`` (1/255) in float64, then float32;
5. subtract ``image_mean`` and divide by ``image_std`` per channel.

Output: ``[N, H, W, 3]`` float32 (NHWC, the layout of :mod:`models.clip_vision`). LLaVA-1.5's own pipeline
pads each image to a square of the mean colour before these steps (``image_aspect_ratio="pad"``); the HF
processor does not, and neither does this one (do it on the PIL image first if needed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from loaders.common import LoadError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hw(value, name: str) -> Optional[tuple[int, int]]:
    """``{"height", "width"}`` / int / ``[h, w]`` -> ``(h, w)``; ``None`` passes through."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        raise LoadError(f"preprocessor_config.json: {name}={dict(value)!r} is not supported (need height/width)")
    if isinstance(value, (int, float)):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise LoadError(f"preprocessor_config.json: {name}={value!r} is not supported")


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
    """Images -> ``[N, H, W, 3]`` float32 pixels, as the module docstring describes.

    ``shortest_edge`` xor ``resize_to`` (``(h, w)``) picks the resize; ``None`` for both skips it. ``crop_size``
    ``(h, w)`` or ``None`` (no crop); ``rescale_factor`` / ``image_mean`` / ``image_std`` ``None`` skip their step.
    """

    shortest_edge: Optional[int] = 224
    resize_to: Optional[tuple[int, int]] = None
    crop_size: Optional[tuple[int, int]] = (224, 224)
    rescale_factor: Optional[float] = 1 / 255
    image_mean: Optional[tuple[float, ...]] = OPENAI_CLIP_MEAN
    image_std: Optional[tuple[float, ...]] = OPENAI_CLIP_STD
    convert_rgb: bool = True
    resample: int = 3

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ClipImageProcessor":
        """From a ``preprocessor_config.json`` dict; :class:`LoadError` names what it cannot follow."""
        kind = cfg.get("image_processor_type", "CLIPImageProcessor")
        if kind.removesuffix("Fast").removesuffix("Pil") != "CLIPImageProcessor":
            raise LoadError(f"preprocessor_config.json: image_processor_type={kind!r} is not supported "
                            f"(only CLIPImageProcessor)")
        for flag in ("do_pad", "image_grid_pinpoints"):
            if cfg.get(flag):
                raise LoadError(f"preprocessor_config.json: {flag} (LLaVA-NeXT AnyRes preprocessing) is not supported")
        shortest, resize_to = None, None
        if cfg.get("do_resize", True):
            size = cfg.get("size", {"shortest_edge": 224})
            if isinstance(size, Mapping) and "shortest_edge" in size:
                if size.get("longest_edge") is not None:
                    raise LoadError("preprocessor_config.json: size.longest_edge is not supported")
                shortest = int(size["shortest_edge"])
            elif isinstance(size, (int, float)):
                shortest = int(size)
            else:
                resize_to = _hw(size, "size")
        crop = _hw(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
        mean = std = None
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in np.broadcast_to(cfg.get("image_mean", OPENAI_CLIP_MEAN), (3,)))
            std = tuple(float(v) for v in np.broadcast_to(cfg.get("image_std", OPENAI_CLIP_STD), (3,)))
        return cls(shortest_edge=shortest, resize_to=resize_to, crop_size=crop,
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
                   image_mean=mean, image_std=std, convert_rgb=bool(cfg.get("do_convert_rgb", True)),
                   resample=int(cfg.get("resample", 3)))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` after the resize step for an input of ``height x width``."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def _one(self, image) -> np.ndarray:
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
                raise ValueError(f"array images must be uint8 [H, W, C] with C in (1, 3, 4), got "
                                 f"{image.dtype} {image.shape}")
            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"images must be PIL images or uint8 arrays, got {type(image).__name__}")
        if self.convert_rgb and image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # transparent pixels over white, like transformers' convert_rgb
                rgba = image.convert("RGBA")
                image = Image.new("RGBA", rgba.size, (255, 255, 255))
                image.alpha_composite(rgba)
            image = image.convert("RGB")
        h, w = self.output_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=self.resample)
        x = np.asarray(image)
        if x.ndim == 2:
            x = x[..., None]
        if self.crop_size is not None:
            x = _center_crop(x, *self.crop_size)
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32)
        if self.image_mean is not None:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x

    def __call__(self, images) -> np.ndarray:
        """One image or a sequence (PIL images or uint8 ``[H, W, C]`` arrays) -> ``[N, H, W, 3]`` float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = [self._one(im) for im in images]
        if len({o.shape for o in out}) != 1:
            raise ValueError(f"images give different shapes {sorted({o.shape for o in out})}; set a crop size")
        return np.stack(out)


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W, C]`` -> ``[height, width, C]``: centre crop, zero padding first when the image is smaller."""
    h, w = x.shape[:2]
    if height > h or width > w:
        ph, pw = max(height, h), max(width, w)
        padded = np.zeros((ph, pw) + x.shape[2:], x.dtype)
        top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, ph, pw
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]


__all__ = ["ClipImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
