"""PiToMe: energy-based token merging (Tran et al., NeurIPS 2024), with two selectable presets.

Tokens are nodes of a graph whose features are the metric (keys averaged over heads). A token's
*energy* is the mean over all non-protected tokens (itself included) of ``f_m(cos(v_i, v_j))``; high
energy means the token sits in a large cluster of similar tokens and is safe to merge, low energy means
it is isolated (informative) and is protected. One layer with keep ratio ``ratio`` merges
``r = floor(T' - T' * ratio)`` tokens, ``T'`` = number of non-protected tokens (``schedule.ratio_to_r``).

Two per-layer paths:

* ``pitome`` (the paper's Algorithm 1): sort by energy (descending, stable); the top ``2r`` are
  mergeable and split alternately, ``A = merge[0::2]``, ``B = merge[1::2]``; *every* A token merges into
  its most similar B token (size-weighted); the other ``T' - 2r`` tokens are protected. Output layout
  ``[front protected tokens (cls first), energy-protected tokens (descending energy), B (energy order)]``.
* ``pitome_bsm`` (authors' code, used in early DeiT layers): the energy-sorted list of *all* ``T'`` tokens
  is split alternately into A/B, then ToMe's greedy step merges the ``r`` A tokens with the best match.
  Output ``[front protected tokens, unmerged A (descending score), B (energy order)]``.

Presets (:data:`PRESETS`), side by side:

==================  =====================================  ========================================
                    ``"paper"`` (Eq. 4, Alg. 1)            ``"code"`` (authors' repo HEAD 550b5de)
==================  =====================================  ========================================
f_m(x)              ``x`` if ``x >= m`` else               ``ELU(x - m; alpha)``: ``x - m`` if
                    ``alpha * (exp(x - m) - 1)``           ``x >= m`` else ``alpha * (exp(x - m) - 1)``
margin m(l)         ``0.9 - 0.9 * l / L``                  ``0.75 - 0.75 * l / L``
alpha               1.0                                    1.0
proportional attn   on                                     off
layer paths         ``pitome`` in every layer              first ``ceil(L/2)`` layers ``pitome_bsm``,
                                                           the rest ``pitome`` (DeiT patch)
==================  =====================================  ========================================

Deviations from the reference code (documented, tested): sorting is stable (PyTorch's default argsort is
not, so tied energies may order differently there); a NaN similarity counts as ``-inf`` (a token with a
NaN metric gets the lowest energy ``-alpha``, is protected, and is never chosen as a destination, so its NaN
stays visible in ``x``); ``ratio < 0.5`` raises ``ValueError`` naming ``ratio`` (the reference fails with a
shape error) and ``r == 0`` or ``ratio == 1`` give the identity step (the reference errors on ``r == 0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction import flops as flops_lib
from reduction.reducers import METRIC, LayerInfo, Reducer, check_layers, register
from reduction.schedule import ratio_to_r
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, identity_step, merge_step
from reduction.tome import _first_argmax, _stable_descending, cosine_normalize
from reduction.validate import check_count, check_leading, check_rank, check_ratio

ENERGY_FNS = ("paper", "elu")

#: Preset name -> settings. ``margin`` is the start ``m0`` of the schedule ``m(l) = m0 - m0 * l / L``;
#: ``bsm_layers`` is ``"first_half"`` (first ``ceil(L/2)`` layers use ``pitome_bsm``) or ``"none"``.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(energy_fn="paper", margin=0.9, alpha=1.0, prop_attn=True, bsm_layers="none"),
    "code": dict(energy_fn="elu", margin=0.75, alpha=1.0, prop_attn=False, bsm_layers="first_half"),
}


def margin_schedule(num_layers: int, start: float) -> list[float]:
    """PiToMe's margin over depth: ``m(l) = start - start * l / L`` for ``l = 0..L-1`` (decreasing)."""
    num_layers = check_count(num_layers, "num_layers", allow_zero=False)
    return [float(start) - float(start) * layer / num_layers for layer in range(num_layers)]


def pitome_r(num_tokens: int, ratio: float, *, num_protected: int = 1) -> int:
    """Static number of tokens one PiToMe layer removes from ``T = num_tokens`` tokens.

    ``r = floor(T' - T' * ratio)`` with ``T' = T - num_protected`` in float64. Raises ``ValueError``
    naming ``ratio`` unless ``0.5 <= ratio <= 1`` (below 0.5 the ``2r`` mergeable tokens exceed ``T'``).
    """
    ratio = check_ratio(ratio, "ratio")
    if ratio < 0.5:
        raise ValueError(f"ratio must be >= 0.5 for PiToMe (2r tokens must fit in the mergeable ones), got {ratio}")
    num_protected = check_count(num_protected, "num_protected")
    if num_tokens - num_protected <= 0:
        return 0
    return ratio_to_r(num_tokens, ratio, protected=num_protected)


def pitome_merged_tokens(num_tokens: int, ratio: float, *, num_protected: int = 1) -> int:
    """Static output count ``T - r`` of one PiToMe layer."""
    return num_tokens - pitome_r(num_tokens, ratio, num_protected=num_protected)


def _energy_terms(sim: jax.Array, margin: float, alpha: float, energy_fn: str) -> jax.Array:
    """``f_m`` applied elementwise to cosine similarities (float32; ``-inf`` maps to ``-alpha``)."""
    below = alpha * jnp.expm1(jnp.minimum(sim - margin, 0.0))
    above = sim if energy_fn == "paper" else sim - margin
    return jnp.where(sim >= margin, above, below)


def _check_energy_fn(energy_fn: str) -> str:
    if energy_fn not in ENERGY_FNS:
        raise ValueError(f"energy_fn must be one of {ENERGY_FNS}, got {energy_fn!r}")
    return energy_fn


def _similarity(metric: jax.Array) -> jax.Array:
    """``[T, Cm] -> [T, T]`` float32 cosine similarities under ``stop_gradient``; NaN -> ``-inf``."""
    m = cosine_normalize(jax.lax.stop_gradient(metric))
    sim = jnp.einsum("ic,jc->ij", m, m, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(jnp.isnan(sim), -jnp.inf, sim)


@eager_jit
def pitome_energy(metric: jax.Array, *, margin: float, alpha: float = 1.0, energy_fn: str = "paper") -> jax.Array:
    """Energy scores ``metric: [B, T, Cm] -> [B, T]`` float32 (pass the non-protected tokens only).

    ``E_i = mean_j f_m(cos(v_i, v_j))`` over all ``T`` tokens including ``i`` itself. Zero vectors have
    similarity 0 with everything (no NaN).
    """
    check_rank(metric, 3, "metric")
    energy_fn = _check_energy_fn(energy_fn)
    sim = jax.vmap(_similarity)(metric)
    return jnp.mean(_energy_terms(sim, float(margin), float(alpha), energy_fn), axis=-1)


def _pitome_one(metric, r: int, p: int, margin: float, alpha: float, energy_fn: str, use_bsm: bool):
    """Plan for one example: ``metric: [T, Cm] -> assign [T], anchor [T - r]``."""
    t = metric.shape[0]
    n = t - p
    sim = _similarity(metric[p:])
    energy = jnp.mean(_energy_terms(sim, margin, alpha, energy_fn), axis=-1)
    order = _stable_descending(energy).astype(jnp.int32)
    if use_bsm:
        a, b = order[0::2], order[1::2]
        scores = sim[a][:, b]
        node_max = jnp.max(scores, axis=-1)
        node_idx = _first_argmax(scores, node_max)
        edge = _stable_descending(node_max).astype(jnp.int32)
        src, unm = a[edge[:r]], a[edge[r:]]
        keep = jnp.concatenate([unm, b])
        src_slot = unm.shape[0] + node_idx[edge[:r]]
    else:
        a, b, prot = order[0 : 2 * r : 2], order[1 : 2 * r : 2], order[2 * r :]
        scores = sim[a][:, b]
        dst = _first_argmax(scores, jnp.max(scores, axis=-1))
        keep = jnp.concatenate([prot, b])
        src = a
        src_slot = prot.shape[0] + dst
    rest = jnp.zeros((n,), jnp.int32).at[keep].set(jnp.arange(n - r, dtype=jnp.int32)).at[src].set(src_slot)
    front = jnp.arange(p, dtype=jnp.int32)
    return jnp.concatenate([front, p + rest]), jnp.concatenate([front, p + keep])


@eager_jit
def pitome_matching(
    metric: jax.Array,
    *,
    ratio: float,
    margin: float,
    alpha: float = 1.0,
    energy_fn: str = "paper",
    num_protected: int = 1,
    use_bsm: bool = False,
) -> ReductionStep:
    """PiToMe's plan for one layer: ``metric: [B, T, Cm]`` -> a step ``T -> T - r`` slots.

    Args:
      metric: ``[B, T, Cm]`` (keys averaged over heads, or hidden states).
      ratio: keep ratio in ``[0.5, 1]``; ``r = floor(T' - T' * ratio)`` on ``T' = T - num_protected``.
      margin: ``m`` of ``f_m`` at this layer (see :func:`margin_schedule`).
      alpha: scale of the exponential branch below the margin.
      energy_fn: ``"paper"`` (``x`` above the margin) or ``"elu"`` (``x - m`` above it, the released code).
      num_protected: leading tokens (cls, distillation, registers) kept first and untouched; 1 = the
        reference's ``class_token=True``.
      use_bsm: the ``pitome_bsm`` path (energy-ordered A/B over all tokens + ToMe top-r) instead of
        ``pitome``.

    Returns a merging :class:`~reduction.step.ReductionStep`, the identity when ``r == 0``.
    """
    check_rank(metric, 3, "metric")
    energy_fn = _check_energy_fn(energy_fn)
    bsz, t = metric.shape[:2]
    r = pitome_r(t, ratio, num_protected=num_protected)
    if r == 0:
        return identity_step(bsz, t)
    plan = lambda m: _pitome_one(m, r, num_protected, float(margin), float(alpha), energy_fn, bool(use_bsm))
    assign, anchor = jax.vmap(plan)(metric)
    return merge_step(assign, anchor)


@eager_jit
def pitome_merge(
    state: TokenState,
    metric: jax.Array,
    *,
    ratio: float,
    margin: float,
    alpha: float = 1.0,
    energy_fn: str = "paper",
    num_protected: int = 1,
    use_bsm: bool = False,
) -> TokenState:
    """One PiToMe layer on a token state: ``x: [B, T, C] -> [B, T - r, C]``.

    ``metric: [B, T, Cm]``. Size-weighted merge (sizes add up, ``source`` follows); differentiable in
    ``x``, the plan is computed under ``stop_gradient``. See :func:`pitome_matching` for the arguments.
    """
    check_rank(metric, 3, "metric")
    check_leading(metric, state.x.shape[:2], "metric", "state.x")
    step = pitome_matching(
        metric, ratio=ratio, margin=margin, alpha=alpha, energy_fn=energy_fn,
        num_protected=num_protected, use_bsm=use_bsm,
    )
    return apply_step(state, step)


@dataclasses.dataclass(frozen=True)
class PiToMe(Reducer):
    """PiToMe at one layer (merges between the attention residual and the MLP, like ToMe): keeps ``keep_ratio``
    of the mergeable tokens. ``keep`` (connector use): merge towards ``keep`` tokens, at most half per pass."""

    keep_ratio: float = 0.9
    margin: float = 0.9
    alpha: float = 1.0
    energy_fn: str = "paper"
    use_bsm: bool = False
    use_prop_attn: bool = True
    keep: Optional[int] = None
    needs: ClassVar[frozenset] = frozenset({METRIC})

    @property
    def prop_attn(self) -> bool:  # type: ignore[override]
        return self.use_prop_attn

    def _ratio(self, num_tokens: int) -> float:
        if self.keep is None:
            return self.keep_ratio
        return min(max(self.keep / max(num_tokens, 1), 0.5), 1.0)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pitome_merged_tokens(num_tokens, self._ratio(num_tokens), num_protected=info.num_protected)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        return pitome_matching(
            info.require(METRIC, "pitome"), ratio=self._ratio(state.num_tokens), margin=self.margin,
            alpha=self.alpha, energy_fn=self.energy_fn, num_protected=info.num_protected, use_bsm=self.use_bsm,
        )

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        # Energy needs the full similarity of the mergeable tokens (cls excluded in the reference).
        return flops_lib.pitome_flops(max(num_tokens - 1, 0), dim // heads)


def _bsm_flags(num_layers: int, bsm_layers: Union[str, Sequence[int]]) -> list[bool]:
    if isinstance(bsm_layers, str):
        half = math.ceil(num_layers / 2)
        if bsm_layers == "first_half":
            return [layer < half for layer in range(num_layers)]
        if bsm_layers == "second_half":
            return [layer >= half for layer in range(num_layers)]
        if bsm_layers == "none":
            return [False] * num_layers
        raise ValueError(f"bsm_layers must be 'first_half', 'second_half', 'none' or a list, got {bsm_layers!r}")
    chosen = {check_count(v, "bsm_layers[i]") for v in bsm_layers}
    return [layer in chosen for layer in range(num_layers)]


@register("pitome", layers="all")
def pitome_layers(
    num_layers: int,
    keep_ratio: float = 0.9,
    keep: Optional[int] = None,
    preset: str = "paper",
    margin: Union[None, float, Sequence[float]] = None,
    alpha: Optional[float] = None,
    energy_fn: Optional[str] = None,
    prop_attn: Optional[bool] = None,
    bsm_layers: Union[None, str, Sequence[int]] = None,
    layers: Optional[Sequence[int]] = None,
) -> list[Optional[Reducer]]:
    """PiToMe (Tran et al., NeurIPS 2024), e.g. ``{"method": "pitome", "keep_ratio": 0.9, "preset": "code"}``.

    ``keep_ratio``: fraction of the mergeable tokens kept at each layer (the paper's ``ratio``). ``keep``: merge
    towards ``keep`` tokens instead (connector). ``preset`` picks defaults from :data:`PRESETS`; every other key
    overrides it: ``margin`` (a float is the start of the linear schedule, a list gives each layer's margin),
    ``alpha``, ``energy_fn``, ``prop_attn``, ``bsm_layers`` (``"first_half"``, ``"second_half"``, ``"none"`` or
    layer indices using ``pitome_bsm``) and ``layers`` (the layers that merge; default all).
    """
    if layers is not None:              # out-of-range entries raise, as at every other method
        layers = check_layers(layers, num_layers)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset])
    pitome_r(1000, keep_ratio)  # validates the ratio early
    if keep is not None:
        check_count(keep, "keep", allow_zero=False)
    margin = cfg["margin"] if margin is None else margin
    if isinstance(margin, (list, tuple)):
        if len(margin) != num_layers:
            raise ValueError(f"margin lists {len(margin)} values for {num_layers} layers")
        margins = [float(v) for v in margin]
    else:
        margins = margin_schedule(num_layers, float(margin))
    alpha = cfg["alpha"] if alpha is None else float(alpha)
    energy_fn = _check_energy_fn(cfg["energy_fn"] if energy_fn is None else energy_fn)
    prop_attn = cfg["prop_attn"] if prop_attn is None else bool(prop_attn)
    bsm = _bsm_flags(num_layers, cfg["bsm_layers"] if bsm_layers is None else bsm_layers)
    active = set(range(num_layers)) if layers is None else set(layers)
    return [
        PiToMe(keep_ratio=float(keep_ratio), margin=margins[layer], alpha=alpha, energy_fn=energy_fn,
               use_bsm=bsm[layer], use_prop_attn=prop_attn, keep=None if keep is None else int(keep))
        if layer in active and (keep_ratio < 1.0 or keep is not None) else None
        for layer in range(num_layers)
    ]


@register("pitome_code", layers="all")
def pitome_code_layers(num_layers: int, keep_ratio: float = 0.9, keep: Optional[int] = None,
                       margin: Union[None, float, Sequence[float]] = None, alpha: Optional[float] = None,
                       energy_fn: Optional[str] = None, prop_attn: Optional[bool] = None,
                       bsm_layers: Union[None, str, Sequence[int]] = None,
                       layers: Optional[Sequence[int]] = None) -> list[Optional[Reducer]]:
    """PiToMe with the authors' released-code preset (``{"method": "pitome", "preset": "code", ...}``), registered
    under its own name so sweeps over every method compare both presets. Off the shelf on DINOv2-S the code
    preset (no proportional attention) keeps features much closer to the unreduced ones than the paper preset
    (mean cosine 0.988 vs 0.936 at 0.76 of the FLOPs; see docs/results.md)."""
    return pitome_layers(num_layers, keep_ratio=keep_ratio, keep=keep, preset="code", margin=margin, alpha=alpha,
                         energy_fn=energy_fn, prop_attn=prop_attn, bsm_layers=bsm_layers, layers=layers)


__all__ = [
    "PRESETS",
    "ENERGY_FNS",
    "PiToMe",
    "margin_schedule",
    "pitome_r",
    "pitome_merged_tokens",
    "pitome_energy",
    "pitome_matching",
    "pitome_merge",
    "pitome_layers",
    "pitome_code_layers",
]
