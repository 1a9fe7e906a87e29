"""DART: duplication-aware token reduction (Wen et al., EMNLP 2025), batched and jittable.

Two entry points:

* :func:`dart_keep_indices` -- the LLM-side selection, run once during prefill before decoder layer
  ``K`` (2 in the paper) on the outputs of layer ``K - 1``. It returns the sorted positions of every token
  that survives: all non-image tokens plus the kept image tokens of every image.
* :class:`DartViT` (registered as ``"dart"``) -- the same greedy duplicate removal inside a ViT, so the
  idea can be compared with the other pruning methods on image classifiers.

The selection, for one image span of ``L`` tokens (the reference ``get_retained_image_token``):

1. pivots: the ``num_image_pivots`` image tokens with the largest L1 norm of their key (post-RoPE, heads
   concatenated) and the ``num_text_pivots`` tokens with the largest key L1 norm among the positions
   after the span;
2. candidates = the image tokens that are not pivots;
3. for each pivot in turn, the ``TOKEN_TOPK = budget // (num_image_pivots + num_text_pivots)`` candidates
   with the lowest cosine similarity (final-norm hidden states) to that pivot are kept and leave the
   candidate set before the next pivot looks;
4. kept image tokens = image pivots + all picks: ``4 + 8 * (budget // 8)`` with the defaults
   (:func:`dart_kept_per_image`; 196/132/68 for budgets 192/128/64).

Choices this port makes explicit (the reference has batch size 1 and one span):

* ``image_starts`` is traced, ``[B]`` or ``[B, M]`` for ``M`` images per sequence, each with its own
  budget; the image length is static and shared. Spans must lie inside ``[0, T)`` and must not overlap:
  concrete starts that break this raise ``ValueError`` naming ``image_starts``; traced ones cannot be checked
  before the compile and are clipped to ``[0, T - image_len]`` (:func:`reduction.spans.check_span_bounds`), so
  the kept set, the span mask and the static output length stay consistent.
* Text pivots of an image are taken among positions after *that* image's span that are valid and not
  inside any image span (the Qwen reference would treat later images as text; this port does not).
* Missing text pivots (fewer valid text positions after the span than ``num_text_pivots``): the pivot
  slot still takes its ``TOKEN_TOPK`` picks, scored against a zero vector, i.e. every candidate has
  similarity 0 and the earliest remaining positions are taken. For the visit order a missing pivot
  counts as position ``last valid position + 1 + j`` (``j`` its slot), which padding does not move. This
  keeps the kept count static; the reference never meets this case (LLaVA prompts always end with text).
* Padding: invalid slots are never pivots and never image candidates (image spans must be valid
  tokens); they are returned among the non-image positions so ``K`` stays static and stay invalid.
* Budget at or above the span: the reference crashes (``topk`` out of range); here the per-pivot count
  is clamped to the candidates left, so every image token is kept, and a ``UserWarning`` is raised at
  trace time (see also :func:`dart_keeps_all`).
* Pivot order (the greedy result depends on it). Default ``"cpython_set"``: the reference's order, the
  iteration order of ``set(image_pivots + text_pivots)`` (CPython 3.11/3.12 small-int hashing, emulated on
  device by :func:`cpython_set_order`), computed on the pivots' **position ids** rather than on their slot
  in the (possibly padded) batch. In the reference (batch 1, no padding) the two coincide, so the default
  gives the reference's kept set; with left padding the position ids still count from the first real
  token, so an example keeps the same tokens alone or batched with longer prompts. ``"ascending"`` visits
  the pivots by position: not the reference (5-9% of a 576-token span's kept set differs), kept as the
  order-ablation that depends on no CPython implementation detail.
* Cosine similarity in float32 like ``torch.nn.functional.cosine_similarity``: each norm clamped at
  ``1e-8``, so a zero vector has similarity 0 with everything. Ties between candidates: lower position
  first (``lax.top_k`` order).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.spans import check_concrete_spans
from reduction import flops as flops_lib
from reduction.reducers import HIDDEN, KEYS, LayerInfo, Reducer, candidates_kept, pruned_count, register
from reduction.spans import (assemble as _assemble, check_span_bounds as _check_span_bounds,
                             check_starts as _check_starts, span_mask as _span_mask)
from reduction.state import TokenState
from reduction.step import prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

COS_EPS = 1e-8
PIVOT_ORDERS = ("ascending", "cpython_set")
PIVOT_SOURCES = ("keys", "hidden")


# -- static counts ----------------------------------------------------------------------------------


def dart_token_topk(budget: int, num_pivots_total: int = 8) -> int:
    """The reference's per-pivot pick count ``TOKEN_TOPK = budget // num_pivots_total``."""
    budget = check_count(budget, "budget")
    num_pivots_total = check_count(num_pivots_total, "num_pivots_total", allow_zero=False)
    return budget // num_pivots_total


def dart_kept_per_image(image_len: int, budget: int, num_image_pivots: int = 4, num_pivots_total: int = 8) -> int:
    """Image tokens DART keeps per image: ``min(image_len, num_image_pivots + num_pivots_total * (budget //
    num_pivots_total))`` (the clamp replaces the reference's crash when the budget exceeds the span)."""
    image_len = check_count(image_len, "image_len", allow_zero=False)
    num_image_pivots = check_count(num_image_pivots, "num_image_pivots")
    topk = dart_token_topk(budget, num_pivots_total)
    return min(image_len, num_image_pivots + num_pivots_total * topk)


def dart_keeps_all(image_len: int, budget: int, num_image_pivots: int = 4, num_pivots_total: int = 8) -> bool:
    """True when the budget rule keeps every image token (nothing is pruned)."""
    return dart_kept_per_image(image_len, budget, num_image_pivots, num_pivots_total) >= image_len


def _pivot_step_counts(image_len: int, topk: int, num_image_pivots: int, num_pivots: int) -> list[int]:
    """Static picks of each greedy step: ``TOKEN_TOPK`` clamped to the candidates left."""
    left = image_len - num_image_pivots
    counts = []
    for _ in range(num_pivots):
        k = max(0, min(topk, left))
        counts.append(k)
        left -= k
    return counts


# -- CPython set iteration order ----------------------------------------------------------------------

_PYSET_MINSIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


def _resize_target(minused: int) -> int:
    size = _PYSET_MINSIZE
    while size <= minused:
        size <<= 1
    return size


def _insert_clean(table: jax.Array, values: jax.Array, item: jax.Array, active=True) -> jax.Array:
    """Place ``item`` (an index into ``values``) in an open-addressing ``table`` like CPython's sets.

    ``table: [S]`` int32 holding item indices or ``-1``; the hash of a small non-negative int is itself.
    Linear probing over up to 10 slots when they fit before the table end, then perturbation. An inactive
    insert (``active`` False) leaves the table unchanged.
    """
    size = table.shape[0]
    mask = size - 1
    h = values[jnp.maximum(item, 0)]
    probe = jnp.arange(_LINEAR_PROBES + 1, dtype=jnp.int32)

    def body(carry):
        i, perturb, _ = carry
        window = i + probe
        allowed = jnp.where(i + _LINEAR_PROBES <= mask, True, probe == 0)
        empty = (table[jnp.minimum(window, mask)] < 0) & allowed
        slot = jnp.where(jnp.any(empty), i + jnp.argmax(empty).astype(jnp.int32), -1)
        perturb = perturb >> _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
        return i, perturb, slot

    active = jnp.asarray(active)
    init = (h & mask, h, jnp.where(active, -1, 0).astype(jnp.int32))
    _, _, slot = jax.lax.while_loop(lambda c: c[2] < 0, body, init)
    return table.at[slot].set(jnp.where(active, item, table[slot]))


def _reinsert(old: jax.Array, values: jax.Array, new_size: int) -> jax.Array:
    """Re-insert the live entries of ``old`` in slot order into an empty table of ``new_size``."""
    table = jnp.full((new_size,), -1, jnp.int32)
    for s in range(old.shape[0]):  # static loop over table slots (at most a few dozen)
        table = _insert_clean(table, values, old[s], old[s] >= 0)
    return table


@eager_jit
def cpython_set_order(values: jax.Array) -> jax.Array:
    """Iteration order of ``list(set(values).copy())`` for distinct non-negative ints, on device.

    ``values: [P]`` int32 in insertion order -> ``[P]`` int32 permutation: ``values[order]`` is the order
    in which CPython (3.11/3.12) iterates the set. Emulates ``set(list)`` (8-slot table, resize to the
    smallest power of two above ``4 * used`` once ``5 * fill >= 3 * mask``) and ``set.copy()``.
    """
    check_rank(values, 1, "values")
    values = values.astype(jnp.int32)
    num = values.shape[0]
    size = _PYSET_MINSIZE
    table = jnp.full((size,), -1, jnp.int32)
    for j in range(num):  # static loop over pivots
        table = _insert_clean(table, values, jnp.int32(j))
        used = j + 1
        if used * 5 >= (size - 1) * 3:
            size = _resize_target(used * 4)
            table = _reinsert(table, values, size)
    # set.copy(): one resize up front if needed; identical slots when the size does not change.
    copy_size = _PYSET_MINSIZE
    if num * 5 >= (copy_size - 1) * 3:
        copy_size = _resize_target(num * 2)
    if copy_size != size:
        table = _reinsert(table, values, copy_size)
    live = jnp.nonzero(table >= 0, size=num)[0]
    return table[live]


# -- selection -----------------------------------------------------------------------------------------


def _cos_normalize(v: jax.Array) -> jax.Array:
    """Rows divided by ``max(||v||, 1e-8)`` in float32 (torch ``cosine_similarity`` convention)."""
    v = v.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    return v / jnp.maximum(norm, COS_EPS)


def _visit_order(pivot_pos: jax.Array, pivot_order: str) -> jax.Array:
    """Permutation ``[P]`` visiting the pivots, from their position ids ``pivot_pos: [P]`` (distinct, >= 0,
    image pivots first in descending key norm, then text pivots likewise: the reference's insertion order)."""
    if pivot_order == "ascending":
        return jnp.argsort(pivot_pos, stable=True).astype(jnp.int32)
    return cpython_set_order(pivot_pos)


def _select_one_image(hn: jax.Array, norm_l1: jax.Array, text_ok: jax.Array, pos_ids: jax.Array,
                      next_pos: jax.Array, start: jax.Array, *, image_len: int, counts: Sequence[int], num_image_pivots: int,
                      num_text_pivots: int, pivot_order: str) -> jax.Array:
    """Kept image positions (slots) of one span, sorted.

    ``hn: [T, C]`` unit rows, ``norm_l1: [T]``, ``text_ok: [T]`` bool (valid non-image slots), ``pos_ids: [T]``
    int32 position ids (only used to order the pivots), ``next_pos`` one past the last valid position id,
    ``start`` the span's first slot.
    """
    t = hn.shape[0]
    img_h = jax.lax.dynamic_slice_in_dim(hn, start, image_len, axis=0)           # [L, C]
    img_l1 = jax.lax.dynamic_slice_in_dim(norm_l1, start, image_len, axis=0)     # [L]
    _, img_piv = jax.lax.top_k(img_l1, num_image_pivots)                         # descending L1, ties: low index
    img_piv = img_piv.astype(jnp.int32)
    slots = [start + img_piv]
    present = [jnp.ones((num_image_pivots,), bool)]
    if num_text_pivots:
        slot = jnp.arange(t, dtype=jnp.int32)
        ok = text_ok & (slot >= start + image_len)
        top, txt_piv = jax.lax.top_k(jnp.where(ok, norm_l1, -jnp.inf), num_text_pivots)
        slots.append(txt_piv.astype(jnp.int32))
        present.append(jnp.isfinite(top))
    slots = jnp.concatenate(slots)
    present = jnp.concatenate(present)
    # order by position ids; a missing pivot counts as a position past the last valid one (padding-free)
    spare = next_pos + jnp.arange(slots.shape[0], dtype=jnp.int32)
    visit = _visit_order(jnp.where(present, pos_ids[slots], spare), pivot_order)
    slots, present = slots[visit], present[visit]

    cand = jnp.ones((image_len,), bool).at[img_piv].set(False)
    for i, k in enumerate(counts):  # static: one step per pivot, no loop over tokens
        if k == 0:
            continue
        hp = jnp.where(present[i], hn[slots[i]], 0.0)
        sim = jnp.einsum("lc,c->l", img_h, hp, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(jnp.isnan(sim), jnp.inf, sim)
        _, pick = jax.lax.top_k(jnp.where(cand, -sim, -jnp.inf), k)
        cand = cand.at[pick].set(False)
    kept = num_image_pivots + sum(counts)
    local = jnp.nonzero(~cand, size=kept)[0].astype(jnp.int32)
    return start + local


def _check_dart_spans(hidden, keys, *, image_starts, image_len, **_):
    """Eager value check (reduction._compiled): the image spans lie inside the sequence."""
    if getattr(hidden, "ndim", 0) == 3:
        check_concrete_spans(image_starts, image_len, hidden.shape[1], hidden.shape[0])


@eager_jit(check=_check_dart_spans)
def dart_keep_indices(
    hidden: jax.Array,
    keys: jax.Array,
    *,
    image_starts: jax.Array,
    image_len: int,
    budget: int,
    valid: Optional[jax.Array] = None,
    positions: Optional[jax.Array] = None,
    num_image_pivots: int = 4,
    num_text_pivots: int = 4,
    pivot_source: str = "keys",
    pivot_order: str = "cpython_set",
) -> jax.Array:
    """DART's kept positions for a batch of sequences with ``M`` images each.

    Args:
      hidden: ``[B, T, C]`` hidden states of layer ``K - 1`` already passed through the LM's final norm.
      keys: ``[B, T, Ck]`` post-RoPE keys of layer ``K - 1``, heads concatenated.
      image_starts: ``[B]`` or ``[B, M]`` int32 (traced) first position of every image span.
      image_len: static tokens per image. budget: static image tokens to keep per image, before the
        ``num_image_pivots + P * (budget // P)`` rule (``P`` = all pivots, see :func:`dart_kept_per_image`).
      valid: ``[B, T]`` bool or ``None``; invalid slots are never pivots or image candidates (they are still
        returned as non-image tokens so ``K`` stays static).
      positions: ``[B, T]`` int position ids (>= 0; negatives are clipped to 0) or ``None`` for
        ``cumsum(valid) - 1`` (each valid token's index in its unpadded prompt; ``0..T-1`` without
        ``valid``). They only order the pivots, so the reference's order does not move with left padding.
      pivot_source: ``"keys"`` (reference: L1 norm of the keys) or ``"hidden"`` (L1 norm of ``hidden``).
      pivot_order: ``"cpython_set"`` (default, the reference's order) or ``"ascending"`` (see the module
        docstring).

    Returns:
      ``keep_idx: [B, K]`` int32 ascending, ``K = T - M * (image_len - kept_per_image)``. Not
      differentiable (integer output).
    """
    check_rank(hidden, 3, "hidden")
    check_rank(keys, 3, "keys")
    b, t = hidden.shape[:2]
    check_leading(keys, (b, t), "keys", "hidden")
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "hidden")
    if positions is not None:
        check_rank(positions, 2, "positions")
        check_leading(positions, (b, t), "positions", "hidden")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"positions must be an integer array, got dtype {positions.dtype}")
    starts = _check_starts(image_starts, b)
    num_images = starts.shape[1]
    image_len = check_count(image_len, "image_len", allow_zero=False)
    budget = check_count(budget, "budget")
    num_image_pivots = check_count(num_image_pivots, "num_image_pivots")
    num_text_pivots = check_count(num_text_pivots, "num_text_pivots")
    if num_image_pivots + num_text_pivots == 0:
        raise ValueError("num_image_pivots + num_text_pivots must be >= 1")
    if pivot_source not in PIVOT_SOURCES:
        raise ValueError(f"pivot_source must be one of {PIVOT_SOURCES}, got {pivot_source!r}")
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
    if num_images * image_len > t:
        raise ValueError(f"image_len={image_len} x {num_images} images exceeds the sequence length T={t}")
    starts = _check_span_bounds(starts, image_len, t)

    num_pivots = num_image_pivots + num_text_pivots
    kept = dart_kept_per_image(image_len, budget, num_image_pivots, num_pivots)
    num_out = t - num_images * (image_len - kept)
    if kept >= image_len:
        warnings.warn(
            f"DART budget={budget} keeps all {image_len} image tokens per image (kept rule gives "
            f"{num_image_pivots} + {num_pivots} * {budget // num_pivots}); nothing is pruned",
            UserWarning, stacklevel=2)
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    counts = _pivot_step_counts(image_len, budget // num_pivots, num_image_pivots, num_pivots)

    src = keys if pivot_source == "keys" else hidden
    norm_l1 = jnp.sum(jnp.abs(jax.lax.stop_gradient(src).astype(jnp.float32)), axis=-1)   # [B, T]
    hn = _cos_normalize(jax.lax.stop_gradient(hidden))                                  # [B, T, C]
    ok = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    if positions is None:
        positions = jnp.cumsum(ok.astype(jnp.int32), axis=1) - 1
    pos_ids = jnp.maximum(positions.astype(jnp.int32), 0)

    def one(hn_b, l1_b, ok_b, pos_b, starts_b):
        text_ok = ok_b & ~_span_mask(starts_b, image_len, t)
        next_pos = jnp.max(jnp.where(ok_b, pos_b, -1)) + 1
        select = lambda s: _select_one_image(
            hn_b, l1_b, text_ok, pos_b, next_pos, s, image_len=image_len, counts=counts,
            num_image_pivots=num_image_pivots, num_text_pivots=num_text_pivots, pivot_order=pivot_order)
        kept_pos = jax.vmap(select)(starts_b)                                             # [M, kept]
        return _assemble(starts_b, kept_pos, image_len, t, num_out)

    return jax.vmap(one)(hn, norm_l1, ok, pos_ids, starts)


# -- ViT variant -----------------------------------------------------------------------------------------


@eager_jit
def dart_vit_keep_indices(x: jax.Array, *, keep: int, num_protected: int = 1, num_pivots: int = 8,
                          keys: Optional[jax.Array] = None) -> jax.Array:
    """DART-style duplicate removal on ViT tokens.

    ``x: [B, T, C]`` (similarity features), ``keys: [B, T, Ck]`` or ``None`` (pivot norms; default ``x``).
    The first ``num_protected`` tokens (class/distill/registers) are always kept and are never pivots or
    candidates. Among the other ``T - P`` tokens: ``num_pivots`` pivots = largest key L1 norm; each
    pivot in ascending position order keeps the least similar remaining candidates, ``per = (keep -
    num_protected - num_pivots) // num_pivots`` each, and the remainder (``keep - protected - pivots -
    per * num_pivots``) goes to the first pivot, so exactly ``keep`` tokens survive. Returns ``[B, keep]``
    int32 ascending.
    """
    check_rank(x, 3, "x")
    b, t = x.shape[:2]
    keep = check_count(keep, "keep", allow_zero=False)
    num_protected = check_count(num_protected, "num_protected")
    num_pivots = check_count(num_pivots, "num_pivots", allow_zero=False)
    if keep > t:
        raise ValueError(f"keep={keep} exceeds the token count T={t}")
    if keep < num_protected:
        raise ValueError(f"keep={keep} is smaller than num_protected={num_protected}")
    if keys is not None:
        check_rank(keys, 3, "keys")
        check_leading(keys, (b, t), "keys", "x")
    avail = t - num_protected
    if keep == t or avail == 0:
        return jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (b, keep))
    pivots = min(num_pivots, keep - num_protected)
    if pivots == 0:
        return jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (b, keep))
    rest = keep - num_protected - pivots
    per = rest // pivots
    counts = [per + (rest - per * pivots)] + [per] * (pivots - 1)
    src = x if keys is None else keys

    def one(x_b, src_b):
        hn = _cos_normalize(jax.lax.stop_gradient(x_b[num_protected:]))               # [A, C]
        l1 = jnp.sum(jnp.abs(jax.lax.stop_gradient(src_b[num_protected:]).astype(jnp.float32)), axis=-1)
        _, piv = jax.lax.top_k(l1, pivots)
        piv = jnp.sort(piv.astype(jnp.int32))
        cand = jnp.ones((avail,), bool).at[piv].set(False)
        for i, k in enumerate(counts):  # static loop over pivots
            if k == 0:
                continue
            sim = jnp.einsum("ac,c->a", hn, hn[piv[i]], precision=jax.lax.Precision.HIGHEST)
            _, pick = jax.lax.top_k(jnp.where(cand, -sim, -jnp.inf), k)
            cand = cand.at[pick].set(False)
        local = jnp.nonzero(~cand, size=keep - num_protected)[0].astype(jnp.int32)
        return jnp.concatenate([jnp.arange(num_protected, dtype=jnp.int32), local + num_protected])

    return jax.vmap(one)(x, src)


@dataclasses.dataclass(frozen=True)
class Dart(Reducer):
    """DART (Wen et al., 2025): keep pivots and the tokens least similar to them.

    In the LLM (before layer ``K``, on layer ``K - 1``'s normed hidden states and keys): the reference's selection
    per image span, :func:`dart_keep_indices`, with ``budget = keep`` (or ``keep_ratio`` of the span) and the
    reference's ``4 + 8 * (budget // 8)`` rule and, by default, its pivot visit order computed on the tokens'
    position ids (so the kept set is the reference's and does not change with left padding). In a ViT block or
    at the connector: :func:`dart_vit_keep_indices` on the unprotected tokens (pivots by key L1 norm, similarity
    on the hidden states).
    """

    keep_ratio: float = 0.7
    keep: Optional[int] = None
    num_pivots: int = 8
    num_image_pivots: int = 4
    num_text_pivots: int = 4
    pivot_order: str = "cpython_set"
    needs: ClassVar[frozenset] = frozenset({KEYS, HIDDEN})
    spans: ClassVar[bool] = True

    def _budget(self, image_len: int) -> int:
        return candidates_kept(image_len, self.keep_ratio, self.keep)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        if info.in_spans:
            kept = dart_kept_per_image(info.image_len, self._budget(info.image_len), self.num_image_pivots,
                                       self.num_image_pivots + self.num_text_pivots)
            return num_tokens - info.num_images * (info.image_len - min(kept, info.image_len))
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        feats = state.x if info.hidden is None else info.hidden
        if info.in_spans:
            idx = dart_keep_indices(feats, info.require(KEYS, "dart"), image_starts=info.image_starts,
                                    image_len=info.image_len, budget=self._budget(info.image_len), valid=state.valid,
                                    positions=state.positions, num_image_pivots=self.num_image_pivots,
                                    num_text_pivots=self.num_text_pivots, pivot_order=self.pivot_order)
        else:
            idx = dart_vit_keep_indices(feats, keep=self.num_out(state.num_tokens, info),
                                        num_protected=info.num_protected, num_pivots=self.num_pivots, keys=info.keys)
        return prune_step(idx, state.num_tokens)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.dart_flops(num_tokens, dim, num_pivots=self.num_pivots)


@register("dart", points=("vit", "vision", "connector", "llm"))
def _dart_layers(num_layers: int, keep_ratio: float = 0.7, keep: Optional[int] = None, num_pivots: int = 8,
                 num_image_pivots: int = 4, num_text_pivots: int = 4, pivot_order: str = "cpython_set",
                 layers=None) -> list[Optional[Reducer]]:
    """DART: prune to ``keep_ratio`` (or ``keep``) of the candidates at each of ``layers``. ``num_pivots`` is the
    ViT variant's; ``num_image_pivots`` / ``num_text_pivots`` / ``pivot_order`` the LLM's (default
    ``"cpython_set"``: the reference's kept set, invariant to left padding; see :mod:`reduction.dart`)."""
    check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        check_count(keep, "keep", allow_zero=False)
    check_count(num_pivots, "num_pivots", allow_zero=False)
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
    red = Dart(keep_ratio=float(keep_ratio), keep=None if keep is None else int(keep), num_pivots=int(num_pivots),
               num_image_pivots=int(num_image_pivots), num_text_pivots=int(num_text_pivots), pivot_order=pivot_order)
    return [red if i in set(layers) else None for i in range(num_layers)]


__all__ = [
    "dart_keep_indices",
    "dart_kept_per_image",
    "dart_keeps_all",
    "dart_token_topk",
    "dart_vit_keep_indices",
    "cpython_set_order",
    "Dart",
]
