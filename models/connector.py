"""LLaVA-1.5 connector: optional token reduction on vision features, the MLP projector, and the
placement of image tokens into the text stream.

Reduction point (b) of the VLM acts here, on the vision tower's output features before the projector:

* ``"pool"``: ``k x k`` average pooling of the patch grid (ceil mode, :func:`reduction.baselines.pool_tokens`);
* ``"tome"``: bipartite soft matching (:func:`reduction.tome_merge`) on the features themselves, repeated
  with ``r`` clamped to half the tokens until ``keep`` tokens remain;
* ``"pitome"``: PiToMe energy-guided merging, passes of ratio ``max(keep / T, 0.5)`` until about ``keep``
  tokens remain (PiToMe's floor rule may leave one more; :meth:`ConnectorReduction.num_out` is exact);
* ``"dart"``: DART-style duplicate removal on the vision tokens (:func:`reduction.dart.dart_vit_keep_indices`).

Placement (MaxText style, static shapes): the prompt ids hold one placeholder id per image token; for
every example the ``i``-th placeholder receives the ``i``-th image embedding (``cumsum`` of the
placeholder mask, a gather and ``jnp.where``), so image spans may sit anywhere and differ per example.

Dimension vocabulary: B batch, N vision tokens, K tokens after reduction, C channels, T text tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from reduction.state import TokenState, init_state
from reduction.step import apply_step, prune_step
from reduction.tome import merged_tokens, tome_merge
from reduction.validate import check_count, check_rank

METHODS = ("none", "pool", "tome", "pitome", "dart")


@dataclasses.dataclass(frozen=True)
class ConnectorReduction:
    """Static description of the connector-side reduction (hashable).

    ``k``: pool window; ``keep``: output tokens for ``tome``/``pitome``/``dart``; ``grid``: the patch grid
    ``(h, w)`` (default: square); ``margin``: PiToMe's energy margin.
    """

    method: str = "none"
    k: int = 2
    keep: int = 0
    grid: Optional[tuple] = None
    margin: float = 0.5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"connector reduction method must be one of {METHODS}, got {self.method!r}")
        check_count(self.k, "k", allow_zero=False)
        check_count(self.keep, "keep")
        if self.method in ("tome", "pitome", "dart") and self.keep == 0:
            raise ValueError(f"keep must be >= 1 for connector method {self.method!r}")

    def _grid(self, n: int) -> tuple:
        if self.grid is not None:
            return tuple(self.grid)
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"grid must be given: {n} vision tokens are not a square grid")
        return side, side

    def _tome_passes(self, n: int) -> list:
        rs, t = [], n
        while t > self.keep:
            r = min(t - self.keep, t // 2)
            if r == 0:
                break
            rs.append(r)
            t = merged_tokens(t, r)
        return rs

    def _pitome_ratios(self, n: int) -> list:
        from reduction.pitome import pitome_merged_tokens

        ratios, t = [], n
        while t > self.keep:
            ratio = max(self.keep / t, 0.5)
            nxt = pitome_merged_tokens(t, ratio, num_protected=0)
            if nxt == t:
                break
            ratios.append(ratio)
            t = nxt
        return ratios

    def num_out(self, n: int) -> int:
        """Static output count for ``n`` input tokens."""
        if self.method == "none":
            return n
        if self.method == "pool":
            h, w = self._grid(n)
            return -(-h // self.k) * -(-w // self.k)
        if self.keep > n:
            raise ValueError(f"keep={self.keep} exceeds the {n} vision tokens")
        if self.method == "tome":
            t = n
            for r in self._tome_passes(n):
                t = merged_tokens(t, r)
            return t
        if self.method == "pitome":
            from reduction.pitome import pitome_merged_tokens

            t = n
            for ratio in self._pitome_ratios(n):
                t = pitome_merged_tokens(t, ratio, num_protected=0)
            return t
        return self.keep

    def __call__(self, feats: jax.Array) -> TokenState:
        """``feats: [B, N, C] -> TokenState`` with ``x: [B, K, C]`` (sizes, positions = patch indices)."""
        check_rank(feats, 3, "feats")
        n = feats.shape[1]
        state = init_state(feats)
        if self.method == "none":
            return state
        if self.method == "pool":
            from reduction.baselines import pool_tokens

            return pool_tokens(state, k=self.k, num_protected=0, grid=self._grid(n))
        if self.method == "tome":
            for r in self._tome_passes(n):
                state = tome_merge(state, state.x, r=r)
            return state
        if self.method == "pitome":
            from reduction.pitome import pitome_merge

            for ratio in self._pitome_ratios(n):
                state = pitome_merge(state, state.x, ratio=ratio, margin=self.margin, num_protected=0)
            return state
        from reduction.dart import dart_vit_keep_indices

        idx = dart_vit_keep_indices(feats, keep=self.keep, num_protected=0)
        return apply_step(state, prune_step(idx, n))


class Projector(nnx.Module):
    """LLaVA-1.5 ``mlp2x_gelu``: ``Linear(Cv, C) -> GELU (exact) -> Linear(C, C)``: ``[..., Cv] -> [..., C]``."""

    def __init__(self, vision_dim: int, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(vision_dim, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def _place_one(text: jax.Array, image: jax.Array, is_image: jax.Array) -> jax.Array:
    """``text: [T, C]``, ``image: [K, C]``, ``is_image: [T]`` -> ``[T, C]``."""
    idx = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32)) - 1, 0, image.shape[0] - 1)
    return jnp.where(is_image[:, None], image[idx].astype(text.dtype), text)


def place_image_tokens(text: jax.Array, image: jax.Array, is_image: jax.Array) -> jax.Array:
    """Write image embeddings into the placeholder slots of the text embeddings.

    ``text: [B, T, C]``, ``image: [B, K, C]``, ``is_image: [B, T]`` bool with (normally) ``K`` placeholders per
    example -> ``[B, T, C]``. Extra placeholders reuse the last image token; missing ones leave image tokens
    unused (callers build ids with exactly ``K``, see :func:`models.vlm.build_prompts`).
    """
    check_rank(text, 3, "text")
    check_rank(image, 3, "image")
    check_rank(is_image, 2, "is_image")
    return jax.vmap(_place_one)(text, image, is_image)


def image_starts_from_mask(is_image: jax.Array, num_images: int = 1, image_len: Optional[int] = None) -> jax.Array:
    """First position of each image span: ``is_image: [B, T]`` -> ``[B]`` (one image) or ``[B, M]``.

    With several images per example the spans are the consecutive runs of ``image_len`` placeholders."""
    if num_images == 1:
        return jnp.argmax(is_image, axis=1).astype(jnp.int32)
    if image_len is None:
        raise ValueError("image_len is required for num_images > 1")
    t = is_image.shape[1]
    rank = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
    starts_mask = is_image & (rank % image_len == 0)
    order = jnp.argsort(~starts_mask, axis=1, stable=True)[:, :num_images]
    return jnp.minimum(order, t - 1).astype(jnp.int32)


__all__ = ["ConnectorReduction", "Projector", "place_image_tokens", "image_starts_from_mask", "METHODS"]
