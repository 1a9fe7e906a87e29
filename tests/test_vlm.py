"""VLM: image-token placement (loop reference), connector reductions, the in-LLM pruning hook (positions,
per-layer cache lengths, static capacity + mask), and batched == one-by-one greedy generation with and without
in-LLM pruning (DART, FastV, ATP-style)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.clip_vision import CLIPVisionConfig
from models.connector import ConnectorReduction, image_starts_from_mask, place_image_tokens
from models.llama import LlamaConfig, LLMPruner
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


class EveryOtherImageToken(LLMPruner):
    """Test selector: keep every text token and the even-offset image tokens."""

    def num_out(self, num_tokens, image_len, num_images=1):
        return num_tokens - image_len // 2

    def select(self, inputs):
        b, t = inputs.valid.shape
        pos = jnp.arange(t)[None]
        off = pos - inputs.image_starts[:, None]
        drop = (off >= 0) & (off < inputs.image_len) & (off % 2 == 1)
        idx = jnp.argsort(drop, axis=1, stable=True)[:, : t - inputs.image_len // 2]
        return jnp.sort(idx, axis=1).astype(jnp.int32), None


class KeepAll(LLMPruner):
    def num_out(self, num_tokens, image_len, num_images=1):
        return num_tokens

    def select(self, inputs):
        b, t = inputs.valid.shape
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), None


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


def test_connector_pool_matches_window_means_and_conserves_mass():
    feats = np.random.default_rng(1).normal(size=(2, 16, 3)).astype(np.float32)
    red = ConnectorReduction(method="pool", k=2)
    state = red(jnp.asarray(feats))
    assert red.num_out(16) == 4 and state.x.shape == (2, 4, 3)
    grid = feats.reshape(2, 4, 4, 3)
    ref = np.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], axis=1)
    np.testing.assert_allclose(state.x, ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.sizes).sum(1), 16.0)


@pytest.mark.parametrize("method", ["tome", "pitome", "dart"])
def test_connector_merge_methods_static_counts(method):
    feats = jax.random.normal(jax.random.key(2), (2, 16, 8))
    red = ConnectorReduction(method=method, keep=6)
    state = jax.jit(red)(feats)
    assert state.x.shape[1] == red.num_out(16)
    total = np.asarray(state.sizes).sum(1)
    if method == "dart":
        np.testing.assert_allclose(total, 6.0)          # pruning drops mass
    else:
        np.testing.assert_allclose(total, 16.0, rtol=1e-6)  # merging conserves it


def test_build_plan_and_errors(vlm):
    plan = build_plan({"point": "vision", "method": "tome", "r": 2}, vision_layers=vlm.vision_layers)
    assert vlm.num_image_tokens(plan) == 16 - 2 * vlm.vision_layers
    assert vlm.num_image_tokens(build_plan({"point": "connector", "method": "pool", "k": 2})) == 4
    with pytest.raises(ValueError, match="in-LLM method"):
        build_plan({"point": "llm", "method": "nope"})
    with pytest.raises(ValueError, match="point"):
        build_plan({"point": "decoder"})
    with pytest.raises(ValueError, match="connector reduction method"):
        ConnectorReduction(method="avg")


def test_pruning_hook_keeps_positions_and_shrinks_later_layers(vlm, images):
    n = vlm.num_image_tokens()
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=n)
    plan = ReductionPlan(llm=EveryOtherImageToken(layer=2))
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
    same, _ = _score(vlm, ids, images, valid, ReductionPlan(llm=KeepAll(layer=1)))
    np.testing.assert_allclose(same, base, atol=1e-5)


PLANS = {
    "none": None,
    "dart": {"point": "llm", "method": "dart", "layer": 2, "budget": 8},
    "fastv": {"point": "llm", "method": "fastv", "layer": 2, "budget": 5},
    "atp": {"point": "llm", "method": "atp", "layer": 1, "theta": 0.35, "capacity": 12},
}


@pytest.mark.parametrize("name", list(PLANS))
def test_batched_generation_equals_one_by_one(vlm, images, name):
    spec = PLANS[name]
    plan = spec if isinstance(spec, ReductionPlan) else build_plan(spec, vision_layers=vlm.vision_layers)
    n = vlm.num_image_tokens(plan)
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=n)
    batched, info = vlm.generate(ids, images, valid=valid, max_new_tokens=4, plan=plan, return_info=True)
    for b, p in enumerate(PROMPTS):
        one_ids, one_valid = build_prompts([p], image_token_id=IMG, num_image_tokens=n, length=ids.shape[1])
        single = vlm.generate(one_ids, images[b:b + 1], valid=one_valid, max_new_tokens=4, plan=plan)
        np.testing.assert_array_equal(np.asarray(batched)[b], np.asarray(single)[0])
    lengths = info["prefill_lengths"]  # [L, B] valid cached tokens
    real = np.asarray(valid).sum(1)
    k = None if plan.llm is None else plan.llm.layer
    if k is None:
        assert np.all(lengths == real[None])
    else:
        assert np.all(lengths[:k] == real[None]) and np.all(lengths[k:] < real[None])
        if name == "atp":
            assert np.all(lengths[k:] <= real[None] - n + 12)
        else:
            expected = plan.llm.num_out(ids.shape[1], n) - (ids.shape[1] - real)
            np.testing.assert_array_equal(lengths[k], expected)


def test_atp_kept_count_is_instance_adaptive(vlm):
    plan = build_plan({"point": "llm", "method": "atp", "layer": 1, "theta": 0.35, "capacity": 12})
    imgs = jnp.concatenate([jnp.zeros((1, 16, 16, 3)), jax.random.normal(jax.random.key(7), (1, 16, 16, 3)) * 3])
    ids, valid = build_prompts([PROMPTS[0], PROMPTS[0]], image_token_id=IMG, num_image_tokens=16)
    _, aux = _score(vlm, ids, imgs, valid, plan)
    kept = np.asarray(aux["valid"]).sum(1)
    assert aux["valid"].shape[1] == ids.shape[1] - 16 + 12
    assert np.all(kept <= ids.shape[1] - 4) and kept[0] != kept[1]


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


def test_pruner_layer_must_be_inside_the_stack(vlm, images):
    ids, valid = build_prompts(PROMPTS, image_token_id=IMG, num_image_tokens=16)
    with pytest.raises(ValueError, match="pruner.layer"):
        vlm(ids, images, valid=valid, plan=ReductionPlan(llm=KeepAll(layer=0)))
