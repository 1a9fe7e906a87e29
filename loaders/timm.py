"""timm ``VisionTransformer`` state dicts (ViT, DeiT, DeiT-distilled, with registers / layer scale) in safetensors.

timm keeps the fused ``qkv`` layout we use, so the mapping is mostly a rename plus PyTorch -> Flax layouts.
The architecture is read off the tensor shapes; only the head count is not stored, so it defaults to
``width // 64`` (true for timm's Ti/S/B/L) and can be passed as ``heads=``. Whether the position embedding
covers the class/distillation tokens (timm's ``no_embed_class``) is decided by its length.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from loaders.common import KeyTracker, make_putter, LoadReport, assign_params, strip_prefix, torch_conv, torch_linear
from models.vit import ViT, ViTConfig


def config_from_timm(tensors: Mapping[str, np.ndarray], *, heads: Optional[int] = None, **overrides) -> ViTConfig:
    """Infer a :class:`ViTConfig` from a timm state dict's shapes."""
    if "patch_embed.proj.weight" not in tensors:
        raise ValueError("not a timm VisionTransformer state dict: 'patch_embed.proj.weight' is missing")
    w = np.shape(tensors["patch_embed.proj.weight"])
    width, patch = int(w[0]), int(w[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    mlp_dim = int(np.shape(tensors["blocks.0.mlp.fc1.weight"])[0])
    class_token = "cls_token" in tensors
    distill = "dist_token" in tensors
    regs = int(np.shape(tensors["reg_token"])[1]) if "reg_token" in tensors else 0
    n_pos = int(np.shape(tensors["pos_embed"])[1])
    n_prefix = int(class_token) + int(distill)
    grid = math.isqrt(n_pos)
    if grid * grid == n_pos:
        prefix_in_pe = False
    else:
        grid = math.isqrt(n_pos - n_prefix)
        if grid * grid != n_pos - n_prefix:
            raise ValueError(f"pos_embed has {n_pos} positions: neither a square grid nor grid + {n_prefix} prefix")
        prefix_in_pe = True
    for k in ("fc_norm.weight", "norm_pre.weight", "attn_pool.latent", "blocks.0.attn.q_norm.weight"):
        if k in tensors:
            raise ValueError(f"timm checkpoint uses {k.split('.')[0]!r}, which models.vit.ViT does not implement")
    num_classes = int(np.shape(tensors["head.weight"])[0]) if "head.weight" in tensors else 0
    cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads or max(width // 64, 1), patch_size=patch,
               image_size=grid * patch, num_classes=num_classes, class_token=class_token, distill_token=distill,
               num_registers=regs, pos_embed_prefix=prefix_in_pe,
               layer_scale=1.0 if "blocks.0.ls1.gamma" in tensors else None, ln_eps=1e-6,
               qkv_bias="blocks.0.attn.qkv.bias" in tensors, pool="token" if class_token else "avg")
    cfg.update(overrides)
    return ViTConfig(**cfg)


def convert_timm(tensors: Mapping[str, np.ndarray], cfg: ViTConfig):
    """timm names -> ``({our path: array}, origin, tracker)``."""
    src = KeyTracker(tensors)
    out, origin = {}, {}

    put = make_putter(src, out, origin)

    put("cls_token", "cls_token")
    put("dist_token", "dist_token")
    put("reg_tokens", "reg_token")
    put("pos_embed", "pos_embed")
    put("patch_embed.proj.kernel", "patch_embed.proj.weight", torch_conv)
    put("patch_embed.proj.bias", "patch_embed.proj.bias")
    for i in range(cfg.depth):
        p = o = f"blocks.{i}."
        for ln in ("norm1", "norm2"):
            put(o + ln + ".scale", p + ln + ".weight")
            put(o + ln + ".bias", p + ln + ".bias")
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            put(o + lin + ".kernel", p + lin + ".weight", torch_linear)
            put(o + lin + ".bias", p + lin + ".bias")
        put(o + "ls1.gamma", p + "ls1.gamma")
        put(o + "ls2.gamma", p + "ls2.gamma")
    put("norm.scale", "norm.weight")
    put("norm.bias", "norm.bias")
    for h in ("head", "head_dist"):
        put(h + ".kernel", h + ".weight", torch_linear)
        put(h + ".bias", h + ".bias")
    return out, origin, src


def load_timm_state_dict(tensors: Mapping[str, np.ndarray], *, source: str = "timm state dict", strict: bool = True,
                         seed: int = 0, heads: Optional[int] = None, **config_overrides) -> tuple[ViT, LoadReport]:
    """Build a model from an in-memory timm state dict (numpy arrays) -> ``(model, report)``."""
    from flax import nnx

    tensors = strip_prefix(tensors, ("module.", "model."))
    cfg = config_from_timm(tensors, heads=heads, **config_overrides)
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    params, origin, src = convert_timm(tensors, cfg)
    report = LoadReport(source)
    report.unexpected.extend(src.unused())
    return model, assign_params(model, params, report, origin=origin, strict=strict)


def load_timm(path, *, strict: bool = True, heads: Optional[int] = None, **config_overrides) -> tuple[ViT, LoadReport]:
    """Load a timm ViT/DeiT ``.safetensors`` file -> ``(model, report)``."""
    from safetensors.numpy import load_file

    return load_timm_state_dict(load_file(str(path)), source=str(path), strict=strict, heads=heads,
                                **config_overrides)


__all__ = ["config_from_timm", "convert_timm", "load_timm_state_dict", "load_timm"]
