"""Small Flax NNX building blocks shared by the ViT, the CLIP tower (a ViT configuration) and the Llama LM.

One :class:`Attention` (fused ``qkv`` or separate ``q/k/v`` projections, grouped-query heads, biases on/off,
optional RoPE, the fused ``jax.nn.dot_product_attention`` path and the explicit float32-probabilities path) and one
:class:`Mlp` (exact GELU, ``quick_gelu`` or the gated SwiGLU layout) serve all three models; each model picks the
options and keeps its own parameter names (ViT ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1``, Llama
``self_attn.q_proj`` ... ``o_proj`` / ``mlp.gate_proj`` ...), so checkpoints load unchanged.

Dimension vocabulary: B batch, T tokens, S keys, C channels, H heads, G key/value heads, Dh head width
(``C / H`` unless given).
Every module keeps its hyperparameters as plain attributes and has no side effects in ``__call__``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

_TRUNC_INIT = nnx.initializers.truncated_normal(stddev=0.02)
DEFAULT_INIT = nnx.initializers.lecun_normal()  # nnx.Linear's own default (Llama, HF-style random init)

PROBS = ("none", "rows", "all")
ACTIVATIONS = ("gelu", "quick_gelu", "swiglu")


def layer_norm(dim: int, *, eps: float, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the two-pass variance (matches PyTorch to float32 rounding)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


# -- rotary embeddings ----------------------------------------------------------------------------------


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``positions: [B, T]`` int -> ``cos, sin: [B, T, Dh]`` float32 (HF layout: the frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x: [B, T, H, Dh]`` rotated with HF's ``rotate_half`` convention, computed in float32."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# -- attention ------------------------------------------------------------------------------------------


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                       bias: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Attention with its probabilities, all in float32. ``q: [B, Tq, H, Dh]``, ``k, v: [B, S, G, Dh]`` (``G``
    divides ``H``: grouped-query heads are repeated), ``mask: [B, 1, Tq, S]`` bool (``False`` = masked) and/or
    ``bias``: additive, broadcastable to ``[B, H, Tq, S]`` -> ``out [B, Tq, H, Dh]`` (``q.dtype``), ``probs
    [B, H, Tq, S]`` float32. Fully masked rows give uniform weights."""
    h, g = q.shape[2], k.shape[2]
    if h % g:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {g}")
    kr = jnp.repeat(k, h // g, axis=2).astype(jnp.float32)
    vr = jnp.repeat(v, h // g, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), kr) * (q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqs,bshd->bqhd", probs, vr).astype(q.dtype)
    return out, probs


IMPLEMENTATIONS = (None, "xla", "cudnn", "explicit")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_NEG = -float(2 ** 41)   # jax's own mask value for cuDNN (it mis-handles sums of two float32-min values)


def cudnn_refusal(q: jax.Array, k: jax.Array, *, has_bias: bool, backend: Optional[str] = None) -> Optional[str]:
    """Why cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``, JAX 0.10) would refuse
    ``q: [B, Tq, H, Dh]``, ``k: [B, S, G, Dh]``, or ``None`` when it accepts them. Its conditions: a CUDA GPU;
    bfloat16 / float16 operands (no float32); ``Dh`` a multiple of 8 and at most 128 (256 from Hopper, compute
    capability 9.0, on); with a bias, even ``Tq`` and ``S`` when the call is differentiated (checked here always,
    since a forward cannot know whether it will be). A bias must be ``[B or 1, H or 1, Tq, S]``: :meth:`Attention.attend`
    broadcasts the key bias there."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"cuDNN attention needs a CUDA GPU, the backend is {backend!r}"
    if q.dtype not in CUDNN_DTYPES or k.dtype != q.dtype:
        return f"cuDNN attention needs bfloat16 or float16 q/k/v, got {q.dtype} / {k.dtype}"
    dh = q.shape[-1]
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    try:
        hopper = float(cc) >= 9.0
    except (TypeError, ValueError):
        hopper = False
    limit = 256 if hopper else 128
    if dh % 8 or dh > limit:
        return f"cuDNN attention needs a head width that is a multiple of 8 and at most {limit}, got {dh}"
    if has_bias and (q.shape[1] % 2 or k.shape[1] % 2):
        return (f"cuDNN attention with a bias or mask needs even query and key counts to be differentiable, got "
                f"Tq={q.shape[1]}, S={k.shape[1]}")
    return None


def choose_implementation(requested: Optional[str], q: jax.Array, k: jax.Array, *, has_bias: bool) -> str:
    """The attention kernel for one call (static: decided while tracing, from shapes, dtypes and the backend).

    ``None`` (auto): ``"cudnn"`` where :func:`cudnn_refusal` finds nothing, else ``"xla"`` (the fallback: CPU, TPU,
    float32, unsupported head widths, a bias at odd token counts); ``"xla"``: always XLA's fused
    ``dot_product_attention`` (softmax in float32); ``"cudnn"``: cuDNN or a ``ValueError`` naming the reason;
    ``"explicit"``: :func:`explicit_attention` (probabilities formed in float32; the reference path)."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {requested!r}")
    if requested in ("xla", "explicit"):
        return requested
    why = cudnn_refusal(q, k, has_bias=has_bias)
    if requested == "cudnn":
        if why is not None:
            raise ValueError(f"implementation='cudnn' refused: {why} (use None to fall back to 'xla')")
        return "cudnn"
    return "xla" if why is not None else "cudnn"


def _cudnn_bias(bias: Optional[jax.Array], mask: Optional[jax.Array], tq: int, s: int,
                dtype) -> Optional[jax.Array]:
    """The additive bias and the boolean mask as one ``[B or 1, H or 1, Tq, S]`` bias in ``dtype`` (cuDNN takes
    neither a broadcast query axis nor float32), floored at ``-2^41`` like jax's own cuDNN mask value."""
    out = None if bias is None else bias.astype(jnp.float32)
    if mask is not None:
        m = jnp.where(mask, 0.0, _CUDNN_NEG)
        out = m if out is None else out + m
    if out is None:
        return None
    out = jnp.maximum(out, _CUDNN_NEG)
    return jnp.broadcast_to(out, out.shape[:2] + (tq, s)).astype(dtype)


def _rows(a: Optional[jax.Array], rows: int) -> Optional[jax.Array]:
    """The last ``rows`` query rows of a ``[B, 1 or H, Tq or 1, S]`` mask or bias (broadcast rows stay)."""
    if a is None or a.shape[2] == 1:
        return a
    return a[:, :, -rows:]


class Attention(nnx.Module):
    """Multi-head self-attention shared by the ViT, the CLIP tower (a ViT configuration) and Llama.

    Options (all static):

    * ``fused_qkv=True``: one ``qkv`` projection (timm layout ``[q | k | v]``, each ``[H, Dh]``) and ``proj``
      out (the ViT's names); ``False``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Llama's / HF names);
    * ``num_kv_heads`` (``G``, default ``H``): grouped-query attention, ``G`` divides ``H`` (separate projections
      only);
    * ``qkv_bias`` / ``out_bias``: biases of the input and output projections;
    * ``rope_theta``: rotary embeddings (HF ``rotate_half``) on q and k from the position ids given to
      :meth:`project`; ``None`` for none;
    * ``head_dim`` (default ``dim // heads``), ``dtype`` (compute), ``param_dtype``, ``kernel_init``;
    * ``implementation``: the kernel of the fused path, ``None`` (cuDNN on a GPU where it accepts the operands,
      else XLA), ``"xla"``, ``"cudnn"`` (refused with a named error where cuDNN cannot run) or ``"explicit"``
      (:func:`explicit_attention` everywhere); see :func:`choose_implementation`.

    Two attention paths (:meth:`attend`), identical maths: fused (no probabilities formed; the kernel chosen by
    ``implementation``), and the explicit float32 softmax (:func:`explicit_attention`) for all rows or the last
    ``rows`` queries (on top of the fused output). Masking: a boolean ``mask`` (causal / padding) and/or an
    additive ``bias`` (``[B, 1, 1, S]`` key bias: padding, proportional attention). On the XLA path the bias is
    added to float32 logits and kept in float32 (a bfloat16 ``log 2`` would be off by 0.3%); cuDNN takes it in the
    compute dtype, broadcast to ``[B, 1, Tq, S]``.
    """

    def __init__(self, dim: int, heads: int, *, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 fused_qkv: bool = True, qkv_bias: bool = True, out_bias: bool = True,
                 rope_theta: Optional[float] = None, dtype=None, param_dtype=jnp.float32, kernel_init=_TRUNC_INIT,
                 implementation: Optional[str] = None, rngs: nnx.Rngs):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        num_kv_heads = heads if num_kv_heads is None else num_kv_heads
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        if heads % num_kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if fused_qkv and num_kv_heads != heads:
            raise ValueError("fused_qkv=True needs num_kv_heads == heads (use separate projections for GQA)")
        self.dim, self.heads, self.num_kv_heads = dim, heads, num_kv_heads
        self.head_dim = head_dim or dim // heads
        self.fused_qkv, self.rope_theta = fused_qkv, rope_theta
        qdim, kvdim = heads * self.head_dim, num_kv_heads * self.head_dim

        def linear(din, dout, bias):
            return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                              rngs=rngs)

        if fused_qkv:
            self.qkv = linear(dim, qdim + 2 * kvdim, qkv_bias)
            self.proj = linear(qdim, dim, out_bias)
        else:
            self.q_proj = linear(dim, qdim, qkv_bias)
            self.k_proj = linear(dim, kvdim, qkv_bias)
            self.v_proj = linear(dim, kvdim, qkv_bias)
            self.o_proj = linear(qdim, dim, out_bias)

    def project(self, x: jax.Array, positions: Optional[jax.Array] = None):
        """``x: [B, T, C]`` -> ``q [B, T, H, Dh]``, ``k, v [B, T, G, Dh]``, RoPE applied to q and k when the module
        has ``rope_theta`` (then ``positions: [B, T]`` int is required)."""
        if self.rope_theta is not None and positions is None:
            raise ValueError("this attention applies RoPE: positions [B, T] are required")
        b, t, _ = x.shape
        h, g, dh = self.heads, self.num_kv_heads, self.head_dim
        if self.fused_qkv:
            qkv = self.qkv(x).reshape(b, t, 3, h, dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.q_proj(x).reshape(b, t, h, dh)
            k = self.k_proj(x).reshape(b, t, g, dh)
            v = self.v_proj(x).reshape(b, t, g, dh)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, dh, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None, probs: str = "none", rows: Optional[int] = None):
        """``q: [B, Tq, H, Dh]``, ``k, v: [B, S, G, Dh]`` -> ``(o [B, Tq, H, Dh], p)``.

        ``probs``: ``"none"`` (fused, ``p = None``), ``"rows"`` (fused output plus the explicit probabilities of
        the last ``rows`` queries, ``p: [B, H, rows, S]``) or ``"all"`` (explicit, ``p: [B, H, Tq, S]``)."""
        if probs not in PROBS:
            raise ValueError(f"probs must be one of {PROBS}, got {probs!r}")
        if probs == "all":
            return explicit_attention(q, k, v, mask, bias)
        o = self.fused(q, k, v, mask=mask, bias=bias)
        p = None
        if probs == "rows":
            if rows is None or rows < 1:
                raise ValueError(f"probs='rows' needs rows >= 1, got {rows!r}")
            _, p = explicit_attention(q[:, -rows:], k, v, _rows(mask, rows), _rows(bias, rows))
        return o, p

    def fused(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
              bias: Optional[jax.Array] = None) -> jax.Array:
        """The attention output alone, ``[B, Tq, H, Dh]``, through the kernel :func:`choose_implementation` picks."""
        impl = choose_implementation(self.implementation, q, k, has_bias=bias is not None or mask is not None)
        if impl == "explicit":
            return explicit_attention(q, k, v, mask, bias)[0]
        if impl == "cudnn":
            b_ = _cudnn_bias(bias, mask, q.shape[1], k.shape[1], q.dtype)
            return jax.nn.dot_product_attention(q, k, v, bias=b_, implementation="cudnn")
        b_ = None if bias is None else bias.astype(jnp.promote_types(q.dtype, jnp.float32))
        return jax.nn.dot_product_attention(q, k, v, bias=b_, mask=mask, implementation="xla")

    def out(self, o: jax.Array) -> jax.Array:
        """``o: [B, T, H, Dh] -> [B, T, C]`` through the output projection."""
        b, t = o.shape[:2]
        o = o.reshape(b, t, o.shape[2] * o.shape[3])          # not -1: that fails at B = 0
        return self.proj(o) if self.fused_qkv else self.o_proj(o)

    def __call__(self, x: jax.Array, *, positions: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
                 bias: Optional[jax.Array] = None, need_probs: bool = False):
        """``x: [B, T, C]``, ``bias: [B, 1, 1, T]`` additive key bias, ``mask: [B, 1, T, T]`` bool, or ``None``.

        Returns ``(out [B, T, C], keys [B, T, G, Dh] (post-RoPE), probs [B, H, T, T] float32 or None)``.
        """
        q, k, v = self.project(x, positions)
        o, probs = self.attend(q, k, v, mask=mask, bias=bias, probs="all" if need_probs else "none")
        return self.out(o), k, probs


# -- MLP ------------------------------------------------------------------------------------------------


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nnx.Module):
    """``[..., C] -> [..., C]``. ``act``: ``"gelu"`` (exact; ``fc1 -> GELU -> fc2``, the ViT), ``"quick_gelu"``
    (CLIP, same names) or ``"swiglu"`` (Llama: ``down_proj(silu(gate_proj(x)) * up_proj(x))``)."""

    def __init__(self, dim: int, hidden: int, *, act: str = "gelu", bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, kernel_init=_TRUNC_INIT, rngs: nnx.Rngs):
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.act = act

        def linear(din, dout):
            return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                              rngs=rngs)

        if act == "swiglu":
            self.gate_proj, self.up_proj, self.down_proj = linear(dim, hidden), linear(dim, hidden), linear(hidden, dim)
        else:
            self.fc1, self.fc2 = linear(dim, hidden), linear(hidden, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.act == "swiglu":
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.fc1(x)
        h = quick_gelu(h) if self.act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return self.fc2(h)


class LayerScale(nnx.Module):
    """Per-channel scale ``gamma * x`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Non-overlapping patches: ``[B, H, W, 3] -> [B, H/p * W/p, C]`` (row-major patch order), as a strided conv
    (``bias=False``: CLIP's patch embedding has none)."""

    def __init__(self, patch: int, dim: int, *, in_chans: int = 3, bias: bool = True, dtype=None, rngs: nnx.Rngs):
        self.patch = patch
        self.proj = nnx.Conv(in_chans, dim, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=bias,
                             dtype=dtype, rngs=rngs)

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


__all__ = ["Attention", "IMPLEMENTATIONS", "choose_implementation", "cudnn_refusal", "Mlp", "LayerScale", "PatchEmbed", "layer_norm", "cubic_resize_matrix", "resize_grid",
           "explicit_attention", "rope_cos_sin", "apply_rope", "quick_gelu"]


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
                   prop_attn: bool = False, drop_path=None):
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
    y = ls1(y) if ls1 is not None else y
    state = state.replace(x=state.x + (y if drop_path is None else drop_path(y, 0)))
    if reducer is not None and reducer.position == "after_attention":
        state = reducer(state, reducer_info(reducer, info, keys, probs, state.x))
    y = mlp(norm2(state.x))
    y = ls2(y) if ls2 is not None else y
    return state.replace(x=state.x + (y if drop_path is None else drop_path(y, 1)))


def drop_path(y, key, rate: float):
    """Stochastic depth on a residual branch ``y [B, ...]``: each example keeps its branch with probability
    ``1 - rate``, scaled by ``1 / (1 - rate)`` (so the expectation is unchanged), or drops it to 0. ``rate = 0`` or
    ``key = None`` returns ``y`` itself."""
    if key is None or rate <= 0:
        return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return y * (mask.astype(y.dtype) / jnp.asarray(keep, y.dtype))
