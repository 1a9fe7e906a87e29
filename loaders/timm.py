"""timm ``VisionTransformer`` state dicts (ViT, DeiT, DeiT-distilled, with registers / layer scale) in safetensors.

timm keeps the fused ``qkv`` layout we use, so the mapping is mostly a rename plus PyTorch -> Flax layouts.
The architecture is read off the tensor shapes. The head count is not stored in the tensors: it comes from
``heads=``, else from a ``config.json`` next to the file (timm's hub layout: ``model_args.num_heads``, or the
size word of ``architecture``, e.g. ``vit_small_patch16_224`` -> 6), else from timm's standard sizes for the
width (:data:`TIMM_SIZES`: 192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16, 1280 -> 16); any other width without
``heads=`` is a :class:`LoadError` saying so (before, ``width // 64`` was used silently: a 96-wide, 3-head
DeiT loaded with 1 head). Whether the position embedding covers the class/distillation tokens (timm's
``no_embed_class``) is decided by its length.

Structural checks (:class:`LoadError` naming the key, strict or not): the block indices must run 0..depth-1
with no gap; at a standard width the block count must be timm's for that width unless ``depth=`` (or the
``config.json``) says otherwise, so a checkpoint missing its last block no longer loads as a smaller model with
``report.ok``; ``blocks.0.mlp.fc1.weight`` (the MLP width) must be present; a position embedding that reserves
a prefix slot needs ``cls_token``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from loaders.common import (KeyTracker, LoadError, LoadReport, assign_params, make_putter, strip_prefix, torch_conv,
                            torch_linear)
from models.vit import ViT, ViTConfig


# timm's standard ViT/DeiT sizes: width -> (depth, heads); and the size words of its architecture names.
TIMM_SIZES = {192: (12, 3), 384: (12, 6), 512: (12, 8), 768: (12, 12), 1024: (24, 16), 1280: (32, 16)}
_SIZE_WORDS = {"tiny": 192, "small": 384, "medium": 512, "base": 768, "large": 1024, "huge": 1280}


def stated_architecture(config: Optional[Mapping]) -> dict:
    """``{"depth": .., "heads": ..}`` a timm hub ``config.json`` states (``model_args``, else the size word of
    ``architecture``); empty when it states nothing."""
    if not config:
        return {}
    args = config.get("model_args") or {}
    out = {k: int(args[a]) for k, a in (("depth", "depth"), ("heads", "num_heads")) if a in args}
    arch = str(config.get("architecture", "")).split(".")[0]
    words = [w for w in arch.split("_") if w in _SIZE_WORDS]
    if words and arch.startswith(("vit_", "deit_", "deit3_")):
        depth, heads = TIMM_SIZES[_SIZE_WORDS[words[0]]]
        out.setdefault("depth", depth)
        out.setdefault("heads", heads)
    return out


def config_from_timm(tensors: Mapping[str, np.ndarray], *, heads: Optional[int] = None, source: str = "timm state dict",
                     config: Optional[Mapping] = None, **overrides) -> ViTConfig:
    """Infer a :class:`ViTConfig` from a timm state dict's shapes (``config``: a hub ``config.json``, optional)."""
    if "patch_embed.proj.weight" not in tensors:
        raise LoadError(f"{source}: not a timm VisionTransformer state dict: 'patch_embed.proj.weight' is missing")
    if "pos_embed" not in tensors:
        raise LoadError(f"{source}: the timm state dict has no 'pos_embed'")
    w = np.shape(tensors["patch_embed.proj.weight"])
    width, patch = int(w[0]), int(w[-1])
    found = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not found:
        raise LoadError(f"{source}: the timm state dict has no 'blocks.<i>.' tensors")
    depth = found[-1] + 1
    gaps = sorted(set(range(depth)) - set(found))
    if gaps:
        raise LoadError(f"{source}: block(s) {gaps} have no tensors at all (found blocks {found[0]}..{found[-1]}): "
                        f"the checkpoint is missing whole blocks")
    stated = stated_architecture(config)
    want_depth = overrides.get("depth", stated.get("depth"))
    if want_depth is None and width in TIMM_SIZES and TIMM_SIZES[width][0] != depth:
        raise LoadError(f"{source}: found {depth} blocks (blocks.0..blocks.{depth - 1}), but timm's {width}-wide ViTs "
                        f"have {TIMM_SIZES[width][0]}: the last block(s) are missing. If this checkpoint really has "
                        f"{depth} blocks, pass depth={depth}")
    if want_depth is not None and int(want_depth) != depth:
        raise LoadError(f"{source}: depth {want_depth} was asked for (or stated in config.json), but the checkpoint has "
                        f"blocks 0..{depth - 1} ({depth}): block(s) {list(range(depth, int(want_depth)))} missing"
                        if int(want_depth) > depth else
                        f"{source}: depth {want_depth} was asked for, but the checkpoint has {depth} blocks")
    if "blocks.0.mlp.fc1.weight" not in tensors and "mlp_dim" not in overrides:
        raise LoadError(f"{source}: 'blocks.0.mlp.fc1.weight' is missing (it gives the MLP width)")
    mlp_dim = int(overrides.get("mlp_dim") or np.shape(tensors["blocks.0.mlp.fc1.weight"])[0])
    if heads is None:
        heads = stated.get("heads")
    if heads is None and width in TIMM_SIZES:
        heads = TIMM_SIZES[width][1]
    if heads is None:
        raise LoadError(f"{source}: a timm state dict does not store the head count, and width {width} is not one of "
                        f"timm's standard sizes {sorted(TIMM_SIZES)}; pass heads=<count> (e.g. 3 for a 96-wide "
                        f"3-head DeiT) or put a config.json with model_args.num_heads next to the file")
    if width % int(heads):
        raise LoadError(f"{source}: width {width} does not split into heads={heads}")
    class_token = "cls_token" in tensors
    distill = "dist_token" in tensors
    regs = int(np.shape(tensors["reg_token"])[1]) if "reg_token" in tensors else 0
    n_pos = int(np.shape(tensors["pos_embed"])[1])
    n_prefix = int(class_token) + int(distill)
    if not class_token and (distill or _square(n_pos - 1) and not _square(n_pos)):
        raise LoadError(f"{source}: 'cls_token' is missing (the checkpoint has "
                        f"{'dist_token' if distill else f'a position embedding with {n_pos} = grid + 1 slots'})")
    grid = math.isqrt(n_pos)
    if grid * grid == n_pos:
        prefix_in_pe = False
    else:
        grid = math.isqrt(n_pos - n_prefix)
        if grid * grid != n_pos - n_prefix:
            raise LoadError(f"{source}: pos_embed has {n_pos} positions: neither a square grid nor grid + {n_prefix} prefix")
        prefix_in_pe = True
    for k in ("fc_norm.weight", "norm_pre.weight", "attn_pool.latent", "blocks.0.attn.q_norm.weight"):
        if k in tensors:
            raise ValueError(f"timm checkpoint uses {k.split('.')[0]!r}, which models.vit.ViT does not implement")
    num_classes = int(np.shape(tensors["head.weight"])[0]) if "head.weight" in tensors else 0
    cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=int(heads), patch_size=patch,
               image_size=grid * patch, num_classes=num_classes, class_token=class_token, distill_token=distill,
               num_registers=regs, pos_embed_prefix=prefix_in_pe,
               layer_scale=1.0 if "blocks.0.ls1.gamma" in tensors else None, ln_eps=1e-6,
               qkv_bias="blocks.0.attn.qkv.bias" in tensors, pool="token" if class_token else "avg")
    cfg.update(overrides)
    return ViTConfig(**cfg)


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


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
                         seed: int = 0, heads: Optional[int] = None, config: Optional[Mapping] = None,
                         **config_overrides) -> tuple[ViT, LoadReport]:
    """Build a model from an in-memory timm state dict (numpy arrays) -> ``(model, report)``."""
    from flax import nnx

    tensors = strip_prefix(tensors, ("module.", "model."))
    cfg = config_from_timm(tensors, heads=heads, source=source, config=config, **config_overrides)
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    params, origin, src = convert_timm(tensors, cfg)
    report = LoadReport(source)
    report.unexpected.extend(src.unused())
    return model, assign_params(model, params, report, origin=origin, strict=strict)


def load_timm(path, *, strict: bool = True, heads: Optional[int] = None, **config_overrides) -> tuple[ViT, LoadReport]:
    """Load a timm ViT/DeiT ``.safetensors`` file -> ``(model, report)``; a ``config.json`` next to it (timm's hub
    layout) supplies the head count and depth when it states them."""
    import json
    import pathlib

    from loaders.common import read_safetensors

    config = None
    cfg_path = pathlib.Path(path).with_name("config.json")
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise LoadError(f"{cfg_path}: not valid JSON ({err})") from err
    return load_timm_state_dict(read_safetensors(path), source=str(path), strict=strict, heads=heads, config=config,
                                **config_overrides)


__all__ = ["TIMM_SIZES", "stated_architecture", "config_from_timm", "convert_timm", "load_timm_state_dict", "load_timm"]
