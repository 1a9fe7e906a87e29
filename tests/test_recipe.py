"""The DeiT training recipe: host-side augmentation ops (data/augment.py), Mixup / CutMix and the model EMA
(training/recipe.py), stochastic depth (models/vit.py), the recipe's config checks, and a tiny run with all of it on
that resumes bitwise (long)."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import data as D
from data import augment as A
from training import recipe as TR
from tests.tree_asserts import assert_trees_bitwise


def rng(seed=0):
    return np.random.default_rng(seed)


# -- RandomResizedCrop ---------------------------------------------------------------------------------------


def test_rrc_box_within_image_scale_and_ratio():
    h, w = 40, 60
    for s in range(300):
        top, left, ch, cw = A.rrc_box(h, w, rng(s), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        # rounding of each side to whole pixels moves area and aspect by at most about one pixel per side
        assert 0.08 * h * w - (ch + cw + 1) <= ch * cw <= h * w
        assert 3 / 4 * (1 - 1.5 / ch) - 1e-9 <= cw / ch <= 4 / 3 * (1 + 1.5 / ch) + 1e-9 or (ch, cw) == (h, h * 4 // 3)
    # no crop of the ratio range fits a 2 x 100 strip: the fallback is the centred crop clamped to the ratio range
    assert A.rrc_box(2, 100, rng(0), scale=(0.99, 1.0)) == (0, 48, 2, 3)


def test_random_resized_crop_shape_dtype_and_seed():
    img = rng(1).integers(0, 256, (24, 30, 3)).astype(np.uint8)
    a = A.random_resized_crop(img, rng(5), 16)
    b = A.random_resized_crop(img, rng(5), 16)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    grey = A.random_resized_crop(img[..., :1], rng(5), 16)
    assert grey.shape == (16, 16, 1)
    # scale (1, 1) and a ratio range holding the image's own aspect: the crop is the whole image, only resized
    full = A.random_resized_crop(img, rng(0), 30, scale=(1.0, 1.0), ratio=(0.5, 2.0))
    assert full.shape == (30, 30, 3)


# -- RandAugment ---------------------------------------------------------------------------------------------


def test_parse_randaugment():
    assert A.parse_randaugment("") is None
    assert A.parse_randaugment("rand-m9-mstd0.5-inc1") == A.RandAugmentSpec(n=2, m=9.0, mstd=0.5, p=0.5)
    assert A.parse_randaugment("rand-n3-m5") == A.RandAugmentSpec(n=3, m=5.0, mstd=0.0)
    for bad, msg in (("rand-m9-foo1", "unknown part"), ("augmix-m9", "must start"), ("rand-m11", "out of range"),
                     ("rand-m9-inc0", "inc1")):
        with pytest.raises(ValueError, match=msg):
            A.parse_randaugment(bad)


def _apply(name, img, level, seed=0):
    pil = A._to_pil(img)
    return A._from_pil(A.RAND_OPS[name](pil, level, rng(seed), 128), img.shape[-1])


def test_rand_ops_match_pixel_references():
    img = rng(2).integers(0, 256, (12, 20, 1)).astype(np.uint8)
    x = img.astype(np.int32)
    np.testing.assert_array_equal(_apply("Invert", img, 0.3), 255 - x)
    for level in (0.0, 0.5, 0.9):
        thresh = 256 - int(256 * level)
        np.testing.assert_array_equal(_apply("SolarizeIncreasing", img, level), np.where(x >= thresh, 255 - x, x))
        bits = 4 - int(4 * level)
        np.testing.assert_array_equal(_apply("PosterizeIncreasing", img, level), x & ((0xFF << (8 - bits)) & 0xFF))
        add = int(110 * level)
        np.testing.assert_array_equal(_apply("SolarizeAdd", img, level), np.where(x < 128, np.minimum(x + add, 255), x))
    # level 1: a shift of 0.45 * 20 = 9 whole pixels, either way (the sign is random), filled with 128
    for seed in range(4):
        out = _apply("TranslateXRel", img, 1.0, seed).astype(np.int32)
        left = np.array_equal(out[:, :11], x[:, 9:]) and (out[:, 11:] == 128).all()
        right = np.array_equal(out[:, 9:], x[:, :11]) and (out[:, :9] == 128).all()
        assert left or right
    # the enhance ops at level 0 are the identity (factor 1)
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        np.testing.assert_array_equal(_apply(name, img, 0.0), img)


def test_rand_augment_shapes_range_and_determinism():
    spec = A.parse_randaugment("rand-m9-mstd0.5-inc1")
    img = rng(3).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    outs = [A.rand_augment(img, rng(s), spec) for s in range(12)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    np.testing.assert_array_equal(A.rand_augment(img, rng(7), spec), outs[7])
    assert len({o.tobytes() for o in outs}) > 6          # different seeds, different ops
    # every op runs on RGB and grey images at the extreme levels
    for name in A.RAND_OPS:
        for level in (0.0, 1.0):
            assert _apply(name, img, level).shape == img.shape
            assert _apply(name, img[..., :1], level).shape == (16, 16, 1)


# -- random erasing ------------------------------------------------------------------------------------------


def test_erase_box_area_and_aspect_within_bounds():
    h, w = 32, 48
    for s in range(300):
        box = A.erase_box(h, w, rng(s))
        assert box is not None
        top, left, eh, ew = box
        assert 0 <= top and top + eh <= h and 0 <= left and left + ew <= w
        area = eh * ew / (h * w)
        slack = (eh + ew + 1) / (h * w)                    # whole-pixel rounding of both sides
        assert 0.02 - slack <= area <= 1 / 3 + slack
        assert 0.3 * (1 - 1.5 / min(eh, ew)) <= eh / ew <= (1 / 0.3) * (1 + 1.5 / min(eh, ew))


def test_random_erase_probability_region_and_noise():
    img = np.full((32, 32, 3), 7, np.uint8)
    assert A.random_erase(img, rng(0), 0.0, (0.5,) * 3, (0.2,) * 3) is img
    erased = 0
    for s in range(400):
        out = A.random_erase(img, rng(s), 0.25, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        changed = np.any(out != img, axis=-1)
        if changed.any():
            erased += 1
            rows, cols = np.nonzero(changed)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box <= (1 / 3) * 32 * 32 + 64          # one box, never more than a third of the image
    assert 60 < erased < 140                              # 0.25 of 400 = 100
    noise = A.random_erase(np.zeros((64, 64, 3), np.uint8), rng(1), 1.0, (0.5, 0.5, 0.5), (0.1, 0.1, 0.1))
    vals = noise[np.any(noise != 0, axis=-1)].astype(np.float64) / 255
    assert abs(vals.mean() - 0.5) < 0.02 and abs(vals.std() - 0.1) < 0.02


def test_full_augment_pipeline_is_deterministic_and_resumes():
    src = D.synthetic_classification(24, image_size=16)
    aug = D.Augment(flip=True, rrc=True, out_size=12, randaugment="rand-m9-mstd0.5-inc1", erase_prob=0.25,
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    it = iter(D.train_dataset(src, batch_size=4, seed=3, augment=aug, num_threads=1))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    assert first[0]["image"].shape == (4, 12, 12, 3) and first[0]["image"].dtype == np.uint8
    again = iter(D.train_dataset(src, batch_size=4, seed=3, augment=aug, num_threads=1))
    for want in first:
        np.testing.assert_array_equal(next(again)["image"], want["image"])
    resumed = iter(D.train_dataset(src, batch_size=4, seed=3, augment=aug, num_threads=1))
    resumed.set_state(json.loads(json.dumps(state)))
    for want in rest:
        np.testing.assert_array_equal(next(resumed)["image"], want["image"])
    with pytest.raises(ValueError, match="unknown part"):
        D.Augment(randaugment="rand-q1")


# -- Mixup / CutMix ------------------------------------------------------------------------------------------


def _batch(b=4, h=8, w=6):
    images = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None] * 10 + 1, (b, h, w, 3))
    return np.ascontiguousarray(images), np.arange(b, dtype=np.int32)


def _smooth(labels, classes, eps):
    return np.eye(classes)[labels] * (1 - eps) + eps / classes




def _timm_box(h, w, lam, cy, cx):
    """A slow reference of timm's rand_bbox (integer arithmetic in Python)."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    return (min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h), min(max(cx - cw // 2, 0), w),
            min(max(cx + cw // 2, 0), w))


def test_mixup_and_cutmix_targets_lambda_and_switch():
    """One compile: 300 batches through Mixup 0.8 / CutMix 1.0 (switch 0.5), mixed with probability 0.8."""
    images, labels = _batch(h=10, w=7)
    mix = TR.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
    fn = jax.jit(jax.vmap(lambda k: TR.mix_batch(k, images, labels, 4, 0.1, mix)))
    outs, targets, lams, cuts = jax.device_get(fn(jax.random.split(jax.random.key(0), 300)))
    y = _smooth(labels, 4, 0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    n_mix = n_cut = n_off = 0
    for out, t, lam, cut in zip(outs, targets, lams, cuts):
        lam = float(lam)
        np.testing.assert_allclose(t, lam * y + (1 - lam) * y[::-1], rtol=1e-5, atol=1e-7)
        if cut:        # row 0 gets row 3's (different) values inside the box; lam = the uncovered fraction
            n_cut += 1
            pasted = out[0, :, :, 0] != images[0, 0, 0, 0]
            np.testing.assert_array_equal(out[0][pasted], images[3][pasted])
            np.testing.assert_allclose(lam, 1 - pasted.sum() / pasted.size, rtol=1e-6)
            if pasted.any():
                rows, cols = np.nonzero(pasted)
                assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a box
        elif lam == 1.0 and np.array_equal(out, images):
            n_off += 1
        else:
            n_mix += 1
            np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    assert 30 < n_off < 90                     # 0.2 of 300 = 60 batches not mixed
    assert 0.4 < n_cut / (n_cut + n_mix) < 0.6
    assert not TR.MixConfig().active and not TR.MixConfig(mixup_alpha=0.8, prob=0.0).active


def test_cutmix_box_matches_timm_formula():
    lams = np.array([0.0, 0.3, 0.77, 1.0] * 4, np.float32)
    keys = jax.random.split(jax.random.key(1), 16)

    def one(k, lam):
        ky, kx = jax.random.split(k)
        return TR.cutmix_box(k, 10, 7, lam), (jax.random.randint(ky, (), 0, 10), jax.random.randint(kx, (), 0, 7))

    boxes, (cys, cxs) = jax.device_get(jax.jit(jax.vmap(one))(keys, lams))
    for i, lam in enumerate(lams):
        got = tuple(int(b[i]) for b in boxes)
        assert got == _timm_box(10, 7, float(lam), int(cys[i]), int(cxs[i]))


# -- EMA -----------------------------------------------------------------------------------------------------


def test_ema_update_equals_the_formula():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    params = {"a": jnp.array([5.0, -1.0]), "b": {"c": jnp.array(0.5)}}
    out = jax.device_get(jax.jit(TR.ema_update, static_argnums=2)(ema, params, 0.9))
    np.testing.assert_allclose(out["a"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([5.0, -1.0]), rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"], 0.9 * 3.0 + 0.1 * 0.5, rtol=1e-6)


# -- stochastic depth ----------------------------------------------------------------------------------------


def test_drop_path_keep_rate_and_scaling():
    from models.layers import drop_path

    y = jnp.ones((4000, 3, 2))
    assert drop_path(y, jax.random.key(0), 0.0) is y and drop_path(y, None, 0.5) is y
    out = np.asarray(jax.jit(drop_path, static_argnums=2)(y, jax.random.key(0), 0.3))
    per_example = out.reshape(4000, -1)
    assert (per_example == per_example[:, :1]).all()           # one draw per example
    vals = set(np.unique(out).tolist())
    assert vals <= {0.0, np.float32(1 / 0.7)}
    keep = float(np.mean(per_example[:, 0] > 0))
    assert abs(keep - 0.7) < 0.03 and abs(out.mean() - 1.0) < 0.05


def test_vit_drop_path_off_is_identity_on_is_random_and_eval_deterministic():
    from flax import nnx

    from models.vit import ViT, ViTConfig

    def tiny(rate):   # shapes traced, weights from numpy: no eager initialisation (seconds on a loaded CPU)
        cfg = ViTConfig(width=8, depth=2, mlp_dim=16, heads=1, patch_size=4, image_size=8, num_classes=0,
                        drop_path_rate=rate)
        graph, state = nnx.split(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0))))
        r = np.random.default_rng(0)
        return nnx.merge(graph, jax.tree.map(lambda a: (0.3 * r.normal(size=a.shape)).astype(a.dtype), state))

    m0, m1 = tiny(0.0), tiny(0.5)       # same parameters; stochastic depth off / on

    @nnx.jit(static_argnums=(3,))
    def run(m, x, key, deterministic):
        return m(x, deterministic=deterministic, rng=key)[0]

    x = np.random.default_rng(1).normal(size=(6, 8, 8, 3)).astype(np.float32)
    key = jax.random.key(2)
    ref = run(m1, x, key, True)                                     # evaluation: the path without drop path
    np.testing.assert_array_equal(run(m0, x, key, False), ref)      # rate 0 in training mode: bit-identical
    a = run(m1, x, key, False)
    np.testing.assert_array_equal(run(m1, x, key, False), a)        # same key, same draw
    b = run(m1, x, jax.random.key(3), False)
    assert not np.allclose(a, ref) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="drop_path_rate"):
        ViTConfig(drop_path_rate=1.0)


# -- config checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("data.augment.erase_prob=1.5", "data.augment.erase_prob"),
    ("train.mixup_alpha=-0.1", "train.mixup_alpha"),
    ("train.mix_switch_prob=2.0", "train.mix_switch_prob"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("model.vit.drop_path_rate=1.0", "model.vit.drop_path_rate"),
    ("data.augment.rrc_scale=(0.5, 0.1)", "data.augment.rrc_scale"),
    ("data.augment.randaugment='rand-m9-x2'", "data.augment.randaugment"),
])
def test_recipe_fields_are_checked_with_named_errors(override, match):
    cfg = configs.load_config("vit_fmnist", [override])
    with pytest.raises(configs.ConfigError, match=match):
        configs.check_train_config(cfg)


def test_mixing_needs_classification_and_imagenet_preset_says_where_data_goes(tmp_path):
    import train

    cfg = configs.load_config("vit_fmnist", ["train.cutmix_alpha=1.0"])
    with cfg.unlocked():
        cfg.task = "dense"
    with pytest.raises(configs.ConfigError, match="task='classification'"):
        configs.check_train_config(cfg)
    configs.check_train_config(configs.load_config("deit_s_imagenet", []))
    with pytest.raises(configs.ConfigError, match=r"data.path=/path/to/imagenet.*train/ and val/"):
        configs.check_data_provided(configs.load_config("deit_s_imagenet", []))

    def no_model(cfg):
        raise AssertionError("the model must not be built")

    with pytest.raises(configs.ConfigError, match=r"data.path=/path/to/imagenet"):   # the trainer, before the model
        train.Trainer(configs.load_config("deit_s_imagenet", []), tmp_path, model_fn=no_model).train()
    deit = configs.load_config("deit_s_imagenet", ["data.path=/somewhere"])
    configs.check_data_provided(deit)
    assert (deit.train.mixup_alpha, deit.train.cutmix_alpha, deit.train.label_smoothing) == (0.8, 1.0, 0.1)
    assert deit.data.augment.randaugment == "rand-m9-mstd0.5-inc1" and deit.data.augment.erase_prob == 0.25
    assert deit.model.vit.drop_path_rate == 0.1 and deit.train.ema_decay == 0.99996
    tome = configs.load_config("tome_finetune", [])
    assert tome.model.reduction.prop_attn is False and tome.train.mixup_alpha == 0.8
    fm = configs.load_config("vit_fmnist", [])
    assert (fm.train.mixup_alpha, fm.train.cutmix_alpha, fm.train.ema_decay, fm.model.vit.drop_path_rate,
            fm.data.augment.randaugment, fm.data.augment.erase_prob) == (0.0, 0.0, 0.0, 0.0, "", 0.0)


# -- a tiny run with the whole recipe on, resumed bitwise ------------------------------------------------------

RECIPE = ["data.augment.random_resized_crop=True", "data.augment.randaugment='rand-m9-mstd0.5-inc1'",
          "data.augment.erase_prob=0.25", "train.mixup_alpha=0.8", "train.cutmix_alpha=1.0", "train.ema_decay=0.9",
          "model.vit.drop_path_rate=0.1", "train.label_smoothing=0.1", "checkpoint.every=2",
          "checkpoint.use_async=False"]


@pytest.mark.long   # two tiny runs (several minutes on the loaded 2-core box)
def test_recipe_run_trains_and_resumes_bitwise(tmp_path):
    import train
    from tests.test_train import TINY

    def cfg(steps):
        return configs.load_config("vit_fmnist", TINY + RECIPE + [f"train.steps={steps}"])

    ref = train.Trainer(cfg(3), tmp_path / "ref")
    ref.train()
    lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in lines if "loss" in x]) == 3 and all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    assert all(0.0 <= x["mix_lam"] <= 1.0 for x in lines if "mix_lam" in x)
    # resume from the reference's step-2 checkpoint (same train.steps, so the same schedule)
    shutil.copytree(tmp_path / "ref" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    resumed = train.Trainer(cfg(3), tmp_path / "resumed")
    resumed.train()
    assert resumed.resumed_from == 2
    for k in ("params", "ema"):
        assert_trees_bitwise(ref.state[k], resumed.state[k])
    # the EMA moved towards the parameters but is not them
    p = jax.tree.leaves(jax.device_get(ref.state["params"]))
    e = jax.tree.leaves(jax.device_get(ref.state["ema"]))
    assert any(not np.array_equal(x, y) for x, y in zip(p, e))
