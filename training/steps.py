"""One pure ``train_step(state, batch, rng) -> (state, metrics)`` and ``eval_step``: the model is split once
(``nnx.split``) and merged inside the jitted step; the state is donated."""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx




log = logging.getLogger("tokenreduce.train")


# -- steps --------------------------------------------------------------------------------------------------


def _global_norm(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(graphdef, task, tx, cfg, reducers, schedule) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, pure; ``state`` = ``{"params", "rest", "opt",
    "step"}`` where ``params``/``rest`` are the :func:`nnx.split` parts of the model, plus ``"ema"`` (the
    parameters' moving average, updated after each step) when ``train.ema_decay > 0``."""

    freezes = bool(cfg.optim.frozen or cfg.optim.trainable)
    ema_decay = float(cfg.train.ema_decay) if "ema_decay" in cfg.train else 0.0

    def loss_fn(params, rest, batch, rng):
        if freezes:  # no gradient flows into frozen weights: their weight-gradient matmuls are never computed
            from training.optim import trainable_labels

            params = jax.tree.map(lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params,
                                  trainable_labels(params, cfg))
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = task.loss(model, batch, cfg, reducers, rng)
        return loss, metrics

    def train_step(state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["rest"], batch, rng)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads), update_norm=_global_norm(updates),
                       param_norm=_global_norm(params), lr=schedule(state["step"]))
        new = {"params": params, "rest": state["rest"], "opt": opt, "step": state["step"] + 1}
        if "ema" in state:   # train.ema_decay > 0: the parameters' moving average (training.recipe.ema_update)
            from training.recipe import ema_update

            new["ema"] = ema_update(state["ema"], params, ema_decay)
        return new, metrics

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
