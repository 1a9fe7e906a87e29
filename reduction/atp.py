"""ATP-style adaptive token pruning (reconstructed from ATP-LLaVA, Ye et al., CVPR 2025).

No official code is public; this module is labelled **ATP-style**: it follows the paper's structure
(redundancy score from self- and cross-modality attention, spatial augmented pruning, instance-wise
thresholds, soft masks in training, hard pruning at inference, a budget loss) with this port's own
definitions, stated here:

* **received attention**: ``r[t] = sum_q w_q mean_h A[h, q, t] / sum_q w_q`` over a set of queries ``w``
  (:func:`received_attention`); the self score uses the candidate (image) tokens as queries and
  excludes each token's attention to itself, the cross score uses the text queries (in a ViT: the class
  token).
* **redundancy score** (:func:`redundancy_score`): each of the two scores divided by its maximum over the
  candidates, then ``self_weight * self + (1 - self_weight) * cross`` (default 0.5 / 0.5), so scores lie
  in ``[0, 1]`` and a threshold ``theta in (0, 1)`` is meaningful for any sequence length. High score =
  important (kept).
* **spatial augmented pruning**: a uniform grid of candidates (every ``stride``-th row and column, offset
  ``stride // 2``; :func:`spatial_grid_mask`) is always kept.
* **training**: soft mask ``m = sigmoid((score - theta) * temperature)`` (``temperature=10``), forced to 1 on
  the spatial grid; all tokens stay, the model gates them with ``m`` (e.g. ``log m`` as a key bias).
* **inference**: hard keep set ``score > theta`` or spatial or protected, compacted to a static
  ``capacity`` (:func:`compact_keep`): ``keep_idx [B, capacity]`` ascending plus ``valid [B, capacity]``.
  If more tokens pass than the capacity, the forced ones and then the highest scores win. Compiles once per
  capacity; per-example kept counts only change the mask.
* **budget loss** (:func:`budget_loss`): ``|mean_b sum_t m[b, t] - target|`` (or squared), the paper's
  ``L_target``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reduction import flops as flops_lib
from reduction.reducers import ATTENTION, LayerInfo, Reducer, pruned_count, register
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

_TINY = 1e-30


def received_attention(attention: jax.Array, query_weights: jax.Array, *, exclude_self: bool = False) -> jax.Array:
    """Attention each key receives from weighted queries, averaged over heads.

    ``attention: [B, H, Tq, T]``, ``query_weights: [B, Tq]`` (0/1 mask or weights) -> ``[B, T]`` float32.
    ``exclude_self`` (needs ``Tq == T``) drops each token's attention to itself. Differentiable.
    """
    check_rank(attention, 4, "attention")
    b, _, tq, t = attention.shape
    check_rank(query_weights, 2, "query_weights")
    check_leading(query_weights, (b, tq), "query_weights", "attention[:, 0, :, 0]")
    a = jnp.mean(attention.astype(jnp.float32), axis=1)                        # [B, Tq, T]
    w = query_weights.astype(jnp.float32)
    if exclude_self:
        if tq != t:
            raise ValueError(f"exclude_self needs square attention, got {tq} queries and {t} keys")
        a = a * (1.0 - jnp.eye(t, dtype=jnp.float32))
    return jnp.einsum("bq,bqt->bt", w, a) / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), _TINY)


def redundancy_score(self_received: jax.Array, cross_received: jax.Array, candidates: jax.Array, *,
                     self_weight: float = 0.5) -> jax.Array:
    """Combined ATP-style score ``[B, T]`` in ``[0, 1]`` (0 outside ``candidates``); see the module doc."""
    check_rank(self_received, 2, "self_received")
    check_leading(cross_received, self_received.shape, "cross_received", "self_received")
    check_leading(candidates, self_received.shape, "candidates", "self_received")
    c = candidates.astype(bool)

    def norm(s):
        s = jnp.where(c, s.astype(jnp.float32), 0.0)
        return s / jnp.maximum(jnp.max(s, axis=-1, keepdims=True), _TINY)

    return self_weight * norm(self_received) + (1.0 - self_weight) * norm(cross_received)


def spatial_grid_mask(height: int, width: int, stride: int) -> np.ndarray:
    """Static ``[height * width]`` bool: every ``stride``-th row and column, offset ``stride // 2``.
    ``stride=0`` disables spatial augmentation (all False)."""
    height = check_count(height, "height", allow_zero=False)
    width = check_count(width, "width", allow_zero=False)
    stride = check_count(stride, "stride")
    if stride == 0:
        return np.zeros(height * width, bool)
    rows = (np.arange(height) % stride) == (stride // 2) % min(stride, height)
    cols = (np.arange(width) % stride) == (stride // 2) % min(stride, width)
    return (rows[:, None] & cols[None, :]).reshape(-1)


def soft_keep_mask(score: jax.Array, theta: jax.Array, *, temperature: float = 10.0,
                   forced: Optional[jax.Array] = None, candidates: Optional[jax.Array] = None) -> jax.Array:
    """Training mask ``sigmoid((score - theta) * temperature)``: ``score [B, T]``, ``theta [B]`` or scalar.
    ``forced`` (``[T]`` or ``[B, T]`` bool) tokens get 1; non-``candidates`` get 1 (they are not pruned
    by ATP). Differentiable in ``score`` and ``theta``."""
    check_rank(score, 2, "score")
    theta = jnp.asarray(theta, jnp.float32)
    theta = theta[:, None] if theta.ndim == 1 else theta
    m = jax.nn.sigmoid((score.astype(jnp.float32) - theta) * temperature)
    if forced is not None:
        m = jnp.where(forced, 1.0, m)
    if candidates is not None:
        m = jnp.where(candidates, m, 1.0)
    return m


def hard_keep_mask(score: jax.Array, theta: jax.Array, *, forced: Optional[jax.Array] = None,
                   candidates: Optional[jax.Array] = None) -> jax.Array:
    """Inference keep set ``score > theta`` (or forced, or not a candidate): ``[B, T]`` bool."""
    check_rank(score, 2, "score")
    theta = jnp.asarray(theta, jnp.float32)
    theta = theta[:, None] if theta.ndim == 1 else theta
    keep = score.astype(jnp.float32) > theta
    if forced is not None:
        keep = keep | forced
    if candidates is not None:
        keep = keep | ~candidates.astype(bool)
    return keep


def compact_keep(keep: jax.Array, score: jax.Array, *, capacity: int,
                 forced: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Compact a dynamic keep set to a static capacity.

    ``keep, score: [B, T]`` -> ``(keep_idx [B, capacity] int32 ascending, valid [B, capacity] bool)``.
    Priority (stable argsort): forced tokens, then kept tokens by descending score, then the rest; the
    chosen indices are sorted back to their original order and ``valid`` says which were kept.
    """
    check_rank(keep, 2, "keep")
    b, t = keep.shape
    check_leading(score, (b, t), "score", "keep")
    capacity = check_count(capacity, "capacity", allow_zero=False)
    if capacity > t:
        raise ValueError(f"capacity={capacity} exceeds the token count T={t}")
    s = jnp.where(jnp.isnan(score), -jnp.inf, jax.lax.stop_gradient(score).astype(jnp.float32))
    key = jnp.where(keep, -s, jnp.inf)
    if forced is not None:
        key = jnp.where(forced, -jnp.inf, key)
    order = jnp.argsort(key, axis=-1, stable=True)[:, :capacity]
    idx = jnp.sort(order, axis=-1).astype(jnp.int32)
    return idx, jnp.take_along_axis(keep, idx, axis=-1)


def budget_loss(mask: jax.Array, target: float, *, candidates: Optional[jax.Array] = None,
                kind: str = "abs") -> jax.Array:
    """``L_target``: distance between the mean kept count (sum of the soft mask over candidates) and
    ``target``. ``mask: [B, T]`` -> scalar float32; ``kind`` is ``"abs"`` or ``"square"``."""
    check_rank(mask, 2, "mask")
    if kind not in ("abs", "square"):
        raise ValueError(f"kind must be 'abs' or 'square', got {kind!r}")
    m = mask.astype(jnp.float32)
    if candidates is not None:
        m = jnp.where(candidates, m, 0.0)
    diff = jnp.mean(jnp.sum(m, axis=-1)) - target
    return jnp.abs(diff) if kind == "abs" else diff * diff


def vit_atp_inputs(attention: jax.Array, candidates: jax.Array, *, self_weight: float = 0.5
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ATP-style score inputs in a ViT: ``attention: [B, H, T, T]``, ``candidates: [B, T]`` bool ->
    ``(self_received, cross_received, score)``, each ``[B, T]`` float32. Self = attention from the
    candidate tokens (each token's attention to itself excluded), cross = attention from the class token
    (token 0); ``score`` is :func:`redundancy_score` (0 outside the candidates)."""
    check_rank(attention, 4, "attention")
    b = attention.shape[0]
    self_r = received_attention(attention, candidates.astype(jnp.float32), exclude_self=True)
    cross_r = received_attention(attention[:, :, :1, :], jnp.ones((b, 1), jnp.float32))
    return self_r, cross_r, redundancy_score(self_r, cross_r, candidates, self_weight=self_weight)


def vit_atp_scores(attention: jax.Array, *, num_protected: int = 1, self_weight: float = 0.5) -> jax.Array:
    """ATP-style score in a ViT: self = attention from the other patch tokens, cross = attention from the
    class token. ``attention: [B, H, T, T] -> [B, T]`` (0 on protected tokens)."""
    check_rank(attention, 4, "attention")
    b, _, t, _ = attention.shape
    cand = jnp.broadcast_to(jnp.arange(t) >= num_protected, (b, t))
    return vit_atp_inputs(attention, cand, self_weight=self_weight)[2]


def patch_grid_mask(num_tokens: int, num_protected: int, stride: int) -> np.ndarray:
    """Static ``[T]`` bool: :func:`spatial_grid_mask` over the patch tokens of a ViT layer (the leading
    ``num_protected`` tokens are False). Only when the ``T - num_protected`` patches still form a square grid
    (no earlier reduction); otherwise all False."""
    n = num_tokens - num_protected
    side = int(round(np.sqrt(max(n, 0))))
    grid = spatial_grid_mask(side, side, stride) if n > 0 and side * side == n else np.zeros(max(n, 0), bool)
    return np.concatenate([np.zeros(num_protected, bool), grid])


def threshold_prune_step(score: jax.Array, theta, *, forced: jax.Array, capacity: int,
                         valid: Optional[jax.Array] = None) -> ReductionStep:
    """Hard ATP pruning as a step: keep ``score > theta`` plus ``forced`` (``[T]`` or ``[B, T]``), compacted to the
    static ``capacity`` (:func:`compact_keep`). ``score: [B, T]`` -> a step to ``capacity`` slots whose ``valid``
    marks the slots of examples that keep fewer (tokens already invalid in ``valid`` are never kept)."""
    t = score.shape[1]
    if valid is not None:
        forced = forced & valid
    keep = hard_keep_mask(score, theta, forced=forced)
    if valid is not None:
        keep = keep & valid
    idx, kept = compact_keep(keep, score, capacity=capacity, forced=forced)
    return prune_step(idx, t, valid=kept)


def span_atp_scores(attention: jax.Array, image_starts: jax.Array, image_len: int, valid: Optional[jax.Array], *,
                    self_weight: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """ATP-style score of the image tokens of a sequence (one image per example): self = attention from the other
    image tokens, cross = attention from the valid text after the image. ``attention: [B, H, T, T]``,
    ``image_starts: [B]`` -> ``(score [B, T], is_image [B, T])``."""
    check_rank(attention, 4, "attention")
    if image_starts.ndim != 1:
        raise ValueError("ATP in the LLM supports one image per example (image_starts [B])")
    t = attention.shape[-1]
    pos = jnp.arange(t)[None]
    image = (pos >= image_starts[:, None]) & (pos < image_starts[:, None] + image_len)
    after = pos >= image_starts[:, None] + image_len
    text_after = after if valid is None else after & valid
    self_recv = received_attention(attention, image.astype(jnp.float32), exclude_self=True)
    cross_recv = received_attention(attention, text_after.astype(jnp.float32))
    return redundancy_score(self_recv, cross_recv, image, self_weight=self_weight), image


@dataclasses.dataclass(frozen=True)
class ATPPrune(Reducer):
    """Untrained ATP-style hard pruning with a fixed threshold ``theta``.

    In a ViT: :func:`vit_atp_scores`, spatial grid of ``stride`` always kept. In the LLM: :func:`span_atp_scores`
    over the image span. Either way the kept set is compacted to a static capacity (``keep`` or ``keep_ratio`` of
    the candidates) and the slots beyond the instance's count are marked invalid through the step's ``valid``,
    so the model must honour ``state.valid``."""

    theta: float = 0.3
    keep_ratio: float = 0.7
    keep: Optional[int] = None
    stride: int = 4
    self_weight: float = 0.5
    needs: ClassVar[frozenset] = frozenset({ATTENTION})
    spans: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        attn = info.require(ATTENTION, "atp")
        t = state.num_tokens
        cap = self.num_out(t, info)
        if info.in_spans:
            score, image = span_atp_scores(attn, info.image_starts, info.image_len, state.valid,
                                           self_weight=self.self_weight)
            theta = jnp.full((attn.shape[0],), self.theta, jnp.float32)
            # padding stays forced (its slot keeps the state's False): the image capacity never depends on padding
            return threshold_prune_step(score, theta, forced=~image, capacity=cap)
        p = info.num_protected
        score = vit_atp_scores(attn, num_protected=p, self_weight=self.self_weight)
        forced = jnp.asarray((np.arange(t) < p) | patch_grid_mask(t, p, self.stride))
        return threshold_prune_step(score, self.theta, forced=forced, capacity=cap, valid=state.valid)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.attention_score_flops(num_tokens + 1, num_tokens, heads)


@register("atp", points=("vit", "vision", "llm"))
def _atp_layers(num_layers: int, theta: float = 0.3, keep_ratio: float = 0.7, keep: Optional[int] = None,
                stride: int = 4, self_weight: float = 0.5, layers=None) -> list[Optional[Reducer]]:
    """ATP-style pruning with a fixed threshold (runs untrained): keep ``score > theta`` up to a capacity of
    ``keep_ratio`` (or ``keep``) of the candidates."""
    check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        check_count(keep, "keep", allow_zero=False)
    check_count(stride, "stride")
    if not 0.0 <= float(theta) <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    red = ATPPrune(theta=float(theta), keep_ratio=float(keep_ratio), keep=None if keep is None else int(keep),
                   stride=int(stride), self_weight=float(self_weight))
    return [red if i in set(layers) else None for i in range(num_layers)]


__all__ = [
    "received_attention",
    "redundancy_score",
    "spatial_grid_mask",
    "soft_keep_mask",
    "hard_keep_mask",
    "compact_keep",
    "budget_loss",
    "vit_atp_inputs",
    "vit_atp_scores",
    "patch_grid_mask",
    "threshold_prune_step",
    "span_atp_scores",
    "ATPPrune",
]
