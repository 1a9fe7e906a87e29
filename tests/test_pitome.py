"""PiToMe against the loop reference in ``ref_merging``, presets, schedules and invariants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
import ref_merging as ref
from reduction.pitome import PRESETS, pitome_layers, pitome_merged_tokens


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("ratio", "margin", "alpha", "energy_fn", "num_protected", "use_bsm"))
def _pitome(x, sizes, metric, **kw):
    step = R.pitome_matching(metric, **kw)
    return step, R.apply_step(R.init_state(x, sizes=sizes, track_source=True), step)


CASES = [  # (B, T, ratio, margin, alpha, energy_fn, num_protected, use_bsm)
    (1, 17, 0.75, 0.9, 1.0, "paper", 1, False),
    (2, 17, 0.75, 0.9, 1.0, "paper", 1, True),
    (2, 20, 0.5, 0.3, 1.0, "elu", 1, False),     # ratio 0.5: every token mergeable
    (2, 20, 0.6, 0.3, 0.5, "elu", 1, True),
    (3, 14, 0.8, 0.0, 1.0, "paper", 0, False),   # no class token
    (2, 15, 0.7, 0.45, 0.5, "paper", 2, False),  # cls + distillation, alpha 0.5
    (2, 16, 0.9, 0.75, 1.0, "elu", 1, True),
]


@pytest.mark.parametrize("bsz,t,ratio,margin,alpha,energy_fn,p,use_bsm", CASES)
def test_pitome_matches_loop_reference(bsz, t, ratio, margin, alpha, energy_fn, p, use_bsm):
    x, metric = _rand(t, bsz, t, 5), _rand(t + 50, bsz, t, 6)
    sizes = np.random.default_rng(t).integers(1, 4, size=(bsz, t)).astype(np.float32)
    step, out = _pitome(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(metric), ratio=ratio, margin=margin,
                        alpha=alpha, energy_fn=energy_fn, num_protected=p, use_bsm=use_bsm)
    assert out.num_tokens == pitome_merged_tokens(t, ratio, num_protected=p) < t
    for b in range(bsz):
        assign, anchor = ref.pitome_plan(metric[b], ratio, margin, alpha, energy_fn, p, use_bsm)
        np.testing.assert_array_equal(np.asarray(step.assign[b]), assign)
        np.testing.assert_array_equal(np.asarray(step.anchor[b]), anchor)
        rx, rs = ref.merge_plan(x[b], sizes[b], assign, len(anchor))
        np.testing.assert_allclose(np.asarray(out.x[b]), rx, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.sizes[b]), rs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.x[:, :p]), x[:, :p])  # front tokens first and untouched


@pytest.mark.parametrize("energy_fn", ["paper", "elu"])
def test_energy_matches_reference(energy_fn):
    metric = _rand(3, 2, 9, 4)
    metric[1, 2] = 0.0  # a zero vector: similarity 0, no NaN
    got = np.asarray(R.pitome_energy(jnp.asarray(metric), margin=0.4, alpha=0.7, energy_fn=energy_fn))
    for b in range(2):
        want, _ = ref.pitome_energy(metric[b], 0.4, 0.7, energy_fn)
        np.testing.assert_allclose(got[b], want, atol=1e-6)
    # the two shapes differ exactly by the margin on the above-margin terms
    assert energy_fn in ("paper", "elu")


def test_energy_shapes_f_m():
    assert ref.f_m(0.95, 0.9, 1.0, "paper") == 0.95
    assert math.isclose(ref.f_m(0.95, 0.9, 1.0, "elu"), 0.05)
    sim = jnp.asarray([[0.95, 0.2, -jnp.inf]])
    from reduction.pitome import _energy_terms
    paper = np.asarray(_energy_terms(sim, 0.9, 1.0, "paper"))[0]
    elu = np.asarray(_energy_terms(sim, 0.9, 1.0, "elu"))[0]
    np.testing.assert_allclose(paper, [0.95, math.exp(0.2 - 0.9) - 1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(elu, [0.05, math.exp(0.2 - 0.9) - 1.0, -1.0], rtol=1e-5)


def test_low_energy_tokens_are_protected():
    """Eight near-duplicates (a cluster, high energy) and seven mutually orthogonal loners (low energy):
    with r = 4 (ratio 0.7 of 15) the 2r = 8 mergeable tokens are exactly the cluster."""
    c = 16
    cluster = np.ones((8, c), np.float32) + 0.01 * _rand(1, 8, c)
    loners = np.eye(c, dtype=np.float32)[8:15] * 5.0
    metric = np.concatenate([np.zeros((1, c), np.float32), cluster, loners])[None]
    x = _rand(2, 1, 16, 3)
    step, out = _pitome(jnp.asarray(x), jnp.ones((1, 16)), jnp.asarray(metric), ratio=0.7, margin=0.5, alpha=1.0,
                        energy_fn="paper", num_protected=1, use_bsm=False)
    assert out.num_tokens == 12
    assign = np.asarray(step.assign[0])
    merged_tokens = [t for t in range(16) if (assign == assign[t]).sum() > 1]
    assert len(merged_tokens) >= 5 and all(1 <= t <= 8 for t in merged_tokens)
    for t in range(9, 16):
        np.testing.assert_array_equal(np.asarray(out.x[0, assign[t]]), x[0, t])


def test_deit_s_token_counts_at_ratio_09():
    want = [197, 178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]
    for preset in PRESETS:
        reducers = R.build_layer_reducers(12, {"method": "pitome", "keep_ratio": 0.9, "preset": preset})
        counts = R.tokens_per_layer(197, reducers, num_protected=1)
        assert [a for a, _ in counts] + [counts[-1][1]] == want
    assert R.constant_ratio_tokens(197, 12, 0.9) == want


def test_r_rule_floor_in_float64():
    assert R.pitome_r(197, 0.9) == 19          # 196 - 176.4 = 19.6 -> 19
    assert R.pitome_r(197, 0.95) == 9
    assert R.pitome_r(197, 0.7) == 58
    assert R.pitome_r(197, 1.0) == 0
    assert R.pitome_r(197, 0.5) == 98


def test_presets_and_margin_schedule():
    assert R.margin_schedule(4, 0.9) == pytest.approx([0.9, 0.675, 0.45, 0.225])
    paper = pitome_layers(12, keep_ratio=0.9, preset="paper")
    code = pitome_layers(12, keep_ratio=0.9, preset="code")
    assert [p.margin for p in paper] == pytest.approx([0.9 - 0.9 * i / 12 for i in range(12)])
    assert [p.margin for p in code] == pytest.approx([0.75 - 0.75 * i / 12 for i in range(12)])
    assert all(p.prop_attn and p.energy_fn == "paper" and not p.use_bsm for p in paper)
    assert [p.use_bsm for p in code] == [True] * 6 + [False] * 6
    assert all(not p.prop_attn and p.energy_fn == "elu" for p in code)
    mae = pitome_layers(11, keep_ratio=0.9, preset="code", bsm_layers="second_half")
    assert [p.use_bsm for p in mae] == [False] * 6 + [True] * 5
    custom = pitome_layers(4, keep_ratio=0.8, margin=[0.5] * 4, alpha=0.5, prop_attn=False, bsm_layers=[1], layers=[1, 2])
    assert custom[0] is None and custom[3] is None
    assert custom[1].use_bsm and not custom[2].use_bsm and custom[2].alpha == 0.5 and custom[2].margin == 0.5
    assert all(r is None for r in pitome_layers(3, keep_ratio=1.0))


def test_reducer_runs_in_a_layer_and_counts_flops():
    red = pitome_layers(12, keep_ratio=0.9, preset="code")[0]
    x = jnp.asarray(_rand(4, 2, 21, 8))

    def layer(x):
        return red(R.init_state(x), R.LayerInfo(layer=0, num_layers=12, num_protected=1, metric=x[..., :4]))

    out = jax.jit(layer)(x)
    info = R.LayerInfo(layer=0, num_layers=12, num_protected=1)
    assert out.num_tokens == red.num_out(21, info) == 21 - 2
    assert red.flops(197, dim=384, heads=6) == 2 * 196 * 196 * 64


def test_ratio_one_and_r_zero_are_identity():
    metric = jnp.asarray(_rand(5, 2, 9, 4))
    for ratio in (1.0, 0.95):  # 8 * 0.05 = 0.4 -> r = 0
        step = R.pitome_matching(metric, ratio=ratio, margin=0.5)
        assert step.num_out == 9 and not step.merges
        np.testing.assert_array_equal(np.asarray(step.anchor), np.broadcast_to(np.arange(9), (2, 9)))


def test_ties_zero_and_nan_metrics():
    bsz, t = 2, 15
    metric = np.eye(3, dtype=np.float32)[np.random.default_rng(6).integers(0, 3, size=(bsz, t))]
    metric[:, 4] = 0.0
    x = _rand(7, bsz, t, 3)
    for use_bsm in (False, True):
        step, out = _pitome(jnp.asarray(x), jnp.ones((bsz, t)), jnp.asarray(metric), ratio=0.7, margin=0.5,
                            alpha=1.0, energy_fn="paper", num_protected=1, use_bsm=use_bsm)
        for b in range(bsz):
            assign, _ = ref.pitome_plan(metric[b], 0.7, 0.5, 1.0, "paper", 1, use_bsm)
            np.testing.assert_array_equal(np.asarray(step.assign[b]), assign)
        assert np.isfinite(np.asarray(out.x)).all()
    # NaN metric: that token gets energy -alpha, is protected, receives nobody, and its NaN stays visible
    metric = _rand(8, 1, t, 4)
    metric[0, 6] = np.nan
    x[0, 6] = np.nan
    step, out = _pitome(jnp.asarray(x[:1]), jnp.ones((1, t)), jnp.asarray(metric), ratio=0.7, margin=0.5,
                        alpha=1.0, energy_fn="paper", num_protected=1, use_bsm=False)
    assign = np.asarray(step.assign[0])
    assert (assign == assign[6]).sum() == 1
    assert np.isnan(np.asarray(out.x[0, assign[6]])).all()
    assert np.isfinite(np.delete(np.asarray(out.x[0]), assign[6], axis=0)).all()
    energy = np.asarray(R.pitome_energy(jnp.asarray(metric[:, 1:]), margin=0.5))[0]
    assert energy[5] == pytest.approx(-1.0) and np.isfinite(energy).all()


def test_invariants_jit_vmap_grad_and_traces():
    bsz, t = 3, 19
    x = jnp.asarray(_rand(9, bsz, t, 6))
    metric = jnp.asarray(_rand(10, bsz, t, 4))
    sizes = jnp.asarray(np.random.default_rng(11).integers(1, 5, size=(bsz, t)).astype(np.float32))
    kw = dict(ratio=0.8, margin=0.6)

    def f(x, sizes, metric):
        out = R.pitome_merge(R.init_state(x, sizes=sizes), metric, **kw)
        return out.x, out.sizes

    eager = f(x, sizes, metric)
    jf = jax.jit(f)
    np.testing.assert_allclose(np.asarray(jf(x, sizes, metric)[0]), np.asarray(eager[0]), atol=1e-6)
    loop = [jf(x[b : b + 1], sizes[b : b + 1], metric[b : b + 1]) for b in range(bsz)]
    vm = jax.jit(jax.vmap(lambda a, s, m: jax.tree.map(lambda v: v[0], f(a[None], s[None], m[None]))))(
        x, sizes, metric)
    np.testing.assert_allclose(np.asarray(vm[0]), np.concatenate([l[0] for l in loop]), atol=1e-6)
    # sizes and mass conserved
    np.testing.assert_allclose(np.asarray(eager[1]).sum(1), np.asarray(sizes).sum(1), rtol=1e-6)
    mass_in = (np.asarray(x) * np.asarray(sizes)[..., None]).sum(1)
    mass_out = (np.asarray(eager[0]) * np.asarray(eager[1])[..., None]).sum(1)
    np.testing.assert_allclose(mass_out, mass_in, rtol=1e-5, atol=1e-5)
    # gradients through the merge are finite and non-zero
    g = jax.jit(jax.grad(lambda x: jnp.sum(f(x, sizes, x[..., :4])[0] ** 2)))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    # new data of the same shape does not retrace
    traces = []

    @jax.jit
    def g2(x, metric):
        traces.append(1)
        return R.pitome_merge(R.init_state(x), metric, **kw, use_bsm=True).x

    for seed in range(3):
        g2(jnp.asarray(_rand(seed, bsz, t, 6)), jnp.asarray(_rand(seed + 1, bsz, t, 4))).block_until_ready()
    assert len(traces) == 1


def test_errors_name_the_argument_under_jit():
    x = jnp.zeros((2, 9, 4))
    with pytest.raises(ValueError, match="ratio"):
        jax.jit(lambda m: R.pitome_matching(m, ratio=0.4, margin=0.5).assign)(x)
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            jax.jit(lambda m: R.pitome_matching(m, ratio=bad, margin=0.5).assign)(x)
    with pytest.raises(ValueError, match="metric must have rank 3"):
        jax.jit(lambda m: R.pitome_matching(m, ratio=0.8, margin=0.5).assign)(x[0])
    with pytest.raises(ValueError, match="metric"):
        jax.jit(lambda a, m: R.pitome_merge(R.init_state(a), m, ratio=0.8, margin=0.5).x)(x, jnp.zeros((2, 7, 4)))
    with pytest.raises(ValueError, match="energy_fn"):
        R.pitome_matching(x, ratio=0.8, margin=0.5, energy_fn="gauss")
    with pytest.raises(ValueError, match="preset"):
        R.build_layer_reducers(12, {"method": "pitome", "preset": "nope"})
    with pytest.raises(ValueError, match="ratio"):
        R.build_layer_reducers(12, {"method": "pitome", "keep_ratio": 0.3})


def test_pitome_code_method_is_the_code_preset():
    a = R.build_layer_reducers(12, {"method": "pitome_code", "keep_ratio": 0.9})
    b = R.build_layer_reducers(12, {"method": "pitome", "keep_ratio": 0.9, "preset": "code"})
    assert a == b and a[0] != R.build_layer_reducers(12, {"method": "pitome", "keep_ratio": 0.9})[0]
    with pytest.raises(ValueError, match="preset"):
        R.build_layer_reducers(12, {"method": "pitome_code", "preset": "paper"})
