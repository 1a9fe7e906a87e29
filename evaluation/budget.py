"""Equal-FLOP comparisons: pick each method's setting for a target fraction of the unreduced FLOPs.

Everything here is plain Python on static counts (no arrays, no tracing). The solver knows nothing about any
architecture: a model is described by a :class:`CostModel`, which carries the model's **own** cost function
(``ViT.flops`` for a ViT, see :func:`evaluation.builtin.vit_cost`), so the FLOPs the solver prices are the FLOPs
the sweep reports. A method setting is a plain spec dict, as accepted by
:func:`reduction.reducers.build_layer_reducers`. The analytic count is the repo's convention, **FLOPs = 2 x MACs**
over the matrix products (see :mod:`reduction.flops`), plus each reducer's own cost (``Reducer.flops``).

The solver enumerates a method's *search space* (a finite list of specs, e.g. ToMe's ``r = 0, 1, 2, ...``
or a grid of keep ratios) and returns the setting whose FLOPs are the largest that do not exceed the
target ("closest from below"), so no method gets more compute than the budget::

    from evaluation.builtin import vit_cost
    from models.vit import vit_config
    cost = vit_cost(vit_config("S/14", image_size=112))
    choice = solve(0.5, cost, "tome")
    choice.spec          # {'method': 'tome', 'r': ...}
    choice.fraction      # <= 0.5

New methods plug in with :func:`register_search_space`; methods without one fall back to the common
pruning knobs ``keep_ratio`` x ``layers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from reduction.reducers import build_layer_reducers, default_layers


@dataclasses.dataclass(frozen=True)
class CostModel:
    """What the solver needs from a model: ``depth`` reduction layers, the ``num_tokens`` entering the first one
    (of which the leading ``num_protected`` are never reduced), and the model's own static functions of a reducer
    tuple (one entry, a :class:`reduction.Reducer` or ``None``, per layer):

    * ``flops(reducers) -> int``: analytic FLOPs per example;
    * ``tokens_per_layer(reducers) -> [(attention tokens, MLP tokens), ...]``;
    * ``elementwise(reducers) -> int`` (optional): the stated elementwise estimate used only for the XLA
      cross-check;
    * ``valid_flops(reducers, counts [B, depth, 2]) -> [B]`` (optional): FLOPs per example counted on the valid
      tokens each example keeps (attention and MLP tokens per layer), for capacity-padded (instance-adaptive)
      methods whose static count is only an upper bound. The solver never calls it (it has no data).
    """

    depth: int
    num_tokens: int
    num_protected: int
    flops: Callable[[tuple], int]
    tokens_per_layer: Callable[[tuple], list]
    elementwise: Optional[Callable[[tuple], int]] = None
    valid_flops: Optional[Callable[[tuple, Any], Any]] = None

    @property
    def num_candidates(self) -> int:
        """Tokens a reduction may act on (the image patches of a ViT)."""
        return self.num_tokens - self.num_protected

    def describe(self) -> dict:
        return {"depth": self.depth, "num_tokens": self.num_tokens, "num_protected": self.num_protected}


Spec = Mapping[str, Any]


def spec_flops(cost: CostModel, spec: Optional[Spec]) -> int:
    """The model's FLOPs under a config spec (``None`` or ``{"method": "none"}`` = unreduced)."""
    return int(cost.flops(tuple(build_layer_reducers(cost.depth, spec))))


def base_flops(cost: CostModel) -> int:
    """FLOPs of the unreduced model."""
    return spec_flops(cost, None)


# -- search spaces --------------------------------------------------------------------------------------

SearchSpace = Callable[[CostModel], list]
_SPACES: dict[str, SearchSpace] = {}


def register_search_space(method: str):
    """Register ``fn(cost) -> list[spec]``: the finite settings the solver may choose from for ``method``."""

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
def _tome_space(cost: CostModel) -> list:
    """ToMe with a constant ``r`` per layer (the paper's default), refined by giving the first ``k``
    layers ``r + 1``: ``[r + 1] * k + [r] * (L - k)``. With few tokens a constant ``r`` moves the FLOPs
    in big steps; the refinement fills the gaps between them."""
    r_max = (cost.num_tokens - cost.num_protected) // 2
    specs = []
    for r in range(r_max + 1):
        specs.append({"method": "tome", "r": r})
        for k in range(1, cost.depth):
            specs.append({"method": "tome", "r": [r + 1] * k + [r] * (cost.depth - k)})
    return specs


@register_search_space("pitome")
def _pitome_space(cost: CostModel) -> list:
    """PiToMe with one kept-ratio per layer (its constant-ratio schedule)."""
    return [{"method": "pitome", "keep_ratio": q} for q in ratio_grid(0.5, 1.0, 0.0025)]


@register_search_space("pitome_code")
def _pitome_code_space(cost: CostModel) -> list:
    """PiToMe with the authors' code preset: the same kept-ratio grid."""
    return [{"method": "pitome_code", "keep_ratio": q} for q in ratio_grid(0.5, 1.0, 0.0025)]


@register_search_space("atp")
def _atp_space(cost: CostModel) -> list:
    """ATP keeps a data-dependent count under a static capacity; the compute (and the analytic count)
    is set by the capacity ``keep_ratio``, so that is the knob (threshold ``theta`` at its default)."""
    layers = default_prune_layers(cost.depth)[0]
    return [{"method": "atp", "keep_ratio": k, "layers": layers} for k in ratio_grid(0.02, 1.0, 0.005)]


@register_search_space("pool")
def _pool_space(cost: CostModel) -> list:
    """Average pooling of the token grid with window ``k`` at one layer."""
    return [{"method": "pool", "k": k, "layers": [layer]} for k in (2, 3, 4) for layer in range(cost.depth)]


def prune_space(method: str, cost: CostModel, layers: Optional[Sequence[int]] = None) -> list:
    """Pruning methods: one staged schedule (``layers``, default DynamicViT's ``[3, 6, 9]`` scaled to
    the depth) with ``keep_ratio`` per pruning layer as the knob, in steps of 0.005. One schedule per
    method keeps the points of a method on one curve (the solver does not hop between schedules)."""
    layers = list(default_prune_layers(cost.depth)[0] if layers is None else layers)
    return [{"method": method, "keep_ratio": k, "layers": layers} for k in ratio_grid(0.02, 1.0, 0.005)]


def search_space(method: str, cost: CostModel) -> list:
    """The registered space of ``method``, or the generic pruning space."""
    if method in _SPACES:
        return _SPACES[method](cost)
    return prune_space(method, cost)


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


def price_specs(cost: CostModel, specs: Iterable[Spec]) -> tuple[list, list]:
    """``([(flops, spec), ...], [error, ...])``: analytic FLOPs of every spec the method accepts, and the
    messages of those its builder rejects (``TypeError``/``ValueError``)."""
    priced, errors = [], []
    for spec in specs:
        try:
            priced.append((spec_flops(cost, spec), dict(spec)))
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


def solve_specs(target: float, cost: CostModel, specs: Iterable[Spec], *, method: str = "?") -> BudgetChoice:
    """The spec whose FLOPs are the largest ``<= target * base_flops(cost)``.

    Ties keep the earliest spec. Specs the method rejects are skipped; if none fits the budget a
    ``ValueError`` names the method and the cheapest fraction it can reach.
    """
    target = _check_target(target)
    priced, errors = price_specs(cost, specs)
    return _pick(target, base_flops(cost), priced, errors, method)


def solve(target: float, cost: CostModel, method: str, *, specs: Optional[Iterable[Spec]] = None) -> BudgetChoice:
    """Setting of ``method`` closest from below to ``target`` (a fraction of the unreduced FLOPs)."""
    return solve_specs(target, cost, search_space(method, cost) if specs is None else specs, method=method)


def search_space_with(method: str, cost: CostModel, options: Optional[Spec] = None) -> list:
    """:func:`search_space` with fixed ``options`` of the method set in every spec (e.g. ``{"iterations": 3}`` for
    Zero-TPrune, ``{"preset": "code"}`` for PiToMe); the space's own knob (``r``, ``keep_ratio``, ...) still varies
    unless ``options`` sets it too."""
    fixed = dict(options or {})
    fixed.pop("method", None)
    return [dict(spec, **fixed) for spec in search_space(method, cost)]


def solve_all(targets: Sequence[float], cost: CostModel, methods: Sequence[str],
              options: Optional[Mapping[str, Spec]] = None) -> dict:
    """``{(method, target): BudgetChoice | ValueError}`` for every pair; unreachable pairs hold the error
    so a sweep can report them instead of stopping. Each method's space is priced once. ``options``: fixed
    options per method (:func:`search_space_with`)."""
    targets = [_check_target(t) for t in targets]
    base = base_flops(cost)
    options = options or {}
    out: dict = {}
    for method in methods:
        priced, errors = price_specs(cost, search_space_with(method, cost, options.get(method)))
        for t in targets:
            try:
                out[(method, t)] = _pick(t, base, priced, errors, method)
            except ValueError as err:
                out[(method, t)] = err
    return out
