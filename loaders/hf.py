"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` and ``Dinov2Model`` checkpoints (no PyTorch), and the
name map of ``CLIPVisionModel`` weights onto the CLIP configuration of the ViT (:func:`convert_hf_clip`, used by
:mod:`loaders.hf_llava`).

Reads ``model.safetensors`` with ``safetensors.numpy`` and ``config.json`` with ``json``; maps the HF names onto
:class:`models.vit.ViT` (separate q/k/v linears are fused into our ``qkv``).

HF ViT: LayerNorm eps from the config (HF default 1e-12), the classifier reads the normed class token.
HF Dinov2: LayerScale, eps 1e-6, position embeddings for a 37 x 37 grid (518 px / 14), interpolated
bicubically to the input grid. ``pooler`` weights and the ``mask_token`` are reported as *skipped* (the
forward pass used for inference does not read them).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Optional

import numpy as np

from loaders.common import KeyTracker, LoadError, LoadReport, assign_params, strip_prefix, torch_conv, torch_linear
from models.vit import ViT, ViTConfig


def _read_dir(path) -> tuple[dict, dict]:
    path = pathlib.Path(path)
    if path.is_dir():
        cfg_path, st_path = path / "config.json", path / "model.safetensors"
    else:
        cfg_path, st_path = path.parent / "config.json", path
    if not st_path.exists():
        raise FileNotFoundError(f"no safetensors file at {st_path}")
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json next to {st_path}")
    from loaders.common import read_safetensors

    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise LoadError(f"{cfg_path}: not valid JSON ({err})") from err
    return cfg, read_safetensors(st_path)


def _num_labels(hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int:
    if "classifier.weight" in tensors:
        return int(np.shape(tensors["classifier.weight"])[0])
    return 0


def config_from_hf(hf: Mapping[str, Any], *, num_classes: int = 0, **overrides) -> ViTConfig:
    """HF ``config.json`` (``model_type`` ``vit`` or ``dinov2``) -> :class:`ViTConfig`."""
    model_type = hf.get("model_type", "vit")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported (only exact 'gelu')")
    width = int(hf["hidden_size"])
    if model_type == "dinov2":
        if hf.get("use_swiglu_ffn", False):
            raise ValueError("use_swiglu_ffn=True (DINOv2 giant) is not supported")
        base = dict(mlp_dim=int(width * hf.get("mlp_ratio", 4)), layer_scale=float(hf.get("layerscale_value", 1.0)),
                    ln_eps=float(hf.get("layer_norm_eps", 1e-6)), image_size=int(hf.get("image_size", 518)),
                    patch_size=int(hf.get("patch_size", 14)))
    elif model_type == "vit":
        base = dict(mlp_dim=int(hf["intermediate_size"]), layer_scale=None,
                    ln_eps=float(hf.get("layer_norm_eps", 1e-12)), image_size=int(hf.get("image_size", 224)),
                    patch_size=int(hf.get("patch_size", 16)))
    else:
        raise ValueError(f"model_type {model_type!r} is not supported (vit, dinov2)")
    if int(hf.get("num_channels", 3)) != 3:
        raise ValueError("only 3-channel models are supported")
    base.update(width=width, depth=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
                qkv_bias=bool(hf.get("qkv_bias", True)), num_classes=num_classes, class_token=True,
                pos_embed_prefix=True, pool="token")
    base.update(overrides)
    return ViTConfig(**base)


def convert_hf(tensors: Mapping[str, np.ndarray], cfg: ViTConfig, *, model_type: str):
    """HF state dict (prefixes ``vit.`` / ``dinov2.`` already stripped) -> (``{our path: array}``, origin map,
    tracker)."""
    src = KeyTracker(tensors)
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}

    absent: list[str] = []   # checkpoint keys the model needs and the file lacks (named by load_params_into)

    def put(ours, theirs, fn=lambda a: a):
        if theirs not in src:
            absent.append(theirs)
            return
        out[ours] = fn(src.get(theirs))
        origin[ours] = theirs

    def fused(ours, names):
        if any(n not in src for n in names):
            absent.extend(n for n in names if n not in src)
            return
        out[ours] = np.concatenate([src.get(n) for n in names], axis=0)

    put("cls_token", "embeddings.cls_token")
    put("pos_embed", "embeddings.position_embeddings")
    put("patch_embed.proj.kernel", "embeddings.patch_embeddings.projection.weight", torch_conv)
    put("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias")
    if "embeddings.register_tokens" in src:
        put("reg_tokens", "embeddings.register_tokens",
            lambda a: a.reshape((1,) + a.shape[-2:]) if a.ndim == 3 else a[None])
    src.skip("embeddings.mask_token")
    for i in range(cfg.depth):
        p = f"encoder.layer.{i}."
        o = f"blocks.{i}."
        att = p + "attention.attention."
        fused(o + "attn.qkv.kernel", [att + n + ".weight" for n in ("query", "key", "value")])
        if o + "attn.qkv.kernel" in out:
            out[o + "attn.qkv.kernel"] = torch_linear(out[o + "attn.qkv.kernel"])
        origin[o + "attn.qkv.kernel"] = att + "{query,key,value}.weight"
        if cfg.qkv_bias:
            fused(o + "attn.qkv.bias", [att + n + ".bias" for n in ("query", "key", "value")])
            origin[o + "attn.qkv.bias"] = att + "{query,key,value}.bias"
        put(o + "attn.proj.kernel", p + "attention.output.dense.weight", torch_linear)
        put(o + "attn.proj.bias", p + "attention.output.dense.bias")
        if model_type == "dinov2":
            put(o + "norm1.scale", p + "norm1.weight")
            put(o + "norm1.bias", p + "norm1.bias")
            put(o + "norm2.scale", p + "norm2.weight")
            put(o + "norm2.bias", p + "norm2.bias")
            put(o + "mlp.fc1.kernel", p + "mlp.fc1.weight", torch_linear)
            put(o + "mlp.fc1.bias", p + "mlp.fc1.bias")
            put(o + "mlp.fc2.kernel", p + "mlp.fc2.weight", torch_linear)
            put(o + "mlp.fc2.bias", p + "mlp.fc2.bias")
            put(o + "ls1.gamma", p + "layer_scale1.lambda1")
            put(o + "ls2.gamma", p + "layer_scale2.lambda1")
        else:
            put(o + "norm1.scale", p + "layernorm_before.weight")
            put(o + "norm1.bias", p + "layernorm_before.bias")
            put(o + "norm2.scale", p + "layernorm_after.weight")
            put(o + "norm2.bias", p + "layernorm_after.bias")
            put(o + "mlp.fc1.kernel", p + "intermediate.dense.weight", torch_linear)
            put(o + "mlp.fc1.bias", p + "intermediate.dense.bias")
            put(o + "mlp.fc2.kernel", p + "output.dense.weight", torch_linear)
            put(o + "mlp.fc2.bias", p + "output.dense.bias")
    put("norm.scale", "layernorm.weight")
    put("norm.bias", "layernorm.bias")
    if "classifier.weight" in src:
        put("head.kernel", "classifier.weight", torch_linear)
        put("head.bias", "classifier.bias")
    for k in ("pooler.dense.weight", "pooler.dense.bias"):
        src.skip(k)
    src.absent = absent
    return out, origin, src


def convert_hf_clip(src, cfg: ViTConfig, *, prefix: str = "", src_prefix: str = "") -> dict[str, Optional[np.ndarray]]:
    """HF ``CLIPVisionModel`` names (``<src_prefix>embeddings.*``, ``pre_layrnorm``, ``encoder.layers.<i>.*``,
    ``post_layernorm``) -> ``{<prefix><our ViT path>: array}`` for the CLIP configuration of :class:`ViT`
    (:func:`models.clip_vision.clip_vit_config`). ``src``: a key tracker whose ``get`` returns ``None`` for an absent
    key (that path then maps to ``None``, i.e. *missing*). The q/k/v linears are fused into ``qkv``; the class
    embedding ``[C]`` becomes ``cls_token [1, 1, C]`` and the position table ``[N + 1, C]`` ``pos_embed
    [1, N + 1, C]``; CLIP's ``post_layernorm`` is the ViT's final ``norm``."""
    s, d = src_prefix, prefix

    def opt(fn, a):
        return None if a is None else fn(a)

    out = {
        d + "patch_embed.proj.kernel": opt(torch_conv, src.get(s + "embeddings.patch_embedding.weight")),
        d + "cls_token": opt(lambda a: a.reshape(1, 1, -1), src.get(s + "embeddings.class_embedding")),
        d + "pos_embed": opt(lambda a: a[None], src.get(s + "embeddings.position_embedding.weight")),
        d + "norm_pre.scale": src.get(s + "pre_layrnorm.weight"),
        d + "norm_pre.bias": src.get(s + "pre_layrnorm.bias"),
        d + "norm.scale": src.get(s + "post_layernorm.weight"),
        d + "norm.bias": src.get(s + "post_layernorm.bias"),
    }
    src.skip(s + "embeddings.position_ids")
    for i in range(cfg.depth):
        p, o = f"{s}encoder.layers.{i}.", f"{d}blocks.{i}."
        for theirs, ours in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            out[o + f"{ours}.scale"] = src.get(p + f"{theirs}.weight")
            out[o + f"{ours}.bias"] = src.get(p + f"{theirs}.bias")
        qkv_w = [src.get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
        qkv_b = [src.get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")]
        out[o + "attn.qkv.kernel"] = None if any(w is None for w in qkv_w) else torch_linear(np.concatenate(qkv_w))
        out[o + "attn.qkv.bias"] = None if any(b is None for b in qkv_b) else np.concatenate(qkv_b)
        out[o + "attn.proj.kernel"] = opt(torch_linear, src.get(p + "self_attn.out_proj.weight"))
        out[o + "attn.proj.bias"] = src.get(p + "self_attn.out_proj.bias")
        for n in ("fc1", "fc2"):
            out[o + f"mlp.{n}.kernel"] = opt(torch_linear, src.get(p + f"mlp.{n}.weight"))
            out[o + f"mlp.{n}.bias"] = src.get(p + f"mlp.{n}.bias")
    return out


def load_params_into(model: ViT, tensors: Mapping[str, np.ndarray], *, model_type: str, source: str,
                     strict: bool = True) -> LoadReport:
    """Write an HF state dict into an existing model; returns the :class:`LoadReport`."""
    tensors = strip_prefix(tensors, ("vit.", "dinov2.", "backbone."))
    params, origin, src = convert_hf(tensors, model.config, model_type=model_type)
    if strict and src.absent:
        shown = ", ".join(repr(k) for k in src.absent[:10]) + (f", ... (+{len(src.absent) - 10})"
                                                               if len(src.absent) > 10 else "")
        raise LoadError(f"{source}: the checkpoint lacks {len(src.absent)} tensor(s) the model needs: {shown}")
    report = LoadReport(source)
    report.unexpected.extend(src.unused())
    report.skipped.extend(k for k in ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")
                          if k in tensors)
    return assign_params(model, params, report, origin=origin, strict=strict)


def load_hf_vit(path, *, strict: bool = True, seed: int = 0, **config_overrides) -> tuple[ViT, LoadReport]:
    """Load an HF ``ViTModel`` / ``ViTForImageClassification`` or ``Dinov2Model`` directory (``config.json`` +
    ``model.safetensors``) -> ``(model, report)``. The model type comes from ``config.json``."""
    from flax import nnx

    hf, tensors = _read_dir(path)
    stripped = strip_prefix(tensors, ("vit.", "dinov2.", "backbone."))
    cfg = config_from_hf(hf, num_classes=_num_labels(hf, stripped), **config_overrides)
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    report = load_params_into(model, tensors, model_type=hf.get("model_type", "vit"), source=str(path),
                              strict=strict)
    return model, report


def load_hf_dinov2(path, *, strict: bool = True, **config_overrides) -> tuple[ViT, LoadReport]:
    """Same as :func:`load_hf_vit`, checking that the checkpoint is a DINOv2 one."""
    hf, _ = _read_dir(path)
    if hf.get("model_type") != "dinov2":
        raise ValueError(f"{path} holds model_type={hf.get('model_type')!r}, not 'dinov2'")
    return load_hf_vit(path, strict=strict, **config_overrides)


__all__ = ["config_from_hf", "convert_hf", "convert_hf_clip", "load_params_into", "load_hf_vit", "load_hf_dinov2"]
