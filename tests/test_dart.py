"""DART: static count rule, CPython set-order emulation, batched multi-image selection vs the loop reference."""

import random
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction.dart import cpython_set_order, dart_keep_indices, dart_kept_per_image, dart_vit_keep_indices
from tests import ref_pruning as ref


def _data(b, t, c=12, ck=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, t, c)).astype(np.float32), rng.normal(size=(b, t, ck)).astype(np.float32)


def test_kept_count_rule_matches_reference_numbers():
    assert [dart_kept_per_image(576, b) for b in (192, 128, 64)] == [196, 132, 68]
    assert dart_kept_per_image(576, 124 * 0 + 15 * 8) == 124
    assert dart_kept_per_image(20, 64) == 20                     # clamped: keep everything
    assert dart_kept_per_image(10, 7) == 4                       # TOKEN_TOPK = 0: only the image pivots
    assert R.dart_keeps_all(20, 16) is True and R.dart_keeps_all(40, 16) is False


def test_cpython_set_order_equals_real_set_iteration():
    fn = jax.jit(cpython_set_order)
    rng = random.Random(1)
    for _ in range(60):
        n = rng.choice([8, 8, 3, 12])
        vals = rng.sample(range(rng.choice([40, 700, 5000])), n)
        got = [vals[i] for i in np.asarray(fn(jnp.asarray(vals, jnp.int32)))]
        assert got == list(set(vals).copy())


@pytest.mark.parametrize("order,source", [("ascending", "keys"), ("cpython_set", "keys"), ("ascending", "hidden")])
def test_batched_multi_image_matches_loop_reference(order, source):
    b, t, length = 3, 64, 14
    h, k = _data(b, t, seed=3)
    starts = np.array([[2, 30], [5, 22], [0, 40]], np.int32)
    valid = np.ones((b, t), bool)
    valid[1, 58:] = False                                        # right padding in one example
    fn = jax.jit(lambda h, k, s, v: dart_keep_indices(h, k, image_starts=s, image_len=length, budget=8, valid=v,
                                                      pivot_source=source, pivot_order=order))
    out = np.asarray(fn(h, k, starts, valid))
    kept = dart_kept_per_image(length, 8)
    assert out.shape == (b, t - 2 * (length - kept))
    for e in range(b):
        want = ref.dart_ref(h[e], k[e], list(starts[e]), length, 8, valid[e], source=source, order=order)
        assert out[e].tolist() == want


def test_batch_equals_each_example_alone_and_jit_equals_eager():
    b, t, length = 3, 48, 16
    h, k = _data(b, t, seed=5)
    starts = np.array([3, 9, 17], np.int32)
    kw = dict(image_len=length, budget=8, pivot_order="cpython_set")
    fn = jax.jit(lambda h, k, s: dart_keep_indices(h, k, image_starts=s, **kw))
    full = np.asarray(fn(h, k, starts))
    for e in range(b):                                           # one compile for all B=1 calls
        np.testing.assert_array_equal(full[e:e + 1], fn(h[e:e + 1], k[e:e + 1], starts[e:e + 1]))
    kw["pivot_order"] = "ascending"                              # eager once (the cheap order)
    np.testing.assert_array_equal(jax.jit(lambda h, k, s: dart_keep_indices(h, k, image_starts=s, **kw))(h, k, starts),
                                  dart_keep_indices(h, k, image_starts=starts, **kw))


def test_missing_text_pivots_take_earliest_candidates():
    t, length = 24, 16
    h, k = _data(1, t, seed=7)
    valid = np.ones((1, t), bool)
    valid[0, 20:] = False                                        # only 2 valid text tokens after the span
    out = np.asarray(dart_keep_indices(h, k, image_starts=np.array([2]), image_len=length, budget=8, valid=valid))
    assert out[0].tolist() == ref.dart_ref(h[0], k[0], [2], length, 8, valid[0])


def test_no_retrace_on_new_data_and_new_spans():
    traces = []

    @jax.jit
    def fn(h, k, s):
        traces.append(1)
        return dart_keep_indices(h, k, image_starts=s, image_len=16, budget=8)

    for seed in range(3):
        h, k = _data(2, 40, seed=seed)
        fn(h, k, np.array([seed, 2 * seed + 7], np.int32))
    assert len(traces) == 1


def test_budget_at_or_above_span_keeps_everything_with_warning():
    h, k = _data(2, 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dart_keep_indices(h, k, image_starts=np.array([1, 4]), image_len=12, budget=64)
    assert any("nothing is pruned" in str(w.message) for w in caught)
    np.testing.assert_array_equal(out, np.broadcast_to(np.arange(30), (2, 30)))


def test_zero_norm_and_duplicate_tokens_are_finite_and_deterministic():
    h, k = _data(1, 40, seed=2)
    h[0, 5:15] = 0.0                                             # zero-norm image tokens
    h[0, 15:20] = h[0, 20]                                       # duplicates
    out = np.asarray(dart_keep_indices(h, k, image_starts=np.array([4]), image_len=24, budget=8))
    assert out[0].tolist() == ref.dart_ref(h[0], k[0], [4], 24, 8)


@pytest.mark.parametrize("kwargs,name", [
    (dict(image_starts=np.array([1.0, 2.0])), "image_starts"),
    (dict(image_starts=np.zeros((2, 1, 1), np.int32)), "image_starts"),
    (dict(image_starts=np.array([0, 0]), pivot_order="sorted"), "pivot_order"),
    (dict(image_starts=np.array([0, 0]), pivot_source="values"), "pivot_source"),
    (dict(image_starts=np.array([0, 0]), budget=-1), "budget"),
    (dict(image_starts=np.array([0, 0]), budget=8.0), "budget"),
    (dict(image_starts=np.zeros((2, 3), np.int32), image_len=12), "image_len"),
    (dict(image_starts=np.array([0, 0]), valid=np.ones((2, 5), bool)), "valid"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    h, k = _data(2, 30)
    args = dict(image_len=10, budget=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        jax.jit(lambda h, k: dart_keep_indices(h, k, **args))(h, k)


def test_vit_variant_matches_reference_and_reducer_bookkeeping():
    x, kk = _data(2, 37, c=8, ck=10, seed=11)
    out = np.asarray(dart_vit_keep_indices(jnp.asarray(x), keep=20, num_protected=1, keys=jnp.asarray(kk)))
    for e in range(2):
        assert out[e].tolist() == ref.dart_vit_ref(x[e], 20, 1, 8, kk[e])
    reducers = R.build_layer_reducers(4, {"method": "dart", "keep_ratio": 0.5, "layers": [1]})
    red = reducers[1]
    info = R.LayerInfo(layer=1, num_layers=4, num_protected=1, keys=jnp.asarray(kk))
    state = R.init_state(jnp.asarray(x), track_source=True)
    new = jax.jit(lambda s: red(s, info))(state)
    assert new.x.shape[1] == red.num_out(37, info) == 19
    idx = dart_vit_keep_indices(jnp.asarray(x), keep=19, num_protected=1, keys=jnp.asarray(kk))
    ref.check_pruned_state(state, new, idx, num_protected=1)
