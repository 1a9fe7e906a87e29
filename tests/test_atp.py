"""ATP-style pruning: scores vs loop references, soft/hard masks, compaction, budget loss, the NNX module."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reduction as R
from reduction import atp
from reduction.nnx import ATPModule
from tests import ref_pruning as ref


def _attn(b, h, tq, t, seed=0):
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(size=(b, h, tq, t)) * 2)
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def _scores(b=2, t=14, p=2, seed=0):
    a = _attn(b, 2, t, t, seed)
    cand = np.broadcast_to(np.arange(t) >= p, (b, t))
    self_r = atp.received_attention(jnp.asarray(a), jnp.asarray(cand, jnp.float32), exclude_self=True)
    cross_r = atp.received_attention(jnp.asarray(a[:, :, :p]), jnp.ones((b, p)))
    return a, cand, self_r, cross_r


def test_scores_match_loop_reference():
    a, cand, self_r, cross_r = _scores()
    score = atp.redundancy_score(self_r, cross_r, jnp.asarray(cand), self_weight=0.3)
    for e in range(2):
        sr = ref.received_ref(a[e], cand[e].astype(float), exclude_self=True)
        cr = ref.received_ref(a[e, :, :2], [1.0, 1.0])
        np.testing.assert_allclose(self_r[e], sr, rtol=1e-5)
        np.testing.assert_allclose(cross_r[e], cr, rtol=1e-5)
        np.testing.assert_allclose(score[e], ref.redundancy_ref(sr, cr, cand[e], 0.3), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(score)) <= 1.0 + 1e-6


def test_spatial_grid_and_soft_mask_monotone_in_theta_with_finite_grads():
    grid = atp.spatial_grid_mask(6, 6, 3)
    assert grid.sum() == 4 and grid.reshape(6, 6)[1, 1] and grid.reshape(6, 6)[4, 4]
    score = jnp.asarray(np.random.default_rng(1).random((2, 36)), jnp.float32)
    masks = [atp.soft_keep_mask(score, th, forced=jnp.asarray(grid)) for th in (0.2, 0.5, 0.8)]
    assert np.all(np.asarray(masks[0]) >= np.asarray(masks[1])) and np.all(np.asarray(masks[1]) >= np.asarray(masks[2]))
    assert np.all(np.asarray(masks[2])[:, grid] == 1.0)
    g_s, g_t = jax.grad(lambda s, th: atp.budget_loss(atp.soft_keep_mask(s, th), 10.0, kind="square"),
                        argnums=(0, 1))(score, jnp.array([0.4, 0.6]))
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t)) and np.any(g_t != 0)


def test_hard_mask_and_compaction_match_reference():
    rng = np.random.default_rng(2)
    score = rng.random((3, 20)).astype(np.float32)
    forced = np.zeros((3, 20), bool)
    forced[:, [0, 7]] = True
    keep = np.asarray(atp.hard_keep_mask(jnp.asarray(score), jnp.array([0.3, 0.6, 0.95]), forced=jnp.asarray(forced)))
    idx, valid = jax.jit(lambda k, s, f: atp.compact_keep(k, s, capacity=9, forced=f))(keep, score, forced)
    for e in range(3):
        want_idx, want_valid = ref.compact_ref(keep[e].tolist(), score[e].tolist(), 9, forced[e].tolist())
        assert np.asarray(idx[e]).tolist() == want_idx and np.asarray(valid[e]).tolist() == want_valid
        assert int(np.asarray(valid[e]).sum()) == min(9, int(keep[e].sum()))


def test_budget_loss_values():
    m = jnp.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.5]])
    np.testing.assert_allclose(atp.budget_loss(m, 2.0), 0.0)
    np.testing.assert_allclose(atp.budget_loss(m, 1.0, kind="square"), 1.0)
    np.testing.assert_allclose(atp.budget_loss(m, 1.0, candidates=jnp.array([True, True, False])), 0.75)
    with pytest.raises(ValueError, match="kind"):
        atp.budget_loss(m, 1.0, kind="l1")


def test_module_inference_compiles_once_as_kept_counts_change():
    _, cand, self_r, cross_r = _scores(b=2, t=14, p=2, seed=3)
    model = ATPModule(capacity=9, spatial=np.r_[np.zeros(2, bool), atp.spatial_grid_mask(3, 4, 2)],
                      rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def infer(model, s, c, m):
        traces.append(1)
        return model(s, c, m, train=False)

    counts = set()
    for seed in range(4):
        _, _, s, c = _scores(b=2, t=14, p=2, seed=seed)
        idx, valid, theta = infer(model, s * (1 + seed), c ** (1 + seed), jnp.asarray(cand))
        counts |= {int(v) for v in np.asarray(valid).sum(1)}
        assert idx.shape == (2, 9) and np.all(np.asarray(idx)[:, :2] == [0, 1])
    assert len(counts) > 1 and len(traces) == 1


def test_module_training_reaches_the_budget_target():
    _, cand, self_r, cross_r = _scores(b=4, t=14, p=2, seed=5)
    model = ATPModule(capacity=9, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    target = 4.0

    def loss_fn(model):
        mask, _ = model(self_r, cross_r, jnp.asarray(cand), train=True)
        return atp.budget_loss(mask, target, candidates=jnp.asarray(cand))

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    first = float(loss_fn(model))
    for _ in range(150):
        step(model, opt)
    assert float(loss_fn(model)) < 0.25 < first


def test_vit_reducer_runs_untrained_with_static_capacity_and_valid_mask():
    b, t = 2, 1 + 16
    a = jnp.asarray(_attn(b, 2, t, t, seed=6))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(b, t, 4)).astype(np.float32))
    red = R.build_layer_reducers(2, {"method": "atp", "theta": 0.5, "keep_ratio": 0.75, "stride": 2,
                                     "layers": [0]})[0]
    info = R.LayerInfo(num_protected=1, attention=a)
    out = jax.jit(lambda s: red(s, info))(R.init_state(x, track_source=True))
    assert out.x.shape == (b, red.num_out(t, info), 4) == (b, 13, 4)
    assert out.valid is not None and np.all(np.asarray(out.positions)[:, 0] == 0)
    score = np.asarray(atp.vit_atp_scores(a))
    for e in range(b):
        kept = set(np.asarray(out.positions)[e][np.asarray(out.valid)[e]].tolist())
        forced = {0} | {1 + i for i in np.flatnonzero(atp.spatial_grid_mask(4, 4, 2))}
        want = forced | {i for i in range(1, t) if score[e, i] > 0.5}
        assert kept == set(sorted(want, key=lambda i: (i not in forced, -score[e, i], i))[:13])
    with pytest.raises(ValueError, match="keep_ratio"):
        R.build_layer_reducers(2, {"method": "atp", "keep_ratio": 0.0})
