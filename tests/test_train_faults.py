"""Issue 15, "nothing lost, nothing silent": every exit of a run finishes its checkpoint saves, a resume with a
changed config is refused (or recorded), metrics.jsonl never repeats a step, train.py's log lines reach stderr,
and training fields that cannot work are refused before anything is built.

Three real runs of a 1-block ViT chain through fixtures (each copies the previous workdir):
A. from scratch in a workdir holding a stale metrics.jsonl and config.json, 3 steps, the end-of-run evaluation
   raises; B. ``python train.py`` resumes A and is killed (``train.crash_after_step``) after step 5, with a
   checkpoint at 4; C. resumes B with a changed ``optim.lr`` under ``train.allow_config_change=True``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

import configs
import train
from training import resume
from training.errors import ConfigMismatchError, TrainingInterrupted
from training.trainer import sigterm_raises
from tests.tree_asserts import assert_trees_bitwise

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.eval_limit=32", "data.num_threads=1",
    "model.vit.width=32", "model.vit.depth=1", "model.vit.mlp_dim=64", "model.vit.heads=2",
    "model.vit.patch_size=4", "model.vit.image_size=16", "model.vit.num_classes=4", "model.reduction.r=2",
    "train.batch_size=16", "train.eval_batch_size=32", "train.progress=False", "train.tensorboard=False",
    "train.eval_every=0", "optim.warmup_steps=2", "optim.lr=3e-3", "checkpoint.use_async=True",
]


def tiny_cfg(*extra):
    return configs.load_config("vit_fmnist", TINY + list(extra))


def records(path):
    return [json.loads(x) for x in pathlib.Path(path).read_text().splitlines() if x.strip()]


def step_dirs(work):
    return sorted(p.name for p in (work / "checkpoints").iterdir() if p.is_dir())


def no_model(cfg):
    raise AssertionError("the model was built (the config should have been refused before)")


# -- A: the end-of-run evaluation raises ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    work = tmp_path_factory.mktemp("a")
    (work / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')       # an earlier run's history
    (work / "config.json").write_text('{"stale": true}\n')

    def broken_eval(self, *a, **k):
        raise RuntimeError("evaluation exploded")

    cfg = tiny_cfg("train.steps=3", "checkpoint.every=0", "train.log_every=0", "train.eval_at_end=True")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Trainer, "evaluate", broken_eval)
        with pytest.warns(RuntimeWarning, match="moved it to metrics"):
            with pytest.raises(RuntimeError, match="evaluation exploded"):
                train.Trainer(cfg, work).train()
    listing = step_dirs(work)   # read at once: no background save may still be running
    return work, listing


def test_final_checkpoint_survives_a_failing_evaluation(run_a):
    work, listing = run_a
    assert listing == ["3"], listing                      # no 3.orbax-checkpoint-tmp left to be deleted
    assert not list((work / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
    # checkpoint.every=0 and train.log_every=0: only at the end
    assert [r["step"] for r in records(work / "metrics.jsonl")] == [3]
    # the stale files of the checkpoint-less earlier run were moved aside, not appended to or overwritten
    old = [p for p in work.glob("metrics.*.jsonl") if p.name != "metrics.dropped.jsonl"]
    assert len(old) == 1 and records(old[0]) == [{"step": 99, "loss": 1.0}]
    assert [json.loads(p.read_text()) for p in work.glob("config.2*.json")] == [{"stale": True}]
    assert json.loads((work / "config.json").read_text())["optim"]["lr"] == 3e-3


# -- B: train.py resumes A and is killed after step 5 -----------------------------------------------------------


@pytest.fixture(scope="module")
def run_b(run_a, tmp_path_factory):
    work = tmp_path_factory.mktemp("b") / "w"
    shutil.copytree(run_a[0], work)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "vit_fmnist", "--workdir", str(work), *TINY,
           "train.steps=6", "train.log_every=1", "checkpoint.every=4", "train.crash_after_step=5",
           "train.eval_at_end=False"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    return work, proc.stderr


def test_train_py_log_lines_reach_stderr(run_b):
    work, err = run_b
    assert "tokenreduce.train: resumed from step 3" in err
    assert "tokenreduce.train: model vit: 0.01M parameters" in err
    assert "1 device(s) cpu" in err and "steps 3 -> 6" in err


def test_resume_with_allowed_changes_keeps_config_json(run_a, run_b):
    work, _ = run_b
    assert (work / "config.json").read_text() == (run_a[0] / "config.json").read_text()
    again = json.loads((work / "config.resume-3.json").read_text())   # steps, log_every, ... changed: recorded
    assert again["train"]["steps"] == 6 and again["checkpoint"]["every"] == 4
    assert [r["step"] for r in records(work / "metrics.jsonl")] == [3, 4, 5]
    assert step_dirs(work) == ["3", "4"]


# -- C: resume B with a changed learning rate -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_c(run_b, tmp_path_factory):
    work = tmp_path_factory.mktemp("c") / "w"
    shutil.copytree(run_b[0], work)
    tr = train.Trainer(tiny_cfg("train.steps=6", "train.log_every=1", "checkpoint.every=0", "optim.lr=1e-3",
                                "train.eval_at_end=False", "train.allow_config_change=True"), work)
    tr.train()
    return work, tr


def test_resumed_metrics_have_no_duplicate_steps(run_c):
    work, tr = run_c
    assert tr.resumed_from == 4
    steps = [r["step"] for r in records(work / "metrics.jsonl")]
    assert steps == [3, 4, 5, 6]             # step 5 of the killed run was logged again, once
    dropped = records(work / "metrics.dropped.jsonl")
    assert dropped[0]["dropped_on_resume_from_step"] == 4 and [r["step"] for r in dropped[1:]] == [5]
    assert step_dirs(work) == ["3", "4", "6"]


def test_explicit_override_resumes_and_records_the_new_config(run_a, run_c):
    work, _ = run_c
    assert (work / "config.json").read_text() == (run_a[0] / "config.json").read_text()   # never overwritten
    assert json.loads((work / "config.json").read_text())["optim"]["lr"] == 3e-3
    assert json.loads((work / "config.resume-4.json").read_text())["optim"]["lr"] == 1e-3
    assert (work / "config.resume-3.json").exists()                                        # B's, kept


# -- refusals (nothing built) ---------------------------------------------------------------------------------


def test_changed_config_is_refused_on_resume(run_a, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(run_a[0], work)
    before = (work / "config.json").read_text()
    cfg = tiny_cfg("train.steps=6", "optim.lr=1e-3", "model.reduction.r=3", "seed=7")
    with pytest.raises(ConfigMismatchError) as info:
        train.Trainer(cfg, work, model_fn=no_model).train()
    msg = str(info.value)
    for field in ("optim.lr: 0.003 -> 0.001", "model.reduction.r: 2 -> 3", "seed: 0 -> 7",
                  "train.allow_config_change=True", "checkpoint step 3"):
        assert field in msg, msg
    assert "train.steps" not in msg.split("Fields that may change")[0]    # an allowed change is not listed
    assert (work / "config.json").read_text() == before
    assert not list(work.glob("config.resume-*.json"))


def test_config_diff_allows_only_the_listed_fields():
    saved = tiny_cfg().to_dict()
    new = tiny_cfg("train.steps=9", "train.log_every=3", "checkpoint.keep=5", "train.crash_after_step=2").to_dict()
    assert resume.check_resume_config(saved, new, step=1, workdir=pathlib.Path("."), allow=False)
    with pytest.raises(ConfigMismatchError, match=r"optim\.weight_decay"):
        resume.check_resume_config(saved, tiny_cfg("optim.weight_decay=0.1").to_dict(), step=1,
                                   workdir=pathlib.Path("."), allow=False)


@pytest.mark.parametrize("override, field", [
    ("train.steps=-5", "train.steps"), ("train.steps=0", "train.steps"), ("train.log_every=-1", "train.log_every"),
    ("checkpoint.every=-1", "checkpoint.every"), ("checkpoint.keep=0", "checkpoint.keep"),
    ("train.batch_size=0", "train.batch_size"), ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.eval_every=-2", "train.eval_every"), ("optim.lr=-1.0", "optim.lr"),
    ("train.profile_steps=(5, 2)", "train.profile_steps"),
])
def test_values_that_cannot_work_are_refused_before_the_model_is_built(override, field, tmp_path):
    t0 = time.time()
    with pytest.raises(configs.ConfigError, match=rf"{field}=.*out of range.*(>=|must)"):
        train.Trainer(tiny_cfg(override), tmp_path, model_fn=no_model).train()
    assert time.time() - t0 < 5
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_zero_every_means_only_at_the_end_and_presets_pass():
    configs.check_train_config(tiny_cfg("train.log_every=0", "checkpoint.every=0", "train.eval_every=0"))
    for name in configs.available_configs():
        if not name.startswith("eval"):
            configs.check_train_config(configs.load_config(name))


# -- pieces ------------------------------------------------------------------------------------------------------


def test_sigterm_raises_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == before
    assert issubclass(TrainingInterrupted, KeyboardInterrupt)   # not swallowed by `except Exception`


def test_prepare_metrics_cuts_back_to_the_restored_step(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    resume.prepare_metrics(m, 2)
    assert [r["step"] for r in records(m)] == [1, 2]
    lines = (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["dropped_on_resume_from_step"] == 2
    assert [json.loads(x)["step"] for x in lines[1:3]] == [3, 4] and lines[3] == '{"step": 5, "lo'


# -- integrity covers every restored byte (item 2) and the data's class count (item 6) --------------------------


def resave(ckdir, step, mutate):
    """Rewrite checkpoint ``step`` with ``mutate(state, data_iter, meta) -> (state, data_iter, meta)`` applied and
    the saved ``meta`` (with its integrity record) kept unless ``mutate`` changes it: files stay readable."""
    import orbax.checkpoint as ocp

    names = ("state", "data_iter", "meta")
    mgr = ocp.CheckpointManager(pathlib.Path(ckdir).resolve(), item_names=names)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                    data_iter=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    state, data_iter, meta = mutate(out["state"], dict(out["data_iter"]), dict(out["meta"]))
    mgr.close()
    shutil.rmtree(pathlib.Path(ckdir) / str(step))
    mgr = ocp.CheckpointManager(pathlib.Path(ckdir).resolve(), item_names=names)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=ocp.args.JsonSave(data_iter),
                                           meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    mgr.close()


def random_bytes_in_adam_mu(state, data_iter, meta):
    """4 KB of random bytes over the first Adam first-moment array that large (as in the issue)."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_leaves_with_path(state["opt"])
    path = next(p for p, x in flat if "mu" in jax.tree_util.keystr(p) and np.asarray(x).nbytes >= 4096)

    def scribble(p, x):
        if p != path:
            return x
        raw = bytearray(np.asarray(x).tobytes())
        raw[:4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        return np.frombuffer(bytes(raw), np.asarray(x).dtype).reshape(np.shape(x))

    return dict(state, opt=jax.tree_util.tree_map_with_path(scribble, state["opt"])), data_iter, meta


def test_damaged_adam_moments_are_detected_and_quarantined(run_a, tmp_path):
    """Before, only the parameters were fingerprinted: 4 KB of random bytes in Adam's first moment resumed
    silently (the loss diverged later). Now a named CheckpointError, or quarantine + fallback."""
    from training.checkpoints import Checkpoints

    work = tmp_path / "w"
    shutil.copytree(run_a[0], work)
    resave(work / "checkpoints", 3, random_bytes_in_adam_mu)
    ck = Checkpoints(work / "checkpoints", keep=3, use_async=False)
    try:
        with pytest.raises(train.CheckpointError, match=r"step 3 .*integrity fingerprint mismatch in the optimizer "
                                                        r"state.*'opt/.*mu.*checkpoint\.fallback"):
            ck.restore(None, fallback=False)
        with pytest.warns(RuntimeWarning, match=r"optimizer state.*moved it to .*damaged_checkpoints.*no older"):
            assert ck.restore(None, fallback=True) is None
    finally:
        ck.close()
    assert len(list((work / "damaged_checkpoints").iterdir())) == 1 and step_dirs(work) == []


@pytest.mark.long
def test_damaged_adam_moments_fall_back_and_resume_bitwise(run_c, tmp_path):
    """Through the trainer: the damaged newest step is set aside and steps 5-6 redone from step 4, bitwise."""
    src, tr_c = run_c
    work = tmp_path / "w"
    shutil.copytree(src, work)
    resave(work / "checkpoints", 6, random_bytes_in_adam_mu)
    cfg = ("train.steps=6", "checkpoint.every=0", "optim.lr=1e-3", "train.eval_at_end=False",
           "train.allow_config_change=True")
    with pytest.warns(RuntimeWarning, match=r"optimizer state.*falling back to step 4"):
        tr = train.Trainer(tiny_cfg(*cfg), work)
        tr.train()
    assert tr.resumed_from == 4
    assert_trees_bitwise(tr.state, tr_c.state)


@pytest.fixture(scope="module")
def restored_a(run_a):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((run_a[0] / "checkpoints").resolve(), item_names=("state", "data_iter", "meta"))
    out = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data_iter=ocp.args.JsonRestore(),
                                                 meta=ocp.args.JsonRestore()))
    mgr.close()
    import jax
    return jax.device_get(out["state"]), dict(out["data_iter"]), dict(out["meta"])   # numpy: one compile


def test_every_restored_item_is_covered_by_the_integrity_record(restored_a):
    """One flipped bit of a parameter, Adam's step count + 1, the data-iterator position or a config value
    changed: each a named CheckpointError (the checkpoint as saved passes)."""
    import copy

    import jax
    import numpy as np

    from training.checkpoints import check_integrity

    state, data_iter, meta = restored_a
    check_integrity(state, data_iter, meta)

    def bump(tree, pick, change):
        leaves, tdef = jax.tree.flatten(tree)
        i = next(j for j, x in enumerate(leaves) if pick(np.asarray(x)))
        leaves[i] = change(np.asarray(leaves[i]).copy())
        return jax.tree.unflatten(tdef, leaves)

    def flip(x):
        x.reshape(-1).view(np.uint32)[0] ^= 1
        return x

    cases = {
        "the parameters": (dict(state, params=bump(state["params"], lambda x: x.dtype == np.float32, flip)),
                           data_iter, meta),
        "the optimizer state": (dict(state, opt=bump(state["opt"], lambda x: x.dtype == np.int32, lambda x: x + 1)),
                                data_iter, meta),
        "data_iter": (state, json.loads(json.dumps(data_iter).replace('"next_index": ', '"next_index": 1')), meta),
        "meta": (state, data_iter, copy.deepcopy(meta)),
    }
    cases["meta"][2]["config"]["optim"]["lr"] = 0.5
    assert '"next_index": 1' in json.dumps(cases["data_iter"][1])
    for where, args in cases.items():
        with pytest.raises(train.CheckpointError, match=f"integrity fingerprint mismatch in {where}"):
            check_integrity(*args)
    missing = dict(meta)
    del missing["integrity"]
    with pytest.raises(train.CheckpointError, match="no integrity record"):
        check_integrity(state, data_iter, missing)


def test_class_count_must_match_the_head(tmp_path):
    from PIL import Image

    import numpy as np

    for c in ("cats", "dogs"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "train" / c / "0.png")
    cfg = tiny_cfg("data.name=image_folder", f"data.path={tmp_path / 'data'}", "train.steps=1")
    with pytest.raises(configs.ConfigError, match=r"has 2 classes \['cats', 'dogs'\] but the model's head has "
                                                  r"model.vit.num_classes=4"):
        train.Trainer(cfg, tmp_path / "w", model_fn=no_model).train()
    with pytest.raises(configs.ConfigError, match=r"synthetic.*has 4 classes but .*num_classes=3"):
        train.Trainer(tiny_cfg("model.vit.num_classes=3", "train.steps=1"), tmp_path / "w2", model_fn=no_model).train()
    assert not (tmp_path / "w" / "config.json").exists()
