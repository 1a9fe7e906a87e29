"""Learned reducers as thin Flax NNX modules (the only Flax import under ``reduction/``).

``import reduction`` does not import this module; use ``from reduction.nnx import ATPModule``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reduction import atp
from reduction.validate import check_count, check_leading, check_rank


class ATPModule(nnx.Module):
    """ATP-style pruning at one LLM (or ViT) layer with an instance-wise learned threshold.

    A two-layer MLP maps pooled statistics of the scores (mean, std and max of the combined score over the
    candidates, mean self score, mean cross score; both raw received-attention means are multiplied by the
    candidate count so they are O(1)) to ``theta = sigmoid(mlp(features))`` in ``(0, 1)``, one per example.

    ``__call__(self_received [B, T], cross_received [B, T], candidates [B, T], *, train)`` returns:
      * ``train=True``: ``(mask [B, T], theta [B])`` soft mask (1 on non-candidates and the spatial grid);
      * ``train=False``: ``(keep_idx [B, capacity], valid [B, capacity], theta [B])`` hard pruning compacted
        to the static ``capacity``.

    Args:
      hidden: MLP width. capacity: static tokens kept at inference (shape of the compacted output).
      temperature: soft-mask sharpness (guess: 10, as a student re-implementation uses).
      spatial: optional static ``[T]`` bool mask of always-kept tokens (e.g. from
        :func:`reduction.atp.spatial_grid_mask` placed at the image span).
      self_weight: weight of the self-modality score in the combined score.
      init_theta: initial threshold (the output bias starts at ``logit(init_theta)``).
    """

    def __init__(self, *, capacity: int, hidden: int = 16, temperature: float = 10.0,
                 spatial: Optional[np.ndarray] = None, self_weight: float = 0.5, init_theta: float = 0.3,
                 rngs: nnx.Rngs):
        self.capacity = check_count(capacity, "capacity", allow_zero=False)
        self.temperature = float(temperature)
        self.self_weight = float(self_weight)
        self.spatial = None if spatial is None else tuple(bool(v) for v in np.asarray(spatial).reshape(-1))
        self.fc1 = nnx.Linear(5, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros_init(),
                              bias_init=nnx.initializers.constant(float(np.log(init_theta / (1 - init_theta)))),
                              rngs=rngs)

    def features(self, score, self_received, cross_received, candidates):
        """``[B, 5]`` pooled statistics over the candidates."""
        c = candidates.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(c, axis=-1), 1.0)
        mean = jnp.sum(score * c, axis=-1) / n
        std = jnp.sqrt(jnp.sum(((score - mean[:, None]) ** 2) * c, axis=-1) / n + 1e-12)
        mx = jnp.max(jnp.where(candidates, score, 0.0), axis=-1)
        ms = jnp.sum(self_received * c, axis=-1)
        mc = jnp.sum(cross_received * c, axis=-1)
        return jnp.stack([mean, std, mx, ms, mc], axis=-1)

    def threshold(self, score, self_received, cross_received, candidates):
        f = self.features(score, self_received, cross_received, candidates)
        return jax.nn.sigmoid(self.fc2(jax.nn.gelu(self.fc1(f)))[:, 0])

    def __call__(self, self_received: jax.Array, cross_received: jax.Array, candidates: jax.Array, *,
                 train: bool):
        check_rank(self_received, 2, "self_received")
        b, t = self_received.shape
        check_leading(cross_received, (b, t), "cross_received", "self_received")
        check_leading(candidates, (b, t), "candidates", "self_received")
        candidates = candidates.astype(bool)
        forced = None
        if self.spatial is not None:
            if len(self.spatial) != t:
                raise ValueError(f"spatial mask has {len(self.spatial)} entries, inputs have T={t}")
            forced = jnp.asarray(np.array(self.spatial)) & candidates
        score = atp.redundancy_score(self_received, cross_received, candidates, self_weight=self.self_weight)
        theta = self.threshold(score, self_received.astype(jnp.float32), cross_received.astype(jnp.float32),
                               candidates)
        if train:
            mask = atp.soft_keep_mask(score, theta, temperature=self.temperature, forced=forced,
                                      candidates=candidates)
            return mask, theta
        keep = atp.hard_keep_mask(score, theta, forced=forced, candidates=candidates)
        forced_all = ~candidates if forced is None else forced | ~candidates
        idx, valid = atp.compact_keep(keep, score, capacity=self.capacity, forced=forced_all)
        return idx, valid, theta


__all__ = ["ATPModule"]
