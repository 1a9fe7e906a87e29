"""MrT5-style learned delete gate in the LLM (reduction/delete_gate.py, reduction.nnx.DeleteGateModule): loop
references of the gate, the hard deletion and the soft (key-bias) forward; soft with zero gates equals the plain LM;
hard equals the LM on the physically shortened sequence; gradients; jit; left padding; training moves the deleted
fraction toward the target."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import reduction as R
from models.llama import Llama, LlamaConfig, positions_from_valid
from models.vit import _Bound
from reduction import delete_gate as dg
from reduction.nnx import DeleteGateModule
from ref_pruning import delete_gate_ref, hard_delete_ref, llama_block_ref

PRE, IMG, TXT, C = 2, 8, 4, 16      # prefix, image and text tokens of the test prompts; channels
T = PRE + IMG + TXT


def _lm(layers=3):
    return Llama(LlamaConfig(vocab_size=16, dim=C, num_layers=layers, num_heads=2, num_kv_heads=1, mlp_dim=24),
                 rngs=nnx.Rngs(0))


def _gate(side="image", seed=1, init_bias=0.0, **kw):
    m = DeleteGateModule(dim=C, side=side, init_bias=init_bias, rngs=nnx.Rngs(seed), **kw)
    m.gate.kernel[...] = jax.random.normal(jax.random.key(seed), (C, 1))   # a spread of gates on both sides of 0
    return m


def _run(lm, module, x, valid, starts, *, train, layer=1, sink=None):
    reds = [None] * lm.cfg.num_layers
    reds[layer] = _Bound(module, train, sink)
    return lm.prefill_embeds(x, positions_from_valid(valid), valid, reducers=tuple(reds), image_starts=starts,
                             image_len=IMG)


def _data(b=1, seed=0, pad=0):
    x = jax.random.normal(jax.random.key(seed), (b, T + pad, C))
    valid = jnp.broadcast_to(jnp.arange(T + pad) >= pad, (b, T + pad))
    return x, valid, jnp.full((b,), PRE + pad, jnp.int32)


def test_gate_candidates_and_hard_step_match_loop_references():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, T, C)).astype(np.float32)
    w, b = rng.normal(size=C).astype(np.float32), 0.3
    g = dg.gate_values(jnp.asarray(h), jnp.asarray(w), b, scale=-30.0)
    np.testing.assert_allclose(np.asarray(g), delete_gate_ref(h, w, b, -30.0), rtol=1e-5, atol=1e-4)
    assert bool(jnp.all((g < 0) & (g > -30)))
    starts = np.array([2, 3, 4])
    valid = np.arange(T)[None] >= np.array([[0], [1], [2]])        # left padding 0, 1, 2
    for side in ("image", "text"):
        cand = np.asarray(dg.candidate_mask(T, side=side, image_starts=jnp.asarray(starts), image_len=IMG,
                                            valid=jnp.asarray(valid), protect_last=1))
        for i in range(3):
            for t in range(T):
                image = starts[i] <= t < starts[i] + IMG
                want = image if side == "image" else (not image and valid[i, t] and t < T - 1)
                assert cand[i, t] == want, (side, i, t)
        caps = ((-15.0, T - IMG + 5), (-15.0, T - IMG + 2), (-25.0, T)) if side == "image" else ((-15.0, T),)
        for thr, cap in caps:
            step = dg.hard_delete_step(g, jnp.asarray(cand), threshold=thr, capacity=cap, valid=jnp.asarray(valid))
            idx, keep = hard_delete_ref(np.asarray(g), cand, thr, cap, valid)
            np.testing.assert_array_equal(np.asarray(step.anchor), idx)
            np.testing.assert_array_equal(np.asarray(step.valid), keep)


def test_soft_forward_matches_loop_reference_block():
    """Gate before layer 1 of a 2-layer LM in training mode: layer 1 adds G to the candidates' key logits."""
    lm, gate = _lm(layers=2), _gate()
    x, valid, starts = _data(b=2, pad=0)
    sink = {}
    h, _, _ = _run(lm, gate, x, valid, starts, train=True, sink=sink)
    pos = positions_from_valid(valid)
    from models.llama import prefill_mask
    h0 = lm.layers[0].prefill(x, pos, prefill_mask(valid))[0]
    g = delete_gate_ref(np.asarray(lm.norm(h0)), np.asarray(gate.gate.kernel[...][:, 0]), float(gate.gate.bias[...][0]),
                        -30.0)
    cand = np.zeros((2, T), bool)
    cand[:, PRE:PRE + IMG] = True
    blk = lm.layers[1]
    a, m = blk.self_attn, blk.mlp
    p = dict(ln1=np.asarray(blk.input_layernorm.scale[...]), ln2=np.asarray(blk.post_attention_layernorm.scale[...]),
             wq=np.asarray(a.q_proj.kernel[...]), wk=np.asarray(a.k_proj.kernel[...]),
             wv=np.asarray(a.v_proj.kernel[...]), wo=np.asarray(a.o_proj.kernel[...]),
             wg=np.asarray(m.gate_proj.kernel[...]), wu=np.asarray(m.up_proj.kernel[...]),
             wd=np.asarray(m.down_proj.kernel[...]))
    want = llama_block_ref(np.asarray(h0), np.asarray(pos), np.asarray(valid), np.where(cand, g, 0.0), p, heads=2,
                           kv_heads=1, eps=lm.cfg.norm_eps, theta=lm.cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(h), want, atol=2e-4)
    frac = (g[:, PRE:PRE + IMG] / -30.0).mean()
    np.testing.assert_allclose(float(sink[1]["loss"]), 10.0 * (frac - 0.5) ** 2, rtol=1e-4)


def test_soft_with_zero_gates_equals_the_unreduced_lm_and_hard_equals_the_shortened_sequence():
    lm = _lm()
    x, valid, starts = _data(b=2, seed=3)
    plain, _, _ = lm.prefill_embeds(x, positions_from_valid(valid), valid)
    shut = DeleteGateModule(dim=C, init_bias=1e4, rngs=nnx.Rngs(0))        # G = -0 everywhere: nothing deleted
    soft, _, _ = _run(lm, shut, x, valid, starts, train=True)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(plain), atol=1e-5)
    pos = positions_from_valid(valid)
    from models.llama import prefill_mask
    h0 = lm.layers[0].prefill(x, pos, prefill_mask(valid))[0]
    for side, cap in (("image", T - IMG + 6), ("text", T)):
        sink = {}
        h, _, aux = _run(lm, _gate(side), x, valid, starts, train=False, sink=sink)
        assert h.shape[1] == cap
        deleted = np.asarray(sink[1]["deleted"])
        assert np.all(deleted > 0) and np.all(deleted < 1), deleted
        for i in range(2):                             # the kept tokens alone, from layer 1 on, no bias
            keep = np.asarray(aux["valid"][i])
            kept_pos = np.asarray(aux["positions"][i])[keep]
            y = h0[i][np.asarray(pos[i]).searchsorted(kept_pos)][None]
            v1 = jnp.ones(y.shape[:2], bool)
            for blk in lm.layers[1:]:
                y = blk.prefill(y, jnp.asarray(kept_pos)[None], prefill_mask(v1))[0]
            np.testing.assert_allclose(np.asarray(h[i])[keep], np.asarray(y[0]), atol=2e-5)
            assert T - 1 in kept_pos                   # the last instruction token survives


def test_gradients_reach_the_gate_finite_and_nonzero():
    lm, gate = _lm(), _gate(init_bias=0.5)
    x, valid, starts = _data(b=2, seed=4)

    def loss(g):
        sink = {}
        h, _, _ = _run(lm, g, x, valid, starts, train=True, sink=sink)
        return jnp.sum(h[:, -1] ** 2) + sink[1]["loss"]

    grads = nnx.grad(loss)(gate)
    for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_jit_equals_eager_without_retrace_and_left_padding_equals_alone():
    lm = _lm()
    traces = []

    def run(lm_, g, x, valid, starts, train):
        traces.append(1)
        sink = {}
        h, _, aux = _run(lm_, g, x, valid, starts, train=train, sink=sink)
        return h, aux["positions"], aux["valid"], sink[1]["deleted_hard"]

    fn = nnx.jit(run, static_argnames="train")
    for train in (True, False):
        gate = _gate(seed=5)
        traces.clear()
        for seed in (6, 7):                                     # new data, same shapes: one trace
            xa, va, sa = _data(b=1, seed=seed)
            xb, vb, sb = _data(b=1, seed=seed + 10, pad=3)
            batch = (jnp.concatenate([jnp.pad(xa, ((0, 0), (3, 0), (0, 0))), xb]),
                     jnp.concatenate([jnp.pad(va, ((0, 0), (3, 0))), vb]), jnp.concatenate([sa + 3, sb]))
            hb, pb, kb, db = fn(lm, gate, *batch, train)
            he, pe, ke, de = run(lm, gate, *batch, train)
            np.testing.assert_allclose(np.asarray(hb), np.asarray(he), atol=1e-5)
            np.testing.assert_array_equal(np.asarray(kb), np.asarray(ke))
            for i, (x1, v1, s1) in enumerate(((xa, va, sa), (xb[:, 3:], vb[:, 3:], sb - 3))):
                h1, p1, k1, d1 = run(lm, gate, x1, v1, s1, train)
                keep_b, keep_1 = np.asarray(kb[i]), np.asarray(k1[0])
                np.testing.assert_array_equal(np.asarray(pb[i])[keep_b], np.asarray(p1[0])[keep_1])
                np.testing.assert_allclose(np.asarray(hb[i])[keep_b], np.asarray(h1[0])[keep_1], atol=3e-5)
                np.testing.assert_allclose(float(db[i]), float(d1[0]), atol=1e-6)
        assert len(traces) == 1 + 2 * 2 + 2 * 2 - 1    # jit once; eager calls trace as they go


def test_training_a_few_steps_moves_the_deleted_fraction_toward_the_target():
    """The generic path: a tiny VLM with model.plan delete_gate, its module attached, VQATask's loss (which adds the
    model's reducer_loss), a few optimiser steps on the gate only."""
    from models.clip_vision import CLIPVisionConfig
    from models.vlm import VLM, VLMConfig
    from training.tasks import _with_reducers

    img_id = 31
    cfg = VLMConfig(vision=CLIPVisionConfig(image_size=8, patch_size=4, dim=16, num_layers=1, num_heads=2,
                                            mlp_dim=16),
                    text=LlamaConfig(vocab_size=32, dim=C, num_layers=3, num_heads=2, num_kv_heads=1, mlp_dim=24),
                    image_token_id=img_id)
    vlm = VLM(cfg, rngs=nnx.Rngs(0))
    plan = vlm.build_plan({"point": "llm", "method": "delete_gate", "layers": [1], "target": 0.5})
    vlm.attach_learned(plan, seed=2)
    assert vlm.learned_layers == (1,)
    n = vlm.num_image_tokens(plan)
    ids = jnp.concatenate([jnp.full((2, n), img_id), jnp.array([[3, 4, 5], [6, 7, 8]])], axis=1)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    graph, params, rest = nnx.split(vlm, nnx.Param, ...)
    gate_only = jax.tree_util.tree_map_with_path(
        lambda path, _: "learned" in jax.tree_util.keystr(path), params)
    tx = optax.masked(optax.adam(0.3), gate_only)
    opt = tx.init(params)

    def loss_fn(p):
        logits, aux = nnx.merge(graph, p, rest)(ids, images, plan=plan, last_logits=True, train=True)
        loss, metrics = _with_reducers(jnp.mean(logits[:, -1, 0] ** 2) * 0.0, {}, aux)
        return loss, metrics

    @jax.jit
    def step(p, o):
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        up, o = tx.update(g, o, p)
        return optax.apply_updates(p, up), o, metrics["deleted_soft_L1"]

    fracs = []
    for _ in range(6):
        params, opt, frac = step(params, opt)
        fracs.append(float(frac))
    assert fracs[0] < 0.2                                    # init_bias 2: G ~ -3.6, about 12% soft-deleted
    assert abs(fracs[-1] - 0.5) < abs(fracs[0] - 0.5) - 0.1, fracs
    nnx.update(vlm, params)
    _, aux = vlm(ids, images, plan=plan, last_logits=True)   # inference: hard deletion, no loss
    assert float(aux["reducer_loss"]) == 0.0 and aux["tokens_per_layer"][1] < aux["tokens_per_layer"][0]


def test_bad_options_and_an_unattached_gate_are_named_errors():
    with pytest.raises(ValueError, match="side"):
        R.build_layer_reducers(3, {"method": "delete_gate", "side": "audio"}, point="llm")
    with pytest.raises(ValueError, match="threshold"):
        R.build_layer_reducers(3, {"method": "delete_gate", "threshold": 1.0}, point="llm")
    with pytest.raises(R.SpecError, match="cannot run"):
        R.build_layer_reducers(3, {"method": "delete_gate"}, point="vit")
    decl = R.build_layer_reducers(3, {"method": "delete_gate", "layers": [1], "keep_ratio": 0.5}, point="llm")[1]
    info = R.LayerInfo(image_len=IMG, image_starts=jnp.array([PRE]), hidden=jnp.zeros((1, T, C)))
    assert decl.num_out(T, info) == T - IMG // 2
    with pytest.raises(ValueError, match="learned reducer"):
        decl(R.init_state(jnp.zeros((1, T, C))), info)
