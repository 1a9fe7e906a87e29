"""VisPruner: important + diverse tokens vs a loop reference written from the official code's description,
invariants, jit/batch/gradients/retrace, the registry, and runs in the ViT and the VLM tower. Small shapes only."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction.vispruner import VisPruner, vispruner_counts, vispruner_flops, vispruner_schedule
from tests.method_smoke import vit_forward, tower_features

# -- loop reference -------------------------------------------------------------------------------------------


def ref_vispruner(attn, feats, p, keep, ratio):
    """One example. ``attn: [H, T]`` class row, ``feats: [T, C]`` -> kept indices (prefix + ascending)."""
    attn, feats = np.asarray(attn, np.float64), np.asarray(feats, np.float64)
    h, t = attn.shape
    n = t - p
    score = [sum(attn[k, p + j] for k in range(h)) / h for j in range(n)]        # mean over heads
    imp_n = int(keep * ratio)
    div_n = keep - imp_n
    ranked = sorted(range(n), key=lambda j: (-score[j], j))                     # descending, stable
    important, residual = ranked[:imp_n], ranked[imp_n:]
    norm = lambda v: v / max(math.sqrt(sum(float(c) * float(c) for c in v)), 1e-12)
    fn = [norm(feats[p + j]) for j in range(n)]
    while len(residual) > div_n:
        r_t = min(8, len(residual) - div_n)
        a, b = residual[0::2], residual[1::2]
        s = [max((float(np.dot(fn[i], fn[j])) for j in b), default=-math.inf) for i in a]
        order = sorted(range(len(a)), key=lambda i: (-s[i], i))                 # descending, stable
        a_sorted = [a[i] for i in order]
        residual = a_sorted[r_t:] + b
    return list(range(p)) + sorted(p + j for j in important + residual)


def _inputs(seed, b=3, t=37, h=2, c=6):
    ks = jax.random.split(jax.random.key(seed), 2)
    attn = jax.nn.softmax(jax.random.normal(ks[0], (b, h, t, t)) * 2, axis=-1)
    hidden = jax.random.normal(ks[1], (b, t, c))
    return attn, hidden


def _run(red, attn, hidden, p=1):
    return red(R.init_state(hidden, track_source=True), R.LayerInfo(num_protected=p, attention=attn, hidden=hidden))


_run_jit = jax.jit(_run, static_argnums=(0, 3))

CASES = [  # (T, P, keep, important_ratio)
    (37, 1, 12, 0.5),     # 36 candidates: residual 30 -> 6 in iterations of 8, 8, 8
    (37, 1, 9, 0.3),      # odd residual lengths
    (37, 2, 10, 0.0),     # all diverse
    (37, 1, 10, 1.0),     # all important: top-k by attention
    (37, 1, 3, 0.4),      # one important, two diverse; |R| = 1 steps not reached
]


@pytest.mark.parametrize("t,p,keep,ratio", CASES)
def test_matches_loop_reference(t, p, keep, ratio):
    attn, hidden = _inputs(t + keep + int(ratio * 10), t=t)
    red = VisPruner(keep=keep, important_ratio=ratio)
    assert red.num_out(t, R.LayerInfo(num_protected=p)) == p + keep
    out = _run_jit(red, attn, hidden, p)
    assert out.x.shape == (3, p + keep, 6)
    for i in range(3):
        idx = ref_vispruner(attn[i, :, 0], hidden[i], p, keep, ratio)
        np.testing.assert_array_equal(np.asarray(out.positions[i]), idx)
        np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(hidden[i])[idx])


def test_schedule_matches_official_iteration_count():
    imp, div = vispruner_counts(64, 0.5)
    assert (imp, div) == (32, 32)
    assert len(vispruner_schedule(576, imp, div)) == 64                        # LLaVA-1.5 at 64 tokens
    assert vispruner_flops(576, dim=1024, heads=16, important=imp, diverse=div) > 0
    # |R| = 1 with nothing diverse: the last token is dropped
    assert vispruner_schedule(3, 1, 0) == [2, 1]


def test_invariants_and_class_token():
    attn, hidden = _inputs(2)
    attn = attn.at[:, :, 0, 0].set(0.0)
    out = _run_jit(VisPruner(keep=7), attn, hidden, 1)
    np.testing.assert_array_equal(np.asarray(out.positions[:, 0]), 0)
    assert (np.diff(np.asarray(out.positions), axis=1) > 0).all()              # original order, unique
    np.testing.assert_array_equal(np.asarray(out.sizes), 1.0)


def test_jit_batch_vmap_gradients_no_retrace():
    attn, hidden = _inputs(4, b=2, t=21)
    red = VisPruner(keep=8)
    traces = []

    def f(a, x):
        traces.append(1)
        return _run(red, a, x).x

    fj = jax.jit(f)
    eager = f(attn, hidden)
    np.testing.assert_array_equal(np.asarray(fj(attn, hidden)), np.asarray(eager))
    vm = jax.jit(jax.vmap(  # per example (B = 1 inside the vmap) == the batch
        lambda a, x: f(a[None], x[None])[0]))(attn, hidden)
    np.testing.assert_array_equal(np.asarray(vm), np.asarray(eager))
    n = len(traces)
    fj(*_inputs(5, b=2, t=21))
    assert len(traces) == n
    g = jax.jit(jax.grad(lambda x: jnp.sum(f(attn, x) ** 2)))(hidden)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_registry_and_errors():
    assert "vispruner" in R.available_methods("vit") and "vispruner" in R.available_methods("vision")
    assert "vispruner" not in R.available_methods("connector")
    reds = R.build_layer_reducers(12, {"method": "vispruner", "keep": 64})
    assert [i for i, r in enumerate(reds) if r is not None] == [10]
    with pytest.raises(R.SpecError):
        R.build_layer_reducers(4, {"method": "vispruner"}, point="connector")
    with pytest.raises(ValueError, match="important_ratio"):
        R.build_layer_reducers(4, {"method": "vispruner", "important_ratio": 1.5})
    assert reds[10].flops(577, dim=64, heads=4) > 0


def test_runs_in_the_vit_and_the_vlm_tower():
    _, aux = vit_forward({"method": "vispruner", "keep": 6})
    assert aux["tokens_per_layer"] == [(17, 17), (17, 7), (7, 7)]
    vlm, plan, feats = tower_features({"method": "vispruner", "keep": 6})
    assert vlm.num_image_tokens(plan) == 6 and feats.shape[:2] == (2, 6)
