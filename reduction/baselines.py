"""Honest baselines for token pruning, all on :class:`TokenState` + :class:`ReductionStep`.

Registered reducers (one spec key per layer list, see :func:`reduction.build_layer_reducers`):

* ``"random"``    -- keep a uniformly random subset of the unprotected tokens (seeded).
* ``"topk_cls"``  -- EViT-style: keep the tokens receiving the most attention from the class token
  (token 0), averaged over heads.
* ``"topk_text"`` -- keep the tokens receiving the most attention from text queries (mean over heads and
  queries of ``LayerInfo.text_attention``); ``"fastv"`` is the same with only the last text query.
* ``"pool"``      -- spatial average pooling of the token grid with window = stride = ``k``: a real merge
  (sizes add up, source map tracked).

All keep counts are static: ``keep_count(T, keep_ratio, protected=P)``. Protected tokens (class,
distillation, registers: the first ``P``) always survive and kept tokens stay in their original order.
Invalid tokens (``state.valid == False``) rank below every valid one, so they are dropped first.

For VLMs, :func:`fastv_keep_indices` is the FastV selection (Chen et al., ECCV 2024) in the same
contract as :func:`reduction.dart.dart_keep_indices`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reduction import flops as flops_lib
from reduction.dart import _assemble, _check_starts, _layer_list
from reduction.reducers import ATTENTION, LayerInfo, Reducer, register
from reduction.schedule import keep_count
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, merge_step, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio


# -- generic top-k pruning -------------------------------------------------------------------------------


def topk_keep_indices(scores: jax.Array, *, keep: int, num_protected: int = 0,
                      valid: Optional[jax.Array] = None) -> jax.Array:
    """Keep the protected prefix plus the highest-scoring other tokens.

    ``scores: [B, T]`` (any float; compared in float32, NaN ranks lowest), ``valid: [B, T]`` or ``None``
    -> ``keep_idx: [B, keep]`` int32 ascending. Ties: lower index first. Invalid tokens rank below valid
    ones (and are only kept when fewer than ``keep`` valid tokens exist).
    """
    check_rank(scores, 2, "scores")
    b, t = scores.shape
    keep = check_count(keep, "keep", allow_zero=False)
    num_protected = check_count(num_protected, "num_protected")
    if keep > t:
        raise ValueError(f"keep={keep} exceeds the token count T={t}")
    if keep < num_protected:
        raise ValueError(f"keep={keep} is smaller than num_protected={num_protected}")
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "scores")
    s = jax.lax.stop_gradient(scores).astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    # Rank key: (valid, score) lexicographic via two stable sorts.
    order = jnp.argsort(-s, axis=-1, stable=True)
    if valid is not None:
        v = jnp.take_along_axis(valid.astype(bool), order, axis=-1)
        order = jnp.take_along_axis(order, jnp.argsort(~v, axis=-1, stable=True), axis=-1)
    is_prot = order < num_protected
    # Move protected tokens to the front, keeping the rank order of the rest.
    order = jnp.take_along_axis(order, jnp.argsort(~is_prot, axis=-1, stable=True), axis=-1)
    return jnp.sort(order[:, :keep], axis=-1).astype(jnp.int32)


def cls_attention_scores(attention: jax.Array, *, query: int = 0) -> jax.Array:
    """Attention each token receives from query ``query`` averaged over heads: ``[B, H, T, T] -> [B, T]``
    float32 (EViT's inattentive-token score)."""
    check_rank(attention, 4, "attention")
    return jnp.mean(attention[:, :, query, :].astype(jnp.float32), axis=1)


def text_attention_scores(text_attention: jax.Array, *, last_only: bool = False) -> jax.Array:
    """``[B, H, Tq, T] -> [B, T]`` float32: mean over heads and text queries (or the last query only)."""
    check_rank(text_attention, 4, "text_attention")
    a = text_attention.astype(jnp.float32)
    a = a[:, :, -1:, :] if last_only else a
    return jnp.mean(a, axis=(1, 2))


def random_keep_indices(rng: jax.Array, batch: int, num_tokens: int, *, keep: int, num_protected: int = 0,
                        valid: Optional[jax.Array] = None) -> jax.Array:
    """Uniformly random kept subset per example (protected prefix always kept): ``[B, keep]`` int32."""
    scores = jax.random.uniform(rng, (batch, num_tokens))
    return topk_keep_indices(scores, keep=keep, num_protected=num_protected, valid=valid)


# -- FastV (VLM contract) ----------------------------------------------------------------------------------


def fastv_keep_indices(attention: jax.Array, *, image_starts: jax.Array, image_len: int, budget: int,
                       valid: Optional[jax.Array] = None) -> jax.Array:
    """FastV's kept positions: image tokens ranked by the attention they receive from the last valid
    query, averaged over heads (as in the FastV reference, which reads row ``-1`` of layer ``K - 1``).

    Args:
      attention: ``[B, H, T, T]`` probabilities of layer ``K - 1``, or ``[B, H, Tq, T]`` rows for the last
        ``Tq`` positions (row ``r`` is position ``T - Tq + r``).
      image_starts: ``[B]`` or ``[B, M]`` int32 (traced) span starts; image_len: static span length.
      budget: static image tokens kept per image (clamped to ``image_len``; a ``UserWarning`` says so).
      valid: ``[B, T]`` bool or ``None``. The query row is the last valid position among the rows; if no
        valid position lies among the rows, the last row is used.

    Returns:
      ``keep_idx: [B, K]`` int32 ascending, ``K = T - M * (image_len - min(budget, image_len))``.
    """
    check_rank(attention, 4, "attention")
    b, _, tq, t = attention.shape
    if tq > t:
        raise ValueError(f"attention has {tq} query rows but only {t} keys")
    starts = _check_starts(image_starts, b)
    num_images = starts.shape[1]
    image_len = check_count(image_len, "image_len", allow_zero=False)
    budget = check_count(budget, "budget")
    if num_images * image_len > t:
        raise ValueError(f"image_len={image_len} x {num_images} images exceeds the sequence length T={t}")
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "attention")
    kept = min(budget, image_len)
    num_out = t - num_images * (image_len - kept)
    if kept >= image_len:
        warnings.warn(f"FastV budget={budget} keeps all {image_len} image tokens per image; nothing is pruned",
                      UserWarning, stacklevel=2)
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    row_valid = (jnp.ones((b, tq), bool) if valid is None else valid[:, t - tq:].astype(bool))
    last = tq - 1 - jnp.argmax(row_valid[:, ::-1], axis=-1)
    last = jnp.where(jnp.any(row_valid, axis=-1), last, tq - 1)
    rows = jnp.take_along_axis(attention, last[:, None, None, None], axis=2)[:, :, 0, :]      # [B, H, T]
    scores = jnp.mean(jax.lax.stop_gradient(rows).astype(jnp.float32), axis=1)                # [B, T]
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)

    def one(score_b, starts_b):
        def image(s):
            span = jax.lax.dynamic_slice_in_dim(score_b, s, image_len)
            _, idx = jax.lax.top_k(span, kept)
            return s + idx.astype(jnp.int32)

        return _assemble(starts_b, jax.vmap(image)(starts_b), image_len, t, num_out)

    return jax.vmap(one)(scores, starts)


# -- spatial pooling ----------------------------------------------------------------------------------------


def pool_grid_out(height: int, width: int, k: int) -> tuple[int, int]:
    """Output grid of ceil-mode pooling: ``(ceil(h / k), ceil(w / k))``."""
    return -(-height // k), -(-width // k)


def pool_step(batch: int, num_tokens: int, *, k: int, num_protected: int = 1,
              grid: Optional[tuple[int, int]] = None) -> ReductionStep:
    """Average-pooling plan as a merging step (data independent, so built with NumPy).

    The ``T - P`` unprotected tokens are a row-major ``h x w`` grid (default: square). Windows of ``k x k``
    with stride ``k``; when ``k`` does not divide ``h`` or ``w``, the last window row/column covers the
    remainder (ceil mode, like ``ceil_mode=True`` pooling without padding), so those outputs stand for
    fewer tokens. The anchor (position, validity) of each pooled token is its window's top-left token.
    Output: ``P + ceil(h/k) * ceil(w/k)`` tokens, protected first.
    """
    k = check_count(k, "k", allow_zero=False)
    num_protected = check_count(num_protected, "num_protected")
    n = num_tokens - num_protected
    if grid is None:
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ValueError(f"grid must be given: {n} unprotected tokens are not a square grid")
        grid = (side, side)
    h, w = (check_count(v, "grid", allow_zero=False) for v in grid)
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not match the {n} unprotected tokens")
    oh, ow = pool_grid_out(h, w, k)
    rows, cols = np.divmod(np.arange(n), w)
    slot = num_protected + (rows // k) * ow + (cols // k)
    assign = np.concatenate([np.arange(num_protected), slot]).astype(np.int32)
    orow, ocol = np.divmod(np.arange(oh * ow), ow)
    anchor = np.concatenate([np.arange(num_protected), num_protected + orow * k * w + ocol * k]).astype(np.int32)
    return merge_step(jnp.broadcast_to(jnp.asarray(assign), (batch, num_tokens)),
                      jnp.broadcast_to(jnp.asarray(anchor), (batch, anchor.shape[0])))


def pool_tokens(state: TokenState, *, k: int, num_protected: int = 1,
                grid: Optional[tuple[int, int]] = None) -> TokenState:
    """Pool a token grid: ``x: [B, P + h*w, C] -> [B, P + ceil(h/k)*ceil(w/k), C]``; sizes add up (a window
    of ``k x k`` unit tokens gets size ``k*k``), features are size-weighted means. Differentiable in ``x``."""
    check_rank(state.x, 3, "state.x")
    step = pool_step(state.x.shape[0], state.num_tokens, k=k, num_protected=num_protected, grid=grid)
    return apply_step(state, step)


# -- reducers ----------------------------------------------------------------------------------------------


def _prune(state: TokenState, idx: jax.Array) -> TokenState:
    return apply_step(state, prune_step(idx, state.num_tokens))


@dataclasses.dataclass(frozen=True)
class _KeepRatio(Reducer):
    keep_ratio: float = 0.7

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return keep_count(num_tokens, self.keep_ratio, protected=info.num_protected)


@dataclasses.dataclass(frozen=True)
class RandomPrune(_KeepRatio):
    """Seeded random pruning. Uses ``info.rng`` when given, else ``fold_in(key(seed), layer)``."""

    seed: int = 0

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        rng = info.rng if info.rng is not None else jax.random.fold_in(jax.random.key(self.seed), info.layer)
        idx = random_keep_indices(rng, state.x.shape[0], state.num_tokens, keep=self.num_out(state.num_tokens, info),
                                  num_protected=info.num_protected, valid=state.valid)
        return _prune(state, idx)


@dataclasses.dataclass(frozen=True)
class TopKCls(_KeepRatio):
    """EViT-style: keep the tokens the class token attends to most (mean over heads)."""

    needs: ClassVar[frozenset] = frozenset({ATTENTION})

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        if info.attention is None:
            raise ValueError("topk_cls needs info.attention ([B, H, T, T] probabilities)")
        idx = topk_keep_indices(cls_attention_scores(info.attention), keep=self.num_out(state.num_tokens, info),
                                num_protected=max(info.num_protected, 1), valid=state.valid)
        return _prune(state, idx)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return keep_count(num_tokens, self.keep_ratio, protected=max(info.num_protected, 1))

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.attention_score_flops(1, num_tokens, heads)


@dataclasses.dataclass(frozen=True)
class TopKText(_KeepRatio):
    """Keep the tokens text queries attend to most (``info.text_attention``: ``[B, H, Tq, T]``).
    ``last_only=True`` is FastV's rule (only the last text query)."""

    last_only: bool = False

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        if info.text_attention is None:
            raise ValueError("topk_text/fastv need info.text_attention ([B, H, Tq, T] from text queries)")
        check_leading(info.text_attention, (state.x.shape[0],), "info.text_attention", "state.x")
        if info.text_attention.shape[-1] != state.num_tokens:
            raise ValueError(f"info.text_attention covers {info.text_attention.shape[-1]} keys, state has "
                             f"{state.num_tokens} tokens")
        scores = text_attention_scores(info.text_attention, last_only=self.last_only)
        idx = topk_keep_indices(scores, keep=self.num_out(state.num_tokens, info),
                                num_protected=info.num_protected, valid=state.valid)
        return _prune(state, idx)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class Pool(Reducer):
    """Spatial average pooling of the token grid (window = stride = ``k``), a size-tracked merge.
    Only meaningful while tokens are still in grid order (use it at the first reducing layer)."""

    k: int = 2
    grid: Optional[tuple] = None
    prop_attn: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        n = num_tokens - info.num_protected
        h, w = self.grid if self.grid is not None else (int(round(np.sqrt(n))),) * 2
        oh, ow = pool_grid_out(h, w, self.k)
        return info.num_protected + oh * ow

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        return pool_tokens(state, k=self.k, num_protected=info.num_protected, grid=self.grid)


def _per_layer(num_layers: int, layers: Optional[Sequence[int]], make) -> list[Optional[Reducer]]:
    default = sorted({max(0, round(num_layers * f)) for f in (0.25, 0.5, 0.75)})
    chosen = set(_layer_list(num_layers, layers, default))
    return [make() if i in chosen else None for i in range(num_layers)]


@register("random")
def _random_layers(num_layers: int, keep_ratio: float = 0.7, layers: Optional[Sequence[int]] = None,
                   seed: int = 0) -> list[Optional[Reducer]]:
    check_ratio(keep_ratio, "keep_ratio")
    return _per_layer(num_layers, layers, lambda: RandomPrune(keep_ratio=keep_ratio, seed=int(seed)))


@register("topk_cls")
def _topk_cls_layers(num_layers: int, keep_ratio: float = 0.7,
                     layers: Optional[Sequence[int]] = None) -> list[Optional[Reducer]]:
    check_ratio(keep_ratio, "keep_ratio")
    return _per_layer(num_layers, layers, lambda: TopKCls(keep_ratio=keep_ratio))


@register("topk_text")
def _topk_text_layers(num_layers: int, keep_ratio: float = 0.7,
                      layers: Optional[Sequence[int]] = None) -> list[Optional[Reducer]]:
    check_ratio(keep_ratio, "keep_ratio")
    return _per_layer(num_layers, layers, lambda: TopKText(keep_ratio=keep_ratio))


@register("fastv")
def _fastv_layers(num_layers: int, keep_ratio: float = 0.5,
                  layers: Optional[Sequence[int]] = (2,)) -> list[Optional[Reducer]]:
    check_ratio(keep_ratio, "keep_ratio")
    return _per_layer(num_layers, layers, lambda: TopKText(keep_ratio=keep_ratio, last_only=True))


@register("pool")
def _pool_layers(num_layers: int, k: int = 2, layer: int = 0, grid: Optional[Sequence[int]] = None
                 ) -> list[Optional[Reducer]]:
    check_count(k, "k", allow_zero=False)
    layer = _layer_list(num_layers, [layer], [0])[0]
    g = None if grid is None else tuple(int(v) for v in grid)
    return [Pool(k=int(k), grid=g) if i == layer else None for i in range(num_layers)]


__all__ = [
    "topk_keep_indices",
    "cls_attention_scores",
    "text_attention_scores",
    "random_keep_indices",
    "fastv_keep_indices",
    "pool_step",
    "pool_tokens",
    "pool_grid_out",
    "RandomPrune",
    "TopKCls",
    "TopKText",
    "Pool",
]
