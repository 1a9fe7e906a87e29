"""Honest baselines for token pruning, all on :class:`TokenState` + :class:`ReductionStep`.

Registered reducers (one spec key per layer list, see :func:`reduction.build_layer_reducers`):

* ``"random"``    -- keep a uniformly random subset of the unprotected tokens (seeded).
* ``"topk_cls"``  -- EViT-style: keep the tokens receiving the most attention from the class token
  (token 0), averaged over heads. A point without a class token (``LayerInfo.has_class_token``) or
  attention over another token count than the state raises ``ValueError`` at trace time.
* ``"fastv"``     -- in the LLM: keep the image tokens receiving the most attention from the last prompt token
  (FastV, Chen et al., ECCV 2024; ``LayerInfo.text_attention``).
* ``"pool"``      -- spatial average pooling of the token grid with window = stride = ``k``: a real merge
  (sizes add up, source map tracked).

All keep counts are static (:func:`reduction.reducers.pruned_count`). Protected tokens (class,
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

from reduction._compiled import eager_jit
from reduction.spans import check_concrete_spans
from reduction import flops as flops_lib
from reduction.reducers import (ATTENTION, TEXT_ATTENTION, LayerInfo, Reducer, candidates_kept, pruned_count,
                                register)
from reduction.spans import (assemble as _assemble, check_span_bounds as _check_span_bounds,
                             check_starts as _check_starts, require_spans, span_keep_indices)
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, merge_step, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio


# -- generic top-k pruning -------------------------------------------------------------------------------


@eager_jit
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


@eager_jit
def random_keep_indices(rng: jax.Array, batch: int, num_tokens: int, *, keep: int, num_protected: int = 0,
                        valid: Optional[jax.Array] = None) -> jax.Array:
    """Uniformly random kept subset per example (protected prefix always kept): ``[B, keep]`` int32."""
    scores = jax.random.uniform(rng, (batch, num_tokens))
    return topk_keep_indices(scores, keep=keep, num_protected=num_protected, valid=valid)


# -- FastV (VLM contract) ----------------------------------------------------------------------------------


def _check_fastv_spans(attention, *, image_starts, image_len, **_):
    """Eager value check (reduction._compiled): the image spans lie inside the sequence."""
    if getattr(attention, "ndim", 0) == 4:
        check_concrete_spans(image_starts, image_len, attention.shape[3], attention.shape[0])


@eager_jit(check=_check_fastv_spans)
def fastv_keep_indices(attention: jax.Array, *, image_starts: jax.Array, image_len: int, budget: int,
                       valid: Optional[jax.Array] = None) -> jax.Array:
    """FastV's kept positions: image tokens ranked by the attention they receive from the last valid
    query, averaged over heads (as in the FastV reference, which reads row ``-1`` of layer ``K - 1``).

    Args:
      attention: ``[B, H, T, T]`` probabilities of layer ``K - 1``, or ``[B, H, Tq, T]`` rows for the last
        ``Tq`` positions (row ``r`` is position ``T - Tq + r``).
      image_starts: ``[B]`` or ``[B, M]`` int32 (traced) span starts, each span inside ``[0, T)``
        (:func:`reduction.spans.check_span_bounds`: concrete starts outside raise, traced ones are clipped);
        image_len: static span length.
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
    starts = _check_span_bounds(starts, image_len, t)
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


@eager_jit
def pool_tokens(state: TokenState, *, k: int, num_protected: int = 1,
                grid: Optional[tuple[int, int]] = None) -> TokenState:
    """Pool a token grid: ``x: [B, P + h*w, C] -> [B, P + ceil(h/k)*ceil(w/k), C]``; sizes add up (a window
    of ``k x k`` unit tokens gets size ``k*k``), features are size-weighted means. Differentiable in ``x``."""
    check_rank(state.x, 3, "state.x")
    step = pool_step(state.x.shape[0], state.num_tokens, k=k, num_protected=num_protected, grid=grid)
    return apply_step(state, step)


# -- reducers ----------------------------------------------------------------------------------------------


def _span_topk(scores: jax.Array, info: LayerInfo, kept: int) -> jax.Array:
    """Keep indices of the ``kept`` highest-scoring tokens of each image span (every other token kept)."""
    s = jnp.where(jnp.isnan(scores), -jnp.inf, jax.lax.stop_gradient(scores).astype(jnp.float32))
    return span_keep_indices(lambda span: jax.lax.top_k(span, kept)[1], s, info.image_starts,
                             image_len=info.image_len, kept=kept)


@dataclasses.dataclass(frozen=True)
class RandomPrune(Reducer):
    """Seeded random pruning of the candidates. Uses ``info.rng`` when given, else ``fold_in(key(seed), layer)``."""

    keep_ratio: float = 0.7
    keep: Optional[int] = None
    seed: int = 0
    spans: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        rng = info.rng if info.rng is not None else jax.random.fold_in(jax.random.key(self.seed), info.layer)
        b, t = state.x.shape[:2]
        if info.in_spans:
            kept = candidates_kept(info.image_len, self.keep_ratio, self.keep)
            idx = _span_topk(jax.random.uniform(rng, (b, t)), info, kept)
        else:
            idx = random_keep_indices(rng, b, t, keep=self.num_out(t, info), num_protected=info.num_protected,
                                      valid=state.valid)
        return prune_step(idx, t)


@dataclasses.dataclass(frozen=True)
class TopKCls(Reducer):
    """EViT-style: keep the tokens the class token attends to most (mean over heads). Needs a class token
    (:meth:`LayerInfo.require_class_token`) and attention over exactly the state's tokens."""

    keep_ratio: float = 0.7
    keep: Optional[int] = None
    needs: ClassVar[frozenset] = frozenset({ATTENTION})

    def _info(self, info: LayerInfo) -> LayerInfo:
        return dataclasses.replace(info, num_protected=max(info.num_protected, 1))

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, self._info(info), self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        info.require_class_token("topk_cls")
        attention = info.require(ATTENTION, "topk_cls")
        check_rank(attention, 4, "attention")
        b, t = state.x.shape[:2]
        if attention.shape[0] != b or attention.shape[2:] != (t, t):
            raise ValueError(f"topk_cls: attention has shape {tuple(attention.shape)}; it must be [B, H, T, T] "
                             f"over the state's {t} tokens (B={b})")
        scores = cls_attention_scores(attention)
        idx = topk_keep_indices(scores, keep=self.num_out(state.num_tokens, info),
                                num_protected=max(info.num_protected, 1), valid=state.valid)
        return prune_step(idx, state.num_tokens)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.attention_score_flops(1, num_tokens, heads)


@dataclasses.dataclass(frozen=True)
class FastV(Reducer):
    """FastV (Chen et al., ECCV 2024) in the LLM: keep the image tokens the last prompt token attends to most in
    layer ``K - 1`` (heads averaged); only that attention row is materialised (:func:`fastv_keep_indices`)."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    needs: ClassVar[frozenset] = frozenset({TEXT_ATTENTION})
    spans: ClassVar[bool] = True
    text_rows: ClassVar[int] = 1

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        require_spans(info, "fastv")
        kept = candidates_kept(info.image_len, self.keep_ratio, self.keep)
        idx = fastv_keep_indices(info.require(TEXT_ATTENTION, "fastv"), image_starts=info.image_starts,
                                 image_len=info.image_len, budget=kept, valid=state.valid)
        return prune_step(idx, state.num_tokens)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class Pool(Reducer):
    """Spatial average pooling of the token grid (window = stride = ``k``), a size-tracked merge.
    Only meaningful while tokens are still in grid order (use it at the first reducing layer)."""

    k: int = 2
    grid: Optional[tuple] = None
    prop_attn: ClassVar[bool] = True

    def _grid(self, num_tokens: int, info: LayerInfo) -> tuple:
        n = num_tokens - info.num_protected
        return self.grid if self.grid is not None else (int(round(np.sqrt(n))),) * 2

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        oh, ow = pool_grid_out(*self._grid(num_tokens, info), self.k)
        return info.num_protected + oh * ow

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        return pool_step(state.x.shape[0], state.num_tokens, k=self.k, num_protected=info.num_protected,
                         grid=self.grid)


def _keep_args(keep_ratio, keep) -> dict:
    check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        check_count(keep, "keep", allow_zero=False)
    return dict(keep_ratio=float(keep_ratio), keep=None if keep is None else int(keep))


def _at_layers(num_layers: int, layers: Sequence[int], reducer: Reducer) -> list[Optional[Reducer]]:
    chosen = set(layers)
    return [reducer if i in chosen else None for i in range(num_layers)]


@register("random", points=("vit", "vision", "connector", "llm"))
def _random_layers(num_layers: int, keep_ratio: float = 0.7, keep: Optional[int] = None, seed: int = 0,
                   layers=None) -> list[Optional[Reducer]]:
    """Random pruning: keep a seeded uniform subset of the candidates."""
    return _at_layers(num_layers, layers, RandomPrune(seed=int(seed), **_keep_args(keep_ratio, keep)))


@register("topk_cls", points=("vit", "vision"))
def _topk_cls_layers(num_layers: int, keep_ratio: float = 0.7, keep: Optional[int] = None,
                     layers=None) -> list[Optional[Reducer]]:
    """EViT-style top-k by class-token attention."""
    return _at_layers(num_layers, layers, TopKCls(**_keep_args(keep_ratio, keep)))


@register("fastv", points=("llm",))
def _fastv_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                  layers=None) -> list[Optional[Reducer]]:
    """FastV: image tokens by attention from the last prompt token, before LLM layer ``K`` (default 2)."""
    return _at_layers(num_layers, layers, FastV(**_keep_args(keep_ratio, keep)))


@register("pool", points=("vit", "vision", "connector"), layers="first")
def _pool_layers(num_layers: int, k: int = 2, grid: Optional[Sequence[int]] = None,
                 layers=None) -> list[Optional[Reducer]]:
    """Spatial ``k x k`` average pooling of the patch grid (at the first layer of ``layers``, default 0)."""
    check_count(k, "k", allow_zero=False)
    g = None if grid is None else tuple(int(v) for v in grid)
    if len(layers) != 1:
        raise ValueError(f"pool acts at one layer (the grid is gone after it), got layers={list(layers)}")
    return _at_layers(num_layers, layers, Pool(k=int(k), grid=g))


__all__ = [
    "topk_keep_indices",
    "cls_attention_scores",
    "random_keep_indices",
    "fastv_keep_indices",
    "pool_step",
    "pool_tokens",
    "pool_grid_out",
    "RandomPrune",
    "TopKCls",
    "FastV",
    "Pool",
]
