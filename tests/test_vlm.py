"""VLM: image-token placement (loop reference), connector reductions, reducers inside the LLM (positions,
per-layer cache lengths, static capacity + mask), and batched == one-by-one greedy generation with every method at
every point of the VLM (tower, connector, LLM)."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.clip_vision import CLIPVisionConfig
import reduction as R
from models.connector import connector_num_out, connector_reduce, image_starts_from_mask, place_image_tokens
from models.llama import LlamaConfig
from models.vlm import VLM, VLMConfig, ReductionPlan, build_plan, build_prompts

IMG = 63
CFG = VLMConfig(
    vision=CLIPVisionConfig(image_size=16, patch_size=4, dim=16, num_layers=2, num_heads=2, mlp_dim=32),
    text=LlamaConfig(vocab_size=64, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48),
    image_token_id=IMG,
)
PROMPTS = [[1, 2, IMG, 5, 6, 7], [3, IMG, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def vlm():
    return VLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


@dataclasses.dataclass(frozen=True)
class EveryOtherImageToken(R.Reducer):
    """Test reducer: keep every text token and the even-offset image tokens."""

    spans = True

    def num_out(self, num_tokens, info):
        return num_tokens - info.image_len // 2

    def plan(self, state, info):
        b, t = state.x.shape[:2]
        pos = jnp.arange(t)[None]
        off = pos - info.image_starts[:, None]
        drop = (off >= 0) & (off < info.image_len) & (off % 2 == 1)
        idx = jnp.argsort(drop, axis=1, stable=True)[:, : t - info.image_len // 2]
        return R.prune_step(jnp.sort(idx, axis=1), t)


@dataclasses.dataclass(frozen=True)
class KeepAll(R.Reducer):
    spans = True

    def num_out(self, num_tokens, info):
        return num_tokens

    def plan(self, state, info):
        return R.identity_step(*state.x.shape[:2])


def _at(layer, reducer, num_layers=4):
    return tuple(reducer if i == layer else None for i in range(num_layers))


def _score(vlm, ids, images, valid, plan):
    return nnx.jit(lambda m, i, x, v: m(i, x, valid=v, plan=plan))(vlm, ids, images, valid)


def test_placement_matches_loop_reference_and_vmap():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(2, 7, 3)).astype(np.float32)
    image = rng.normal(size=(2, 3, 3)).astype(np.float32)
    is_image = np.zeros((2, 7), bool)
    is_image[0, 1:4] = True
    is_image[1, 4:7] = True
    ref = text.copy()
    for b in range(2):
        k = 0
        for t in range(7):
            if is_image[b, t]:
                ref[b, t] = image[b, k]
                k += 1
    out = place_image_tokens(*map(jnp.asarray, (text, image, is_image)))
    np.testing.assert_array_equal(out, ref)
    jitted = jax.jit(place_image_tokens)(*map(jnp.asarray, (text, image, is_image)))
    np.testing.assert_array_equal(jitted, ref)
    np.testing.assert_array_equal(image_starts_from_mask(jnp.asarray(is_image)), [1, 4])


def _connector(spec):
    return tuple(R.build_layer_reducers(1, spec, point="connector"))


def test_connector_pool_matches_window_means_and_conserves_mass():
    feats = np.random.default_rng(1).normal(size=(2, 16, 3)).astype(np.float32)
    reds = _connector({"method": "pool", "k": 2})
    state = connector_reduce(reds, jnp.asarray(feats))
    assert connector_num_out(reds, 16) == 4 and state.x.shape == (2, 4, 3)
    grid = feats.reshape(2, 4, 4, 3)
    ref = np.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], axis=1)
    np.testing.assert_allclose(state.x, ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.sizes).sum(1), 16.0)


@pytest.mark.parametrize("method", ["tome", "pitome", "dart", "divprune"])
def test_connector_keep_reaches_its_target_with_static_counts(method):
    """``keep`` at the connector: merges repeat (each pass merges at most half) until the target; pruning is one
    pass. ToMe's passes equal explicit tome_merge calls with r = min(T - keep, T // 2)."""
    feats = jax.random.normal(jax.random.key(2), (2, 16, 8))
    reds = _connector({"method": method, "keep": 6})
    state = jax.jit(lambda f: connector_reduce(reds, f))(feats)
    assert state.x.shape[1] == connector_num_out(reds, 16)
    total = np.asarray(state.sizes).sum(1)
    if method in ("dart", "divprune"):
        assert state.x.shape[1] == 6
        np.testing.assert_allclose(total, 6.0)          # pruning drops mass
    else:
        np.testing.assert_allclose(total, 16.0, rtol=1e-6)  # merging conserves it
    if method == "tome":
        assert state.x.shape[1] == 6
        ref, t = R.init_state(feats), 16
        while t > 6:
            r = min(t - 6, t // 2)
            ref = R.tome_merge(ref, ref.x, r=r)
            t -= r
        np.testing.assert_allclose(state.x, ref.x, atol=1e-6)


def test_build_plan_and_errors(vlm):
    plan = vlm.build_plan({"point": "vision", "method": "tome", "r": 2})
    assert vlm.num_image_tokens(plan) == 16 - 2 * vlm.vision_layers
    assert vlm.num_image_tokens(vlm.build_plan({"point": "connector", "method": "pool", "k": 2})) == 4
    with pytest.raises(R.SpecError, match="unknown reduction method 'nope'"):
        vlm.build_plan({"point": "llm", "method": "nope"})
    with pytest.raises(R.SpecError, match="cannot run at the 'llm' point"):
        vlm.build_plan({"point": "llm", "method": "tome"})
    with pytest.raises(R.SpecError, match="point"):
        vlm.build_plan({"point": "decoder", "method": "tome"})
    with pytest.raises(R.SpecError, match="unknown option 'budget'.*keep"):
        vlm.build_plan({"point": "llm", "method": "dart", "budget": 8})
    with pytest.raises(R.SpecError, match=r"outside \[1, 4\)"):
        vlm.build_plan({"point": "llm", "method": "dart", "layers": [0]})
    both = vlm.build_plan({"vision": {"method": "tome", "r": 1}, "llm": {"method": "fastv", "keep": 4}})
    assert both.vision is not None and both.llm is not None and both.connector is None


def test_pruning_hook_keeps_positions_and_shrinks_later_layers(vlm, images):
    n = vlm.num_image_tokens()
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=n)
    plan = ReductionPlan(llm=_at(2, EveryOtherImageToken()))
    logits, aux = _score(vlm, ids, images, valid, plan)
    t = ids.shape[1]
    assert aux["tokens_per_layer"] == [t, t, t - n // 2, t - n // 2]
    assert logits.shape == (2, t - n // 2, CFG.text.vocab_size)
    pos = np.asarray(aux["positions"])
    starts = np.asarray(image_starts_from_mask(ids == IMG))
    pad = np.asarray(~valid).sum(1)
    for b in range(2):
        kept_image = pos[b][(pos[b] >= starts[b] - pad[b]) & (pos[b] < starts[b] - pad[b] + n)]
        np.testing.assert_array_equal(kept_image - (starts[b] - pad[b]), np.arange(0, n, 2))
    # Text after the image keeps its original positions (gaps), so the last position is unchanged.
    np.testing.assert_array_equal(pos[:, -1], np.asarray(valid).sum(1) - 1)


def test_keep_all_pruner_equals_no_pruner(vlm, images):
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=vlm.num_image_tokens())
    base, _ = _score(vlm, ids, images, valid, ReductionPlan())
    same, _ = _score(vlm, ids, images, valid, ReductionPlan(llm=_at(1, KeepAll())))
    np.testing.assert_allclose(same, base, atol=1e-5)


PLANS = {
    "none": None,
    "dart": {"point": "llm", "method": "dart", "layers": [2], "keep": 8},
    "fastv": {"point": "llm", "method": "fastv", "layers": [2], "keep": 5},
    "atp": {"point": "llm", "method": "atp", "layers": [1], "theta": 0.35, "keep": 12},
    "divprune": {"point": "llm", "method": "divprune", "layers": [1], "keep": 6},
    "random": {"point": "llm", "method": "random", "keep": 6},
    "staged": {"point": "llm", "method": "fastv", "layers": [1, 3], "keep_ratio": 0.5},
}


def _check_batched_equals_single(vlm, images, plan, *, equal=True):
    n = vlm.num_image_tokens(plan)
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=n)
    batched, info = vlm.generate(ids, images, valid=valid, max_new_tokens=4, plan=plan, return_info=True)
    assert batched.shape == (len(PROMPTS), 4)
    for b, p in enumerate(PROMPTS if equal else ()):
        one_ids, one_valid = build_prompts([p], image_token_id=IMG, num_image_tokens=n, length=ids.shape[1])
        single = vlm.generate(one_ids, images[b:b + 1], valid=one_valid, max_new_tokens=4, plan=plan)
        np.testing.assert_array_equal(np.asarray(batched)[b], np.asarray(single)[0])
    return n, ids, valid, info


GENERATION_LONG = ("fastv", "atp", "divprune", "random", "staged")   # none and dart run by default; the rest with -m long


@pytest.mark.parametrize("name", [pytest.param(n, marks=(pytest.mark.long,) if n in GENERATION_LONG else ())
                                  for n in PLANS])
def test_batched_generation_equals_one_by_one(vlm, images, name):
    plan = vlm.build_plan(PLANS[name])
    # random draws one key per batch, so its kept set depends on the batch (only shapes are compared)
    n, ids, valid, info = _check_batched_equals_single(vlm, images, plan, equal=name != "random")
    lengths = info["prefill_lengths"]  # [L, B] valid cached tokens
    real = np.asarray(valid).sum(1)
    if plan.llm is None:
        assert np.all(lengths == real[None])
        return
    k = next(i for i, r in enumerate(plan.llm) if r is not None)
    assert np.all(lengths[:k] == real[None]) and np.all(lengths[k:] < real[None])
    if name == "atp":
        assert np.all(lengths[k:] <= real[None] - n + 12)
    else:
        counts = vlm.language_model.tokens_per_layer(ids.shape[1], plan.llm, image_len=n)
        np.testing.assert_array_equal(lengths, np.asarray(counts)[:, None] - (ids.shape[1] - real)[None])


def _points_and_methods():
    """Every (point, method) pair; beyond DivPrune at the tower and connector they run in the long suite
    (``pytest -m long``)."""
    out = []
    for point in ("vision", "connector", "llm"):
        for method in R.available_methods(point):
            # _: test-only methods of other test files; globalcom2 needs AnyRes tiles (tests/test_globalcom2.py)
            if method != "none" and not method.startswith("_") and method != "globalcom2":
                # DivPrune at the tower and connector by default (in the LLM it trains in test_methods_train)
                marks = () if method == "divprune" and point != "llm" else (pytest.mark.long,)
                out.append(pytest.param(point, method, marks=marks))
    return out


SPEC_AMOUNT = {"tome": {"r": 2}, "pool": {"k": 2}}


@pytest.mark.parametrize("point,method", _points_and_methods())
def test_every_method_runs_at_every_point_of_the_vlm_batched(vlm, images, point, method):
    """Every registered method at every VLM point it runs at, through ``VLM.generate`` batched with ragged,
    left-padded prompts: the same tokens as one example at a time (except random, whose draws depend on the
    batch), and fewer image tokens than unreduced."""
    plan = vlm.build_plan(dict({"point": point, "method": method}, **SPEC_AMOUNT.get(method, {})))
    n, ids, valid, info = _check_batched_equals_single(vlm, images, plan, equal=method != "random")
    lengths = np.asarray(info["prefill_lengths"])
    if point == "llm":
        assert lengths[-1].max() < lengths[0].max()
    else:
        assert n < 16


def test_attention_rows_equal_the_last_rows_of_full_attention(vlm, images):
    """FastV's path (fused attention + explicit probabilities of the last row only) matches the explicit path."""
    from models.llama import positions_from_valid, prefill_mask

    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=16)
    blk = vlm.language_model.layers[0]

    @nnx.jit
    def both(m, blk):
        x, _ = m.embed(ids, images)
        args = (x, positions_from_valid(valid), prefill_mask(valid))
        return blk.prefill(*args, probs="rows", rows=1), blk.prefill(*args, probs="all")

    (y_rows, _, _, p_rows), (y_all, _, _, p_all) = both(vlm, blk)
    assert p_rows.shape == (2, 4, 1, ids.shape[1])
    np.testing.assert_allclose(p_rows[:, :, 0], p_all[:, :, -1], atol=1e-6)
    np.testing.assert_allclose(y_rows, y_all, atol=1e-5)


def test_llm_reducer_must_act_after_layer_zero(vlm, images):
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=16)
    with pytest.raises(ValueError, match="before layer K >= 1"):
        vlm(ids, images, valid=valid, plan=ReductionPlan(llm=_at(0, KeepAll())))


@dataclasses.dataclass(frozen=True)
class MaskSmallNorm(R.Reducer):
    """Test reducer: a capacity-padded tower step (as ATP / tokencorr make): every slot stays, the patches whose
    hidden norm is below the example's median become invalid (a data-dependent count per image)."""

    needs = frozenset({R.HIDDEN})

    def num_out(self, num_tokens, info):
        return num_tokens

    def plan(self, state, info):
        b, t = state.x.shape[:2]
        norm = jnp.linalg.norm(info.hidden, axis=-1)
        keep = (norm >= jnp.median(norm[:, 1:], axis=1, keepdims=True)) | (jnp.arange(t) < info.num_protected)[None]
        return R.prune_step(jnp.broadcast_to(jnp.arange(t), (b, t)), t, valid=keep)


def test_tower_slots_left_invalid_are_masked_in_the_llm_like_removed_tokens(vlm, images):
    """A capacity-padded reducer in the tower leaves invalid image slots; the LLM must treat them as absent: each
    example's last logits equal the LM run on its sequence with those image tokens physically removed."""
    plan = ReductionPlan(vision=(MaskSmallNorm(),) + (None,) * (vlm.vision_layers - 1))
    k = vlm.num_image_tokens(plan)
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=k)
    logits, _ = _score(vlm, ids, images, valid, plan)
    tokens, image_valid = nnx.jit(lambda m, x: m.image_tokens(x, plan))(vlm, images)
    assert image_valid is not None and not bool(jnp.all(image_valid))
    lm = vlm.language_model
    for b, prompt in enumerate(PROMPTS):
        at = prompt.index(IMG)
        text = lm.embed(jnp.asarray([prompt[:at] + prompt[at + 1:]]))[0]
        kept = tokens[b][np.asarray(image_valid[b])]
        x = jnp.concatenate([text[:at], kept, text[at:]])[None]
        ok = jnp.ones(x.shape[:2], bool)
        h, _, _ = lm.prefill_embeds(x, jnp.arange(x.shape[1])[None], ok)
        np.testing.assert_allclose(np.asarray(logits[b, -1]), np.asarray(lm.logits(h[:, -1:])[0, 0]), atol=2e-5)
