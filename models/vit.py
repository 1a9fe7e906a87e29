"""Flax NNX Vision Transformer (ViT / DeiT / DINOv2 layouts) with a reducer slot in every block.

Dimension vocabulary: B batch, N original tokens, T current tokens, C channels (width), H heads,
K kept tokens. Images are ``[B, H, W, 3]`` float32 NHWC.

Each block runs ``x = x + ls1(attn(norm1(x)))``, then calls its reducer (if any) at the reducer's
``position`` (``"after_attention"``: between the attention residual and the MLP, as ToMe does;
``"before_attention"``: at the start of the block), then ``x = x + ls2(mlp(norm2(x)))``. The block hands the
reducer a :class:`reduction.LayerInfo` holding only what the reducer ``needs``. Attention uses the fused
``jax.nn.dot_product_attention`` unless the reducer needs attention probabilities. Token bookkeeping is a
:class:`reduction.TokenState` threaded through the blocks, so sizes, positions, validity and the source map
stay consistent for every method.

Reducers are static: pass a tuple with one :class:`reduction.Reducer` (or ``None``) per block; token counts per
layer are Python ints known before tracing.

Learned ATP thresholds (:meth:`ViT.attach_atp`) are the one trainable reduction: :class:`reduction.nnx.ATPModule`
instances live in ``model.atp`` (an ``nnx.Dict`` keyed by the layer index as a string, so their parameter paths
start with ``atp/``) and run at their block's after-attention point. ``model(images, atp_mode="soft")`` keeps every
token and gates the later layers with the soft keep mask (training); ``atp_mode="hard"`` (default) prunes to a static
capacity with a validity mask (inference).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

import reduction as R
from reduction import atp as atp_ops
from reduction.schedule import keep_count
from reduction.validate import check_count, check_rank, check_ratio
from models.layers import (Attention, LayerScale, Mlp, PatchEmbed, layer_norm, prop_attn_flags, reducing_block,
                           resize_grid)

# big_vision's width / depth / mlp / heads per size name.
VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, heads=16),
}

POOLS = ("token", "avg", "gap", "cls+avg")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`ViT`.

    Attributes:
      width, depth, mlp_dim, heads: transformer size (``C``, blocks, MLP hidden width, ``H``).
      patch_size: square patch side in pixels.
      image_size: resolution the learned position embedding is laid out for (grid ``image_size / patch``);
        other resolutions interpolate it bicubically.
      num_classes: ``0`` means no head (the model returns pooled features).
      class_token / distill_token / num_registers: leading tokens, in the order
        ``[cls, dist, registers..., patches]``; all of them are protected from reduction.
      pos_embed_prefix: the position embedding also covers the class/distillation tokens (timm, HF); big_vision
        adds it to the patches only.
      layer_scale: initial LayerScale value (DINOv2), ``None`` for none.
      ln_eps: LayerNorm epsilon (timm/big_vision 1e-6, HF ViT 1e-12, DINOv2 1e-6).
      pool: ``"token"`` (class token), ``"avg"``/``"gap"`` (size-weighted mean of non-protected tokens) or
        ``"cls+avg"`` (concatenation, ``[B, 2C]``).
      qkv_bias: biases on the qkv projection.
      dtype: compute dtype (parameters stay float32); ``None`` = float32.
    """

    width: int = 384
    depth: int = 12
    mlp_dim: int = 1536
    heads: int = 6
    patch_size: int = 16
    image_size: int = 224
    num_classes: int = 0
    class_token: bool = True
    distill_token: bool = False
    num_registers: int = 0
    pos_embed_prefix: bool = True
    layer_scale: Optional[float] = None
    ln_eps: float = 1e-6
    pool: str = "token"
    qkv_bias: bool = True
    dtype: Optional[Any] = None

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool in ("token", "cls+avg") and not self.class_token:
            raise ValueError(f"pool={self.pool!r} needs class_token=True")
        if self.distill_token and not self.class_token:
            raise ValueError("distill_token=True needs class_token=True")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")

    @property
    def num_protected(self) -> int:
        """Leading tokens that reductions must keep: class + distillation + registers."""
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @property
    def num_prefix(self) -> int:
        """Class + distillation tokens (the ones the position embedding may cover)."""
        return int(self.class_token) + int(self.distill_token)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def parse_variant(variant: str) -> dict[str, int]:
    """``"S/16"`` -> ``dict(width=384, depth=12, mlp_dim=1536, heads=6, patch_size=16)`` (big_vision names)."""
    m = re.fullmatch(r"([A-Za-z]+)(?:/(\d+))?", variant.strip())
    if m is None or m.group(1) not in VARIANTS:
        raise ValueError(f"variant {variant!r} not understood; sizes: {sorted(VARIANTS)}, e.g. 'B/16'")
    out = dict(VARIANTS[m.group(1)])
    if m.group(2):
        out["patch_size"] = int(m.group(2))
    return out


def vit_config(variant: Optional[str] = None, **overrides) -> ViTConfig:
    """Build a :class:`ViTConfig` from a variant name plus field overrides (unknown fields raise)."""
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViT config fields {unknown}; fields: {sorted(fields)}")
    base = parse_variant(variant) if variant else {}
    base.update(overrides)
    return ViTConfig(**base)


class Block(nnx.Module):
    """Pre-norm transformer block with an optional reducer call (see the module docstring)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        c = cfg.width
        self.norm1 = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(c, cfg.heads, qkv_bias=cfg.qkv_bias, dtype=cfg.dtype, rngs=rngs)
        self.norm2 = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.mlp = Mlp(c, cfg.mlp_dim, dtype=cfg.dtype, rngs=rngs)
        self.ls1 = LayerScale(c, cfg.layer_scale) if cfg.layer_scale is not None else None
        self.ls2 = LayerScale(c, cfg.layer_scale) if cfg.layer_scale is not None else None

    def __call__(self, state: R.TokenState, *, reducer: Optional[R.Reducer] = None, info: Optional[dict] = None,
                 prop_attn: bool = False,
                 hook: Optional[Callable[[R.TokenState, jax.Array], R.TokenState]] = None) -> R.TokenState:
        """``state.x: [B, T, C] -> [B, K, C]`` (:func:`models.layers.reducing_block`). ``info``: the static LayerInfo
        fields (layer, num_layers, num_protected, num_distill, rng)."""
        return reducing_block(state, attn=self.attn, norm1=self.norm1, mlp=self.mlp, norm2=self.norm2, ls1=self.ls1,
                              ls2=self.ls2, reducer=reducer, info=info, prop_attn=prop_attn, hook=hook)


def _as_reducers(reducers, depth: int) -> tuple:
    if reducers is None:
        return (None,) * depth
    if isinstance(reducers, Mapping):
        reducers = R.build_layer_reducers(depth, reducers)
    reducers = tuple(reducers)
    if len(reducers) != depth:
        raise ValueError(f"reducers has {len(reducers)} entries but the model has {depth} blocks")
    for i, red in enumerate(reducers):
        if red is not None and not isinstance(red, R.Reducer):
            raise ValueError(f"reducers[{i}] must be a reduction.Reducer or None, got {type(red).__name__}")
    return reducers


ATP_MODES = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class ATPSpec:
    """Static settings of the learned ATP layers (:meth:`ViT.attach_atp`).

    ``layers``: blocks whose after-attention point runs an ATP module; ``capacity_ratio``: hard-mode static capacity
    ``keep_count(T, capacity_ratio, protected=num_protected)`` at that layer's token count ``T``; ``stride``: spatial
    grid of always-kept patches (:func:`reduction.atp.spatial_grid_mask`, 0 = none); ``straight_through``: soft
    mode gates with the hard 0/1 keep set in the forward pass and takes gradients through the soft mask.
    """

    layers: tuple[int, ...]
    capacity_ratio: float
    stride: int
    straight_through: bool = False

    def capacity(self, num_tokens: int, num_protected: int) -> int:
        return keep_count(num_tokens, self.capacity_ratio, protected=num_protected)


class ViT(nnx.Module):
    """Vision Transformer. ``model(images [B, H, W, 3]) -> (out, aux)``; see :meth:`__call__`."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        c = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, c, dtype=cfg.dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, c))) if cfg.class_token else None
        self.dist_token = nnx.Param(init(rngs.params(), (1, 1, c))) if cfg.distill_token else None
        self.reg_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_registers, c))) if cfg.num_registers else None
        n_pos = cfg.grid * cfg.grid + (cfg.num_prefix if cfg.pos_embed_prefix else 0)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, n_pos, c)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        feat = 2 * c if cfg.pool == "cls+avg" else c
        zeros = nnx.initializers.zeros
        self.head = (nnx.Linear(feat, cfg.num_classes, kernel_init=zeros, dtype=cfg.dtype, rngs=rngs)
                     if cfg.num_classes else None)
        self.head_dist = (nnx.Linear(c, cfg.num_classes, kernel_init=zeros, dtype=cfg.dtype, rngs=rngs)
                          if cfg.num_classes and cfg.distill_token else None)
        self.atp_spec: Optional[ATPSpec] = None  # set by attach_atp (the modules go to self.atp)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Union[ViTConfig, Mapping[str, Any], str, None] = None, *,
                    rngs: Optional[nnx.Rngs] = None, seed: int = 0, **overrides) -> "ViT":
        """Build from a :class:`ViTConfig`, a mapping (e.g. an ``ml_collections`` node with ``variant`` and
        field overrides), or a variant name like ``"S/16"``; keyword ``overrides`` win."""
        if isinstance(config, ViTConfig):
            cfg = config.replace(**overrides) if overrides else config
        else:
            if isinstance(config, str):
                spec = {"variant": config}
            elif config is None:
                spec = {}
            else:
                spec = dict(config.to_dict() if hasattr(config, "to_dict") else config)
            spec.update(overrides)
            cfg = vit_config(spec.pop("variant", None), **spec)
        return cls(cfg, rngs=rngs if rngs is not None else nnx.Rngs(seed))

    def attach_atp(self, layers: Sequence[int], *, capacity_ratio: float, stride: int = 4, hidden: int = 16,
                   temperature: float = 10.0, init_theta: float = 0.3, self_weight: float = 0.5,
                   straight_through: bool = False, rngs: Optional[nnx.Rngs] = None, seed: int = 0) -> "ViT":
        """Attach one trainable :class:`reduction.nnx.ATPModule` per entry of ``layers`` (block indices).

        The modules go to ``self.atp`` (``nnx.Dict`` keyed ``str(layer)``; parameter paths ``atp/<layer>/...``, so
        ``optim.trainable=("^atp/",)`` trains only them) and run after the attention of their block (see
        :meth:`__call__`, ``atp_mode``). ``capacity_ratio`` in (0, 1] sets the hard-mode static capacity
        ``keep_count(T, capacity_ratio, protected=num_protected)`` at that layer's ``T``; ``stride`` the always-kept
        spatial grid over the patches (0 = none). ``hidden``, ``temperature``, ``init_theta`` and ``self_weight``
        go to the modules. ``straight_through=True`` makes the soft (training) mode gate with the hard keep set
        ``score > theta`` in the forward pass (what inference does) while gradients flow through the soft mask
        (``hard + soft - stop_gradient(soft)``), which closes the gap between soft-mode training and hard-mode
        evaluation. Replaces previously attached modules. Returns ``self``.
        """
        cfg = self.config
        if not cfg.class_token:
            raise ValueError("attach_atp needs config.class_token=True (the class token is the cross-score query)")
        layers = tuple(sorted({int(v) for v in layers}))
        if not layers:
            raise ValueError("attach_atp: layers is empty")
        bad = [v for v in layers if not 0 <= v < cfg.depth]
        if bad:
            raise ValueError(f"attach_atp: layers {bad} out of range for depth={cfg.depth}")
        capacity_ratio = check_ratio(capacity_ratio, "capacity_ratio")
        stride = check_count(stride, "stride")
        if not 0.0 < float(init_theta) < 1.0:
            raise ValueError(f"init_theta must be in (0, 1), got {init_theta}")
        if not 0.0 <= float(self_weight) <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
        from reduction.nnx import ATPModule

        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        spec = ATPSpec(layers=layers, capacity_ratio=float(capacity_ratio), stride=int(stride),
                       straight_through=bool(straight_through))
        t = self.num_tokens(cfg.image_size)  # capacity at the configured resolution (informational in the module)
        self.atp = nnx.Dict({
            str(v): ATPModule(capacity=spec.capacity(t, cfg.num_protected), hidden=int(hidden),
                              temperature=float(temperature), self_weight=float(self_weight),
                              init_theta=float(init_theta), rngs=rngs)
            for v in layers})
        self.atp_spec = spec
        return self

    def _atp_gate(self, module, state: R.TokenState, probs: jax.Array, mode: str) -> tuple[R.TokenState, dict]:
        """Run one ATP module on this block's attention ``probs [B, H, T, T]``.

        ``"soft"``: ``state`` keeps all ``T`` tokens, ``sizes *= max(m, 1e-6)`` with the soft mask ``m [B, T]``
        (1 on the prefix tokens and the spatial grid); record ``mask``, ``theta [B]``, ``candidates [B, T]``.
        ``"hard"``: ``[B, T] -> [B, K]`` with ``K`` the static capacity, ``valid`` marking the kept tokens; record
        ``theta``, ``kept`` (valid tokens per example, prefix included), ``kept_candidates`` and ``num_candidates``
        (``[B]`` float32).
        """
        cfg, spec = self.config, self.atp_spec
        p = cfg.num_protected
        b, t = state.x.shape[:2]
        cand = jnp.broadcast_to(jnp.arange(t) >= p, (b, t))
        if state.valid is not None:
            cand = cand & state.valid
        self_r, cross_r, score = atp_ops.vit_atp_inputs(probs, cand, self_weight=module.self_weight)
        theta = module.threshold(score, self_r, cross_r, cand)
        grid = jnp.asarray(atp_ops.patch_grid_mask(t, p, spec.stride)) & cand
        if mode == "soft":
            m = atp_ops.soft_keep_mask(score, theta, temperature=module.temperature, forced=grid, candidates=cand)
            if spec.straight_through:
                hard = atp_ops.hard_keep_mask(score, theta, forced=grid, candidates=cand).astype(jnp.float32)
                m = hard + (m - jax.lax.stop_gradient(m))          # forward value exactly the 0/1 set
            # Clamp to 1e-6 in the forward pass only: the gradient still reaches m where the clamp is active (the
            # straight-through 0s), and d(attention)/dm stays finite, as in a mask applied inside the softmax.
            gate = m + jax.lax.stop_gradient(jnp.maximum(m, 1e-6) - m)
            state = state.replace(sizes=state.sizes * gate)
            return state, {"mask": m, "theta": theta, "candidates": cand}
        forced = (jnp.arange(t) < p) | grid
        state, idx = atp_ops.prune_above_threshold(state, score, theta, forced=forced, capacity=spec.capacity(t, p))
        kept = jnp.sum(state.valid, axis=-1).astype(jnp.float32)
        kept_cand = jnp.sum(state.valid & (idx >= p), axis=-1).astype(jnp.float32)  # idx: input positions
        n_cand = jnp.sum(cand, axis=-1).astype(jnp.float32)
        return state, {"theta": theta, "kept": kept, "kept_candidates": kept_cand, "num_candidates": n_cand}

    @property
    def atp_layers(self) -> tuple[int, ...]:
        """Blocks with an attached ATP module (empty without :meth:`attach_atp`)."""
        return () if self.atp_spec is None else self.atp_spec.layers

    def _count_reducers(self, reducers: tuple, atp_mode: str) -> tuple:
        """``reducers`` with the hard-mode ATP layers filled in (for static token counts and FLOPs)."""
        if atp_mode not in ATP_MODES:
            raise ValueError(f"atp_mode must be one of {ATP_MODES}, got {atp_mode!r}")
        if not self.atp_layers:
            return reducers
        clash = [v for v in self.atp_layers if reducers[v] is not None]
        if clash:
            raise ValueError(f"reducers at layers {clash} collide with the attached ATP modules there")
        if atp_mode == "soft":
            return reducers
        spec = self.atp_spec
        stand_in = atp_ops.ATPPrune(keep_ratio=spec.capacity_ratio, stride=spec.stride)
        return tuple(stand_in if i in spec.layers else red for i, red in enumerate(reducers))

    # -- static helpers -------------------------------------------------------------------------------

    def num_tokens(self, image_hw: Union[int, Sequence[int]]) -> int:
        """Tokens entering the first block for an image of ``image_hw`` pixels."""
        h, w = _hw(image_hw)
        p = self.config.patch_size
        return (h // p) * (w // p) + self.config.num_protected

    def build_reducers(self, spec: Optional[Mapping[str, Any]]) -> tuple:
        """One reducer (or ``None``) per block from a plain spec such as ``{"method": "tome", "r": 13}``."""
        return tuple(R.build_layer_reducers(self.config.depth, spec))

    def tokens_per_layer(self, image_hw, reducers=None, *, atp_mode: str = "hard") -> list[tuple[int, int]]:
        """Static ``(attention tokens, MLP tokens)`` per block (attached ATP layers at their hard-mode capacity unless
        ``atp_mode="soft"``)."""
        reducers = self._count_reducers(_as_reducers(reducers, self.config.depth), atp_mode)
        return R.tokens_per_layer(self.num_tokens(image_hw), reducers, num_protected=self.config.num_protected,
                                  num_distill=int(self.config.distill_token))

    def flops(self, image_size: Union[int, Sequence[int]] = None, reducers=None) -> int:
        """Analytic FLOPs (2 x MACs) per image: patch embedding, blocks at the scheduled token counts, the
        reducers' own cost and the head (attached ATP layers counted at their hard-mode capacity, without the
        tiny threshold MLP)."""
        cfg = self.config
        image_size = cfg.image_size if image_size is None else image_size
        reducers = self._count_reducers(_as_reducers(reducers, cfg.depth), "hard")
        counts = R.tokens_per_layer(self.num_tokens(image_size), reducers, num_protected=cfg.num_protected,
                                    num_distill=int(cfg.distill_token))
        t = self.num_tokens(image_size)
        red_flops = []
        for (a, m), red in zip(counts, reducers):
            red_flops.append(0 if red is None else red.flops(t, dim=cfg.width, heads=cfg.heads))
            t = m
        h, w = _hw(image_size)
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        return R.vit_flops([a for a, _ in counts], mlp_tokens=[m for _, m in counts], dim=cfg.width,
                           mlp_dim=cfg.mlp_dim, patch_size=cfg.patch_size, num_patches=n,
                           num_classes=cfg.num_classes, reduction_flops=red_flops)

    # -- forward --------------------------------------------------------------------------------------

    def _pos_embed(self, gh: int, gw: int) -> tuple[Optional[jax.Array], jax.Array]:
        """``(prefix part [1, P, C] or None, patch part [1, gh*gw, C])`` at the requested grid."""
        cfg = self.config
        pe = self.pos_embed[...]
        n_pre = cfg.num_prefix if cfg.pos_embed_prefix else 0
        pre, grid = (pe[:, :n_pre], pe[:, n_pre:]) if n_pre else (None, pe)
        g = cfg.grid
        grid = resize_grid(grid.reshape(g, g, -1), (gh, gw)).reshape(1, gh * gw, -1)
        return pre, grid

    def embed(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3] -> tokens [B, P + R + N, C]`` (prefix, registers, patches) before block 0."""
        cfg = self.config
        check_rank(images, 4, "images")
        b, h, w, ch = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"images has spatial shape {(h, w)}, which is not a multiple of patch_size={p}")
        if ch != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        dtype = cfg.dtype or jnp.float32
        x = self.patch_embed(images.astype(dtype))
        pre_pe, grid_pe = self._pos_embed(h // p, w // p)
        x = x + grid_pe.astype(x.dtype)
        prefix = []
        if cfg.class_token:
            prefix.append(self.cls_token[...])
        if cfg.distill_token:
            prefix.append(self.dist_token[...])
        if prefix:
            pre = jnp.concatenate(prefix, axis=1).astype(x.dtype)
            if pre_pe is not None:
                pre = pre + pre_pe.astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(pre, (b,) + pre.shape[1:]), x], axis=1)
        if cfg.num_registers:
            reg = jnp.broadcast_to(self.reg_tokens[...].astype(x.dtype), (b, cfg.num_registers, cfg.width))
            n_pre = cfg.num_prefix
            x = jnp.concatenate([x[:, :n_pre], reg, x[:, n_pre:]], axis=1)
        return x

    def pool(self, tokens: jax.Array, state: R.TokenState) -> jax.Array:
        """``tokens [B, T, C] -> [B, C]`` (``[B, 2C]`` for ``"cls+avg"``) following ``config.pool``."""
        cfg = self.config
        if cfg.pool == "token":
            return tokens[:, 0]
        w = state.sizes.astype(jnp.float32)
        if state.valid is not None:
            w = jnp.where(state.valid, w, 0.0)
        w = w.at[:, : cfg.num_protected].set(0.0)
        avg = jnp.einsum("bt,btc->bc", w, tokens.astype(jnp.float32)) / jnp.maximum(
            jnp.sum(w, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        avg = avg.astype(tokens.dtype)
        if cfg.pool == "cls+avg":
            return jnp.concatenate([tokens[:, 0], avg], axis=-1)
        return avg

    def __call__(self, images: jax.Array, *, reducers=None, return_source: bool = False,
                 deterministic: bool = True, rng: Optional[jax.Array] = None, atp_mode: str = "hard"):
        """Forward pass.

        Args:
          images: ``[B, H, W, 3]`` float (``H, W`` multiples of the patch size; other resolutions than
            ``config.image_size`` interpolate the position embedding bicubically).
          reducers: ``None``, a tuple with one :class:`reduction.Reducer` or ``None`` per block, or a spec
            mapping (``{"method": "tome", "r": 13}``). Static under ``jax.jit``.
          return_source: also track and return the ``[B, N]`` source map (``aux["source"]``), where ``N``
            counts every initial token (prefix and registers included).
          deterministic: the model has no dropout; kept for API symmetry with training code.
          rng: PRNG key handed (folded with the layer index) to stochastic reducers.
          atp_mode: only with attached ATP modules (:meth:`attach_atp`); static. ``"soft"`` (training): no token
            is dropped; each ATP layer multiplies ``sizes`` by its soft keep mask ``m [B, T]`` (clamped to
            ``>= 1e-6``) and every later block uses proportional attention, so ``log m`` gates the keys.
            ``"hard"`` (inference, default): each ATP layer prunes to its static capacity with a validity mask.

        Returns:
          ``(out, aux)``: ``out`` = logits ``[B, num_classes]`` if the model has a head, else the pooled
          features. ``aux``: ``tokens_per_layer`` (static list of ``(attention, MLP)`` tokens), ``features``
          (pooled, pre-head), ``tokens`` (final normed ``[B, K, C]``), ``sizes`` ``[B, K]``, ``positions``,
          ``valid`` (or ``None``) and, with ``return_source``, ``source`` ``[B, N]``. With ATP modules,
          ``aux["atp"]`` holds one entry per ATP layer (in :attr:`atp_layers` order) in each list: soft mode
          ``masks`` ``[B, T]`` (in ``(0, 1]``, 1 on the prefix and the spatial grid), ``thetas`` ``[B]``,
          ``candidates`` ``[B, T]`` bool; hard mode ``thetas``, ``kept`` (valid tokens after pruning, prefix
          included), ``kept_candidates`` and ``num_candidates`` (``[B]`` float32 each).
        """
        del deterministic
        cfg = self.config
        if atp_mode not in ATP_MODES:
            raise ValueError(f"atp_mode must be one of {ATP_MODES}, got {atp_mode!r}")
        reducers = _as_reducers(reducers, cfg.depth)
        count_reducers = self._count_reducers(reducers, atp_mode)  # also rejects reducers at ATP layers
        x = self.embed(images)
        state = R.init_state(x, track_source=return_source)
        props = prop_attn_flags(reducers)
        atp_layers = self.atp_layers
        if atp_layers and atp_mode == "soft":  # later blocks see log(m) through the size bias
            props = [on or layer > atp_layers[0] for layer, on in enumerate(props)]
        records = []
        for layer, (blk, red) in enumerate(zip(self.blocks, reducers)):
            info = dict(layer=layer, num_layers=cfg.depth, num_protected=cfg.num_protected,
                        num_distill=int(cfg.distill_token),
                        rng=None if rng is None else jax.random.fold_in(rng, layer))
            hook = None
            if layer in atp_layers:
                module = self.atp[str(layer)]

                def hook(st, probs, module=module):
                    st, rec = self._atp_gate(module, st, probs, atp_mode)
                    records.append(rec)
                    return st

            state = blk(state, reducer=red, info=info, prop_attn=props[layer], hook=hook)
        tokens = self.norm(state.x)
        features = self.pool(tokens, state)
        if self.head is None:
            out = features
        elif self.head_dist is not None and cfg.pool == "token":
            out = (self.head(features) + self.head_dist(tokens[:, 1])) / 2
        else:
            out = self.head(features)
        aux = {
            "tokens_per_layer": R.tokens_per_layer(x.shape[1], count_reducers, num_protected=cfg.num_protected,
                                                   num_distill=int(cfg.distill_token)),
            "features": features,
            "tokens": tokens,
            "sizes": state.sizes,
            "positions": state.positions,
            "valid": state.valid,
        }
        if return_source:
            aux["source"] = state.source
        if records:
            names = {"mask": "masks", "theta": "thetas", "candidates": "candidates", "kept": "kept",
                     "kept_candidates": "kept_candidates", "num_candidates": "num_candidates"}
            aux["atp"] = {names[k]: [r[k] for r in records] for k in records[0]}
        return out, aux


def _hw(image_hw) -> tuple[int, int]:
    if isinstance(image_hw, int):
        return image_hw, image_hw
    h, w = image_hw
    return int(h), int(w)


def make_forward(model: ViT, reducers=None, *, return_source: bool = False, atp_mode: str = "hard"):
    """Jitted ``fn(images) -> (out, aux)`` for eval and benchmarks.

    The model is split once (``graphdef, state = nnx.split(model)``); the pure function merges it inside
    ``jax.jit`` with the reducers closed over as static values. ``aux["tokens_per_layer"]`` is added back
    outside the jit as plain Python ints. ``fn.num_traces()`` reports how often the function was traced
    (new data of the same shape must not retrace). Parameters are captured at call time of
    ``make_forward``; call it again after changing the model. ``atp_mode`` is passed to :meth:`ViT.__call__`.
    """
    reducers = _as_reducers(reducers, model.config.depth)
    if atp_mode not in ATP_MODES:
        raise ValueError(f"atp_mode must be one of {ATP_MODES}, got {atp_mode!r}")
    graphdef, params = nnx.split(model)
    traces = [0]

    @jax.jit
    def pure(params, images):
        traces[0] += 1
        m = nnx.merge(graphdef, params)
        out, aux = m(images, reducers=reducers, return_source=return_source, atp_mode=atp_mode)
        aux = dict(aux)
        aux.pop("tokens_per_layer")
        return out, aux

    def fn(images):
        out, aux = pure(params, images)
        aux["tokens_per_layer"] = model.tokens_per_layer(images.shape[1:3], reducers, atp_mode=atp_mode)
        return out, aux

    fn.num_traces = lambda: traces[0]
    fn.reducers = reducers
    return fn


__all__ = ["ViT", "ViTConfig", "ATPSpec", "Block", "VARIANTS", "parse_variant", "vit_config", "make_forward"]
