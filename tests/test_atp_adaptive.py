"""evaluation.atp_adaptive on a tiny untrained model: constant-threshold surgery, ATP-score top-K, the bisection on
the mean kept count; and LearnedATP's ``features="stats+cls"`` option."""

import numpy as np
import pytest
from flax import nnx

from evaluation import atp_adaptive as A
from models.vit import ViT, ViTConfig

_CFG = ViTConfig(width=32, depth=3, heads=2, mlp_dim=64, patch_size=7, image_size=28, layer_scale=0.1, num_classes=4)


def _model(**options):
    m = ViT.from_config(_CFG, seed=0)
    for blk in m.blocks:                 # sharper attention than at init, so the ATP scores spread out
        blk.attn.qkv.kernel[...] = blk.attn.qkv.kernel[...] * 4.0
    return m.attach_atp([1], capacity_ratio=1.0, stride=0, **options)


@pytest.mark.long
def test_constant_theta_topk_and_bisection_on_a_tiny_model():
    model = _model(init_theta=0.9)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), rng.integers(0, 4, 12)
    kw = dict(batch_size=8)
    const = A.evaluate(A.constant_theta(model, {1: 0.9}), images, labels, **kw)
    np.testing.assert_allclose(const["theta"][1], 0.9, rtol=1e-5)
    kept = A.kept_at(const, 1)
    assert len(set(kept.tolist())) > 1                                  # a constant threshold: counts still vary
    assert (kept == const["counts"][:, 2, 0]).all() and np.all(np.diff(const["gflops"][np.argsort(kept)]) >= 0)
    top = A.evaluate(A.score_topk(model, 1, 5), images, labels, **kw)
    assert (A.kept_at(top, 1) == 6).all()                               # 5 patches + the class token, every image
    # bisection: the constant that reproduces the mean kept count of theta = 0.9 (monotone in theta)
    c, res = A.bisect_constant(model, 1, float(kept.mean()), images, labels, steps=12, lo=0.8, hi=1.0, **kw)
    assert abs(A.kept_at(res, 1).mean() - kept.mean()) < 1e-9 and 0.8 < c < 1.0
    plain = A.without_learned(model)
    assert plain.learned_layers == () and model.learned_layers == (1,)
    assert (A.kept_at(A.evaluate(plain, images, labels, **kw), 1) == 17).all()


@pytest.mark.long
def test_stats_cls_features_make_theta_depend_on_the_class_token():
    import jax.numpy as jnp

    from reduction.nnx import LearnedATP

    with pytest.raises(ValueError, match="features must be one of"):
        LearnedATP(capacity_ratio=1.0, features="cls_only", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs dim"):
        LearnedATP(capacity_ratio=1.0, features="stats+cls", rngs=nnx.Rngs(0))
    mod = LearnedATP(capacity_ratio=1.0, features="stats+cls", dim=32, rngs=nnx.Rngs(0))
    assert mod.fc1.kernel[...].shape == (5 + 32, 16)
    mod.fc2.kernel[...] = jnp.full_like(mod.fc2.kernel[...], 0.05)       # a nonzero head
    rng = np.random.default_rng(0)
    s1 = rng.uniform(size=(1, 17))
    score = jnp.asarray(np.concatenate([s1, s1, s1, rng.uniform(size=(1, 17))]), jnp.float32)
    cand = jnp.asarray(np.arange(17) >= 1)[None].repeat(4, 0)
    z = rng.normal(size=(1, 32))
    cls = jnp.asarray(np.concatenate([z, 3.0 * z + 1.0, -z, z]), jnp.float32)
    theta = np.asarray(nnx.jit(lambda m, s, c, k: m.threshold(s, s, s, c, k))(mod, score, cand, cls))
    np.testing.assert_allclose(theta[0], theta[1], rtol=1e-5)           # standardised: scale and shift do not count
    assert abs(theta[0] - theta[2]) > 1e-4                              # another class token, another threshold
    assert abs(theta[0] - theta[3]) > 1e-4                              # other score statistics, too
    with pytest.raises(ValueError, match="needs the class token"):
        mod.threshold(score, score, score, cand)
    stats = LearnedATP(capacity_ratio=1.0, rngs=nnx.Rngs(0))
    assert stats.fc1.kernel[...].shape == (5, 16) and stats.features_kind == "stats"
