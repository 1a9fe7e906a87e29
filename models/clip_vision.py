"""The CLIP ViT vision encoder (LLaVA's vision tower) as a configuration of :class:`models.vit.ViT`.

Layout of the Hugging Face ``CLIPVisionModel``: patch embedding without bias, a class token, learned absolute
positions covering the class token, a LayerNorm *before* the encoder (``pre_layrnorm``), pre-norm blocks with
``quick_gelu`` MLPs (LayerNorm eps 1e-5), and ``post_layernorm`` used only for the pooled output. In ViT terms:
``pre_norm=True``, ``mlp_act="quick_gelu"``, ``patch_bias=False``, ``ln_eps=1e-5``, ``pos_embed_prefix=True``.
LLaVA-1.5 reads the hidden states of layer ``-2`` (the last block never runs) and drops the class token
("default" feature selection); that is a :class:`models.vision_tower.ViTTowerConfig` with ``feature_layer=-2``,
``final_norm=False`` and ``keep_cls=False`` ("full": ``keep_cls=True``, the class token then counts as protected
at the connector).

:func:`clip_tower_config` builds that tower config from CLIP's sizes; ``CLIPVisionConfig`` (same arguments) and
``CLIPVision`` (= :class:`models.vision_tower.ViTTower`) are the names older callers use. Reduction point (a) of
the VLM runs in the ViT's blocks (:func:`models.layers.reducing_block`), the class token protected.

Parameter paths (``vision_tower.`` in a VLM): ``vit.patch_embed.proj.kernel``, ``vit.cls_token [1, 1, C]``,
``vit.pos_embed [1, N + 1, C]``, ``vit.norm_pre``, ``vit.blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}``, ``vit.norm`` (CLIP's ``post_layernorm``); :func:`loaders.hf.convert_hf_clip` maps HF names onto them.

Dimension vocabulary: B batch, T tokens, N patches, C channels, H heads.
"""

from __future__ import annotations

import jax.numpy as jnp

from models.layers import quick_gelu
from models.vision_tower import ViTTower, ViTTowerConfig
from models.vit import ViTConfig


def clip_vit_config(*, image_size: int = 336, patch_size: int = 14, dim: int = 1024, num_layers: int = 24,
                    num_heads: int = 16, mlp_dim: int = 4096, norm_eps: float = 1e-5, dtype=jnp.float32) -> ViTConfig:
    """The :class:`ViTConfig` of a CLIP vision encoder (defaults: ViT-L/14 at 336 px, LLaVA-1.5's)."""
    return ViTConfig(width=dim, depth=num_layers, mlp_dim=mlp_dim, heads=num_heads, patch_size=patch_size,
                     image_size=image_size, num_classes=0, class_token=True, pos_embed_prefix=True, ln_eps=norm_eps,
                     pool="token", qkv_bias=True, pre_norm=True, mlp_act="quick_gelu", patch_bias=False, dtype=dtype)


def clip_tower_config(*, image_size: int = 336, patch_size: int = 14, dim: int = 1024, num_layers: int = 24,
                      num_heads: int = 16, mlp_dim: int = 4096, norm_eps: float = 1e-5, feature_layer: int = -2,
                      drop_cls: bool = True, dtype=jnp.float32) -> ViTTowerConfig:
    """LLaVA's CLIP tower: ``feature_layer`` in HF's ``hidden_states`` convention (0 = the embeddings after the
    pre-norm, ``-2`` = before the last block), no final norm, the class token dropped (``drop_cls``, LLaVA's
    "default" strategy) or passed on first ("full")."""
    vit = clip_vit_config(image_size=image_size, patch_size=patch_size, dim=dim, num_layers=num_layers,
                          num_heads=num_heads, mlp_dim=mlp_dim, norm_eps=norm_eps, dtype=dtype)
    return ViTTowerConfig(vit=vit, feature_layer=feature_layer, final_norm=False, keep_cls=not drop_cls,
                          image_size=image_size)


CLIPVisionConfig = clip_tower_config
CLIPVision = ViTTower

__all__ = ["clip_vit_config", "clip_tower_config", "CLIPVisionConfig", "CLIPVision", "quick_gelu"]
