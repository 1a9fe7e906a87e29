"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023), as the reference ``tome/merge.py`` behaves.

The plan (which token goes where) is computed from a metric (in ViTs: keys averaged over heads) and
returned as a :class:`~reduction.step.ReductionStep`; :func:`~reduction.step.apply_step` does the
size-weighted merge. Reference behaviour reproduced here:

* tokens split by parity: A = even positions (sources), B = odd positions (destinations);
* cosine similarity of the metric in float32, ``scores = A @ B^T``;
* the class token (index 0, in A) never merges away; a distillation token (index 1 = B[0]) never
  receives a merge;
* each A token's best B partner, A tokens ordered by that score (descending, stable), the top ``r``
  merge into their partner; several may share one destination;
* ``r`` is clamped per layer to ``(T - protected) // 2``;
* (this port) ``num_protected = P`` protects a longer prefix, e.g. the class token and 4 registers of
  DINOv2-reg: the protected tokens at even positions never merge away, those at odd positions never receive a
  merge, and all ``P`` keep their slots ``0 .. P - 1`` (the reference has no registers; ``P = 1`` and ``P = 2``
  are its class and distillation cases exactly);
* output order ``[unmerged A, B]``; the unmerged A tokens are in ascending original order when there is a
  class token and in descending-score order otherwise; with a distillation token the order is
  ``[cls, dist, unmerged A[1:], B[1:]]``.

Variants: :func:`kth_bipartite_soft_matching` (groups of ``k``, the last of each group is a destination,
every other token merges, tail tokens dropped) and :func:`random_bipartite_soft_matching` (a random
permutation from a PRNG key or an injected one; optional class-token protection).

Deliberate deviations from the reference (documented, tested):
* Cosine normalisation divides by ``max(||m||, 1e-12)``, so a zero-norm metric row has similarity 0 with
  everything instead of the reference's NaN (which sorts first in PyTorch and gets merged).
* NaN in the metric: a NaN similarity is replaced by ``-inf`` so it is never chosen as a best match and
  never ranks first; the NaN in ``x`` itself still propagates through the merge into the output, so it
  stays visible instead of being silently averaged into a clean plan. Rows left at ``-inf`` that way
  still rank before the class token, so the class token survives even when ``r`` is at the cap.
* The merge order is stable (ties keep the lower index first); PyTorch's default argsort is not, so the
  reference is only reproducible on tie-free inputs.
* ToMe's ``unmerge`` closure ignores the distillation reorder; :func:`~reduction.state.unmerge` follows the
  ``source`` map and is correct for every layout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reduction._compiled import eager_jit
from reduction.schedule import tome_clamp
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, identity_step, merge_step
from reduction.validate import check_count, check_leading, check_rank

_EPS = 1e-12


@eager_jit
def cosine_normalize(metric: jax.Array) -> jax.Array:
    """``[..., C] -> [..., C]`` float32 unit vectors; zero vectors stay zero (no NaN)."""
    m = metric.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(m * m, axis=-1, keepdims=True))
    return m / jnp.maximum(norm, _EPS)


def _descending_rank(values: jax.Array) -> jax.Array:
    """Position of every entry in the stable descending order of ``values: [n]`` -> ``[n]`` int32: ties keep
    index order, ``-0.0`` ties with ``+0.0`` and NaN counts as ``-inf``. A count over an ``[n, n]``
    comparison, no sort."""
    values = jnp.where(jnp.isnan(values), -jnp.inf, values)
    n = values.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)
    ahead = (values[None, :] > values[:, None]) | ((values[None, :] == values[:, None]) & (iota[None, :] < iota[:, None]))
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


def _stable_descending(values: jax.Array) -> jax.Array:
    """Indices that sort ``values: [n]`` descending -> ``[n]`` int32, as ``argsort(-values, stable=True)``
    with NaN as ``-inf``: the inverse of :func:`_descending_rank`, by one scatter. For the short rows
    merging orders (PiToMe's ``T``) this is about 0.6x the time of XLA's CPU sort."""
    n = values.shape[-1]
    return jnp.zeros((n,), jnp.int32).at[_descending_rank(values)].set(jnp.arange(n, dtype=jnp.int32),
                                                                       unique_indices=True)


def _first_argmax(scores: jax.Array, best: jax.Array) -> jax.Array:
    """``argmax`` over the last axis given its ``max`` (ties -> first index). ``[..., n] -> [...]`` int32.

    Written as a masked min over an iota: XLA's CPU variadic argmax reduction is several times slower.
    """
    n = scores.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)
    return jnp.min(jnp.where(scores == best[..., None], iota, n), axis=-1).clip(max=n - 1)


def _output_layout(n_unm: int, nb: int, pa: int, pb: int) -> np.ndarray:
    """Static map from the base layout ``[unm, B]`` to the output slots.

    The first ``pa`` unmerged A tokens and the first ``pb`` B tokens are the protected prefix (positions
    ``0, 2, ..`` and ``1, 3, ..``); they go back to their own positions ``0 .. pa + pb - 1`` (for the class and
    distillation tokens ``[unm0, B0, unm1.., B1..]``), the other unmerged A tokens follow, then the other B."""
    p = pa + pb
    unm = np.concatenate([2 * np.arange(pa), p + np.arange(n_unm - pa)])
    b = np.concatenate([2 * np.arange(pb) + 1, p + n_unm - pa + np.arange(nb - pb)])
    return np.concatenate([unm, b]).astype(np.int32)


def _merge_order_key(node_max: jax.Array, pa: int = 0, *, class_token: Optional[bool] = None) -> jax.Array:
    """``[na] -> [na]`` float32 key whose descending order is the merge order of the A tokens.

    ``-inf`` rows (every partner blocked or NaN) rank after every finite one but before the class token,
    which ranks last so it never merges, even when ``r`` reaches the cap and other rows tie at ``-inf``. The
    first ``pa`` A tokens (the protected ones at even positions) all rank last.
    ``-0.0`` becomes ``+0.0`` so the two tie as in a comparison sort (``top_k`` orders by bit pattern).
    """
    key = jnp.maximum(node_max, jnp.finfo(jnp.float32).min)
    key = jnp.where(key == 0, 0.0, key)
    if class_token is not None:                     # the older spelling: only a class token is protected
        pa = int(class_token)
    if pa:
        key = jnp.where(np.arange(key.shape[0]) < pa, -jnp.inf, key)
    return key


def _bipartite_one(metric: jax.Array, r: int, pa: int, pb: int):
    """Plan for one example. ``metric: [T, Cm] -> assign [T], anchor [T - r], movers [r]``. The first ``pa`` A
    tokens never merge away and the first ``pb`` B tokens never receive a merge (the protected prefix).

    Sort-free: the ``r`` movers are ``top_k`` of the merge-order key (ties -> lower index, as a stable
    sort). With a class token the unmerged A tokens keep ascending order, so their slots and the anchor
    list follow from counting movers (``[na, r]`` and ``[n_unm, r]`` comparisons); without one they keep
    descending-score order, from the pairwise rank of all of A.
    """
    m = cosine_normalize(jax.lax.stop_gradient(metric))
    a, b = m[0::2], m[1::2]
    na, nb = a.shape[0], b.shape[0]
    n_unm = na - r
    scores = jnp.einsum("ic,jc->ij", a, b, precision=jax.lax.Precision.HIGHEST)
    blocked = jnp.isnan(scores)
    if pb:
        blocked = blocked | (np.arange(nb) < pb)[None, :]
    scores = jnp.where(blocked, -jnp.inf, scores)
    node_max = jnp.max(scores, axis=-1)
    node_idx = _first_argmax(scores, node_max)
    key = _merge_order_key(node_max, pa)
    iota = jnp.arange(na, dtype=jnp.int32)
    if pa:                                          # unmerged A in ascending original order
        movers = jax.lax.top_k(key, r)[1].astype(jnp.int32)
        merged = jnp.any(iota[:, None] == movers[None, :], axis=-1)
        unm_slot = iota - jnp.sum(movers[None, :] < iota[:, None], axis=-1, dtype=jnp.int32)
        # The k-th unmerged A token is k plus the number of movers before it; a mover j precedes it
        # when the count of non-movers before j (j minus the movers before j) is at most k.
        gaps = movers - jnp.sum(movers[None, :] < movers[:, None], axis=-1, dtype=jnp.int32)
        k = jnp.arange(n_unm, dtype=jnp.int32)
        unm_tok = k + jnp.sum(gaps[None, :] <= k[:, None], axis=-1, dtype=jnp.int32)
    else:                                           # unmerged A in descending-score order
        rank = _descending_rank(key)                # a full top_k costs as much as a sort
        order = jnp.zeros((na,), jnp.int32).at[rank].set(iota, unique_indices=True)
        movers, unm_tok = order[:r], order[r:]
        merged = rank < r
        unm_slot = rank - r
    slot_a = jnp.where(merged, n_unm + node_idx, unm_slot)
    anchor_base = jnp.concatenate([2 * unm_tok, 2 * jnp.arange(nb, dtype=jnp.int32) + 1])

    layout = _output_layout(n_unm, nb, max(pa, pb), pb)   # distill_token alone: the reference's reorder
    slot_b = jnp.asarray(layout[n_unm:])
    anchor = anchor_base
    if pb:                                          # the identity layout otherwise: no gathers
        slot_a = jnp.asarray(layout)[slot_a]
        anchor = anchor_base[np.argsort(layout)]
    # Interleave A (even positions) and B (odd positions) back into token order.
    assign = jnp.stack([slot_a[:nb], slot_b], axis=-1).reshape(-1)
    if na > nb:
        assign = jnp.concatenate([assign, slot_a[nb:]])
    return assign, anchor, 2 * movers


def _protected_split(class_token: bool, distill_token: bool, num_protected: Optional[int]) -> tuple[int, int]:
    """``(pa, pb)``: protected tokens among A (even positions) and B (odd positions)."""
    if num_protected is None:
        return int(class_token), int(distill_token)
    if class_token or distill_token:
        raise ValueError("give num_protected or class_token / distill_token, not both")
    p = check_count(num_protected, "num_protected")
    return (p + 1) // 2, p // 2


@eager_jit
def bipartite_soft_matching(
    metric: jax.Array, *, r: int, class_token: bool = False, distill_token: bool = False,
    num_protected: Optional[int] = None,
) -> ReductionStep:
    """ToMe's plan. ``metric: [B, T, Cm]`` -> a step mapping ``T`` tokens to ``T - r'`` slots, where
    ``r' = min(r, (T - protected) // 2)``. ``r' = 0`` gives the identity step.

    ``num_protected = P`` (instead of the flags) protects the first ``P`` tokens (class token, registers): they
    neither merge away nor receive a merge and keep their slots ``0 .. P - 1``. ``P = 1`` is ``class_token=True``
    and ``P = 2`` is ``class_token=True, distill_token=True``, bit for bit."""
    check_rank(metric, 3, "metric")
    r = check_count(r, "r")
    bsz, t = metric.shape[:2]
    pa, pb = _protected_split(class_token, distill_token, num_protected)
    r = tome_clamp(t, r, pa + pb)
    if r == 0:
        return identity_step(bsz, t)
    assign, anchor, movers = jax.vmap(lambda m: _bipartite_one(m, r, pa, pb))(metric)
    return merge_step(assign, anchor, movers)


# -- variants --------------------------------------------------------------------------------------------


def _best_partner(a: jax.Array, b: jax.Array) -> jax.Array:
    """Index of the most similar row of ``b`` for every row of ``a`` (unit vectors, float32).

    ``a: [Ta, Cm], b: [Tb, Cm] -> [Ta] int32``; NaN similarities count as ``-inf``; ties pick the first.
    """
    scores = jnp.einsum("ic,jc->ij", a, b, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    return _first_argmax(scores, jnp.max(scores, axis=-1))


@eager_jit
def kth_bipartite_soft_matching(metric: jax.Array, *, k: int) -> ReductionStep:
    """ToMe's ``kth_bipartite_soft_matching``: ``metric: [B, T, Cm]`` -> a step ``T -> T // k`` slots.

    The first ``(T // k) * k`` tokens form ``T // k`` groups of ``k`` consecutive tokens; the last token of
    each group is a destination (B), the other ``k - 1`` are sources (A) and *all* of them merge into their
    most similar destination (any group). Output: the destinations in original order. As in the reference
    there is no class-token protection and no top-r step, and the ``T - (T // k) * k`` tail tokens are
    dropped (``assign == -1``: their mass leaves the state). ``k <= 1`` gives the identity step.
    """
    check_rank(metric, 3, "metric")
    k = check_count(k, "k")
    bsz, t = metric.shape[:2]
    if k <= 1:
        return identity_step(bsz, t)
    if k > t:
        raise ValueError(f"k must be <= the number of tokens T={t}, got {k}")
    groups = t // k
    a_pos = (np.arange(groups)[:, None] * k + np.arange(k - 1)[None, :]).reshape(-1).astype(np.int32)
    b_pos = (np.arange(groups) * k + (k - 1)).astype(np.int32)

    def one(m):
        m = cosine_normalize(jax.lax.stop_gradient(m))
        dst = _best_partner(m[a_pos], m[b_pos])
        assign = jnp.full((t,), -1, jnp.int32).at[b_pos].set(jnp.arange(groups, dtype=jnp.int32))
        return assign.at[a_pos].set(dst)

    assign = jax.vmap(one)(metric)
    return merge_step(assign, jnp.broadcast_to(jnp.asarray(b_pos), (bsz, groups)))


@eager_jit
def random_bipartite_soft_matching(
    metric: jax.Array,
    *,
    r: int,
    key: Optional[jax.Array] = None,
    permutation: Optional[jax.Array] = None,
    class_token: bool = False,
) -> ReductionStep:
    """ToMe's ``random_bipartite_soft_matching``: ``metric: [B, T, Cm]`` -> a step ``T -> T - r`` slots.

    Each example draws a random permutation of its tokens; the first ``r`` are sources (A), the rest
    destinations (B), and every source merges into its most similar destination. Output: the destinations
    in permutation order. The reference protects nothing (``class_token=False``, the default);
    ``class_token=True`` keeps token 0 out of the permutation and puts it first in the output, untouched.

    Args:
      metric: ``[B, T, Cm]`` similarity features.
      r: static number of sources; ``0 <= r <= T - protected - 1`` (at least one destination).
      key: a PRNG key; the permutation is ``argsort(uniform(key, [B, T']))`` with ``T' = T - protected``.
      permutation: ``[B, T']`` int token indices (in ``[protected, T)``) to use instead of ``key``, e.g.
        to reproduce a reference run exactly.
      class_token: protect token 0.
    """
    check_rank(metric, 3, "metric")
    r = check_count(r, "r")
    bsz, t = metric.shape[:2]
    p = int(class_token)
    if r == 0:
        return identity_step(bsz, t)
    if r > t - p - 1:
        raise ValueError(f"r must leave at least one destination: r <= {t - p - 1} for T={t}, got {r}")
    if permutation is None:
        if key is None:
            raise ValueError("key is required when no permutation is given")
        permutation = jnp.argsort(jax.random.uniform(key, (bsz, t - p)), axis=1) + p
    else:
        check_rank(permutation, 2, "permutation")
        check_leading(permutation, (bsz, t - p), "permutation", "metric minus protected tokens")
    perm = permutation.astype(jnp.int32)
    front = jnp.arange(p, dtype=jnp.int32)
    n_dst = t - p - r

    def one(m, perm):
        m = cosine_normalize(jax.lax.stop_gradient(m))
        src, dst = perm[:r], perm[r:]
        best = _best_partner(m[src], m[dst])
        assign = jnp.zeros((t,), jnp.int32).at[front].set(front)
        assign = assign.at[dst].set(p + jnp.arange(n_dst, dtype=jnp.int32)).at[src].set(p + best)
        return assign, jnp.concatenate([front, dst])

    assign, anchor = jax.vmap(one)(metric, perm)
    return merge_step(assign, anchor)


@eager_jit
def tome_merge(
    state: TokenState,
    metric: jax.Array,
    *,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    num_protected: Optional[int] = None,
) -> TokenState:
    """One ToMe layer on a token state: ``x: [B, T, C] -> [B, T - r', C]`` (``r'`` after the clamp).

    ``metric: [B, T, Cm]`` (keys averaged over heads). Sizes add up, the merged feature is the
    size-weighted average, the source map follows. Gradients flow through ``x``; the plan does not
    depend differentiably on the metric (as in the reference, which plans under ``no_grad``).
    """
    check_rank(metric, 3, "metric")
    check_leading(metric, state.x.shape[:2], "metric", "state.x")
    step = bipartite_soft_matching(metric, r=r, class_token=class_token, distill_token=distill_token,
                                   num_protected=num_protected)
    return apply_step(state, step)


def merged_tokens(num_tokens: int, r: int, *, class_token: bool = False, distill_token: bool = False,
                  num_protected: Optional[int] = None) -> int:
    """Static output count of :func:`bipartite_soft_matching` (the clamp included)."""
    return num_tokens - tome_clamp(num_tokens, r, sum(_protected_split(class_token, distill_token, num_protected)))


__all__ = [
    "bipartite_soft_matching",
    "kth_bipartite_soft_matching",
    "random_bipartite_soft_matching",
    "tome_merge",
    "cosine_normalize",
    "merged_tokens",
]
