"""Learned ATP thresholds inside the ViT (models.vit.ViT.attach_atp, train.ATPClassificationTask) and the
train.py switches (transfer guard, TensorBoard, debug NaNs).

Models are tiny (width 32, 3 blocks, ATP after block 1, 28x28 images with patch 4 -> class token + 7x7
patches); Trainer runs use the synthetic 16x16 set for a few steps."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import configs
import reduction as R
import train
from training.run_params import flat_paths
from reduction import atp
from reduction.schedule import keep_count
from models.vit import ViT, make_forward

ARCH = dict(width=32, depth=3, mlp_dim=48, heads=2, patch_size=4, image_size=28, num_classes=4)
LAYER = 1
RATIO = 0.7
STRIDE = 2
T = 50                     # 1 + 7 * 7
CAPACITY = keep_count(T, RATIO, protected=1)  # 1 + floor(49 * 0.7) = 35


def _randomize(model, seed=0):
    """Non-trivial backbone weights so attention (hence the ATP scores) differs between tokens and images."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if path[0] == "atp":
            continue
        v = var[...]
        var[...] = jnp.asarray(rng.normal(size=v.shape) * (0.3 if v.ndim > 1 else 0.2) + (1.0 if v.ndim == 1 else 0),
                               v.dtype)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def atp_model(seed=0, init_theta=0.3, stride=STRIDE, randomize=True):
    model = ViT.from_config(ARCH, seed=seed)
    if randomize:
        _randomize(model, seed)
    return model.attach_atp([LAYER], capacity_ratio=RATIO, stride=stride, init_theta=init_theta, seed=seed)


def images(b=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 28, 28, 3)), jnp.float32)


def grid_positions(stride=STRIDE):
    return 1 + np.flatnonzero(atp.spatial_grid_mask(7, 7, stride))


def atp_probs(model, x):
    """Attention probabilities of the ATP block, computed independently of the hook."""
    state = R.init_state(model.embed(x))
    for blk in list(model.blocks)[:LAYER]:
        state = blk(state)
    blk = model.blocks[LAYER]
    _, _, probs = blk.attn(blk.norm1(state.x), need_probs=True)
    return probs


# -- the model ------------------------------------------------------------------------------------------------


def test_attach_puts_params_under_atp_and_validates():
    model = atp_model()
    _, params, _ = nnx.split(model, nnx.Param, ...)
    names = train.param_paths(params)
    atp_names = [n for n in names if "atp" in n]
    assert atp_names and all(n.startswith(f"atp/{LAYER}/") for n in atp_names)
    assert model.atp_layers == (LAYER,) and model.atp[str(LAYER)].capacity == CAPACITY
    assert model.tokens_per_layer(28) == [(T, T), (T, CAPACITY), (CAPACITY, CAPACITY)]
    assert model.tokens_per_layer(28, atp_mode="soft") == [(T, T)] * 3
    assert model.flops(28) < ViT.from_config(ARCH).flops(28)
    with pytest.raises(ValueError, match="atp_mode"):
        model(images(1), atp_mode="medium")
    with pytest.raises(ValueError, match="collide"):
        model(images(1), reducers={"method": "tome", "r": 2})
    with pytest.raises(ValueError, match="layers"):
        ViT.from_config(ARCH).attach_atp([5], capacity_ratio=0.5)
    with pytest.raises(ValueError, match="capacity_ratio"):
        ViT.from_config(ARCH).attach_atp([1], capacity_ratio=0.0)
    with pytest.raises(ValueError, match="class_token"):
        ViT.from_config(dict(ARCH, class_token=False, pool="avg")).attach_atp([1], capacity_ratio=0.5)


def test_soft_mode_keeps_every_token_and_masks_are_in_0_1():
    model = atp_model()
    out, aux = make_forward(model, atp_mode="soft")(images())
    assert out.shape == (4, 4) and aux["tokens"].shape[1] == T and aux["valid"] is None
    assert aux["tokens_per_layer"] == [(T, T)] * 3
    (m,), (cand,), (theta,) = aux["atp"]["masks"], aux["atp"]["candidates"], aux["atp"]["thetas"]
    m, cand = np.asarray(m), np.asarray(cand)
    assert m.shape == (4, T) and theta.shape == (4,)
    assert np.all(m > 0) and np.all(m <= 1)
    assert np.all(m[:, 0] == 1.0) and not cand[:, 0].any() and cand[:, 1:].all()
    assert np.all(m[:, grid_positions()] == 1.0)
    others = np.setdiff1d(np.arange(1, T), grid_positions())
    assert np.all(m[:, others] < 1.0) and np.ptp(m[:, others]) > 0.05  # a real, token-dependent soft mask
    # the gate is the size of each token for the later blocks (proportional attention)
    np.testing.assert_allclose(np.asarray(aux["sizes"]), np.maximum(m, 1e-6), rtol=1e-6)


def test_hard_mode_prunes_to_capacity_with_instance_counts_and_no_retrace():
    model = atp_model(init_theta=0.6)
    module = model.atp[str(LAYER)]
    rng = np.random.default_rng(3)  # instance-wise thresholds: give the output layer a random kernel
    module.fc2.kernel[...] = jnp.asarray(rng.normal(size=module.fc2.kernel.shape) * 0.5, jnp.float32)
    fn = make_forward(model, atp_mode="hard")
    x = images(6)
    out, aux = fn(x)
    assert aux["tokens"].shape[1] == CAPACITY and aux["valid"].shape == (6, CAPACITY)
    assert aux["tokens_per_layer"] == [(T, T), (T, CAPACITY), (CAPACITY, CAPACITY)]

    probs = atp_probs(model, x)
    cand = jnp.broadcast_to(jnp.arange(T) >= 1, (6, T))
    self_r = atp.received_attention(probs, cand.astype(jnp.float32), exclude_self=True)
    cross_r = atp.received_attention(probs[:, :, :1], jnp.ones((6, 1)))
    score = atp.vit_atp_scores(probs, num_protected=1, self_weight=module.self_weight)
    theta = module.threshold(score, self_r, cross_r, cand)
    np.testing.assert_allclose(np.asarray(aux["atp"]["thetas"][0]), np.asarray(theta), rtol=1e-5, atol=1e-6)
    forced = np.zeros(T, bool)
    forced[0] = True
    forced[grid_positions()] = True
    passing = (np.asarray(score) > np.asarray(theta)[:, None]) | forced[None]
    expected = np.minimum(passing.sum(-1), CAPACITY)
    valid = np.asarray(aux["valid"])
    np.testing.assert_array_equal(valid.sum(-1), expected)
    assert len(set(expected.tolist())) > 1 and expected.min() < CAPACITY  # really instance-adaptive
    np.testing.assert_array_equal(np.asarray(aux["atp"]["kept"][0]), expected)
    np.testing.assert_array_equal(np.asarray(aux["atp"]["kept_candidates"][0]), expected - 1)
    # every forced token survives, and the valid slots hold exactly the passing tokens (when under capacity)
    pos = np.asarray(aux["positions"])
    for b in range(6):
        kept = set(pos[b][valid[b]].tolist())
        assert set(np.flatnonzero(forced).tolist()) <= kept
        if passing[b].sum() <= CAPACITY:
            assert kept == set(np.flatnonzero(passing[b]).tolist())
    fn(images(6, seed=1))
    assert fn.num_traces() == 1


def test_untrained_hard_mode_equals_the_static_atp_reducer():
    """Zero-initialised output layer: theta = init_theta for every image, i.e. reduction.atp.ATPPrune."""
    model = atp_model(init_theta=0.45)
    plain = _randomize(ViT.from_config(ARCH, seed=0), 0)
    static = tuple(atp.ATPPrune(theta=0.45, keep_ratio=RATIO, stride=STRIDE) if i == LAYER else None
                   for i in range(ARCH["depth"]))
    x = images()
    out, aux = make_forward(model)(x)
    ref, ref_aux = make_forward(plain, static)(x)
    np.testing.assert_array_equal(np.asarray(aux["valid"]), np.asarray(ref_aux["valid"]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _split(model):
    graphdef, atp_params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("atp")), ...)
    return graphdef, atp_params, rest


def _soft(graphdef, atp_params, rest, x):
    return nnx.merge(graphdef, atp_params, rest)(x, atp_mode="soft")


def test_budget_and_task_gradients_reach_the_atp_parameters():
    model = atp_model()
    graphdef, p, rest = _split(model)
    x = images()

    def budget(p):
        aux = _soft(graphdef, p, rest, x)[1]["atp"]
        return atp.budget_loss(aux["masks"][0], 20.0, candidates=aux["candidates"][0])

    def task(p):  # the CE only sees the ATP parameters through the gate (log m key bias) of block 2
        logits = _soft(graphdef, p, rest, x)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)))

    for fn in (budget, task):
        g = jax.tree.leaves(jax.jit(jax.grad(fn))(p))
        assert g and all(np.all(np.isfinite(np.asarray(v))) for v in g)
        assert sum(float(jnp.sum(jnp.abs(v))) for v in g) > 1e-6, fn.__name__


def test_straight_through_soft_mode_gates_like_hard_mode_with_soft_gradients():
    model = ViT.from_config(ARCH, seed=0)
    _randomize(model, 0)
    model.attach_atp([LAYER], capacity_ratio=1.0, stride=STRIDE, straight_through=True, seed=0)
    x = images()
    soft_out, soft = make_forward(model, atp_mode="soft")(x)
    hard_out, hard = make_forward(model, atp_mode="hard")(x)
    m = np.asarray(soft["atp"]["masks"][0])
    assert set(np.unique(m)) <= {0.0, 1.0} and 0 < m.sum() < m.size           # a real 0/1 keep set
    # the forward gate is the hard keep set: same kept count as hard mode (capacity = every token)
    np.testing.assert_array_equal(m.sum(-1), np.asarray(hard["atp"]["kept"]).reshape(-1))
    np.testing.assert_allclose(np.asarray(soft["sizes"]), np.maximum(m, 1e-6), rtol=1e-6)
    # dropped tokens get a 1e-6 key weight, so the logits match hard pruning closely
    np.testing.assert_allclose(np.asarray(soft_out), np.asarray(hard_out), atol=1e-3)
    graphdef, p, rest = _split(model)

    def budget(p):
        aux = _soft(graphdef, p, rest, x)[1]["atp"]
        return atp.budget_loss(aux["masks"][0], 5.0, candidates=aux["candidates"][0])

    g = jax.tree.leaves(jax.jit(jax.grad(budget))(p))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g)
    assert sum(float(jnp.sum(jnp.abs(v))) for v in g) > 1e-6


def test_budget_only_steps_move_the_soft_kept_count_to_the_target():
    model = atp_model(init_theta=0.3)
    graphdef, p, rest = _split(model)
    x = images(8)
    target = 0.5 * 49

    @jax.jit
    def kept_and_loss(p):
        aux = _soft(graphdef, p, rest, x)[1]["atp"]
        m, cand = aux["masks"][0], aux["candidates"][0]
        kept = jnp.mean(jnp.sum(jnp.where(cand, m, 0.0), -1))
        return atp.budget_loss(m, target, candidates=cand, kind="square") / 49 ** 2, kept

    tx = optax.adam(0.05)
    opt = tx.init(p)
    grad = jax.jit(jax.grad(lambda p: kept_and_loss(p)[0]))
    before = abs(float(kept_and_loss(p)[1]) - target)
    assert before > 5.0  # starts well away from the target
    for _ in range(30):
        updates, opt = tx.update(grad(p), opt, p)
        p = optax.apply_updates(p, updates)
    after = abs(float(kept_and_loss(p)[1]) - target)
    assert after < 0.3 * before, (before, after)


# -- the trainer ----------------------------------------------------------------------------------------------

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.eval_limit=32", "data.num_threads=1",
    "model.vit.width=32", "model.vit.depth=2", "model.vit.mlp_dim=48", "model.vit.heads=2",
    "model.vit.patch_size=4", "model.vit.image_size=16", "model.vit.num_classes=4",
    "train.batch_size=8", "train.eval_batch_size=16", "train.log_every=1", "train.progress=False",
    "train.eval_at_end=True", "optim.warmup_steps=1", "checkpoint.every=100", "checkpoint.use_async=False",
]


def flat_params(params):
    return {k: np.asarray(v) for k, v in flat_paths(jax.device_get(params)).items()}


def test_trainer_trains_only_atp_and_logs_budget_and_kept_ratio(tmp_path):
    cfg = configs.load_config("atp_threshold", TINY + [
        "train.steps=3", "optim.trainable=('atp',)", "model.atp.layers=(0,)", "train.debug_nans=True"])
    seen = {}

    def model_fn(cfg):
        model = train.build_model(cfg)
        seen["init"] = flat_params(nnx.state(model, nnx.Param))
        seen["debug_nans"] = bool(jax.config.jax_debug_nans)
        return model

    before = bool(jax.config.jax_debug_nans)
    tr = train.Trainer(cfg, tmp_path, model_fn=model_fn)
    summary = tr.train()
    assert seen["debug_nans"] and bool(jax.config.jax_debug_nans) == before  # on for the run, then restored
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 3
    for rec in steps:
        assert {"budget_loss", "ce_loss", "theta_L0", "soft_keep_L0", "soft_keep"} <= set(rec)
        np.testing.assert_allclose(rec["loss"], rec["ce_loss"] + 2.0 * rec["budget_loss"], rtol=1e-5)
        assert 0.0 <= rec["budget_loss"] <= 1.0 and 0.0 < rec["theta_L0"] < 1.0
    ev = [x for x in lines if "eval_accuracy" in x]
    assert len(ev) == 1 and ev[0]["eval_examples"] == 32
    cap = keep_count(17, 0.7, protected=1)  # 16x16 images, patch 4: 1 + 16 tokens -> 12
    assert 0.0 < ev[0]["eval_kept_ratio_L0"] <= (cap - 1) / 16 + 1e-6
    assert 1.0 < ev[0]["eval_kept_tokens_L0"] <= cap
    assert summary["eval_kept_ratio_L0"] == ev[0]["eval_kept_ratio_L0"]
    after = flat_params(tr.state["params"])
    moved = {k for k in after if not np.array_equal(after[k], seen["init"][k])}
    assert moved and all(k.startswith("atp/") for k in moved), sorted(moved)[:5]
    assert len(moved) == len([k for k in after if k.startswith("atp/")])  # every ATP leaf trained


def test_vlm_with_atp_is_refused_clearly():
    cfg = configs.load_config("vlm_connector")
    with cfg.unlocked():
        cfg.model.atp = configs.load_config("atp_threshold").model.atp
    with pytest.raises(NotImplementedError, match="ViT only"):
        train.make_task(cfg, None)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny plain ViT run under train.transfer_guard="disallow" (TensorBoard on when a writer imports)."""
    work = tmp_path_factory.mktemp("src")
    cfg = configs.load_config("vit_fmnist", TINY + ["train.steps=2", "model.reduction.r=2",
                                                   "train.transfer_guard=disallow", "train.tensorboard=True",
                                                   "checkpoint.every=1"])
    tr = train.Trainer(cfg, work)
    tr.train()
    return work, tr


def test_transfer_guard_disallow_runs_the_loop(source_run):
    work, tr = source_run
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert any("eval_accuracy" in x for x in lines)
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    with pytest.raises(ValueError, match="train.transfer_guard"):
        train.Trainer(configs.load_config("vit_fmnist", TINY + ["train.transfer_guard=maybe"]), work / "x").train()


def _writer_available():
    for name in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            __import__(name)
            return True
        except ImportError:
            pass
    return False


@pytest.mark.skipif(not _writer_available(), reason="no TensorBoard writer (tensorboardX / torch + tensorboard)")
def test_tensorboard_events_are_written(source_run):
    work, _ = source_run
    events = list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_pretrained_run_freezes_the_backbone_automatically(source_run, tmp_path):
    """The two-step recipe: model.pretrained=<run> loads the backbone (the run has no ATP parameters), and
    model.atp.train_backbone="auto" makes only the ATP modules train."""
    work, src = source_run
    cfg = configs.load_config("atp_threshold", TINY + ["train.steps=2", "train.eval_at_end=False",
                                                      f"model.pretrained={work}", "train.tensorboard=False",
                                                      "model.atp.train_backbone=auto"])
    tr = train.Trainer(cfg, tmp_path)
    tr.train()
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["trainable"] == ["^atp/"]
    source = flat_params(src.state["params"])
    after = flat_params(tr.state["params"])
    backbone = [k for k in after if not k.startswith("atp/")]
    assert set(backbone) == set(source)
    for k in backbone:  # loaded from the source run and not trained
        np.testing.assert_array_equal(after[k], source[k])
    assert len([k for k in after if k.startswith("atp/")]) == 4
