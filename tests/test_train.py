"""Trainer tests: optimizer pieces, resume equality, damaged checkpoints, non-finite loss, 8 fake devices.

Runs use a tiny ViT (width 32, 2 blocks, 16x16 synthetic images, ToMe r=2 in the loop)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import train
from training.run_params import flat_paths
from tests.tree_asserts import assert_trees_bitwise

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.eval_limit=64", "data.num_threads=1",
    "model.vit.width=32", "model.vit.depth=2", "model.vit.mlp_dim=64", "model.vit.heads=2",
    "model.vit.patch_size=4", "model.vit.image_size=16", "model.vit.num_classes=4", "model.reduction.r=2",
    "train.batch_size=16", "train.eval_batch_size=32", "train.log_every=1", "train.progress=False",
    "train.eval_at_end=False", "optim.warmup_steps=2", "optim.lr=3e-3", "checkpoint.every=3",
    "checkpoint.use_async=True", "data.augment.crop_padding=1", "data.augment.flip=True",
]


def tiny_cfg(*extra):
    return configs.load_config("vit_fmnist", TINY + list(extra))


def params_of(trainer):
    return jax.tree.leaves(jax.device_get(trainer.state["params"]))


# -- optimizer -----------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine():
    cfg = tiny_cfg("train.steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.final_lr_ratio=0.1")
    s = train.learning_rate_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    # cosine from 1.0 at step 10 to 0.1 at step 100
    mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90))
    np.testing.assert_allclose(float(s(55)), mid, rtol=1e-5)
    np.testing.assert_allclose(float(s(100)), 0.1, rtol=1e-5)


def test_frozen_parameters_do_not_move_and_clipping_bounds_update():
    params = {"blocks": {"0": {"w": jnp.ones((4, 4))}, "1": {"w": jnp.ones((4, 4))}}, "head": {"bias": jnp.ones(4)}}
    cfg = tiny_cfg("optim.frozen=('^blocks/0/',)", "optim.warmup_steps=0", "optim.clip_norm=1e-3",
                   "optim.weight_decay=0.0", "train.steps=10")
    tx = train.build_optimizer(cfg, params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.max(jnp.abs(updates["blocks"]["0"]["w"]))) == 0.0
    assert float(jnp.min(jnp.abs(updates["blocks"]["1"]["w"]))) > 0.0
    labels = train.trainable_labels(params, tiny_cfg("optim.trainable=('head',)"))
    assert labels == {"blocks": {"0": {"w": "frozen"}, "1": {"w": "frozen"}}, "head": {"bias": "train"}}
    with pytest.raises(ValueError, match="freeze every parameter"):
        train.trainable_labels(params, tiny_cfg("optim.frozen=('.',)"))


def test_weight_decay_skips_biases_and_embeddings():
    params = {"pos_embed": jnp.ones((1, 4, 4)), "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    cfg = tiny_cfg("optim.warmup_steps=0", "optim.clip_norm=0.0", "optim.weight_decay=0.5", "train.steps=10",
                   "optim.lr=0.1")
    tx = train.build_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: only decay moves params
    assert float(jnp.max(jnp.abs(updates["pos_embed"]))) == 0.0
    assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0.0
    np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -0.1 * 0.5, rtol=1e-6)


# -- end-to-end: learning, resume, damaged checkpoints -------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 uninterrupted steps with checkpoints at 3 and 6."""
    work = tmp_path_factory.mktemp("ref")
    tr = train.Trainer(tiny_cfg("train.steps=6"), work)
    tr.train()
    return work, tr


def test_training_learns_and_logs(tmp_path, caplog):
    cfg = tiny_cfg("train.steps=30", "train.eval_every=15", "checkpoint.every=30", "optim.lr=5e-3",
                   "data.augment.crop_padding=0", "data.augment.flip=False", "train.label_smoothing=0.0",
                   "train.profile_steps=(3, 5)")
    tr = train.Trainer(cfg, tmp_path)
    with caplog.at_level(logging.INFO):
        summary = tr.train()
    log_text = caplog.text
    # the start of the log: the resolved config block by block and the tokens-per-layer table (ToMe r=2: 17 -> 15 -> 13)
    assert '  train: {' in log_text and '"profile_steps": [3, 5]' in log_text
    assert "layer  attention  mlp" in log_text and "      1         15   13  <- reduced" in log_text
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    evals = [x for x in lines if "eval_accuracy" in x]
    assert [e["step"] for e in evals] == [15, 30] and evals[-1]["eval_examples"] == 64
    assert summary["eval_accuracy"] > 0.5  # 4 classes: chance is 0.25
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["reduction"]["r"] == 2 and saved["train"]["steps"] == 30
    assert {"images_per_s", "grad_norm", "lr", "step_time_s"} <= set(lines[0])


def test_resume_after_damaged_checkpoint(reference_run, tmp_path):
    ref_dir, ref = reference_run
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / "6" / "state"
    files = [p for p in damaged.rglob("*") if p.is_file()]
    assert files
    for p in files:  # truncate and scribble over every file of the newest step's state
        p.write_bytes(b"\x00garbage")
    with pytest.raises(train.CheckpointError, match=r"step 6 .*damaged.*checkpoint.fallback"):
        train.Trainer(tiny_cfg("train.steps=6", "checkpoint.fallback=False"), tmp_path).train()
    with pytest.warns(RuntimeWarning, match="falling back to step 3"):
        tr = train.Trainer(tiny_cfg("train.steps=6"), tmp_path)
        tr.train()
    assert tr.resumed_from == 3
    assert_trees_bitwise(params_of(tr), params_of(ref))


def test_silently_corrupted_array_data_is_detected(reference_run, tmp_path):
    """Bit flips that leave files readable are caught by the parameter fingerprint."""
    ref_dir, _ = reference_run
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    cfg = tiny_cfg("train.steps=6", "checkpoint.fallback=False")
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((tmp_path / "checkpoints").resolve(), item_names=("state", "data_iter", "meta"))
    restored = mgr.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    restored = jax.tree.map(lambda x: x, restored)
    leaf_path, leaf = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(restored["params"])
                           if np.asarray(x).size > 10)
    meta = mgr.restore(6, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    mgr.close()
    mgr = ocp.CheckpointManager((tmp_path / "checkpoints").resolve(), item_names=("state", "data_iter", "meta"))
    bad = jax.tree_util.tree_map_with_path(lambda p, x: np.asarray(x) + 0.5 if p == leaf_path else x,
                                           restored["params"])
    mgr.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(restored, params=bad)),
                                        data_iter=ocp.args.JsonSave({"next_index": 96}),
                                        meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    mgr.close()
    with pytest.raises(train.CheckpointError, match="fingerprint"):
        train.Trainer(cfg, tmp_path).train()


@pytest.mark.long   # kills at several moments resume bitwise in tests/test_fault_injection.py (long too)
def test_killed_run_resumes_bitwise(reference_run, tmp_path):
    """A separate process is killed (os._exit) right after step 4; a new trainer resumes from step 3."""
    _, ref = reference_run
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "vit_fmnist", "--workdir", str(tmp_path),
           *TINY, "train.steps=6", "train.crash_after_step=4", "checkpoint.every=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    tr = train.Trainer(tiny_cfg("train.steps=6"), tmp_path)
    tr.train()
    assert tr.resumed_from == 3
    assert_trees_bitwise(params_of(tr), params_of(ref))


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    def nan_model(cfg):
        model = train.build_model(cfg)
        model.head.bias[...] = jnp.full_like(model.head.bias[...], jnp.nan)
        return model

    with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step 1 .*optim.lr"):
        train.Trainer(tiny_cfg("train.steps=4", "train.log_every=100", "model.vit.depth=1"), tmp_path, model_fn=nan_model).train()


def test_bf16_compute_trains(tmp_path):
    tr = train.Trainer(tiny_cfg("train.steps=2", "train.compute_dtype=bfloat16", "model.vit.depth=1"), tmp_path)
    tr.train()
    losses = [h["loss"] for h in tr.history if "loss" in h]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert all(np.asarray(x).dtype == np.float32 for x in params_of(tr))  # master weights stay float32


def test_skipped_records_are_counted(tmp_path):
    from data.sources import FileImageSource
    from PIL import Image

    items = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        if i % 10 == 3:
            p.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((16, 16, 3), 10 * (i % 4), np.uint8)).save(p)
        items.append((str(p), {"label": i % 4}))

    def source_fn(data_cfg, split):
        return FileImageSource(items, on_error=data_cfg.on_error)

    tr = train.Trainer(tiny_cfg("train.steps=2", "data.on_error=skip", "model.vit.depth=1"), tmp_path / "w", source_fn=source_fn)
    tr.train()
    assert tr.skip_stats.skipped >= 1 and all(f.endswith(("3.png",)) for f in tr.skip_stats.files)
    assert "skipped_records" in tr.history[0]
    with pytest.raises(Exception, match=r"3\.png"):
        train.Trainer(tiny_cfg("train.steps=2", "data.on_error=raise", "model.vit.depth=1"), tmp_path / "w2", source_fn=source_fn).train()


SHARDED = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import jax
    import numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    import configs, train
    from flax import nnx
    from training.run_params import flat_paths
    tiny = {tiny!r}
    out = {{}}
    common = ["train.steps=5", "checkpoint.every=100", "model.vit.depth=1", "model.vit.width=64",
              "model.vit.mlp_dim=256", "optim.warmup_steps=0", "data.augment.flip=False"]

    def model_fn(cfg):
        # A small random head instead of zeros: gradients reach the backbone from step 1, and no gradient is
        # exactly zero (with a zero head, a class-balanced batch gives a head-bias gradient of exactly 0,
        # whose float noise Adam scales up to ~lr, differently on each layout).
        m = train.build_model(cfg)
        m.head.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), m.head.kernel[...].shape)
        return m

    for name, extra in [("one", ["mesh.num_devices=1"]), ("eight", []), ("eight_fsdp", ["mesh.fsdp=True"])]:
        cfg = configs.load_config("vit_fmnist", tiny + common + extra)
        tr = train.Trainer(cfg, os.path.join({tmp!r}, name), model_fn=model_fn)
        tr.train()
        out[name] = [h["loss"] for h in tr.history if "loss" in h]
        out[name + "_grad_norm"] = [h["grad_norm"] for h in tr.history if "grad_norm" in h]
        shard = jax.tree_util.tree_leaves_with_path(tr.state["params"])
        out[name + "_sharded"] = sorted(jax.tree_util.keystr(p) for p, x in shard if not x.sharding.is_fully_replicated)
        np.savez(os.path.join({tmp!r}, name + ".npz"), **flat_paths(jax.device_get(tr.state["params"])))
    init = flat_paths(nnx.state(model_fn(cfg), nnx.Param))
    np.savez(os.path.join({tmp!r}, "init.npz"), **{{k: np.asarray(v) for k, v in init.items()}})
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.long   # three 5-step runs in subprocesses (1 device, 8 replicated, 8 FSDP); `pytest -m long` runs it
def test_eight_fake_devices_match_one_device(tmp_path):
    """5 steps on 8 fake CPU devices (replicated, and FSDP with the large backbone matrices sharded) end with
    the same parameters as one device, backbone included, and the backbone really moved (before, only the
    first 3 losses were compared: ln(4) on any layout, the zero-initialised head and the warm-up's lr=0 at
    step 1 leaving the backbone gradients zero)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SHARDED.format(root=str(ROOT), tiny=TINY, tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(out["one"]) == 5
    # Same data and seed; only the reduction order of the data-parallel mean differs (float32).
    np.testing.assert_allclose(out["eight"], out["one"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["eight_fsdp"], out["one"], rtol=2e-5, atol=2e-5)
    assert abs(out["one"][0] - np.log(4)) > 1e-3 and abs(out["one"][-1] - out["one"][0]) > 1e-3   # not ln(4)
    assert min(out["one_grad_norm"]) > 0
    assert out["eight_sharded"] == []
    sharded = out["eight_fsdp_sharded"]
    assert any("blocks" in k and "mlp" in k for k in sharded), sharded   # backbone matrices split over devices
    one, init = np.load(tmp_path / "one.npz"), np.load(tmp_path / "init.npz")
    backbone = [k for k in one.files if k.startswith("blocks/")]
    assert backbone and all(np.abs(one[k] - init[k]).max() > 1e-4 for k in backbone if "kernel" in k)
    for name in ("eight", "eight_fsdp"):
        other = np.load(tmp_path / f"{name}.npz")
        assert sorted(other.files) == sorted(one.files)
        for k in one.files:   # every parameter after 5 Adam steps, lr 3e-3 (updates ~1e-2): equal to ~1e-5
            np.testing.assert_allclose(other[k], one[k], rtol=0, atol=5e-5, err_msg=f"{name}: {k}")


@pytest.mark.long   # the same property on the chat-template path runs by default (tests/test_vlm_real.py)
def test_vlm_connector_training_only_moves_the_projector(tmp_path):
    cfg = configs.load_config("vlm_connector", [
        "train.steps=2", "train.batch_size=8", "train.progress=False", "train.eval_at_end=False",
        "data.size=64", "data.style=shapes", "model.plan.point=connector", "model.plan.method=pool",
        "model.plan.k=2", "optim.trainable=('^multi_modal_projector/',)", "optim.warmup_steps=0",
        "model.vlm.vision.num_layers=1", "model.vlm.text.num_layers=1"])
    tr = train.Trainer(cfg, tmp_path)
    tr.train()
    init = train.build_model(cfg)
    from flax import nnx

    before = flat_paths(nnx.state(init, nnx.Param))
    after = flat_paths(jax.device_get(tr.state["params"]))
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and all(k.startswith("multi_modal_projector/") for k in moved)
    assert all(np.isfinite(h["loss"]) for h in tr.history if "loss" in h)


def test_atp_preset_builds_a_vit_with_atp_and_its_task():
    """The atp_threshold preset is runnable now (training itself: tests/test_atp_training.py)."""
    cfg = configs.load_config("atp_threshold")
    model = train.build_model(cfg)
    assert model.learned_layers == (1,) and model.tokens_per_layer(28)[1] == (17, 12)   # 1 + floor(16 * 0.7)
    assert model.tokens_per_layer(28, train=True)[1] == (17, 17)                       # the soft gate keeps all
    module = model.learned["1"]
    assert (module.target_keep, module.budget_weight, module.budget_kind) == (0.5, 2.0, "abs")
    task = train.make_task(cfg, model)
    assert type(task) is train.ClassificationTask      # learned reducers need no task of their own
    assert train.lr_scale_pairs(cfg) == [("^learned/", 10.0)]


def test_pretrained_run_loads_every_parameter(reference_run):
    """model.pretrained=<workdir> copies the checkpoint's weights (it once silently kept fresh ones)."""
    work, tr = reference_run
    model = train.build_model(tiny_cfg("train.steps=6"))
    train.load_params_from_run(model, str(work))
    from flax import nnx
    loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert_trees_bitwise(loaded, params_of(tr))
