"""Property tests of the merge ops (hypothesis): random plans, sizes, NaN/Inf placement, duplicate and zero rows.

Shapes come from fixed buckets and every jitted function is compiled once per bucket (the data vary, the shapes do
not), so the default run stays within a few seconds; ``-m long`` runs a larger bucket with more examples.

Properties, each against the loop reference in this file:
* the few-movers and the scatter-add merge paths agree (``reduction.step._SPARSE_MERGE_MAX_MOVERS``);
* both equal the loop merge; with finite inputs the mass ``sum s x`` and the sizes are conserved;
* a NaN or Inf reaches only the slot its token is assigned to (and none when its weight is 0);
* ToMe's protected prefix (class token, registers) survives unchanged, whatever the metric holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import reduction as R
from reduction import step as step_lib
from reduction.tome import bipartite_soft_matching

FAST = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SMALL = (2, 12, 5, 3)        # B, T, K, C: 7 movers
LARGE = (3, 40, 9, 4)        # 31 movers


@functools.lru_cache(maxsize=None)
def _merge_fns(bucket):
    """``(few_movers, scatter_add)`` compiled for one bucket; the path is fixed when each is lowered."""
    b, t, k, c = bucket
    args = (jax.ShapeDtypeStruct((b, t, c), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.float32),
            jax.ShapeDtypeStruct((b, t), bool), jax.ShapeDtypeStruct((b, t), jnp.int32),
            jax.ShapeDtypeStruct((b, k), jnp.int32))

    def fn(x, sizes, valid, assign, anchor):
        out = R.apply_step(R.init_state(x, sizes=sizes, valid=valid), R.merge_step(assign, anchor))
        return out.x, out.sizes

    old = step_lib._SPARSE_MERGE_MAX_MOVERS
    try:
        step_lib._SPARSE_MERGE_MAX_MOVERS = t
        few = jax.jit(fn).lower(*args).compile()
        step_lib._SPARSE_MERGE_MAX_MOVERS = -1
        dense = jax.jit(fn).lower(*args).compile()
    finally:
        step_lib._SPARSE_MERGE_MAX_MOVERS = old
    return few, dense


@st.composite
def merge_cases(draw, bucket):
    """A merge plan with its inputs: several movers per slot, dropped movers, zero sizes, padding, and rows that
    are NaN/Inf, duplicates of other rows or zero vectors."""
    b, t, k, c = bucket
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(b, t, c)).astype(np.float32)
    for _ in range(draw(st.integers(0, 3))):                    # duplicates
        e, i, j = rng.integers(b), rng.integers(t), rng.integers(t)
        x[e, i] = x[e, j]
    for _ in range(draw(st.integers(0, 2))):                    # zero vectors
        x[rng.integers(b), rng.integers(t)] = 0.0
    bad = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=3))
    for v in bad:                                               # NaN / Inf entries
        x[rng.integers(b), rng.integers(t), rng.integers(c)] = v
    kind = draw(st.sampled_from(["ones", "ints", "floats"]))
    sizes = {"ones": np.ones((b, t)), "ints": rng.integers(0, 4, size=(b, t)),
             "floats": rng.uniform(0.1, 3.0, size=(b, t))}[kind].astype(np.float32)
    valid = rng.uniform(size=(b, t)) > draw(st.sampled_from([0.0, 0.2]))
    assign = np.full((b, t), -1, np.int32)
    anchor = np.zeros((b, k), np.int32)
    drop = draw(st.sampled_from([0.0, 0.2]))
    for e in range(b):
        perm = rng.permutation(t)
        anchor[e] = np.sort(perm[:k]) if draw(st.booleans()) else perm[:k]
        assign[e, anchor[e]] = np.arange(k)
        rest = perm[k:]
        assign[e, rest] = np.where(rng.uniform(size=rest.size) < drop, -1, rng.integers(0, k, size=rest.size))
    return x, sizes, valid, assign, anchor


def _merge_ref(x, sizes, valid, assign, anchor):
    """Loop merge of one example in float64: a slot holding only its anchor is the anchor's row as it is; a slot
    with movers is ``sum w x / sum w`` over its members of weight ``w = size * valid > 0``."""
    k = anchor.shape[0]
    w = np.where(valid, sizes, 0.0).astype(np.float64)
    out = np.zeros((k, x.shape[1]))
    size = np.zeros(k)
    for j in range(k):
        members = [t for t in range(x.shape[0]) if assign[t] == j]
        size[j] = sum(w[t] for t in members)
        if members == [anchor[j]]:
            out[j] = x[anchor[j]]
            continue
        mass = np.zeros(x.shape[1])
        with np.errstate(invalid="ignore"):
            for t in members:
                if w[t] > 0:
                    mass = mass + w[t] * x[t].astype(np.float64)
            out[j] = mass / max(size[j], np.finfo(np.float32).tiny)
    return out, size


def _same(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-5, atol=2e-5)


def _check_merge(bucket, case):
    x, sizes, valid, assign, anchor = case
    few, dense = _merge_fns(bucket)
    fx, fs = few(x, sizes, valid, assign, anchor)
    dx, ds = dense(x, sizes, valid, assign, anchor)
    _same(fx, dx)                                                # both paths agree
    np.testing.assert_allclose(np.asarray(fs), np.asarray(ds), rtol=1e-6)
    for e in range(bucket[0]):
        rx, rs = _merge_ref(x[e], sizes[e], valid[e], assign[e], anchor[e])
        _same(fx[e], rx)                                         # NaN/Inf only where the reference has them
        np.testing.assert_allclose(np.asarray(fs[e]), rs, rtol=1e-5)
        kept = assign[e] >= 0
        w = np.where(valid[e], sizes[e], 0.0).astype(np.float64)
        np.testing.assert_allclose(np.asarray(fs[e]).sum(), w[kept].sum(), rtol=1e-5)   # sizes conserved
        if np.isfinite(x[e]).all():                              # mass conserved (slots with a weight)
            out_w = np.asarray(fs[e], np.float64)
            mass = (out_w[:, None] * np.asarray(fx[e], np.float64)).sum(0)
            np.testing.assert_allclose(mass, (w[kept, None] * x[e][kept]).sum(0), rtol=1e-4, atol=1e-4)


@FAST
@given(merge_cases(SMALL))
def test_merge_paths_agree_conserve_mass_and_keep_nan_in_its_slot(case):
    _check_merge(SMALL, case)


@pytest.mark.long
@LONG
@given(merge_cases(LARGE))
def test_merge_properties_large(case):
    _check_merge(LARGE, case)


# -- ToMe's protected prefix ---------------------------------------------------------------------------------

TOME_BUCKET = (2, 14, 4)     # B, T, C


@functools.lru_cache(maxsize=None)
def _tome_fn(num_protected, r):
    def fn(x):
        state = R.init_state(x, track_source=True)
        out = R.apply_step(state, bipartite_soft_matching(x, r=r, num_protected=num_protected))
        return out.x, out.sizes, out.positions, out.source

    return jax.jit(fn)


@st.composite
def metrics(draw):
    b, t, c = TOME_BUCKET
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(b, t, c)).astype(np.float32)
    for _ in range(draw(st.integers(0, 4))):                    # duplicates, also of protected tokens
        e, i, j = rng.integers(b), rng.integers(t), rng.integers(t)
        x[e, i] = x[e, j]
    for _ in range(draw(st.integers(0, 2))):
        x[rng.integers(b), rng.integers(t)] = 0.0
    for v in draw(st.lists(st.sampled_from([np.nan, np.inf]), max_size=2)):
        x[rng.integers(b), rng.integers(t), rng.integers(c)] = v
    return x, draw(st.sampled_from([1, 3])), draw(st.sampled_from([3, 6]))


@FAST
@given(metrics())
def test_tome_protected_prefix_survives(case):
    x, p, r = case
    ox, osz, opos, osrc = _tome_fn(p, r)(x)
    t = TOME_BUCKET[1]
    assert ox.shape[1] == t - min(r, (t - p) // 2)
    np.testing.assert_array_equal(np.asarray(ox[:, :p]), x[:, :p])          # bit for bit, NaN included
    np.testing.assert_array_equal(np.asarray(osz[:, :p]), 1.0)
    np.testing.assert_array_equal(np.asarray(opos[:, :p]), np.broadcast_to(np.arange(p), (x.shape[0], p)))
    src = np.asarray(osrc)
    for q in range(p):                                                       # nothing else joined them
        assert (src == q).sum(axis=1).tolist() == [1] * x.shape[0]
    np.testing.assert_allclose(np.asarray(osz).sum(1), t)                    # sizes conserved
    # A NaN/Inf in a non-protected token reaches at most its own slot.
    for e in range(x.shape[0]):
        bad = {int(src[e, i]) for i in range(t) if not np.isfinite(x[e, i]).all()}
        hit = {j for j in range(ox.shape[1]) if not np.isfinite(np.asarray(ox[e, j])).all()}
        assert hit <= bad
