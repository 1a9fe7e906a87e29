"""models.vit: forward vs a slow NumPy reference (with ToMe + proportional attention), reducer wiring,
masks, jit/vmap/grad/retrace invariants, interpolation, FLOPs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

import reduction as R
from models.layers import cubic_resize_matrix, resize_grid
from loaders.common import _flatten
from models.vit import ViT, make_forward, parse_variant, vit_config

TINY = dict(width=32, depth=3, mlp_dim=48, heads=2, patch_size=4, image_size=16)


def tiny(**kw):
    return ViT.from_config(dict(TINY, **kw), seed=kw.pop("seed", 0) if "seed" in kw else 0)


def _randomize(model, seed=0):
    """Give every parameter (head, LayerNorm, tokens included) a non-trivial random value."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(state)
    leaves = [jnp.asarray(rng.normal(size=l.shape) * (0.3 if l.ndim > 1 else 0.2) + (1.0 if l.ndim == 1 else 0),
                          l.dtype) for l in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def run(model, x, reducers=None, return_source=False):
    """Jitted forward (eager op-by-op dispatch is slow on CPU)."""
    return make_forward(model, reducers, return_source=return_source)(x)


def images(b=2, h=16, w=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


# -- slow NumPy reference ---------------------------------------------------------------------------------------


def _ln(x, s, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * s + b


def _tome_np(x, sizes, metric, r):
    """ToMe with a class token on one example, written from the spec with loops (even -> odd matching)."""
    t = x.shape[0]
    m = metric / np.maximum(np.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
    a_idx, b_idx = list(range(0, t, 2)), list(range(1, t, 2))
    best, partner = [], []
    for i in a_idx:
        sims = [-np.inf if i == 0 else float(m[i] @ m[j]) for j in b_idx]
        partner.append(int(np.argmax(sims)))
        best.append(max(sims))
    order = sorted(range(len(a_idx)), key=lambda k: (-best[k], k))
    merged, kept = order[:r], sorted(order[r:])
    mass = {j: x[b_idx[j]] * sizes[b_idx[j]] for j in range(len(b_idx))}
    tot = {j: sizes[b_idx[j]] for j in range(len(b_idx))}
    for k in merged:
        mass[partner[k]] = mass[partner[k]] + x[a_idx[k]] * sizes[a_idx[k]]
        tot[partner[k]] = tot[partner[k]] + sizes[a_idx[k]]
    xs = [x[a_idx[k]] for k in kept] + [mass[j] / tot[j] for j in range(len(b_idx))]
    ss = [sizes[a_idx[k]] for k in kept] + [tot[j] for j in range(len(b_idx))]
    return np.stack(xs), np.array(ss)


def reference_forward(model, img, rs):
    """Slow float64 forward of one image ``[H, W, 3]``; ``rs[l]`` = ToMe r after layer l's attention."""
    cfg = model.config
    p = {k: np.asarray(v, np.float64) for k, v in _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    ps = cfg.patch_size
    h, w, _ = img.shape
    toks = [np.einsum("hwc,hwcd->d", img[i * ps:(i + 1) * ps, j * ps:(j + 1) * ps], p["patch_embed.proj.kernel"])
            + p["patch_embed.proj.bias"] for i in range(h // ps) for j in range(w // ps)]
    pe = p["pos_embed"][0]
    x = np.concatenate([p["cls_token"][0], np.stack(toks)], 0) + pe
    sizes = np.ones(x.shape[0])
    heads, dh = cfg.heads, cfg.width // cfg.heads
    for l in range(cfg.depth):
        b = f"blocks.{l}."
        y = _ln(x, p[b + "norm1.scale"], p[b + "norm1.bias"], cfg.ln_eps)
        qkv = (y @ p[b + "attn.qkv.kernel"] + p[b + "attn.qkv.bias"]).reshape(len(x), 3, heads, dh)
        out = np.zeros((len(x), heads, dh))
        for hd in range(heads):
            for t in range(len(x)):
                logits = qkv[:, 1, hd] @ qkv[t, 0, hd] / np.sqrt(dh) + np.log(sizes)
                pr = np.exp(logits - logits.max())
                out[t, hd] = (pr / pr.sum()) @ qkv[:, 2, hd]
        x = x + out.reshape(len(x), -1) @ p[b + "attn.proj.kernel"] + p[b + "attn.proj.bias"]
        if rs[l]:
            x, sizes = _tome_np(x, sizes, qkv[:, 1].mean(1), rs[l])
        y = _ln(x, p[b + "norm2.scale"], p[b + "norm2.bias"], cfg.ln_eps)
        hid = y @ p[b + "mlp.fc1.kernel"] + p[b + "mlp.fc1.bias"]
        hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))
        x = x + hid @ p[b + "mlp.fc2.kernel"] + p[b + "mlp.fc2.bias"]
    x = _ln(x, p["norm.scale"], p["norm.bias"], cfg.ln_eps)
    return x, sizes


@pytest.mark.parametrize("rs", [(0, 0, 0), (3, 2, 2)])
def test_forward_matches_numpy_reference_with_tome(rs):
    model = _randomize(tiny())
    reducers = tuple(R.ToMe(r=r) if r else None for r in rs)
    x = images(2)
    _, aux = make_forward(model, reducers)(x)
    for i in range(2):
        want, sizes = reference_forward(model, np.asarray(x[i], np.float64), rs)
        np.testing.assert_allclose(np.asarray(aux["tokens"][i]), want, atol=2e-4)
        np.testing.assert_allclose(np.asarray(aux["sizes"][i]), sizes)


def test_variants_and_config_errors():
    assert parse_variant("S/16") == dict(width=384, depth=12, mlp_dim=1536, heads=6, patch_size=16)
    assert parse_variant("L/14")["patch_size"] == 14 and parse_variant("H/14")["width"] == 1280
    with pytest.raises(ValueError, match="variant"):
        parse_variant("Q/16")
    with pytest.raises(ValueError, match="widht"):
        vit_config("Ti/16", widht=3)
    with pytest.raises(ValueError, match="pool"):
        vit_config("Ti/16", pool="max")
    with pytest.raises(ValueError, match="patch_size"):
        tiny()(jnp.zeros((1, 18, 16, 3)))
    with pytest.raises(ValueError, match="reducers has 2"):
        tiny()(images(1), reducers=(None, None))


@pytest.mark.parametrize("pool,feat", [("token", 32), ("avg", 32), ("cls+avg", 64)])
def test_pools_heads_and_aux(pool, feat):
    model = _randomize(tiny(pool=pool, num_classes=5))
    out, aux = run(model, images(2), {"method": "tome", "r": 3}, True)
    assert out.shape == (2, 5) and aux["features"].shape == (2, feat)
    assert aux["tokens_per_layer"] == [(17, 14), (14, 11), (11, 8)]
    assert aux["tokens"].shape == (2, 8, 32) and aux["source"].shape == (2, 17)
    np.testing.assert_allclose(np.asarray(aux["sizes"]).sum(1), 17.0)
    if pool != "token":  # size-weighted mean of the non-class tokens
        t, s = np.asarray(aux["tokens"]), np.asarray(aux["sizes"])
        want = (t[:, 1:] * s[:, 1:, None]).sum(1) / s[:, 1:].sum(1, keepdims=True)
        np.testing.assert_allclose(np.asarray(aux["features"][:, -32:]), want, atol=1e-5)


def test_unmerge_gives_dense_per_patch_outputs():
    model = _randomize(tiny())
    _, aux = run(model, images(2), {"method": "tome", "r": 3}, True)
    dense = R.unmerge(aux["tokens"], aux["source"])
    assert dense.shape == (2, 17, 32)
    src, tok = np.asarray(aux["source"]), np.asarray(aux["tokens"])
    for b in range(2):
        for n in range(17):
            np.testing.assert_array_equal(np.asarray(dense[b, n]), tok[b, src[b, n]])
        counts = np.bincount(src[b], minlength=8)
        np.testing.assert_allclose(counts, np.asarray(aux["sizes"][b]))  # sizes = members in the source map
    assert src[:, 0].tolist() == [0, 0]  # class token stays in slot 0


@dataclasses.dataclass(frozen=True)
class Spy(R.Reducer):
    """Identity reducer that needs everything and checks what the block hands it."""

    needs: ClassVar[frozenset] = frozenset({R.METRIC, R.ATTENTION, R.KEYS, R.HIDDEN})

    def num_out(self, t, info):
        return t

    def __call__(self, state, info):
        b, t, c = state.x.shape
        assert info.metric.shape == (b, t, c // 2) and info.keys.shape == (b, t, c)
        assert info.attention.shape == (b, 2, t, t) and info.hidden.shape == (b, t, c)
        assert info.num_protected == 1 and info.num_layers == 3
        return state.replace(x=state.x + 0.0 * jnp.sum(info.attention) + 0.0 * jnp.sum(info.metric))


@dataclasses.dataclass(frozen=True)
class PruneLast(R.Reducer):
    k: int = 3
    position: ClassVar[str] = "before_attention"

    def num_out(self, t, info):
        return t - self.k

    def __call__(self, state, info):
        b, t = state.x.shape[:2]
        keep = jnp.broadcast_to(jnp.arange(t - self.k), (b, t - self.k))
        return R.apply_step(state, R.prune_step(keep, t))


@dataclasses.dataclass(frozen=True)
class MaskLast(R.Reducer):
    k: int = 3
    position: ClassVar[str] = "before_attention"

    def num_out(self, t, info):
        return t

    def __call__(self, state, info):
        b, t = state.x.shape[:2]
        return state.replace(valid=jnp.broadcast_to(jnp.arange(t) < t - self.k, (b, t)))


def test_explicit_attention_path_equals_fused():
    model = _randomize(tiny())
    x = images(2)
    base, aux0 = run(model, x)
    spied, aux1 = run(model, x, (Spy(), Spy(), None))
    np.testing.assert_allclose(np.asarray(aux1["tokens"]), np.asarray(aux0["tokens"]), atol=2e-5)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_valid_mask_equals_pruning(pool):
    """Masked-out tokens must not influence the others: masking == removing them."""
    model = _randomize(tiny(pool=pool))
    x = images(2)
    out_p, aux_p = run(model, x, (None, PruneLast(3), None))
    out_m, aux_m = run(model, x, (None, MaskLast(3), None))
    assert aux_m["tokens"].shape[1] == 17 and aux_p["tokens"].shape[1] == 14
    np.testing.assert_allclose(np.asarray(aux_m["tokens"][:, :14]), np.asarray(aux_p["tokens"]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out_m), np.asarray(out_p), atol=2e-5)


def test_proportional_attention_is_used_after_merging():
    model = _randomize(tiny())
    x = images(1)
    with_prop = run(model, x, {"method": "tome", "r": 3})[1]["tokens"]
    without = run(model, x, {"method": "tome", "r": 3, "prop_attn": False})[1]["tokens"]
    assert float(jnp.max(jnp.abs(with_prop - without))) > 1e-3


def test_jit_equals_eager_no_retrace_vmap_and_grads():
    model = _randomize(tiny(num_classes=4))
    reducers = model.build_reducers({"method": "tome", "r": 3})
    fwd = make_forward(model, reducers, return_source=True)
    x = images(3)
    out_j, aux_j = fwd(x)
    small = _randomize(tiny(depth=1, num_classes=4))  # eager dispatch is slow: one block is enough
    small_red = small.build_reducers({"method": "tome", "r": 3})
    out_s, aux_s = make_forward(small, small_red, return_source=True)(x[:1])
    out_e, aux_e = small(x[:1], reducers=small_red, return_source=True)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_e), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux_s["source"]), np.asarray(aux_e["source"]))
    fwd(images(3, seed=7))
    fwd(images(3, seed=8))
    assert fwd.num_traces() == 1
    assert aux_j["tokens_per_layer"] == [(17, 14), (14, 11), (11, 8)]
    assert aux_s["tokens_per_layer"] == aux_e["tokens_per_layer"] == [(17, 14)]

    graphdef, params = nnx.split(model)

    def one(img):
        return nnx.merge(graphdef, params)(img[None], reducers=reducers)[0][0]

    one_j = jax.jit(one)
    batched = jax.jit(jax.vmap(one))(x)
    loop = np.stack([np.asarray(one_j(x[i])) for i in range(3)])
    np.testing.assert_allclose(np.asarray(batched), loop, atol=1e-5)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x, reducers=reducers)[0] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


@pytest.mark.parametrize("spec", [
    {"method": "pitome", "keep_ratio": 0.9},
    {"method": "zerotprune", "layers": [1]},
    {"method": "pool", "layers": [1]},
    {"method": "topk_cls", "keep_ratio": 0.7, "layers": [1]},
    {"method": "dart", "keep_ratio": 0.7, "layers": [1]},
])
def test_registered_methods_run_in_the_model(spec):
    if spec["method"] not in R.available_methods():
        pytest.skip(f"{spec['method']} not registered")
    model = _randomize(tiny(pool="avg"))
    try:
        reducers = model.build_reducers(spec)
    except TypeError as err:  # a method whose spec changed: report, do not hide
        pytest.fail(f"spec {spec} rejected: {err}")
    out, aux = make_forward(model, reducers, return_source=True)(images(2))
    t_final = aux["tokens_per_layer"][-1][1]
    assert aux["tokens"].shape == (2, t_final, 32) and t_final < 17
    assert bool(jnp.all(jnp.isfinite(out)))
    src = np.asarray(aux["source"])
    assert (src[:, 0] == 0).all()  # the class token survives in slot 0
    assert src.max() < t_final


def test_protected_tokens_distill_and_registers():
    model = _randomize(tiny(distill_token=True, num_classes=3))
    out, aux = run(model, images(2), {"method": "tome", "r": 3}, True)
    assert (np.asarray(aux["source"])[:, :2] == [[0, 1], [0, 1]]).all()
    reg = _randomize(tiny(num_registers=2, layer_scale=0.1))
    o, aux = run(reg, images(1), (None, PruneLast(2), None))
    assert aux["tokens"].shape == (1, 17, 32)  # 1 cls + 2 registers + 16 patches - 2


def test_resize_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    for out_hw in [(7, 9), (3, 2), (5, 4)]:
        want = torch.nn.functional.interpolate(torch.from_numpy(g).permute(2, 0, 1)[None], size=out_hw,
                                               mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(resize_grid(jnp.asarray(g), out_hw)), want, atol=1e-5)
    np.testing.assert_allclose(cubic_resize_matrix(6, 6), np.eye(6), atol=1e-7)
    out, aux = run(tiny(), images(1, 24, 12))
    assert aux["tokens"].shape == (1, 19, 32)


def test_flops_follow_the_schedule():
    model = tiny(num_classes=5)
    base = model.flops(16)
    by_hand = R.vit_flops([17] * 3, dim=32, mlp_dim=48, patch_size=4, num_patches=16, num_classes=5)
    assert base == by_hand
    reducers = model.build_reducers({"method": "tome", "r": 3})
    reduced = model.flops(16, reducers)
    counts = [(17, 14), (14, 11), (11, 8)]
    blocks = R.vit_flops([a for a, _ in counts], mlp_tokens=[m for _, m in counts], dim=32, mlp_dim=48,
                         patch_size=4, num_patches=16, num_classes=5)
    extra = sum(R.flops.tome_flops(t, 16) for t in (17, 14, 11))
    assert reduced == blocks + extra < base


def test_bf16_compute_is_finite():
    model = _randomize(tiny(dtype=jnp.bfloat16))
    out, aux = run(model, images(2), {"method": "tome", "r": 3})
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(aux["sizes"]).sum(1), 17.0)
