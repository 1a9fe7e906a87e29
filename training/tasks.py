"""The loss and metrics of a batch: :class:`ClassificationTask`, :class:`DenseTask` (one label per patch) and
:class:`VQATask` (the VLM), and :func:`make_task` to pick one from a config.

Learned reducers (:class:`reduction.nnx.LearnedReducer`) need nothing here beyond :func:`reducer_terms`: the model
reports ``aux["reducer_loss"]`` (added to the loss) and ``aux["reducer_aux"]`` (``{layer: {name: value}}``, each value
logged as ``<name>_L<layer>``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

import data as data_lib


from training.builders import _get, reduction_spec_vlm

log = logging.getLogger("tokenreduce.train")


# -- tasks --------------------------------------------------------------------------------------------------


def batch_images(batch, cfg) -> jax.Array:
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


def reducer_terms(aux) -> tuple[jax.Array, dict]:
    """``(reducer_loss, metrics)`` from a model's ``aux``: the summed auxiliary loss of its learned reducers (0 when
    it has none) and every entry of ``aux["reducer_aux"]`` as ``<name>_L<layer>`` (scalars or per-example ``[B]``
    values, unreduced)."""
    aux = aux if isinstance(aux, Mapping) else {}
    per_layer = aux.get("reducer_aux") or {}
    loss = aux.get("reducer_loss")
    loss = jnp.zeros((), jnp.float32) if loss is None else jnp.asarray(loss, jnp.float32)
    metrics = {f"{name}_L{layer}": value for layer, a in per_layer.items() for name, value in a.items()}
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Softmax cross-entropy with label smoothing on ``label`` plus the model's ``aux["reducer_loss"]``.

    Metrics: ``accuracy``; with learned reducers also ``ce_loss``, ``reducer_loss`` and the mean of every
    ``<name>_L<layer>`` (:func:`reducer_terms`). Training runs ``model(..., train=True)``, evaluation
    ``train=False`` and adds the learned reducers' metrics (except their ``loss``) as per-example extras."""

    num_classes: int
    label_smoothing: float = 0.0
    mix: Any = None      # training.recipe.MixConfig: Mixup / CutMix in training (soft targets); None = off

    def forward(self, model, batch, cfg, reducers, rng, train: bool, images=None):
        images = batch_images(batch, cfg) if images is None else images
        logits, aux = model(images, reducers=reducers, deterministic=not train, rng=rng, train=train)
        return logits.astype(jnp.float32), aux

    def per_example(self, logits, batch, smoothing):
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return loss, correct

    def loss(self, model, batch, cfg, reducers, rng):
        if self.mix is not None and self.mix.active:
            from training.recipe import MIX_SALT, mix_batch

            images, targets, lam, _ = mix_batch(jax.random.fold_in(rng, MIX_SALT), batch_images(batch, cfg),
                                                batch["label"], self.num_classes, self.label_smoothing, self.mix)
            logits, aux = self.forward(model, batch, cfg, reducers, rng, True, images=images)
            loss = optax.softmax_cross_entropy(logits, targets)
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)   # against the own label
            return _with_reducers(jnp.mean(loss), {"accuracy": jnp.mean(correct), "mix_lam": lam}, aux)
        logits, aux = self.forward(model, batch, cfg, reducers, rng, True)
        loss, correct = self.per_example(logits, batch, self.label_smoothing)
        return _with_reducers(jnp.mean(loss), {"accuracy": jnp.mean(correct)}, aux)

    def eval(self, model, batch, cfg, reducers):
        logits, aux = self.forward(model, batch, cfg, reducers, None, False)
        loss, correct = self.per_example(logits, batch, 0.0)
        return _eval_with_reducers(loss, correct, aux)


def mix_config(cfg):
    """The ``train.mixup_alpha`` / ``cutmix_alpha`` / ``mix_prob`` / ``mix_switch_prob`` fields as a
    :class:`training.recipe.MixConfig` (``None`` when both alphas are 0 or absent)."""
    from training.recipe import MixConfig

    t = cfg.train
    mix = MixConfig(mixup_alpha=float(_get(t, "mixup_alpha", 0.0)), cutmix_alpha=float(_get(t, "cutmix_alpha", 0.0)),
                    prob=float(_get(t, "mix_prob", 1.0)), switch_prob=float(_get(t, "mix_switch_prob", 0.5)))
    return mix if mix.active else None


@dataclasses.dataclass(frozen=True)
class DenseTask:
    """Per-patch classification (``batch["patch_labels"]: [B, N]`` int, raster order) with a ViT whose head runs on
    every token (``model.vit.pool="dense"``, ``out: [B, T, num_classes]``).

    The model runs with ``return_source=True`` and the ``T`` outputs go back to the ``N`` original patches with
    ``reduction.unmerge`` (each patch takes the output of the token that holds it; a pruned patch without one gets
    zero logits, a uniform guess). So any reduction works: merges and pruning read through their source map, a learned
    recovery that restores every patch (:class:`reduction.nnx.HoTRecovery`) has the identity map. Loss: softmax
    cross-entropy averaged over the patches (plus the model's ``aux["reducer_loss"]``). Metrics: ``accuracy``, the
    fraction of correct patches (per example); in evaluation the extras ``covered`` (fraction of patches with a
    holding token), ``inter_<c>`` and ``union_<c>`` (per class ``c``, patch counts per example), so that
    ``eval_inter_<c> / eval_union_<c>`` is the dataset IoU of class ``c`` (:func:`dense_miou`)."""

    num_classes: int
    num_protected: int = 1
    label_smoothing: float = 0.0

    def forward(self, model, batch, cfg, reducers, rng, train: bool):
        import reduction as R

        out, aux = model(batch_images(batch, cfg), reducers=reducers, deterministic=not train, rng=rng, train=train,
                         return_source=True)
        if out.ndim != 3:
            raise ValueError(f"task='dense' needs per-token outputs [B, T, classes] (model.vit.pool='dense'), got "
                             f"shape {tuple(out.shape)}")
        source = aux["source"][:, self.num_protected:]
        dense = R.unmerge(out.astype(jnp.float32), source)             # [B, N, classes]
        return dense, dict(aux, covered=jnp.mean((source >= 0).astype(jnp.float32), axis=-1))

    def per_example(self, logits, batch, smoothing):
        labels = batch["patch_labels"].astype(jnp.int32)
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"patch_labels has shape {tuple(labels.shape)} but the model gives {logits.shape[1]} "
                             f"patches per image (data.patch must equal model.vit.patch_size)")
        targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, targets), axis=-1)
        pred = jnp.argmax(logits, -1)
        correct = jnp.mean((pred == labels).astype(jnp.float32), axis=-1)
        return loss, correct, pred, labels

    def loss(self, model, batch, cfg, reducers, rng):
        logits, aux = self.forward(model, batch, cfg, reducers, rng, True)
        loss, correct, _, _ = self.per_example(logits, batch, self.label_smoothing)
        return _with_reducers(jnp.mean(loss), {"accuracy": jnp.mean(correct)}, aux)

    def eval(self, model, batch, cfg, reducers):
        logits, aux = self.forward(model, batch, cfg, reducers, None, False)
        loss, correct, pred, labels = self.per_example(logits, batch, 0.0)
        loss, correct, *more = _eval_with_reducers(loss, correct, aux)
        extras = dict(more[0]) if more else {}
        extras["covered"] = aux["covered"]
        for c in range(self.num_classes):
            p, t = pred == c, labels == c
            extras[f"inter_{c}"] = jnp.sum(p & t, axis=-1).astype(jnp.float32)
            extras[f"union_{c}"] = jnp.sum(p | t, axis=-1).astype(jnp.float32)
        return loss, correct, extras


def dense_miou(record: Mapping[str, Any], num_classes: int, prefix: str = "eval_") -> float:
    """Dataset mIoU from an evaluation record of :class:`DenseTask`: the mean over the classes that occur (in the
    labels or the predictions) of ``inter_<c> / union_<c>``."""
    ious = [record[f"{prefix}inter_{c}"] / record[f"{prefix}union_{c}"] for c in range(num_classes)
            if record.get(f"{prefix}union_{c}", 0.0) > 0]
    return float(sum(ious) / len(ious)) if ious else float("nan")


def _with_reducers(task_loss, metrics: dict, aux):
    """Training: ``task_loss + reducer_loss`` and the reducer metrics (means), when the model has learned reducers."""
    if not (isinstance(aux, Mapping) and aux.get("reducer_aux")):
        return task_loss, metrics
    reducer_loss, extra = reducer_terms(aux)
    metrics = dict(metrics, ce_loss=task_loss, reducer_loss=reducer_loss)
    metrics.update({k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in extra.items()})
    return task_loss + reducer_loss, metrics


def _eval_with_reducers(loss, correct, aux):
    """Evaluation: the reducer metrics (but their ``loss``, 0 at inference) as per-example ``[B]`` extras."""
    _, extra = reducer_terms(aux)
    b = loss.shape[0]
    extras = {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,)) for k, v in extra.items()
              if not k.startswith("loss_L")}
    return (loss, correct, extras) if extras else (loss, correct)


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

    def forward(self, model, batch, cfg, train: bool = False):
        ids, valid = self.prompt(batch)
        logits, aux = model(ids, batch_images(batch, cfg), valid=valid, plan=self.plan, last_logits=True,
                            train=train)          # train: the mode of the VLM's learned reducers
        answer_logits = logits[:, -1, jnp.asarray(self.answer_ids)]
        return answer_logits.astype(jnp.float32), aux

    def per_example(self, logits, batch, smoothing):
        labels = batch["answer"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, len(self.answer_ids)), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
        return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

    def loss(self, model, batch, cfg, reducers, rng):
        logits, aux = self.forward(model, batch, cfg, train=True)
        loss, correct = self.per_example(logits, batch, self.label_smoothing)
        return _with_reducers(jnp.mean(loss), {"accuracy": jnp.mean(correct)}, aux)

    def eval(self, model, batch, cfg, reducers):
        logits, aux = self.forward(model, batch, cfg)
        loss, correct = self.per_example(logits, batch, 0.0)
        return _eval_with_reducers(loss, correct, aux)


@dataclasses.dataclass(frozen=True)
class ChatVQATask(VQATask):
    """VQA with a pretrained LLM: the prompt is the LM's chat template around the image and the question
    (:class:`data.chat_prompts.ChatPrompt`): ``[prefix P][image x K][question L]``, the question part left-padded
    with -1 (records' ``prompt``). The answer is scored at the last position over the first tokens of the answers
    (``answer_ids``, the LM's own vocabulary ids), so the LM's language knowledge is used as is."""

    prefix_ids: tuple = ()

    def prompt(self, batch):
        q = batch["prompt"].astype(jnp.int32)
        b = q.shape[0]
        pre = jnp.broadcast_to(jnp.asarray(self.prefix_ids, jnp.int32), (b, len(self.prefix_ids)))
        img = jnp.full((b, self.image_tokens), self.image_token_id, jnp.int32)
        ids = jnp.concatenate([pre, img, jnp.maximum(q, 0)], axis=1)
        valid = jnp.concatenate([jnp.ones((b, len(self.prefix_ids) + self.image_tokens), bool), q >= 0], axis=1)
        return ids, valid


def chat_answers(src, max_count: int) -> list[str]:
    """The answers a chat VQA task scores: every non-count answer and the counts ``0 .. max_count`` (counts are the
    tail of ``src.answers``, so label indices are unchanged)."""
    answers = list(src.answers)
    first_count = next(i for i, a in enumerate(answers) if a.isdigit())
    return answers[:first_count] + [a for a in answers[first_count:] if int(a) <= max_count]


def make_task(cfg, model) -> Any:
    if cfg.task == "classification":
        return ClassificationTask(num_classes=int(cfg.model.vit.num_classes),
                                  label_smoothing=float(cfg.train.label_smoothing), mix=mix_config(cfg))
    if cfg.task == "dense":
        if _get(cfg.model.vit, "pool", "token") != "dense":
            raise ValueError(f"task='dense' needs model.vit.pool='dense' (a head on every token), got "
                             f"{_get(cfg.model.vit, 'pool', 'token')!r}")
        return DenseTask(num_classes=int(cfg.model.vit.num_classes), num_protected=int(model.config.num_protected),
                         label_smoothing=float(cfg.train.label_smoothing))
    if cfg.task == "vqa" and _get(cfg.data, "tokenizer", ""):
        chat = data_lib.chat_prompt(cfg.data)
        src = data_lib.make_source(cfg.data, "train")
        answers = chat_answers(src, int(_get(cfg.data, "max_objects", 10)))
        plan = model.build_plan(reduction_spec_vlm(cfg))
        return ChatVQATask(answer_ids=chat.answer_ids(answers), question_len=chat.max_question_tokens,
                           image_tokens=model.num_image_tokens(plan), image_token_id=model.cfg.image_token_id,
                           plan=plan, label_smoothing=float(cfg.train.label_smoothing), prefix_ids=chat.prefix_ids)
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
    raise ValueError(f"task must be 'classification', 'dense' or 'vqa', got {cfg.task!r}")
