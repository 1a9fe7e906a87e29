"""Zero-TPrune: WPR, EIR/VHF and the I' -> S -> I plan vs the loop references; invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction.zerotprune import ZeroTPruneConfig, default_iterations, eir_vhf, split_counts, wpr_per_head
from tests import ref_pruning as ref


def _attn(b, h, t, seed=0, sharp=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, h, t, t)) * sharp
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def test_wpr_matches_loop_reference_and_preserves_mass():
    a = _attn(1, 3, 12, seed=1)[0]
    mask = np.ones(12, bool)
    mask[10] = False
    for init in ("cls_boost", "uniform"):
        got = np.asarray(wpr_per_head(jnp.asarray(a), jnp.asarray(mask), iterations=6, init=init))
        want = ref.wpr_ref(a, mask, 6, init)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
        assert np.all(got[:, 10] == 0)
    boosted = ref.wpr_ref(a, np.ones(12, bool), 0, "cls_boost")[0]
    np.testing.assert_allclose(boosted[0] / boosted[1], np.sqrt(12))


def test_wpr_converges_to_the_stationary_distribution():
    a = _attn(1, 2, 10, seed=2, sharp=0.5)[0].astype(np.float64)
    got = np.asarray(wpr_per_head(jnp.asarray(a, jnp.float32), jnp.ones(10, bool), iterations=60, init="uniform"))
    for h in range(2):
        w, v = np.linalg.eig(a[h].T)
        stat = np.real(v[:, np.argmax(np.real(w))])
        np.testing.assert_allclose(got[h], stat / stat.sum(), atol=1e-5)


@pytest.mark.parametrize("v_min,v_max,fallback", [(0.01, 0.7, "all"), (0.0, 0.05, "all"), (50.0, 60.0, "all"),
                                                  (50.0, 60.0, "max_var")])
def test_eir_vhf_matches_reference_including_fallback(v_min, v_max, fallback):
    s = ref.wpr_ref(_attn(1, 4, 14, seed=3, sharp=3.0)[0], np.ones(14, bool), 3)
    mask = np.ones(14, bool)
    got = np.asarray(eir_vhf(jnp.asarray(s, jnp.float32), jnp.asarray(mask), v_min=v_min, v_max=v_max,
                             fallback=fallback))
    np.testing.assert_allclose(got, ref.eir_vhf_ref(s, mask, v_min, v_max, fallback=fallback), rtol=1e-5)


@pytest.mark.parametrize("r_s,r_i,init,renorm", [(3, 4, "cls_boost", True), (0, 6, "uniform", True),
                                                 (5, 0, "cls_boost", True), (4, 3, "uniform", False)])
def test_plan_matches_loop_reference(r_s, r_i, init, renorm):
    b, h, t = 2, 3, 17
    a = _attn(b, h, t, seed=4)
    metric = np.random.default_rng(5).normal(size=(b, t, 6)).astype(np.float32)
    cfg = ZeroTPruneConfig(iterations=5, init=init, renormalize=renorm)
    step = jax.jit(lambda a, m: R.zerotprune_step(a, m, r_similarity=r_s, r_importance=r_i, config=cfg))(a, metric)
    assert step.num_out == t - r_s - r_i
    for e in range(b):
        want = ref.zerotprune_ref(a[e], metric[e], r_s, r_i, iterations=5, init=init, renormalize=renorm)
        assert np.asarray(step.anchor[e]).tolist() == want


def test_padding_is_dropped_first_and_protected_tokens_survive():
    b, h, t = 2, 2, 15
    a = _attn(b, h, t, seed=6)
    metric = np.random.default_rng(7).normal(size=(b, t, 5)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[0, 11:] = False
    state = R.init_state(jnp.asarray(metric), valid=jnp.asarray(valid), track_source=True)
    plan = jax.jit(lambda a, m, v: R.zerotprune_step(a, m, r_similarity=2, r_importance=3, num_protected=2, valid=v))
    step = plan(a, metric, jnp.asarray(valid))
    out = jax.jit(R.apply_step)(state, step)
    ref.check_pruned_state(state, out, step.anchor, num_protected=2)
    assert bool(np.all(np.asarray(out.valid)[0]))            # the 4 padding slots went first
    for e in range(b):
        assert np.asarray(step.anchor[e]).tolist() == ref.zerotprune_ref(a[e], metric[e], 2, 3, 2, valid[e])


def test_reducer_jit_eager_vmap_loop_no_retrace_and_finite_grads():
    b, h, t, c = 3, 2, 13, 8
    a = jnp.asarray(_attn(b, h, t, seed=8))
    x = jnp.asarray(np.random.default_rng(9).normal(size=(b, t, c)).astype(np.float32))
    red = R.build_layer_reducers(4, {"method": "zerotprune", "keep_ratio": 0.6, "layers": [1], "iterations": 3})[1]
    info = R.LayerInfo(layer=1, num_layers=4, num_protected=1, attention=a, metric=x)
    traces = []

    def run(x, a):
        traces.append(1)
        return red(R.init_state(x), R.LayerInfo(layer=1, num_layers=4, num_protected=1, attention=a, metric=x)).x

    jitted = jax.jit(run)
    out = jitted(x, a)
    assert out.shape == (b, red.num_out(t, info), c) == (b, 8, c)
    np.testing.assert_array_equal(out, red(R.init_state(x), info).x)
    per = [jitted(x[e:e + 1], a[e:e + 1])[0] for e in range(b)]
    np.testing.assert_array_equal(out, np.stack(per))
    jitted(x + 1.0, jnp.asarray(_attn(b, h, t, seed=10)))
    assert len(traces) == 2                                   # B=3 and B=1, no retrace on new data
    grad = jax.grad(lambda x: jnp.sum(jitted(x, a) ** 2))(x)
    assert np.all(np.isfinite(grad))


def test_zero_norm_duplicate_and_tied_tokens_give_no_nan():
    t = 12
    a = np.full((1, 2, t, t), 1.0 / t, np.float32)            # fully tied attention
    metric = np.zeros((1, t, 4), np.float32)                  # zero-norm keys
    metric[0, 5:8] = 1.0                                      # duplicates
    step = jax.jit(lambda a, m: R.zerotprune_step(a, m, r_similarity=3, r_importance=2))(a, metric)
    assert np.asarray(step.anchor[0]).tolist() == ref.zerotprune_ref(a[0], metric[0], 3, 2)


def test_similarity_ties_drop_the_lower_position_first():
    # Rank-1 attention: every row is p, so importance follows p (rising with position) and group A is
    # tokens 1..4 whose importance order (4, 3, 2, 1) is the reverse of their positions. All four copy
    # token 5, so their best matches tie at 1.0: the lower positions go first.
    t = 9
    p = np.arange(1, t + 1, dtype=np.float32)
    a = np.broadcast_to(p / p.sum(), (1, 2, t, t)).copy()
    metric = np.random.default_rng(11).normal(size=(1, t, 4)).astype(np.float32)
    metric[0, 1:5] = metric[0, 5]
    step = jax.jit(lambda a, m: R.zerotprune_step(a, m, r_similarity=2, r_importance=0))(a, metric)
    want = ref.zerotprune_ref(a[0], metric[0], 2, 0)
    assert want == [0, 3, 4, 5, 6, 7, 8]
    assert np.asarray(step.anchor[0]).tolist() == want


def test_schedule_defaults_and_counts():
    assert [default_iterations(i, 12) for i in (0, 2, 3, 8, 9, 11)] == [30, 30, 10, 10, 1, 1]
    assert split_counts(197, 59, similarity_fraction=0.5) == (29, 30)
    assert split_counts(9, 8, similarity_fraction=1.0) == (4, 4)   # S-stage capped at half
    reds = R.build_layer_reducers(12, {"method": "zerotprune", "r": [10, 20], "layers": [2, 7], "iterations": 4})
    assert [i for i, r in enumerate(reds) if r] == [2, 7]
    assert reds[7].counts(100, 1) == (10, 10) and reds[2].config.iterations == 4
    assert reds[2].flops(197, dim=384, heads=6) > 0


@pytest.mark.parametrize("kwargs,name", [
    (dict(r_similarity=9), "r_similarity"), (dict(r_similarity=1, r_importance=16), "r_importance"),
    (dict(r_similarity=1.0), "r_similarity"), (dict(config=ZeroTPruneConfig(init="cls")), "init"),
    (dict(config=ZeroTPruneConfig(var_scale="x")), "var_scale"),
])
def test_bad_arguments_raise(kwargs, name):
    a = _attn(1, 2, 17)
    args = dict(r_similarity=1, r_importance=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        R.zerotprune_step(a, np.zeros((1, 17, 3), np.float32), **args)
    with pytest.raises(ValueError, match="metric"):
        R.zerotprune_step(a, np.zeros((1, 16, 3), np.float32), r_similarity=1, r_importance=1)
    with pytest.raises(ValueError, match="keep_ratio"):
        R.build_layer_reducers(12, {"method": "zerotprune", "keep_ratio": 1.5})
