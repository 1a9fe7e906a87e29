"""Parity with Hugging Face transformers: tiny random LlamaForCausalLM and LlavaForConditionalGeneration
are built here, saved as safetensors, loaded with loaders.hf_llava and compared (logits within 1e-4
in float32, greedy tokens equal)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models.generate import generate  # noqa: E402
from loaders.common import LoadError  # noqa: E402
from loaders.hf_llava import load_hf_llama, load_hf_llava  # noqa: E402
from models.vlm import build_plan  # noqa: E402

IMAGE_TOKEN = 99


def _text_config(**kw):
    base = dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.1, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0}, pad_token_id=0, eos_token_id=None,
                bos_token_id=None)
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_text_config()).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    torch.manual_seed(1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=16, initializer_range=0.1)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=_text_config(), image_token_index=IMAGE_TOKEN,
                                   image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_llama_logits_and_greedy_match_hf(hf_llama):
    hf, path = hf_llama
    lm, report = load_hf_llama(path)
    assert report.ok and report.loaded
    ids = np.random.default_rng(0).integers(1, 99, size=(2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours, _ = nnx.jit(lambda m, i: m(i))(lm, jnp.asarray(ids))
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4

    with torch.no_grad():
        ref_tok = hf.generate(torch.tensor(ids[:1]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, ids.shape[1]:].numpy()
    tok = generate(lm, [ids[0].tolist()], max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(tok)[0], ref_tok)


def test_llama_left_padded_batch_matches_hf_attention_mask(hf_llama):
    hf, path = hf_llama
    lm, _ = load_hf_llama(path)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    ids = np.zeros((2, 6), np.int64)
    mask = np.zeros((2, 6), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 6 - len(p):] = p
        mask[i, 6 - len(p):] = 1
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=4, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, 6:].numpy()
    np.testing.assert_array_equal(np.asarray(generate(lm, prompts, max_new_tokens=4)), ref)


def test_llava_logits_and_greedy_match_hf(hf_llava):
    hf, path = hf_llava
    vlm, report = load_hf_llava(path)
    assert report.ok
    assert vlm.num_image_tokens() == 16 and vlm.cfg.image_token_id == IMAGE_TOKEN
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    ids = np.concatenate([[[3, 4]] * 2, np.full((2, 16), IMAGE_TOKEN), rng.integers(1, 98, size=(2, 5))], axis=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    ours, _ = nnx.jit(lambda m, i, x: m(i, x))(vlm, jnp.asarray(ids), images)
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4

    with torch.no_grad():
        ref_tok = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), max_new_tokens=4,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    tok = vlm.generate(jnp.asarray(ids), images, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(tok), ref_tok)


def test_llava_pruned_prefill_runs_on_loaded_weights(hf_llava):
    _, path = hf_llava
    vlm, _ = load_hf_llava(path)
    plan = vlm.build_plan({"point": "llm", "method": "dart", "layers": [1], "keep": 8})
    ids = np.concatenate([[[3, 4]], np.full((1, 16), IMAGE_TOKEN), [[5, 6, 7, 8, 9]]], axis=1)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32))
    logits, aux = nnx.jit(lambda m, i, x: m(i, x, plan=plan))(vlm, jnp.asarray(ids), images)
    # 4 image pivots + 8 * (8 // 8) picks survive out of 16 image tokens.
    assert logits.shape[1] == ids.shape[1] - 16 + 12
    assert np.all(np.isfinite(np.asarray(logits)))


def test_strict_load_reports_a_missing_key(hf_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = hf_llama
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(LoadError, match="norm"):
        load_hf_llama(tmp_path)
    _, report = load_hf_llama(tmp_path, strict=False)
    assert "norm.scale" in report.missing


def test_return_assets_is_opt_in_and_empty_without_tokenizer_files(hf_llava):
    _, path = hf_llava
    vlm, report, assets = load_hf_llava(path, return_assets=True)
    assert report.ok and vlm.num_image_tokens() == 16
    assert assets.tokenizer is None and assets.image_processor is None and assets.chat_template is None
    assert len(load_hf_llava(path)) == 2
