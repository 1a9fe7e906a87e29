"""CLIP ViT vision encoder (the LLaVA vision tower) in Flax NNX, with optional token reducers.

Layout of the Hugging Face ``CLIPVisionModel``: patch embedding without bias, a class token, learned
absolute positions, a LayerNorm *before* the encoder (``pre_layrnorm``), pre-norm blocks with
``quick_gelu`` MLPs, and ``post_layernorm`` used only for the pooled output. LLaVA-1.5 reads the hidden
states of layer ``-2`` (so the last block never runs here) and drops the class token ("default" feature
selection).

Reduction point (a) of the VLM: per-layer reducers from :mod:`reduction` run in each block exactly as in the
ViT (the same :func:`models.layers.reducing_block`: the reducer's ``position``, proportional attention from the
layer after the first merge), with the class token protected.

Dimension vocabulary: B batch, T tokens, N original tokens, C channels, H heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Attention, PatchEmbed, layer_norm, prop_attn_flags, reducing_block
from reduction.reducers import Reducer, tokens_per_layer
from reduction.state import init_state


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    feature_layer: int = -2       # hidden_states index, HF convention (0 = embeddings after pre-norm)
    drop_cls: bool = True         # LLaVA "default" strategy; False = "full"
    dtype: object = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_run(self) -> int:
        """Blocks that run to produce ``hidden_states[feature_layer]``."""
        n = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for {self.num_layers} layers")
        return n


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class QuickGeluMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPBlock(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg.dim, cfg.num_heads, qkv_bias=True, dtype=cfg.dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.mlp = QuickGeluMlp(cfg.dim, cfg.mlp_dim, dtype=cfg.dtype, rngs=rngs)


class CLIPVision(nnx.Module):
    """``CLIPVision(cfg, rngs=...)``; ``model(images [B, H, W, 3], reducers=None) -> (features [B, K, C], aux)``.

    ``features`` are ``hidden_states[cfg.feature_layer]`` without the class token (``cfg.drop_cls``);
    ``aux`` holds ``tokens_per_layer`` (static ``(attn, mlp)`` pairs), ``sizes`` ``[B, K]`` and ``positions``
    ``[B, K]`` (patch indices; the class token is position 0).
    """

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim, dtype=cfg.dtype, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.dim,)) * 0.02)
        self.position_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_patches + 1, cfg.dim)) * 0.02)
        self.pre_layrnorm = layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        self.layers = nnx.List([CLIPBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)

    def num_features(self, reducers: Optional[Sequence[Optional[Reducer]]] = None) -> int:
        """Static number of output feature tokens for a reducer list."""
        counts = tokens_per_layer(self.cfg.num_patches + 1, self._reducers(reducers), num_protected=1)
        t = counts[-1][1] if counts else self.cfg.num_patches + 1
        return t - int(self.cfg.drop_cls)

    def flops(self, reducers: Optional[Sequence[Optional[Reducer]]] = None) -> int:
        """Analytic FLOPs per image of the blocks that run (patch embedding, reducers' own cost; no head)."""
        from reduction.flops import vit_flops

        cfg = self.cfg
        reducers = self._reducers(reducers)
        counts = tokens_per_layer(cfg.num_patches + 1, reducers, num_protected=1)
        t, red_flops = cfg.num_patches + 1, []
        for (a, m), red in zip(counts, reducers):
            red_flops.append(0 if red is None else int(red.flops(t, dim=cfg.dim, heads=cfg.num_heads)))
            t = m
        return vit_flops([a for a, _ in counts], mlp_tokens=[m for _, m in counts], dim=cfg.dim, mlp_dim=cfg.mlp_dim,
                         patch_size=cfg.patch_size, num_patches=cfg.num_patches, reduction_flops=red_flops)

    def _reducers(self, reducers):
        n = self.cfg.layers_run
        if reducers is None:
            return [None] * n
        reducers = list(reducers)
        if len(reducers) < n:
            reducers = reducers + [None] * (n - len(reducers))
        return reducers[:n]

    def __call__(self, images: jax.Array, *, reducers: Optional[Sequence[Optional[Reducer]]] = None,
                 rng: Optional[jax.Array] = None):
        cfg = self.cfg
        x = self.patch_embed(images.astype(cfg.dtype) if cfg.dtype is not None else images)
        b = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.dim))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)[None]
        x = self.pre_layrnorm(x)
        state = init_state(x)
        reducers = self._reducers(reducers)
        props = prop_attn_flags(reducers)
        for layer, (blk, red) in enumerate(zip(self.layers[: cfg.layers_run], reducers)):
            info = dict(layer=layer, num_layers=cfg.layers_run, num_protected=1,
                        rng=None if rng is None else jax.random.fold_in(rng, layer))
            state = reducing_block(state, attn=blk.attn, norm1=blk.layer_norm1, mlp=blk.mlp, norm2=blk.layer_norm2,
                                   reducer=red, info=info, prop_attn=props[layer])
        start = int(cfg.drop_cls)
        aux = dict(tokens_per_layer=tokens_per_layer(cfg.num_patches + 1, reducers, num_protected=1),
                   sizes=state.sizes[:, start:], positions=state.positions[:, start:],
                   valid=None if state.valid is None else state.valid[:, start:])
        return state.x[:, start:], aux


__all__ = ["CLIPVisionConfig", "CLIPVision", "quick_gelu"]
