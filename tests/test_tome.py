"""ToMe (bipartite, kth, random) against the loop references in ``ref_merging``, plus invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
import ref_merging as ref


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("r", "class_token", "distill_token"))
def _tome(x, sizes, metric, *, r, class_token, distill_token):
    state = R.init_state(x, sizes=sizes, track_source=True)
    step = R.bipartite_soft_matching(metric, r=r, class_token=class_token, distill_token=distill_token)
    return step, R.apply_step(state, step)


def _check_against_ref(x, sizes, metric, r, cls, dist):
    """Plan exactly, x/sizes to 1e-6, source matrix exactly; returns the JAX output state."""
    step, out = _tome(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(metric), r=r, class_token=cls,
                      distill_token=dist)
    for b in range(x.shape[0]):
        plan = ref.tome_plan(np.asarray(metric[b], np.float32), r, cls, dist)
        np.testing.assert_array_equal(np.asarray(step.assign[b]), plan["assign"])
        np.testing.assert_array_equal(np.asarray(step.anchor[b]), plan["anchor"])
        rx, rs = ref.tome_merge_wavg(np.asarray(x[b], np.float32), sizes[b], plan)
        np.testing.assert_allclose(np.asarray(out.x[b], np.float64), rx, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.sizes[b]), rs, rtol=0, atol=1e-6)
        rsrc = ref.tome_scatter_amax(np.eye(x.shape[1]), plan)   # ToMe's merge_source from eye(T)
        np.testing.assert_array_equal(np.asarray(R.source_matrix(out.source, out.num_tokens)[b]), rsrc)
    return step, out


CASES = [  # (B, T, class_token, distill_token, r)
    (1, 12, False, False, 3),   # B=1, T even, no protection
    (3, 13, True, False, 4),    # B>1, T odd, cls
    (2, 14, True, True, 5),     # cls + distillation
    (2, 15, True, True, 4),     # T odd with distillation
    (2, 11, True, False, 0),    # r = 0 -> identity
    (2, 11, True, False, 5),    # r at the cap (11 - 1) // 2
    (2, 11, True, False, 9),    # r beyond the cap (clamped)
    (2, 10, False, False, 7),   # beyond the cap without cls: all of A merges
]


@pytest.mark.parametrize("bsz,t,cls,dist,r", CASES)
def test_bipartite_matches_loop_reference(bsz, t, cls, dist, r):
    x = _rand(t, bsz, t, 5)
    metric = _rand(t + 100, bsz, t, 4)
    sizes = np.ones((bsz, t), np.float32)
    step, out = _check_against_ref(x, sizes, metric, r, cls, dist)
    assert out.num_tokens == R.merged_tokens(t, r, class_token=cls, distill_token=dist)
    assert step.num_out == out.num_tokens


def test_multi_layer_chain_with_nonuniform_sizes():
    """Three layers feeding the reference's own output back in; sizes become non-uniform."""
    bsz, t = 2, 17
    x = _rand(1, bsz, t, 6)
    metric = _rand(2, bsz, t, 4)
    sizes = np.random.default_rng(3).integers(1, 5, size=(bsz, t)).astype(np.float32)
    rx = [np.asarray(x[b], np.float64) for b in range(bsz)]
    rs = [sizes[b].astype(np.float64) for b in range(bsz)]
    xs, ss, ms = jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(metric)
    for layer, r in enumerate([3, 4, 2]):
        step, out = _tome(xs, ss, ms, r=r, class_token=True, distill_token=False)
        for b in range(bsz):
            plan = ref.tome_plan(np.asarray(ms[b]), r, True, False)
            np.testing.assert_array_equal(np.asarray(step.assign[b]), plan["assign"])
            rx[b], rs[b] = ref.tome_merge_wavg(rx[b], rs[b], plan)
            np.testing.assert_allclose(np.asarray(out.x[b]), rx[b], rtol=2e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(out.sizes[b]), rs[b], atol=1e-6)
        assert len(np.unique(np.asarray(out.sizes))) > 2, "sizes should be non-uniform"
        np.testing.assert_allclose(np.asarray(out.sizes).sum(1), sizes.sum(1), rtol=1e-6)
        xs, ss = out.x, out.sizes
        # next layer's metric: a fixed random projection of the merged tokens
        ms = xs[..., :4] + 0.5 * xs[..., 2:6]


def test_bf16_inputs_keep_f32_similarity_and_sizes():
    bsz, t = 2, 13
    x = jnp.asarray(_rand(5, bsz, t, 8)).astype(jnp.bfloat16)
    metric = jnp.asarray(_rand(6, bsz, t, 8)).astype(jnp.bfloat16)
    step, out = _tome(x, jnp.ones((bsz, t)), metric, r=4, class_token=True, distill_token=False)
    assert out.x.dtype == jnp.bfloat16 and out.sizes.dtype == jnp.float32
    m32 = np.asarray(metric.astype(jnp.float32))
    for b in range(bsz):
        plan = ref.tome_plan(m32[b], 4, True, False)
        np.testing.assert_array_equal(np.asarray(step.assign[b]), plan["assign"])
        rx, _ = ref.tome_merge_wavg(np.asarray(x[b].astype(jnp.float32)), np.ones(t), plan)
        np.testing.assert_allclose(np.asarray(out.x[b].astype(jnp.float32)), rx, rtol=1e-2, atol=1e-2)


def test_duplicate_tokens_tie_break_is_stable():
    """One-hot metrics make the cosine exactly 0 or 1: ties everywhere, resolved by index order."""
    bsz, t = 2, 16
    cls_id = np.random.default_rng(7).integers(0, 3, size=(bsz, t))
    metric = np.eye(3, dtype=np.float32)[cls_id]
    x = _rand(8, bsz, t, 4)
    step, _ = _check_against_ref(x, np.ones((bsz, t), np.float32), metric, 6, False, False)
    # The reference's unstable sort would be free to pick any of the tied rows; ours picks the lowest.
    node_max = [max(ref.cos(metric[0][i], metric[0][j]) for j in range(1, t, 2)) for i in range(0, t, 2)]
    assert len(set(node_max)) < len(node_max)


def test_zero_vectors_give_no_nan():
    bsz, t = 2, 12
    metric = _rand(9, bsz, t, 4)
    metric[:, [0, 3, 4, 7]] = 0.0   # zero rows in A and in B (the reference would produce NaN scores)
    x = _rand(10, bsz, t, 4)
    _, out = _check_against_ref(x, np.ones((bsz, t), np.float32), metric, 5, True, False)
    assert np.isfinite(np.asarray(out.x)).all()


def test_nan_metric_is_never_a_best_match_and_stays_visible():
    bsz, t = 1, 14
    metric = _rand(11, bsz, t, 4)
    x = _rand(12, bsz, t, 4)
    metric[0, 4] = np.nan   # an A token
    metric[0, 5] = np.nan   # a B token
    x[0, 4] = np.nan
    x[0, 5] = np.nan
    step, out = _tome(jnp.asarray(x), jnp.ones((bsz, t)), jnp.asarray(metric), r=5, class_token=True,
                      distill_token=False)
    assign = np.asarray(step.assign[0])
    # the NaN B token receives nobody; the NaN A token is not merged anywhere
    assert (assign == assign[5]).sum() == 1
    assert (assign == assign[4]).sum() == 1
    plan = ref.tome_plan(metric[0], 5, True, False)
    np.testing.assert_array_equal(assign, plan["assign"])
    ox = np.asarray(out.x[0])
    nan_rows = np.isnan(ox).any(-1)
    assert set(np.flatnonzero(nan_rows)) == {assign[4], assign[5]}


@pytest.mark.parametrize("distill_token", [False, True])
def test_class_token_survives_nan_rows_at_the_cap(distill_token):
    """NaN A tokens end at ``-inf`` like the blocked class row; at the cap one of them must merge, never
    the class token (the old stable rank put index 0 first among the ``-inf`` ties)."""
    bsz, t = 2, 15
    metric = _rand(31, bsz, t, 4)
    metric[:, [2, 6, 10]] = np.nan            # three A tokens
    x = _rand(32, bsz, t, 4)
    r = (t - 1 - int(distill_token)) // 2      # the cap: every A token but the class token merges
    step, _ = _tome(jnp.asarray(x), jnp.ones((bsz, t)), jnp.asarray(metric), r=r, class_token=True,
                    distill_token=distill_token)
    assign = np.asarray(step.assign)
    assert (assign[:, 0] == 0).all() and ((assign == 0).sum(-1) == 1).all()
    for b in range(bsz):
        np.testing.assert_array_equal(assign[b], ref.tome_plan(metric[b], r, True, distill_token)["assign"])


def test_signed_zero_scores_tie():
    """-0.0 and +0.0 best scores tie (lower index merges first), as in a comparison sort and the loop
    reference, although ``top_k`` orders floats by bit pattern. (XLA's CPU dot yields +0.0 for these
    metrics, so the key is checked directly; other backends' dots may keep -0.0.)"""
    from reduction.tome import _merge_order_key
    key = _merge_order_key(jnp.asarray([-0.0, 0.0, -0.0, 0.5]), class_token=False)
    np.testing.assert_array_equal(np.asarray(jax.lax.top_k(key, 4)[1]), [3, 0, 1, 2])
    metric = np.zeros((1, 8, 2), np.float32)
    metric[0, 0::2] = [[1, 0], [-1, 0], [1, 0], [-1, 0]]   # A tokens
    metric[0, 1::2] = [0, -1]                               # B tokens: A-B scores are +-0.0
    for class_token, r in ((True, 1), (False, 1), (False, 2)):
        step = R.bipartite_soft_matching(jnp.asarray(metric), r=r, class_token=class_token)
        plan = ref.tome_plan(metric[0], r, class_token, False)
        np.testing.assert_array_equal(np.asarray(step.assign[0]), plan["assign"])
        np.testing.assert_array_equal(np.asarray(step.anchor[0]), plan["anchor"])


def test_mean_mode_equals_wavg_only_for_unit_sizes():
    """ToMe's ``merge(x, "mean")`` (include_self) is the size-weighted average when every size is 1."""
    x, metric = _rand(13, 1, 11, 3), _rand(14, 1, 11, 3)
    _, out = _tome(jnp.asarray(x), jnp.ones((1, 11)), jnp.asarray(metric), r=4, class_token=True,
                   distill_token=False)
    plan = ref.tome_plan(metric[0], 4, True, False)
    mean = ref.tome_scatter_merge(x[0], plan) / ref.tome_scatter_merge(np.ones((11, 1)), plan)
    np.testing.assert_allclose(np.asarray(out.x[0]), mean, atol=1e-6)
    sizes = np.arange(1, 12, dtype=np.float32)[None]
    _, out2 = _tome(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(metric), r=4, class_token=True,
                    distill_token=False)
    assert not np.allclose(np.asarray(out2.x[0]), mean, atol=1e-3)


@pytest.mark.parametrize("dist", [False, True])
def test_unmerge_vs_reference_unmerge(dist):
    t, r = 14, 5
    x, metric = _rand(15, 1, t, 3), _rand(16, 1, t, 3)
    _, out = _tome(jnp.asarray(x), jnp.ones((1, t)), jnp.asarray(metric), r=r, class_token=True,
                   distill_token=dist)
    ours = np.asarray(R.unmerge(out.x, out.source)[0])
    # Correct by construction: every original token receives the merged token that holds it.
    holder = np.asarray(out.source[0])
    np.testing.assert_array_equal(ours, np.asarray(out.x[0])[holder])
    theirs = ref.tome_unmerge(np.asarray(out.x[0]), ref.tome_plan(metric[0], r, True, dist), t)
    if dist:
        # The reference ignores the [cls, dist, unm.., dst..] reorder: it puts the distillation token's
        # value where the second unmerged A token belongs.
        assert not np.allclose(ours, theirs)
        np.testing.assert_array_equal(ours[1], np.asarray(out.x[0, 1]))
    else:
        np.testing.assert_allclose(ours, theirs, atol=0)


# -- variants ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,k", [(12, 2), (14, 3), (10, 4), (7, 1)])
def test_kth_bipartite_matches_reference(t, k):
    bsz = 2
    metric, x = _rand(t * k, bsz, t, 4), _rand(t * k + 1, bsz, t, 5)
    step = jax.jit(functools.partial(R.kth_bipartite_soft_matching, k=k))(jnp.asarray(metric))
    out = R.apply_step(R.init_state(jnp.asarray(x)), step)
    for b in range(bsz):
        assign, anchor = ref.kth_plan(metric[b], k)
        np.testing.assert_array_equal(np.asarray(step.assign[b]), assign)
        np.testing.assert_array_equal(np.asarray(step.anchor[b]), anchor)
        rx, rs = ref.merge_plan(x[b], np.ones(t), assign, len(anchor))
        np.testing.assert_allclose(np.asarray(out.x[b]), rx, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.sizes[b]), rs)
    kept = (t // k) * k if k > 1 else t
    np.testing.assert_allclose(np.asarray(out.sizes).sum(1), kept)  # the tail is dropped, as in the reference


@pytest.mark.parametrize("cls", [False, True])
def test_random_bipartite_with_injected_permutation(cls):
    bsz, t, r = 2, 11, 4
    p = int(cls)
    metric, x = _rand(20, bsz, t, 4), _rand(21, bsz, t, 3)
    rng = np.random.default_rng(22)
    perm = np.stack([rng.permutation(np.arange(p, t)) for _ in range(bsz)]).astype(np.int32)
    step = R.random_bipartite_soft_matching(jnp.asarray(metric), r=r, permutation=jnp.asarray(perm),
                                            class_token=cls)
    out = R.apply_step(R.init_state(jnp.asarray(x)), step)
    for b in range(bsz):
        assign, anchor = ref.random_plan(metric[b], r, perm[b], cls)
        np.testing.assert_array_equal(np.asarray(step.assign[b]), assign)
        np.testing.assert_array_equal(np.asarray(step.anchor[b]), anchor)
        rx, _ = ref.merge_plan(x[b], np.ones(t), assign, len(anchor))
        np.testing.assert_allclose(np.asarray(out.x[b]), rx, atol=1e-6)
    if cls:
        np.testing.assert_array_equal(np.asarray(out.x[:, 0]), x[:, 0])


def test_random_bipartite_key_is_deterministic_and_a_permutation():
    metric = jnp.asarray(_rand(23, 3, 10, 4))
    f = jax.jit(functools.partial(R.random_bipartite_soft_matching, r=3, class_token=True))
    s1, s2 = f(metric, key=jax.random.key(0)), f(metric, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(s1.assign), np.asarray(s2.assign))
    s3 = f(metric, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(s1.anchor), np.asarray(s3.anchor))
    anchor = np.asarray(s1.anchor)
    assert (anchor[:, 0] == 0).all() and all(len(set(row)) == len(row) for row in anchor)
    assert np.asarray(s1.assign).max() == 6 and (np.asarray(s1.assign) >= 0).all()


# -- proportional attention --------------------------------------------------------------------------------


def test_proportional_attention_bias_is_log_size_on_logits():
    rng = np.random.default_rng(30)
    q, k, v = (rng.normal(size=(1, 5, 1, 4)).astype(np.float32) for _ in range(3))
    sizes = np.array([[1.0, 3.0, 2.0, 1.0, 5.0]], np.float32)
    bias = R.proportional_attention_bias(jnp.asarray(sizes))
    assert bias.shape == (1, 1, 1, 5)
    np.testing.assert_allclose(np.asarray(bias)[0, 0, 0], np.log(sizes[0]), rtol=1e-6)
    got = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=bias)
    want = ref.attention_loop(q[0, :, 0], k[0, :, 0], v[0, :, 0], bias=np.log(sizes[0]))
    np.testing.assert_allclose(np.asarray(got)[0, :, 0], want, atol=1e-5)


def test_proportional_attention_equals_duplicated_tokens():
    """A key of size s behaves exactly like s identical copies of that key (and value)."""
    rng = np.random.default_rng(31)
    q = rng.normal(size=(1, 3, 2, 4)).astype(np.float32)
    k = rng.normal(size=(1, 4, 2, 4)).astype(np.float32)
    v = rng.normal(size=(1, 4, 2, 4)).astype(np.float32)
    sizes = np.array([1, 3, 1, 2])
    reps = np.repeat(np.arange(4), sizes)
    merged = jax.nn.dot_product_attention(q, k, v, bias=R.proportional_attention_bias(jnp.asarray(sizes[None])))
    copies = jax.nn.dot_product_attention(q, k[:, reps], v[:, reps])
    np.testing.assert_allclose(np.asarray(merged), np.asarray(copies), atol=1e-5)
    plain = jax.nn.dot_product_attention(q, k, v)
    assert not np.allclose(np.asarray(plain), np.asarray(copies), atol=1e-3)


# -- invariants ----------------------------------------------------------------------------------------------


def test_invariants_mass_sizes_protection():
    bsz, t = 3, 15
    x = _rand(40, bsz, t, 6)
    sizes = np.random.default_rng(41).integers(1, 4, size=(bsz, t)).astype(np.float32)
    _, out = _tome(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(_rand(42, bsz, t, 4)), r=5, class_token=True,
                   distill_token=True)
    np.testing.assert_allclose(np.asarray(out.sizes).sum(1), sizes.sum(1), rtol=1e-6)
    mass_in = (x * sizes[..., None]).sum(1)
    mass_out = (np.asarray(out.x) * np.asarray(out.sizes)[..., None]).sum(1)
    np.testing.assert_allclose(mass_out, mass_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.x[:, :2]), x[:, :2])       # cls and dist untouched
    np.testing.assert_array_equal(np.asarray(out.positions[:, :2]), [[0, 1]] * bsz)
    np.testing.assert_array_equal(np.asarray(out.sizes[:, :2]), sizes[:, :2])


def test_jit_equals_eager_and_vmap_equals_loop():
    bsz, t = 3, 13
    x, metric = jnp.asarray(_rand(50, bsz, t, 4)), jnp.asarray(_rand(51, bsz, t, 4))

    def f(x, metric):
        return R.tome_merge(R.init_state(x), metric, r=4, class_token=True).x

    eager = f(x, metric)
    jf = jax.jit(f)
    np.testing.assert_allclose(np.asarray(jf(x, metric)), np.asarray(eager), atol=1e-6)
    per_example = np.stack([np.asarray(jf(x[b : b + 1], metric[b : b + 1]))[0] for b in range(bsz)])
    vmapped = jax.jit(jax.vmap(lambda a, m: f(a[None], m[None])[0]))(x, metric)
    np.testing.assert_allclose(np.asarray(vmapped), per_example, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eager), per_example, atol=1e-6)


def test_gradients_are_finite():
    x, metric = jnp.asarray(_rand(60, 2, 12, 4)), jnp.asarray(_rand(61, 2, 12, 4))
    metric = metric.at[:, 3].set(0.0)

    def loss(x):
        return jnp.sum(R.tome_merge(R.init_state(x), x[..., :4] + metric, r=5, class_token=True).x ** 2)

    g = jax.jit(jax.grad(loss))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_no_retrace_for_new_data_of_same_shape():
    traces = []

    @jax.jit
    def f(x, metric):
        traces.append(1)
        return R.tome_merge(R.init_state(x), metric, r=3, class_token=True).x

    for seed in range(3):
        f(jnp.asarray(_rand(seed, 2, 11, 4)), jnp.asarray(_rand(seed + 9, 2, 11, 4))).block_until_ready()
    assert len(traces) == 1


# -- argument errors at trace time -------------------------------------------------------------------------


def test_errors_name_the_argument_under_jit():
    x = jnp.zeros((2, 9, 4))
    with pytest.raises(ValueError, match="r must be"):
        jax.jit(lambda m: R.bipartite_soft_matching(m, r=-2).assign)(x)
    with pytest.raises(ValueError, match="metric must have rank 3"):
        jax.jit(lambda m: R.bipartite_soft_matching(m, r=2).assign)(x[0])
    with pytest.raises(ValueError, match="metric"):
        jax.jit(lambda a, m: R.tome_merge(R.init_state(a), m, r=2).x)(x, jnp.zeros((2, 8, 4)))
    with pytest.raises(ValueError, match="k must be"):
        jax.jit(lambda m: R.kth_bipartite_soft_matching(m, k=10).assign)(x)
    with pytest.raises(ValueError, match="r must leave"):
        R.random_bipartite_soft_matching(x, r=9, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        R.random_bipartite_soft_matching(x, r=2)
    with pytest.raises(ValueError, match="permutation"):
        R.random_bipartite_soft_matching(x, r=2, permutation=jnp.zeros((2, 5), jnp.int32))
