"""VMTC-style clustering merge: spherical k-means on the token metric, batched and jittable.

Registered as ``"kmeans"`` at the ``"vit"``, ``"vision"`` and ``"connector"`` points (it reads only
``info.metric``: the head-mean keys in a block, the features themselves at the connector):
``x: [B, T, C] -> [B, P + K, C]`` with ``P`` the protected prefix (each its own slot) and ``K`` clusters of the
``N = T - P`` candidates, ``K`` from ``keep`` / ``keep_ratio`` (:func:`~reduction.reducers.candidates_kept`).

There is no public code or paper text for the VMTC clustering merge (see round2_methods.md section 5); the
nearest published idea is cluster-level aggregation of visual tokens before the LLM (Omri, Shroff, Tambe,
arXiv 2504.17892, abstract only: simple clustering beats selection and merging baselines). **Everything below
is this port's own specification (GUESS)**; no headline number exists to reproduce.

The clustering of one example (:func:`kmeans_assign`), on ``u = metric / |metric|`` of the candidates:

1. **Init (GUESS)**: a stride over the valid candidates in their original order. With ``V`` valid candidates and
   ``M = max(V, K)``, seed ``i`` is entry ``floor(i M / K)`` of the list "valid candidates ascending, then the
   invalid ones ascending": ``K`` distinct tokens, spread over the raster when the input is a patch grid,
   deterministic (no k-means++ randomness). Seed ``i`` is cluster ``i``'s first **anchor** and its ``u`` the
   first centroid.
2. ``iterations`` Lloyd rounds (``lax.fori_loop``; default 10, **GUESS**), each:
   (a) assign every candidate to the centroid of highest cosine (first cluster on ties); a cluster whose anchor
   is an invalid token is never chosen; **each anchor is pinned to its own cluster**;
   (b) centroid ``c_k = normalise(sum_{t in k} w_t u_t)`` with ``w = sizes`` (0 for invalid tokens), i.e. the
   size-weighted spherical mean; a cluster whose weighted sum is 0 keeps its previous centroid;
   (c) the new anchor of cluster ``k`` is its positive-weight member closest to ``c_k``; scores within ``1e-4``
   of the best count as tied and the lowest index wins (the two members of a 2-member cluster are *exactly*
   equally close to their spherical mean, so an exact comparison would be decided by rounding); the old anchor
   stays if there is no positive-weight member.
3. A final assignment (a) against the last centroids.

Empty clusters: **cannot occur**. The pinned anchor keeps every cluster non-empty (anchors are members of
distinct clusters, so they stay distinct), which is what a merge step needs (every slot holds exactly one
anchor). The pin is this port's choice (plain Lloyd lets a cluster empty out; the usual fix keeps its old
centroid, which here would leave a slot with no token). When fewer than ``K`` candidates are valid, the
clusters seeded on invalid tokens hold only that token: zero weight, and the slot is invalid in the output
(``apply_step`` takes a slot's validity from its anchor), with features equal to that token's (no NaN).

The step (:func:`kmeans_step`) is a merge step: the protected tokens first, then the ``K`` clusters ordered by
their anchor's index (a rough raster order), each slot at its anchor's position. :func:`~reduction.step.apply_step`
forms the size-weighted means of the hidden states (not of the normalised metric), so the sizes of the output
sum to the input's valid sizes (mass is conserved), ``source`` tracks every token, and gradients flow to ``x``
through the means (the assignment itself is integer-valued, under ``stop_gradient``).

Cost (:func:`kmeans_flops`, metric width ``d``): ``iterations + 1`` assignments of ``N x K`` dot products
(``2 N K d`` each) plus ``O(N d)`` per round for the centroid sums (a scatter-add) and the anchor scores. At a
ViT-S block (dim 384, 6 heads, 197 tokens, ``d = 64``, ``keep_ratio=0.5``: ``K = 98``) with 10 iterations this is
about 27.9 MFLOPs, **3.7% of the block's 757 MFLOPs** (analytic; ``tests/test_kmeans_merge.py`` checks the ratio).

Other choices (all **GUESS**): the metric is the point's ``info.metric`` (ToMe's); the default layers are the
staged :func:`~reduction.reducers.default_layers` (``[3, 6, 9]`` of 12), like the pruning methods, with
``keep_ratio=0.5`` of the candidates at each.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.reducers import METRIC, LayerInfo, Reducer, candidates_kept, default_layers, pruned_count, register
from reduction.state import TokenState
from reduction.step import ReductionStep, identity_step, merge_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

COS_EPS = 1e-12
DEFAULT_ITERATIONS = 10
ANCHOR_TIE = 1e-4   # anchor scores this close to the best count as tied (a 2-member cluster ties exactly)


def stride_seeds(valid: jax.Array, clusters: int) -> jax.Array:
    """The deterministic init of one example: ``valid: [N]`` bool -> ``[clusters]`` distinct int32 indices (a
    stride over the valid tokens in order, then invalid tokens if fewer than ``clusters`` are valid)."""
    n = valid.shape[0]
    order = jnp.argsort(~valid, stable=True)                          # valid first, each part ascending
    m = jnp.maximum(jnp.sum(valid.astype(jnp.int32)), clusters)
    pos = (jnp.arange(clusters, dtype=jnp.int32) * m) // clusters
    return order[jnp.minimum(pos, n - 1)].astype(jnp.int32)


def kmeans_assign(metric: jax.Array, weights: jax.Array, clusters: int, *, iterations: int = DEFAULT_ITERATIONS,
                  valid: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Spherical k-means of one example with pinned anchors (see the module docstring).

    ``metric: [N, d]``, ``weights: [N]`` (sizes; invalid tokens are given weight 0 here), ``valid: [N]`` bool or
    ``None`` -> ``(assign [N] int32 in [0, clusters), anchor [clusters] int32)`` with ``assign[anchor[k]] == k``.
    """
    check_rank(metric, 2, "metric")
    n = metric.shape[0]
    k = check_count(clusters, "clusters", allow_zero=False)
    iterations = check_count(iterations, "iterations")
    if k > n:
        raise ValueError(f"clusters={k} exceeds the token count N={n}")
    check_leading(weights, (n,), "weights", "metric")
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    check_leading(ok, (n,), "valid", "metric")
    v = jax.lax.stop_gradient(metric).astype(jnp.float32)
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), COS_EPS)
    w = jnp.where(ok, jax.lax.stop_gradient(weights).astype(jnp.float32), 0.0)
    slots = jnp.arange(k, dtype=jnp.int32)
    idx = jnp.arange(n, dtype=jnp.int32)
    anchor = stride_seeds(ok, k)
    live = ok[anchor]                                                  # clusters seeded on valid tokens

    def assign(c, anchor):
        s = jnp.einsum("nd,kd->nk", u, c, precision=jax.lax.Precision.HIGHEST)
        s = jnp.where(live[None, :], s, -jnp.inf)
        a = jnp.argmax(s, axis=-1).astype(jnp.int32)                  # first cluster on ties
        return a.at[anchor].set(slots)                                 # anchors pinned

    def update(a, c, anchor):
        total = jnp.zeros((k, u.shape[1]), jnp.float32).at[a].add(w[:, None] * u)
        norm = jnp.linalg.norm(total, axis=-1, keepdims=True)
        c = jnp.where(norm > 0, total / jnp.maximum(norm, COS_EPS), c)  # weightless cluster: old centroid
        score = jnp.where(w > 0, jnp.sum(u * c[a], axis=-1), -jnp.inf)
        best = jnp.full((k,), -jnp.inf).at[a].max(score)
        is_best = (w > 0) & (score >= best[a] - ANCHOR_TIE)          # near ties: the lowest index
        cand = jnp.full((k,), n, jnp.int32).at[a].min(jnp.where(is_best, idx, n))
        return c, jnp.where(cand < n, cand, anchor)

    def body(_, carry):
        c, anchor = carry
        return update(assign(c, anchor), c, anchor)

    c, anchor = jax.lax.fori_loop(0, iterations, body, (u[anchor], anchor))
    return assign(c, anchor), anchor


@eager_jit
def kmeans_step(metric: jax.Array, *, clusters: int, num_protected: int = 0, sizes: Optional[jax.Array] = None,
                valid: Optional[jax.Array] = None, iterations: int = DEFAULT_ITERATIONS) -> ReductionStep:
    """The k-means merge step: ``metric: [B, T, d]`` -> a merge step to ``num_protected + clusters`` slots.

    ``sizes: [B, T]`` (default ones) weight the centroids; ``valid: [B, T]`` bool or ``None``. The protected
    prefix keeps slots ``0..P-1``; the clusters follow in ascending anchor order. Every token is assigned (none
    dropped).
    """
    check_rank(metric, 3, "metric")
    b, t = metric.shape[:2]
    p = check_count(num_protected, "num_protected")
    k = check_count(clusters, "clusters", allow_zero=False)
    if p > t or k > t - p:
        raise ValueError(f"clusters={k} exceed the {max(t - p, 0)} candidates (T={t}, P={p})")
    w = jnp.ones((b, t), jnp.float32) if sizes is None else sizes
    check_leading(w, (b, t), "sizes", "metric")
    ok = jnp.ones((b, t), bool) if valid is None else valid
    check_rank(ok, 2, "valid")
    check_leading(ok, (b, t), "valid", "metric")

    def one(m, wb, vb):
        a, anc = kmeans_assign(m, wb, k, iterations=iterations, valid=vb)
        perm = jnp.argsort(anc)                                         # slots in ascending anchor order
        rank = jnp.zeros((k,), jnp.int32).at[perm].set(jnp.arange(k, dtype=jnp.int32))
        return rank[a], anc[perm]

    a, anc = jax.vmap(one)(metric[:, p:], w[:, p:], ok[:, p:])
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return merge_step(jnp.concatenate([prefix, a + p], axis=1), jnp.concatenate([prefix, anc + p], axis=1))


def kmeans_flops(candidates: int, clusters: int, metric_dim: int, iterations: int = DEFAULT_ITERATIONS) -> int:
    """Normalising the metric (``3 N d``), ``iterations + 1`` assignments (``2 N K d`` each), and per round the
    weighted centroid sums (``2 N d``), their normalisation (``3 K d``) and the anchor scores (``2 N d``)."""
    n, k, d = candidates, clusters, metric_dim
    return 3 * n * d + (iterations + 1) * 2 * n * k * d + iterations * (4 * n * d + 3 * k * d)


@dataclasses.dataclass(frozen=True)
class KMeansMerge(Reducer):
    """k-means merge at one layer: the candidates become ``keep`` (or ``keep_ratio`` of them) cluster means."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    iterations: int = DEFAULT_ITERATIONS
    needs: ClassVar[frozenset] = frozenset({METRIC})
    prop_attn: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        t = state.num_tokens
        p = min(info.num_protected, t)
        if t == p:
            return identity_step(state.x.shape[0], t)
        return kmeans_step(info.require(METRIC, "kmeans"), clusters=self.num_out(t, info) - p, num_protected=p,
                           sizes=state.sizes, valid=state.valid, iterations=self.iterations)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """Counted with all ``num_tokens`` as candidates (an upper bound by the protected few)."""
        k = candidates_kept(num_tokens, self.keep_ratio, self.keep)
        return kmeans_flops(num_tokens, k, dim // heads, self.iterations)


@register("kmeans", points=("vit", "vision", "connector"))
def _kmeans_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                   iterations: int = DEFAULT_ITERATIONS, layers=None) -> list[Optional[Reducer]]:
    """VMTC-style k-means merge (GUESS spec, no public code): the candidates become ``keep`` (or ``keep_ratio``)
    size-weighted cluster means of a spherical k-means on the metric (stride init, ``iterations`` Lloyd rounds)."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    red = KMeansMerge(keep_ratio=keep_ratio, keep=keep, iterations=check_count(iterations, "iterations"))
    chosen = set(default_layers(num_layers) if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = ["stride_seeds", "kmeans_assign", "kmeans_step", "kmeans_flops", "KMeansMerge"]
