"""Issue 15, op and spec items: each bad input gets a named error before any compile, or the right behaviour.

Every test here fails on the code before the fix (noted per test). Loop references are in this file or
``tests/ref_merging.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduction as R
from reduction import step as step_lib
from tests import ref_merging as ref


def _merge_case():
    """Two examples, T=10 -> K=5 (pairs), a NaN in a mover of slot 0 and an Inf in the anchor of slot 3."""
    x = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    x[0, 1, 0] = np.nan
    x[1, 6, 2] = np.inf
    assign = np.array([[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 2, np.int32)
    anchor = np.array([[0, 2, 4, 6, 8]] * 2, np.int32)
    return x, assign, anchor


@pytest.mark.parametrize("max_sparse", [64, -1])       # the few-movers path, then the scatter-add path
def test_a_nan_or_inf_stays_in_its_own_slot_on_both_merge_paths(monkeypatch, max_sparse):
    """Old code: the few-movers path turned column 0 of every slot NaN (0 * NaN in the slot-sum product)."""
    monkeypatch.setattr(step_lib, "_SPARSE_MERGE_MAX_MOVERS", max_sparse)
    x, assign, anchor = _merge_case()
    out = R.apply_step(R.init_state(jnp.asarray(x)), R.merge_step(jnp.asarray(assign), jnp.asarray(anchor)))
    for e in range(2):
        rx, _ = ref.merge_plan(x[e], np.ones(10), assign[e], 5)
        got = np.asarray(out.x[e])
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(rx))
        np.testing.assert_allclose(got[np.isfinite(rx)], rx[np.isfinite(rx)], rtol=1e-6)
    assert np.isnan(out.x[0, 0, 0]) and np.isinf(out.x[1, 3, 2])
    assert np.isfinite(np.asarray(out.x[0, 1:])).all() and np.isfinite(np.asarray(out.x[1, :3])).all()


@pytest.mark.parametrize("max_sparse", [64, -1])
def test_an_invalid_token_holding_nan_does_not_reach_its_slot(monkeypatch, max_sparse):
    """Padding carries weight 0; old code still added ``0 * NaN`` into the slot it was assigned to (both paths)."""
    monkeypatch.setattr(step_lib, "_SPARSE_MERGE_MAX_MOVERS", max_sparse)
    x, assign, anchor = _merge_case()
    x = np.nan_to_num(x, nan=0.0, posinf=0.0)
    x[:, 3] = np.nan                                    # token 3 (a mover of slot 1) is padding
    valid = np.ones((2, 10), bool)
    valid[:, 3] = False
    state = R.init_state(jnp.asarray(x), valid=jnp.asarray(valid))
    out = R.apply_step(state, R.merge_step(jnp.asarray(assign), jnp.asarray(anchor)))
    np.testing.assert_array_equal(np.asarray(out.x[:, 1]), x[:, 2])      # slot 1 is its anchor alone
    np.testing.assert_array_equal(np.asarray(out.sizes[:, 1]), [1.0, 1.0])


def test_batch_of_zero_with_a_reducer_that_reads_keys():
    """Old code: ``keys.reshape(b, t, -1)`` raised ZeroDivisionError at B = 0 (and so did apply_to_tokens)."""
    from models.layers import reducer_info

    red = R.build_layer_reducers(1, {"method": "dart", "keep": 3})[0]
    keys = jnp.zeros((0, 7, 2, 4))
    hidden = jnp.zeros((0, 7, 8))
    info = reducer_info(red, dict(num_protected=1), keys, None, hidden)
    assert info.keys.shape == (0, 7, 8)
    step = R.merge_step(jnp.zeros((0, 7), jnp.int32), jnp.zeros((0, 3), jnp.int32))
    assert R.apply_to_tokens(jnp.zeros((0, 7, 2, 4)), step).shape == (0, 3, 2, 4)


def _tome_prefix_ref(metric, r, p):
    """ToMe with a protected prefix of ``p`` tokens, by loops: A = even positions, B = odd; protected A tokens never
    merge away, protected B tokens never receive; the protected tokens keep slots ``0..p-1``, then the unmerged A
    tokens in ascending order, then the other B tokens."""
    t = len(metric)
    r = min(r, (t - p) // 2)
    a_tok, b_tok = list(range(0, t, 2)), list(range(1, t, 2))
    scores = [[-math.inf if (j < p or i < p) else ref.cos(metric[i], metric[j]) for j in b_tok] for i in a_tok]
    node_max = [max(row) for row in scores]
    node_idx = [ref.first_argmax(row) for row in scores]
    order = [i for i in ref.stable_desc(node_max) if a_tok[i] >= p] + [i for i in range(len(a_tok)) if a_tok[i] < p]
    src = order[:r]
    unm = sorted(order[r:])
    slots = {b: [b] for b in b_tok}
    for i in src:
        slots[b_tok[node_idx[i]]].append(a_tok[i])
    layout = [(q, slots[q] if q % 2 else [q]) for q in range(p)]
    layout += [(a_tok[i], [a_tok[i]]) for i in unm if a_tok[i] >= p]
    layout += [(b, slots[b]) for b in b_tok if b >= p]
    return ref.plan_from_layout(t, layout)


@pytest.mark.long   # the protected prefix is also a default property test
def test_tome_protects_registers_like_the_class_token():
    """Old code: ToMe refused ``num_protected > 2`` (DINOv2-reg), and with P = 2 and no distillation token it let
    token 1 (a register) merge."""
    rng = np.random.default_rng(0)
    metric = rng.normal(size=(2, 19, 6)).astype(np.float32)
    metric[:, 9] = metric[:, 3]                           # an exact duplicate of a register: the best match
    red = R.build_layer_reducers(1, {"method": "tome", "r": 6})[0]
    for p in (5,):
        info = R.LayerInfo(num_protected=p, metric=jnp.asarray(metric))
        step = red.plan(R.init_state(jnp.asarray(metric)), info)
        assert step.num_out == red.num_out(19, info) == 19 - 6
        for e in range(2):
            assign, anchor = _tome_prefix_ref(metric[e], 6, p)
            np.testing.assert_array_equal(np.asarray(step.assign[e]), assign)
            np.testing.assert_array_equal(np.asarray(step.anchor[e]), anchor)
        out = R.apply_step(R.init_state(jnp.asarray(metric)), step)
        np.testing.assert_array_equal(np.asarray(out.x[:, :p]), metric[:, :p])
        np.testing.assert_array_equal(np.asarray(out.sizes[:, :p]), 1.0)


@pytest.mark.long
def test_tome_in_a_vit_with_registers():
    """A DINOv2-reg-like layout (class token + 4 registers) runs ToMe; old code raised at the first block."""
    from models.vit import ViT, make_forward

    model = ViT.from_config(dict(width=16, depth=2, mlp_dim=32, heads=2, patch_size=8, image_size=32,
                                 num_classes=3, num_registers=4))
    logits, aux = make_forward(model, model.build_reducers({"method": "tome", "r": 4}))(jnp.ones((1, 32, 32, 3)))
    assert logits.shape == (1, 3) and aux["tokens_per_layer"] == [(21, 17), (17, 13)]


@pytest.mark.parametrize("method", ["topk_cls", "zerotprune"])
def test_class_token_methods_refuse_points_without_one(method):
    """Old code: with no class token, patch 0 was ranked as if it were one (and always kept)."""
    x = jax.random.normal(jax.random.key(1), (1, 10, 8))
    att = jax.nn.softmax(jax.random.normal(jax.random.key(0), (1, 2, 10, 10)))
    red = R.build_layer_reducers(1, {"method": method, "keep_ratio": 0.5})[0]
    for info in (R.LayerInfo(num_protected=0), R.LayerInfo(num_protected=4, num_registers=4)):
        info = dataclasses.replace(info, attention=att, metric=x, keys=x, hidden=x)
        with pytest.raises(ValueError, match="class token"):
            red.plan(R.init_state(x), info)
    assert R.LayerInfo(num_protected=3, num_registers=2).has_class_token     # class token, then registers


def test_topk_cls_refuses_attention_over_another_token_count():
    """Old code: attention over 7 tokens pruned a 10-token state with it."""
    x = jnp.zeros((1, 10, 8))
    red = R.build_layer_reducers(1, {"method": "topk_cls", "keep_ratio": 0.5})[0]
    for shape in [(1, 2, 7, 7), (1, 2, 10, 7), (2, 2, 10, 10)]:
        with pytest.raises(ValueError, match="attention has shape"):
            red.plan(R.init_state(x), R.LayerInfo(num_protected=1, attention=jnp.ones(shape) / shape[-1]))


def test_image_spans_outside_the_sequence_raise_or_clip():
    """Old code: a span past the end (or before the start) silently dropped text tokens."""
    from reduction.baselines import fastv_keep_indices
    from reduction.dart import dart_keep_indices

    h = jax.random.normal(jax.random.key(2), (1, 20, 8))
    att = jax.nn.softmax(jax.random.normal(jax.random.key(3), (1, 2, 20, 20)))
    divprune = R.build_layer_reducers(3, {"method": "divprune", "keep": 2, "layers": [1]}, point="llm")[1]
    calls = {
        "dart": lambda s, n: dart_keep_indices(h, h, image_starts=s, image_len=n, budget=2),
        "fastv": lambda s, n: fastv_keep_indices(att, image_starts=s, image_len=n, budget=2),
        "divprune": lambda s, n: divprune.plan(R.init_state(h), R.LayerInfo(hidden=h, image_starts=s,
                                                                            image_len=n)).anchor,
    }
    for name, call in calls.items():      # concrete starts: checked before any work
        for starts, n, what in [([15], 8, "runs outside"), ([-3], 8, "runs outside"), ([[0, 4]], 6, "overlap")]:
            with pytest.raises(ValueError, match=f"image_starts.*{what}"):
                call(jnp.asarray(starts, jnp.int32), n)
    # Traced starts cannot be checked: they are clipped, the same as giving the clipped start (one compile).
    fastv = jax.jit(lambda s: calls["fastv"](s, 8))
    past, clipped = (np.asarray(fastv(jnp.asarray([s], jnp.int32))) for s in (15, 12))
    np.testing.assert_array_equal(past, clipped)
    assert set(range(12)) <= set(past[0].tolist())          # every text token before the span survives


def test_layers_outside_the_depth_raise_for_tome_and_pitome():
    """The registry already checked ``layers``; old code let the builders themselves (``R.pitome_layers`` is
    public) silently disable the method for an out-of-range entry."""
    from reduction.pitome import pitome_layers
    from reduction.reducers import _tome_layers

    for build in (lambda ls: _tome_layers(4, r=2, layers=ls), lambda ls: pitome_layers(4, layers=ls)):
        for bad in ([4], [-1], [0, 7]):
            with pytest.raises(R.SpecError, match="outside"):
                build(bad)
        assert sum(v is not None for v in build([1, 3])) == 2
    for method in ("tome", "pitome"):
        with pytest.raises(R.SpecError, match="layers entry 12"):
            R.build_layer_reducers(12, {"method": method, "r": 2, "layers": [12]} if method == "tome"
                                   else {"method": method, "layers": [12]})


def test_eval_exits_nonzero_naming_an_unknown_method(capsys):
    """Old code: the sweep recorded the method's rows as errors and ``eval.py`` exited 0."""
    from evaluation.cli import main
    from evaluation.sweep import resolve_methods

    assert main(["--config", "eval_quick", "methods=('tome','tomee')"]) == 2
    assert "unknown reduction method 'tomee' (did you mean 'tome'?)" in capsys.readouterr().err
    assert main(["--config", "eval_quick", "methods=('fastv',)"]) == 2          # an LLM-only method in a ViT
    assert "cannot run in a ViT block" in capsys.readouterr().err
    assert main(["--config", "eval_vlm_quick", "methods.llm=('fastvv',)"]) == 2
    assert "'fastvv'" in capsys.readouterr().err
    with pytest.raises(R.SpecError):
        resolve_methods(("all", "nosuch"))
    assert "tome" in resolve_methods(("all",))


def test_a_merge_step_where_nothing_moves_returns_the_tokens():
    """A merge step with no movers (every token its own anchor, e.g. VisionZip keeping every candidate)."""
    import jax.numpy as jnp
    import numpy as np

    import reduction as R

    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    assign = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    out = R.apply_step(R.init_state(x), R.merge_step(assign, assign))
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(out.sizes), np.ones((2, 5)))
