"""HoT: prune in the middle of a transformer, recover the full token count at the end (Li et al., CVPR 2024,
arXiv 2311.12028, "Hourglass Tokenizer"), batched and jittable.

HoT has two parts. **TPC** (token pruning cluster) keeps the centres of a density-peak clustering (DPC-kNN) of the
tokens at one layer, so the later blocks run on few tokens. **TRA** (token recovering attention) restores one token
per original position after the last block with a learned cross-attention, so a dense head gets its full-length
output. This module holds the pure part: the DPC-kNN selection, its :class:`~reduction.step.ReductionStep` and the
``"hot"`` reducer (points ``vit``, ``vision``, ``connector``; ``x: [B, T, C] -> [B, P + K, C]``), plus the fixed
2-D sine-cosine position code the recovery uses. The learned recovery is
:class:`reduction.nnx.HoTRecovery` (the repo's learned-reducer path); ``reduction.unmerge`` is the training-free
alternative it is compared against (``docs/pruning.md``, ``configs/hot_dense.py``).

DPC-kNN on the ``N`` candidates of one example (``x: [N, C]``; :func:`dpc_knn`), as the official code
(NationalGAILab/HoT, ``model/mixste/hot_mixste.py``, ``cluster_dpc_knn``) computes it:

1. ``d = cdist(x, x) / sqrt(C)`` (Euclidean).
2. Density ``rho_i = exp(-mean of d^2 over the knn nearest)``, the ``knn`` nearest *including* the token itself
   (``knn = 2``: only the nearest other token counts, with weight 1/2).
3. ``delta_i = min d(i, j)`` over the tokens ``j`` denser than ``i``; the densest token gets ``max d``.
4. ``score = delta * rho``; the centres are the top ``K`` scores, re-sorted by index (original order).
5. Each token belongs to its nearest centre (``argmin`` over the centres' distance rows); a centre to itself.

TPC keeps the centres' features unchanged (the assignments are computed but not used by the official model).

Headline [paper abstract]: on Human3.6M, HoT saves about 50% of MotionBERT's FLOPs with no accuracy loss and about
40% of MixSTE's with a 0.2% drop. The official MixSTE setting keeps 81 of 243 frames (``keep_ratio = 1/3``)
before block 3 of 8 and recovers with 8 heads.

Where this port differs from the official code:

* Images instead of pose videos: the tokens are patches (the official code pools each frame over the 17 joints
  and clusters frames). The clustering runs on the block's hidden states after its attention (``info.hidden``,
  the ``after_attention`` point); the official code clusters the block input.
* Distances come from the Gram matrix of the centred features in float32 (``Precision.HIGHEST``), so a
  near-duplicate pair's distance carries an absolute error of about ``1e-6`` relative to the feature scale.
* Ties are broken by index, not by noise: ``j`` is denser than ``i`` iff ``rho_j > rho_i`` or ``rho_j == rho_i`` and
  ``j < i``; top-k ties go to the lower index. The official code adds ``1e-6 * U(0, 1)`` to the densities, so its
  choice at exact ties is random (on tie-free inputs both agree).
* The protected prefix (class token, registers) always survives and is not clustered. Invalid tokens
  (``state.valid``) are never neighbours, never centres and belong to no cluster; ``max d`` is taken over the valid
  candidate pairs of the example (the official masked variant uses the global maximum + 1).
* ``represent="cluster"`` (default, bookkeeping only) records each pruned token's cluster in the step's ``assign``,
  so the state's ``source`` points a pruned token at its centre and ``reduction.unmerge`` copies the centre to it;
  features and sizes are those of plain pruning (the centre is not averaged with its members, sizes stay 1).
  ``represent="drop"`` is plain pruning (``source = -1`` for pruned tokens).
* No learned slot position embedding after pruning (the official ``pos_embed_token``, one per kept slot): the
  reducer is parameter-free and the ViT tokens already carry their position embedding.
* Counts: ``keep`` or ``floor(keep_ratio * N)`` candidates (the repo's shared rule), default ``keep_ratio = 1/3``
  (81/243, the official MixSTE setting). Default layers: the repo's staged pruning layers (``[1]`` on 2 blocks);
  the official model prunes once, so presets set ``layers`` to one block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reduction._compiled import eager_jit
from reduction.reducers import HIDDEN, LayerInfo, Reducer, candidates_kept, default_layers, pruned_count, register
from reduction.state import TokenState
from reduction.step import ReductionStep, identity_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

REPRESENT = ("cluster", "drop")


def _check_represent(represent: str) -> str:
    if represent not in REPRESENT:
        raise ValueError(f"represent must be one of {REPRESENT}, got {represent!r}")
    return represent


@eager_jit
def dpc_knn_scores(x: jax.Array, *, knn: int = 2, valid: Optional[jax.Array] = None, ties: str = "lower_index"):
    """DPC-kNN of one example: ``x: [N, C]``, ``valid: [N]`` bool or ``None`` -> ``(score [N], dist [N, N])``
    float32. ``score = delta * rho`` (steps 1-4 of the module docstring), ``-inf`` on invalid tokens;
    ``dist = cdist / sqrt(C)``. Not differentiated (the inputs pass through ``stop_gradient``). The one DPC-kNN of
    the library (HoT's token clustering and SparseVLM's recycling both use it). ``ties``: which of two tokens of
    equal density is "denser" for ``delta``: ``"lower_index"`` (a total order, so exactly one token has no denser
    one) or ``"strict"`` (neither, SparseVLM's code: ``rho_j > rho_i``)."""
    if ties not in ("lower_index", "strict"):
        raise ValueError(f"ties must be 'lower_index' or 'strict', got {ties!r}")
    check_rank(x, 2, "x")
    n, c = x.shape
    knn = check_count(knn, "knn", allow_zero=False)
    if knn > n:
        raise ValueError(f"knn={knn} exceeds the token count N={n}")
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    v = jax.lax.stop_gradient(x).astype(jnp.float32)
    v = v - jnp.mean(v, axis=0, keepdims=True)          # distances are shift-invariant; centring limits cancellation
    sq = jnp.sum(v * v, axis=-1)
    gram = jnp.einsum("ic,jc->ij", v, v, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)) / math.sqrt(c)
    d = jnp.where(jnp.eye(n, dtype=bool), 0.0, d)                  # exact zero self-distance
    pair = ok[:, None] & ok[None, :]
    near = -jax.lax.top_k(-jnp.where(ok[None, :], d, jnp.inf), knn)[0]        # [N, knn] smallest, self first
    near = jnp.where(jnp.isfinite(near), near, 0.0)          # fewer valid tokens than knn: missing ones count as 0
    rho = jnp.exp(-jnp.mean(near * near, axis=-1))
    idx = jnp.arange(n)
    denser = rho[None, :] > rho[:, None]
    if ties == "lower_index":
        denser = denser | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    denser = denser & ok[None, :]
    d_max = jnp.max(jnp.where(pair, d, 0.0))
    delta = jnp.min(jnp.where(denser, d, d_max), axis=-1)
    score = jnp.where(ok, delta * rho, -jnp.inf)
    return score, d


def dpc_knn(x: jax.Array, kept: int, *, knn: int = 2, valid: Optional[jax.Array] = None):
    """DPC-kNN centres and clusters of one example: ``x: [N, C]`` -> ``(centres [kept] int32 ascending,
    cluster [N] int32)`` with ``cluster[i]`` the slot (0..kept-1) of token ``i``'s nearest centre (its own slot for
    a centre, ``-1`` for an invalid token)."""
    n = x.shape[0]
    kept = check_count(kept, "kept", allow_zero=False)
    if kept > n:
        raise ValueError(f"kept={kept} exceeds the token count N={n}")
    if valid is not None:
        check_rank(valid, 1, "valid")
        check_leading(valid, (n,), "valid", "x")
    score, d = dpc_knn_scores(x, knn=knn, valid=valid)
    centres = jnp.sort(jax.lax.top_k(score, kept)[1]).astype(jnp.int32)
    rows = d[centres]
    if valid is not None:                                               # an invalid filler is nobody's centre
        rows = jnp.where(valid.astype(bool)[centres][:, None], rows, jnp.inf)
    slot = jnp.argmin(rows, axis=0).astype(jnp.int32)                   # [N] nearest centre (first on ties)
    slot = slot.at[centres].set(jnp.arange(kept, dtype=jnp.int32))
    if valid is not None:
        slot = jnp.where(valid.astype(bool), slot, -1)
    return centres, slot


@eager_jit
def hot_prune_step(x: jax.Array, *, keep: int, num_protected: int = 0, knn: int = 2,
                   valid: Optional[jax.Array] = None, represent: str = "cluster") -> ReductionStep:
    """TPC as a step: the first ``num_protected`` tokens and the ``keep`` DPC-kNN centres of the rest survive.

    ``x: [B, T, C]``, ``valid: [B, T]`` or ``None`` -> a pruning step with ``anchor: [B, P + keep]`` ascending.
    ``represent="cluster"``: a pruned token's ``assign`` is its centre's slot (``source`` follows it);
    ``"drop"``: ``-1``. With a validity mask an example with fewer valid candidates than ``keep`` fills the rest with
    invalid tokens, and the step's ``valid`` marks them."""
    check_rank(x, 3, "x")
    b, t = x.shape[:2]
    p = check_count(num_protected, "num_protected")
    keep = check_count(keep, "keep", allow_zero=False)
    _check_represent(represent)
    if keep > t - p:
        raise ValueError(f"keep={keep} exceeds the {t - p} unprotected tokens")
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "x")
    cand = x[:, p:]
    if valid is None:
        centres, slot = jax.vmap(lambda xb: dpc_knn(xb, keep, knn=knn))(cand)
    else:
        centres, slot = jax.vmap(lambda xb, vb: dpc_knn(xb, keep, knn=knn, valid=vb))(cand, valid[:, p:])
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    anchor = jnp.concatenate([prefix, centres + p], axis=1)
    kept_slot = jnp.where(slot >= 0, slot + p, -1)
    if represent == "drop":
        is_centre = jax.vmap(lambda c: jnp.zeros((t - p,), bool).at[c].set(True))(centres)
        kept_slot = jnp.where(is_centre, kept_slot, -1)
    assign = jnp.concatenate([prefix, kept_slot], axis=1)
    out_valid = None
    if valid is not None:
        out_valid = jnp.take_along_axis(valid.astype(bool), anchor, axis=1)
        assign = jnp.where(valid, assign, -1)
        dropped = jax.vmap(lambda a, k, ok: a.at[jnp.where(ok, t, k)].set(-1, mode="drop"))
        assign = dropped(assign, anchor, out_valid)        # an invalid anchor holds nothing
    return ReductionStep(assign=assign, anchor=anchor, num_out=p + keep, merges=False, valid=out_valid)


def hot_prune_flops(candidates: int, kept: int, dim: int) -> int:
    """DPC-kNN's cost on ``candidates`` tokens of width ``dim``: the distance matrix (``2 N^2 C`` for the Gram
    matrix plus ``4 N^2``), the knn density (``~knn N^2`` comparisons, counted as ``2 N^2``), ``delta`` (``2 N^2``) and
    the cluster argmin over the centres (``kept N``)."""
    n = candidates
    return 2 * n * n * dim + 8 * n * n + kept * n


def sincos_2d(positions: jax.Array, grid: tuple[int, int], dim: int) -> jax.Array:
    """Fixed 2-D sine-cosine code of raster positions: ``positions: [...] int`` (``row * gw + col``) ->
    ``[..., dim]`` float32. A quarter of ``dim`` each for sin/cos of the row and of the column at frequencies
    ``10000^(-i / (dim / 4))``; ``dim`` must be a multiple of 4. Positions outside the grid (e.g. a class token at
    ``-1``) get zeros."""
    gh, gw = int(grid[0]), int(grid[1])
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    q = dim // 4
    freq = jnp.asarray(1.0 / (10000.0 ** (np.arange(q) / q)), jnp.float32)
    pos = jnp.asarray(positions, jnp.int32)
    inside = (pos >= 0) & (pos < gh * gw)
    row = (pos // gw).astype(jnp.float32)[..., None] * freq
    col = (pos % gw).astype(jnp.float32)[..., None] * freq
    code = jnp.concatenate([jnp.sin(row), jnp.cos(row), jnp.sin(col), jnp.cos(col)], axis=-1)
    return jnp.where(inside[..., None], code, 0.0)


@dataclasses.dataclass(frozen=True)
class HoTPrune(Reducer):
    """HoT's TPC at one layer: keep the protected prefix and the ``keep`` (or ``keep_ratio`` of the) DPC-kNN
    centres of the hidden states (``info.hidden``, else ``state.x``), in original order."""

    keep_ratio: float = 1.0 / 3.0
    keep: Optional[int] = None
    knn: int = 2
    represent: str = "cluster"
    needs: ClassVar[frozenset] = frozenset({HIDDEN})

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        feats = info.hidden if info.hidden is not None else state.x
        t = state.num_tokens
        p = min(info.num_protected, t)
        if t - p <= 0:
            return identity_step(state.x.shape[0], t)
        knn = min(self.knn, t - p)
        return hot_prune_step(feats, keep=self.num_out(t, info) - p, num_protected=p, knn=knn, valid=state.valid,
                              represent=self.represent)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """Counted on all ``num_tokens`` tokens (an upper bound when a prefix is protected)."""
        return hot_prune_flops(num_tokens, candidates_kept(num_tokens, self.keep_ratio, self.keep), dim)


@register("hot", points=("vit", "vision", "connector"))
def _hot_layers(num_layers: int, keep_ratio: float = 1.0 / 3.0, keep: Optional[int] = None, knn: int = 2,
                represent: str = "cluster", layers=None) -> list[Optional[Reducer]]:
    """HoT's token pruning cluster (Li et al. 2024): keep the ``keep_ratio`` (or ``keep``) DPC-kNN centres
    (``knn`` nearest including self). ``represent="cluster"`` records each pruned token's centre in ``source`` (for
    ``unmerge``), ``"drop"`` prunes plainly. Pair with the learned recovery ``reduction.nnx.HoTRecovery``."""
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    knn = check_count(knn, "knn", allow_zero=False)
    _check_represent(represent)
    red = HoTPrune(keep_ratio=keep_ratio, keep=keep, knn=knn, represent=represent)
    chosen = set(default_layers(num_layers) if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = ["dpc_knn_scores", "dpc_knn", "hot_prune_step", "hot_prune_flops", "sincos_2d", "HoTPrune"]
