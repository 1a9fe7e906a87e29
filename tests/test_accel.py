"""Accelerator-facing behaviour of the models (issue 19, items 2-4): the attention kernel chosen per backend
(``implementation=None|"xla"|"cudnn"|"explicit"``), the reduced ViT's fused path against the explicit float32
softmax with proportional attention and invalid slots, bfloat16 compute against float32 with a stated tolerance,
and a smoke run of ``bench/bench_accel.py`` at its smallest size.

Tiny shapes: one depth-3 ViT whose layer 0 is ToMe (proportional attention from layer 1 on) and layer 1 ATP (a
capacity-padded method leaving invalid slots), so layer 2's fused attention carries the log-size bias and the
validity mask at once.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import reduction as R
from models.layers import Attention, choose_implementation, cudnn_refusal
from models.vit import ViT, make_forward

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = dict(width=32, depth=3, mlp_dim=64, heads=2, patch_size=8, image_size=32, num_classes=0)


def _model(seed=0, **changes):
    """A ViT of ``CFG`` (plus ``changes``) with seeded non-trivial weights, built without running its initialisers
    (eager initialisation costs seconds on this CPU); the same seed gives the same weights under any config."""
    model = nnx.eval_shape(lambda: ViT.from_config(dict(CFG, **changes)))
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(state)
    leaves = [jnp.asarray(rng.normal(size=l.shape) * (0.3 if len(l.shape) > 1 else 0.2)
                          + (1.0 if len(l.shape) == 1 else 0), l.dtype) for l in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


@pytest.fixture(scope="module")
def mixed():
    """``(model, reducers, images)``: ToMe r=2 with proportional attention at layer 0, ATP at layer 1."""
    model = _model(attn_implementation="xla")
    tome = R.build_layer_reducers(3, {"method": "tome", "r": 2, "layers": [0]})[0]
    atp = R.build_layer_reducers(3, {"method": "atp", "layers": [1], "theta": 0.9, "keep_ratio": 0.8})[1]
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    return model, (tome, atp, None), images


@pytest.fixture(scope="module")
def xla_out(mixed):
    model, reducers, images = mixed
    return make_forward(model, reducers)(images)


# -- the kernel per backend ------------------------------------------------------------------------------


def test_implementation_choice_on_this_backend_and_named_refusals():
    q = jnp.zeros((1, 6, 2, 64), jnp.bfloat16)
    k = jnp.zeros((1, 6, 2, 64), jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert choose_implementation(None, q, k, has_bias=True) == "xla"
        with pytest.raises(ValueError, match="implementation='cudnn' refused: cuDNN attention needs a CUDA GPU"):
            choose_implementation("cudnn", q, k, has_bias=False)
    assert choose_implementation("xla", q, k, has_bias=True) == "xla"
    assert choose_implementation("explicit", q, k, has_bias=True) == "explicit"
    # what cuDNN refuses, as seen on a GPU backend
    assert cudnn_refusal(q, k, has_bias=True, backend="gpu") is None
    assert "bfloat16 or float16" in cudnn_refusal(q.astype(jnp.float32), k.astype(jnp.float32), has_bias=False,
                                                  backend="gpu")
    assert "multiple of 8" in cudnn_refusal(q[..., :12], k[..., :12], has_bias=False, backend="gpu")
    odd = jnp.zeros((1, 197, 2, 64), jnp.bfloat16)
    assert "even query and key counts" in cudnn_refusal(odd, odd, has_bias=True, backend="gpu")
    assert cudnn_refusal(odd, odd, has_bias=False, backend="gpu") is None
    with pytest.raises(ValueError, match="implementation must be one of"):
        Attention(8, 2, implementation="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        ViT.from_config(CFG, attn_implementation="cuda")


# -- the fused path of a reduced model equals the explicit softmax -----------------------------------------


def test_reduced_block_fused_equals_explicit_softmax():
    """One ViT block on a reduced state (merged tokens of sizes 1-4, so a log-size key bias, and invalid slots, so a
    key mask), with proportional attention: the fused XLA kernel equals the explicit float32 softmax, and the bias
    and the mask both move the output far beyond the tolerance (so the comparison sees them)."""
    rng = np.random.default_rng(0)
    b, t = 2, 12
    x = jnp.asarray(rng.normal(size=(b, t, CFG["width"])), jnp.float32)
    sizes = jnp.asarray(rng.integers(1, 5, (b, t)), jnp.float32)
    valid = jnp.asarray(np.arange(t)[None] < np.array([[9], [11]]))
    blocks = {impl: _model(attn_implementation=impl).blocks[0] for impl in ("xla", "explicit")}
    parts = {k: nnx.split(v) for k, v in blocks.items()}

    @jax.jit
    def run(params, x, sizes, valid):
        out = {}
        for impl, (gdef, _) in parts.items():
            blk = nnx.merge(gdef, params)
            st = R.init_state(x).replace(sizes=sizes, valid=valid)
            out[impl] = blk(st, prop_attn=True).x
            if impl == "xla":
                out["no_bias"] = blk(R.init_state(x).replace(valid=valid)).x
                out["no_mask"] = blk(R.init_state(x).replace(sizes=sizes), prop_attn=True).x
        return out

    out = run(parts["xla"][1], x, sizes, valid)
    np.testing.assert_allclose(np.asarray(out["xla"]), np.asarray(out["explicit"]), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out["no_bias"] - out["xla"]))) > 1e-2
    assert float(jnp.max(jnp.abs(out["no_mask"] - out["xla"])[:, :9])) > 1e-2


@pytest.mark.long
def test_reduced_vit_fused_equals_explicit_softmax(mixed, xla_out):
    model, reducers, images = mixed
    out_x, aux_x = xla_out
    out_e, aux_e = make_forward(_model(attn_implementation="explicit"), reducers)(images)
    # the case is the intended one: merged tokens (sizes > 1, so a log-size bias) and invalid slots from ATP
    assert float(jnp.max(aux_x["sizes"])) > 1.0
    assert aux_x["valid"] is not None and not bool(jnp.all(aux_x["valid"]))
    assert bool(jnp.all(aux_x["valid"] == aux_e["valid"]))
    np.testing.assert_array_equal(np.asarray(aux_x["sizes"]), np.asarray(aux_e["sizes"]))
    np.testing.assert_allclose(np.asarray(out_x), np.asarray(out_e), rtol=1e-5, atol=1e-5)


@pytest.mark.long
def test_the_bias_and_mask_move_the_output_beyond_the_tolerance(mixed, xla_out):
    """The tolerance above is meaningful: without proportional attention, or with the invalid slots attended, the
    output moves by far more than 1e-5."""
    model, reducers, images = mixed
    out_x, _ = xla_out
    no_prop = R.build_layer_reducers(3, {"method": "tome", "r": 2, "layers": [0], "prop_attn": False})[0]
    out_n, _ = make_forward(model, (no_prop,) + reducers[1:])(images)
    assert float(jnp.max(jnp.abs(out_n - out_x))) > 1e-3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a CUDA GPU")
def test_cudnn_attention_with_key_bias_and_mask_equals_explicit():
    rng = np.random.default_rng(0)
    attn = Attention(64, 1, rngs=nnx.Rngs(0), implementation="cudnn")
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 1, 64)), jnp.bfloat16) for _ in range(3))
    bias = R.combine_biases(R.proportional_attention_bias(jnp.asarray(rng.integers(1, 4, (2, 16)), jnp.float32)),
                            R.key_mask_bias(jnp.arange(16)[None].repeat(2, 0) < 12))
    o = jax.jit(lambda q, k, v, b: attn.fused(q, k, v, bias=b))(q, k, v, bias)
    ref = Attention(64, 1, rngs=nnx.Rngs(0), implementation="explicit").fused(q, k, v, bias=bias)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref, np.float32), atol=2e-2)


# -- bfloat16 compute against float32 ------------------------------------------------------------------


def test_bf16_reduced_vit_within_tolerance_of_float32():
    """bf16 compute (parameters float32) against float32, same weights, ToMe r=2 at layer 0 of a two-block ViT
    (proportional attention in layer 1). Stated tolerance: the pooled features within 5% of their largest magnitude
    and cosine >= 0.995 per image; sizes stay float32 and the token counts are the float32 run's."""
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    reducers = tuple(R.build_layer_reducers(2, {"method": "tome", "r": 2, "layers": [0]}))
    gdefs = {dt: nnx.split(_model(attn_implementation="xla", depth=2, dtype=dt))
             for dt in (jnp.float32, jnp.bfloat16)}

    @jax.jit                                   # both in one compile
    def run(params, images):
        return {jnp.dtype(dt).name: nnx.merge(g, params)(images, reducers=reducers) for dt, (g, _) in gdefs.items()}

    got = run(gdefs[jnp.float32][1], images)
    (out32, aux32), (out16, aux16) = got["float32"], got["bfloat16"]
    assert float(jnp.max(aux32["sizes"])) > 1.0
    assert out16.dtype == jnp.bfloat16 and aux16["sizes"].dtype == jnp.float32
    assert aux16["sizes"].shape == aux32["sizes"].shape
    a, b = np.asarray(out16, np.float32), np.asarray(out32, np.float32)
    assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(b))
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.all(cos >= 0.995), cos


@pytest.mark.long
def test_reducer_plans_read_bf16_metrics_in_float32():
    """ToMe, PiToMe and DART given the same metric values as bfloat16 and as float32 make the same plan: their
    similarities are computed in float32 whatever the input dtype (a bf16 similarity would reorder near ties)."""
    rng = np.random.default_rng(0)
    b, t, c = 2, 33, 32
    x = jnp.asarray(rng.normal(size=(b, t, c)), jnp.bfloat16).astype(jnp.float32)   # bf16-exact values
    specs = [{"method": "tome", "r": 8}, {"method": "pitome", "keep_ratio": 0.7},
             {"method": "dart", "keep_ratio": 0.5, "layers": [1]}]

    @jax.jit
    def plans(x16):
        out = []
        for spec in specs:
            red = R.build_layer_reducers(2, spec)[1]
            for xx in (x16.astype(jnp.float32), x16):
                info = R.LayerInfo(layer=1, num_layers=2, num_protected=1, hidden=xx, metric=xx, keys=xx)
                st = red(R.init_state(xx), info)
                out.append((st.sizes, st.positions))
        return out

    got = plans(x.astype(jnp.bfloat16))
    for i in range(0, len(got), 2):
        (s32, p32), (s16, p16) = got[i], got[i + 1]
        assert s16.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(s32), np.asarray(s16), err_msg=specs[i // 2]["method"])
        np.testing.assert_array_equal(np.asarray(p32), np.asarray(p16), err_msg=specs[i // 2]["method"])


# -- bench/bench_accel.py ----------------------------------------------------------------------------------


def _bench():
    sys.path.insert(0, str(REPO))
    from bench import bench_accel

    return bench_accel


def test_bench_accel_time_guard_records_skips_and_writes_both_files(tmp_path):
    """With no time left every section is recorded as skipped by the guard (nothing is silently dropped), and the
    JSON and the markdown are written."""
    out = tmp_path / "accel.json"
    assert _bench().main(["--smoke", "--budget", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["sections"]) == {"vit", "dtype", "timm", "ops", "profile", "eager", "vlm"}
    assert all(v["skipped"].startswith("time guard") for v in res["sections"].values())
    assert "## vit" in out.with_suffix(".md").read_text()


def test_bench_accel_hlo_summary_reads_dot_operand_and_result_types():
    """A bf16 x bf16 -> f32 dot and its f32 -> bf16 convert are named with their operand and result types."""
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    a = jnp.ones((8, 16), jnp.bfloat16)
    got = _bench().hlo_summary(f.lower(a, a.T).compile())
    assert got.get("dot(bf16,bf16) -> f32") == 1, got
    assert got.get("convert f32 -> bf16") == 1, got


@pytest.mark.long   # ~45 s: the accelerator benchmark's command, CI-sized (the attention and dtype checks stay default)
def test_bench_accel_smoke_run_has_no_section_errors(tmp_path):
    out = tmp_path / "accel.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_accel.py"), "--smoke", "--budget", "600",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("vit", "dtype", "timm", "ops", "profile", "eager"):
        assert "error" not in res["sections"][name] and "skipped" not in res["sections"][name], name
    vit = {r["method"]: r for r in res["sections"]["vit"]["rows"]}
    assert vit["none"]["flop_ratio"] == 1.0 and vit["tome_r2"]["flop_ratio"] > 1.0
    assert res["sections"]["profile"]["files"]


def test_eval_backbones_read_compute_dtype_with_float32_when_absent():
    import ml_collections

    from evaluation.builtin import _compute_dtype

    assert _compute_dtype(ml_collections.ConfigDict(dict(image_size=56))) is None
    assert _compute_dtype(ml_collections.ConfigDict(dict(compute_dtype="bfloat16"))) == jnp.bfloat16
    with pytest.raises(ValueError, match="compute_dtype must be 'float32' or 'bfloat16'"):
        _compute_dtype(ml_collections.ConfigDict(dict(compute_dtype="fp16")))
