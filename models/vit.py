"""Flax NNX Vision Transformer (ViT / DeiT / DINOv2 / CLIP layouts) with a reducer slot in every block.

The CLIP vision tower (LLaVA's) is a configuration of this model (:func:`models.clip_vision.clip_vit_config`:
``pre_norm``, ``mlp_act="quick_gelu"``, ``patch_bias=False``, ``ln_eps=1e-5``); the attention and the MLP are the
shared :class:`models.layers.Attention` / :class:`models.layers.Mlp`.

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

Trainable reducers (:class:`reduction.nnx.LearnedReducer`, e.g. the learned ATP thresholds
:class:`reduction.nnx.LearnedATP`) are modules attached with :meth:`ViT.attach_reducer`: they live in
``model.learned`` (an ``nnx.Dict`` keyed by the layer index as a string, so their parameter paths start with
``learned/<layer>/``) and run at their block's reduction point like any reducer. ``model(images, train=True)``
runs them in training mode, ``train=False`` (default) in inference mode; ``aux["reducer_aux"]`` holds each one's
auxiliary dict and ``aux["reducer_loss"]`` the sum of their losses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import reduction as R
from reduction.validate import check_rank
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

DROP_PATH_SALT = 0x6470   # fold_in constant: stochastic-depth keys, apart from the reducers' per-layer keys
POOLS = ("token", "avg", "gap", "cls+avg", "dense")
MLP_ACTS = ("gelu", "quick_gelu")


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
        ``"cls+avg"`` (concatenation, ``[B, 2C]``) or ``"dense"`` (no pooling: the head runs on every final token,
        ``out: [B, T, num_classes]``, for per-patch tasks; ``reduction.unmerge`` with ``aux["source"]`` maps the
        ``T`` outputs back to the original tokens).
      qkv_bias: biases on the qkv projection.
      pre_norm: a LayerNorm on the embedded tokens before the first block (``norm_pre``; CLIP's ``pre_layrnorm``).
      mlp_act: ``"gelu"`` (exact) or ``"quick_gelu"`` (CLIP).
      patch_bias: bias of the patch embedding (CLIP's has none).
      dtype: compute dtype (parameters stay float32); ``None`` = float32. Similarities, sizes, the softmax and
        the proportional-attention bias stay float32 whatever it is.
      drop_path_rate: stochastic depth of the last block (DeiT / timm: block ``i`` drops its residual branches
        with rate ``drop_path_rate * i / (depth - 1)``); active only with ``deterministic=False`` and an ``rng``.
      attn_implementation: the fused attention kernel (:func:`models.layers.choose_implementation`): ``None``
        (cuDNN on a GPU where it accepts the operands, else XLA), ``"xla"``, ``"cudnn"`` or ``"explicit"``.
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
    pre_norm: bool = False
    mlp_act: str = "gelu"
    patch_bias: bool = True
    dtype: Optional[Any] = None
    drop_path_rate: float = 0.0
    attn_implementation: Optional[str] = None

    def __post_init__(self):
        from models.layers import IMPLEMENTATIONS

        if self.attn_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool in ("token", "cls+avg") and not self.class_token:
            raise ValueError(f"pool={self.pool!r} needs class_token=True")
        if self.distill_token and not self.class_token:
            raise ValueError("distill_token=True needs class_token=True")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

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
        self.attn = Attention(c, cfg.heads, qkv_bias=cfg.qkv_bias, dtype=cfg.dtype,
                              implementation=cfg.attn_implementation, rngs=rngs)
        self.norm2 = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.mlp = Mlp(c, cfg.mlp_dim, act=cfg.mlp_act, dtype=cfg.dtype, rngs=rngs)
        self.ls1 = LayerScale(c, cfg.layer_scale) if cfg.layer_scale is not None else None
        self.ls2 = LayerScale(c, cfg.layer_scale) if cfg.layer_scale is not None else None

    def __call__(self, state: R.TokenState, *, reducer: Optional[R.Reducer] = None, info: Optional[dict] = None,
                 prop_attn: bool = False, drop_path: Optional[tuple] = None) -> R.TokenState:
        """``state.x: [B, T, C] -> [B, K, C]`` (:func:`models.layers.reducing_block`). ``info``: the static LayerInfo
        fields (layer, num_layers, num_protected, num_distill, rng). ``drop_path``: ``(rate, key)`` for stochastic
        depth on both residual branches (independent draws), ``None`` for none."""
        dp = None
        if drop_path is not None:
            from models.layers import drop_path as _drop

            rate, key = drop_path
            dp = lambda y, branch: _drop(y, jax.random.fold_in(key, branch), rate)  # noqa: E731
        return reducing_block(state, attn=self.attn, norm1=self.norm1, mlp=self.mlp, norm2=self.norm2, ls1=self.ls1,
                              ls2=self.ls2, reducer=reducer, info=info, prop_attn=prop_attn, drop_path=dp)


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


class _Bound:
    """A learned reducer bound to a mode, seen by the block as a reducer: ``needs`` / ``position`` /
    ``prop_attn`` / ``flops`` from the module, ``num_out`` the static count of the mode, and
    ``bound(state, info) -> state`` calls ``module(state, info, train=train)`` and records its aux dict in
    ``sink[layer]``."""

    def __init__(self, module, train: bool, sink: Optional[dict] = None):
        self.module, self.train, self.sink = module, bool(train), sink
        self.needs, self.position, self.prop_attn = module.needs, module.position, module.prop_attn

    def num_out(self, num_tokens: int, info: R.LayerInfo) -> int:
        return (self.module.train_num_out if self.train else self.module.num_out)(num_tokens, info)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return self.module.flops(num_tokens, dim=dim, heads=heads)

    def __call__(self, state: R.TokenState, info: R.LayerInfo) -> R.TokenState:
        want = self.num_out(state.num_tokens, info)
        state, aux = self.module(state, info, train=self.train)
        if state.num_tokens != want:
            raise ValueError(f"{type(self.module).__name__} at layer {info.layer} returned {state.num_tokens} tokens "
                             f"but its {'train_' if self.train else ''}num_out says {want}")
        if not isinstance(aux, Mapping) or "loss" not in aux:
            raise ValueError(f"{type(self.module).__name__} must return (state, aux) with aux['loss']")
        if self.sink is not None:
            self.sink[info.layer] = dict(aux)
        return state


class ViT(nnx.Module):
    """Vision Transformer. ``model(images [B, H, W, 3]) -> (out, aux)``; see :meth:`__call__`."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        c = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, c, bias=cfg.patch_bias, dtype=cfg.dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, c))) if cfg.class_token else None
        self.dist_token = nnx.Param(init(rngs.params(), (1, 1, c))) if cfg.distill_token else None
        self.reg_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_registers, c))) if cfg.num_registers else None
        n_pos = cfg.grid * cfg.grid + (cfg.num_prefix if cfg.pos_embed_prefix else 0)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, n_pos, c)))
        self.norm_pre = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs) if cfg.pre_norm else None
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = layer_norm(c, eps=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        feat = 2 * c if cfg.pool == "cls+avg" else c
        zeros = nnx.initializers.zeros
        self.head = (nnx.Linear(feat, cfg.num_classes, kernel_init=zeros, dtype=cfg.dtype, rngs=rngs)
                     if cfg.num_classes else None)
        self.head_dist = (nnx.Linear(c, cfg.num_classes, kernel_init=zeros, dtype=cfg.dtype, rngs=rngs)
                          if cfg.num_classes and cfg.distill_token else None)

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

    def attach_reducer(self, layer: int, module) -> "ViT":
        """Attach a trainable reducer (:class:`reduction.nnx.LearnedReducer`) at block ``layer``.

        The module goes to ``self.learned`` (``nnx.Dict`` keyed ``str(layer)``; parameter paths
        ``learned/<layer>/...``, so ``optim.trainable=("^learned/",)`` trains only the learned reducers) and runs at
        the block's reduction point (its ``position``) in the mode ``model(..., train=)`` picks. A static reducer
        passed at the same layer is refused. Replaces a module already at that layer. Returns ``self``."""
        from reduction.nnx import LearnedReducer

        if isinstance(layer, bool) or not isinstance(layer, int) and not hasattr(layer, "__index__"):
            raise ValueError(f"attach_reducer: layer must be an int, got {layer!r}")
        layer = int(layer)
        if not 0 <= layer < self.config.depth:
            raise ValueError(f"attach_reducer: layer {layer} out of range for depth={self.config.depth}")
        if not isinstance(module, LearnedReducer):
            raise ValueError(f"attach_reducer needs a reduction.nnx.LearnedReducer, got {type(module).__name__}")
        if module.position not in ("after_attention", "before_attention"):
            raise ValueError(f"module.position must be 'after_attention' or 'before_attention', got {module.position!r}")
        current = dict(self.learned.items()) if getattr(self, "learned", None) is not None else {}
        current[str(layer)] = module
        self.learned = nnx.Dict({k: current[k] for k in sorted(current, key=int)})
        return self

    def attach_atp(self, layers: Sequence[int], *, capacity_ratio: float, rngs: Optional[nnx.Rngs] = None,
                   seed: int = 0, **options) -> "ViT":
        """Convenience: one :class:`reduction.nnx.LearnedATP` (``capacity_ratio`` plus ``options``: ``stride``,
        ``hidden``, ``temperature``, ``init_theta``, ``self_weight``, ``straight_through``, ``target_keep``,
        ``budget_weight``, ``budget_kind``, ``features``; ``dim`` defaults to the width) per block of ``layers``, each attached with :meth:`attach_reducer`.
        Returns ``self``."""
        from reduction.nnx import LearnedATP

        if not self.config.class_token:
            raise ValueError("attach_atp needs config.class_token=True (the class token is the cross-score query)")
        layers = sorted({int(v) for v in layers})
        if not layers:
            raise ValueError("attach_atp: layers is empty")
        bad = [v for v in layers if not 0 <= v < self.config.depth]
        if bad:
            raise ValueError(f"attach_atp: layers {bad} out of range for depth={self.config.depth}")
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        if options.get("features", "stats") != "stats":
            options.setdefault("dim", self.config.width)
        for v in layers:
            self.attach_reducer(v, LearnedATP(capacity_ratio=capacity_ratio, rngs=rngs, **options))
        return self

    @property
    def learned_layers(self) -> tuple[int, ...]:
        """Blocks with an attached learned reducer (:meth:`attach_reducer`), ascending."""
        learned = getattr(self, "learned", None)
        return () if learned is None else tuple(sorted(int(k) for k in learned.keys()))

    def _run_reducers(self, reducers: tuple, train: bool, sink: Optional[dict] = None) -> tuple:
        """``reducers`` with the learned reducers bound to the mode at their layers (for the forward pass, static
        token counts and FLOPs)."""
        learned = self.learned_layers
        if not learned:
            return reducers
        clash = [v for v in learned if reducers[v] is not None]
        if clash:
            raise ValueError(f"reducers at layers {clash} collide with the learned reducers attached there")
        return tuple(_Bound(self.learned[str(i)], train, sink) if i in learned else red
                     for i, red in enumerate(reducers))

    # -- static helpers -------------------------------------------------------------------------------

    def num_tokens(self, image_hw: Union[int, Sequence[int]]) -> int:
        """Tokens entering the first block for an image of ``image_hw`` pixels."""
        h, w = _hw(image_hw)
        p = self.config.patch_size
        return (h // p) * (w // p) + self.config.num_protected

    def build_reducers(self, spec: Optional[Mapping[str, Any]]) -> tuple:
        """One reducer (or ``None``) per block from a plain spec such as ``{"method": "tome", "r": 13}``."""
        return tuple(R.build_layer_reducers(self.config.depth, spec))

    def tokens_per_layer(self, image_hw, reducers=None, *, train: bool = False) -> list[tuple[int, int]]:
        """Static ``(attention tokens, MLP tokens)`` per block (learned reducers at their inference capacity, or
        their training count with ``train=True``)."""
        reducers = self._run_reducers(_as_reducers(reducers, self.config.depth), train)
        return R.tokens_per_layer(self.num_tokens(image_hw), reducers, num_protected=self.config.num_protected,
                                  num_distill=int(self.config.distill_token))

    def flops(self, image_size: Union[int, Sequence[int]] = None, reducers=None) -> int:
        """Analytic FLOPs (2 x MACs) per image: patch embedding, blocks at the scheduled token counts, the
        reducers' own cost and the head (learned reducers at their inference capacity and their own ``flops``)."""
        cfg = self.config
        image_size = cfg.image_size if image_size is None else image_size
        reducers = self._run_reducers(_as_reducers(reducers, cfg.depth), False)
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

    def valid_flops(self, counts, image_size: Union[int, Sequence[int]] = None, reducers=None) -> np.ndarray:
        """Analytic FLOPs per image counted on the tokens each image actually keeps valid.

        ``counts: [B, depth, 2]`` (``aux["valid_tokens_per_layer"]``: valid tokens entering each block's attention and
        MLP) -> ``[B]`` float64: :meth:`flops`'s formula with these counts instead of the static schedule, each
        reducer's own cost priced at the valid tokens entering its block. A run that physically dropped the invalid
        slots (batch 1, or a compacted layout) would cost this; the jitted program still computes the static
        capacity (:meth:`flops`, what XLA counts). With ``counts`` equal to the static schedule it equals
        :meth:`flops` exactly."""
        cfg = self.config
        image_size = cfg.image_size if image_size is None else image_size
        reducers = self._run_reducers(_as_reducers(reducers, cfg.depth), False)
        counts = np.asarray(counts)
        if counts.ndim != 3 or counts.shape[1:] != (cfg.depth, 2):
            raise ValueError(f"counts must be [B, depth={cfg.depth}, 2] (attention, MLP) valid tokens, "
                             f"got shape {counts.shape}")
        h, w = _hw(image_size)
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        t0 = self.num_tokens(image_size)
        out = np.zeros(counts.shape[0], np.float64)
        cache: dict = {}
        for i, row in enumerate(counts.astype(np.int64)):
            key = row.tobytes()
            if key not in cache:
                attn, mlp = [int(v) for v in row[:, 0]], [int(v) for v in row[:, 1]]
                entering = [t0] + mlp[:-1]
                red_flops = [0 if red is None else red.flops(t, dim=cfg.width, heads=cfg.heads)
                             for red, t in zip(reducers, entering)]
                cache[key] = R.vit_flops(attn, mlp_tokens=mlp, dim=cfg.width, mlp_dim=cfg.mlp_dim,
                                         patch_size=cfg.patch_size, num_patches=n, num_classes=cfg.num_classes,
                                         reduction_flops=red_flops)
            out[i] = cache[key]
        return out

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
        """``images [B, H, W, 3] -> tokens [B, P + R + N, C]`` (prefix, registers, patches) before block 0 (through
        ``norm_pre`` when ``config.pre_norm``)."""
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
        return self.norm_pre(x) if self.norm_pre is not None else x

    def pool(self, tokens: jax.Array, state: R.TokenState) -> jax.Array:
        """``tokens [B, T, C] -> [B, C]`` (``[B, 2C]`` for ``"cls+avg"``, the tokens themselves for ``"dense"``)
        following ``config.pool``."""
        cfg = self.config
        if cfg.pool == "dense":
            return tokens
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
                 deterministic: bool = True, rng: Optional[jax.Array] = None, train: bool = False):
        """Forward pass.

        Args:
          images: ``[B, H, W, 3]`` float (``H, W`` multiples of the patch size; other resolutions than
            ``config.image_size`` interpolate the position embedding bicubically).
          reducers: ``None``, a tuple with one :class:`reduction.Reducer` or ``None`` per block, or a spec
            mapping (``{"method": "tome", "r": 13}``). Static under ``jax.jit``.
          return_source: also track and return the ``[B, N]`` source map (``aux["source"]``), where ``N``
            counts every initial token (prefix and registers included).
          deterministic: ``False`` with an ``rng`` turns stochastic depth on (``config.drop_path_rate > 0``); the
            model has no other dropout.
          rng: PRNG key handed (folded with the layer index) to stochastic reducers.
          train: static; the mode of the learned reducers (:meth:`attach_reducer`): ``True`` training (e.g. the
            soft gate of :class:`reduction.nnx.LearnedATP`), ``False`` (default) inference (static capacity).

        Returns:
          ``(out, aux)``: ``out`` = logits ``[B, num_classes]`` if the model has a head, else the pooled
          features. ``aux``: ``tokens_per_layer`` (static list of ``(attention, MLP)`` tokens), ``features``
          (pooled, pre-head), ``tokens`` (final normed ``[B, K, C]``), ``sizes`` ``[B, K]``, ``positions``,
          ``valid`` (or ``None``), ``valid_tokens_per_layer`` ``[B, depth, 2]`` int32 (the valid tokens entering each
          block's attention and its MLP, per image: what :meth:`valid_flops` prices; equal to ``tokens_per_layer``
          unless a capacity-padded reducer invalidates slots), with ``return_source``, ``source`` ``[B, N]``, ``reducer_aux``
          (``{layer: aux dict}`` of the learned reducers, empty without any) and ``reducer_loss`` (the sum of their
          ``aux["loss"]``, a float32 scalar, 0 without any).
        """
        cfg = self.config
        dp_rate = float(cfg.drop_path_rate)
        dp_on = dp_rate > 0 and not deterministic and rng is not None
        sink: dict = {}
        reducers = self._run_reducers(_as_reducers(reducers, cfg.depth), bool(train), sink)
        x = self.embed(images)
        state = R.init_state(x, track_source=return_source)
        props = prop_attn_flags(reducers)
        valid_counts = []
        for layer, (blk, red) in enumerate(zip(self.blocks, reducers)):
            n_in = _valid_count(state)
            info = dict(layer=layer, num_layers=cfg.depth, num_protected=cfg.num_protected,
                        num_distill=int(cfg.distill_token), num_registers=cfg.num_registers,
                        rng=None if rng is None else jax.random.fold_in(rng, layer))
            dp = None
            if dp_on:   # DeiT's linear rule: 0 at the first block, drop_path_rate at the last
                rate = dp_rate * layer / max(cfg.depth - 1, 1)
                dp = (rate, jax.random.fold_in(jax.random.fold_in(rng, DROP_PATH_SALT), layer)) if rate > 0 else None
            state = blk(state, reducer=red, info=info, prop_attn=props[layer], drop_path=dp)
            n_out = _valid_count(state)
            before = red is not None and red.position == "before_attention"
            valid_counts.append(jnp.stack([n_out if before else n_in, n_out], axis=-1))
        tokens = self.norm(state.x)
        features = self.pool(tokens, state)
        if self.head is None:
            out = features
        elif self.head_dist is not None and cfg.pool == "token":
            out = (self.head(features) + self.head_dist(tokens[:, 1])) / 2
        else:
            out = self.head(features)
        aux = {
            "tokens_per_layer": R.tokens_per_layer(x.shape[1], reducers, num_protected=cfg.num_protected,
                                                   num_distill=int(cfg.distill_token)),
            "features": features,
            "tokens": tokens,
            "sizes": state.sizes,
            "positions": state.positions,
            "valid": state.valid,
            "valid_tokens_per_layer": jnp.stack(valid_counts, axis=1),
        }
        if return_source:
            aux["source"] = state.source
        aux["reducer_aux"] = {layer: sink[layer] for layer in sorted(sink)}
        aux["reducer_loss"] = sum((jnp.asarray(a["loss"], jnp.float32) for a in aux["reducer_aux"].values()),
                                  jnp.zeros((), jnp.float32))
        return out, aux


def _valid_count(state: R.TokenState) -> jax.Array:
    """``[B]`` int32: the valid tokens of ``state`` (all ``T`` when it has no validity mask)."""
    b, t = state.x.shape[:2]
    if state.valid is None:
        return jnp.full((b,), t, jnp.int32)
    return jnp.sum(state.valid, axis=-1).astype(jnp.int32)


def _hw(image_hw) -> tuple[int, int]:
    if isinstance(image_hw, int):
        return image_hw, image_hw
    h, w = image_hw
    return int(h), int(w)


def make_forward(model: ViT, reducers=None, *, return_source: bool = False, train: bool = False):
    """Jitted ``fn(images) -> (out, aux)`` for eval and benchmarks.

    The model is split once (``graphdef, state = nnx.split(model)``); the pure function merges it inside
    ``jax.jit`` with the reducers closed over as static values. ``aux["tokens_per_layer"]`` is added back
    outside the jit as plain Python ints. ``fn.num_traces()`` reports how often the function was traced
    (new data of the same shape must not retrace). Parameters are captured at call time of
    ``make_forward``; call it again after changing the model. ``train`` (the learned reducers' mode) is passed to
    :meth:`ViT.__call__`.
    """
    reducers = _as_reducers(reducers, model.config.depth)
    train = bool(train)
    graphdef, params = nnx.split(model)
    traces = [0]

    @jax.jit
    def pure(params, images):
        traces[0] += 1
        m = nnx.merge(graphdef, params)
        out, aux = m(images, reducers=reducers, return_source=return_source, train=train)
        aux = dict(aux)
        aux.pop("tokens_per_layer")
        return out, aux

    def fn(images):
        out, aux = pure(params, images)
        aux["tokens_per_layer"] = model.tokens_per_layer(images.shape[1:3], reducers, train=train)
        return out, aux

    fn.num_traces = lambda: traces[0]
    fn.reducers = reducers
    return fn


__all__ = ["ViT", "ViTConfig", "Block", "VARIANTS", "parse_variant", "vit_config", "make_forward"]
