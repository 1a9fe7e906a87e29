"""big_vision ViT parameters from an ``.npz`` (flattened with ``/``), e.g.
``params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel``.

Handles the per-layer layout (``encoderblock_{i}``) and the scanned one (``encoderblock/...`` with a leading
depth axis), the ``params/`` prefix or none, ``pool_type`` ``"tok"`` (a ``cls`` parameter) or ``"gap"``.
big_vision adds the position embedding to the patches only (the class token has none) and uses LayerNorm
eps 1e-6. Attention kernels are ``[C, H, Dh]`` / ``[H, Dh, C]``; the head count is read from them.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import numpy as np

from loaders.common import KeyTracker, make_putter, LoadReport, assign_params
from models.vit import ViT, ViTConfig

_ATT = "MultiHeadDotProductAttention_0"


def _normalise_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a ``params/`` prefix and unstack a scanned ``encoderblock`` into ``encoderblock_{i}``."""
    out = {}
    for k, v in tensors.items():
        k = k[len("params/"):] if k.startswith("params/") else k
        if k.startswith("Transformer/encoderblock/"):
            rest = k[len("Transformer/encoderblock/"):]
            for i in range(np.shape(v)[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = np.asarray(v[i])
        else:
            out[k] = np.asarray(v)
    return out


def config_from_big_vision(tensors: Mapping[str, np.ndarray], **overrides) -> ViTConfig:
    """Infer a :class:`ViTConfig` from (normalised) big_vision parameter shapes."""
    emb = np.shape(tensors["embedding/kernel"])
    patch, width = int(emb[0]), int(emb[-1])
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    depth = max(blocks) + 1
    heads = int(np.shape(tensors[f"Transformer/encoderblock_0/{_ATT}/query/kernel"])[1])
    mlp_dim = int(np.shape(tensors["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"])[1])
    n_pos = int(np.shape(tensors["pos_embedding"])[1])
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embedding has {n_pos} positions, not a square grid")
    for k in ("MAPHead_0/probe", "pre_logits/kernel"):
        if k in tensors:
            raise ValueError(f"big_vision checkpoint uses {k.split('/')[0]!r}, which models.vit.ViT does not implement")
    has_cls = "cls" in tensors
    cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch_size=patch, image_size=grid * patch,
               num_classes=int(np.shape(tensors["head/kernel"])[1]) if "head/kernel" in tensors else 0,
               class_token=has_cls, pos_embed_prefix=False, ln_eps=1e-6, pool="token" if has_cls else "gap",
               qkv_bias=True)
    cfg.update(overrides)
    return ViTConfig(**cfg)


def convert_big_vision(tensors: Mapping[str, np.ndarray], cfg: ViTConfig):
    """big_vision names -> ``({our path: array}, origin, tracker)``."""
    src = KeyTracker(tensors)
    out, origin = {}, {}

    put = make_putter(src, out, origin)

    put("cls_token", "cls")
    put("pos_embed", "pos_embedding")
    put("patch_embed.proj.kernel", "embedding/kernel")
    put("patch_embed.proj.bias", "embedding/bias")
    c = cfg.width
    for i in range(cfg.depth):
        p, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        put(o + "norm1.scale", p + "LayerNorm_0/scale")
        put(o + "norm1.bias", p + "LayerNorm_0/bias")
        put(o + "norm2.scale", p + "LayerNorm_1/scale")
        put(o + "norm2.bias", p + "LayerNorm_1/bias")
        att = p + _ATT + "/"
        names = [att + n for n in ("query", "key", "value")]
        if all(n + "/kernel" in src for n in names):
            out[o + "attn.qkv.kernel"] = np.concatenate([src.get(n + "/kernel").reshape(c, -1) for n in names], axis=1)
            origin[o + "attn.qkv.kernel"] = att + "{query,key,value}/kernel"
        if all(n + "/bias" in src for n in names):
            out[o + "attn.qkv.bias"] = np.concatenate([src.get(n + "/bias").reshape(-1) for n in names])
            origin[o + "attn.qkv.bias"] = att + "{query,key,value}/bias"
        put(o + "attn.proj.kernel", att + "out/kernel", lambda a: a.reshape(-1, c))
        put(o + "attn.proj.bias", att + "out/bias")
        put(o + "mlp.fc1.kernel", p + "MlpBlock_0/Dense_0/kernel")
        put(o + "mlp.fc1.bias", p + "MlpBlock_0/Dense_0/bias")
        put(o + "mlp.fc2.kernel", p + "MlpBlock_0/Dense_1/kernel")
        put(o + "mlp.fc2.bias", p + "MlpBlock_0/Dense_1/bias")
    put("norm.scale", "Transformer/encoder_norm/scale")
    put("norm.bias", "Transformer/encoder_norm/bias")
    put("head.kernel", "head/kernel")
    put("head.bias", "head/bias")
    return out, origin, src


def load_big_vision(path_or_tensors, *, strict: bool = True, seed: int = 0,
                    **config_overrides) -> tuple[ViT, LoadReport]:
    """Load a big_vision ViT ``.npz`` (or an in-memory flat dict) -> ``(model, report)``."""
    from flax import nnx

    if isinstance(path_or_tensors, Mapping):
        raw, source = dict(path_or_tensors), "big_vision params"
    else:
        from loaders.common import read_npz

        raw = read_npz(path_or_tensors)
        source = str(path_or_tensors)
    tensors = _normalise_keys(raw)
    cfg = config_from_big_vision(tensors, **config_overrides)
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    params, origin, src = convert_big_vision(tensors, cfg)
    report = LoadReport(source)
    report.unexpected.extend(src.unused())
    return model, assign_params(model, params, report, origin=origin, strict=strict)


__all__ = ["config_from_big_vision", "convert_big_vision", "load_big_vision"]
