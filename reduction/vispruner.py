"""VisPruner: important + diverse visual tokens (Zhang et al., ICCV 2025, arXiv 2412.01818), batched and jittable.

VisPruner keeps the patches the class token attends to most ("important") and then a *diverse* set of the rest,
found by repeatedly removing near-duplicates. Registered as ``"vispruner"`` at the ``"vit"`` and ``"vision"``
points: ``x: [B, T, C] -> [B, P + K, C]`` with ``P`` the protected prefix (at least the class token) and ``K``
candidates kept. A pure pruning step (kept tokens in original order).

What the official code (Theia-4869/VisPruner @ aefa01a, ``llava/model/llava_arch.py``) does, for ``K`` kept
tokens and ``important_ratio = r``:

1. Scores: the class token's attention row over the patches, **mean over heads**. Features: the same block's
   hidden states (``hidden_states[-2]``, before the projector).
2. ``K_imp = int(K r)``, ``K_div = K - K_imp``. All patches are ranked by score, descending. Important = the first
   ``K_imp``; the residual list ``R`` = the rest, **kept in descending-score order**.
3. While ``|R| > K_div``: remove ``r_t = min(8, |R| - K_div)`` tokens. On the L2-normalised features,
   ``a = R[0::2]``, ``b = R[1::2]`` (positions in the current list), ``s_i = max_j cos(a_i, b_j)``; ``a`` is sorted
   by ``s`` descending and its first ``r_t`` (the most duplicated) are dropped. The new list is the surviving
   ``a`` **in descending-``s`` order** followed by all of ``b`` in their old order (this order decides the next
   split).
4. Kept = important + the final residual, gathered in **original order**.

Every ``|R_t|`` is known from the static counts, so the loop is unrolled in Python with exact static shapes
(:func:`vispruner_schedule`; 64 iterations for LLaVA's ``K = 64``, ``r = 0.5``).

Reported in the paper (not re-checked here): on LLaVA-1.5-7B, FLOPs -91% and latency -75% with "comparable
performance", training-free.

Defaults and where they are **GUESS**ed:

* ``keep`` / ``keep_ratio`` count the kept *candidates* (the class token is extra, as everywhere in the repo).
  The official LLaVA path drops the class token before the projector; here it is protected and the tower decides
  whether it is passed on.
* ``important_ratio=0.5``: the official evaluation loader's default.
* ``layers=None`` -> ``[num_layers - 2]`` (``[0]`` with one layer): HF's layer -2 of the blocks that run at the
  point. **GUESS** for the ViT classifier (no official analogue). In a LLaVA-style tower that stops at
  ``hidden_states[-2]`` the official block is the last block that runs: pass ``layers=[num_layers - 1]``.

Where this port differs from the official code:

* It acts after the block's attention, before its MLP: the scores are exactly the official ones, but the
  features for the duplicate search are the block's pre-MLP hidden states (``state.x`` at that point), not its
  outputs. The kept tokens' features after the MLP equal the official ones (the MLP is per token).
* Ties: every sort is stable (lowest index / earliest list position first); ``torch.argsort`` and ``torch.sort``
  are not stable.
* An odd ``|R|`` (which crashes the torch code) is handled: ``a`` has one more element than ``b``. When ``b`` is
  empty (``|R| = 1``) ``a``'s score is ``-inf``; when ``r_t > |a|`` all of ``a`` is dropped this iteration.
* Feature norms are clamped at ``1e-12`` (the official code divides by the raw norm).
* Protected tokens beyond the class token are kept and are not candidates. Invalid tokens (``state.valid``) rank
  below every valid one by score (they are not excluded from the duplicate search).
* AnyRes (per-crop budgets, the pinned 2x2 grid) is not implemented: one image per example.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction import flops as flops_lib
from reduction.reducers import (ATTENTION, HIDDEN, LayerInfo, Reducer, candidates_kept, pruned_count, register)
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

DEDUP_STEP = 8
COS_EPS = 1e-12


def vispruner_counts(kept: int, important_ratio: float) -> tuple[int, int]:
    """``(important, diverse)`` for ``kept`` tokens: ``int(kept * r)`` and the rest."""
    kept = check_count(kept, "kept")
    imp = int(kept * float(important_ratio))
    return imp, kept - imp


def vispruner_schedule(num_candidates: int, important: int, diverse: int) -> list[int]:
    """The static ``|R_t|`` before each dedup iteration (``r_t = min(8, |R_t| - diverse)`` are removed)."""
    sizes = []
    r = num_candidates - important
    while r > diverse:
        sizes.append(r)
        half_a = (r + 1) // 2
        r -= min(DEDUP_STEP, r - diverse, half_a)
    return sizes


def vispruner_select(scores: jax.Array, feats: jax.Array, *, important: int, diverse: int) -> jax.Array:
    """One example: ``scores: [N]``, ``feats: [N, C]`` -> kept candidate indices ``[important + diverse]`` int32,
    ascending. Not differentiable (integer output)."""
    check_rank(scores, 1, "scores")
    check_rank(feats, 2, "feats")
    n = scores.shape[0]
    if important + diverse > n:
        raise ValueError(f"important={important} + diverse={diverse} exceed the {n} candidates")
    s = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
    order = jnp.argsort(-s, stable=True).astype(jnp.int32)
    imp, res = order[:important], order[important:]
    f = feats.astype(jnp.float32)
    fn = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), COS_EPS)
    for size in vispruner_schedule(n, important, diverse):
        assert res.shape[0] == size
        r_t = min(DEDUP_STEP, size - diverse)
        a, b = res[0::2], res[1::2]
        if b.shape[0] == 0:
            sim = jnp.full((a.shape[0],), -jnp.inf)
        else:
            sim = jnp.max(jnp.einsum("ic,jc->ij", fn[a], fn[b], precision=jax.lax.Precision.HIGHEST), axis=-1)
        a_sorted = a[jnp.argsort(-sim, stable=True)]
        res = jnp.concatenate([a_sorted[min(r_t, a.shape[0]):], b])
    return jnp.sort(jnp.concatenate([imp, res]))


@eager_jit
def vispruner_keep_indices(cls_attention: jax.Array, feats: jax.Array, *, keep: int, important_ratio: float = 0.5,
                           num_protected: int = 1, valid: Optional[jax.Array] = None) -> jax.Array:
    """Batched VisPruner: ``cls_attention: [B, H, T]`` (or ``[B, T]`` already head-averaged), ``feats: [B, T, C]``
    -> ``keep_idx: [B, num_protected + keep]`` int32 ascending; the prefix always survives."""
    check_rank(feats, 3, "feats")
    b, t = feats.shape[:2]
    p = check_count(num_protected, "num_protected")
    keep = check_count(keep, "keep")
    if keep > t - p:
        raise ValueError(f"keep={keep} exceeds the {t - p} unprotected tokens")
    score = cls_attention.astype(jnp.float32)
    if score.ndim == 3:
        score = jnp.mean(score, axis=1)                                  # mean over heads (official)
    check_rank(score, 2, "cls_attention (head mean)")
    check_leading(score, (b, t), "cls_attention", "feats")
    score = jax.lax.stop_gradient(score)
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "feats")
        score = jnp.where(valid, score, -jnp.inf)
    imp, div = vispruner_counts(keep, important_ratio)
    sel = jax.vmap(lambda s, f: vispruner_select(s, f, important=imp, diverse=div))(
        score[:, p:], jax.lax.stop_gradient(feats)[:, p:])
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return jnp.concatenate([prefix, sel + p], axis=1)


def vispruner_flops(num_candidates: int, *, dim: int, heads: int, important: int, diverse: int) -> int:
    """The head mean of the class row (``H N``), normalising the features (``3 N C``) and every dedup iteration's
    ``|a| x |b|`` cosine similarities."""
    total = heads * num_candidates + 3 * num_candidates * dim
    for size in vispruner_schedule(num_candidates, important, diverse):
        total += flops_lib.cosine_rows_flops((size + 1) // 2, size // 2, dim)
    return total


@dataclasses.dataclass(frozen=True)
class VisPruner(Reducer):
    """VisPruner at one layer: ``int(K r)`` important candidates by class-token attention, the rest by iterative
    duplicate removal on the hidden states; ``K`` = ``keep`` (or ``keep_ratio`` of the candidates)."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    important_ratio: float = 0.5
    needs: ClassVar[frozenset] = frozenset({ATTENTION, HIDDEN})

    def _info(self, info: LayerInfo) -> LayerInfo:
        return dataclasses.replace(info, num_protected=max(info.num_protected, 1))

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, self._info(info), self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        attn = info.require(ATTENTION, "vispruner")
        feats = info.hidden if info.hidden is not None else state.x
        t = state.num_tokens
        p = min(max(info.num_protected, 1), t)
        idx = vispruner_keep_indices(attn[:, :, 0, :], feats, keep=self.num_out(t, info) - p,
                                     important_ratio=self.important_ratio, num_protected=p, valid=state.valid)
        return prune_step(idx, t)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        n = max(num_tokens - 1, 0)
        imp, div = vispruner_counts(candidates_kept(n, self.keep_ratio, self.keep) if n else 0, self.important_ratio)
        return vispruner_flops(n, dim=dim, heads=heads, important=imp, diverse=div)


@register("vispruner", points=("vit", "vision"), layers="all")
def _vispruner_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                      important_ratio: float = 0.5, layers=None) -> list[Optional[Reducer]]:
    """VisPruner (Zhang et al. 2025): ``important_ratio`` of the kept candidates by class-token attention, the
    rest by iterative duplicate removal. Acts once, by default at layer ``num_layers - 2`` (HF's layer -2; GUESS
    outside LLaVA)."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    important_ratio = float(important_ratio)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    red = VisPruner(keep_ratio=keep_ratio, keep=keep, important_ratio=important_ratio)
    chosen = set([max(num_layers - 2, 0)] if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = [
    "vispruner_counts",
    "vispruner_schedule",
    "vispruner_select",
    "vispruner_keep_indices",
    "vispruner_flops",
    "VisPruner",
]
