"""CDPruner: the fast greedy DPP update vs the naive greedy log-det loop, exhausted kernels, validity, the query
relevance, the LLM span path (multi-image, left padding), the reducer, the registry, gradients, its cost at
LLaVA size and a batched ``VLM.generate`` run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction
from reduction import flops as flops_lib
from reduction.cdpruner import (CDPruner, cdpruner_keep_indices, dpp_flops, dpp_greedy_order, dpp_kernel,
                                query_relevance, relevance_flops)
from reduction.reducers import LayerInfo, SpecError, build_layer_reducers
from tests import ref_pruning as ref


def _x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


_order = jax.jit(jax.vmap(lambda x, r, v: dpp_greedy_order(dpp_kernel(x, r), x.shape[0], v)))
_span = jax.jit(cdpruner_keep_indices, static_argnames=("image_len", "kept", "relevance", "theta"))


# -- the greedy MAP -------------------------------------------------------------------------------------------


def _question_case(rng, n=20, c=32):
    """Image tokens in two clusters (A near e0, B near e1, shuffled) and instruction tokens near e0."""
    e0, e1 = np.eye(c)[0], np.eye(c)[1]
    img = np.concatenate([e0 + 0.3 * rng.normal(size=(n // 2, c)), e1 + 0.3 * rng.normal(size=(n // 2, c))])
    perm = rng.permutation(n)
    seq = np.concatenate([rng.normal(size=(2, c)), img[perm], e0 + 0.1 * rng.normal(size=(4, c))])
    return seq.astype(np.float32), perm < n // 2


def test_fast_update_equals_naive_greedy_logdet_for_every_k():
    """Seven kernels in one call: two with random relevance, a plain cosine one (r = 1, exact first ties),
    one with invalid tokens, a rank-3 one (exhausted after 3 picks: the official code would take the square
    root of a non-positive number) and a question case with ``r`` from the instruction tokens (either sign).
    The full order, hence every k by prefix, equals the determinant-per-candidate reference."""
    b, n, c = 7, 20, 32
    rng = np.random.default_rng(1)
    x = _x((b, n, c), 0)
    x[4] = rng.normal(size=(n, 3)) @ rng.normal(size=(3, c))            # rank 3
    r = rng.uniform(0.2, 1.0, size=(b, n)).astype(np.float32)
    r[2] = 1.0
    seq, in_a = _question_case(rng)
    for e, rel in ((5, "similarity"), (6, "negative")):
        x[e] = seq[2:22]
        r[e] = ref.query_relevance_ref(seq, [2], n, relevance=rel)[2:22]
    valid = np.ones((b, n), bool)
    valid[3, [0, 5, 6, 13]] = False
    got = np.asarray(_order(x, r, valid))
    for e in range(b):
        kern = ref.dpp_kernel_ref(x[e], r[e])
        np.testing.assert_allclose(np.asarray(dpp_kernel(jnp.asarray(x[e]), jnp.asarray(r[e]))), kern, atol=1e-5)
        want, gap, near = ref.dpp_greedy_ref(kern, n, valid[e])
        if e != 4:
            assert gap > 1e-4 and near > 1e-5, "ill-posed test data; pick another seed"
        assert got[e].tolist() == want, e
    assert got[2][0] == 0                                        # r = 1: every first gain ties exactly
    assert got[3][-4:].tolist() == [0, 5, 6, 13]                 # invalid tokens last, lowest index first
    assert got[4][3:].tolist() == sorted(got[4][3:].tolist())    # exhausted: index order, finite, no repeats
    assert sorted(got[4].tolist()) == list(range(n))
    assert got[0][0] == int(np.argmax(r[0]))                     # first pick: the largest diagonal r_i^2
    # the question decides: similarity keeps mostly cluster A (the instruction's), the official sign cluster B
    assert in_a[got[5][:4]].sum() >= 3 and in_a[got[6][:4]].sum() <= 1


@pytest.mark.long   # eager compiles the loop once more; the default tests compare jit to the reference
def test_eager_equals_jit():
    x = _x((2, 20, 32), 0)
    r = np.random.default_rng(1).uniform(0.2, 1.0, size=(2, 20)).astype(np.float32)
    got = np.asarray(_order(x, r, np.ones((2, 20), bool)))
    for e in range(2):
        eager = dpp_greedy_order(dpp_kernel(jnp.asarray(x[e]), jnp.asarray(r[e])), 20)
        np.testing.assert_array_equal(eager, got[e])


_relevance = jax.jit(query_relevance, static_argnames=("image_len", "relevance", "theta"))


def test_relevance_matches_reference_for_every_option():
    """Multi-image, left padding, and an example with no instruction token (r = 1); the default
    ``"similarity"`` is checked through the span path's reference."""
    b, t, c, length = 3, 26, 8, 8
    h = _x((b, t, c), 4)
    starts = np.array([[2, 12], [3, 14], [10, 18]])              # example 2: no text after its first image
    valid = np.ones((b, t), bool)
    valid[1, :3] = False                                         # left padding
    for rel, theta in (("negative", 0.5), ("none", None)):     # "similarity": the span test's reference
        fn = query_relevance if rel == "none" else _relevance     # "none" computes nothing: eager is cheap
        got = np.asarray(fn(h, starts, image_len=length, valid=valid, relevance=rel, theta=theta))
        for e in range(b):
            want = ref.query_relevance_ref(h[e], starts[e].tolist(), length, valid[e], rel, theta)
            img = [i for i in range(t) if any(s <= i < s + length for s in starts[e])]
            np.testing.assert_allclose(got[e, img], want[img], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got[2], 1.0)
        if rel != "none":
            assert np.ptp(got[0]) > 0.5


def test_span_path_matches_reference_multi_image_and_left_padding():
    """Two prompts with two images each, the second left-padded (loud pad values): each equals the reference
    on its own unpadded tokens, so a padded prompt selects what it selects alone."""
    b, t, c, length, kept, pad = 2, 30, 16, 10, 4, 5
    h = _x((b, t, c), 6)
    h[1, :pad] = 50.0
    starts = np.array([[1, 14], [3 + pad, 14 + pad]])
    valid = np.stack([np.ones(t, bool), np.arange(t) >= pad])
    idx = np.asarray(_span(jnp.asarray(h), jnp.asarray(starts), image_len=length, kept=kept,
                           valid=jnp.asarray(valid)))
    assert idx.shape == (b, t - 2 * (length - kept))
    for e, off in ((0, 0), (1, pad)):
        hh, ss = h[e, off:], [s - off for s in starts[e]]
        r = ref.query_relevance_ref(hh, ss, length)
        want = [i for i in range(t - off) if not any(s <= i < s + length for s in ss)]
        for s in ss:
            order, gap, _ = ref.dpp_greedy_ref(ref.dpp_kernel_ref(hh[s:s + length], r[s:s + length]), kept)
            assert gap > 1e-4
            want += [s + i for i in order]
        np.testing.assert_array_equal(idx[e][:off], np.arange(off))          # the pads are kept slots
        assert (idx[e][off:] - off).tolist() == sorted(want)


# -- the reducer ------------------------------------------------------------------------------------------------


def test_reducer_bookkeeping_validity_gradients_and_no_retrace():
    """At a ViT block (protected class token, r = 1): kept tokens, positions, sizes and the gradient (through
    the gather only) in one jitted call; a state validity mask is respected; new data does not retrace."""
    b, t, c, keep = 3, 17, 8, 5
    x = _x((b, t, c), 8)
    w = jnp.asarray(_x((b, keep + 1, c), 12))
    valid = np.ones((b, t), bool)
    valid[0, 9:] = False
    red = CDPruner(keep=keep)
    traces = []

    @jax.jit
    def fn(x, valid):
        traces.append(1)

        def loss(x):
            out = red(reduction.init_state(x, valid=valid, track_source=True), LayerInfo(num_protected=1, hidden=x))
            return jnp.sum(out.x * w), out

        return jax.value_and_grad(loss, has_aux=True)(x)

    (_, out), g = fn(x, valid)
    loop = [[0] + [i + 1 for i in sorted(ref.dpp_greedy_ref(ref.dpp_kernel_ref(x[e, 1:]), keep, valid[e, 1:])[0])]
            for e in range(b)]
    np.testing.assert_array_equal(out.positions, loop)
    assert np.all(np.asarray(out.positions)[0] < 9) and bool(jnp.all(out.valid))
    np.testing.assert_array_equal(out.x, np.take_along_axis(x, np.asarray(loop)[..., None], 1))
    np.testing.assert_array_equal(np.asarray(out.sizes).sum(-1), [keep + 1] * b)
    want = np.zeros_like(x)
    for e in range(b):
        want[e, loop[e]] = np.asarray(w[e])
    np.testing.assert_array_equal(g, want)
    for seed in (9, 10):
        fn(_x((b, t, c), seed), valid)
    assert len(traces) == 1
    assert red.num_out(t, LayerInfo(num_protected=1)) == keep + 1


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


@pytest.mark.long   # about a minute on a shared CPU: generate compiles prefill and decode
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
