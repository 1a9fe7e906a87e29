"""A VLM whose tower and LM are built from random init lands them in a narrow compute dtype (bf16) like a loaded
checkpoint does; float32 configs keep float32, and the trainable projector keeps float32 parameters."""

import jax.numpy as jnp
import pytest
from flax import nnx

from models.llama import LlamaConfig
from models.vision_tower import ViTTowerConfig
from models.vit import ViTConfig
from models.vlm import VLM, VLMConfig


def _dtypes(module):
    return {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("dtype", [jnp.bfloat16])   # float32 is every other VLM test
def test_random_tower_and_lm_land_in_the_compute_dtype(dtype):
    vit = ViTConfig(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, image_size=16, num_classes=0, dtype=dtype)
    text = LlamaConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=24, dtype=dtype)
    model = VLM(VLMConfig(vision=ViTTowerConfig(vit=vit, image_size=16), text=text, image_token_id=39,
                          projector_dtype=dtype), rngs=nnx.Rngs(0))
    want = {jnp.dtype(dtype).name}
    assert _dtypes(model.vision_tower) == want and _dtypes(model.language_model) == want
    assert _dtypes(model.multi_modal_projector) == {"float32"}
    assert jnp.dtype(model.language_model.cfg.param_dtype) == jnp.dtype(dtype)
