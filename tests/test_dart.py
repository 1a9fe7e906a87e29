"""DART: static count rule, CPython set-order emulation, the default == the official selection (loop
transcription) at LLaVA size and on hand cases, batched multi-image selection vs the loop reference, and the
same kept set for a prompt alone or left-padded in a batch (function, LLM and VLM paths)."""

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


@pytest.mark.parametrize("order,source", [("cpython_set", "keys"), ("ascending", "keys"), ("cpython_set", "hidden")])
def test_batched_multi_image_matches_loop_reference(order, source):
    b, t, length = 3, 64, 14
    h, k = _data(b, t, seed=3)
    starts = np.array([[2, 30], [5, 22], [6, 40]], np.int32)
    valid = np.ones((b, t), bool)
    valid[1, 58:] = False                                        # right padding in one example
    valid[2, :6] = False                                         # left padding in another
    fn = jax.jit(lambda h, k, s, v: dart_keep_indices(h, k, image_starts=s, image_len=length, budget=8, valid=v,
                                                      pivot_source=source, pivot_order=order))
    out = np.asarray(fn(h, k, starts, valid))
    kept = dart_kept_per_image(length, 8)
    assert out.shape == (b, t - 2 * (length - kept))
    for e in range(b):
        want = ref.dart_ref(h[e], k[e], list(starts[e]), length, 8, valid[e], source=source, order=order)
        assert out[e].tolist() == want


def _llava_like(seed, text_after=40, prefix=35, length=576, c=64, ck=128):
    rng = np.random.default_rng(seed)
    t = prefix + length + text_after
    return rng.normal(size=(t, c)).astype(np.float32), rng.normal(size=(t, ck)).astype(np.float32)


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_default_equals_official_selection_at_llava_size(budget):
    """576 image tokens at 35, the LLaVA-1.5 layout: the default kept set is the official code's, exactly."""
    fn = jax.jit(lambda h, k: dart_keep_indices(h, k, image_starts=jnp.array([35]), image_len=576, budget=budget))
    for seed in range(3):
        h, k = _llava_like(seed + budget)
        got = np.asarray(fn(h[None], k[None]))[0].tolist()
        want = ref.dart_official_ref(h, k, 35, 576, budget)
        assert got == want
        assert len(got) == len(h) - 576 + dart_kept_per_image(576, budget)
        assert want == ref.dart_ref(h, k, [35], 576, budget)        # the generalised reference agrees


def _hand_case(pad=0):
    """A span of 4 at slot ``8 + pad`` whose result depends on the visit order (see the test)."""
    t, c = 17 + pad, 3
    h = np.zeros((t, c), np.float32)
    k = np.ones((t, 2), np.float32)
    o = pad
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    h[:o + 8] = e3
    h[o + 8] = e2 + 0.05 * e1          # like the image pivot, slightly like the text pivot
    h[o + 9] = e2                      # image pivot (largest key norm in the span)
    h[o + 10] = e1                     # like the text pivot only
    h[o + 11] = -e2 - 0.1 * e1         # unlike both
    h[o + 12:] = e3
    h[o + 16] = e1                     # text pivot (largest key norm after the span)
    k[o + 9] = 5.0
    k[o + 16] = 5.0
    valid = np.arange(t) >= pad
    return h, k, valid


def test_hand_case_pivot_order_and_left_padding():
    """One image + one text pivot, one pick each. The official order iterates ``set({9, 16})`` = [16, 9] (16 hashes
    to slot 0 of 8): the text pivot takes 11, then the image pivot takes 10, so 8 is dropped. Visiting by position
    (9 first) takes 11 then 8 and drops 10. With 7 pads the slots are 16 and 23 (set order [16, 23]: image first),
    so ordering by slot instead of position id would change the result; ordering by position id does not."""
    kw = dict(image_len=4, budget=2, num_image_pivots=1, num_text_pivots=1)
    h, k, _ = _hand_case()
    assert list(set([9, 16])) == [16, 9] and list(set([16, 23])) == [16, 23]
    want = [i for i in range(17) if i != 8]
    assert ref.dart_official_ref(h, k, 8, 4, 2, nip=1, ntp=1) == want
    assert np.asarray(dart_keep_indices(h[None], k[None], image_starts=jnp.array([8]), **kw))[0].tolist() == want
    asc = np.asarray(dart_keep_indices(h[None], k[None], image_starts=jnp.array([8]), pivot_order="ascending", **kw))
    assert asc[0].tolist() == [i for i in range(17) if i != 10]
    h, k, valid = _hand_case(pad=7)
    got = dart_keep_indices(h[None], k[None], image_starts=jnp.array([15]), valid=valid[None], **kw)
    assert np.asarray(got)[0].tolist() == list(range(7)) + [7 + i for i in want]
    by_slot = dart_keep_indices(h[None], k[None], image_starts=jnp.array([15]), valid=valid[None],
                                positions=jnp.arange(24)[None], **kw)
    assert np.asarray(by_slot)[0].tolist() != np.asarray(got)[0].tolist()


def test_alone_equals_left_padded_in_a_batch_function_level():
    """Each prompt alone == the same prompt left-padded in a batch with a longer one (positions from ``valid``)."""
    h, k = _llava_like(7, prefix=5, length=96, text_after=12)
    t = len(h)
    kw = dict(image_len=96, budget=32)
    alone = np.asarray(jax.jit(lambda h, k: dart_keep_indices(h, k, image_starts=jnp.array([5]), **kw))(
        h[None], k[None]))[0]
    assert alone.tolist() == ref.dart_official_ref(h, k, 5, 96, 32)
    fn = jax.jit(lambda h, k, s, v: dart_keep_indices(h, k, image_starts=s, valid=v, **kw))
    for pad in (3, 40):
        long_h, long_k = _llava_like(100 + pad, prefix=5 + pad, length=96, text_after=12)
        hb = np.stack([long_h, np.concatenate([np.zeros((pad, h.shape[1]), np.float32), h])])
        kb = np.stack([long_k, np.concatenate([np.full((pad, k.shape[1]), 9.0, np.float32), k])])  # loud pads
        valid = np.stack([np.ones(t + pad, bool), np.arange(t + pad) >= pad])
        out = np.asarray(fn(hb, kb, jnp.array([5 + pad, 5 + pad]), valid))
        np.testing.assert_array_equal(out[1][pad:] - pad, alone)       # pads are the first `pad` kept slots
        np.testing.assert_array_equal(out[1][:pad], np.arange(pad))


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


def _kept_positions(positions, valid):
    return np.asarray(positions)[np.asarray(valid)].tolist()


@pytest.mark.long   # the VLM-level test below runs the same prefill path by default
def test_llm_prefill_alone_equals_batched_with_a_longer_left_padded_prompt():
    """``Llama.prefill_embeds`` with DART before layer 2: the kept positions and outputs of a prompt alone equal
    those of the same prompt left-padded next to a longer one; one trace for new data of the same shapes."""
    from flax import nnx
    from models.llama import Llama, LlamaConfig, positions_from_valid

    cfg = LlamaConfig(vocab_size=32, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48)
    lm = Llama(cfg, rngs=nnx.Rngs(0))
    reducers = tuple(R.build_layer_reducers(3, {"method": "dart", "keep": 16, "layers": [2]}, point="llm"))
    traces = []

    def run(m, x, valid, starts):
        traces.append(1)
        h, _, aux = m.prefill_embeds(x, positions_from_valid(valid), valid, reducers=reducers, image_starts=starts,
                                     image_len=40)
        return h, aux["positions"], aux["valid"]

    fn = nnx.jit(run)
    rng = np.random.default_rng(0)
    short = rng.normal(size=(3 + 40 + 7, 32)).astype(np.float32)
    for seed, pad in ((1, 12), (2, 25)):
        long_ = np.random.default_rng(seed).normal(size=(len(short) + pad, 32)).astype(np.float32)
        h1, p1, v1 = fn(lm, short[None], np.ones((1, len(short)), bool), jnp.array([3]))
        xb = np.stack([long_, np.concatenate([np.zeros((pad, 32), np.float32), short])])
        vb = np.stack([np.ones(len(long_), bool), np.arange(len(long_)) >= pad])
        hb, pb, vb_out = fn(lm, xb, vb, jnp.array([3 + pad, 3 + pad]))
        assert hb.shape[1] == len(long_) - 40 + dart_kept_per_image(40, 16)
        assert _kept_positions(pb[1], vb_out[1]) == _kept_positions(p1[0], v1[0])
        np.testing.assert_allclose(np.asarray(hb[1])[np.asarray(vb_out[1])], np.asarray(h1[0]), atol=2e-5)
    assert len(traces) == 3          # the single prompt once, each batch shape once; new data does not retrace


@pytest.mark.long   # padding invariance of the selection is checked by default at the op level
def test_vlm_prompt_alone_equals_batched_with_a_longer_left_padded_prompt():
    from flax import nnx
    from models.clip_vision import CLIPVisionConfig
    from models.llama import LlamaConfig
    from models.vlm import VLM, VLMConfig, build_prompts

    img = 63
    cfg = VLMConfig(vision=CLIPVisionConfig(image_size=16, patch_size=4, dim=16, num_layers=2, num_heads=2,
                                            mlp_dim=32),
                    text=LlamaConfig(vocab_size=64, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48),
                    image_token_id=img)
    vlm = VLM(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plan = vlm.build_plan({"point": "llm", "method": "dart", "layers": [2], "keep": 8})
    n = vlm.num_image_tokens(plan)
    prompts = [[1, 2, img, 5, 6, 7], [3, 9, 9, 9, 9, img, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    fn = nnx.jit(lambda m, i, x, v: m(i, x, valid=v, plan=plan))
    ids, valid = build_prompts(prompts, image_token_id=img, num_image_tokens=n)
    logits_b, aux_b = fn(vlm, ids, images, valid)
    one_ids, one_valid = build_prompts(prompts[:1], image_token_id=img, num_image_tokens=n)
    assert one_ids.shape[1] < ids.shape[1]
    logits_1, aux_1 = fn(vlm, one_ids, images[:1], one_valid)
    assert aux_b["tokens_per_layer"][-1] < aux_b["tokens_per_layer"][0]
    assert _kept_positions(aux_b["positions"][0], aux_b["valid"][0]) == _kept_positions(aux_1["positions"][0],
                                                                                         aux_1["valid"][0])
    np.testing.assert_allclose(np.asarray(logits_b[0])[np.asarray(aux_b["valid"][0])], np.asarray(logits_1[0]),
                               atol=1e-4)
