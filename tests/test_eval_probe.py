"""The probe-feature option (``probe_features``) and the ``feature_cos`` fidelity column of the ViT sweep."""

import numpy as np
import jax.numpy as jnp
import pytest

from evaluation.builtin import PROBE_FEATURES, _probe_kind, pooled_features, vit_backbone
from evaluation.sweep import feature_cosine


def _loop_pooled(tokens, sizes, valid, p, kind):
    """Slow reference: the class token and the size-weighted mean of the valid unprotected tokens."""
    out = []
    for b in range(tokens.shape[0]):
        num, den = np.zeros(tokens.shape[-1]), 0.0
        for t in range(p, tokens.shape[1]):
            if valid is None or valid[b, t]:
                num += sizes[b, t] * tokens[b, t]
                den += sizes[b, t]
        mean = num / max(den, 1e-6)
        out.append({"cls": tokens[b, 0], "mean": mean, "cls_and_mean": np.r_[tokens[b, 0], mean]}[kind])
    return np.stack(out)


@pytest.mark.parametrize("kind", PROBE_FEATURES)
def test_pooled_features_match_loop_reference(kind):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 7, 5)).astype(np.float32)
    sizes = rng.integers(1, 4, size=(3, 7)).astype(np.float32)
    valid = rng.random((3, 7)) > 0.3
    for v in (None, valid):
        got = np.asarray(pooled_features(jnp.asarray(tokens), jnp.asarray(sizes), None if v is None else jnp.asarray(v),
                                         2, kind))
        np.testing.assert_allclose(got, _loop_pooled(tokens, sizes, v, 2, kind), rtol=1e-5, atol=1e-6)


def test_bad_probe_features_is_named():
    x = jnp.zeros((1, 3, 2))
    with pytest.raises(ValueError, match="probe_features"):
        pooled_features(x, jnp.ones((1, 3)), None, 1, "cls+mean")
    from configs import load_config

    assert _probe_kind(load_config("eval_quick", ["probe_features=cls"])) == "cls"
    assert _probe_kind(load_config("eval_dinov2_fmnist")) == "cls_and_mean"
    with pytest.raises(ValueError, match="probe_features"):
        _probe_kind(load_config("eval_quick", ["probe_features=patch"]))


def test_feature_cosine_matches_loop_reference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    a[2] = 0.0                                                   # a zero vector counts as cosine 0
    ref = np.mean([0.0 if not np.any(a[i]) else float(a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]))
                   for i in range(6)])
    assert feature_cosine(a, b) == pytest.approx(ref, abs=1e-12)
    assert feature_cosine(b, b) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes"):
        feature_cosine(a, b[:, :3])


@pytest.mark.long   # three compiles of a tiny ViT and a one-point sweep (over the 10 s budget of new default tests)
def test_repo_vit_backbone_probe_features_and_sweep_column():
    """``probe_features="cls"`` gives the first half of the default features; every sweep row has ``feature_cos``
    (1 for the unreduced point, below 1 for a pruned one: here the mean of the patches pruned at layer 1)."""
    from evaluation import measure
    from evaluation.sweep import SweepSettings, run_sweep
    from models.vit import ViT, ViTConfig

    model = ViT.from_config(ViTConfig(width=32, depth=2, heads=2, mlp_dim=64, patch_size=7, image_size=28,
                                      layer_scale=0.1), seed=0)
    imgs = np.random.default_rng(0).integers(0, 255, (8, 28, 28), dtype=np.uint8)
    feats = {}
    for kind in ("cls_and_mean", "cls"):
        bb = vit_backbone(model, image_size=28, name="tiny", probe_features=kind)
        comp = measure.compile_setting(bb.features, (None, None), batch_size=8, image_size=28, params=bb.params)
        feats[kind] = measure.extract(comp, imgs)
    assert feats["cls"].shape == (8, 32)
    np.testing.assert_allclose(feats["cls"], feats["cls_and_mean"][:, :32], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="probe_features"):
        vit_backbone(model, image_size=28, name="tiny", probe_features="nope")

    bb = vit_backbone(model, image_size=28, name="tiny")      # (CLS alone would not move: layer 1 is the last)
    labels = np.arange(8) % 2
    settings = SweepSettings(methods=("random",), targets=(0.9,), batch_size=8, throughput_batch=8, repeats=1,
                             l2_grid=(1.0,))
    pts = run_sweep(bb, (imgs, labels), (imgs, labels), num_classes=2, settings=settings, progress=False)["points"]
    assert pts[0]["method"] == "none" and pts[0]["feature_cos"] == pytest.approx(1.0, abs=1e-6)
    assert not pts[1].get("error") and pts[1]["feature_cos"] < 0.9999
