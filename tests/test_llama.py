"""Llama decoder, KV cache and generation: NumPy loop references for RMSNorm, RoPE and GQA attention, cache
consistency with the full forward, batched vs one-by-one generation, sampling filters, stop tokens, traces."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models import generate as gen
from models.llama import (
    Llama,
    LlamaConfig,
    RMSNorm,
    apply_rope,
    explicit_attention,
    positions_from_valid,
    prefill_mask,
    rope_cos_sin,
)

CFG = LlamaConfig(vocab_size=61, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48, rope_theta=100.0)


@pytest.fixture(scope="module")
def lm():
    return Llama(CFG, rngs=nnx.Rngs(0))


def _forward(lm, ids, valid):
    return nnx.jit(lambda m, i, v: m(i, valid=v)[0])(lm, ids, valid)


# -- NumPy loop references --------------------------------------------------------------------------------


def ref_rope(x, positions, theta):
    """x: [B, T, H, D]; rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)."""
    b, t, h, d = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for bi in range(b):
        for ti in range(t):
            for i in range(d // 2):
                ang = positions[bi, ti] * theta ** (-2.0 * i / d)
                c, s = np.cos(ang), np.sin(ang)
                for hi in range(h):
                    x1, x2 = x[bi, ti, hi, i], x[bi, ti, hi, i + d // 2]
                    out[bi, ti, hi, i] = x1 * c - x2 * s
                    out[bi, ti, hi, i + d // 2] = x2 * c + x1 * s
    return out


def ref_attention(q, k, v, mask):
    """q: [B, T, H, D], k/v: [B, S, G, D], mask [B, T, S]; query head h reads kv head h // (H / G)."""
    b, t, h, d = q.shape
    g = k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for ti in range(t):
                logits = np.array([q[bi, ti, hi] @ k[bi, si, gi] / np.sqrt(d) if mask[bi, ti, si] else -np.inf
                                   for si in range(k.shape[1])])
                if np.all(np.isinf(logits)):
                    w = np.full(k.shape[1], 1.0 / k.shape[1])
                else:
                    w = np.exp(logits - logits.max())
                    w /= w.sum()
                out[bi, ti, hi] = sum(w[si] * v[bi, si, gi] for si in range(k.shape[1]))
    return out


def test_rmsnorm_matches_loop_reference():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    norm = RMSNorm(8, eps=1e-5)
    norm.scale[...] = jnp.arange(1, 9, dtype=jnp.float32)
    ref = np.zeros_like(x)
    for i in np.ndindex(2, 3):
        ref[i] = x[i] / np.sqrt(np.mean(x[i] ** 2) + 1e-5) * np.arange(1, 9)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(norm(jnp.zeros((1, 2, 8))))))


def test_rope_matches_loop_reference_with_gapped_positions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 2, 8)).astype(np.float32)
    pos = np.array([[0, 1, 5, 9], [3, 4, 6, 40]])
    cos, sin = rope_cos_sin(jnp.asarray(pos), 8, 100.0)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), cos, sin), ref_rope(x, pos, 100.0), atol=1e-5)


def test_gqa_attention_matches_loop_reference_and_fused_path():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    mask = prefill_mask(jnp.asarray(valid))
    out, probs = explicit_attention(*map(jnp.asarray, (q, k, v)), mask)
    ref = ref_attention(q, k, v, np.asarray(mask)[:, 0])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    fused = jax.nn.dot_product_attention(*map(jnp.asarray, (q, k, v)), mask=mask)
    np.testing.assert_allclose(fused, ref, atol=1e-5)
    # Padding keys get no weight from valid queries.
    assert np.all(np.asarray(probs)[0, :, 2:, :2] == 0.0)


def test_positions_from_valid_count_from_first_real_token():
    valid = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(positions_from_valid(valid), [[0, 0, 0, 1], [0, 1, 2, 3]])


# -- cache and generation -----------------------------------------------------------------------------


def test_decode_with_cache_matches_full_forward_left_padded(lm):
    ids, valid = gen.left_pad([[3, 4, 5], [6, 7, 8, 9, 10]])
    cont = jnp.asarray([[11, 12, 13], [14, 15, 16]])
    full_ids = jnp.concatenate([ids, cont], axis=1)
    full_valid = jnp.concatenate([valid, jnp.ones(cont.shape, bool)], axis=1)
    full = _forward(lm, full_ids, full_valid)
    graphdef, params = nnx.split(lm)

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        logits0, cache, _ = m.prefill_cache(m.embed(ids), positions_from_valid(valid), valid, extra=3)
        outs = [logits0]
        for j in range(3):
            lg, cache = m.decode_step(cont[:, j], cache)
            outs.append(lg)
        return jnp.stack(outs, 1), cache

    steps, cache = run(params)
    np.testing.assert_allclose(steps, full[:, ids.shape[1] - 1:], atol=1e-4)
    np.testing.assert_array_equal(cache.next_position, [6, 8])
    np.testing.assert_array_equal(cache.lengths()[:, 0], [6] * 3)


def test_batched_greedy_equals_one_by_one(lm):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    batched = np.asarray(gen.generate(lm, prompts, max_new_tokens=5))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batched[i], np.asarray(gen.generate(lm, [p], max_new_tokens=5))[0])


def test_decode_step_compiles_once_for_new_data(lm):
    gen.generate(lm, [[1, 2, 3, 4], [5, 6, 7, 8]], max_new_tokens=4)
    before = dict(gen.TRACE_COUNTS)
    out = gen.generate(lm, [[9, 8, 7, 6], [2, 3, 4, 5]], max_new_tokens=4,
                       stop_tokens=[[60], [59]], rng=jax.random.key(5))
    assert gen.TRACE_COUNTS == before
    assert out.shape == (2, 4)


def test_stop_tokens_per_example_then_padding(lm):
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = np.asarray(gen.generate(lm, prompts, max_new_tokens=6))
    stop0, stop1 = int(free[0, 1]), int(free[1, 3])
    out = np.asarray(gen.generate(lm, prompts, max_new_tokens=6, stop_tokens=[[stop0], [stop1]], pad_id=-7))
    first0 = list(free[0]).index(stop0)
    first1 = list(free[1]).index(stop1)
    np.testing.assert_array_equal(out[0, : first0 + 1], free[0, : first0 + 1])
    assert np.all(out[0, first0 + 1:] == -7)
    np.testing.assert_array_equal(out[1, : first1 + 1], free[1, : first1 + 1])
    assert np.all(out[1, first1 + 1:] == -7)


def test_sampling_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    greedy = gen.sample_logits(logits, jax.random.key(0), gen.Sampling())
    np.testing.assert_array_equal(greedy, [1, 0])
    for seed in range(5):
        k1 = gen.sample_logits(logits, jax.random.key(seed), gen.Sampling(temperature=1.0, top_k=1))
        np.testing.assert_array_equal(k1, greedy)
        p = gen.sample_logits(logits, jax.random.key(seed), gen.Sampling(temperature=1.0, top_p=0.01))
        np.testing.assert_array_equal(p, greedy)
    draws = np.stack([gen.sample_logits(logits, jax.random.key(s), gen.Sampling(temperature=2.0, top_k=2))
                      for s in range(40)])
    assert set(draws[:, 0]) == {1, 3} and set(draws[:, 1]) == {0, 3}
    with pytest.raises(ValueError, match="top_p"):
        gen.Sampling(top_p=0.0)


def test_sampled_generation_is_reproducible(lm):
    s = gen.Sampling(temperature=1.0, top_k=10, top_p=0.9)
    a = gen.generate(lm, [[1, 2], [3, 4, 5]], max_new_tokens=5, sampling=s, rng=jax.random.key(3))
    b = gen.generate(lm, [[1, 2], [3, 4, 5]], max_new_tokens=5, sampling=s, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)


def test_jit_equals_eager_and_grads_are_finite(lm):
    ids = jnp.asarray([[1, 2, 3, 4, 5]])
    eager, _ = lm(ids)
    np.testing.assert_allclose(eager, _forward(lm, ids, jnp.ones(ids.shape, bool)), atol=1e-5)

    def loss(m):
        logits, _ = m(ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[0, :-1, :][jnp.arange(4), ids[0, 1:]])

    grads = nnx.jit(nnx.grad(loss))(lm)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)


def test_tied_embeddings_and_bad_config():
    tied = Llama(LlamaConfig(vocab_size=11, dim=8, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=8,
                             tie_embeddings=True), rngs=nnx.Rngs(0))
    assert tied.lm_head is None
    logits = _forward(tied, jnp.asarray([[1, 2]]), jnp.ones((1, 2), bool))
    assert logits.shape == (1, 2, 11)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(tied, [[1]], max_new_tokens=0)


def test_pruned_layers_cache_only_the_kept_tokens(lm):
    """In-LLM pruning before layer K: layers < K cache every prompt token, layers >= K are allocated at the kept
    count (+ the free decode slots), not at the prompt's length with a mask; decode appends to each at its own index.
    Shapes only (``jax.eval_shape``: nothing runs)."""
    import reduction as R

    n, image_len, keep, extra, k = 20, 12, 3, 4, 1
    reds = tuple(R.build_layer_reducers(CFG.num_layers, {"method": "random", "keep": keep, "layers": [k]},
                                        point="llm"))
    x = jnp.zeros((2, n, CFG.dim))
    valid = jnp.ones((2, n), bool)

    def run(m, x):
        _, cache, _ = m.prefill_cache(x, positions_from_valid(valid), valid, extra=extra, reducers=reds,
                                      image_starts=jnp.array([2, 5]), image_len=image_len, rng=jax.random.key(0))
        return m.decode_step(jnp.zeros((2,), jnp.int32), cache)[1]

    cache = jax.eval_shape(run, lm, x)
    want = [n + extra] * k + [n - image_len + keep + extra] * (CFG.num_layers - k)
    assert [c.k.shape[1] for c in cache.layers] == want
    assert [c.valid.shape[1] for c in cache.layers] == want
