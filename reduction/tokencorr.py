"""Token-level correlation-guided compression (Zhang et al., arXiv 2407.14439), batched and jittable.

The method sets each image's kept count from its *information density* (how few of its patches are redundant by
key similarity) and then samples the patches the class token attends to most. Registered as ``"tokencorr"`` at the
``"vit"`` and ``"vision"`` points (it reads the block's attention and head-mean keys):
``x: [B, T, C] -> [B, P + Kc, C]`` with ``P`` the protected prefix (at least the class token) and ``Kc`` a static
**capacity** (``keep`` / ``keep_ratio`` of the ``N = T - P`` candidates). The kept count is data dependent: each
example keeps ``k_b <= Kc`` candidates and the step's ``valid: [B, P + Kc]`` marks its real slots (ATP's
pattern, :func:`reduction.atp.compact_keep`); one compile serves every count.

The official repository (JiuTian-VL/TokenCorrCompressor @ 0773758) holds only a README and a figure ("codes will
be released soon"), so this port follows the paper's abstract and third-party summaries (round2_methods.md
section 13). The paper's target is mPLUG-DocOwl1.5 (cropped document images, each sub-image compressed on its
own, the global view left whole). Reported (summary, not re-checked): about 66% fewer visual tokens on average
over 10 benchmarks at comparable performance, parameter-free and plug-and-play.

What one example goes through (:func:`tokencorr_counts`, :func:`tokencorr_keep`):

1. ``u = normalise(metric)`` over the candidates; ``metric`` is the block's **head-mean keys** (``info.metric``,
   VisionZip's metric; **GUESS**: "the attention keys of the vision encoder").
2. Candidate ``i`` is **redundant** when at least ``min_similar`` other valid candidates ``j`` have
   ``cos(u_i, u_j) >= threshold`` (**GUESS**: ``threshold=0.9``, ``min_similar=1``).
3. Redundancy ``r = n_redundant / V`` over the ``V`` valid candidates; density ``1 - r``; kept count
   ``k = ceil((1 - r) V) = V - n_redundant`` (exact in integers), clipped to ``[1, Kc]`` (0 when ``V = 0``;
   the floor of 1 and the cap are **GUESS**).
4. The ``k`` valid candidates with the highest class-token attention (post-softmax row 0 of ``[B, H, T, T]``,
   **mean over heads**; lowest index on ties) are kept, in their original order, after the protected prefix.

Where this port differs or guesses: one image per example (no cropping: the method's "sub-image" is the whole
image at the point; a per-crop layout would pass crops as batch entries); the default ``keep_ratio=0.5`` capacity
is **GUESS** (the paper reports about a third kept on average); the acting layer defaults to ``num_layers - 2``
(the penultimate block's keys and attention, **GUESS**, VisionZip's convention: one block then runs on the kept
tokens). The selection is top-k by attention; stratified sampling over the attention distribution is another
reading of "token-level sampling" not implemented here.

Cost (:func:`tokencorr_flops`): the ``N x N`` key cosines (``2 N^2 d``), their normalisation (``3 N d``), the
threshold count (``N^2``) and the head mean of the class row (``H T``). At a ViT-S block (dim 384, 6 heads,
197 tokens, ``d = 64``) that is about 5.0 MFLOPs, **0.66% of the block's 757 MFLOPs** (analytic; checked in
``tests/test_tokencorr.py``). The model must honour ``state.valid`` after this step (the ViT and the vision tower
mask invalid keys in later attention).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction import flops as flops_lib
from reduction.atp import compact_keep
from reduction.reducers import ATTENTION, METRIC, LayerInfo, Reducer, pruned_count, register
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

COS_EPS = 1e-12


def tokencorr_counts(metric: jax.Array, valid: Optional[jax.Array] = None, *, threshold: float = 0.9,
                     min_similar: int = 1) -> tuple[jax.Array, jax.Array]:
    """Redundancy of each example's candidates: ``metric: [B, N, d]``, ``valid: [B, N]`` or ``None`` ->
    ``(redundant [B, N] bool, num_valid [B] int32)``. Invalid candidates are never redundant nor counted as
    similar partners."""
    check_rank(metric, 3, "metric")
    b, n = metric.shape[:2]
    ok = jnp.ones((b, n), bool) if valid is None else valid.astype(bool)
    check_leading(ok, (b, n), "valid", "metric")
    v = jax.lax.stop_gradient(metric).astype(jnp.float32)
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), COS_EPS)
    sim = jnp.einsum("bid,bjd->bij", u, u, precision=jax.lax.Precision.HIGHEST)
    partner = (sim >= threshold) & ok[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    redundant = ok & (jnp.sum(partner.astype(jnp.int32), axis=-1) >= min_similar)
    return redundant, jnp.sum(ok.astype(jnp.int32), axis=-1)


@eager_jit
def tokencorr_keep(cls_attention: jax.Array, metric: jax.Array, *, capacity: int, num_protected: int = 1,
                   valid: Optional[jax.Array] = None, threshold: float = 0.9, min_similar: int = 1
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The selection. ``cls_attention: [B, H, T]`` (or ``[B, T]`` already reduced over heads), ``metric:
    [B, T, d]``, ``valid: [B, T]`` or ``None``.

    Returns ``(keep_idx [B, P + capacity] int32 ascending, slot_valid [B, P + capacity] bool, kept [B] int32)``:
    the protected prefix and the ``kept`` chosen candidates are the valid slots; the other slots hold unkept
    tokens (lowest index first) marked invalid. Integer-valued: no gradient flows through the selection.
    """
    check_rank(metric, 3, "metric")
    b, t = metric.shape[:2]
    p = check_count(num_protected, "num_protected")
    cap = check_count(capacity, "capacity")
    min_similar = check_count(min_similar, "min_similar", allow_zero=False)
    if p > t or cap > t - p:
        raise ValueError(f"capacity={cap} exceeds the {max(t - p, 0)} candidates (T={t}, P={p})")
    score = jax.lax.stop_gradient(cls_attention).astype(jnp.float32)
    if score.ndim == 3:
        check_leading(score, (b,), "cls_attention", "metric")
        score = jnp.mean(score, axis=1)
    check_rank(score, 2, "cls_attention (head mean)")
    check_leading(score, (b, t), "cls_attention", "metric")
    ok = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    check_rank(ok, 2, "valid")
    check_leading(ok, (b, t), "valid", "metric")
    redundant, nv = tokencorr_counts(metric[:, p:], ok[:, p:], threshold=threshold, min_similar=min_similar)
    n_red = jnp.sum(redundant.astype(jnp.int32), axis=-1)
    kept = jnp.where(nv > 0, jnp.clip(nv - n_red, 1, cap), 0).astype(jnp.int32)
    s = jnp.where(jnp.isnan(score[:, p:]), -jnp.inf, score[:, p:])
    key = jnp.where(ok[:, p:], -s, jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)                     # descending, lowest index on ties
    rank = jax.vmap(lambda o: jnp.zeros((t - p,), jnp.int32).at[o].set(jnp.arange(t - p, dtype=jnp.int32)))(order)
    chosen = ok[:, p:] & (rank < kept[:, None])
    forced = jnp.broadcast_to(jnp.arange(t) < p, (b, t))
    keep = jnp.concatenate([forced[:, :p], chosen], axis=1)
    full_score = jnp.concatenate([jnp.zeros((b, p), jnp.float32), jnp.where(chosen, s, 0.0)], axis=1)
    idx, slot_valid = compact_keep(keep, full_score, capacity=p + cap, forced=forced) if p + cap > 0 else (
        jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool))
    return idx, slot_valid, kept


def tokencorr_flops(num_tokens: int, *, heads: int, key_dim: int) -> int:
    """``N x N`` cosines (``2 N^2 d``), normalisation (``3 N d``), the threshold count (``N^2``) and the
    head mean of the class row (``H T``)."""
    n = num_tokens
    return flops_lib.cosine_rows_flops(n, n, key_dim) + 3 * n * key_dim + n * n + heads * n


@dataclasses.dataclass(frozen=True)
class TokenCorr(Reducer):
    """Correlation-guided compression at one layer: keep ``V - n_redundant`` candidates (at most the capacity
    ``keep`` / ``keep_ratio``) by class-token attention; the step's ``valid`` marks the kept slots."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    threshold: float = 0.9
    min_similar: int = 1
    needs: ClassVar[frozenset] = frozenset({ATTENTION, METRIC})

    def _info(self, info: LayerInfo) -> LayerInfo:
        return dataclasses.replace(info, num_protected=max(info.num_protected, 1))

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, self._info(info), self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        t = state.num_tokens
        p = min(self._info(info).num_protected, t)
        attn = info.require(ATTENTION, "tokencorr")
        idx, slot_valid, _ = tokencorr_keep(attn[:, :, 0, :], info.require(METRIC, "tokencorr"),
                                            capacity=self.num_out(t, info) - p, num_protected=p, valid=state.valid,
                                            threshold=self.threshold, min_similar=self.min_similar)
        return prune_step(idx, t, valid=slot_valid)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return tokencorr_flops(num_tokens, heads=heads, key_dim=dim // heads)


@register("tokencorr", points=("vit", "vision"), layers="all")
def _tokencorr_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None, threshold: float = 0.9,
                      min_similar: int = 1, layers=None) -> list[Optional[Reducer]]:
    """Token-level correlation-guided compression (Zhang et al. 2024; no public code, GUESS details): each image
    keeps its non-redundant count (key cosine >= ``threshold`` with ``min_similar`` others is redundant), capped
    at ``keep`` / ``keep_ratio``, chosen by class-token attention. Acts once, by default at ``num_layers - 2``."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite cosine (above 1: nothing is redundant), got {threshold!r}")
    red = TokenCorr(keep_ratio=keep_ratio, keep=keep, threshold=float(threshold),
                    min_similar=check_count(min_similar, "min_similar", allow_zero=False))
    chosen = set([max(num_layers - 2, 0)] if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = ["tokencorr_counts", "tokencorr_keep", "tokencorr_flops", "TokenCorr"]
