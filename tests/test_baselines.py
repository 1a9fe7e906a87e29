"""Baselines: top-k (EViT / text / FastV), random, pooling; against loop references and invariants."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction.baselines import cls_attention_scores, fastv_keep_indices, pool_step, topk_keep_indices
from tests import ref_pruning as ref


def _attn(b, h, tq, t, seed=0):
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(size=(b, h, tq, t)) * 2)
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def test_topk_matches_reference_with_ties_nan_and_padding():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(3, 15)).astype(np.float32)   # many ties
    s[1, 3] = np.nan
    valid = np.ones((3, 15), bool)
    valid[2, 10:] = False
    got = np.asarray(jax.jit(lambda s, v: topk_keep_indices(s, keep=7, num_protected=2, valid=v))(s, valid))
    for e in range(3):
        se = np.where(np.isnan(s[e]), -np.inf, s[e])
        assert got[e].tolist() == ref.topk_ref(se.tolist(), 7, 2, valid[e])


def test_topk_cls_reducer_is_evit_and_keeps_bookkeeping():
    b, t = 2, 17
    a = _attn(b, 3, t, t, seed=1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(b, t, 5)).astype(np.float32))
    red = R.build_layer_reducers(3, {"method": "topk_cls", "keep_ratio": 0.5, "layers": [0]})[0]
    info = R.LayerInfo(num_protected=1, attention=jnp.asarray(a))
    state = R.init_state(x, track_source=True)
    out = jax.jit(lambda s: red(s, info))(state)
    score = a[:, :, 0, :].mean(1)
    want = np.stack([ref.topk_ref(score[e].tolist(), 9, 1) for e in range(b)])
    ref.check_pruned_state(state, out, want, num_protected=1)
    np.testing.assert_allclose(cls_attention_scores(jnp.asarray(a)), score, rtol=1e-6)


def test_fastv_reducer_in_spans_keeps_text_and_the_last_querys_top_image_tokens():
    b, t, start, length = 2, 12, np.array([2, 3]), 6
    ta = _attn(b, 2, 1, t, seed=3)                      # the last query's attention row
    x = jnp.asarray(np.random.default_rng(4).normal(size=(b, t, 3)).astype(np.float32))
    red = R.build_layer_reducers(3, {"method": "fastv", "keep": 3, "layers": [1]}, point="llm")[1]
    info = R.LayerInfo(layer=1, num_layers=3, text_attention=jnp.asarray(ta), image_starts=jnp.asarray(start),
                       image_len=length)
    state = R.init_state(x)
    out = red(state, info)
    score = ta[:, :, -1, :].mean(1)
    for e in range(b):
        span = list(range(start[e], start[e] + length))
        top = sorted(span, key=lambda i: (-score[e, i], i))[:3]
        want = sorted([i for i in range(t) if i not in span] + top)
        np.testing.assert_array_equal(np.asarray(out.positions)[e], want)
    assert out.x.shape[1] == red.num_out(t, info) == t - 3
    with pytest.raises(R.SpecError, match="cannot run at the 'vit' point"):
        R.build_layer_reducers(2, {"method": "fastv"})


def test_random_is_seeded_keeps_protected_and_differs_per_example():
    x = jnp.zeros((4, 50, 2))
    red = R.build_layer_reducers(2, {"method": "random", "keep_ratio": 0.3, "layers": [0], "seed": 3})[0]
    state = R.init_state(x)
    info = R.LayerInfo(num_protected=2)
    p1, p2 = red(state, info).positions, red(state, info).positions
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (4, 2 + 14)
    assert np.all(np.asarray(p1)[:, :2] == [0, 1])
    assert len({tuple(r) for r in np.asarray(p1).tolist()}) > 1
    other = red(state, R.LayerInfo(num_protected=2, rng=jax.random.key(9))).positions
    assert not np.array_equal(p1, other)


@pytest.mark.parametrize("h,w,k", [(4, 4, 2), (5, 5, 2), (3, 7, 3)])
def test_pool_matches_reference_and_conserves_mass(h, w, k):
    b, p, c = 2, 1, 3
    rng = np.random.default_rng(h * w)
    x = rng.normal(size=(b, p + h * w, c)).astype(np.float32)
    sizes = rng.integers(1, 3, size=(b, p + h * w)).astype(np.float32)
    state = R.init_state(jnp.asarray(x), sizes=jnp.asarray(sizes), track_source=True)
    out = jax.jit(lambda s: R.pool_tokens(s, k=k, num_protected=p, grid=(h, w)))(state)
    for e in range(b):
        wx, ws = ref.pool_ref(x[e], sizes[e], k, p, h, w)
        np.testing.assert_allclose(out.x[e], wx, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.sizes[e], ws)
    np.testing.assert_allclose(np.asarray(out.sizes).sum(1), sizes.sum(1))
    src = np.asarray(R.source_matrix(out.source, out.x.shape[1]))
    np.testing.assert_allclose(np.einsum("btn,bn,bnc->btc", src, sizes, x) / np.asarray(out.sizes)[..., None],
                               out.x, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(R.pool_tokens(R.init_state(x), k=k, num_protected=p, grid=(h, w)).x ** 2))(
        jnp.asarray(x))
    assert np.all(np.isfinite(g))
    red = R.build_layer_reducers(2, {"method": "pool", "k": k, "grid": [h, w]})[0]
    assert red.num_out(p + h * w, R.LayerInfo(num_protected=p)) == out.x.shape[1]


def test_pool_rejects_non_square_without_grid():
    with pytest.raises(ValueError, match="grid"):
        pool_step(1, 1 + 12, k=2)


def test_fastv_keep_indices_matches_reference_batched_spans_and_padding():
    b, t, length = 3, 40, 10
    a = _attn(b, 2, t, t, seed=5)
    starts = np.array([[1, 20], [4, 15], [0, 28]], np.int32)
    valid = np.ones((b, t), bool)
    valid[1, 35:] = False
    out = np.asarray(jax.jit(lambda a, s, v: fastv_keep_indices(a, image_starts=s, image_len=length, budget=3,
                                                                valid=v))(a, starts, valid))
    assert out.shape == (b, t - 2 * 7)
    for e in range(b):
        assert out[e].tolist() == ref.fastv_ref(a[e], list(starts[e]), length, 3, valid[e])
    rows = a[:, :, -6:, :]                                    # only the last 6 query rows
    out_rows = np.asarray(fastv_keep_indices(rows, image_starts=starts, image_len=length, budget=3, valid=valid))
    np.testing.assert_array_equal(out_rows, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = fastv_keep_indices(a, image_starts=starts[:, 0], image_len=length, budget=length)
    assert full.shape == (b, t) and any("nothing is pruned" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="image_starts"):
        fastv_keep_indices(a, image_starts=np.zeros(b, np.float32), image_len=length, budget=3)
