"""Fast smoke checks of the shared core; the full suites live beside each method."""

import numpy as np
import jax.numpy as jnp
import pytest

import reduction as R


def test_tome_r13_token_counts_match_reference():
    reducers = R.build_layer_reducers(12, {"method": "tome", "r": 13})
    counts = [a for a, _ in R.tokens_per_layer(197, reducers)] + [R.tokens_per_layer(197, reducers)[-1][1]]
    assert counts[0] == 197 and counts[1] == 184 and counts[-1] == 41


def test_parse_r_decreasing_schedule():
    assert R.tome_r_schedule(12, (16, -1.0)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert R.tome_r_schedule(12, (8, -1.0)) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]


def test_merge_keeps_mass_and_source_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 21, 6)).astype(np.float32)
    state = R.init_state(jnp.asarray(x), track_source=True)
    out = R.tome_merge(state, jnp.asarray(rng.normal(size=(2, 21, 4))), r=5, class_token=True)
    assert out.x.shape == (2, 16, 6)
    np.testing.assert_allclose(np.asarray(out.sizes).sum(1), 21.0)
    src = np.asarray(R.source_matrix(out.source, 16))
    np.testing.assert_allclose(np.einsum("btn,bnc->btc", src, x) / src.sum(-1, keepdims=True), out.x, atol=1e-6)


def test_negative_r_is_a_value_error():
    with pytest.raises(ValueError, match="r must be"):
        R.bipartite_soft_matching(jnp.zeros((1, 5, 3)), r=-1)
