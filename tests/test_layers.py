"""The shared layers (models/layers.py): one Attention (fused qkv or q/k/v projections, GQA, biases, RoPE, fused or
explicit probabilities, boolean mask or additive key bias) and one Mlp (gelu, quick_gelu, swiglu), checked against
NumPy loop references; the fused and separate layouts against each other; the parameter paths each model keeps;
the CLIP tower as a ViT configuration; named errors."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Attention, Mlp


# -- NumPy loop references -------------------------------------------------------------------------------


def ref_linear(x, kernel, bias):
    return x @ kernel + (0.0 if bias is None else bias)


def ref_rope_vec(vec, pos, theta):
    """One head vector [D]; pairs (i, i + D/2) rotated by pos * theta^(-2i/D) (HF rotate_half)."""
    d = vec.shape[0]
    out = np.array(vec, np.float64)
    for i in range(d // 2):
        ang = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[i] = vec[i] * c - vec[i + d // 2] * s
        out[i + d // 2] = vec[i + d // 2] * c + vec[i] * s
    return out


def ref_attention_module(x, w, *, heads, kv_heads, head_dim, positions, theta, mask, bias):
    """x [B, T, C]; w: dict of q/k/v/o kernels and biases; mask [B, T, T] bool or None; bias [B, T] or None.
    Returns (out [B, T, C], probs [B, H, T, T])."""
    b, t, _ = x.shape
    q = ref_linear(x, w["q"], w.get("qb")).reshape(b, t, heads, head_dim)
    k = ref_linear(x, w["k"], w.get("kb")).reshape(b, t, kv_heads, head_dim)
    v = ref_linear(x, w["v"], w.get("vb")).reshape(b, t, kv_heads, head_dim)
    if theta is not None:
        for bi in range(b):
            for ti in range(t):
                for hi in range(heads):
                    q[bi, ti, hi] = ref_rope_vec(q[bi, ti, hi], positions[bi, ti], theta)
                for gi in range(kv_heads):
                    k[bi, ti, gi] = ref_rope_vec(k[bi, ti, gi], positions[bi, ti], theta)
    o = np.zeros((b, t, heads, head_dim))
    probs = np.zeros((b, heads, t, t))
    for bi in range(b):
        for hi in range(heads):
            gi = hi // (heads // kv_heads)
            for ti in range(t):
                logits = np.empty(t)
                for si in range(t):
                    logits[si] = q[bi, ti, hi] @ k[bi, si, gi] / math.sqrt(head_dim)
                    if bias is not None:
                        logits[si] += bias[bi, si]
                    if mask is not None and not mask[bi, ti, si]:
                        logits[si] = -np.inf
                p = np.exp(logits - logits.max())
                p /= p.sum()
                probs[bi, hi, ti] = p
                o[bi, ti, hi] = sum(p[si] * v[bi, si, gi] for si in range(t))
    out = ref_linear(o.reshape(b, t, heads * head_dim), w["o"], w.get("ob"))
    return out, probs


def _weights(attn):
    """The q/k/v/o kernels and biases of either layout as NumPy arrays."""
    w = {}
    if attn.fused_qkv:
        qd, kd = attn.heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        kern = np.asarray(attn.qkv.kernel[...])
        w["q"], w["k"], w["v"] = kern[:, :qd], kern[:, qd:qd + kd], kern[:, qd + kd:]
        if attn.qkv.bias is not None:
            bias = np.asarray(attn.qkv.bias[...])
            w["qb"], w["kb"], w["vb"] = bias[:qd], bias[qd:qd + kd], bias[qd + kd:]
        w["o"] = np.asarray(attn.proj.kernel[...])
        if attn.proj.bias is not None:
            w["ob"] = np.asarray(attn.proj.bias[...])
    else:
        for n, mod in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
            w[n] = np.asarray(mod.kernel[...])
            if mod.bias is not None:
                w[n + "b"] = np.asarray(mod.bias[...])
    return w


def _build(ctor, seed):
    """``ctor()`` built abstractly (no initialiser runs) with every parameter, biases too, set to random NumPy
    values, so a wrong slice or a missing bias shows and nothing compiles before the one jitted call."""
    module = nnx.eval_shape(ctor)
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
    nnx.update(module, jax.tree_util.tree_unflatten(tree, new))
    return module


B, T, C = 2, 5, 16
X = np.random.default_rng(0).normal(size=(B, T, C)).astype(np.float32)
POS = np.array([[0, 1, 2, 7, 9], [3, 4, 5, 6, 30]])
VALID = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
CAUSAL = np.tril(np.ones((T, T), bool))[None] & VALID[:, None, :] | np.eye(T, dtype=bool)[None]
KEY_BIAS = np.where(VALID, 0.0, -1e4).astype(np.float32) + np.log(np.array([[1, 1, 2, 1, 3], [1, 2, 1, 1, 1]]))
ROWS = 2

CASES = {
    # name: (constructor options, RoPE, boolean mask, key bias)
    "vit": (dict(fused_qkv=True, qkv_bias=True), None, None, KEY_BIAS),
    "vit_nobias": (dict(fused_qkv=True, qkv_bias=False), None, None, None),
    "llama_gqa_rope": (dict(fused_qkv=False, num_kv_heads=2, qkv_bias=False, out_bias=False, rope_theta=100.0),
                       100.0, CAUSAL, None),
    "qkv_bias_mask_and_bias": (dict(fused_qkv=False, num_kv_heads=1, head_dim=6, rope_theta=50.0), 50.0, CAUSAL,
                               KEY_BIAS),
}


def _separate_copy(fused):
    """A q/k/v/o_proj module holding the fused module's weights."""
    sep = _build(lambda: Attention(C, 4, fused_qkv=False, rngs=nnx.Rngs(0)), seed=9)
    w = _weights(fused)
    for n, mod in (("q", sep.q_proj), ("k", sep.k_proj), ("v", sep.v_proj), ("o", sep.o_proj)):
        mod.kernel[...] = jnp.asarray(w[n])
        mod.bias[...] = jnp.asarray(w[n + "b"])
    return sep


@pytest.fixture(scope="module")
def runs():
    """Every case (plus the ViT case in the separate layout) through every path, in one jitted call: per case
    ``(module, (out_none, out_all, p_all, out_rows, p_rows, keys, call_out, call_keys, call_probs))``."""
    modules = {name: _build(lambda o=opts: Attention(C, 4, rngs=nnx.Rngs(0), **o), seed=i + 1)
               for i, (name, (opts, *_)) in enumerate(sorted(CASES.items()))}
    modules["vit_as_separate"] = _separate_copy(modules["vit"])
    setup = dict(CASES, vit_as_separate=CASES["vit"])
    graphdefs, states = {}, {}
    for name, m in modules.items():
        graphdefs[name], states[name] = nnx.split(m)

    @jax.jit
    def run_all(states, x, pos):
        out = {}
        for name, st in states.items():
            m = nnx.merge(graphdefs[name], st)
            _, _, mask, bias = setup[name]
            kw = dict(mask=None if mask is None else jnp.asarray(mask)[:, None],
                      bias=None if bias is None else jnp.asarray(bias)[:, None, None, :])
            p_ids = pos if m.rope_theta is not None else None
            q, k, v = m.project(x, p_ids)
            o0, _ = m.attend(q, k, v, **kw)
            o1, p1 = m.attend(q, k, v, probs="all", **kw)
            o2, p2 = m.attend(q, k, v, probs="rows", rows=ROWS, **kw)
            y, k2, p3 = m(x, positions=p_ids, need_probs=True, **kw)
            out[name] = (m.out(o0), m.out(o1), p1, m.out(o2), p2, k, y, k2, p3)
        return out

    res = run_all(states, jnp.asarray(X), jnp.asarray(POS))
    return {name: (modules[name], res[name]) for name in modules}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_loop_reference_on_every_path(runs, name):
    _, theta, mask, bias = CASES[name]
    attn, (out_none, out_all, p_all, out_rows, p_rows, keys, y, k2, p3) = runs[name]
    ref, ref_p = ref_attention_module(X.astype(np.float64), _weights(attn), heads=4, kv_heads=attn.num_kv_heads,
                                      head_dim=attn.head_dim, positions=POS, theta=theta, mask=mask, bias=bias)
    np.testing.assert_allclose(out_all, ref, atol=2e-5)
    np.testing.assert_allclose(p_all, ref_p, atol=2e-6)
    np.testing.assert_allclose(out_none, ref, atol=2e-5)    # fused path: same maths
    np.testing.assert_array_equal(out_rows, out_none)       # "rows" keeps the fused output ...
    np.testing.assert_allclose(p_rows, ref_p[:, :, -ROWS:], atol=2e-6)  # ... and adds the last rows' probabilities
    assert keys.shape == (B, T, attn.num_kv_heads, attn.head_dim)
    np.testing.assert_allclose(np.asarray(p_all).sum(-1), 1.0, atol=1e-5)
    # __call__ is project -> attend -> out
    np.testing.assert_array_equal(y, out_all)
    np.testing.assert_array_equal(p3, p_all)
    np.testing.assert_array_equal(k2, keys)


def test_fused_and_separate_layouts_agree_with_the_same_weights(runs):
    for a, b in zip(runs["vit"][1], runs["vit_as_separate"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_mlp_activations_match_reference_and_keep_their_names():
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    gelu = np.vectorize(lambda h: 0.5 * h * (1 + math.erf(h / math.sqrt(2))))
    names = {"gelu": {"fc1", "fc2"}, "quick_gelu": {"fc1", "fc2"}, "swiglu": {"gate_proj", "up_proj", "down_proj"}}
    mlps = {act: _build(lambda a=act: Mlp(8, 12, act=a, bias=a != "swiglu", rngs=nnx.Rngs(0)), seed=5)
            for act in names}
    graphdefs = {act: nnx.graphdef(m) for act, m in mlps.items()}
    outs = jax.jit(lambda states, x: {a: nnx.merge(graphdefs[a], s)(x) for a, s in states.items()})(
        {a: nnx.state(m) for a, m in mlps.items()}, jnp.asarray(x))
    for act, mlp in mlps.items():
        p = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(mlp, nnx.Param))}
        assert {k.split(".")[0] for k in p} == names[act]
        if act == "swiglu":
            assert not any(k.endswith("bias") for k in p)
            g, u = x @ p["gate_proj.kernel"], x @ p["up_proj.kernel"]
            ref = (g / (1 + np.exp(-g)) * u) @ p["down_proj.kernel"]
        else:
            h = x @ p["fc1.kernel"] + p["fc1.bias"]
            h = gelu(h) if act == "gelu" else h / (1 + np.exp(-1.702 * h))
            ref = h @ p["fc2.kernel"] + p["fc2.bias"]
        np.testing.assert_allclose(outs[act], ref, rtol=1e-5, atol=1e-5)


def _paths(module):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_each_model_keeps_its_parameter_paths():
    from models.clip_vision import CLIPVision, CLIPVisionConfig
    from models.llama import Llama, LlamaConfig
    from models.vit import ViT, ViTConfig

    vit = _paths(nnx.eval_shape(lambda: ViT(ViTConfig(width=8, depth=1, mlp_dim=16, heads=2, patch_size=4,
                                                       image_size=8), rngs=nnx.Rngs(0))))
    assert {"blocks.0.attn.qkv.kernel", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.kernel", "blocks.0.mlp.fc1.bias",
            "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.scale"} <= vit
    assert not any("norm_pre" in p for p in vit)
    lm = _paths(nnx.eval_shape(lambda: Llama(LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=2,
                                                         num_kv_heads=1, mlp_dim=8), rngs=nnx.Rngs(0))))
    layer = {p[len("layers.0."):] for p in lm if p.startswith("layers.0.")}
    assert layer == {f"self_attn.{n}_proj.kernel" for n in "qkvo"} | {
        f"mlp.{n}_proj.kernel" for n in ("gate", "up", "down")} | {
        "input_layernorm.scale", "post_attention_layernorm.scale"}
    cfg = CLIPVisionConfig(image_size=8, patch_size=4, dim=8, num_layers=2, num_heads=2, mlp_dim=16)
    clip = nnx.eval_shape(lambda: CLIPVision(cfg, rngs=nnx.Rngs(0)))
    paths = _paths(clip)
    assert {"vit.norm_pre.scale", "vit.patch_embed.proj.kernel", "vit.blocks.1.mlp.fc2.bias"} <= paths
    assert "vit.patch_embed.proj.bias" not in paths
    assert clip.vit.blocks[0].mlp.act == "quick_gelu" and cfg.layers_run == 1 and cfg.vit.ln_eps == 1e-5


def test_named_errors():
    with pytest.raises(ValueError, match="fused_qkv"):
        Attention(8, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(8, 4, num_kv_heads=3, fused_qkv=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="act must be"):
        Mlp(8, 8, act="relu", rngs=nnx.Rngs(0))
    rope = nnx.eval_shape(lambda: Attention(8, 2, fused_qkv=False, rope_theta=10.0, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="positions"):
        rope(jnp.zeros((1, 2, 8)))
    q = k = v = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="probs must be"):
        rope.attend(q, k, v, probs="some")
    with pytest.raises(ValueError, match="rows >= 1"):
        rope.attend(q, k, v, probs="rows")
    from models.vit import ViTConfig
    with pytest.raises(ValueError, match="mlp_act"):
        ViTConfig(mlp_act="swiglu")
