"""The one reduction interface: every method, at every insertion point.

A *point* is a place where a model reduces tokens: a ViT block (``"vit"``), a vision-tower block of a VLM
(``"vision"``), the connector between tower and LLM (``"connector"``) and the LLM prefill (``"llm"``). At each
point the model calls a :class:`Reducer` with the current :class:`TokenState` and a :class:`LayerInfo` (the
context): whatever the point computed that the reducer ``needs`` (metric, attention, keys, hidden states, text
attention) plus the static facts of the point (layer, protected prefix, image span). The reducer returns a
:class:`~reduction.step.ReductionStep` from :meth:`Reducer.plan`; :func:`~reduction.step.apply_step` is the only
code that moves tokens. The reducer also reports its static output count (so tokens per layer and FLOPs are
known before tracing) and its own cost.

Reducers are frozen dataclasses (hashable, safe as static jit arguments). Build one reducer (or ``None``) per
layer with :func:`build_layer_reducers` from a plain spec, e.g. ``{"method": "tome", "r": 13}`` or
``{"method": "dart", "keep_ratio": 0.5, "layers": [3, 6, 9]}``. The spec vocabulary is shared by every method:

=============  ===================================================================================================
key            meaning
=============  ===================================================================================================
``method``     a registered name (:func:`available_methods`)
``layers``     layer indices where the method acts (each method has a default; see :func:`default_layers`)
``r``          merges: tokens removed per layer (an int, a per-layer list, or with ``inflect`` ToMe's schedule)
``keep_ratio`` fraction of the candidate tokens kept at each acting layer (candidates: unprotected tokens, or
               the image tokens of each image in the LLM)
``keep``       the same as an absolute count of candidates kept (per image in the LLM); wins over ``keep_ratio``
``k``          pooling window
=============  ===================================================================================================

Every other key is a method option; a misspelt method or option raises :class:`SpecError` naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import jax

from reduction import flops as flops_lib
from reduction._compiled import eager_jit
from reduction.schedule import tome_clamp, tome_r_schedule
from reduction.spans import check_concrete_spans
from reduction.state import TokenState
from reduction.step import ReductionStep, apply_step
from reduction.tome import bipartite_soft_matching

# Names of what a point can expose to a reducer.
METRIC = "metric"                  # [B, T, Dh] keys averaged over heads (ToMe's metric)
ATTENTION = "attention"            # [B, H, T, T] softmax probabilities of this block's attention
KEYS = "keys"                      # [B, T, H * Dh] keys with heads concatenated (after RoPE in LLMs)
HIDDEN = "hidden"                  # [B, T, C] hidden states at the reduction point
TEXT_ATTENTION = "text_attention"  # [B, H, Tq, T] attention of the last Tq prompt queries (LLM)
LAYER_ATTENTION = "layer_attention"  # [B, H, Tq, T] the same rows, of the layer the reducer runs before (LLM)

# The insertion points and what each can give a reducer.
POINTS: dict[str, frozenset] = {
    "vit": frozenset({METRIC, ATTENTION, KEYS, HIDDEN}),
    "vision": frozenset({METRIC, ATTENTION, KEYS, HIDDEN}),
    "connector": frozenset({METRIC, KEYS, HIDDEN}),   # all three are the features themselves
    "llm": frozenset({ATTENTION, KEYS, HIDDEN, TEXT_ATTENTION, LAYER_ATTENTION}),
}


class SpecError(ValueError):
    """A reduction spec that cannot be built (unknown method or option, or a method at a point it cannot run)."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """The context a point hands to its reducer. Array fields are ``None`` unless the reducer ``needs`` them.

    Attributes:
      layer: index of the layer (0-based); num_layers: layers at this point.
      num_protected: leading tokens that must survive, in the order class token, distillation token, registers.
      num_distill: how many of them are distillation tokens; num_registers: how many are registers (a model
        without a class token may still have registers, so ``num_protected >= 1`` alone does not say token 0 is
        a class token: :attr:`has_class_token`).
      metric / attention / keys / hidden / text_attention / layer_attention: see the module constants.
      image_starts: ``[B]`` or ``[B, M]`` int32 first position of each image span (LLM point, traced); ``None``
        elsewhere, where every unprotected token is a candidate.
      image_len: static tokens per image span (LLM point), 0 elsewhere.
      rng: a PRNG key for stochastic reducers.
    """

    layer: int = 0
    num_layers: int = 1
    num_protected: int = 0
    num_distill: int = 0
    num_registers: int = 0
    metric: Optional[jax.Array] = None
    attention: Optional[jax.Array] = None
    keys: Optional[jax.Array] = None
    hidden: Optional[jax.Array] = None
    text_attention: Optional[jax.Array] = None
    layer_attention: Optional[jax.Array] = None
    image_starts: Optional[jax.Array] = None
    image_len: int = 0
    num_images: int = 1
    rng: Optional[jax.Array] = None

    @property
    def has_class_token(self) -> bool:
        """True when token 0 is a class token (a protected token that is neither distillation nor register)."""
        return self.num_protected - self.num_distill - self.num_registers >= 1

    def require_class_token(self, method: str) -> None:
        """A named error for a method that reads the class token at a point whose tokens have none."""
        if not self.has_class_token:
            raise ValueError(f"{method} reads the class token (token 0), but the tokens at this point have none "
                             f"(num_protected={self.num_protected}, num_registers={self.num_registers}); use a "
                             f"method that needs no class token (e.g. divprune, dart, tome)")

    @property
    def in_spans(self) -> bool:
        """True when candidates are image spans inside a longer sequence (the LLM point)."""
        return self.image_len > 0

    def require(self, name: str, method: str) -> jax.Array:
        """The array ``name`` or a named error when the point did not provide it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{method} needs info.{name}, which this reduction point did not provide")
        return value


# A pytree: the arrays are its children and the counts are static, so a LayerInfo passes through ``jax.jit`` (and an
# eager ``reducer(state, info)`` compiles once per static configuration, see reduction._compiled).
jax.tree_util.register_dataclass(
    LayerInfo,
    data_fields=["metric", "attention", "keys", "hidden", "text_attention", "layer_attention", "image_starts", "rng"],
    meta_fields=["layer", "num_layers", "num_protected", "num_distill", "num_registers", "image_len", "num_images"],
)


def _check_call(reducer, state: TokenState, info: LayerInfo) -> None:
    """Value checks of an eager reducer call (image spans inside the sequence), before the compiled plan runs."""
    if info.image_starts is not None and getattr(state.x, "ndim", 0) == 3:
        check_concrete_spans(info.image_starts, info.image_len, state.x.shape[1], state.x.shape[0])


@dataclasses.dataclass(frozen=True)
class Reducer:
    """Base class of every method. Subclasses set ``needs`` and implement :meth:`num_out` and :meth:`plan`.

    ``position`` is where a block calls the reducer: ``"after_attention"`` (between the attention residual and
    the MLP, ToMe's place) or ``"before_attention"`` (at the start of the block, on this block's attention). In
    the LLM a reducer at layer ``K`` runs before layer ``K`` on the outputs of layer ``K - 1`` (FastV's and DART's
    convention). ``prop_attn``: later attention adds ``log(sizes)`` to its logits once sizes are non-uniform.
    ``spans``: the method can select inside image spans of a longer sequence (needed at the LLM point).
    ``text_rows``: with ``TEXT_ATTENTION`` or ``LAYER_ATTENTION``, how many of the last prompt queries' attention
    rows it reads.
    """

    needs: ClassVar[frozenset] = frozenset()
    position: ClassVar[str] = "after_attention"
    prop_attn: ClassVar[bool] = False
    spans: ClassVar[bool] = False
    text_rows: ClassVar[int] = 1

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        """Static output count for ``num_tokens`` input tokens (``info``: static fields only)."""
        raise NotImplementedError

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        """The step that reduces ``state`` (``[B, T, C] -> [B, num_out(T), C]``)."""
        raise NotImplementedError

    @eager_jit(check=_check_call)
    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        return apply_step(state, self.plan(state, info))

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """The op's own FLOPs at this layer (2 x MACs)."""
        return 0


@dataclasses.dataclass(frozen=True)
class ToMe(Reducer):
    """ToMe at one layer: merge ``r`` tokens (clamped to half the mergeable ones). ``keep`` (connector use):
    merge down towards ``keep`` tokens, at most half of them per application."""

    r: int = 0
    use_prop_attn: bool = True
    keep: Optional[int] = None
    needs: ClassVar[frozenset] = frozenset({METRIC})

    @property
    def prop_attn(self) -> bool:  # type: ignore[override]
        return self.use_prop_attn

    def _r(self, num_tokens: int, info: LayerInfo) -> int:
        r = self.r if self.keep is None else max(num_tokens - self.keep, 0)
        return tome_clamp(num_tokens, r, info.num_protected)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens - self._r(num_tokens, info)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        # The protected prefix (class, distillation, registers) neither merges away nor receives a merge.
        return bipartite_soft_matching(info.require(METRIC, "tome"), r=self._r(state.num_tokens, info),
                                       num_protected=info.num_protected)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.tome_flops(num_tokens, dim // heads)


# -- layers ---------------------------------------------------------------------------------------------------


def default_layers(num_layers: int, point: str = "vit") -> list[int]:
    """The layers a staged method acts at by default, valid for every depth >= 1.

    ViT / tower: DynamicViT's ``[3, 6, 9]`` on 12 layers, scaled to the depth, never the first layer unless it is
    the only one (``[0]`` for 1 layer, ``[1]`` for 2, ``[1, 2, 3]`` for 4). LLM: before layer 2 (FastV's and DART's ``K = 2``), or layer 1 in a 2-layer LLM. Connector: its one
    pass, ``[0]``.
    """
    if num_layers < 1:
        raise SpecError(f"num_layers must be >= 1, got {num_layers}")
    if point == "llm":
        if num_layers < 2:
            raise SpecError("pruning inside the LLM needs at least 2 layers (it acts before a layer K >= 1)")
        return [min(2, num_layers - 1)]
    if point == "connector":
        return [0]
    low = 1 if num_layers > 1 else 0
    return sorted({min(num_layers - 1, max(low, round(num_layers * f))) for f in (0.25, 0.5, 0.75)})


def check_layers(layers: Sequence[int], num_layers: int, point: str = "vit") -> list[int]:
    """``layers`` as sorted unique ints, each in range for the point (``[1, L)`` in the LLM, else ``[0, L)``)."""
    if isinstance(layers, (int,)) and not isinstance(layers, bool):
        layers = [layers]
    low = 1 if point == "llm" else 0
    out = []
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
            raise SpecError(f"layers entries must be ints, got {v!r}")
        v = int(v)
        if not low <= v < num_layers:
            raise SpecError(f"layers entry {v} is outside [{low}, {num_layers}) at the {point!r} point")
        out.append(v)
    return sorted(set(out))


# -- registry -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """A registered method: its builder, the points it runs at, and how ``layers`` defaults.

    ``layers``: ``"all"`` (every layer, e.g. ToMe), ``"staged"`` (:func:`default_layers`) or ``"first"``
    (layer 0, e.g. pooling while tokens are still a grid)."""

    name: str
    build: Callable[..., list]
    points: tuple[str, ...]
    layers: str
    doc: str

    def options(self) -> dict[str, Any]:
        """Every option the spec may set (name -> default), ``layers`` included."""
        out = {}
        for p in list(inspect.signature(self.build).parameters.values())[1:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out[p.name] = None if p.default is inspect.Parameter.empty else p.default
        return out


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, points: Sequence[str] = ("vit", "vision", "connector"), layers: str = "staged"):
    """Register ``fn(num_layers, *, layers: list[int], **options) -> list[Reducer | None]`` under ``name``.

    The registry resolves ``layers`` (the user's list checked against the point, or the method's default) before
    calling ``fn``, and rejects options ``fn`` does not take. ``points``: where the method can run."""
    if layers not in ("all", "staged", "first"):
        raise ValueError(f"layers must be 'all', 'staged' or 'first', got {layers!r}")
    unknown = sorted(set(points) - set(POINTS))
    if unknown:
        raise ValueError(f"unknown points {unknown}; points: {sorted(POINTS)}")

    def wrap(fn):
        params = inspect.signature(fn).parameters
        if "layers" not in params:
            raise TypeError(f"builder of {name!r} must take a 'layers' keyword")
        _REGISTRY[name] = MethodInfo(name, fn, tuple(points), layers, inspect.getdoc(fn) or "")
        return fn

    return wrap


def available_methods(point: Optional[str] = None) -> list[str]:
    """Registered method names (those that can run at ``point`` when given)."""
    return sorted(n for n, m in _REGISTRY.items() if point is None or point in m.points or n == "none")


def method_info(method: str) -> MethodInfo:
    if method not in _REGISTRY:
        close = difflib.get_close_matches(str(method), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"unknown reduction method {method!r}{hint}; available: {available_methods()}")
    return _REGISTRY[method]


def method_options(method: str) -> dict[str, Any]:
    """The options of ``method`` with their defaults (what a spec may set besides ``method``)."""
    return method_info(method).options()


def check_spec(spec: Mapping[str, Any], point: str = "vit") -> tuple[MethodInfo, dict]:
    """Validate a spec without building it: ``(method info, options)``. Raises :class:`SpecError` naming an
    unknown method, an unknown option (with the method's options) or a point the method cannot run at."""
    if point not in POINTS:
        raise SpecError(f"point must be one of {sorted(POINTS)}, got {point!r}")
    spec = dict(spec)
    info = method_info(spec.pop("method", "none"))
    if point not in info.points and info.name != "none":
        raise SpecError(f"method {info.name!r} cannot run at the {point!r} point (it runs at {list(info.points)}); "
                        f"methods for {point!r}: {available_methods(point)}")
    valid = info.options()
    for key in spec:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"unknown option {key!r} for method {info.name!r}{hint}; its options: "
                            f"{', '.join(sorted(valid)) or '(none)'}")
    return info, spec


def build_layer_reducers(num_layers: int, spec: Optional[Mapping[str, Any]], *, point: str = "vit"
                         ) -> list[Optional[Reducer]]:
    """Resolve a plain spec (e.g. from a config) to one reducer (or ``None``) per layer at ``point``."""
    if spec is None:
        return [None] * num_layers
    if isinstance(num_layers, bool) or int(num_layers) < 1:
        raise SpecError(f"num_layers must be >= 1, got {num_layers}")
    info, options = check_spec(spec, point)
    layers = options.pop("layers", None)
    if layers is not None:
        layers = check_layers(layers, num_layers, point)
    elif info.layers == "staged":
        layers = default_layers(num_layers, point)
    elif info.layers == "first":
        layers = [1] if point == "llm" else [0]
    try:
        out = info.build(num_layers, layers=layers, **options)
    except TypeError as err:   # a wrong value type that the builder could not take
        raise SpecError(f"method {info.name!r}: {err}") from None
    if len(out) != num_layers:
        raise SpecError(f"method {info.name!r} built {len(out)} reducers for {num_layers} layers")
    needs_ok = POINTS[point]
    for i, red in enumerate(out):
        if red is None:
            continue
        missing = set(red.needs) - needs_ok
        if missing:
            raise SpecError(f"method {info.name!r} needs {sorted(missing)}, which the {point!r} point cannot provide")
        if point == "llm" and not red.spans:
            raise SpecError(f"method {info.name!r} cannot select inside image spans, so it cannot run in the LLM; "
                            f"methods for 'llm': {available_methods('llm')}")
    return out


def tokens_per_layer(num_tokens: int, reducers: Sequence[Optional[Reducer]], *, num_protected: int = 1,
                     num_distill: int = 0, image_len: int = 0, num_images: int = 1) -> list[tuple[int, int]]:
    """Static ``(attention_tokens, mlp_tokens)`` for each layer, following each reducer's position.

    The one place token counts are computed: models, FLOP counters and the budget solver all call it. In the LLM
    (``image_len > 0``) every reducer acts before its layer."""
    out = []
    t = num_tokens
    for layer, red in enumerate(reducers):
        info = LayerInfo(layer=layer, num_layers=len(reducers), num_protected=num_protected, num_distill=num_distill,
                         image_len=image_len, num_images=num_images)
        if red is None:
            out.append((t, t))
            continue
        if image_len:                       # in the LLM: before the layer; each image span shrinks alike
            t_out = red.num_out(t, info)
            image_len -= (t - t_out) // num_images
            t = t_out
            out.append((t, t))
        elif red.position == "before_attention":
            t = red.num_out(t, info)
            out.append((t, t))
        else:
            t_after = red.num_out(t, info)
            out.append((t, t_after))
            t = t_after
    return out


def candidates_kept(num_candidates: int, keep_ratio: Optional[float], keep: Optional[int]) -> int:
    """Candidates a pruning method keeps: ``keep`` (clamped to the candidates) or ``floor(n * keep_ratio)``,
    at least one."""
    from reduction.schedule import keep_count

    if keep is not None:
        return max(1, min(int(keep), num_candidates))
    return keep_count(num_candidates, keep_ratio, protected=0)


def pruned_count(num_tokens: int, info: LayerInfo, keep_ratio: Optional[float], keep: Optional[int]) -> int:
    """Static output count of a pruning method: in spans, ``T - M * (image_len - kept)``; else the protected
    prefix plus the kept candidates."""
    if info.in_spans:
        return num_tokens - info.num_images * (info.image_len - candidates_kept(info.image_len, keep_ratio, keep))
    p = info.num_protected
    if num_tokens <= p:
        return num_tokens
    return p + candidates_kept(num_tokens - p, keep_ratio, keep)


@register("none", points=tuple(POINTS), layers="all")
def _none_layers(num_layers: int, layers=None) -> list[Optional[Reducer]]:
    """No reduction."""
    return [None] * num_layers


@register("tome", layers="all")
def _tome_layers(num_layers: int, r: Any = 0, inflect: Optional[float] = None, prop_attn: bool = True,
                 keep: Optional[int] = None, layers: Optional[Sequence[int]] = None) -> list[Optional[Reducer]]:
    """ToMe (Bolya et al. 2023): ``r`` merges per layer (or a list, or ``(r, inflect)``'s schedule); ``keep``
    merges towards ``keep`` tokens instead (at the connector, repeated until reached). A ``layers`` entry outside
    ``[0, num_layers)`` raises :class:`SpecError` (also when the builder is called directly)."""
    if layers is not None:
        layers = check_layers(layers, num_layers)
    if keep is not None:
        chosen = set(range(num_layers) if layers is None else layers)
        return [ToMe(keep=int(keep), use_prop_attn=bool(prop_attn)) if i in chosen else None
                for i in range(num_layers)]
    if inflect is not None:
        rs = tome_r_schedule(num_layers, (int(r), float(inflect)))
    else:
        rs = tome_r_schedule(num_layers, list(r) if isinstance(r, (list, tuple)) else r)
    if layers is not None:
        rs = [rs[i] if i in set(layers) else 0 for i in range(num_layers)]
    return [ToMe(r=v, use_prop_attn=bool(prop_attn)) if v > 0 else None for v in rs]


def describe_methods(point: Optional[str] = None) -> str:
    """A plain-text table of the registered methods: name, points, and every option with its default (for
    ``--help`` and the docs)."""
    lines = ["registered reduction methods (spec keys: method, layers, and the options below):"]
    for name in available_methods(point):
        if name.startswith("_"):
            continue
        info = _REGISTRY[name]
        opts = ", ".join(f"{k}={v!r}" for k, v in info.options().items() if k != "layers")
        para = " ".join(info.doc.split("\n\n")[0].split())
        first = re.split(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\. ", para)[0].rstrip(".") + "."   # not at "et al."
        lines.append(f"  {name:12s} [{', '.join(info.points)}] {first}")
        if opts:
            lines.append(f"  {'':12s}   options: {opts}")
    return "\n".join(lines)
