"""LLaVA-1.5 connector: token reduction on the vision features, the MLP projector, and the placement of image
tokens into the text stream.

Reduction point (b) of the VLM acts here, on the vision tower's output features before the projector, with any
registered method that runs at the ``"connector"`` point (:func:`reduction.available_methods`): the reducers come
from the same spec as everywhere (``build_layer_reducers(1, spec, point="connector")``), see the features as their
metric, keys and hidden states, and protect only the leading tokens the tower marks (a class token it passes
on). A method given an absolute target ``keep`` whose single
pass is capped (ToMe and PiToMe merge at most half the tokens per pass) is applied again until it reaches it.

Placement (MaxText style, static shapes): the prompt ids hold one placeholder id per image token; for
every example the ``i``-th placeholder receives the ``i``-th image embedding (``cumsum`` of the
placeholder mask, a gather and ``jnp.where``), so image spans may sit anywhere and differ per example.

Dimension vocabulary: B batch, N vision tokens, K tokens after reduction, C channels, T text tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reduction.reducers import HIDDEN, KEYS, METRIC, LayerInfo, Reducer
from reduction.state import TokenState, init_state
from reduction.validate import check_rank

MAX_PASSES = 64


def _passes(reducer: Reducer, num_tokens: int, num_protected: int = 0) -> list[int]:
    """Token counts entering each application of ``reducer`` at the connector (static)."""
    info = LayerInfo(num_protected=num_protected)
    counts, t = [], num_tokens
    repeat = getattr(reducer, "keep", None) is not None
    while len(counts) < MAX_PASSES:
        out = reducer.num_out(t, info)
        if out >= t:
            break
        counts.append(t)
        t = out
        if not repeat:
            break
    return counts


def connector_num_out(reducers: Optional[Sequence[Optional[Reducer]]], num_tokens: int,
                      num_protected: int = 0) -> int:
    """Static output count of the connector reducers for ``num_tokens`` vision tokens (the first
    ``num_protected`` of them, e.g. a class token the tower passes on, are kept)."""
    t = num_tokens
    for red in reducers or ():
        if red is not None:
            for _ in _passes(red, t, num_protected):
                t = red.num_out(t, LayerInfo(num_protected=num_protected))
    return t


def connector_flops(reducers: Optional[Sequence[Optional[Reducer]]], num_tokens: int, num_protected: int = 0, *,
                    dim: int) -> int:
    """The connector reducers' own analytic FLOPs per image on ``num_tokens`` vision features of width ``dim``
    (every application at the count it sees; a ``keep`` target repeats the method until it is reached)."""
    total, t = 0, num_tokens
    info = LayerInfo(num_protected=num_protected)
    for red in reducers or ():
        if red is not None:
            for t_in in _passes(red, t, num_protected):
                total += int(red.flops(t_in, dim=dim, heads=1))
                t = red.num_out(t_in, info)
    return total


def connector_reduce(reducers: Optional[Sequence[Optional[Reducer]]], feats: jax.Array,
                     rng: Optional[jax.Array] = None, num_protected: int = 0,
                     valid: Optional[jax.Array] = None) -> TokenState:
    """``feats: [B, N, C] -> TokenState`` with ``x: [B, K, C]`` (sizes; positions = patch indices). ``valid [B, N]``:
    the tower's validity (a capacity-padded reducer in the tower); invalid features stay invalid."""
    check_rank(feats, 3, "feats")
    state = init_state(feats, valid=None if valid is None else valid.astype(bool))
    for layer, red in enumerate(reducers or ()):
        if red is None:
            continue
        for _ in _passes(red, state.num_tokens, num_protected):
            x = state.x
            needs = red.needs
            info = LayerInfo(layer=layer, num_layers=len(reducers), num_protected=num_protected,
                             metric=x if METRIC in needs else None, keys=x if KEYS in needs else None,
                             hidden=x if HIDDEN in needs else None,
                             rng=None if rng is None else jax.random.fold_in(rng, layer))
            state = red(state, info)
    return state


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


__all__ = ["connector_reduce", "connector_num_out", "Projector", "place_image_tokens", "image_starts_from_mask"]
