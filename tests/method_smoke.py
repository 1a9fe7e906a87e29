"""The tiny models a method file's "runs at this point" tests share (one definition, seeded).

``vit_forward(spec)``: a 3-block (or ``depth``) ViT of width 16 on 32 x 32 images, 8 x 8 patches (16 patches + the
class token), 5 classes; returns ``(logits [2, 5], aux)`` of a jitted forward with ``spec``'s reducers.
``tiny_vlm()``: a CLIP-tower VLM (16 x 16 images, 4 x 4 patches: 16 image tokens; width 16, 2 tower layers) and a
2-layer GQA Llama (vocab 64, image token 63). ``tower_features(spec)``: ``(vlm, plan, feats [2, K, 16])`` of
``spec`` at the VLM's vision tower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def vit_forward(spec: dict, depth: int = 3):
    from models.vit import ViT, ViTConfig, make_forward

    model = ViT(ViTConfig(width=16, depth=depth, mlp_dim=32, heads=2, patch_size=8, image_size=32, num_classes=5),
                rngs=nnx.Rngs(0))
    logits, aux = make_forward(model, model.build_reducers(spec))(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    return logits, aux


def tiny_vlm():
    from models.clip_vision import CLIPVisionConfig
    from models.llama import LlamaConfig
    from models.vlm import VLM, VLMConfig

    cfg = VLMConfig(vision=CLIPVisionConfig(image_size=16, patch_size=4, dim=16, num_layers=2, num_heads=2,
                                            mlp_dim=32),
                    text=LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48),
                    image_token_id=63)
    return VLM(cfg, rngs=nnx.Rngs(0))


def tower_images():
    return jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def tower_features(spec: dict):
    vlm = tiny_vlm()
    plan = vlm.build_plan({"point": "vision", **spec})
    feats = nnx.jit(lambda m, im: m.encode_images(im, plan))(vlm, tower_images())
    assert bool(jnp.all(jnp.isfinite(feats)))
    return vlm, plan, feats
