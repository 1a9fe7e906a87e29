"""CLIP ViT vision encoder (the LLaVA vision tower) in Flax NNX, with optional token reducers.

Layout of the Hugging Face ``CLIPVisionModel``: patch embedding without bias, a class token, learned
absolute positions, a LayerNorm *before* the encoder (``pre_layrnorm``), pre-norm blocks with
``quick_gelu`` MLPs, and ``post_layernorm`` used only for the pooled output. LLaVA-1.5 reads the hidden
states of layer ``-2`` (so the last block never runs here) and drops the class token ("default" feature
selection).

Reduction point (a) of the VLM: per-layer reducers from :mod:`reduction` run between each block's
attention residual and its MLP (``position="after_attention"``), with the class token protected. They see
the block's keys averaged over heads as ``metric``, the concatenated keys, the hidden states, and the
attention probabilities when they ask for them.

Dimension vocabulary: B batch, T tokens, N original tokens, C channels, H heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Attention, PatchEmbed, layer_norm
from reduction.attention import combine_biases, key_mask_bias, proportional_attention_bias
from reduction.reducers import ATTENTION, HIDDEN, KEYS, METRIC, LayerInfo, Reducer
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
        t = self.cfg.num_patches + 1
        for layer, red in enumerate(self._reducers(reducers)):
            if red is not None:
                t = red.num_out(t, self._info(layer))
        return t - int(self.cfg.drop_cls)

    def _reducers(self, reducers):
        n = self.cfg.layers_run
        if reducers is None:
            return [None] * n
        reducers = list(reducers)
        if len(reducers) < n:
            reducers = reducers + [None] * (n - len(reducers))
        return reducers[:n]

    def _info(self, layer: int, **arrays) -> LayerInfo:
        return LayerInfo(layer=layer, num_layers=self.cfg.layers_run, num_protected=1, **arrays)

    def __call__(self, images: jax.Array, *, reducers: Optional[Sequence[Optional[Reducer]]] = None):
        cfg = self.cfg
        x = self.patch_embed(images.astype(cfg.dtype) if cfg.dtype is not None else images)
        b = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.dim))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)[None]
        x = self.pre_layrnorm(x)
        state = init_state(x)
        reducers = self._reducers(reducers)
        prop = any(r is not None and r.prop_attn for r in reducers)
        counts = []
        for layer, (blk, red) in enumerate(zip(self.layers[: cfg.layers_run], reducers)):
            bias = combine_biases(proportional_attention_bias(state.sizes) if prop else None,
                                  key_mask_bias(state.valid))
            needs = red.needs if red is not None else frozenset()
            h, keys, probs = blk.attn(blk.layer_norm1(state.x), bias=bias, need_probs=ATTENTION in needs)
            x = state.x + h
            t_in = state.num_tokens
            if red is not None:
                info = self._info(
                    layer,
                    metric=keys.mean(axis=2) if METRIC in needs else None,
                    keys=keys.reshape(b, t_in, -1) if KEYS in needs else None,
                    hidden=x if HIDDEN in needs else None,
                    attention=probs,
                )
                state = red(state.replace(x=x), info)
                x = state.x
            else:
                state = state.replace(x=x)
            counts.append((t_in, state.num_tokens))
            x = x + blk.mlp(blk.layer_norm2(x))
            state = state.replace(x=x)
        start = int(cfg.drop_cls)
        aux = dict(tokens_per_layer=counts, sizes=state.sizes[:, start:], positions=state.positions[:, start:])
        return state.x[:, start:], aux


__all__ = ["CLIPVisionConfig", "CLIPVision", "quick_gelu"]
