"""Per-layer reducers: the small, model-agnostic interface between models and the ops.

A model calls a reducer at one point of a block with the current :class:`TokenState` and a
:class:`LayerInfo` holding whatever the block computed (the metric, attention probabilities, keys,
hidden states). A reducer declares which of those it ``needs`` so the model materialises attention
probabilities only for methods that read them, and reports its static output count so tokens per
layer and FLOPs are known before tracing.

Reducers are frozen dataclasses (hashable, safe as static jit arguments). Build a per-layer list with
:func:`build_layer_reducers` from a plain spec, e.g. ``{"method": "tome", "r": 13}`` or
``{"method": "pitome", "ratio": 0.9}`` or ``{"method": "topk_cls", "keep_ratio": 0.7, "layers": [3, 6, 9]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import jax

from reduction import flops as flops_lib
from reduction.schedule import tome_clamp, tome_r_schedule
from reduction.state import TokenState
from reduction.tome import tome_merge

# Names of what a block can expose to a reducer.
METRIC = "metric"          # [B, T, Ch] keys averaged over heads (ToMe's metric)
ATTENTION = "attention"    # [B, H, T, T] softmax probabilities of this block's attention
KEYS = "keys"              # [B, T, H * Dh] keys with heads concatenated (after RoPE in LLMs)
HIDDEN = "hidden"          # [B, T, C] hidden states at the reduction point


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a block hands to its reducer. Array fields are ``None`` unless the reducer ``needs`` them.

    Attributes:
      layer: index of the block (0-based); num_layers: blocks in the stack.
      num_protected: leading tokens that must survive (class token, distillation token, registers).
      metric / attention / keys / hidden: see the module constants.
      text_attention: ``[B, H, Tq, T]`` attention from text queries (VLM methods such as FastV/ATP).
      span: ``(start, length)`` of the image-token span in a longer sequence (VLM methods).
      rng: a PRNG key for stochastic reducers.
    """

    layer: int = 0
    num_layers: int = 1
    num_protected: int = 0
    num_distill: int = 0
    metric: Optional[jax.Array] = None
    attention: Optional[jax.Array] = None
    keys: Optional[jax.Array] = None
    hidden: Optional[jax.Array] = None
    text_attention: Optional[jax.Array] = None
    span: Optional[Any] = None
    rng: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Reducer:
    """Base class. Subclasses set ``needs`` and ``position`` and implement the three methods.

    ``position`` is where the block calls the reducer: ``"after_attention"`` (between the attention
    residual and the MLP, ToMe's place) or ``"before_attention"`` (pruning before the block runs).
    ``prop_attn``: the model should add ``log(sizes)`` to attention logits once sizes are non-uniform.
    """

    needs: ClassVar[frozenset] = frozenset()
    position: ClassVar[str] = "after_attention"
    prop_attn: ClassVar[bool] = False

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        raise NotImplementedError

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        raise NotImplementedError

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """The op's own FLOPs at this layer (2 x MACs)."""
        return 0


@dataclasses.dataclass(frozen=True)
class ToMe(Reducer):
    """ToMe at one layer: merge ``r`` tokens (clamped to half the mergeable ones)."""

    r: int = 0
    use_prop_attn: bool = True
    needs: ClassVar[frozenset] = frozenset({METRIC})

    @property
    def prop_attn(self) -> bool:  # type: ignore[override]
        return self.use_prop_attn

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens - tome_clamp(num_tokens, self.r, info.num_protected)

    def __call__(self, state: TokenState, info: LayerInfo) -> TokenState:
        if info.num_protected > 2:
            raise ValueError("ToMe protects at most a class and a distillation token (num_protected <= 2)")
        return tome_merge(
            state,
            info.metric,
            r=self.r,
            class_token=info.num_protected - info.num_distill >= 1,
            distill_token=info.num_distill >= 1,
        )

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.tome_flops(num_tokens, dim // heads)


# -- registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
    """Register a per-layer builder ``fn(num_layers, **spec) -> list[Reducer | None]`` under ``name``."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


@register("none")
def _none_layers(num_layers: int) -> list[Optional[Reducer]]:
    return [None] * num_layers


@register("tome")
def _tome_layers(num_layers: int, r: Any = 0, inflect: Optional[float] = None, prop_attn: bool = True,
                 layers: Optional[Sequence[int]] = None) -> list[Optional[Reducer]]:
    if inflect is not None:
        rs = tome_r_schedule(num_layers, (int(r), float(inflect)))
    else:
        rs = tome_r_schedule(num_layers, list(r) if isinstance(r, (list, tuple)) else r)
    if layers is not None:
        rs = [rs[i] if i in set(layers) else 0 for i in range(num_layers)]
    return [ToMe(r=v, use_prop_attn=prop_attn) if v > 0 else None for v in rs]


def build_layer_reducers(num_layers: int, spec: Optional[Mapping[str, Any]]) -> list[Optional[Reducer]]:
    """Resolve a plain spec (e.g. from a config) to one reducer (or ``None``) per layer."""
    if spec is None:
        return [None] * num_layers
    spec = dict(spec)
    method = spec.pop("method", "none")
    if method not in _REGISTRY:
        raise ValueError(f"unknown reduction method {method!r}; available: {available_methods()}")
    out = _REGISTRY[method](num_layers, **spec)
    if len(out) != num_layers:
        raise ValueError(f"method {method!r} built {len(out)} reducers for {num_layers} layers")
    return out


def tokens_per_layer(num_tokens: int, reducers: Sequence[Optional[Reducer]], *, num_protected: int = 1,
                     num_distill: int = 0) -> list[tuple[int, int]]:
    """Static ``(attention_tokens, mlp_tokens)`` for each layer, following each reducer's position."""
    out = []
    t = num_tokens
    for layer, red in enumerate(reducers):
        info = LayerInfo(layer=layer, num_layers=len(reducers), num_protected=num_protected, num_distill=num_distill)
        if red is None:
            out.append((t, t))
            continue
        if red.position == "before_attention":
            t = red.num_out(t, info)
            out.append((t, t))
        else:
            t_after = red.num_out(t, info)
            out.append((t, t_after))
            t = t_after
    return out
