"""Eager calls of the public ops (reduction._compiled.eager_jit): one compiled program per static configuration
and shape, the same values as the unwrapped op and as under a user's jit, no trace on new data of the same shape,
named errors (shape and value checks) still raised, and nothing added to a user's jaxpr. Tiny shapes."""

import dataclasses
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction._compiled import clear_cache, eager_jit, eager_jit_disabled, trace_count
from reduction.reducers import method_info

B, T, C = 2, 11, 8


def _data(seed, t=T):
    """A token state with non-uniform sizes and a metric, from NumPy (no eager JAX ops to compile)."""
    rng = np.random.default_rng(seed)
    ids = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    state = R.TokenState(x=jnp.asarray(rng.normal(size=(B, t, C)), jnp.float32),
                         sizes=jnp.asarray(rng.uniform(0.5, 2.0, (B, t)), jnp.float32),
                         positions=jnp.asarray(ids), source=jnp.asarray(ids))
    return state, jnp.asarray(rng.normal(size=(B, t, 4)), jnp.float32)


def _assert_tree_close(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for u, v in zip(la, lb):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape
        if np.issubdtype(u.dtype, np.floating):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(u, v)


def _ops():
    """(name, op, call, long): a merge, a Reducer call and a pruning selection by default; PiToMe, DivPrune and
    the LLM-point DART selection in the long suite."""
    tome = R.ToMe(r=3)
    divprune = R.build_layer_reducers(2, {"method": "divprune", "keep": 4, "layers": [1]})[1]

    def tome_call(state, metric):
        return tome(state, R.LayerInfo(num_protected=1, metric=metric))

    def divprune_call(state, metric):
        return divprune(state, R.LayerInfo(num_protected=1, hidden=state.x))

    def dart(state, metric):
        return R.dart_keep_indices(state.x, metric, image_starts=jnp.array([1, 2]), image_len=8, budget=4)

    return [
        ("tome_merge", R.tome_merge, lambda s, m: R.tome_merge(s, m, r=3, class_token=True), False),
        ("ToMe()", type(tome).__call__, tome_call, False),
        ("topk_keep_indices", R.topk_keep_indices,
         lambda s, m: R.topk_keep_indices(m[..., 0], keep=5, num_protected=1), False),
        ("pitome_merge", R.pitome_merge, lambda s, m: R.pitome_merge(s, m, ratio=0.7, margin=0.5), True),
        ("DivPrune()", type(divprune).__call__, divprune_call, True),
        ("dart_keep_indices", R.dart_keep_indices, dart, True),
    ]


def _params():
    return [pytest.param(n, op, call, marks=[pytest.mark.long] if long else [], id=n) for n, op, call, long in _ops()]


def _check_compiled_once(op, call, caplog):
    state, metric = _data(0)
    before = trace_count(op)
    eager = call(state, metric)
    assert trace_count(op) == before + 1                        # compiled as one program
    _assert_tree_close(eager, jax.jit(call)(state, metric))     # under a jit the op is traced directly

    # New data of the same shape: no trace and no XLA compile.
    state2, metric2 = _data(1)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        again = call(state2, metric2)
        jax.block_until_ready(again)
    assert trace_count(op) == before + 1
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()], [r.getMessage() for r in caplog.records]
    return (state, metric, eager), (state2, metric2, again)


@pytest.mark.parametrize("name, op, call", _params())
def test_eager_equals_jitted_and_compiles_once(name, op, call, caplog):
    _check_compiled_once(op, call, caplog)


@pytest.mark.long
@pytest.mark.parametrize("name, op, call", [pytest.param(n, op, c, id=n) for n, op, c, _ in _ops()])
def test_eager_equals_the_uncompiled_op(name, op, call, caplog):
    """The compiled eager call against the primitive-by-primitive one (many small compiles: long suite)."""
    clear_cache(op)
    for state, metric, out in _check_compiled_once(op, call, caplog):
        with eager_jit_disabled():
            _assert_tree_close(out, call(state, metric))


def test_static_arguments_and_shapes_key_the_cache():
    state, metric = _data(2)
    n = trace_count(R.bipartite_soft_matching)
    s2 = R.bipartite_soft_matching(metric, r=2, class_token=True)
    R.bipartite_soft_matching(metric + 1.0, r=2, class_token=True)
    assert trace_count(R.bipartite_soft_matching) == n + 1
    s3 = R.bipartite_soft_matching(metric, r=3, class_token=True)          # a new count: a new program
    assert trace_count(R.bipartite_soft_matching) == n + 2
    assert (s2.num_out, s3.num_out) == (T - 2, T - 3)                      # counts stay static Python ints
    assert isinstance(s2.num_out, int) and isinstance(s2.merges, bool)
    R.bipartite_soft_matching(metric[:, :9], r=2, class_token=True)        # a new shape: a new program
    assert trace_count(R.bipartite_soft_matching) == n + 3
    R.bipartite_soft_matching(np.asarray(metric), r=2, class_token=True)   # NumPy input, same shape and dtype
    assert trace_count(R.bipartite_soft_matching) == n + 3


def test_named_errors_are_raised_eagerly_before_and_after_a_compile():
    state, metric = _data(3)
    for _ in range(2):                                          # before any program exists, then with it cached
        with pytest.raises(ValueError, match="r must be a Python int"):
            R.bipartite_soft_matching(metric, r=True, class_token=True)
        with pytest.raises(ValueError, match="r must be a Python int"):
            R.bipartite_soft_matching(metric, r=2.0, class_token=True)
        with pytest.raises(ValueError, match="metric must have rank 3"):
            R.bipartite_soft_matching(metric[0], r=2)
        with pytest.raises(ValueError, match=r"step expects 10 tokens but state.x has 11"):
            R.apply_step(state, R.prune_step(jnp.zeros((B, 3), jnp.int32), 10))
        R.bipartite_soft_matching(metric, r=2, class_token=True)          # compiled by the test above


def test_value_checks_run_on_every_eager_call():
    """Span bounds read values: the check runs before the compiled program, on a cache hit too; the warning of a
    budget that keeps everything is repeated on every call, as the uncompiled op does."""
    attn = np.random.default_rng(4).uniform(size=(B, 1, 3, T)).astype(np.float32)
    attn = jnp.asarray(attn / attn.sum(-1, keepdims=True))
    kw = dict(image_len=6, budget=6)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keep = R.fastv_keep_indices(attn, image_starts=jnp.array([1, 5]), **kw)
        assert keep.shape == (B, T) and any("nothing is pruned" in str(w.message) for w in caught)
        with pytest.raises(ValueError, match=r"image_starts\[1\].*runs outside the sequence"):
            R.fastv_keep_indices(attn, image_starts=jnp.array([1, 6]), **kw)
    # The same check for a Reducer called at the LLM point.
    red = R.build_layer_reducers(3, {"method": "random", "keep": 3, "layers": [1]}, point="llm")[1]
    state, _ = _data(5)
    ok = red(state, R.LayerInfo(hidden=state.x, image_starts=jnp.array([0, 5]), image_len=6))
    assert ok.x.shape == (B, T - 3, C)
    with pytest.raises(ValueError, match=r"image_starts\[1\].*runs outside the sequence"):
        red(state, R.LayerInfo(hidden=state.x, image_starts=jnp.array([0, 7]), image_len=6))


def test_inside_a_user_jit_nothing_is_added_or_retraced():
    state, metric = _data(6)

    def user(fn):
        def f(s, m):
            out = fn(s, m, r=3, class_token=True)
            return out.x.sum() + out.sizes.sum()
        return f

    wrapped = jax.make_jaxpr(user(R.tome_merge))(state, metric)
    plain = jax.make_jaxpr(user(R.tome_merge.__wrapped__))(state, metric)
    assert str(wrapped) == str(plain)                           # the same program, no nested call

    traces = []

    @jax.jit
    def model(s, m):
        traces.append(1)
        return R.tome_merge(s, m, r=3, class_token=True)

    before = trace_count(R.tome_merge)
    out1 = model(state, metric)
    state2, metric2 = _data(7)
    out2 = model(state2, metric2)
    assert len(traces) == 1 and trace_count(R.tome_merge) == before     # the eager cache is not used in a trace
    _assert_tree_close(out1, R.tome_merge(state, metric, r=3, class_token=True))
    _assert_tree_close(out2, R.tome_merge(state2, metric2, r=3, class_token=True))


def test_unhashable_configuration_runs_uncompiled():
    @dataclasses.dataclass(frozen=True)
    class Listy(R.Reducer):
        layers: list = dataclasses.field(default_factory=lambda: [1, 2])

        def num_out(self, num_tokens, info):
            return num_tokens

        def plan(self, state, info):
            return R.prune_step(jnp.broadcast_to(jnp.arange(state.num_tokens), state.x.shape[:2]), state.num_tokens)

    state, _ = _data(8)
    before = trace_count(R.Reducer.__call__)
    out = Listy()(state, R.LayerInfo())
    assert trace_count(R.Reducer.__call__) == before
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(state.x))


def test_every_registered_method_builds_hashable_reducers():
    """A reducer's fields are its static configuration: every method's default reducers hash, so an eager call
    compiles instead of falling back."""
    for name in R.available_methods():
        point = method_info(name).points[0]
        for red in R.build_layer_reducers(4, {"method": name}, point=point):
            if red is not None:
                hash(red)


def test_decorator_keeps_the_function_metadata():
    @eager_jit
    def double(x, *, k: int):
        """Doc."""
        return x * k

    assert double.__doc__ == "Doc." and double.__name__ == "double"
    np.testing.assert_array_equal(np.asarray(double(jnp.arange(3), k=2)), [0, 2, 4])
    double(jnp.arange(3) + 1, k=2)
    assert trace_count(double) == 1
