"""Small Flax NNX building blocks shared by the vision and vision-language models.

Dimension vocabulary: B batch, T tokens, C channels, H heads, Dh = C / H head width.
Every module keeps its hyperparameters as plain attributes and has no side effects in ``__call__``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

_TRUNC_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def layer_norm(dim: int, *, eps: float, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the two-pass variance (matches PyTorch to float32 rounding)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout: ``[q | k | v]``, each ``[H, Dh]``).

    Two paths with identical maths:

    * fused (default): ``jax.nn.dot_product_attention(q, k, v, bias=...)``; no probabilities are formed;
    * explicit (``need_probs=True``): float32 softmax of the scaled logits; returns the probabilities too.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, dtype=None, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads = dim, heads
        self.head_dim = dim // heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, kernel_init=_TRUNC_INIT, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, kernel_init=_TRUNC_INIT, rngs=rngs)

    def __call__(self, x: jax.Array, *, bias: Optional[jax.Array] = None, need_probs: bool = False):
        """``x: [B, T, C]``, ``bias: [B, 1, 1, T]`` additive key bias or ``None``.

        Returns ``(out [B, T, C], keys [B, T, H, Dh], probs [B, H, T, T] or None)``.
        """
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if not need_probs:
            b_ = None if bias is None else bias.astype(q.dtype)
            out = jax.nn.dot_product_attention(q, k, v, bias=b_)
            probs = None
        else:
            scale = self.head_dim ** -0.5
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
            if bias is not None:
                logits = logits + bias.astype(jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        out = self.proj(out.reshape(b, t, self.dim))
        return out, k, probs


class Mlp(nnx.Module):
    """``Linear -> exact GELU -> Linear``: ``[..., C] -> [..., C]``."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, kernel_init=_TRUNC_INIT, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, kernel_init=_TRUNC_INIT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
    """Per-channel scale ``gamma * x`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Non-overlapping patches: ``[B, H, W, 3] -> [B, H/p * W/p, C]`` (row-major patch order), as a strided conv."""

    def __init__(self, patch: int, dim: int, *, in_chans: int = 3, dtype=None, rngs: nnx.Rngs):
        self.patch = patch
        self.proj = nnx.Conv(in_chans, dim, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
                             rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        y = self.proj(images)
        b, gh, gw, c = y.shape
        return y.reshape(b, gh * gw, c)


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75):
    """``[out_size, in_size]`` NumPy matrix of PyTorch's bicubic resize (``align_corners=False``).

    Source coordinate ``(i + 0.5) * in/out - 0.5``, Keys kernel with ``a = -0.75``, out-of-range taps
    clamped to the border (same as ONNX ``Resize`` cubic / half_pixel). Applying it along both axes of a
    grid reproduces ``torch.nn.functional.interpolate(mode="bicubic", size=...)``.
    """
    import numpy as np

    def kernel(d):
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return (((d - 5) * d + 8) * d - 4) * a
        return 0.0

    mat = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        frac = src - base
        for tap in range(-1, 3):
            j = min(max(base + tap, 0), in_size - 1)
            mat[i, j] += kernel(tap - frac)
    return mat.astype(np.float32)


def resize_grid(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bicubic resize of a ``[gh, gw, C]`` grid to ``[out_h, out_w, C]`` (PyTorch ``align_corners=False``)."""
    gh, gw, _ = grid.shape
    oh, ow = out_hw
    if (gh, gw) == (oh, ow):
        return grid
    my = jnp.asarray(cubic_resize_matrix(gh, oh))
    mx = jnp.asarray(cubic_resize_matrix(gw, ow))
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ih,hwc->iwc", my, grid.astype(jnp.float32), precision=hi)
    out = jnp.einsum("jw,iwc->ijc", mx, out, precision=hi)
    return out.astype(grid.dtype)


__all__ = ["Attention", "Mlp", "LayerScale", "PatchEmbed", "layer_norm", "cubic_resize_matrix", "resize_grid"]


# -- the reduction point of a block -------------------------------------------------------------------------


def reducer_info(reducer, base: dict, keys: Optional[jax.Array], probs: Optional[jax.Array],
                 hidden: jax.Array):
    """The :class:`reduction.LayerInfo` a block hands to ``reducer``: the static ``base`` fields (layer,
    num_layers, num_protected, num_distill, rng) plus only the arrays the reducer ``needs``. ``keys: [B, T, H, Dh]``,
    ``probs: [B, H, T, T]`` or ``None``, ``hidden: [B, T, C]``."""
    import reduction as R

    needs = reducer.needs
    b, t = hidden.shape[:2]
    return R.LayerInfo(
        **base,
        metric=jnp.mean(keys, axis=2) if R.METRIC in needs else None,
        attention=probs if R.ATTENTION in needs else None,
        keys=keys.reshape(b, t, keys.shape[2] * keys.shape[3]) if R.KEYS in needs else None,   # -1 fails at B = 0
        hidden=hidden if R.HIDDEN in needs else None,
    )


def prop_attn_flags(reducers) -> list[bool]:
    """Static per-layer switch: proportional attention once a reducer with ``prop_attn`` has run (from its own
    layer on for a ``before_attention`` reducer, from the next layer for an ``after_attention`` one)."""
    flags, active = [], False
    for red in reducers:
        if red is not None and red.prop_attn and red.position == "before_attention":
            active = True
        flags.append(active)
        if red is not None and red.prop_attn:
            active = True
    return flags


def reducing_block(state, *, attn, norm1, mlp, norm2, ls1=None, ls2=None, reducer=None, info: Optional[dict] = None,
                   prop_attn: bool = False):
    """A pre-norm transformer block with its reduction point, shared by the ViT and the VLM's vision tower.

    ``state.x: [B, T, C] -> [B, K, C]`` (``K = T`` without a reducer): ``x + ls1(attn(norm1(x)))``, then the reducer
    at its ``position`` (``"after_attention"``: before the MLP, ToMe's place; ``"before_attention"``: at the start of
    the block, on this block's own attention over the tokens about to be reduced), then ``x + ls2(mlp(norm2(x)))``.
    ``attn(x, bias=, need_probs=) -> (y, keys [B, T, H, Dh], probs or None)``. Attention stays fused unless the
    reducer needs probabilities. ``reducer`` is anything with ``needs``, ``position`` and
    ``reducer(state, info) -> state`` (a :class:`reduction.Reducer`, or a model's binding of a learned reducer)."""
    import reduction as R

    info = info or {}

    def bias(st):
        prop = R.proportional_attention_bias(st.sizes) if prop_attn else None
        return R.combine_biases(prop, R.key_mask_bias(st.valid))

    if reducer is not None and reducer.position not in ("after_attention", "before_attention"):
        raise ValueError(f"reducer.position must be 'after_attention' or 'before_attention', got {reducer.position!r}")
    if reducer is not None and reducer.position == "before_attention":
        b, t = state.x.shape[:2]
        keys = probs = None
        if reducer.needs & {R.METRIC, R.ATTENTION, R.KEYS}:
            _, keys, probs = attn(norm1(state.x), bias=bias(state), need_probs=R.ATTENTION in reducer.needs)
        if keys is None:
            keys = jnp.zeros((b, t, 1, 1), state.x.dtype)
        state = reducer(state, reducer_info(reducer, info, keys, probs, state.x))

    need_probs = reducer is not None and reducer.position == "after_attention" and R.ATTENTION in reducer.needs
    y, keys, probs = attn(norm1(state.x), bias=bias(state), need_probs=need_probs)
    state = state.replace(x=state.x + (ls1(y) if ls1 is not None else y))
    if reducer is not None and reducer.position == "after_attention":
        state = reducer(state, reducer_info(reducer, info, keys, probs, state.x))
    y = mlp(norm2(state.x))
    return state.replace(x=state.x + (ls2(y) if ls2 is not None else y))
