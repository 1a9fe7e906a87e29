"""Learned reducers in the VLM sweep (evaluation/learned.py, evaluation.vlm_sweep.resolve_learned): a sweep row loads
a trained delete gate (its weights, not the initialisation), bad sources raise LearnedReducerError before anything
compiles, and the prefill FLOPs at the real (valid) token counts against Llama.prefill_flops; on a tiny random VLM,
batched with left padding."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from evaluation.learned import LearnedReducerError, export_learned, prepare_learned
from evaluation.vlm_sweep import Setting, _score_fn, _task_for, layer_flops, real_prefill_flops, resolve_learned
from models.clip_vision import CLIPVisionConfig
from models.llama import LlamaConfig
from models.vlm import VLM, VLMConfig, build_prompts

IMG = 63
CFG = VLMConfig(vision=CLIPVisionConfig(image_size=16, patch_size=4, dim=16, num_layers=1, num_heads=2, mlp_dim=32),
                text=LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48),
                image_token_id=IMG)
PLAN = dict(point="llm", method="delete_gate", layers=[1], side="image", scale=-30.0, threshold=-15.0,
            keep_ratio=0.75, target=0.5, weight=10.0, init_bias=2.0, protect_last=1)
ROW = {"point": "llm", "method": "delete_gate", "layers": [1], "keep": 8}
TCFG = ml_collections.ConfigDict(dict(data=dict(mean=(0.5,), std=(0.5,), input_size=0)))


@pytest.fixture(scope="module")
def vlm():
    """The tiny VLM with seeded NumPy weights (no per-shape initialiser compiles: the test's results do not depend on
    the weights, only on the gate's)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray((0.2 * rng.normal(size=s.shape)).astype(s.dtype))
                         if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype), state)
    return nnx.merge(graphdef, state)


def _source(path, kernel=None, bias=-10.0, plan=PLAN):
    """A trained-gate folder as evaluation.learned.export_learned writes it: learned.npz + the run's config.json.
    Default: kernel 0, bias -10, so every image token gets G = -30 sigmoid(10) < -15 and is deleted."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model": {"plan": plan}}))
    kernel = np.zeros((CFG.text.dim, 1), np.float32) if kernel is None else kernel
    np.savez(path / "learned.npz", **{"learned/1/gate/kernel": kernel,
                                      "learned/1/gate/bias": np.full((1,), bias, np.float32)})
    return str(path)


@dataclasses.dataclass(frozen=True)
class _Task:
    """The sweep's task interface on prompts already built: ``batch["ids"], batch["valid"]`` (left-padded)."""

    plan: object = None
    image_tokens: int = 0
    answer_ids: tuple = (5, 6, 7)

    def prompt(self, batch):
        return batch["ids"], batch["valid"]


def _batch(n_img):
    ids, valid = build_prompts([[1, 2, IMG, 5, 6], [3, IMG, 4, 5, 6, 7, 8]], image_token_id=IMG,
                               num_image_tokens=n_img)
    image = np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3)).astype(np.uint8)
    return dict(ids=ids, valid=valid, image=image, answer=jnp.array([0, 1]), mask=jnp.array([True, True]))


def _settings():
    return [Setting("none", "none", 1.0, None), Setting("llm", "delete_gate", 0.5, dict(ROW))]


def _cfg(source):
    return ml_collections.ConfigDict(dict(learned=dict(delete_gate=source)))


def test_sweep_row_loads_the_trained_gate_and_differs_from_its_initialisation(vlm, tmp_path):
    src = _source(tmp_path / "gate")
    trained = resolve_learned(_cfg(src), vlm, _settings())
    init = resolve_learned(_cfg("init"), vlm, _settings())
    assert trained[0][0] is vlm and not vlm.learned_layers          # the shared model stays without the gate
    m, plan, spec, desc = trained[1]
    assert m.learned_layers == (1,) and desc.endswith("learned.npz")
    assert spec["threshold"] == -15.0 and spec["keep"] == 8 and "keep_ratio" not in spec   # row capacity wins
    np.testing.assert_array_equal(np.asarray(m.learned["1"].gate.bias[...]), [-10.0])
    assert float(init[1][0].learned["1"].gate.bias[...][0]) == 2.0    # "init": the module's initialisation
    batch = _batch(vlm.num_image_tokens())
    assert init[1][1] == plan                                        # same static plan: one compile serves both
    fn = _score_fn(_task_for(_Task(), m, plan), TCFG, nnx.graphdef(m))
    empty = {name: np.asarray(fn(nnx.state(mm), batch)[1]) for name, mm in (("trained", m), ("init", init[1][0]))}
    # trained: all 8 capacity slots of layer 1 empty in both (left-padded) examples; init: every slot holds a token
    np.testing.assert_array_equal(empty["trained"], [[0, 8], [0, 8]])
    np.testing.assert_array_equal(empty["init"], 0)
    fl = vlm.flops(plan, text_tokens=batch["ids"].shape[1] - vlm.num_image_tokens())
    real = real_prefill_flops(CFG.text, fl["prefill"], fl["cache_lengths"], empty["trained"])
    assert (real < fl["prefill"]).all()


def test_bad_learned_sources_raise_named_errors(vlm, tmp_path):
    with pytest.raises(LearnedReducerError, match=r"learned\.delete_gate="):
        resolve_learned(_cfg(""), vlm, _settings())
    with pytest.raises(LearnedReducerError, match="not a folder"):
        prepare_learned(vlm, dict(ROW), str(tmp_path / "nowhere"))
    with pytest.raises(LearnedReducerError, match="layers"):
        prepare_learned(vlm, dict(ROW), _source(tmp_path / "l2", plan=dict(PLAN, layers=[2])))
    with pytest.raises(LearnedReducerError, match="other shape"):
        prepare_learned(vlm, dict(ROW), _source(tmp_path / "c16", kernel=np.zeros((16, 1), np.float32)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(LearnedReducerError, match="neither"):
        prepare_learned(vlm, dict(ROW), str(tmp_path / "empty"))
    with pytest.raises(LearnedReducerError, match="no checkpoint"):
        export_learned(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_prefill_flops_at_real_counts_match_the_llama_count(vlm):

    lm = vlm.language_model
    n, head = 40, 2 * CFG.text.dim * CFG.text.vocab_size
    assert sum(layer_flops(CFG.text, n) for _ in range(2)) + head == lm.prefill_flops(n)
    empty = np.array([[0, 0], [5, 5], [3, 0]])
    real = real_prefill_flops(CFG.text, lm.prefill_flops(n), [n] * 2, empty)
    assert real[0] == lm.prefill_flops(n) and real[1] == lm.prefill_flops(n - 5)
    assert real[2] == lm.prefill_flops(n) - layer_flops(CFG.text, n) + layer_flops(CFG.text, n - 3)
