"""HoT: DPC-kNN pruning vs a loop reference, the cluster source map and unmerge, the learned recovery vs a loop
reference of its cross-attention, gradients into the queries, the ViT with both, the dense task and the preset."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reduction as R
from reduction.hot import HoTPrune, dpc_knn, dpc_knn_scores, hot_prune_step, sincos_2d
from reduction.nnx import HoTRecovery


# -- loop references, written from the method's description -------------------------------------------------


def ref_dpc_knn(x, kept, knn=2, valid=None):
    """DPC-kNN (official ``cluster_dpc_knn`` without the random tie-break) in float64 with explicit loops:
    ``(score, centres ascending, cluster slot per token)``."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    ok = [True] * n if valid is None else [bool(v) for v in valid]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = math.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(c))) / math.sqrt(c)
    rho = [0.0] * n
    for i in range(n):
        near = sorted(d[i, j] for j in range(n) if ok[j])[:knn]
        near += [0.0] * (knn - len(near))
        rho[i] = math.exp(-sum(v * v for v in near) / knn)
    d_max = max(d[i, j] for i in range(n) for j in range(n) if ok[i] and ok[j])
    score = [-math.inf] * n
    for i in range(n):
        if not ok[i]:
            continue
        denser = [d[i, j] for j in range(n) if ok[j] and (rho[j] > rho[i] or (rho[j] == rho[i] and j < i))]
        score[i] = (min(denser) if denser else d_max) * rho[i]
    order = sorted(range(n), key=lambda i: (-score[i], i))
    centres = sorted(order[:kept])
    cluster = []
    for i in range(n):
        if not ok[i]:
            cluster.append(-1)
        elif i in centres:
            cluster.append(centres.index(i))
        else:
            dists = [d[cc, i] if ok[cc] else math.inf for cc in centres]
            cluster.append(int(np.argmin(dists)))
    return np.array(score), np.array(centres), np.array(cluster)


def ref_recovery(module, x, positions, valid, p):
    """HoT's TRA with explicit loops over examples, queries and heads (float64), from the module's weights."""
    w = {name: (np.asarray(getattr(module, name).kernel[...], np.float64),
                np.asarray(getattr(module, name).bias[...], np.float64)) for name in ("q", "k", "v", "proj")}
    q0 = np.asarray(module.queries[...], np.float64)[0]
    x = np.asarray(x, np.float64)
    b, t, c = x.shape
    n, h = module.num_patches, module.heads
    dh = c // h
    gw = module.grid[1]

    def code(pos):
        out = np.zeros(c)
        if not 0 <= pos < n:
            return out
        q = c // 4
        r, col = divmod(pos, gw)
        for i in range(q):
            f = 1.0 / 10000.0 ** (i / q)
            out[i], out[q + i], out[2 * q + i], out[3 * q + i] = (math.sin(r * f), math.cos(r * f),
                                                                  math.sin(col * f), math.cos(col * f))
        return out

    out = np.zeros((b, n, c))
    for bi in range(b):
        kv = np.stack([x[bi, j] + code(int(positions[bi, j]) - p) for j in range(t)])
        keys = kv @ w["k"][0] + w["k"][1]
        vals = kv @ w["v"][0] + w["v"][1]
        for qi in range(n):
            q_in = q0[qi] + code(qi)
            q = q_in @ w["q"][0] + w["q"][1]
            y = np.zeros(c)
            for hh in range(h):
                sl = slice(hh * dh, (hh + 1) * dh)
                logits = [float(q[sl] @ keys[j, sl]) / math.sqrt(dh) if (valid is None or valid[bi, j]) else -math.inf
                          for j in range(t)]
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                s = sum(e)
                for j in range(t):
                    y[sl] += e[j] / s * vals[j, sl]
            out[bi, qi] = q_in + y @ w["proj"][0] + w["proj"][1]
    return out


# -- DPC-kNN -------------------------------------------------------------------------------------------------


def test_dpc_knn_matches_the_loop_reference_batched_with_and_without_validity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12, 5)).astype(np.float32)
    x[0, 7] = x[0, 3] + 0.01               # a tight pair: high density, one of them a child of the other
    valid = np.ones((3, 12), bool)
    valid[1, [2, 5, 9]] = False
    fn = jax.jit(jax.vmap(lambda xb, vb: (dpc_knn_scores(xb, knn=2, valid=vb)[0],) + dpc_knn(xb, 4, knn=2, valid=vb)))
    score, centres, cluster = map(np.asarray, fn(jnp.asarray(x), jnp.asarray(valid)))
    for b in range(3):
        v = None if b != 1 else valid[b]
        r_score, r_centres, r_cluster = ref_dpc_knn(x[b], 4, 2, v)
        ok = np.isfinite(r_score)
        np.testing.assert_allclose(score[b][ok], r_score[ok], rtol=1e-4, atol=1e-5)   # float32 Gram distances
        assert np.all(np.isneginf(score[b][~ok]))
        np.testing.assert_array_equal(centres[b], r_centres)
        np.testing.assert_array_equal(cluster[b], r_cluster)
    # knn = 3 (two other neighbours) on one example, eager
    r_score, r_centres, r_cluster = ref_dpc_knn(x[2], 5, 3)
    c3, k3 = dpc_knn(jnp.asarray(x[2]), 5, knn=3)
    np.testing.assert_array_equal(np.asarray(c3), r_centres)
    np.testing.assert_array_equal(np.asarray(k3), r_cluster)


def test_dpc_knn_ties_go_to_the_lower_index_and_the_densest_token_is_a_centre():
    x = jnp.zeros((6, 4)).at[4].set(3.0).at[5].set(-3.0)      # four identical tokens and two outliers
    score, centres, cluster = jax.jit(lambda x: (dpc_knn_scores(x)[0],) + dpc_knn(x, 3))(x)
    np.testing.assert_array_equal(np.asarray(centres), [0, 4, 5])   # 0: the first of the tied densest tokens
    np.testing.assert_array_equal(np.asarray(cluster), [0, 0, 0, 0, 1, 2])
    assert float(score[0]) == pytest.approx(float(jnp.max(score)))


@pytest.mark.long   # the DPC-kNN selection itself is checked by default
def test_reducer_keeps_the_prefix_records_clusters_and_unmerge_copies_the_centre():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 17, 8)), jnp.float32)
    red = R.build_layer_reducers(2, {"method": "hot", "keep": 5})[1]
    info = R.LayerInfo(num_protected=1, hidden=x)
    assert red.num_out(17, info) == 6
    state = R.init_state(x, track_source=True)
    out = jax.jit(lambda s: red(s, info))(state)
    eager = red(state, info)
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(eager.x))
    assert out.x.shape == (2, 6, 8)
    src = np.asarray(out.source)
    assert np.all(src[:, 0] == 0) and np.all(src >= 0)              # class token kept, every patch represented
    full = np.asarray(R.unmerge(out.x, out.source))
    for b in range(2):
        centres, cluster = ref_dpc_knn(np.asarray(x[b, 1:]), 5)[1:]
        np.testing.assert_array_equal(np.asarray(out.positions[b, 1:]), centres + 1)
        np.testing.assert_array_equal(src[b, 1:], cluster + 1)
        # unmerge: every patch copies its centre's (unchanged) features
        np.testing.assert_array_equal(full[b, 1:], np.asarray(x[b, 1 + centres[cluster]]))
    drop = R.build_layer_reducers(2, {"method": "hot", "keep": 5, "represent": "drop"})[1](state, info)
    np.testing.assert_array_equal(np.asarray(drop.x), np.asarray(out.x))
    assert int(jnp.sum(drop.source >= 0)) == 2 * 6                  # only the kept tokens hold themselves


def test_hot_prune_step_with_a_validity_mask_marks_filler_slots():
    x = jax.random.normal(jax.random.key(2), (2, 9, 4))
    valid = jnp.ones((2, 9), bool).at[1, 3:].set(False)          # example 1 has 2 valid candidates, keep 4
    state = jax.jit(lambda x, valid: R.apply_step(R.init_state(x, valid=valid, track_source=True),
                                                  hot_prune_step(x, keep=4, num_protected=1, valid=valid)))(x, valid)
    np.testing.assert_array_equal(np.asarray(state.valid[1]), [True, True, True, False, False])
    assert np.all(np.asarray(state.valid[0]))
    src = np.asarray(state.source[1])
    assert np.all(src[3:] == -1) and np.all(src[:3] >= 0)


def test_bad_options_are_named_before_tracing():
    with pytest.raises(R.SpecError, match="knn"):
        R.build_layer_reducers(2, {"method": "hot", "kn": 2})
    with pytest.raises(ValueError, match="represent"):
        R.build_layer_reducers(2, {"method": "hot", "represent": "merge"})
    with pytest.raises(ValueError, match="knn"):
        dpc_knn(jnp.zeros((3, 2)), 2, knn=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(jnp.arange(4), (2, 2), 6)


# -- the learned recovery ------------------------------------------------------------------------------------


def _recovery(pos="sincos"):
    m = HoTRecovery(num_patches=16, grid=(4, 4), dim=8, heads=2, pos=pos, rngs=nnx.Rngs(0))
    m.queries[...] = 0.3 * jax.random.normal(jax.random.key(5), m.queries[...].shape)    # non-trivial queries
    return m


def test_recovery_matches_the_loop_reference_and_restores_the_full_count():
    m = _recovery()
    x = jax.random.normal(jax.random.key(3), (2, 6, 8))
    positions = jnp.array([[0, 2, 5, 9, 11, 16], [0, 1, 3, 4, 8, 14]], jnp.int32)
    valid = jnp.ones((2, 6), bool).at[1, 5].set(False)
    state = R.TokenState(x=x, sizes=jnp.ones((2, 6)), positions=positions, valid=valid,
                         source=jnp.zeros((2, 17), jnp.int32))
    info = R.LayerInfo(num_protected=1)
    assert m.num_out(6, info) == m.train_num_out(6, info) == 17
    graphdef, params = nnx.split(m)
    run = jax.jit(lambda params, state: nnx.merge(graphdef, params)(state, info, train=True))
    out, aux = run(params, state)
    assert out.x.shape == (2, 17, 8) and out.valid is None and float(aux["loss"]) == 0.0
    np.testing.assert_array_equal(np.asarray(out.source), np.broadcast_to(np.arange(17), (2, 17)))
    np.testing.assert_array_equal(np.asarray(out.x[:, 0]), np.asarray(x[:, 0]))     # class token passes through
    ref = ref_recovery(m, np.asarray(x), np.asarray(positions), np.asarray(valid), 1)
    np.testing.assert_allclose(np.asarray(out.x[:, 1:]), ref, rtol=1e-4, atol=1e-5)
    # the masked token has no influence
    moved = state.replace(x=state.x.at[1, 5].set(100.0))
    np.testing.assert_allclose(np.asarray(run(params, moved)[0].x[1]), np.asarray(out.x[1]), atol=1e-6)


@pytest.mark.long   # a value_and_grad compile of the recovery; the forward is checked by default
def test_gradients_reach_the_queries_and_the_kept_tokens():
    m = _recovery(pos="none")
    x = jax.random.normal(jax.random.key(4), (2, 5, 8))
    graphdef, params = nnx.split(m)

    def loss(params, x):
        mod = nnx.merge(graphdef, params)
        out, _ = mod(R.init_state(x), R.LayerInfo(num_protected=1), train=True)
        return jnp.sum(jnp.sin(out.x[:, 1:]))

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    gq = np.asarray(g_params["queries"][...])
    assert np.all(np.isfinite(gq)) and np.all(np.abs(gq).sum(-1) > 0)       # every query gets a gradient
    assert np.all(np.isfinite(np.asarray(g_x))) and float(jnp.abs(g_x[:, 1:]).sum()) > 0


@pytest.mark.long   # a full ViT compile (twice)
def test_vit_with_pruning_and_recovery_gives_one_output_per_patch_without_retrace():
    from models.vit import ViT, make_forward

    model = ViT.from_config(None, width=16, depth=3, mlp_dim=32, heads=2, patch_size=4, image_size=16,
                            num_classes=3, pool="dense")
    model.attach_reducer(2, HoTRecovery(num_patches=16, dim=16, heads=2, rngs=nnx.Rngs(1)))
    reducers = model.build_reducers({"method": "hot", "keep": 4, "layers": [0]})
    assert model.tokens_per_layer(16, reducers) == [(17, 5), (5, 5), (5, 17)]
    fwd = make_forward(model, reducers, return_source=True)
    imgs = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    out, aux = fwd(imgs)
    out2, _ = fwd(imgs + 1.0)
    assert out.shape == (2, 17, 3) and fwd.num_traces() == 1
    np.testing.assert_array_equal(np.asarray(aux["source"]), np.broadcast_to(np.arange(17), (2, 17)))
    full = model.flops(16, None)
    assert model.flops(16, reducers) < full


# -- the dense task and the preset -------------------------------------------------------------------------


@pytest.mark.long   # the dense task through a ViT forward
def test_dense_task_unmerges_pruned_outputs_and_counts_iou():
    import ml_collections
    from models.vit import ViT
    from training.tasks import DenseTask, dense_miou

    model = ViT.from_config(None, width=16, depth=2, mlp_dim=32, heads=2, patch_size=4, image_size=16,
                            num_classes=3, pool="dense")
    cfg = ml_collections.ConfigDict({"data": {"mean": (0.5,), "std": (0.5,), "input_size": 0}})
    rng = np.random.default_rng(3)
    batch = {"image": rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8),
             "patch_labels": rng.integers(0, 3, (2, 16)).astype(np.int32)}
    task = DenseTask(num_classes=3)
    graphdef, params = nnx.split(model)

    def run(params, batch, represent):
        m = nnx.merge(graphdef, params)
        reducers = m.build_reducers({"method": "hot", "keep": 4, "layers": [0], "represent": represent})
        logits, _ = task.forward(m, batch, cfg, reducers, None, False)
        out, aux = m(batch["image"].astype(jnp.float32) / 255.0 * 2 - 1, reducers=reducers, return_source=True)
        return logits, out, aux["source"], task.eval(m, batch, cfg, reducers)

    run = jax.jit(run, static_argnums=2)
    for represent, covered in (("drop", 4 / 16),):        # "cluster" (covered = 1): the reducer test above
        logits, out, source, (loss, correct, extras) = run(params, batch, represent)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(R.unmerge(out, source)[:, 1:]), atol=1e-5)
        assert loss.shape == correct.shape == (2,)
        np.testing.assert_allclose(np.asarray(extras["covered"]), covered)
        if represent == "drop":
            src = np.asarray(source[:, 1:])
            assert np.all(np.asarray(logits)[src < 0] == 0.0)        # no representative: zero logits
    pred = np.argmax(np.asarray(logits), -1)
    for c in range(3):
        np.testing.assert_array_equal(np.asarray(extras[f"inter_{c}"]),
                                      ((pred == c) & (batch["patch_labels"] == c)).sum(-1))
    rec = {f"eval_{k}": float(np.mean(v)) for k, v in extras.items()}
    ious = [rec[f"eval_inter_{c}"] / rec[f"eval_union_{c}"] for c in range(3) if rec[f"eval_union_{c}"] > 0]
    assert dense_miou(rec, 3) == pytest.approx(np.mean(ious))
    with pytest.raises(ValueError, match="patch_labels"):       # at trace time, before any compile
        run(params, dict(batch, patch_labels=np.zeros((2, 9), np.int32)), "drop")


def test_synth_seg_labels_follow_the_painted_pixels():
    from data.synth_seg import patch_majority, pixel_labels, synth_seg
    from data.synth_vqa import SynthVQA

    src = synth_seg("val", size=4, image_size=24, grid=3, patch=6)
    scenes = SynthVQA("val", size=4, image_size=24, grid=3, min_objects=2, max_objects=7, style="shapes")
    for i in range(4):
        image, objects, _ = scenes.scene(i)
        np.testing.assert_array_equal(src[i]["image"], image)
        px = pixel_labels(scenes, i)
        assert set(np.unique(px)) - {0} == {1 + ["red", "orange", "yellow", "green", "blue", "purple", "brown",
                                                  "black"].index(o[0]) for o in objects}
        np.testing.assert_array_equal(src[i]["patch_labels"], patch_majority(px, 6, 9))
    lab = np.array([[1, 1, 0, 0], [1, 0, 0, 2], [2, 2, 0, 0], [2, 2, 0, 0]], np.uint8)
    np.testing.assert_array_equal(patch_majority(lab, 2, 3), [1, 0, 2, 0])   # 2-2 tie in patch 1 -> class 0


TINY = ["data.size=32", "data.eval_size=16", "data.image_size=24", "data.patch=6", "model.vit.image_size=24",
        "model.vit.width=16", "model.vit.depth=2", "model.vit.mlp_dim=32", "model.vit.heads=2", "model.recover.heads=2",
        "model.reduction.layers=(0,)", "train.steps=2", "train.batch_size=8", "train.eval_batch_size=16",
        "train.log_every=1", "train.progress=False", "train.tensorboard=False", "checkpoint.use_async=False",
        "optim.warmup_steps=1", "data.num_threads=1"]


@pytest.mark.long
def test_train_py_runs_the_hot_dense_preset(tmp_path):
    """Long suite (about 20 s of compiles and checkpoints; the dense task and both HoT parts have default tests)."""
    import train

    summary = train.main(["--config", "hot_dense", "--workdir", str(tmp_path), *TINY])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and summary["step"] == 2
    ev = [x for x in lines if "eval_accuracy" in x][-1]
    assert ev["eval_covered"] == 1.0 and "eval_inter_0" in ev
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["recover"]["method"] == "hot" and saved["model"]["reduction"]["method"] == "hot"
