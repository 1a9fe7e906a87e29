"""Script: the bipartite GSP and its intersection with the conditional DPP vs loop references, the official
code's loop (``mode="code"``), the LLM span path with left padding, the reducer, the registry, its cost and a
batched ``VLM.generate`` run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction
from reduction import flops as flops_lib
from reduction.cdpruner import dpp_flops, relevance_flops
from reduction.reducers import LayerInfo, SpecError, build_layer_reducers
from reduction.script import (Script, gsp_flops, gsp_num_removed, gsp_redundancy, gsp_removed, script_order,
                              script_span_keep_indices)
from tests import ref_pruning as ref


def _x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


N, C, K = 20, 16, 6
R_OUT = gsp_num_removed(N, K, 0.5)


@jax.jit
def _all(x, r, v):
    """Per example: GSP's removed mask, the paper-mode order and the code-mode order (one compile)."""
    one = lambda x, r, v: (gsp_removed(x, R_OUT, valid=v), script_order(x, K, r, v),
                           script_order(x, K, r, v, mode="code"))
    return jax.vmap(one)(x, r, v)


def _redundant_case(rng):
    """Half the tokens are near-copies of one direction (highly redundant), the rest spread out; the redundant
    ones are also the most relevant, so the DPP alone would start there."""
    x = rng.normal(size=(N, C))
    x[::2][:6] = np.eye(C)[0] + 0.05 * rng.normal(size=(6, C))   # redundant sources ...
    x[1::2][:6] = np.eye(C)[0] + 0.05 * rng.normal(size=(6, C))  # ... with redundant destinations
    r = rng.uniform(0.2, 0.5, size=N)
    r[:12] = rng.uniform(0.8, 1.0, size=12)
    return x.astype(np.float32), r.astype(np.float32)


def test_gsp_paper_and_code_modes_match_loop_references():
    """Five images in one call: random ones (with and without relevance), one with invalid tokens, one with
    a redundant cluster. GSP's removed set, the paper mode (the DPP on GSP's survivors) and the code mode
    (the official loop) each equal their loop reference."""
    b = 5
    rng = np.random.default_rng(0)
    x = _x((b, N, C), 1)
    x[:3] *= 0.2
    x[:3] += np.eye(C)[2]                                         # similar enough that GSP finds edges
    r = rng.uniform(0.2, 1.0, size=(b, N)).astype(np.float32)
    r[1] = 1.0
    x[4], r[4] = _redundant_case(rng)
    valid = np.ones((b, N), bool)
    valid[2, [1, 4, 7, 10]] = False
    removed, paper, code = (np.asarray(a) for a in _all(x, r, valid))
    assert R_OUT == 7
    for e in range(b):
        gone = ref.gsp_removed_ref(x[e], R_OUT, valid=valid[e])
        assert set(np.flatnonzero(removed[e]).tolist()) == gone, e
        assert all(i % 2 == 0 and valid[e, i] for i in gone)
        kern = ref.dpp_kernel_ref(x[e], r[e])
        want, gap, near = ref.dpp_greedy_ref(kern, K, [valid[e, i] and i not in gone for i in range(N)])
        assert gap > 1e-4 and near > 1e-5
        assert paper[e].tolist() == want, e
        want_code, gap = ref.script_code_ref(kern, K, valid[e])
        assert gap > 1e-4
        assert code[e].tolist() == want_code, e
        assert not set(paper[e].tolist()) & gone                  # the intersection: no removed token survives
    assert len(ref.gsp_removed_ref(x[4], R_OUT)) >= 5 and removed[:3].sum() > 0
    # GSP changes the result where the DPP alone keeps redundant relevant tokens
    dpp_alone, _, _ = ref.dpp_greedy_ref(ref.dpp_kernel_ref(x[4], r[4]), K)
    assert set(dpp_alone) & ref.gsp_removed_ref(x[4], R_OUT) and paper[4].tolist() != dpp_alone
    # the official loop's first two picks are exact greedy log-det picks; later ones are not in general
    assert code[0][:2].tolist() == ref.dpp_greedy_ref(ref.dpp_kernel_ref(x[0], r[0]), 2)[0]
    np.testing.assert_allclose(np.asarray(gsp_redundancy(jnp.asarray(x[0])))[1::2], -1.0)


_span = jax.jit(script_span_keep_indices, static_argnames=("image_len", "kept", "relevance", "theta", "mode"))


@pytest.mark.long   # the span path is covered by test_cdpruner by default; one compile fewer here
def test_llm_span_path_left_padding_and_reducer():
    """Script in an LLM sequence through the reducer: two prompts with two images each, the second left-padded
    (loud pads); each equals the reference on its own unpadded tokens (so padded == alone), text survives, and
    the kept count is static."""
    b, t, c, length, kept, pad = 2, 30, 16, 10, 4, 5
    h = _x((b, t, c), 6)
    h[1, :pad] = 50.0
    starts = np.array([[1, 14], [3 + pad, 14 + pad]])
    valid = np.stack([np.ones(t, bool), np.arange(t) >= pad])
    red = Script(keep=kept)
    info = LayerInfo(image_starts=jnp.asarray(starts), image_len=length, num_images=2)
    out = jax.jit(lambda x, v: red(reduction.init_state(x, valid=v), LayerInfo(
        image_starts=jnp.asarray(starts), image_len=length, num_images=2, hidden=x)))(jnp.asarray(h), valid)
    assert out.x.shape == (b, red.num_out(t, info), c) and red.num_out(t, info) == t - 2 * (length - kept)
    idx = np.asarray(out.positions)
    for e, off in ((0, 0), (1, pad)):
        hh, ss = h[e, off:], [s - off for s in starts[e]]
        r = ref.query_relevance_ref(hh, ss, length)
        want = [i for i in range(t - off) if not any(s <= i < s + length for s in ss)]
        for s in ss:
            gone = ref.gsp_removed_ref(hh[s:s + length], gsp_num_removed(length, kept, 0.5))
            order, gap, _ = ref.dpp_greedy_ref(ref.dpp_kernel_ref(hh[s:s + length], r[s:s + length]), kept,
                                               [i not in gone for i in range(length)])
            assert gap > 1e-4
            want += [s + i for i in order]
        np.testing.assert_array_equal(idx[e][:off], np.arange(off))
        assert (idx[e][off:] - off).tolist() == sorted(want)


@pytest.mark.long   # one more compile of the tower path; the span path above runs by default
def test_vit_reducer_protects_prefix_and_gradients_flow_through_gather():
    b, t, c, keep = 2, 17, 8, 5
    x = jnp.asarray(_x((b, t, c), 8))
    w = jnp.asarray(_x((b, keep + 1, c), 9))
    red = Script(keep=keep, mode="paper")

    def loss(x):
        out = red(reduction.init_state(x), LayerInfo(num_protected=1, hidden=x))
        return jnp.sum(out.x * w), out

    (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    idx = np.asarray(out.positions)
    for e in range(b):
        xe = np.asarray(x[e, 1:])
        gone = ref.gsp_removed_ref(xe, gsp_num_removed(t - 1, keep, 0.5))
        order = ref.dpp_greedy_ref(ref.dpp_kernel_ref(xe), keep, [i not in gone for i in range(t - 1)])[0]
        assert idx[e].tolist() == [0] + [i + 1 for i in sorted(order)]
    want = np.zeros_like(np.asarray(g))
    for e in range(b):
        want[e, idx[e]] = np.asarray(w[e])
    np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("point", ["vit", "vision", "connector", "llm"])
def test_registry_builds_at_every_point(point):
    reds = build_layer_reducers(4, {"method": "script", "keep": 3, "layers": [1], "mode": "code", "tau": 0.3},
                                point=point)
    assert reds[1] == Script(keep=3, mode="code", tau=0.3) and reds.count(None) == 3


@pytest.mark.parametrize("spec,err,name", [
    ({"mode": "graph"}, ValueError, "mode"), ({"redundant_ratio": 1.5}, ValueError, "redundant_ratio"),
    ({"tau": float("nan")}, ValueError, "tau"), ({"taus": 0.2}, SpecError, "tau"),
    ({"relevance": "cos"}, ValueError, "relevance"),
])
def test_registry_rejects_bad_specs(spec, err, name):
    with pytest.raises(err, match=name):
        build_layer_reducers(4, dict({"method": "script"}, **spec), point="llm")


@pytest.mark.parametrize("call,name", [
    (lambda: script_order(jnp.zeros((4, 3)), 5), "kept"),
    (lambda: script_order(jnp.zeros((4, 3)), 2, mode="gsp"), "mode"),
    (lambda: gsp_removed(jnp.zeros((4, 3)), 5), "num_removed"),
    (lambda: script_span_keep_indices(jnp.zeros((1, 9, 3)), jnp.array([1]), image_len=4, kept=5), "kept"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_own_cost_is_under_five_percent_of_a_llava_decoder_layer():
    layer = flops_lib.block_flops(600, 600, 4096, 11008, gated=True)
    for kept in (64, 192):
        own = dpp_flops(576, kept, 4096) + relevance_flops(600, 4096) + gsp_flops(576)
        assert own / layer < 0.05
    assert Script(keep=192).flops(600, dim=4096, heads=32) < 0.05 * layer
    assert Script(keep=192).flops(600, dim=4096, heads=32) > Script(keep=192, mode="code").flops(600, dim=4096,
                                                                                                   heads=32)


@pytest.mark.long   # about a minute on a shared CPU
@pytest.mark.parametrize("mode", ["paper", "code"])
def test_vlm_generate_batched_left_padded_equals_one_by_one(mode):
    from flax import nnx
    from models.vlm import VLM
    from tests.test_vlm import CFG, _check_batched_equals_single

    vlm = VLM(CFG, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plan = vlm.build_plan({"point": "llm", "method": "script", "layers": [2], "keep": 5, "mode": mode})
    n, ids, valid, info = _check_batched_equals_single(vlm, images, plan)
    lengths = np.asarray(info["prefill_lengths"])
    real = np.asarray(valid).sum(1)
    np.testing.assert_array_equal(lengths[2:], np.stack([real - (n - 5)] * 2))
