"""A :class:`models.vit.ViT` (e.g. DINOv2-small) used as a VLM vision tower.

The tower runs the ViT's blocks up to ``feature_layer`` with per-layer reducers (reduction point (a) of the VLM,
the same :func:`models.layers.reducing_block` as in the classifier), then optionally the ViT's final norm, and
returns the token features: the patch tokens, plus the class token first when ``keep_cls`` (methods such as
``topk_cls`` score by it, and LLaVA's "full" strategy passes it on).

LLaVA's CLIP tower is one configuration (:func:`models.clip_vision.clip_tower_config`). What
:class:`models.vlm.VLM` calls:
``tower(images [B, H, W, 3], reducers=...) -> (features [B, K, C], aux)``, ``tower.num_features(reducers)``,
``tower.num_protected`` (leading feature tokens the connector must keep), ``cfg.layers_run``, ``cfg.dim``.

Dimension vocabulary: B batch, T tokens, N patches, K output features, C channels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import prop_attn_flags
from models.vit import ViT, ViTConfig
from reduction.reducers import Reducer, tokens_per_layer
from reduction.state import init_state


@dataclasses.dataclass(frozen=True)
class ViTTowerConfig:
    """``vit``: the backbone (its ``num_classes`` is ignored: no head runs). ``feature_layer``: blocks whose
    output is read, HF ``hidden_states`` convention (``-1`` = the last block, ``-2`` = the one before, ``k >= 0``
    = after ``k`` blocks). ``final_norm``: apply the ViT's last LayerNorm (DINOv2's features are normed).
    ``keep_cls``: pass the class token on (first). ``image_size``: the resolution the VLM feeds."""

    vit: ViTConfig = ViTConfig(patch_size=14, image_size=518, layer_scale=1.0)
    feature_layer: int = -1
    final_norm: bool = True
    keep_cls: bool = False
    image_size: int = 224

    @property
    def dim(self) -> int:
        return self.vit.width

    @property
    def num_layers(self) -> int:
        return self.vit.depth

    @property
    def grid(self) -> int:
        return self.image_size // self.vit.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_run(self) -> int:
        n = self.feature_layer if self.feature_layer >= 0 else self.vit.depth + 1 + self.feature_layer
        if not 0 <= n <= self.vit.depth:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for {self.vit.depth} blocks")
        return n

    def __post_init__(self):
        if self.image_size % self.vit.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.vit.patch_size}")
        if self.keep_cls and not self.vit.class_token:
            raise ValueError("keep_cls=True needs a ViT with a class token")
        self.layers_run  # range check


class ViTTower(nnx.Module):
    """``ViTTower(cfg, rngs=...)`` or ``ViTTower.wrap(vit, cfg)`` around an already loaded ViT."""

    def __init__(self, cfg: ViTTowerConfig, *, rngs: Optional[nnx.Rngs] = None, vit: Optional[ViT] = None):
        if vit is None:
            vit = ViT(cfg.vit, rngs=rngs if rngs is not None else nnx.Rngs(0))
            dt = jnp.dtype(cfg.vit.dtype) if cfg.vit.dtype is not None else None
            if dt is not None and jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4:
                # a random tower lands in its narrow compute dtype (bf16), as a loaded one does (place_params)
                from loaders.common import place_params

                place_params(vit, dtype=dt)
        elif vit.config.width != cfg.vit.width or vit.config.depth != cfg.vit.depth:
            raise ValueError(f"the given ViT ({vit.config.width} wide, {vit.config.depth} deep) does not match "
                             f"cfg.vit ({cfg.vit.width}, {cfg.vit.depth})")
        self.cfg = cfg
        self.vit = vit

    @property
    def num_protected(self) -> int:
        """Leading output features that later reducers must keep (the class token when it is passed on)."""
        return int(self.cfg.keep_cls)

    def _prefix(self) -> int:
        return self.vit.config.num_protected

    def _reducers(self, reducers) -> list:
        n = self.cfg.layers_run
        reducers = [None] * n if reducers is None else list(reducers)
        return (reducers + [None] * n)[:n]

    def _counts(self, reducers) -> list:
        vc = self.vit.config
        return tokens_per_layer(self.cfg.num_patches + self._prefix(), self._reducers(reducers),
                                num_protected=vc.num_protected, num_distill=int(vc.distill_token))

    def num_features(self, reducers: Optional[Sequence[Optional[Reducer]]] = None) -> int:
        """Static number of output feature tokens for a reducer list."""
        counts = self._counts(reducers)
        t = counts[-1][1] if counts else self.cfg.num_patches + self._prefix()
        return t - self._prefix() + self.num_protected

    def flops(self, reducers: Optional[Sequence[Optional[Reducer]]] = None) -> int:
        """Analytic FLOPs per image: patch embedding and the blocks that run, at their static token counts, plus the
        reducers' own cost (no head)."""
        from reduction.flops import vit_flops

        vc = self.vit.config
        reducers = self._reducers(reducers)
        counts = self._counts(reducers)
        t, red_flops = self.cfg.num_patches + self._prefix(), []
        for (a, m), red in zip(counts, reducers):
            red_flops.append(0 if red is None else int(red.flops(t, dim=vc.width, heads=vc.heads)))
            t = m
        return vit_flops([a for a, _ in counts], mlp_tokens=[m for _, m in counts], dim=vc.width, mlp_dim=vc.mlp_dim,
                         patch_size=vc.patch_size, num_patches=self.cfg.num_patches, reduction_flops=red_flops)

    def __call__(self, images: jax.Array, *, reducers: Optional[Sequence[Optional[Reducer]]] = None,
                 rng: Optional[jax.Array] = None):
        """``images: [B, H, W, 3]`` (normalised as the backbone expects) -> ``(features [B, K, C], aux)``;
        ``aux``: ``tokens_per_layer``, ``sizes``/``positions``/``valid`` of the features."""
        vit, vc = self.vit, self.vit.config
        x = vit.embed(images)
        state = init_state(x)
        reducers = self._reducers(reducers)
        props = prop_attn_flags(reducers)
        for layer, red in enumerate(reducers):
            info = dict(layer=layer, num_layers=self.cfg.layers_run, num_protected=vc.num_protected,
                        num_distill=int(vc.distill_token), num_registers=vc.num_registers,
                        rng=None if rng is None else jax.random.fold_in(rng, layer))
            state = vit.blocks[layer](state, reducer=red, info=info, prop_attn=props[layer])
        feats = vit.norm(state.x) if self.cfg.final_norm else state.x
        p = self._prefix()
        keep = slice(0, None) if self.cfg.keep_cls and p == 1 else slice(p, None)

        def pick(a):
            if a is None:
                return None
            if self.cfg.keep_cls and p > 1:  # class token first, registers / distillation token dropped
                return jnp.concatenate([a[:, :1], a[:, p:]], axis=1)
            return a[:, keep]

        aux = dict(tokens_per_layer=self._counts(reducers), sizes=pick(state.sizes), positions=pick(state.positions),
                   valid=pick(state.valid))
        return pick(feats), aux


__all__ = ["ViTTowerConfig", "ViTTower"]
