"""Zero-TPrune (Wang, Dedhia, Jha; CVPR 2024): training-free pruning from the attention graph.

No official code exists; this is a spec implementation from the paper's description (see
``/work/shared/reference/zerotprune_dart_atp.md`` section 1). Every undocumented choice is a named
parameter; defaults marked **guess** are this port's choices, not the paper's.

One pruning layer, on a block's attention probabilities ``A: [B, H, T, T]`` (row = query) and its keys:

1. **I'-stage** -- one Weighted-PageRank step ``s <- A^T s`` per head from the initial distribution,
   aggregated over heads by EIR/VHF; only ranks tokens (prunes nothing).
2. **S-stage** -- Sequential-U partition of the unprotected tokens by that ranking: the less important
   half is group A, the rest group B; every A token's best cosine match in B (keys); the ``r_s`` A tokens
   with the highest best-match similarity are dropped.
3. **I-stage** -- full WPR (``iterations`` steps) on the survivors, with the attention cut down to their
   rows and columns (rows re-normalised when ``renormalize``), EIR/VHF aggregation, and the ``r_i``
   least important unprotected tokens are dropped.

WPR initial distribution (``init``): ``"cls_boost"`` (the paper's default "Zero-TPrune": token 0 starts
``sqrt(T)`` times higher than the others, then normalised to sum 1) or ``"uniform"`` ("Zero-TPrune-uni").

EIR with VHF: per head, ``z_h = scale * s_h`` where ``var_scale="num_tokens"`` uses ``scale = T`` (so a
uniform distribution is all ones; **guess**: the paper's ``[0.01, 0.7]`` variance window cannot apply to
unit-sum scores, whose variance is below ``1/T^2``-ish) or ``"none"`` uses ``scale = 1``. Head ``h`` passes
when ``v_min <= Var(z_h) <= v_max`` (variance over the tokens of the current graph). The aggregated score is
``sqrt(sum_h eta_h s_h^2 / sum_h eta_h)``. When no head passes, ``fallback="all"`` (**guess**, as a third-
party port does) uses every head; ``"max_var"`` uses only the highest-variance head.

Open choices and their defaults: similarity metric = keys averaged over heads (``LayerInfo.metric``;
**guess**, a third-party port averages; ``metric="keys"`` uses the concatenated keys); Sequential-U A-group
size ``floor(n / 2)`` of the ``n`` unprotected tokens (**guess** for odd ``n``); ``renormalize=True``
(**guess**, the simplest faithful reading; a graph that keeps every token is the block's attention itself,
whose rows already sum to one, so no re-normalisation is computed for it); ties are broken by lower index
everywhere (in the S-stage, equal best matches drop the lower position in group A first); protected
tokens (class, distillation, registers: the first ``P``) are never candidates in any stage and the class
token is token 0. A point without a class token (``LayerInfo.has_class_token`` false: no protected token, or
only registers) raises ``ValueError`` at trace time rather than treating patch 0 as one.

Counts are static: a layer removes ``R`` tokens, ``r_s = min(floor(R * similarity_fraction), floor(n / 2))``
in the S-stage and ``r_i = R - r_s`` in the I-stage. Kept tokens keep their original order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction import flops as flops_lib
from reduction.reducers import ATTENTION, KEYS, METRIC, LayerInfo, Reducer, register
from reduction.schedule import keep_count
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step, identity_step, prune_step
from reduction.tome import cosine_normalize
from reduction.validate import check_count, check_leading, check_rank, check_ratio

INITS = ("cls_boost", "uniform")
VAR_SCALES = ("num_tokens", "none")
FALLBACKS = ("all", "max_var")
_TINY = 1e-30


# -- WPR and head aggregation (per example) ------------------------------------------------------------


def _initial(mask: jax.Array, init: str, heads: int) -> jax.Array:
    """``[H, T]`` initial WPR distribution over the tokens in ``mask`` (token 0 is the class token)."""
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    s = m
    if init == "cls_boost":
        s = s.at[0].multiply(jnp.sqrt(n))
    s = s / jnp.maximum(jnp.sum(s), _TINY)
    return jnp.broadcast_to(s, (heads, s.shape[0]))


def wpr_per_head(attn: jax.Array, mask: jax.Array, *, iterations: int, init: str = "cls_boost",
                 renormalize: bool = True) -> jax.Array:
    """Weighted PageRank of one example: ``attn: [H, T, T]`` probabilities (row = query), ``mask: [T]``
    -> ``[H, T]`` float32 scores after ``iterations`` steps of ``s <- A'^T s`` (mass-preserving when rows
    sum to one). Tokens outside ``mask`` neither vote nor receive votes.

    ``A'`` is ``A`` restricted to the rows and columns in ``mask``, each row divided by the mass it keeps
    when ``renormalize``. It is never materialised: with ``m`` the mask and ``rho = A m`` the kept row
    mass, ``A'^T s = m * (A^T (s * m / rho))``, so each step reads ``A`` once and nothing is copied.
    """
    a = attn.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    if renormalize:
        kept_mass = jnp.einsum("hij,j->hi", a, m, precision=jax.lax.Precision.HIGHEST)     # [H, T]
        weight = m / jnp.maximum(kept_mass, _TINY)
    else:
        weight = jnp.broadcast_to(m, a.shape[:2])
    s = _initial(mask, init, a.shape[0])

    def step(_, s):
        return m * jnp.einsum("hij,hi->hj", a, s * weight, precision=jax.lax.Precision.HIGHEST)

    return jax.lax.fori_loop(0, iterations, step, s)


def eir_vhf(scores: jax.Array, mask: jax.Array, *, v_min: float = 0.01, v_max: float = 0.7,
            var_scale: str = "num_tokens", fallback: str = "all") -> jax.Array:
    """EIR aggregation with the variance-based head filter: ``[H, T] -> [T]`` float32 (see module doc).
    Tokens outside ``mask`` get ``-inf``."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    z = scores * (n if var_scale == "num_tokens" else 1.0)
    mean = jnp.sum(z * m, axis=-1, keepdims=True) / n
    var = jnp.sum(((z - mean) ** 2) * m, axis=-1) / n                              # [H]
    eta = ((var >= v_min) & (var <= v_max)).astype(jnp.float32)
    if fallback == "all":
        backup = jnp.ones_like(eta)
    else:
        backup = jax.nn.one_hot(jnp.argmax(var), var.shape[0], dtype=jnp.float32)
    eta = jnp.where(jnp.sum(eta) > 0, eta, backup)
    rms = jnp.sqrt(jnp.sum(eta[:, None] * scores ** 2, axis=0) / jnp.sum(eta))
    return jnp.where(mask, rms, -jnp.inf)


# -- one pruning layer ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZeroTPruneConfig:
    """Static options of one Zero-TPrune layer (hashable). See the module docstring for each default."""

    iterations: int = 10
    preview_iterations: int = 1
    init: str = "cls_boost"
    v_min: float = 0.01
    v_max: float = 0.7
    var_scale: str = "num_tokens"
    fallback: str = "all"
    renormalize: bool = True

    def validate(self) -> "ZeroTPruneConfig":
        check_count(self.iterations, "iterations")
        check_count(self.preview_iterations, "preview_iterations")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.var_scale not in VAR_SCALES:
            raise ValueError(f"var_scale must be one of {VAR_SCALES}, got {self.var_scale!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not (float(self.v_min) <= float(self.v_max)):
            raise ValueError(f"v_min={self.v_min} must be <= v_max={self.v_max}")
        return self


def split_counts(num_tokens: int, remove: int, *, num_protected: int = 1,
                 similarity_fraction: float = 0.5) -> tuple[int, int]:
    """Static ``(r_s, r_i)`` for a layer removing ``remove`` of ``num_tokens`` tokens."""
    n = num_tokens - num_protected
    if remove > n:
        raise ValueError(f"remove={remove} exceeds the {n} unprotected tokens")
    r_s = min(int(math.floor(remove * similarity_fraction)), n // 2)
    return r_s, remove - r_s


def _importance(attn, mask, iterations, cfg: ZeroTPruneConfig, full_graph: bool = False):
    """EIR/VHF importance ``[T]`` after ``iterations`` WPR steps on the graph restricted to ``mask``.

    ``full_graph`` (static) says the mask keeps every token, so the graph is the block's whole attention whose
    rows already sum to one: the re-normalisation is then skipped (it would divide by one up to rounding)."""
    s = wpr_per_head(attn, mask, iterations=iterations, init=cfg.init,
                     renormalize=cfg.renormalize and not full_graph)
    return eir_vhf(s, mask, v_min=cfg.v_min, v_max=cfg.v_max, var_scale=cfg.var_scale, fallback=cfg.fallback)


def _s_stage_one(attn, metric, valid, r_s: int, num_protected: int, cfg: ZeroTPruneConfig, all_valid: bool):
    """``attn: [H, T, T], metric: [T, Cm], valid: [T]`` -> survivors ``[T]`` bool (``r_s`` of the
    unprotected tokens are False). ``all_valid`` (static): no padding.

    Sequential-U split without a full sort: group B is the ``n - n_a`` most important unprotected tokens
    (``lax.top_k``: ties go to the lower index, as in a stable descending sort); group A is the rest, listed
    in ascending position. A's drops are its ``r_s`` highest best-match similarities, ties to the lower
    position. NaN importance counts as ``-inf``.
    """
    t = metric.shape[0]
    n = t - num_protected
    imp = _importance(attn, valid, cfg.preview_iterations, cfg, full_graph=all_valid)[num_protected:]  # [n]
    imp = jnp.where(jnp.isnan(imp), -jnp.inf, imp)
    n_a = n // 2
    b_idx = jax.lax.top_k(imp, n - n_a)[1] + num_protected                            # most important half
    in_b = jnp.zeros((t,), bool).at[b_idx].set(True, mode="promise_in_bounds")
    in_a = ~in_b & (jnp.arange(t) >= num_protected)
    a_idx = jnp.nonzero(in_a, size=n_a)[0]                                          # ascending position
    m = cosine_normalize(jax.lax.stop_gradient(metric))
    sim = jnp.einsum("ac,bc->ab", m[a_idx], m[b_idx], precision=jax.lax.Precision.HIGHEST)
    best = jnp.max(jnp.where(valid[b_idx][None, :], sim, -jnp.inf), axis=-1)
    best = jnp.where(jnp.isnan(best), -jnp.inf, best)
    best = jnp.where(valid[a_idx], best, jnp.inf)                                    # padding goes first
    drop = a_idx[jax.lax.top_k(best, r_s)[1]]
    return jnp.ones((t,), bool).at[drop].set(False, mode="promise_in_bounds")


def _i_stage_one(attn, valid, survivors, keep: int, num_protected: int, cfg: ZeroTPruneConfig,
                 full_graph: bool = False):
    """``attn: [H, T, T]`` (the whole graph), ``valid, survivors: [T]`` -> kept indices ``[keep]``
    ascending.

    The graph is the block's attention restricted to the S-stage survivors (never cut out as a copy:
    :func:`wpr_per_head` masks it). Tokens dropped by the S-stage rank below everything; invalid survivors
    rank just above them, so they are the first of the survivors to go, as when the graph is cut.
    """
    t = attn.shape[-1]
    imp = _importance(attn, valid & survivors, cfg.iterations, cfg, full_graph=full_graph)
    imp = jnp.where(valid, imp, jnp.finfo(jnp.float32).min)
    imp = jnp.where(survivors, imp, -jnp.inf)
    imp = jnp.where(jnp.arange(t) < num_protected, jnp.inf, imp)
    imp = jnp.where(jnp.isnan(imp), -jnp.inf, imp)
    # The T - keep lowest go; among ties the higher index goes first (so the lower one is kept). Reversing
    # the order makes ``top_k``'s lower-index tie rule pick the higher original index. Cheaper than a
    # ``top_k`` of the kept set plus a sort.
    low = jax.lax.top_k(-imp[::-1], t - keep)[1]
    kept = jnp.ones((t,), bool).at[t - 1 - low].set(False, mode="promise_in_bounds")
    return jnp.nonzero(kept, size=keep)[0].astype(jnp.int32)


@eager_jit
def zerotprune_step(attention: jax.Array, metric: jax.Array, *, r_similarity: int, r_importance: int,
                    num_protected: int = 1, valid: Optional[jax.Array] = None,
                    config: ZeroTPruneConfig = ZeroTPruneConfig()) -> ReductionStep:
    """The I' -> S -> I plan as one pruning step.

    Args:
      attention: ``[B, H, T, T]`` softmax probabilities of the block (any float; computed in float32).
      metric: ``[B, T, Cm]`` keys (averaged over heads or concatenated) for the S-stage cosine.
      r_similarity / r_importance: static tokens dropped by the S- and I-stage (``r_similarity <=
        (T - P) // 2``, total ``<= T - P``).
      valid: ``[B, T]`` bool or ``None``; invalid tokens are excluded from the graph and dropped first.

    Returns a step ``T -> K = T - r_similarity - r_importance``; protected tokens are kept, order preserved.
    Not differentiable (integer plan); apply it with :func:`reduction.apply_step`.
    """
    check_rank(attention, 4, "attention")
    b, h, t, t2 = attention.shape
    if t != t2:
        raise ValueError(f"attention must be [B, H, T, T], got shape {attention.shape}")
    check_rank(metric, 3, "metric")
    check_leading(metric, (b, t), "metric", "attention")
    r_s = check_count(r_similarity, "r_similarity")
    r_i = check_count(r_importance, "r_importance")
    num_protected = check_count(num_protected, "num_protected")
    config.validate()
    n = t - num_protected
    if r_s > n // 2:
        raise ValueError(f"r_similarity={r_s} exceeds half of the {n} unprotected tokens")
    if r_s + r_i > n:
        raise ValueError(f"r_similarity + r_importance = {r_s + r_i} exceeds the {n} unprotected tokens")
    all_valid = valid is None
    if valid is None:
        valid = jnp.ones((b, t), bool)
    else:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "attention")
        valid = valid.astype(bool)
    attention = jax.lax.stop_gradient(attention).astype(jnp.float32)

    if r_s + r_i == 0:
        return identity_step(b, t)
    if r_s > 0:
        survivors = jax.vmap(lambda a, m, v: _s_stage_one(a, m, v, r_s, num_protected, config, all_valid))(
            attention, metric, valid)
    else:
        survivors = jnp.ones((b, t), bool)
    if r_i == 0:
        keep = jax.vmap(lambda s: jnp.nonzero(s, size=t - r_s)[0].astype(jnp.int32))(survivors)
    else:
        full = all_valid and r_s == 0
        keep = jax.vmap(lambda a, v, s: _i_stage_one(a, v, s, t - r_s - r_i, num_protected, config, full))(
            attention, valid, survivors)
    return prune_step(keep, t)


@eager_jit
def zerotprune(state: TokenState, attention: jax.Array, metric: jax.Array, *, r_similarity: int,
               r_importance: int, num_protected: int = 1,
               config: ZeroTPruneConfig = ZeroTPruneConfig()) -> TokenState:
    """Apply one Zero-TPrune layer to a token state: ``x: [B, T, C] -> [B, T - r_s - r_i, C]``."""
    step = zerotprune_step(attention, metric, r_similarity=r_similarity, r_importance=r_importance,
                           num_protected=num_protected, valid=state.valid, config=config)
    return apply_step(state, step)


# -- reducer and schedule ----------------------------------------------------------------------------------


def default_iterations(layer: int, num_layers: int) -> int:
    """Iterations per layer (paper's ablation: 30-50 in the first three layers, 5-10 in the middle, 1 in
    the last three). Chosen: 30 / 10 / 1 -- the low end where many iterations are needed (early attention
    is diffuse, convergence is slow, cost grows with T^2) and the high end in the middle, where ten steps
    are still under 1% of a ViT-S block's FLOPs."""
    if layer < 3:
        return 30
    if layer >= num_layers - 3:
        return 1
    return 10


@dataclasses.dataclass(frozen=True)
class ZeroTPrune(Reducer):
    """Zero-TPrune at one layer (after attention, before the MLP). Removes ``r`` tokens, or down to
    ``keep_ratio`` of the unprotected ones when ``r`` is ``None``."""

    keep_ratio: Optional[float] = 0.7
    r: Optional[int] = None
    similarity_fraction: float = 0.5
    metric: str = "metric"
    config: ZeroTPruneConfig = ZeroTPruneConfig()

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return frozenset({ATTENTION, METRIC if self.metric == "metric" else KEYS})

    def _remove(self, num_tokens: int, num_protected: int) -> int:
        if self.r is not None:
            return min(int(self.r), num_tokens - num_protected)
        return num_tokens - keep_count(num_tokens, self.keep_ratio, protected=num_protected)

    def counts(self, num_tokens: int, num_protected: int) -> tuple[int, int]:
        return split_counts(num_tokens, self._remove(num_tokens, num_protected), num_protected=num_protected,
                            similarity_fraction=self.similarity_fraction)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens - self._remove(num_tokens, max(info.num_protected, 1))

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        info.require_class_token("zerotprune")
        attention = info.require(ATTENTION, "zerotprune")
        metric = info.require(METRIC if self.metric == "metric" else KEYS, f"zerotprune(metric={self.metric!r})")
        protected = max(info.num_protected, 1)
        r_s, r_i = self.counts(state.num_tokens, protected)
        return zerotprune_step(attention, metric, r_similarity=r_s, r_importance=r_i, num_protected=protected,
                               valid=state.valid, config=self.config)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        r_s, _ = self.counts(num_tokens, 1)
        key_dim = dim // heads if self.metric == "metric" else dim
        return flops_lib.zerotprune_flops(num_tokens, heads, key_dim, r_similarity=r_s,
                                          iterations=self.config.iterations,
                                          preview_iterations=self.config.preview_iterations)


def _per_layer_value(value, chosen: Sequence[int], name: str) -> dict:
    if isinstance(value, (list, tuple)):
        if len(value) != len(chosen):
            raise ValueError(f"{name} has {len(value)} entries for {len(chosen)} layers")
        return dict(zip(chosen, value))
    return {i: value for i in chosen}


@register("zerotprune", points=("vit", "vision"))
def _zerotprune_layers(
    num_layers: int,
    keep_ratio: Union[float, Sequence[float], None] = 0.7,
    r: Union[int, Sequence[int], None] = None,
    layers: Optional[Sequence[int]] = None,
    similarity_fraction: float = 0.5,
    iterations: Union[int, Sequence[int], None] = None,
    metric: str = "metric",
    preview_iterations: int = 1,
    init: str = "cls_boost",
    v_min: float = 0.01,
    v_max: float = 0.7,
    var_scale: str = "num_tokens",
    fallback: str = "all",
    renormalize: bool = True,
) -> list[Optional[Reducer]]:
    """Per-layer Zero-TPrune. Defaults (**guesses**, the paper's Zero-TP-a/b/c lists are not available):
    layers ``[3, 6, 9]`` (scaled to depth) with keep ratio 0.7 each -- the DynamicViT schedule, which cuts
    DeiT-S to about 3.0 GFLOPs, the paper's headline operating point -- and an even S:I split
    (``similarity_fraction=0.5``). ``iterations=None`` uses :func:`default_iterations`. Remaining keywords
    go to :class:`ZeroTPruneConfig` (``init``, ``v_min``, ``v_max``, ``var_scale``, ``fallback``,
    ``renormalize``, ``preview_iterations``)."""
    chosen = list(layers)
    check_ratio(similarity_fraction, "similarity_fraction", low_open=-1e-9)
    if metric not in ("metric", "keys"):
        raise ValueError(f"metric must be 'metric' or 'keys', got {metric!r}")
    if r is None and keep_ratio is None:
        raise ValueError("zerotprune needs keep_ratio or r")
    ratios = _per_layer_value(keep_ratio, chosen, "keep_ratio") if r is None else {}
    rs = _per_layer_value(r, chosen, "r") if r is not None else {}
    its = _per_layer_value(iterations, chosen, "iterations") if iterations is not None else {}
    out: list[Optional[Reducer]] = [None] * num_layers
    for i in chosen:
        if r is None:
            check_ratio(ratios[i], "keep_ratio")
        else:
            check_count(rs[i], "r")
        n_it = its.get(i, default_iterations(i, num_layers))
        cfg = ZeroTPruneConfig(iterations=int(n_it), preview_iterations=int(preview_iterations), init=init,
                               v_min=v_min, v_max=v_max, var_scale=var_scale, fallback=fallback,
                               renormalize=bool(renormalize)).validate()
        out[i] = ZeroTPrune(keep_ratio=None if r is not None else float(ratios[i]),
                            r=None if r is None else int(rs[i]), similarity_fraction=float(similarity_fraction),
                            metric=metric, config=cfg)
    return out


__all__ = [
    "ZeroTPrune",
    "ZeroTPruneConfig",
    "wpr_per_head",
    "eir_vhf",
    "zerotprune_step",
    "zerotprune",
    "split_counts",
    "default_iterations",
]
