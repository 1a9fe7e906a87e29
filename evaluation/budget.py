"""Equal-FLOP comparisons: pick each method's setting for a target fraction of the unreduced FLOPs.

Everything here is plain Python on static counts (no arrays, no tracing). A model is described by
:class:`ViTDims`; a method setting is a plain spec dict, as accepted by
:func:`reduction.reducers.build_layer_reducers`. The analytic count is the repo's convention,
**FLOPs = 2 x MACs** over the matrix products (see :mod:`reduction.flops`), plus each reducer's own cost
(``Reducer.flops``).

The solver enumerates a method's *search space* (a finite list of specs, e.g. ToMe's ``r = 0, 1, 2, ...``
or a grid of keep ratios) and returns the setting whose FLOPs are the largest that do not exceed the
target ("closest from below"), so no method gets more compute than the budget::

    dims = ViTDims(depth=12, dim=384, heads=6, mlp_dim=1536, patch_size=14, num_patches=64)
    choice = solve(0.5, dims, "tome")
    choice.spec          # {'method': 'tome', 'r': ...}
    choice.fraction      # <= 0.5

New methods plug in with :func:`register_search_space`; methods without one fall back to the common
pruning knobs ``keep_ratio`` x ``layers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from reduction import flops as flops_lib
from reduction.reducers import build_layer_reducers, default_layers, tokens_per_layer


@dataclasses.dataclass(frozen=True)
class ViTDims:
    """Static shape of a plain ViT: ``depth`` blocks of width ``dim`` (C) with ``heads`` (H) heads.

    ``num_patches`` image tokens plus ``num_protected`` leading tokens (class token, registers) give
    the ``N = num_patches + num_protected`` tokens entering the first block.
    """

    depth: int
    dim: int
    heads: int
    mlp_dim: int
    patch_size: int
    num_patches: int
    num_protected: int = 1
    num_distill: int = 0
    in_chans: int = 3
    num_classes: int = 0
    gelu: str = "exact"          # "exact" (erf) or "tanh": only the elementwise estimate depends on it
    layer_scale: bool = False    # DINOv2-style per-channel scales on both residual branches

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_protected


Spec = Mapping[str, Any]


def layer_token_counts(dims: ViTDims, reducers: Sequence[Any]) -> list[tuple[int, int, int]]:
    """Per layer ``(tokens_in, attention_tokens, mlp_tokens)`` with ``tokens_in`` the count entering the
    layer (before a ``before_attention`` reducer), from :func:`reduction.reducers.tokens_per_layer`."""
    counts = tokens_per_layer(dims.num_tokens, reducers, num_protected=dims.num_protected,
                              num_distill=dims.num_distill)
    t_in = [dims.num_tokens] + [m for _, m in counts[:-1]]
    return [(t, a, m) for t, (a, m) in zip(t_in, counts)]


def reducers_flops(dims: ViTDims, reducers: Sequence[Any]) -> int:
    """Analytic FLOPs (2 x MACs) of one image through the ViT with these per-layer reducers: patch
    embedding + blocks on the reduced counts + each reducer's own cost + the head."""
    if len(reducers) != dims.depth:
        raise ValueError(f"reducers has {len(reducers)} entries for depth {dims.depth}")
    counts = layer_token_counts(dims, reducers)
    own = [0 if red is None else int(red.flops(t_in, dim=dims.dim, heads=dims.heads))
           for red, (t_in, _, _) in zip(reducers, counts)]
    return flops_lib.vit_flops(
        [a for _, a, _ in counts], dim=dims.dim, mlp_dim=dims.mlp_dim, patch_size=dims.patch_size,
        num_patches=dims.num_patches, in_chans=dims.in_chans, num_classes=dims.num_classes,
        mlp_tokens=[m for _, _, m in counts], reduction_flops=own,
    )


def spec_flops(dims: ViTDims, spec: Optional[Spec]) -> int:
    """:func:`reducers_flops` of a config spec (``None`` or ``{"method": "none"}`` = unreduced)."""
    return reducers_flops(dims, build_layer_reducers(dims.depth, spec))


def base_flops(dims: ViTDims) -> int:
    """FLOPs of the unreduced model."""
    return spec_flops(dims, None)


# XLA's cost analysis counts one FLOP per element for adds and multiplies, and more for composite ops.
# Per-element counts measured with ``cost_analysis()`` on jax 0.10 CPU: LayerNorm 6 (+2 for the affine
# scale and shift), softmax 4, exact (erf) GELU 64, tanh GELU 8.
ELEMENTWISE_PER_ELEMENT = {"layer_norm": 8, "softmax": 4, "gelu_exact": 64, "gelu_tanh": 8}


def elementwise_flops(dims: ViTDims, reducers: Sequence[Any]) -> int:
    """A stated estimate of the elementwise FLOPs that the matmul convention leaves out, in XLA's
    counting: per block two LayerNorms, the q scaling, softmax over ``H x T x T`` logits, bias adds,
    GELU, residual adds (and layer-scale multiplies), plus the final LayerNorm and the position-embedding
    add. Used only to cross-check against XLA; the budget solver and the reported GFLOPs use the
    matmul convention of :func:`reducers_flops`."""
    per = ELEMENTWISE_PER_ELEMENT
    gelu = per["gelu_exact"] if dims.gelu == "exact" else per["gelu_tanh"]
    c, m, h = dims.dim, dims.mlp_dim, dims.heads
    total = dims.num_tokens * c  # position embedding add
    t_last = dims.num_tokens
    for _, a, t_mlp in layer_token_counts(dims, reducers):
        residual = (2 if dims.layer_scale else 1) * c
        total += a * (per["layer_norm"] * c + 3 * c + c + c + residual)   # LN1, qkv bias, q scale, proj bias, residual
        total += h * a * a * per["softmax"]
        total += t_mlp * (per["layer_norm"] * c + m + gelu * m + c + residual)  # LN2, fc1 bias, GELU, fc2 bias, residual
        t_last = t_mlp
    total += t_last * per["layer_norm"] * c
    return int(total)


# -- search spaces --------------------------------------------------------------------------------------

SearchSpace = Callable[[ViTDims], list]
_SPACES: dict[str, SearchSpace] = {}


def register_search_space(method: str):
    """Register ``fn(dims) -> list[spec]``: the finite settings the solver may choose from for ``method``."""

    def wrap(fn: SearchSpace) -> SearchSpace:
        _SPACES[method] = fn
        return fn

    return wrap


def ratio_grid(low: float = 0.02, high: float = 1.0, step: float = 0.01) -> list[float]:
    """Ratios ``high, high - step, ..., >= low`` rounded to 4 decimals (exact, reproducible values)."""
    n = int(math.floor((high - low) / step + 1e-9))
    return [round(high - i * step, 4) for i in range(n + 1)]


def default_prune_layers(depth: int) -> list[list[int]]:
    """Layer sets for staged pruning: the methods' default (:func:`reduction.reducers.default_layers`, DynamicViT's
    ``[3, 6, 9]`` on 12 layers); a single early stage; and every layer from the second on."""
    last = max(depth - 1, 0)
    single = [min(max(1, round(depth * 0.25)), last)]
    every = list(range(1, depth))
    sets = []
    for s in (default_layers(depth), single, every):
        if s and s not in sets:
            sets.append(s)
    return sets


@register_search_space("tome")
def _tome_space(dims: ViTDims) -> list:
    """ToMe with a constant ``r`` per layer (the paper's default), refined by giving the first ``k``
    layers ``r + 1``: ``[r + 1] * k + [r] * (L - k)``. With few tokens a constant ``r`` moves the FLOPs
    in big steps; the refinement fills the gaps between them."""
    r_max = (dims.num_tokens - dims.num_protected) // 2
    specs = []
    for r in range(r_max + 1):
        specs.append({"method": "tome", "r": r})
        for k in range(1, dims.depth):
            specs.append({"method": "tome", "r": [r + 1] * k + [r] * (dims.depth - k)})
    return specs


@register_search_space("pitome")
def _pitome_space(dims: ViTDims) -> list:
    """PiToMe with one kept-ratio per layer (its constant-ratio schedule)."""
    return [{"method": "pitome", "keep_ratio": q} for q in ratio_grid(0.5, 1.0, 0.0025)]


@register_search_space("pitome_code")
def _pitome_code_space(dims: ViTDims) -> list:
    """PiToMe with the authors' code preset: the same kept-ratio grid."""
    return [{"method": "pitome_code", "keep_ratio": q} for q in ratio_grid(0.5, 1.0, 0.0025)]


@register_search_space("atp")
def _atp_space(dims: ViTDims) -> list:
    """ATP keeps a data-dependent count under a static capacity; the compute (and the analytic count)
    is set by the capacity ``keep_ratio``, so that is the knob (threshold ``theta`` at its default)."""
    layers = default_prune_layers(dims.depth)[0]
    return [{"method": "atp", "keep_ratio": k, "layers": layers} for k in ratio_grid(0.02, 1.0, 0.005)]


@register_search_space("pool")
def _pool_space(dims: ViTDims) -> list:
    """Average pooling of the token grid with window ``k`` at one layer."""
    return [{"method": "pool", "k": k, "layers": [layer]} for k in (2, 3, 4) for layer in range(dims.depth)]


def prune_space(method: str, dims: ViTDims, layers: Optional[Sequence[int]] = None) -> list:
    """Pruning methods: one staged schedule (``layers``, default DynamicViT's ``[3, 6, 9]`` scaled to
    the depth) with ``keep_ratio`` per pruning layer as the knob, in steps of 0.005. One schedule per
    method keeps the points of a method on one curve (the solver does not hop between schedules)."""
    layers = list(default_prune_layers(dims.depth)[0] if layers is None else layers)
    return [{"method": method, "keep_ratio": k, "layers": layers} for k in ratio_grid(0.02, 1.0, 0.005)]


def search_space(method: str, dims: ViTDims) -> list:
    """The registered space of ``method``, or the generic pruning space."""
    if method in _SPACES:
        return _SPACES[method](dims)
    return prune_space(method, dims)


# -- the solver ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BudgetChoice:
    """The chosen setting: its spec, analytic FLOPs, and FLOPs as a fraction of the unreduced model."""

    method: str
    spec: dict
    flops: int
    base_flops: int
    target: float

    @property
    def fraction(self) -> float:
        return self.flops / self.base_flops


def price_specs(dims: ViTDims, specs: Iterable[Spec]) -> tuple[list, list]:
    """``([(flops, spec), ...], [error, ...])``: analytic FLOPs of every spec the method accepts, and the
    messages of those its builder rejects (``TypeError``/``ValueError``)."""
    priced, errors = [], []
    for spec in specs:
        try:
            priced.append((spec_flops(dims, spec), dict(spec)))
        except (TypeError, ValueError) as err:
            errors.append(f"{dict(spec)}: {err}")
    return priced, errors


def _check_target(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target must be a FLOP fraction in (0, 1], got {target!r}")
    return float(target)


def _pick(target: float, base: int, priced: list, errors: list, method: str) -> BudgetChoice:
    limit = target * base
    best = None
    for f, spec in priced:
        if f <= limit and (best is None or f > best[0]):
            best = (f, spec)
    if best is None:
        if not priced:
            raise ValueError(f"method {method!r}: no valid setting in its search space; first error: "
                             f"{errors[0] if errors else 'empty space'}")
        cheapest = min(f for f, _ in priced)
        raise ValueError(f"method {method!r} cannot reach target {target}: its cheapest setting uses "
                         f"{cheapest / base:.3f} of the unreduced FLOPs")
    return BudgetChoice(method=method, spec=dict(best[1]), flops=best[0], base_flops=base, target=target)


def solve_specs(target: float, dims: ViTDims, specs: Iterable[Spec], *, method: str = "?") -> BudgetChoice:
    """The spec whose FLOPs are the largest ``<= target * base_flops(dims)``.

    Ties keep the earliest spec. Specs the method rejects are skipped; if none fits the budget a
    ``ValueError`` names the method and the cheapest fraction it can reach.
    """
    target = _check_target(target)
    priced, errors = price_specs(dims, specs)
    return _pick(target, base_flops(dims), priced, errors, method)


def solve(target: float, dims: ViTDims, method: str, *, specs: Optional[Iterable[Spec]] = None) -> BudgetChoice:
    """Setting of ``method`` closest from below to ``target`` (a fraction of the unreduced FLOPs)."""
    return solve_specs(target, dims, search_space(method, dims) if specs is None else specs, method=method)


def search_space_with(method: str, dims: ViTDims, options: Optional[Spec] = None) -> list:
    """:func:`search_space` with fixed ``options`` of the method set in every spec (e.g. ``{"iterations": 3}`` for
    Zero-TPrune, ``{"preset": "code"}`` for PiToMe); the space's own knob (``r``, ``keep_ratio``, ...) still varies
    unless ``options`` sets it too."""
    fixed = dict(options or {})
    fixed.pop("method", None)
    return [dict(spec, **fixed) for spec in search_space(method, dims)]


def solve_all(targets: Sequence[float], dims: ViTDims, methods: Sequence[str],
              options: Optional[Mapping[str, Spec]] = None) -> dict:
    """``{(method, target): BudgetChoice | ValueError}`` for every pair; unreachable pairs hold the error
    so a sweep can report them instead of stopping. Each method's space is priced once. ``options``: fixed
    options per method (:func:`search_space_with`)."""
    targets = [_check_target(t) for t in targets]
    base = base_flops(dims)
    options = options or {}
    out: dict = {}
    for method in methods:
        priced, errors = price_specs(dims, search_space_with(method, dims, options.get(method)))
        for t in targets:
            try:
                out[(method, t)] = _pick(t, base, priced, errors, method)
            except ValueError as err:
                out[(method, t)] = err
    return out
