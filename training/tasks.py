"""The loss and metrics of a batch: :class:`ClassificationTask`, :class:`ATPClassificationTask` (learned ATP
thresholds with a budget loss) and :class:`VQATask` (the VLM), and :func:`make_task` to pick one from a config."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax

import data as data_lib


from training.builders import _get, check_atp_kind, reduction_spec_vlm

log = logging.getLogger("tokenreduce.train")


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
