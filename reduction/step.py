"""One representation of a reduction step, applied in one place.

Every method in this package (merging or pruning) produces a :class:`ReductionStep`; only
:func:`apply_step` touches tokens, sizes, positions, the validity mask and the source map. This keeps
the bookkeeping identical across methods and makes any method composable with any other.

A step maps ``T`` input tokens to ``K`` output slots (``K`` static):

* ``assign[b, t]`` is the output slot of input token ``t``, or ``-1`` if the token is dropped.
* ``anchor[b, k]`` is the input token that represents slot ``k`` (the kept token for pruning, the
  destination token for merging); positions and validity are taken from it.
* ``merges`` (static) says whether several inputs may share one slot. Pruning steps (``merges=False``)
  are applied as a gather of ``anchor``; merging steps as a size-weighted average over ``assign`` (the
  anchors gathered, the other tokens scatter-added onto them).
* ``valid`` (optional, ``[B, K]`` bool) marks the output slots that hold a kept token. Instance-adaptive methods
  (ATP) keep a static capacity ``K`` and mark the unused slots here; :func:`apply_step` ands it into the state's
  mask, so no caller patches ``valid`` afterwards.
* ``movers`` (optional, ``[B, T - K]``) lists the input tokens that are not anchors, in any order. A plan
  that knows them (ToMe: the ``r`` merged sources) passes them so the merge skips finding them; without
  it :func:`apply_step` derives them from ``anchor``.
* ``size_scale`` (optional, ``[B, K]`` float) multiplies the output sizes. With the identity step it is a soft
  gate: every token stays, and later proportional attention sees ``log(size_scale)`` as a key bias (the learned
  ATP thresholds in training, :class:`reduction.nnx.LearnedATP`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.state import TokenState
from reduction.validate import check_rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReductionStep:
    """``assign: [B, T] int32``, ``anchor: [B, K] int32``, optional ``movers: [B, T - K] int32`` and output
    ``valid: [B, K] bool``, optional ``size_scale: [B, K]`` (multiplies the output sizes); ``num_out`` (= K) and
    ``merges`` static."""

    assign: jax.Array
    anchor: jax.Array
    num_out: int = dataclasses.field(metadata=dict(static=True))
    merges: bool = dataclasses.field(metadata=dict(static=True))
    movers: Optional[jax.Array] = None
    valid: Optional[jax.Array] = None
    size_scale: Optional[jax.Array] = None

    @property
    def num_in(self) -> int:
        return self.assign.shape[1]


def identity_step(batch: int, num_tokens: int) -> ReductionStep:
    """The step that keeps every token in place."""
    idx = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    return ReductionStep(assign=idx, anchor=idx, num_out=num_tokens, merges=False)


@eager_jit
def prune_step(keep_idx: jax.Array, num_tokens: int, valid: Optional[jax.Array] = None) -> ReductionStep:
    """Pruning step from kept indices.

    ``keep_idx: [B, K]`` int indices into ``T = num_tokens`` input tokens, in output order (callers sort
    them to keep the original order). Returns a step with ``assign[b, keep_idx[b, k]] = k`` and ``-1``
    elsewhere. ``valid: [B, K]`` bool marks the slots that hold a kept token (static capacity; the token in an
    invalid slot is dropped: its ``assign`` is ``-1``).
    """
    check_rank(keep_idx, 2, "keep_idx")
    b, k = keep_idx.shape
    keep_idx = keep_idx.astype(jnp.int32)
    assign = jnp.full((b, num_tokens), -1, jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
    target = keep_idx
    if valid is not None:
        check_rank(valid, 2, "valid")
        valid = valid.astype(bool)
        target = jnp.where(valid, keep_idx, num_tokens)        # invalid slots write nowhere (dropped)
    assign = jax.vmap(lambda a, i, s: a.at[i].set(s, mode="drop"))(assign, target, slots)
    return ReductionStep(assign=assign, anchor=keep_idx, num_out=k, merges=False, valid=valid)


def merge_step(assign: jax.Array, anchor: jax.Array, movers: Optional[jax.Array] = None) -> ReductionStep:
    """Merging step from an assignment ``[B, T]`` (slot or ``-1``), anchors ``[B, K]`` and, optionally,
    the non-anchor tokens ``movers: [B, T - K]`` (see :class:`ReductionStep`)."""
    check_rank(assign, 2, "assign")
    check_rank(anchor, 2, "anchor")
    if movers is not None:
        check_rank(movers, 2, "movers")
        expected = (assign.shape[0], assign.shape[1] - anchor.shape[1])
        if tuple(movers.shape) != expected:
            raise ValueError(f"movers must have shape {expected} ([B, T - K]), got {tuple(movers.shape)}")
        movers = movers.astype(jnp.int32)
    return ReductionStep(
        assign=assign.astype(jnp.int32), anchor=anchor.astype(jnp.int32), num_out=anchor.shape[1], merges=True,
        movers=movers,
    )


def _movers(step: ReductionStep) -> jax.Array:
    """The ``[B, T - K]`` non-anchor tokens of a step (given by the plan, or listed by position)."""
    if step.movers is not None:
        return step.movers
    t, k = step.num_in, step.num_out
    is_anchor = jax.vmap(lambda a: jnp.zeros((t,), bool).at[a].set(True))(step.anchor)
    return jax.vmap(lambda m: jnp.nonzero(~m, size=t - k)[0].astype(jnp.int32))(is_anchor)   # ascending


def _take(arr: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along the token axis: ``arr: [B, T, ...], idx: [B, K] -> [B, K, ...]``."""
    idx = idx.reshape(idx.shape + (1,) * (arr.ndim - 2))
    return jnp.take_along_axis(arr, idx, axis=1, mode="promise_in_bounds")


_SPARSE_MERGE_MAX_MOVERS = 64


def _weighted(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """``rows: [B, R, C] * weights: [B, R]`` in float32, with a weight-0 row contributing exactly 0 even when it
    holds a NaN or Inf (a padding token must not reach the slot it is assigned to)."""
    w = weights[..., None]
    return jnp.where(w > 0, rows.astype(jnp.float32) * w, 0.0)


def _merge_weighted(x: jax.Array, weights: jax.Array, step: ReductionStep) -> tuple[jax.Array, jax.Array]:
    """Size-weighted merge ``x: [B, T, C], weights: [B, T] -> ([B, K, C], [B, K])``.

    Every slot has exactly one anchor, so only the ``R = T - K`` non-anchor tokens ("movers") need
    moving: the anchors are gathered into the output, and a slot that receives movers gets
    ``(s_a x_a + sum s_m x_m) / (s_a + sum s_m)``. A slot holding only its anchor keeps the anchor's
    features bit for bit (no multiply-then-divide rounding), so protected and unmerged tokens pass through
    unchanged. Movers whose slot is ``-1`` are dropped. Requires ``assign[b, anchor[b, k]] == k`` (every
    constructor here guarantees it).

    Two static paths give the same result up to float32 summation order:

    * few movers (``R <= 64``, e.g. ToMe's ``r``): the movers that share a slot (found with an ``[R, R]``
      equality matrix) are summed by a scatter-add into ``R`` rows, then the ``R`` merged rows are written
      over the gathered anchors. Only ``R`` rows beyond the gather are touched (about 3 fewer passes over
      the ``[B, K, C]`` output than the dense path).
    * many movers: the weighted anchors and movers are scatter-added in place (``mode="drop"``), then
      divided by the slot sizes.

    Non-finite values stay in their own slot on both paths: a NaN or Inf in a token reaches only the slot it
    is assigned to, and a token of weight 0 (invalid, or size 0) contributes exactly nothing, even a NaN.
    """
    k = step.num_out
    others = _movers(step)                                                     # [B, R] non-anchors
    other_slot = _take(step.assign, others)
    other_slot = jnp.where(other_slot < 0, k, other_slot)                      # out of range: dropped
    other_w = _take(weights, others)
    other_mass = _weighted(_take(x, others), other_w)
    anchor_x = _take(x, step.anchor)
    anchor_w = _take(weights, step.anchor)

    def add_rows(base, slot, rows):
        return base.at[slot].add(rows, mode="drop")

    sizes = jax.vmap(add_rows)(anchor_w, other_slot, other_w)
    if others.shape[1] == 0:                  # every token is an anchor: nothing moves
        return anchor_x, sizes
    if others.shape[1] <= _SPARSE_MERGE_MAX_MOVERS:
        slot_in = jnp.minimum(other_slot, k - 1)
        target_mass = _weighted(_take(anchor_x, slot_in), _take(anchor_w, slot_in))   # [B, R, C] their anchors
        # Movers sharing a slot form a group named by its first mover; each group's rows are summed by a
        # scatter-add over R rows (a product with the [R, R] equality matrix would spread a NaN or Inf of
        # one slot to every slot as 0 * NaN).
        same = other_slot[:, :, None] == other_slot[:, None, :]                    # [B, R, R]
        group = jnp.argmax(same, axis=-1).astype(jnp.int32)                         # [B, R] first equal mover
        group_mass = jax.vmap(add_rows)(jnp.zeros_like(other_mass), group, other_mass)
        mass = target_mass + _take(group_mass, group)
        total = _take(sizes, slot_in)
        merged = (mass / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]).astype(x.dtype)
        set_rows = jax.vmap(lambda base, slot, rows: base.at[slot].set(rows, mode="drop"))
        return set_rows(anchor_x, other_slot, merged), sizes
    mass = jax.vmap(add_rows)(_weighted(anchor_x, anchor_w), other_slot, other_mass)
    joined = jax.vmap(lambda slot: jnp.zeros((k,), bool).at[slot].set(True, mode="drop"))(other_slot)
    merged = (mass / jnp.maximum(sizes, jnp.finfo(jnp.float32).tiny)[..., None]).astype(x.dtype)
    return jnp.where(joined[..., None], merged, anchor_x), sizes


def remap_source(source: Optional[jax.Array], assign: jax.Array) -> Optional[jax.Array]:
    """Compose a ``[B, N]`` source map with a step's ``[B, T]`` assignment (``-1`` stays ``-1``)."""
    if source is None:
        return None
    moved = jnp.take_along_axis(assign, jnp.maximum(source, 0), axis=1)
    return jnp.where(source >= 0, moved, -1)


@eager_jit
def apply_step(state: TokenState, step: ReductionStep) -> TokenState:
    """Apply a step to every field of the state.

    ``x: [B, T, C] -> [B, K, C]``, ``sizes/positions/valid: [B, T] -> [B, K]``, ``source: [B, N]`` stays
    ``[B, N]`` with slot indices remapped.

    Merging is the size-weighted average ``x_k = sum_{t -> k} s_t x_t / sum_{t -> k} s_t`` computed in
    float32 (cast back to ``x.dtype``), with ``s_k = sum s_t``; a slot with a single member is that
    member's ``x`` exactly. When a validity mask is present, invalid
    tokens carry zero weight so padding never leaks into a valid token. A step's ``size_scale [B, K]`` then
    multiplies the output sizes. Differentiable in ``x`` (and in ``size_scale``).
    """
    check_rank(state.x, 3, "state.x")
    if step.num_in != state.num_tokens:
        raise ValueError(f"step expects {step.num_in} tokens but state.x has {state.num_tokens}")
    valid = None if state.valid is None else _take(state.valid, step.anchor)
    if step.valid is not None:
        valid = step.valid if valid is None else valid & step.valid
    if step.size_scale is not None:
        check_rank(step.size_scale, 2, "step.size_scale")
        if tuple(step.size_scale.shape) != tuple(step.anchor.shape):
            raise ValueError(f"step.size_scale must have shape {tuple(step.anchor.shape)} ([B, K]), "
                             f"got {tuple(step.size_scale.shape)}")

    def scaled(sizes):
        return sizes if step.size_scale is None else sizes * step.size_scale.astype(sizes.dtype)

    if not step.merges:
        return TokenState(
            x=_take(state.x, step.anchor),
            sizes=scaled(_take(state.sizes, step.anchor)),
            positions=_take(state.positions, step.anchor),
            valid=valid,
            source=remap_source(state.source, step.assign),
        )
    weights = state.sizes.astype(jnp.float32)
    if state.valid is not None:
        weights = jnp.where(state.valid, weights, 0.0)
    x, sizes = _merge_weighted(state.x, weights, step)
    return TokenState(
        x=x,
        sizes=scaled(sizes),
        positions=_take(state.positions, step.anchor),
        valid=valid,
        source=remap_source(state.source, step.assign),
    )


@eager_jit
def compose_steps(first: ReductionStep, second: ReductionStep) -> ReductionStep:
    """One step equivalent to applying ``first`` then ``second`` (for the bookkeeping fields)."""
    if second.num_in != first.num_out:
        raise ValueError(f"second step expects {second.num_in} tokens, first produces {first.num_out}")
    assign = remap_source(first.assign, second.assign)
    anchor = jnp.take_along_axis(first.anchor, second.anchor, axis=1)
    return ReductionStep(assign=assign, anchor=anchor, num_out=second.num_out, merges=first.merges or second.merges)


@eager_jit
def apply_to_tokens(values: jax.Array, step: ReductionStep, sizes: Optional[jax.Array] = None) -> jax.Array:
    """Apply a step to an extra per-token array ``[B, T, ...] -> [B, K, ...]`` (e.g. a key cache).

    Pruning gathers; merging takes the size-weighted average with ``sizes`` (default ones).
    """
    if not step.merges:
        return _take(values, step.anchor)
    if sizes is None:
        sizes = jnp.ones(values.shape[:2], jnp.float32)
    b, t = values.shape[:2]
    merged, _ = _merge_weighted(values.reshape(b, t, math.prod(values.shape[2:])), sizes.astype(jnp.float32), step)
    return merged.reshape((b, step.num_out) + values.shape[2:])


__all__ = [
    "ReductionStep",
    "identity_step",
    "prune_step",
    "merge_step",
    "apply_step",
    "apply_to_tokens",
    "compose_steps",
    "remap_source",
]
