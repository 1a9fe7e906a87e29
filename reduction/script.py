"""Script: graph-structured redundancy pruning intersected with a query-conditioned DPP (Yang et al., TMLR 2025,
arXiv 2512.01949), batched and jittable.

Script has two modules. *Graph-structured pruning* (GSP) removes visually redundant tokens: the candidates
are split into a bipartite graph (even positions = sources, odd positions = destinations), an edge joins a
source and a destination whose cosine similarity is at least ``tau``, and a source's redundancy grows with
its degree and the mean similarity of its edges. *Query-conditioned semantic pruning* (QCSP) is CDPruner's
conditional DPP (:mod:`reduction.cdpruner`). The final set is the intersection of the two. Registered as
``"script"`` at every point (``x: [B, T, C] -> [B, K', C]``); the relevance, the points and the question-free
variant (``r = 1`` at ``"vit"``, ``"vision"`` and ``"connector"``) are exactly CDPruner's.

The selection for the ``N`` candidates of one image (:func:`script_order`), ``mode="paper"`` (default):

1. ``S`` = cosine similarity. For each source ``i`` (even position): ``deg_i = #{odd j : S_ij >= tau}``,
   ``mu_i`` = the mean of those ``S_ij``, redundancy ``g_i = deg_i * exp(gamma * (mu_i - tau))``, and ``0``
   for a source without edges (the formula of the official code, applied to the paper's bipartite graph).
2. GSP removes the ``R = min(ceil(N / 2), floor(redundant_ratio * (N - K)))`` sources of highest redundancy
   (ties: lowest index), only those with ``g_i > 0``. **GUESS**: the paper's count of removed tokens is not
   known here; ``redundant_ratio = 0.5`` removes at most half the tokens the budget drops, so the DPP
   always has at least ``K`` candidates.
3. The intersection, **GUESS**: the greedy DPP MAP (CDPruner's fast update, same kernel
   ``diag(r) S diag(r)``) runs on the tokens GSP kept; its ``K`` picks are the output. This is the intersection
   of the two modules' sets filled up to ``K`` by continuing the DPP's greedy order among GSP's survivors.
4. Kept indices ascending (original order).

``mode="code"`` reproduces the official code at 7e5e2f3 (01yzzyu/script.github.io, ``Script/llava/model/
llava_arch.py``, ``encode_images``), whose output is the mask of its own per-sample "DPP" loop: there the
full-graph GSP mask is intersected with the DPP mask and then refilled from DPP-only tokens, which gives back
the DPP mask, so GSP has no effect (not computed here). That loop's projection term divides by ``d[prev]``,
already ``-inf``, so it vanishes: ``j = argmax d`` over unselected tokens, then (only if ``d_j > 0``)
``d <- d - L[:, j]**2 / (sqrt(d_j) + 1e-6)**2``, and ``d_j <- -inf``.

The official code's relevance also differs from CDPruner's: raw dot products of CLIP's text and image embeddings
(no normalisation), the top half of the 77-token text segments (with one segment, all of it) and min-max per
crop. This port uses :func:`reduction.cdpruner.query_relevance` for both modes (the LLM's hidden states,
cosine, one query vector: segment selection does nothing), which is a **GUESS** like CDPruner's.

Reported in the paper (not re-checked here): on LLaVA-NeXT-7B up to 6.8x prefill speed-up and 10x fewer
FLOPs at 96.88% of the original performance, over 14 image and video benchmarks (abstract).

Where this port differs from the official code, besides the relevance and the paper-mode GSP above: batched
(every example and image span selects alone, traced span starts), float32 similarities (the official code
keeps the projector's fp16), ties to the lowest index, optional validity (invalid tokens picked last, lowest
index first; in paper mode GSP never removes an invalid source and invalid destinations are no neighbours),
original position ids kept, the shared kept-count rule per image. Defaults ``tau = 0.2``, ``gamma = 1.0`` are
the official code's. The paper-mode DPP guards an exhausted kernel as :mod:`reduction.cdpruner` does.

Dimension vocabulary: B batch, T tokens, C channels, N candidates of one image, K kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.cdpruner import (check_relevance, check_theta, cosine_similarity, dpp_flops, dpp_greedy_order,
                                dpp_kernel, query_relevance, relevance_flops)
from reduction.reducers import (HIDDEN, LayerInfo, Reducer, candidates_kept, default_layers, pruned_count,
                                register)
from reduction.spans import prefix_keep_indices, span_keep_indices
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

MODES = ("paper", "code")
CODE_EPS = 1e-6                                   # the official loop's epsilon
_LOW = float(jnp.finfo(jnp.float32).min)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def gsp_num_removed(num_candidates: int, kept: int, redundant_ratio: float) -> int:
    """How many sources GSP removes at most: ``min(ceil(N / 2), floor(redundant_ratio * (N - K)))``."""
    return min((num_candidates + 1) // 2, int(math.floor(redundant_ratio * (num_candidates - kept))))


def gsp_redundancy(x: jax.Array, *, tau: float = 0.2, gamma: float = 1.0, valid: Optional[jax.Array] = None,
                   similarity: Optional[jax.Array] = None) -> jax.Array:
    """Bipartite redundancy of one image: ``x: [N, C]`` -> ``[N]`` float32, ``g_i`` on sources (even positions),
    ``0`` on a source without edges, ``-1`` on destinations and invalid tokens (never removed)."""
    check_rank(x, 2, "x")
    n = x.shape[0]
    s = cosine_similarity(jax.lax.stop_gradient(x)) if similarity is None else similarity
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    pos = jnp.arange(n)
    src, dst = pos % 2 == 0, pos % 2 == 1
    edge = (s >= tau) & dst[None, :] & ok[None, :]
    deg = jnp.sum(edge, axis=1)
    mu = jnp.sum(jnp.where(edge, s, 0.0), axis=1) / jnp.maximum(deg, 1)
    g = jnp.where(deg > 0, deg * jnp.exp(gamma * (mu - tau)), 0.0)
    return jnp.where(src & ok, g, -1.0)


def gsp_removed(x: jax.Array, num_removed: int, *, tau: float = 0.2, gamma: float = 1.0,
                valid: Optional[jax.Array] = None, similarity: Optional[jax.Array] = None) -> jax.Array:
    """GSP's removed tokens of one image: the ``num_removed`` sources of highest redundancy with ``g > 0``
    (ties: lowest index) -> ``[N]`` bool."""
    n = x.shape[0]
    num_removed = check_count(num_removed, "num_removed")
    if num_removed > n:
        raise ValueError(f"num_removed={num_removed} exceeds the token count N={n}")
    if num_removed == 0:
        return jnp.zeros((n,), bool)
    g = gsp_redundancy(x, tau=tau, gamma=gamma, valid=valid, similarity=similarity)
    top, idx = jax.lax.top_k(g, num_removed)
    return jnp.zeros((n,), bool).at[idx].set(top > 0)


def script_code_order(kernel: jax.Array, kept: int, valid: Optional[jax.Array] = None) -> jax.Array:
    """The official Script loop's picks in order (``mode="code"``): ``kernel: [N, N]`` -> ``[kept]`` int32."""
    check_rank(kernel, 2, "kernel")
    n = kernel.shape[0]
    kept = check_count(kept, "kept")
    if kept > n:
        raise ValueError(f"kept={kept} exceeds the token count N={n}")
    if valid is not None:
        check_rank(valid, 1, "valid")
        check_leading(valid, (n,), "valid", "kernel")
    if kept == 0:
        return jnp.zeros((0,), jnp.int32)
    lk = jax.lax.stop_gradient(kernel).astype(jnp.float32)
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)

    def body(i, carry):
        d, selected, order = carry
        j = jnp.argmax(jnp.where(selected, -jnp.inf, jnp.where(ok, d, _LOW))).astype(jnp.int32)
        dj = d[j]
        use = ok[j] & (dj > 0)
        proj = lk[:, j] / (jnp.sqrt(jnp.where(use, dj, 1.0)) + CODE_EPS)
        d = jnp.where(use, d - proj * proj, d)
        d = d.at[j].set(jnp.where(use, -jnp.inf, d[j]))
        return d, selected.at[j].set(True), order.at[i].set(j)

    init = (jnp.diagonal(lk), jnp.zeros((n,), bool), jnp.zeros((kept,), jnp.int32))
    return jax.lax.fori_loop(0, kept, body, init)[2]


def script_order(x: jax.Array, kept: int, relevance: Optional[jax.Array] = None, valid: Optional[jax.Array] = None,
                 *, mode: str = "paper", tau: float = 0.2, gamma: float = 1.0, redundant_ratio: float = 0.5
                 ) -> jax.Array:
    """Script's picks of one image in order: ``x: [N, C]``, ``relevance: [N]`` or ``None`` (``r = 1``) ->
    ``[kept]`` int32."""
    check_rank(x, 2, "x")
    check_mode(mode)
    n = x.shape[0]
    kept = check_count(kept, "kept")
    if kept > n:
        raise ValueError(f"kept={kept} exceeds the token count N={n}")
    kernel = dpp_kernel(jax.lax.stop_gradient(x), relevance)
    if mode == "code":
        return script_code_order(kernel, kept, valid)
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    removed = gsp_removed(x, gsp_num_removed(n, kept, redundant_ratio), tau=tau, gamma=gamma, valid=ok)
    return dpp_greedy_order(kernel, kept, ok & ~removed)


@eager_jit
def script_select(x, kept, relevance=None, valid=None, **options) -> jax.Array:
    """Script's kept tokens of one image, ascending: ``[kept]`` int32 (options: see :func:`script_order`)."""
    return jnp.sort(script_order(x, kept, relevance, valid, **options))


def script_keep_indices(x: jax.Array, *, keep: int, num_protected: int = 0, valid: Optional[jax.Array] = None,
                        **options) -> jax.Array:
    """Batched question-free Script (``r = 1``): ``x: [B, T, C]`` -> ``[B, num_protected + keep]`` int32
    ascending (the first ``num_protected`` tokens survive)."""
    return prefix_keep_indices(lambda xb, vb: script_select(xb, keep, None, vb, **options), x, keep=keep,
                               num_protected=num_protected, valid=valid)


def script_span_keep_indices(hidden: jax.Array, image_starts: jax.Array, *, image_len: int, kept: int,
                             valid: Optional[jax.Array] = None, relevance: str = "similarity",
                             theta: Optional[float] = None, **options) -> jax.Array:
    """Script in an LLM sequence: ``kept`` tokens of each image span, every text token ->
    ``[B, T - M (image_len - kept)]`` int32 ascending."""
    check_rank(hidden, 3, "hidden")
    if check_count(kept, "kept", allow_zero=False) > check_count(image_len, "image_len", allow_zero=False):
        raise ValueError(f"kept={kept} exceeds image_len={image_len}")
    r = query_relevance(hidden, image_starts, image_len, valid, relevance=relevance, theta=theta)
    values = jnp.concatenate([hidden.astype(jnp.float32), r[..., None]], axis=-1)
    return span_keep_indices(lambda span: script_select(span[:, :-1], kept, span[:, -1], **options), values,
                             image_starts, image_len=image_len, kept=kept)


def gsp_flops(candidates: int) -> int:
    """GSP on a computed ``S``: threshold, count and sum over the ``ceil(N/2) x floor(N/2)`` bipartite block
    (3 per entry), the score (5 per source) and the top-R (about ``N``)."""
    src = (candidates + 1) // 2
    return 3 * src * (candidates - src) + 5 * src + candidates


@dataclasses.dataclass(frozen=True)
class Script(Reducer):
    """Script at one layer: GSP then the conditional DPP (``mode="paper"``) or the official code's loop
    (``mode="code"``) on the hidden states; in the LLM per image span with the query relevance."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    relevance: str = "similarity"
    theta: Optional[float] = None
    mode: str = "paper"
    tau: float = 0.2
    gamma: float = 1.0
    redundant_ratio: float = 0.5
    needs: ClassVar[frozenset] = frozenset({HIDDEN})
    spans: ClassVar[bool] = True

    @property
    def _options(self) -> dict:
        return dict(mode=self.mode, tau=self.tau, gamma=self.gamma, redundant_ratio=self.redundant_ratio)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        feats = info.hidden if info.hidden is not None else state.x
        t = state.num_tokens
        if info.in_spans:
            kept = candidates_kept(info.image_len, self.keep_ratio, self.keep)
            idx = script_span_keep_indices(feats, info.image_starts, image_len=info.image_len, kept=kept,
                                           valid=state.valid, relevance=self.relevance, theta=self.theta,
                                           **self._options)
        else:
            p = min(info.num_protected, t)
            idx = script_keep_indices(feats, keep=self.num_out(t, info) - p, num_protected=p, valid=state.valid,
                                      **self._options)
        return prune_step(idx, t)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """Counted on all ``num_tokens`` tokens as candidates (an upper bound in the LLM, as CDPruner's)."""
        kept = candidates_kept(num_tokens, self.keep_ratio, self.keep)
        gsp = gsp_flops(num_tokens) if self.mode == "paper" else 0
        return dpp_flops(num_tokens, kept, dim) + relevance_flops(num_tokens, dim) + gsp


@register("script", points=("vit", "vision", "connector", "llm"))
def _script_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                   relevance: str = "similarity", theta: Optional[float] = None, mode: str = "paper",
                   tau: float = 0.2, gamma: float = 1.0, redundant_ratio: float = 0.5,
                   layers=None) -> list[Optional[Reducer]]:
    """Script (Yang et al. 2025): bipartite-graph redundancy pruning (GSP) intersected with CDPruner's
    conditional DPP. ``mode="code"``: the official code's output (its DPP loop only). ``redundant_ratio``
    (GUESS): GSP removes up to that fraction of the tokens the budget drops. Relevance as ``"cdpruner"``."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    red = Script(keep_ratio=keep_ratio, keep=keep, relevance=check_relevance(relevance), theta=check_theta(theta),
                 mode=check_mode(mode), tau=_check_positive(tau, "tau"), gamma=_check_positive(gamma, "gamma"),
                 redundant_ratio=check_ratio(redundant_ratio, "redundant_ratio", low_open=-1e-12))
    chosen = set(default_layers(num_layers) if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = [
    "gsp_num_removed",
    "gsp_redundancy",
    "gsp_removed",
    "script_code_order",
    "script_order",
    "script_select",
    "script_keep_indices",
    "script_span_keep_indices",
    "gsp_flops",
    "Script",
]
