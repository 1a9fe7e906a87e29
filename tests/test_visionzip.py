"""VisionZip: dominant + contextual tokens vs a loop reference written from the official code's description,
invariants (class token, counts, mass), jit/batch/gradients/retrace, the registry, and runs in the ViT and the
VLM tower. Small shapes only."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction.visionzip import VisionZip, default_contextual, visionzip_counts, visionzip_step
from tests.method_smoke import vit_forward, tower_features

# -- loop reference -------------------------------------------------------------------------------------------


def ref_visionzip(attn, metric, hidden, sizes, p, dom, ctx, merge="official"):
    """One example. ``attn: [H, T]`` class row, ``metric: [T, Dh]``, ``hidden: [T, C]``, ``sizes: [T]``.
    Returns (anchors, assign, features [K, C], sizes [K])."""
    attn, metric, hidden, sizes = (np.asarray(a, np.float64) for a in (attn, metric, hidden, sizes))
    h, t = attn.shape
    n = t - p
    score = [sum(attn[k, p + j] for k in range(h)) for j in range(n)]          # summed over heads
    ranked = sorted(range(n), key=lambda j: (-score[j], j))
    dom_set = sorted(ranked[:dom])                                             # original order
    rest = [j for j in range(n) if j not in dom_set]
    anchors = list(range(p)) + [p + j for j in dom_set]
    assign = [-1] * t
    for k, a in enumerate(anchors):
        assign[a] = k
    feats = [hidden[a] for a in anchors]
    out_sizes = [sizes[a] for a in anchors]
    if ctx:
        step = max(1, len(rest) // ctx)
        tpos = [i * step for i in range(ctx)]
        targets = [rest[i] for i in tpos]
        members = [rest[i] for i in range(len(rest)) if i not in tpos]
        norm = lambda v: v / max(math.sqrt(sum(float(c) * float(c) for c in v)), 1e-12)
        tn = [norm(metric[p + j]) for j in targets]
        groups = {i: [] for i in range(ctx)}
        for j in members:
            mj = norm(metric[p + j])
            sims = [float(np.dot(mj, tk)) for tk in tn]
            best = max(range(ctx), key=lambda i: (sims[i], -i))                # first target on ties
            groups[best].append(j)
        base = len(anchors)
        for i, tj in enumerate(targets):
            assign[p + tj] = base + i
            for j in groups[i]:
                assign[p + j] = base + i
            ht, st = hidden[p + tj], sizes[p + tj]
            ws = sum(sizes[p + j] for j in groups[i])
            if groups[i]:
                mass = sum(sizes[p + j] * hidden[p + j] for j in groups[i])
                f = ht + mass / ws if merge == "official" else (st * ht + mass) / (st + ws)
            else:
                f = ht
            feats.append(f)
            out_sizes.append(st + ws)
            anchors.append(p + tj)
    return np.array(anchors), np.array(assign), np.array(feats), np.array(out_sizes)


def _inputs(seed, b=3, t=21, h=2, dh=4, c=6):
    ks = jax.random.split(jax.random.key(seed), 4)
    attn = jax.nn.softmax(jax.random.normal(ks[0], (b, h, t, t)) * 2, axis=-1)
    metric = jax.random.normal(ks[1], (b, t, dh))
    hidden = jax.random.normal(ks[2], (b, t, c))
    sizes = jax.random.uniform(ks[3], (b, t), minval=0.5, maxval=3.0)
    return attn, metric, hidden, sizes


def _run(red, attn, metric, hidden, sizes=None, p=1):
    info = R.LayerInfo(num_protected=p, attention=attn, metric=metric)
    return red(R.init_state(hidden, sizes=sizes, track_source=True), info)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _plan_and_run(red, attn, metric, hidden, sizes, p):
    step = red.plan(R.init_state(hidden), R.LayerInfo(num_protected=p, attention=attn, metric=metric))
    return step, _run(red, attn, metric, hidden, sizes, p)


CASES = [  # (T, P, keep, contextual)
    (21, 1, 9, None),      # default contextual: round(9 * 10 / 64) = 1
    (21, 1, 12, 4),
    (21, 2, 10, 7),        # a distillation-like second protected token
    (21, 1, 5, 0),         # pure pruning
    (21, 1, 20, 6),        # every candidate kept: L_f == contextual, no members
]


@pytest.mark.parametrize("t,p,keep,ctx,merge", [c + ("official",) for c in CASES] + [(21, 2, 10, 7, "mean")])
def test_matches_loop_reference(t, p, keep, ctx, merge):
    attn, metric, hidden, sizes = _inputs(t * 7 + keep, t=t)
    red = VisionZip(keep=keep, contextual=ctx, merge=merge)
    dom, m = visionzip_counts(t - p, keep, ctx)
    info = R.LayerInfo(num_protected=p)
    assert red.num_out(t, info) == p + keep
    step, out = _plan_and_run(red, attn, metric, hidden, sizes, p)
    assert out.x.shape == (3, p + keep, 6)
    for i in range(3):
        anchors, assign, feats, osz = ref_visionzip(attn[i, :, 0], metric[i], hidden[i], sizes[i], p, dom, m, merge)
        np.testing.assert_array_equal(np.asarray(step.anchor[i]), anchors)
        np.testing.assert_array_equal(np.asarray(step.assign[i]), assign)
        np.testing.assert_allclose(np.asarray(out.x[i]), feats, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.sizes[i]), osz, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(out.positions[i]), anchors)


def test_official_counts_and_stride():
    assert [default_contextual(k) for k in (63, 127, 191)] == [10, 20, 30]
    assert visionzip_counts(576, 63, None) == (53, 10)      # + the class token: 54 dominant / 10 contextual
    # the README's 64-token case: L_f = 576 - 53 = 523 candidates left, stride 52
    attn, metric, hidden, _ = _inputs(0, b=1, t=577, h=2, dh=4, c=4)
    step = jax.jit(lambda a, m: visionzip_step(a, m, dominant=53, contextual=10))(attn[:, :, 0], metric)
    is_dom = np.zeros(576, bool)
    is_dom[np.asarray(step.anchor[0, 1:54]) - 1] = True
    rest = np.nonzero(~is_dom)[0] + 1
    np.testing.assert_array_equal(np.asarray(step.anchor[0, 54:]), rest[np.arange(10) * 52])


def test_invariants_class_token_mass_and_order():
    attn, metric, hidden, _ = _inputs(3)
    # make a patch attend-to-all so that CLS would lose under an unprotected top-k
    attn = attn.at[:, :, 0, 0].set(0.0)
    out = jax.jit(lambda a, m, x: _run(VisionZip(keep=8, contextual=3), a, m, x))(attn, metric, hidden)
    np.testing.assert_array_equal(np.asarray(out.positions[:, 0]), 0)
    np.testing.assert_allclose(np.asarray(out.x[:, 0]), np.asarray(hidden[:, 0]))
    np.testing.assert_allclose(np.asarray(out.sizes.sum(1)), 21.0)              # mass conserved
    assert bool(jnp.all(out.source >= 0))                                      # every patch is held somewhere
    dominant = np.asarray(out.positions[:, 1:6])
    assert (np.diff(dominant, axis=1) > 0).all()                               # dominant in original order


@pytest.mark.long   # the loop-reference comparisons run by default
def test_jit_batch_vmap_gradients_no_retrace():
    attn, metric, hidden, _ = _inputs(5, b=2, t=13)
    red = VisionZip(keep=6, contextual=2)
    traces = []

    def f(a, m, x):
        traces.append(1)
        return _run(red, a, m, x).x

    fj = jax.jit(f)
    eager = f(attn, metric, hidden)
    np.testing.assert_allclose(np.asarray(fj(attn, metric, hidden)), np.asarray(eager), rtol=1e-6, atol=1e-6)
    vm = jax.jit(jax.vmap(  # per example (B = 1 inside the vmap) == the batch
        lambda a, m, x: f(a[None], m[None], x[None])[0]))(attn, metric, hidden)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(eager), rtol=1e-6, atol=1e-6)
    n = len(traces)
    a2, m2, x2, _ = _inputs(6, b=2, t=13)
    fj(a2, m2, x2)
    assert len(traces) == n                                                    # new data, no retrace
    g = jax.jit(jax.grad(lambda x: jnp.sum(f(attn, metric, x) ** 2)))(hidden)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_registry_and_errors():
    assert "visionzip" in R.available_methods("vit") and "visionzip" in R.available_methods("vision")
    assert "visionzip" not in R.available_methods("connector")
    reds = R.build_layer_reducers(12, {"method": "visionzip", "keep": 63})
    assert [i for i, r in enumerate(reds) if r is not None] == [10]            # layer -2 by default
    assert R.build_layer_reducers(1, {"method": "visionzip"})[0] is not None
    assert [i for i, r in enumerate(R.build_layer_reducers(12, {"method": "visionzip", "layers": [11]}))
            if r is not None] == [11]
    with pytest.raises(R.SpecError):
        R.build_layer_reducers(4, {"method": "visionzip"}, point="connector")
    with pytest.raises(ValueError, match="merge"):
        R.build_layer_reducers(4, {"method": "visionzip", "merge": "sum"})
    assert reds[10].flops(577, dim=64, heads=4) > 0


def test_runs_in_the_vit():
    _, aux = vit_forward({"method": "visionzip", "keep": 6, "contextual": 2})
    assert aux["tokens_per_layer"] == [(17, 17), (17, 7), (7, 7)]


def test_runs_in_the_vlm_tower():
    vlm, plan, feats = tower_features({"method": "visionzip", "keep": 6, "contextual": 2})
    assert vlm.num_image_tokens(plan) == 6            # the tower drops the class token (LLaVA's default)
    assert feats.shape[:2] == (2, 6)
