"""The optimizer of a run: AdamW, linear warm-up + cosine decay, global-norm clipping, frozen parameters
(``optim.frozen`` / ``optim.trainable`` regexes over parameter paths) via ``optax.multi_transform``, and per-path
update scales (``optim.lr_scales``)."""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import optax



from training.builders import _get, param_paths

log = logging.getLogger("tokenreduce.train")


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


def lr_scale_pairs(cfg) -> list[tuple[str, float]]:
    """``optim.lr_scales`` as ``[(regex, scale), ...]``: a mapping ``{regex: scale}`` or a sequence of pairs
    (default empty)."""
    raw = _get(cfg.optim, "lr_scales", ()) or ()
    items = list(raw.items()) if hasattr(raw, "items") else list(raw)
    pairs = []
    for item in items:
        if isinstance(item, str) or len(item) != 2:
            raise ValueError(f"optim.lr_scales must be (regex, scale) pairs, got {item!r} in {raw!r}")
        pattern, scale = item
        try:
            re.compile(str(pattern))
        except re.error as err:
            raise ValueError(f"optim.lr_scales: bad regex {pattern!r}: {err}") from err
        scale = float(scale)
        if not scale >= 0:
            raise ValueError(f"optim.lr_scales: scale for {pattern!r} must be >= 0, got {scale}")
        pairs.append((str(pattern), scale))
    return pairs


def build_optimizer(cfg, params) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw(schedule)`` on trainable parameters, zero updates on frozen ones.

    Weight decay applies to matrices only (not biases, norms, position embeddings or special tokens).
    ``optim.lr_scales``: ``(regex, scale)`` pairs; the (already clipped) updates of the parameters whose path matches
    a regex (``re.search``; the first matching pair wins) are multiplied by its scale, e.g. ``(("^learned/", 10.0),)``
    for learned reducers that must move faster than the backbone."""
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
    pairs = lr_scale_pairs(cfg)
    if pairs:
        scales = [next((s for p, s in pairs if re.search(p, n)), 1.0) for n in names]
        for scale in sorted(set(scales) - {1.0}):
            mask = jax.tree.unflatten(jax.tree.structure(params), [s == scale for s in scales])
            tx = optax.chain(tx, optax.masked(optax.scale(scale), mask))
        for p, _ in pairs:
            if not any(re.search(p, n) for n in names):
                log.warning("optim.lr_scales: %r matches no parameter (paths look like %s)", p, names[:3])
    return tx
