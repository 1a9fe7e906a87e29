"""``model.vlm.tiling`` through ``training.builders.build_vlm`` (what ``train.py`` builds): the VLM tiles AnyRes
images (thumbnail + rows x cols crops through the tower, one image span of (1 + rows * cols) x F tokens), and the
default (``None``) is unchanged. Shapes only (``nnx.eval_shape`` / ``jax.eval_shape``: nothing is initialised or
compiled)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import load_config
from training.builders import build_vlm


def _abstract(overrides):
    return nnx.eval_shape(lambda: build_vlm(load_config("vlm_connector", overrides)))


def test_build_vlm_tiles_with_model_vlm_tiling():
    plain = _abstract([])
    tiled = _abstract(["model.vlm.tiling=(2,2)", "data.image_size=128"])
    assert plain.cfg.tiling is None and tiled.cfg.tiling == (2, 2) and tiled.cfg.num_tiles == 5
    f = plain.num_image_tokens()
    assert tiled.num_image_tokens() == 5 * f
    dim = plain.cfg.text.dim
    out = jax.eval_shape(lambda m, x: m.image_tokens(x)[0], tiled, jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32))
    assert out.shape == (2, 5 * f, dim)
    # the tower's own size is rejected under tiling: the image must be rows * S x cols * S
    with pytest.raises(ValueError, match="pixels"):
        jax.eval_shape(lambda m, x: m.image_tokens(x)[0], tiled, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert jax.eval_shape(lambda m, x: m.image_tokens(x)[0], plain,
                          jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)).shape == (2, f, dim)
    with pytest.raises(ValueError, match="tiling"):
        _abstract(["model.vlm.tiling=(2,0)"])
