"""Shared core: token state, reduction steps, schedules, FLOP counts and reducer plumbing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
import ref_merging as ref


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# -- state ---------------------------------------------------------------------------------------------------


def test_init_state_defaults_and_checks():
    x = jnp.asarray(_rand(0, 2, 5, 3))
    s = R.init_state(x, track_source=True)
    assert s.sizes.dtype == jnp.float32 and s.positions.dtype == jnp.int32 and s.source.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(s.positions), [list(range(5))] * 2)
    np.testing.assert_array_equal(np.asarray(s.source), [list(range(5))] * 2)
    assert s.valid is None and R.init_state(x).source is None
    with pytest.raises(ValueError, match="x must have rank 3"):
        R.init_state(x[0])
    with pytest.raises(ValueError, match="sizes"):
        R.init_state(x, sizes=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="valid"):
        R.init_state(x, valid=jnp.ones((3, 5), bool))


def test_source_matrix_and_unmerge_with_pruned_tokens():
    source = jnp.asarray([[0, 1, 1, -1, 2]])
    m = np.asarray(R.source_matrix(source, 3))
    np.testing.assert_array_equal(m[0], [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    y = jnp.asarray([[[1.0], [2.0], [3.0]]])
    np.testing.assert_array_equal(np.asarray(R.unmerge(y, source, fill_value=-5.0))[0, :, 0], [1, 2, 2, -5, 3])


# -- steps ---------------------------------------------------------------------------------------------------


def test_prune_step_gathers_and_keeps_position_gaps():
    x = jnp.asarray(_rand(1, 2, 6, 3))
    state = R.init_state(x, sizes=jnp.arange(1.0, 13.0).reshape(2, 6), track_source=True)
    keep = jnp.asarray([[0, 2, 5], [1, 3, 4]])
    step = R.prune_step(keep, 6)
    assert not step.merges and step.num_out == 3
    out = R.apply_step(state, step)
    np.testing.assert_array_equal(np.asarray(out.x), np.take_along_axis(np.asarray(x), np.asarray(keep)[..., None], 1))
    np.testing.assert_array_equal(np.asarray(out.positions), np.asarray(keep))
    np.testing.assert_array_equal(np.asarray(out.source), [[0, -1, 1, -1, -1, 2], [-1, 0, -1, 1, 2, -1]])
    np.testing.assert_array_equal(np.asarray(out.sizes), [[1, 3, 6], [8, 10, 11]])   # pruning drops mass


def test_merge_step_matches_loop_and_ignores_invalid_tokens():
    x = _rand(2, 1, 6, 4)
    sizes = np.array([[1, 2, 3, 1, 1, 4]], np.float32)
    valid = np.array([[True, True, False, True, True, True]])
    assign = jnp.asarray([[0, 1, 1, 0, -1, 2]])
    step = R.merge_step(assign, jnp.asarray([[0, 1, 5]]))
    out = R.apply_step(R.init_state(jnp.asarray(x), sizes=jnp.asarray(sizes), valid=jnp.asarray(valid)), step)
    w = sizes[0] * valid[0]
    rx, rs = ref.merge_plan(x[0], w, np.asarray(assign[0]), 3)
    np.testing.assert_allclose(np.asarray(out.x[0]), rx, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.sizes[0]), rs)
    assert np.asarray(out.sizes[0, 1]) == 2.0  # the invalid token (size 3) contributed nothing
    np.testing.assert_array_equal(np.asarray(out.x[0, 2]), x[0, 5])  # a single-member slot is copied exactly
    np.testing.assert_array_equal(np.asarray(out.valid[0]), [True, True, True])


@pytest.mark.parametrize("max_sparse", [0, 64])
def test_both_merge_paths_match_the_loop_reference(monkeypatch, max_sparse):
    """The few-movers path (equality matrix + row set) and the scatter-add path give the reference merge:
    several movers per slot, dropped movers (slot -1), zero weights, B > 1."""
    import reduction.step as step_lib

    monkeypatch.setattr(step_lib, "_SPARSE_MERGE_MAX_MOVERS", max_sparse)
    rng = np.random.default_rng(12)
    b, t, k, c = 3, 20, 7, 5
    x = _rand(13, b, t, c)
    sizes = rng.integers(0, 4, size=(b, t)).astype(np.float32)       # some zero weights
    assign = np.full((b, t), -1, np.int32)
    anchor = np.zeros((b, k), np.int32)
    for e in range(b):
        perm = rng.permutation(t)
        anchor[e] = np.sort(perm[:k])
        assign[e, anchor[e]] = np.arange(k)
        rest = perm[k:]
        assign[e, rest] = rng.integers(-1, k, size=rest.size)         # -1: dropped
        sizes[e, anchor[e]] = np.maximum(sizes[e, anchor[e]], 1.0)    # no empty slot (0/0 in the loop)
    step = R.merge_step(jnp.asarray(assign), jnp.asarray(anchor))
    out = jax.jit(R.apply_step)(R.init_state(jnp.asarray(x), sizes=jnp.asarray(sizes)), step)
    for e in range(b):
        rx, rs = ref.merge_plan(x[e], sizes[e], assign[e], k)
        np.testing.assert_allclose(np.asarray(out.x[e]), rx, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.sizes[e]), rs)
        alone = [j for j in range(k) if not np.any((assign[e] == j) & (np.arange(t) != anchor[e, j]))]
        np.testing.assert_array_equal(np.asarray(out.x[e, alone]), x[e, anchor[e, alone]])


def test_apply_step_rejects_wrong_token_count():
    state = R.init_state(jnp.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="step expects 4 tokens"):
        R.apply_step(state, R.identity_step(1, 4))


def test_compose_steps_equals_sequential_application():
    bsz, t = 2, 15
    x = jnp.asarray(_rand(3, bsz, t, 5))
    sizes = jnp.asarray(np.random.default_rng(4).integers(1, 4, size=(bsz, t)).astype(np.float32))
    m1, m2 = jnp.asarray(_rand(5, bsz, t, 4)), jnp.asarray(_rand(6, bsz, t - 4, 4))
    keep = jnp.asarray([[0, 2, 3, 5, 7], [0, 1, 4, 6, 7]])

    @jax.jit
    def run(x, sizes, m1, m2, keep):
        state = R.init_state(x, sizes=sizes, track_source=True)
        s1 = R.bipartite_soft_matching(m1, r=4, class_token=True)
        s2 = R.bipartite_soft_matching(m2, r=3, class_token=True)
        s3 = R.prune_step(keep, t - 7)
        seq = R.apply_step(R.apply_step(R.apply_step(state, s1), s2), s3)
        return seq, R.apply_step(state, R.compose_steps(R.compose_steps(s1, s2), s3)), s1

    seq, both, s1 = run(x, sizes, m1, m2, keep)
    np.testing.assert_allclose(np.asarray(both.x), np.asarray(seq.x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(both.sizes), np.asarray(seq.sizes), rtol=1e-6)
    for name in ("positions", "source"):
        np.testing.assert_array_equal(np.asarray(getattr(both, name)), np.asarray(getattr(seq, name)))
    with pytest.raises(ValueError, match="second step expects"):
        R.compose_steps(s1, s1)


def test_apply_to_tokens_follows_the_step():
    bsz, t = 2, 11
    x = jnp.asarray(_rand(7, bsz, t, 4))
    kv = jnp.asarray(_rand(8, bsz, t, 2, 3))       # an extra per-token array, e.g. a key cache [B, T, H, Dh]
    sizes = jnp.asarray(np.random.default_rng(9).integers(1, 4, size=(bsz, t)).astype(np.float32))
    step = R.bipartite_soft_matching(jnp.asarray(_rand(10, bsz, t, 4)), r=3)
    out = R.apply_step(R.init_state(x, sizes=sizes), step)
    np.testing.assert_allclose(np.asarray(R.apply_to_tokens(x, step, sizes)), np.asarray(out.x), atol=1e-6)
    merged_kv = np.asarray(R.apply_to_tokens(kv, step, sizes))
    assert merged_kv.shape == (bsz, t - 3, 2, 3)
    for b in range(bsz):
        rx, _ = ref.merge_plan(np.asarray(kv[b]).reshape(t, 6), np.asarray(sizes[b]), np.asarray(step.assign[b]), t - 3)
        np.testing.assert_allclose(merged_kv[b].reshape(t - 3, 6), rx, atol=1e-6)
    prune = R.prune_step(jnp.asarray([[1, 4], [0, 9]]), t)
    np.testing.assert_array_equal(np.asarray(R.apply_to_tokens(kv, prune))[1, 1], np.asarray(kv[1, 9]))


def test_identity_step_changes_nothing():
    x = jnp.asarray(_rand(11, 2, 7, 3))
    state = R.init_state(x, track_source=True)
    out = R.apply_step(state, R.identity_step(2, 7))
    for name in ("x", "sizes", "positions", "source"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(state, name)))


# -- schedules -----------------------------------------------------------------------------------------------


def test_tome_r_schedule_matches_parse_r():
    assert R.tome_r_schedule(12, 13) == [13] * 12
    assert R.tome_r_schedule(12, (16, -1.0)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert sum(R.tome_r_schedule(12, (16, -1.0))) == 187
    assert R.tome_r_schedule(12, (8, -1.0)) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert R.tome_r_schedule(12, (8, 0.0)) == [8] * 12
    assert R.tome_r_schedule(12, [25] * 8) == [25] * 8 + [0] * 4
    with pytest.raises(ValueError, match="r has 13 entries"):
        R.tome_r_schedule(12, [1] * 13)
    with pytest.raises(ValueError, match="r must be"):
        R.tome_r_schedule(12, -3)


def test_tome_clamp_and_token_counts():
    assert R.tome_clamp(197, 200, 1) == 98 and R.tome_clamp(198, 200, 2) == 98 and R.tome_clamp(3, 5, 2) == 0
    eff, tokens = R.tome_tokens_per_layer(197, [13] * 12)
    assert tokens == [197 - 13 * i for i in range(13)] and tokens[-1] == 41 and eff == [13] * 12
    eff, tokens = R.tome_tokens_per_layer(197, [8] * 24)   # ViT-L r=8: the last layer clamps to 6
    assert tokens[-1] == 7 and eff[-1] == 6


def test_ratio_rules():
    assert R.ratio_to_r(197, 0.9) == 19 and R.ratio_to_r(197, 0.95) == 9 and R.ratio_to_r(197, 0.7) == 58
    assert R.keep_count(197, 0.5, protected=1) == 1 + 98
    assert R.keep_count(10, 0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        R.ratio_to_r(197, 1.2)


# -- FLOPs ---------------------------------------------------------------------------------------------------


def test_flops_hand_count():
    t, c, m = 10, 8, 32
    qkv, logits, values, proj = t * c * 3 * c, t * t * c, t * t * c, t * c * c
    assert R.attention_flops(t, c) == 2 * (qkv + logits + values + proj)
    assert R.mlp_flops(t, c, m) == 2 * 2 * t * c * m
    assert R.mlp_flops(t, c, m, gated=True) == 2 * 3 * t * c * m
    assert R.block_flops(t, 6, c, m) == R.attention_flops(t, c) + R.mlp_flops(6, c, m)
    assert R.transformer_flops([10, 8], c, m, mlp_tokens=[8, 6], reduction_flops=[5, 7]) == (
        R.block_flops(10, 8, c, m) + R.block_flops(8, 6, c, m) + 12)
    from reduction.flops import pitome_flops, tome_flops
    assert tome_flops(197, 64) == 2 * 99 * 98 * 64 and pitome_flops(196, 64) == 2 * 196 * 196 * 64


def test_transformer_flops_match_xla_cost_analysis():
    """A plain jnp pre-norm ViT-S block (only compiled, never run): XLA agrees within 5%."""
    t, c, h, m = 197, 384, 6, 1536   # ViT-S; XLA also counts elementwise ops (erf, exp), ~3% here
    ks = jax.random.split(jax.random.key(0), 5)
    w = dict(qkv=jax.random.normal(ks[0], (c, 3 * c)), proj=jax.random.normal(ks[1], (c, c)),
             fc1=jax.random.normal(ks[2], (c, m)), fc2=jax.random.normal(ks[3], (m, c)))

    def block(w, x):
        def ln(v):
            return (v - v.mean(-1, keepdims=True)) * jax.lax.rsqrt(v.var(-1, keepdims=True) + 1e-6)
        q, k, v = jnp.split((ln(x) @ w["qkv"]).reshape(t, 3 * h, c // h), 3, axis=1)
        p = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(c // h), axis=-1)
        x = x + jnp.einsum("hqk,khd->qhd", p, v).reshape(t, c) @ w["proj"]
        return x + jax.nn.gelu(ln(x) @ w["fc1"], approximate=False) @ w["fc2"]

    cost = jax.jit(block).lower(w, jax.random.normal(ks[4], (t, c))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = R.transformer_flops([t], c, m)
    assert abs(cost["flops"] - ours) / ours < 0.05, (cost["flops"], ours)


# -- reducers ------------------------------------------------------------------------------------------------


def test_tome_reducer_layers_and_distill():
    reducers = R.build_layer_reducers(12, {"method": "tome", "r": 16, "inflect": -1.0})
    assert reducers[-1] is None and reducers[0].r == 32
    counts = R.tokens_per_layer(198, reducers, num_protected=2, num_distill=1)
    assert counts[0] == (198, 198 - 32)
    x = jnp.asarray(_rand(12, 2, 198, 8))
    info = R.LayerInfo(layer=0, num_layers=12, num_protected=2, num_distill=1, metric=x[..., :4])
    out = jax.jit(lambda x: reducers[0](R.init_state(x), dataclasses.replace(info, metric=x[..., :4])))(x)
    assert out.num_tokens == 198 - 32
    np.testing.assert_array_equal(np.asarray(out.x[:, :2]), np.asarray(x[:, :2]))
    with pytest.raises(ValueError, match="unknown reduction method"):
        R.build_layer_reducers(12, {"method": "nope"})
    assert {"tome", "pitome"} <= set(R.available_methods())
