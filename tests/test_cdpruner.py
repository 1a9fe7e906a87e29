"""CDPruner: the fast greedy DPP update vs the naive greedy log-det loop, exhausted kernels, validity, the query
relevance, the LLM span path (multi-image, left padding), the reducer, the registry, gradients, its cost at
LLaVA size and a batched ``VLM.generate`` run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction
from reduction import flops as flops_lib
from reduction.cdpruner import (CDPruner, cdpruner_keep_indices, dpp_flops, dpp_greedy_order, dpp_kernel,
                                dpp_keep_indices, query_relevance, relevance_flops)
from reduction.reducers import LayerInfo, SpecError, build_layer_reducers
from tests import ref_pruning as ref


def _x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


_order = jax.jit(jax.vmap(lambda x, r, v: dpp_greedy_order(dpp_kernel(x, r), x.shape[0], v)))
_span = jax.jit(cdpruner_keep_indices, static_argnames=("image_len", "kept", "relevance", "theta"))


# -- the greedy MAP -------------------------------------------------------------------------------------------


def test_fast_update_equals_naive_greedy_logdet_for_every_k():
    """Four kernels (two with relevance, one plain cosine, one with invalid tokens) in one call; the full
    order, hence every k by prefix, equals the determinant-per-candidate reference."""
    b, n, c = 4, 20, 32
    x = _x((b, n, c), 0)
    rng = np.random.default_rng(1)
    r = rng.uniform(0.2, 1.0, size=(b, n)).astype(np.float32)
    r[2] = 1.0
    valid = np.ones((b, n), bool)
    valid[3, [0, 5, 6, 13]] = False
    got = np.asarray(_order(x, r, valid))
    for e in range(b):
        kern = ref.dpp_kernel_ref(x[e], r[e])
        np.testing.assert_allclose(np.asarray(dpp_kernel(jnp.asarray(x[e]), jnp.asarray(r[e]))), kern, atol=1e-5)
        want, gap, near = ref.dpp_greedy_ref(kern, n, valid[e])
        assert gap > 1e-4 and near > 1e-5, "ill-posed test data; pick another seed"
        assert got[e].tolist() == want
    assert got[3][-4:].tolist() == [0, 5, 6, 13]                 # invalid tokens last, lowest index first
    # the first pick is the largest diagonal r_i^2, i.e. the most relevant token
    assert got[0][0] == int(np.argmax(r[0]))


def test_exhausted_kernel_is_finite_and_falls_back_to_index_order():
    """12 tokens in 3 dimensions: rank 3, so after 3 picks every gain is ~0 (the official code would take
    sqrt of a non-positive number); the rest follow in index order, as in the reference."""
    n = 12
    x = _x((1, n, 3), 2)
    r = np.random.default_rng(3).uniform(0.3, 1.0, size=(1, n)).astype(np.float32)
    got = np.asarray(_order(x, r, np.ones((1, n), bool)))[0].tolist()
    want, _, _ = ref.dpp_greedy_ref(ref.dpp_kernel_ref(x[0], r[0]), n)
    assert got == want and sorted(got) == list(range(n))
    assert got[3:] == sorted(got[3:])


def test_relevance_matches_reference_and_conditions_the_selection():
    """Relevance vs the loop reference (every option, multi-image, padding, no query); then a case built so
    the question decides: cluster A is aligned with the instruction tokens, cluster B is not."""
    b, t, c, length = 3, 26, 8, 8
    h = _x((b, t, c), 4)
    starts = np.array([[2, 12], [3, 14], [10, 18]])              # example 2: no text after its first image
    valid = np.ones((b, t), bool)
    valid[1, :3] = False                                         # left padding
    for rel, theta in (("similarity", None), ("negative", None), ("similarity", 0.5), ("none", None)):
        got = np.asarray(query_relevance(jnp.asarray(h), jnp.asarray(starts), length, jnp.asarray(valid),
                                         relevance=rel, theta=theta))
        for e in range(b):
            want = ref.query_relevance_ref(h[e], starts[e].tolist(), length, valid[e], rel, theta)
            img = [i for i in range(t) if any(s <= i < s + length for s in starts[e])]
            np.testing.assert_allclose(got[e, img], want[img], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got[2], 1.0)                  # no instruction token: r = 1

    # the question decides: 16 image tokens, 8 near direction a (the instruction's), 8 near b (orthogonal)
    rng = np.random.default_rng(5)
    a, bdir = np.eye(16)[0], np.eye(16)[1]
    img = np.concatenate([a + 0.3 * rng.normal(size=(8, 16)), bdir + 0.3 * rng.normal(size=(8, 16))])
    perm = rng.permutation(16)
    seq = np.concatenate([rng.normal(size=(2, 16)), img[perm], a + 0.1 * rng.normal(size=(4, 16))])[None]
    in_a = lambda pos: perm[pos - 2] < 8
    for rel, want_a in (("similarity", True), ("negative", False)):
        idx = np.asarray(_span(jnp.asarray(seq, jnp.float32), jnp.array([2]), image_len=16, kept=4,
                               relevance=rel))[0]
        kept = [i for i in idx.tolist() if 2 <= i < 18]
        assert sum(in_a(i) == want_a for i in kept) >= 3, (rel, kept)


def test_span_path_matches_reference_multi_image_and_left_padding():
    b, t, c, length, kept = 2, 30, 16, 10, 4
    h = _x((b, t, c), 6)
    starts = np.array([[1, 14], [4, 16]])
    valid = np.ones((b, t), bool)
    valid[1, :2] = False
    idx = np.asarray(_span(jnp.asarray(h), jnp.asarray(starts), image_len=length, kept=kept,
                           valid=jnp.asarray(valid)))
    assert idx.shape == (b, t - 2 * (length - kept))
    for e in range(b):
        r = ref.query_relevance_ref(h[e], starts[e].tolist(), length, valid[e])
        want = [i for i in range(t) if not any(s <= i < s + length for s in starts[e])]
        for s in starts[e]:
            order, gap, _ = ref.dpp_greedy_ref(ref.dpp_kernel_ref(h[e, s:s + length], r[s:s + length]), kept)
            assert gap > 1e-4
            want += [s + i for i in order]
        assert idx[e].tolist() == sorted(want)
    # the same prompt alone == left-padded next to a longer one (loud pad values are ignored)
    alone = np.asarray(_span(jnp.asarray(h[:1]), jnp.asarray(starts[:1]), image_len=length, kept=kept))[0]
    pad = 5
    hb = np.stack([_x((t + pad, c), 7), np.concatenate([np.full((pad, c), 50.0, np.float32), h[0]])])
    vb = np.stack([np.ones(t + pad, bool), np.arange(t + pad) >= pad])
    out = np.asarray(_span(jnp.asarray(hb), jnp.asarray(np.stack([starts[0] + 3, starts[0] + pad])),
                           image_len=length, kept=kept, valid=jnp.asarray(vb)))[1]
    np.testing.assert_array_equal(out[:pad], np.arange(pad))
    np.testing.assert_array_equal(out[pad:] - pad, alone)


# -- the reducer ------------------------------------------------------------------------------------------------


def test_reducer_jit_eager_vmap_loop_and_no_retrace():
    b, t, c = 3, 17, 8
    x = jnp.asarray(_x((b, t, c), 8))
    red = CDPruner(keep=5)
    info = LayerInfo(num_protected=1)
    state = reduction.init_state(x, track_source=True)
    traces = []

    @jax.jit
    def fn(s):
        traces.append(1)
        return red(s, info)

    out = fn(state)
    eager = red(state, info)
    np.testing.assert_array_equal(out.positions, eager.positions)
    loop = [[0] + [i + 1 for i in sorted(ref.dpp_greedy_ref(ref.dpp_kernel_ref(np.asarray(x[e, 1:])), 5)[0])]
            for e in range(b)]
    np.testing.assert_array_equal(out.positions, loop)              # r = 1 off the LLM; protected token kept
    np.testing.assert_array_equal(out.x, np.take_along_axis(np.asarray(x), np.asarray(loop)[..., None], 1))
    np.testing.assert_array_equal(np.asarray(out.sizes).sum(-1), [6] * b)
    for seed in (9, 10):
        fn(reduction.init_state(jnp.asarray(_x((b, t, c), seed)), track_source=True))
    assert len(traces) == 1
    valid = np.ones((b, t), bool)
    valid[0, 9:] = False
    idx = np.asarray(jax.jit(lambda v: dpp_keep_indices(x, keep=5, num_protected=1, valid=v))(valid))
    assert np.all(idx[0] < 9) and idx[1].tolist() == loop[1]


def test_gradients_flow_through_the_gather_only():
    b, t, c = 2, 13, 8
    x = jnp.asarray(_x((b, t, c), 11))
    w = jnp.asarray(_x((b, 5, c), 12))
    red = CDPruner(keep=4)

    def loss(x):
        return jnp.sum(red(reduction.init_state(x), LayerInfo(num_protected=1, hidden=x)).x * w)

    g = np.asarray(jax.grad(loss)(x))
    idx = np.asarray(red(reduction.init_state(x), LayerInfo(num_protected=1)).positions)
    want = np.zeros_like(g)
    for e in range(b):
        want[e, idx[e]] = np.asarray(w[e])
    np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("point", ["vit", "vision", "connector", "llm"])
def test_registry_builds_at_every_point(point):
    reds = build_layer_reducers(4, {"method": "cdpruner", "keep": 3, "layers": [1], "relevance": "negative"},
                                point=point)
    assert reds[1] == CDPruner(keep=3, relevance="negative") and reds.count(None) == 3


@pytest.mark.parametrize("spec,err,name", [
    ({"relevence": "none"}, SpecError, "relevance"), ({"relevance": "cos"}, ValueError, "relevance"),
    ({"theta": 1.0}, ValueError, "theta"), ({"keep": 0}, ValueError, "keep"),
    ({"keep_ratio": 0.0}, ValueError, "keep_ratio"),
])
def test_registry_rejects_bad_specs(spec, err, name):
    with pytest.raises(err, match=name):
        build_layer_reducers(4, dict({"method": "cdpruner"}, **spec), point="llm")


@pytest.mark.parametrize("call,name", [
    (lambda: dpp_greedy_order(jnp.zeros((4, 5)), 2), "square"),
    (lambda: dpp_greedy_order(jnp.eye(4), 5), "kept"),
    (lambda: dpp_greedy_order(jnp.eye(4), 2, jnp.ones(3, bool)), "valid"),
    (lambda: dpp_kernel(jnp.zeros((4, 3)), jnp.ones(5)), "relevance"),
    (lambda: query_relevance(jnp.zeros((2, 9, 3)), jnp.array([1]), 4), "image_starts"),
    (lambda: cdpruner_keep_indices(jnp.zeros((1, 9, 3)), jnp.array([1]), image_len=4, kept=5), "kept"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_own_cost_is_under_five_percent_of_a_llava_decoder_layer():
    """Analytic, at LLaVA-1.5-7B sizes: dim 4096, 32 heads, MLP 11008 (gated), 600 tokens of which 576 are
    image tokens, keeping 1/9 and 1/3 of them."""
    layer = flops_lib.block_flops(600, 600, 4096, 11008, gated=True)
    for kept in (64, 192):
        own = dpp_flops(576, kept, 4096) + relevance_flops(600, 4096)
        assert own / layer < 0.05
        assert own >= 2 * 576 * 576 * 4096                              # at least the Gram matrix
    upper = CDPruner(keep=192).flops(600, dim=4096, heads=32)          # every token counted as a candidate
    assert dpp_flops(576, 192, 4096) < upper < 0.05 * layer


# -- through the VLM --------------------------------------------------------------------------------------------


def test_vlm_generate_batched_left_padded_equals_one_by_one():
    from tests.test_vlm import _check_batched_equals_single

    from flax import nnx
    from tests.test_vlm import CFG
    from models.vlm import VLM

    vlm = VLM(CFG, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plan = vlm.build_plan({"point": "llm", "method": "cdpruner", "layers": [2], "keep": 5})
    n, ids, valid, info = _check_batched_equals_single(vlm, images, plan)
    lengths = np.asarray(info["prefill_lengths"])
    real = np.asarray(valid).sum(1)
    np.testing.assert_array_equal(lengths[:2], np.stack([real, real]))
    np.testing.assert_array_equal(lengths[2:], np.stack([real - (n - 5)] * 2))
