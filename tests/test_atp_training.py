"""Learned reducers inside the ViT (models.vit.ViT.attach_reducer; reduction.nnx.LearnedATP, the learned ATP
thresholds; a toy learned gate defined here that trains through train.Trainer unchanged) and the train.py switches
(transfer guard, TensorBoard, debug NaNs).

Models are tiny (width 32, 3 blocks, ATP after block 1, 28x28 images with patch 4 -> class token + 7x7
patches); Trainer runs use the synthetic 16x16 set for a few steps."""

from __future__ import annotations

import dataclasses
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
from reduction.nnx import LearnedATP, LearnedReducer
from reduction.schedule import keep_count
from reduction.step import apply_step, identity_step
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
        if path[0] == "learned":
            continue
        v = var[...]
        var[...] = jnp.asarray(rng.normal(size=v.shape) * (0.3 if v.ndim > 1 else 0.2) + (1.0 if v.ndim == 1 else 0),
                               v.dtype)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def atp_model(seed=0, init_theta=0.3, stride=STRIDE, randomize=True, **options):
    model = ViT.from_config(ARCH, seed=seed)
    if randomize:
        _randomize(model, seed)
    return model.attach_atp([LAYER], capacity_ratio=RATIO, stride=stride, init_theta=init_theta, seed=seed, **options)


def images(b=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 28, 28, 3)), jnp.float32)


def grid_positions(stride=STRIDE):
    return 1 + np.flatnonzero(atp.spatial_grid_mask(7, 7, stride))


def atp_probs(model, x):
    """Attention probabilities of the ATP block, computed independently of the model's reducer call."""
    state = R.init_state(model.embed(x))
    for blk in list(model.blocks)[:LAYER]:
        state = blk(state)
    blk = model.blocks[LAYER]
    _, _, probs = blk.attn(blk.norm1(state.x), need_probs=True)
    return probs


# -- the model ------------------------------------------------------------------------------------------------


def expected_soft_mask(model, x, *, straight_through=False):
    """The soft keep mask of the ATP block recomputed from its attention and the module's threshold."""
    module = model.learned[str(LAYER)]
    probs = atp_probs(model, x)
    b = x.shape[0]
    cand = jnp.broadcast_to(jnp.arange(T) >= 1, (b, T))
    self_r, cross_r, score = atp.vit_atp_inputs(probs, cand, self_weight=module.self_weight)
    theta = module.threshold(score, self_r, cross_r, cand)
    grid = jnp.asarray(atp.patch_grid_mask(T, 1, module.stride)) & cand
    if straight_through:
        return atp.hard_keep_mask(score, theta, forced=grid, candidates=cand).astype(jnp.float32), theta, score
    m = atp.soft_keep_mask(score, theta, temperature=module.temperature, forced=grid, candidates=cand)
    return m, theta, score


def test_attach_puts_params_under_learned_and_validates():
    model = atp_model()
    _, params, _ = nnx.split(model, nnx.Param, ...)
    names = train.param_paths(params)
    learned = [n for n in names if "learned" in n]
    assert len(learned) == 4 and all(n.startswith(f"learned/{LAYER}/") for n in learned)
    assert model.learned_layers == (LAYER,) and isinstance(model.learned[str(LAYER)], LearnedATP)
    assert model.learned[str(LAYER)].num_out(T, R.LayerInfo(num_protected=1)) == CAPACITY
    assert model.tokens_per_layer(28) == [(T, T), (T, CAPACITY), (CAPACITY, CAPACITY)]
    assert model.tokens_per_layer(28, train=True) == [(T, T)] * 3
    assert model.flops(28) < ViT.from_config(ARCH).flops(28)
    with pytest.raises(ValueError, match="collide"):
        model(images(1), reducers={"method": "tome", "r": 2})
    with pytest.raises(ValueError, match="layers"):
        ViT.from_config(ARCH).attach_atp([5], capacity_ratio=0.5)
    with pytest.raises(ValueError, match="out of range"):
        ViT.from_config(ARCH).attach_reducer(3, LearnedATP(capacity_ratio=0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="LearnedReducer"):
        ViT.from_config(ARCH).attach_reducer(1, atp.ATPPrune())
    with pytest.raises(ValueError, match="capacity_ratio"):
        ViT.from_config(ARCH).attach_atp([1], capacity_ratio=0.0)
    with pytest.raises(ValueError, match="budget_kind"):
        ViT.from_config(ARCH).attach_atp([1], capacity_ratio=0.5, budget_kind="cube")
    with pytest.raises(ValueError, match="class_token"):
        ViT.from_config(dict(ARCH, class_token=False, pool="avg")).attach_atp([1], capacity_ratio=0.5)
    # a plain model reports no learned reducers and a zero reducer loss
    _, aux = ViT.from_config(ARCH)(images(1))
    assert aux["reducer_aux"] == {} and float(aux["reducer_loss"]) == 0.0


def test_train_mode_keeps_every_token_and_gates_sizes_with_the_soft_mask():
    model = atp_model()
    x = images()
    out, aux = make_forward(model, train=True)(x)
    assert out.shape == (4, 4) and aux["tokens"].shape[1] == T and aux["valid"] is None
    assert aux["tokens_per_layer"] == [(T, T)] * 3
    m, theta, _ = expected_soft_mask(model, x)
    m = np.asarray(m)
    assert np.all(m > 0) and np.all(m <= 1)
    assert np.all(m[:, 0] == 1.0) and np.all(m[:, grid_positions()] == 1.0)
    others = np.setdiff1d(np.arange(1, T), grid_positions())
    assert np.all(m[:, others] < 1.0) and np.ptp(m[:, others]) > 0.05  # a real, token-dependent soft mask
    # the gate is the size of each token for the later blocks (proportional attention), set by apply_step
    np.testing.assert_allclose(np.asarray(aux["sizes"]), np.maximum(m, 1e-6), rtol=1e-5, atol=1e-7)
    a = aux["reducer_aux"][LAYER]
    assert set(a) == {"loss", "budget", "theta", "kept_ratio"}
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(theta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a["kept_ratio"]), m[:, 1:].mean(-1), rtol=1e-5)
    # the budget loss: |mean kept fraction - target_keep| (weight 1 by default), summed into reducer_loss
    np.testing.assert_allclose(float(a["budget"]), abs(m[:, 1:].sum(-1).mean() / 49 - 0.5), rtol=1e-4)
    np.testing.assert_allclose(float(aux["reducer_loss"]), float(a["loss"]), rtol=1e-6)


def test_size_scale_on_the_identity_step_is_the_soft_gate():
    state = R.init_state(jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32))
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.1, 1.0, size=(2, 5)), jnp.float32)
    out = apply_step(state, dataclasses.replace(identity_step(2, 5), size_scale=scale))
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(state.x))
    np.testing.assert_allclose(np.asarray(out.sizes), np.asarray(scale), rtol=1e-6)
    with pytest.raises(ValueError, match="size_scale"):
        apply_step(state, dataclasses.replace(identity_step(2, 5), size_scale=scale[:, :3]))


def test_inference_mode_prunes_to_capacity_with_instance_counts_and_no_retrace():
    model = atp_model(init_theta=0.6)
    module = model.learned[str(LAYER)]
    rng = np.random.default_rng(3)  # instance-wise thresholds: give the output layer a random kernel
    module.fc2.kernel[...] = jnp.asarray(rng.normal(size=module.fc2.kernel.shape) * 0.5, jnp.float32)
    fn = make_forward(model)   # train=False: inference mode
    x = images(6)
    out, aux = fn(x)
    assert aux["tokens"].shape[1] == CAPACITY and aux["valid"].shape == (6, CAPACITY)
    assert aux["tokens_per_layer"] == [(T, T), (T, CAPACITY), (CAPACITY, CAPACITY)]
    a = aux["reducer_aux"][LAYER]
    assert float(a["loss"]) == 0.0 and float(aux["reducer_loss"]) == 0.0

    probs = atp_probs(model, x)
    cand = jnp.broadcast_to(jnp.arange(T) >= 1, (6, T))
    self_r = atp.received_attention(probs, cand.astype(jnp.float32), exclude_self=True)
    cross_r = atp.received_attention(probs[:, :, :1], jnp.ones((6, 1)))
    score = atp.vit_atp_scores(probs, num_protected=1, self_weight=module.self_weight)
    theta = module.threshold(score, self_r, cross_r, cand)
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(theta), rtol=1e-5, atol=1e-6)
    forced = np.zeros(T, bool)
    forced[0] = True
    forced[grid_positions()] = True
    passing = (np.asarray(score) > np.asarray(theta)[:, None]) | forced[None]
    expected = np.minimum(passing.sum(-1), CAPACITY)
    valid = np.asarray(aux["valid"])
    np.testing.assert_array_equal(valid.sum(-1), expected)
    assert len(set(expected.tolist())) > 1 and expected.min() < CAPACITY  # really instance-adaptive
    np.testing.assert_array_equal(np.asarray(a["kept_tokens"]), expected)
    np.testing.assert_allclose(np.asarray(a["kept_ratio"]) * 49, expected - 1, rtol=1e-5)
    # every forced token survives, and the valid slots hold exactly the passing tokens (when under capacity)
    pos = np.asarray(aux["positions"])
    for b in range(6):
        kept = set(pos[b][valid[b]].tolist())
        assert set(np.flatnonzero(forced).tolist()) <= kept
        if passing[b].sum() <= CAPACITY:
            assert kept == set(np.flatnonzero(passing[b]).tolist())
    fn(images(6, seed=1))
    assert fn.num_traces() == 1


def test_untrained_inference_mode_equals_the_static_atp_reducer():
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
    assert aux["tokens_per_layer"] == ref_aux["tokens_per_layer"]
    assert model.flops(28) == plain.flops(28, static)


def _split(model):
    graphdef, learned_params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("learned")), ...)
    return graphdef, learned_params, rest


def _train_mode(graphdef, learned_params, rest, x):
    return nnx.merge(graphdef, learned_params, rest)(x, train=True)


def test_budget_and_task_gradients_reach_the_learned_parameters():
    model = atp_model()
    graphdef, p, rest = _split(model)
    x = images()

    def budget(p):  # the reducer's own loss (aux["reducer_loss"])
        return _train_mode(graphdef, p, rest, x)[1]["reducer_loss"]

    def task(p):  # the CE only sees the ATP parameters through the gate (log m key bias) of block 2
        logits = _train_mode(graphdef, p, rest, x)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)))

    for fn in (budget, task):
        g = jax.tree.leaves(jax.jit(jax.grad(fn))(p))
        assert g and all(np.all(np.isfinite(np.asarray(v))) for v in g)
        assert sum(float(jnp.sum(jnp.abs(v))) for v in g) > 1e-6, fn.__name__
    # theta itself receives the gradient (the fc2 bias is the threshold logit)
    g_bias = jax.jit(jax.grad(budget))(p)["learned"][str(LAYER)]["fc2"]["bias"][...]
    assert float(jnp.abs(g_bias).sum()) > 1e-6


def test_straight_through_train_mode_gates_like_inference_mode_with_soft_gradients():
    model = ViT.from_config(ARCH, seed=0)
    _randomize(model, 0)
    model.attach_atp([LAYER], capacity_ratio=1.0, stride=STRIDE, straight_through=True, seed=0)
    x = images()
    soft_out, soft = make_forward(model, train=True)(x)
    hard_out, hard = make_forward(model, train=False)(x)
    m, _, _ = expected_soft_mask(model, x, straight_through=True)
    m = np.asarray(m)
    assert set(np.unique(m)) <= {0.0, 1.0} and 0 < m.sum() < m.size           # a real 0/1 keep set
    # the forward gate is the hard keep set: same kept count as inference mode (capacity = every token)
    np.testing.assert_array_equal(m.sum(-1), np.asarray(hard["reducer_aux"][LAYER]["kept_tokens"]))
    np.testing.assert_allclose(np.asarray(soft["sizes"]), np.maximum(m, 1e-6), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(soft["reducer_aux"][LAYER]["kept_ratio"]),
                               np.asarray(hard["reducer_aux"][LAYER]["kept_ratio"]), rtol=1e-6)
    # dropped tokens get a 1e-6 key weight, so the logits match hard pruning closely
    np.testing.assert_allclose(np.asarray(soft_out), np.asarray(hard_out), atol=1e-3)
    graphdef, p, rest = _split(model)

    def budget(p):
        return _train_mode(graphdef, p, rest, x)[1]["reducer_loss"]

    g = jax.tree.leaves(jax.jit(jax.grad(budget))(p))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g)
    assert sum(float(jnp.sum(jnp.abs(v))) for v in g) > 1e-6


def test_budget_only_steps_move_the_soft_kept_count_to_the_target():
    model = atp_model(init_theta=0.3, target_keep=0.5, budget_kind="square")
    graphdef, p, rest = _split(model)
    x = images(8)
    target = 0.5 * 49

    @jax.jit
    def kept_and_loss(p):
        aux = _train_mode(graphdef, p, rest, x)[1]
        return aux["reducer_loss"], jnp.mean(aux["reducer_aux"][LAYER]["kept_ratio"]) * 49

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
        "train.steps=3", "optim.trainable=('learned',)", "model.atp.layers=(0,)", "train.debug_nans=True"])
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
        assert {"ce_loss", "reducer_loss", "loss_L0", "budget_L0", "theta_L0", "kept_ratio_L0"} <= set(rec)
        np.testing.assert_allclose(rec["loss"], rec["ce_loss"] + rec["reducer_loss"], rtol=1e-5)
        np.testing.assert_allclose(rec["reducer_loss"], 2.0 * rec["budget_L0"], rtol=1e-5)   # budget_weight=2
        np.testing.assert_allclose(rec["loss_L0"], rec["reducer_loss"], rtol=1e-6)
        assert 0.0 <= rec["budget_L0"] <= 1.0 and 0.0 < rec["theta_L0"] < 1.0 and 0.0 < rec["kept_ratio_L0"] <= 1.0
    ev = [x for x in lines if "eval_accuracy" in x]
    assert len(ev) == 1 and ev[0]["eval_examples"] == 32
    cap = keep_count(17, 0.7, protected=1)  # 16x16 images, patch 4: 1 + 16 tokens -> 12
    assert 0.0 < ev[0]["eval_kept_ratio_L0"] <= (cap - 1) / 16 + 1e-6
    assert 1.0 < ev[0]["eval_kept_tokens_L0"] <= cap
    assert summary["eval_kept_ratio_L0"] == ev[0]["eval_kept_ratio_L0"]
    assert "eval_loss_L0" not in ev[0]
    after = flat_params(tr.state["params"])
    moved = {k for k in after if not np.array_equal(after[k], seen["init"][k])}
    assert moved and all(k.startswith("learned/") for k in moved), sorted(moved)[:5]
    assert len(moved) == len([k for k in after if k.startswith("learned/")])  # every learned leaf trained


def test_vlm_with_atp_is_refused_clearly():
    cfg = configs.load_config("vlm_connector")
    with cfg.unlocked():
        cfg.model.atp = configs.load_config("atp_threshold").model.atp
    with pytest.raises(NotImplementedError, match="ViT only"):
        train.build_model(cfg)


class ToyGate(LearnedReducer):
    """A toy learned reducer: one learned scalar gate ``g`` on the sizes of the patch tokens (every token stays),
    with the auxiliary loss ``(g - 0.25)^2`` in training."""

    prop_attn = True

    def __init__(self):
        self.logit = nnx.Param(jnp.zeros((), jnp.float32))

    def num_out(self, num_tokens, info):
        return num_tokens

    def __call__(self, state, info, *, train):
        g = jax.nn.sigmoid(self.logit[...])
        b, t = state.sizes.shape
        scale = jnp.broadcast_to(jnp.where(jnp.arange(t) < info.num_protected, 1.0, g), (b, t))
        state = apply_step(state, dataclasses.replace(identity_step(b, t), size_scale=scale))
        return state, {"loss": (g - 0.25) ** 2 if train else jnp.zeros(()), "gate": g}


def test_a_toy_learned_reducer_trains_through_the_trainer_unchanged(tmp_path):
    """The mechanism is generic: a reducer defined here, attached with ViT.attach_reducer in model_fn, trains with
    its auxiliary loss and is logged by train.Trainer with no trainer change."""
    cfg = configs.load_config("vit_fmnist", TINY + ["train.steps=3", "model.reduction.method=none",
                                                   "train.tensorboard=False", "optim.lr=0.05"])
    cfg.optim.lr_scales = (("^learned/", 2.0),)

    def model_fn(cfg):
        return train.build_model(cfg).attach_reducer(1, ToyGate())

    tr = train.Trainer(cfg, tmp_path, model_fn=model_fn)
    tr.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 3
    for rec in steps:
        np.testing.assert_allclose(rec["loss"], rec["ce_loss"] + rec["reducer_loss"], rtol=1e-5)
        np.testing.assert_allclose(rec["loss_L1"], (rec["gate_L1"] - 0.25) ** 2, rtol=1e-4)
    assert steps[0]["gate_L1"] == pytest.approx(0.5)
    assert steps[-1]["gate_L1"] < steps[0]["gate_L1"]            # the auxiliary loss pulls the gate down
    ev = [x for x in lines if "eval_accuracy" in x]
    assert ev and "eval_gate_L1" in ev[-1] and "eval_loss_L1" not in ev[-1]
    (logit,) = [v for k, v in flat_params(tr.state["params"]).items() if k.startswith("learned/1/logit")]
    assert float(logit) < 0.0


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


def test_pretrained_run_freezes_the_backbone_automatically(source_run, tmp_path, caplog):
    """The two-step recipe: model.pretrained=<run> loads the backbone (the run has no ATP parameters; the learned
    reducers stay fresh, logged), and model.atp.train_backbone="auto" makes only the learned reducers train."""
    import logging

    caplog.set_level(logging.INFO, logger="tokenreduce.train")
    work, src = source_run
    cfg = configs.load_config("atp_threshold", TINY + ["train.steps=2", "train.eval_at_end=False",
                                                      f"model.pretrained={work}", "train.tensorboard=False",
                                                      "model.atp.train_backbone=auto"])
    tr = train.Trainer(cfg, tmp_path)
    tr.train()
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["trainable"] == ["^learned/"]
    assert "learned reducers: they keep their fresh initialisation" in caplog.text
    source = flat_params(src.state["params"])
    after = flat_params(tr.state["params"])
    backbone = [k for k in after if not k.startswith("learned/")]
    assert set(backbone) == set(source)
    for k in backbone:  # loaded from the source run and not trained
        np.testing.assert_array_equal(after[k], source[k])
    assert len([k for k in after if k.startswith("learned/")]) == 4
