"""VisionZip: dominant + contextual visual tokens (Yang et al., CVPR 2025, arXiv 2412.04467), batched and jittable.

VisionZip keeps the tokens the class token attends to most ("dominant") and folds the rest into a few
"contextual" tokens. Registered as ``"visionzip"`` at the ``"vit"`` and ``"vision"`` points (it reads the class
token's attention row and the head-mean keys of the block it acts in): ``x: [B, T, C] -> [B, P + K, C]`` with
``P`` the protected prefix (at least the class token) and ``K = dominant + contextual`` candidates kept.

What the official code (dvlab-research/VisionZip @ 3151f6d, ``visionzip/clip_encoder.py``, ``visionzip/utils.py``)
does on CLIP-L/336 in LLaVA-1.5, and what this port does at its one acting layer:

1. Dominant: the class token's attention row (post-softmax, row 0 of ``[B, H, T, T]``) over the patch columns,
   **summed over heads**; the top ``dominant`` patches are kept, together with the class token. They come out in
   **original order, class token first** (the official code gathers with a boolean mask).
2. The other ``L_f = N - dominant`` patches, in original order, get their metric L2-normalised. The metric is the
   **key projection of LN1(x) averaged over heads** (``info.metric``, ToMe's metric), not the hidden states.
3. Contextual targets: a stride over this *filtered list* (sequence positions after removal, not a spatial
   grid): ``step = max(1, L_f // m)``, targets = list entries ``0, step, 2 step, ...`` (the first ``m``).
4. Every other remaining patch goes to its most cosine-similar target (argmax; the first target on ties).
   Contextual token ``j = hidden(target j) + mean(hidden of its members)`` -- the target **plus** the member mean,
   not the mean of target and members (a target with no members is itself).
5. Output: ``[class token, dominant in original order, m contextual in target order]``.

Attention, metric and hidden states all come from the same block (HF's layer index 22 = ``attentions[-2]`` /
``hidden_states[-2]`` of CLIP-L's 24 layers).

The reduction is one merge step (:func:`visionzip_step`): dominant and protected tokens are slots of their own,
each contextual slot holds its target (the anchor: its position) and members, and pruned tokens are dropped only
when ``contextual=0``. So the sizes of the output sum to the input's (mass is conserved) and ``source`` tracks
every patch. :func:`~reduction.step.apply_step` moves the tokens; for the official ``target + mean(members)``
weighting (``merge="official"``, the default) the reducer first rescales each contextual cluster's features by a
per-token factor so that apply_step's size-weighted average comes out as the target plus the size-weighted mean
of its members (:func:`official_merge_scale`; exact up to float rounding). ``merge="mean"`` skips the rescale:
the contextual token is then the plain size-weighted mean of target and members (ToMe-style; **not** official).

Reported in the paper and README (not re-checked here): about 95% of the full performance with 10% of the tokens
on LLaVA-1.5, training-free; prefill about 8x faster; LLaVA-NeXT-13B with VisionZip is faster and better than the
7B. The official 64-token setting is 54 dominant (class token included) + 10 contextual.

Defaults and where they are **GUESS**ed:

* ``keep`` / ``keep_ratio`` count the *candidates* kept (the repo's vocabulary; the class token is extra), so
  the official 64-token LLaVA setting is ``keep=63`` -> 53 dominant patches + 10 contextual + the class token.
* ``contextual=None`` -> ``round(keep * 10 / 64)`` (the README's 54/10 ratio; 63 -> 10, 127 -> 20, 191 -> 30,
  which matches the paper's 108/20 and 162/30 settings). For other budgets the ratio itself is a **GUESS**.
* ``layers=None`` -> ``[num_layers - 2]`` (``[0]`` with one layer): HF's ``attentions[-2]`` of the blocks that run
  at the point. **GUESS** for the ViT classifier, where the official code has no analogue; there it leaves one
  block to run on the reduced tokens. In a LLaVA-style tower that stops at ``hidden_states[-2]`` (``vision``
  point, CLIP ``feature_layer=-2``: the point runs ``L - 1`` blocks) the official block is the *last* block that
  runs: pass ``layers=[num_layers - 1]`` (``L - 2`` in the tower's count) to act there exactly.

Where this port differs from the official code:

* It acts after the block's attention, before its MLP (``position = "after_attention"``): the attention and metric
  are exactly the official ones, the dominant tokens' features after the MLP are exactly the official ones (the
  MLP is per token), but the contextual tokens are merged from the block's pre-MLP hidden states and then go
  through the MLP, where the official code merges the block's outputs.
* Ties: the top-k takes the lowest index first (``torch.topk`` leaves ties unspecified).
* Protected tokens beyond the class token (distillation, registers) are kept as well and are not candidates.
* Sizes: members are weighted by their sizes (the official code has none; with unit sizes it is the plain mean).
  Invalid tokens (``state.valid``) rank below every valid one for dominance and carry zero weight in the merge.
* AnyRes (per-crop budgets and the raster reordering of LLaVA-NeXT) is not implemented: one image per example.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction import flops as flops_lib
from reduction.reducers import ATTENTION, METRIC, LayerInfo, Reducer, candidates_kept, pruned_count, register
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, merge_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

MERGES = ("official", "mean")
COS_EPS = 1e-12


def default_contextual(kept: int) -> int:
    """Contextual tokens for ``kept`` candidates: the README's 10 of 64 (``round(kept * 10 / 64)``, GUESS off the
    official 63/127/191 settings), at most ``kept``."""
    return max(0, min(int(kept), int(round(kept * 10 / 64))))


def visionzip_counts(num_candidates: int, kept: int, contextual: Optional[int]) -> tuple[int, int]:
    """``(dominant, contextual)`` patches for ``kept`` of ``num_candidates`` candidates (static ints)."""
    kept = check_count(kept, "kept")
    if kept > num_candidates:
        raise ValueError(f"kept={kept} exceeds the {num_candidates} candidates")
    m = default_contextual(kept) if contextual is None else min(check_count(contextual, "contextual"), kept)
    return kept - m, m


@eager_jit
def visionzip_step(cls_attention: jax.Array, metric: jax.Array, *, dominant: int, contextual: int,
                   num_protected: int = 1, valid: Optional[jax.Array] = None) -> ReductionStep:
    """VisionZip's merge step.

    Args:
      cls_attention: ``[B, H, T]`` the class token's attention row (or ``[B, T]`` already reduced over heads).
      metric: ``[B, T, Dh]`` head-mean keys of the same block.
      dominant, contextual: static counts of dominant and contextual candidates (the protected prefix is extra).
      num_protected: leading tokens that always survive (first, in order); at least the class token.
      valid: ``[B, T]`` bool or ``None``; invalid tokens rank below every valid one for dominance.

    Returns a merge step with ``K = num_protected + dominant + contextual`` slots: the prefix, the dominant tokens
    ascending, then one slot per contextual target in target order. A dropped token (only when ``contextual=0``)
    has ``assign = -1``. Integer-valued: no gradient flows through the selection.
    """
    check_rank(metric, 3, "metric")
    b, t = metric.shape[:2]
    p = check_count(num_protected, "num_protected")
    d = check_count(dominant, "dominant")
    m = check_count(contextual, "contextual")
    n = t - p
    if n < 0 or d + m > n:
        raise ValueError(f"dominant={d} + contextual={m} exceed the {max(n, 0)} candidates (T={t}, P={p})")
    score = cls_attention.astype(jnp.float32)
    if score.ndim == 3:
        check_leading(score, (b,), "cls_attention", "metric")
        score = jnp.sum(score, axis=1)                                  # summed over heads (official)
    check_rank(score, 2, "cls_attention (summed)")
    check_leading(score, (b, t), "cls_attention", "metric")
    score = jax.lax.stop_gradient(score)[:, p:]
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "metric")
        score = jnp.where(valid[:, p:], score, -jnp.inf)
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    met = jax.lax.stop_gradient(metric).astype(jnp.float32)[:, p:]

    def one(s, k):
        order = jnp.argsort(-s, stable=True)                           # descending, lowest index on ties
        is_dom = jnp.zeros((n,), bool).at[order[:d]].set(True)
        dom = jnp.nonzero(is_dom, size=d)[0]                            # original order
        rest = jnp.nonzero(~is_dom, size=n - d)[0]                      # the filtered list, original order
        lf = n - d
        assign = jnp.full((n,), -1, jnp.int32).at[dom].set(p + jnp.arange(d, dtype=jnp.int32))
        if m == 0:
            return dom, jnp.zeros((0,), jnp.int32), assign
        step = max(1, lf // m)
        tpos = jnp.arange(m) * step                                     # target positions in the filtered list
        is_tgt = jnp.zeros((lf,), bool).at[tpos].set(True)
        others = jnp.nonzero(~is_tgt, size=lf - m)[0]
        tgt = rest[tpos]
        mem = rest[others]
        kn = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), COS_EPS)
        sim = jnp.einsum("ic,jc->ij", kn[mem], kn[tgt], precision=jax.lax.Precision.HIGHEST)
        choice = jnp.argmax(sim, axis=-1).astype(jnp.int32)             # first target on ties
        base = p + d
        assign = assign.at[tgt].set(base + jnp.arange(m, dtype=jnp.int32)).at[mem].set(base + choice)
        return dom, tgt, assign

    dom, tgt, assign_c = jax.vmap(one)(score, met)
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    anchor = jnp.concatenate([prefix, dom.astype(jnp.int32) + p, tgt.astype(jnp.int32) + p], axis=1)
    assign = jnp.concatenate([prefix, assign_c], axis=1)
    return merge_step(assign, anchor)


def official_merge_scale(step: ReductionStep, weights: jax.Array, *, first_contextual: int) -> jax.Array:
    """Per-token factors ``[B, T]`` that turn apply_step's size-weighted average into VisionZip's
    ``target + mean(members)`` on the contextual slots (slot index ``>= first_contextual``).

    For a slot with target weight ``w_t`` and member weight ``W = sum w_m > 0`` the target is scaled by
    ``(w_t + W) / w_t`` and every member by ``(w_t + W) / W``:
    ``(w_t f_t x_t + sum w_m f_m x_m) / (w_t + W) = x_t + sum w_m x_m / W``. Every other token gets 1.
    """
    b, t = step.assign.shape
    k = step.num_out
    slot = step.assign
    total = jax.vmap(lambda s, w: jnp.zeros((k + 1,), jnp.float32).at[jnp.where(s < 0, k, s)].add(w))(slot, weights)
    w_anchor = jnp.take_along_axis(weights, step.anchor, axis=1)
    member_w = total[:, :k] - w_anchor                                  # [B, K]
    tiny = jnp.finfo(jnp.float32).tiny
    slot_in = jnp.clip(slot, 0, k - 1)
    tot = jnp.take_along_axis(total[:, :k], slot_in, axis=1)
    mw = jnp.take_along_axis(member_w, slot_in, axis=1)
    aw = jnp.take_along_axis(w_anchor, slot_in, axis=1)
    is_anchor = jnp.take_along_axis(step.anchor, slot_in, axis=1) == jnp.arange(t)[None]
    f = jnp.where(is_anchor, tot / jnp.maximum(aw, tiny), tot / jnp.maximum(mw, tiny))
    use = (slot >= first_contextual) & (mw > 0) & (aw > 0)
    return jnp.where(use, f, 1.0)


def visionzip_flops(num_tokens: int, *, heads: int, key_dim: int, dominant: int, contextual: int) -> int:
    """Summing the class row over heads (``H T``), normalising the remaining ``L_f`` metrics (``3 L_f Dh``),
    the ``(L_f - m) x m`` cosine similarities, and the merge weighting (``2 L_f``; the merge itself is in the
    step)."""
    lf = max(num_tokens - dominant, 0)
    m = min(contextual, lf)
    return (heads * num_tokens + 3 * lf * key_dim + flops_lib.cosine_rows_flops(lf - m, m, key_dim) + 2 * lf)


def _check_merge(merge: str) -> str:
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    return merge


@dataclasses.dataclass(frozen=True)
class VisionZip(Reducer):
    """VisionZip at one layer: keep ``keep`` (or ``keep_ratio`` of the) candidates, ``contextual`` of them as
    contextual merges of the non-dominant tokens, the rest as dominant tokens by class-token attention."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    contextual: Optional[int] = None
    merge: str = "official"
    needs: ClassVar[frozenset] = frozenset({ATTENTION, METRIC})

    def _protected(self, info: LayerInfo) -> int:
        return max(info.num_protected, 1)

    def _counts(self, num_tokens: int, info: LayerInfo) -> tuple[int, int, int]:
        p = min(self._protected(info), num_tokens)
        n = num_tokens - p
        if n == 0:
            return p, 0, 0
        d, m = visionzip_counts(n, candidates_kept(n, self.keep_ratio, self.keep), self.contextual)
        return p, d, m

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, dataclasses.replace(info, num_protected=self._protected(info)),
                            self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        attn = info.require(ATTENTION, "visionzip")
        p, d, m = self._counts(state.num_tokens, info)
        return visionzip_step(attn[:, :, 0, :], info.require(METRIC, "visionzip"), dominant=d, contextual=m,
                              num_protected=p, valid=state.valid)

    @eager_jit
    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        step = self.plan(state, info)
        if self.merge == "mean":
            return apply_step(state, step)
        p, d, _ = self._counts(state.num_tokens, info)
        w = state.sizes.astype(jnp.float32)
        if state.valid is not None:
            w = jnp.where(state.valid, w, 0.0)
        f = official_merge_scale(step, w, first_contextual=p + d)
        x = (state.x.astype(jnp.float32) * f[..., None]).astype(state.x.dtype)
        return apply_step(state.replace(x=x), step)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        p, d, m = self._counts(num_tokens, LayerInfo(num_protected=1))
        return visionzip_flops(num_tokens, heads=heads, key_dim=dim // heads, dominant=d + p, contextual=m)


@register("visionzip", points=("vit", "vision"), layers="all")
def _visionzip_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                      contextual: Optional[int] = None, merge: str = "official", layers=None
                      ) -> list[Optional[Reducer]]:
    """VisionZip (Yang et al. 2025): keep ``keep`` (or ``keep_ratio`` of the) candidates: dominant tokens by
    class-token attention plus ``contextual`` merged tokens (default ``round(keep * 10 / 64)``, the official
    54/10 ratio). Acts once, by default at layer ``num_layers - 2`` (HF's layer -2; GUESS outside LLaVA)."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    if contextual is not None:
        contextual = check_count(contextual, "contextual")
    red = VisionZip(keep_ratio=keep_ratio, keep=keep, contextual=contextual, merge=_check_merge(merge))
    chosen = set([max(num_layers - 2, 0)] if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = [
    "default_contextual",
    "visionzip_counts",
    "visionzip_step",
    "official_merge_scale",
    "visionzip_flops",
    "VisionZip",
]
