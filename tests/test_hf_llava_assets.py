"""HF LLaVA directories beyond the weights: named LoadErrors for unsupported checkpoints (raised before any
tensor is read), the tokenizer / chat template / special tokens, and the CLIP image processor against
transformers' own."""

import json

import numpy as np
import pytest

from loaders.clip_image import ClipImageProcessor
from loaders.common import LoadError
from loaders.hf_llava import check_supported, load_hf_llama, load_hf_llava, load_hf_llava_assets, read_hf_tokenizer

LLAMA_TEXT = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16, "vocab_size": 10}


def _write(path, config, keys=("model.norm.weight",)):
    """A config.json plus a sharded index naming ``keys`` (no tensors: the checks must not need any)."""
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "missing.safetensors"
                                                                                  for k in keys}}))
    return path


def _llava(**text):
    return {"model_type": "llava", "text_config": dict(LLAMA_TEXT, **text), "vision_config": {}}


@pytest.mark.parametrize("config,keys,match", [
    (dict(_llava(), model_type="llava_next"), (), "AnyRes"),
    (dict(_llava(), image_grid_pinpoints=[[336, 672]]), (), "AnyRes"),
    (_llava(model_type="qwen2"), (), "Qwen2"),
    (_llava(), ("model.language_model.layers.0.self_attn.q_proj.bias",), "Qwen2"),
    (_llava(model_type="mistral", sliding_window=4096), (), "sliding-window"),
    (_llava(rope_scaling={"rope_type": "linear", "factor": 2.0}), (), "rope_type='linear'"),
    (_llava(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), (), "rope_type='llama3'"),
    (_llava(model_type="gemma"), (), "gemma"),
])
def test_unsupported_llava_checkpoints_raise_a_named_load_error_before_reading_tensors(tmp_path, config, keys, match):
    _write(tmp_path, config, keys)                # the index points at a shard that does not exist
    with pytest.raises(LoadError, match=match):
        load_hf_llava(tmp_path)


def test_unsupported_llama_checkpoint_and_supported_mistral_without_window(tmp_path):
    _write(tmp_path, dict(LLAMA_TEXT, model_type="mistral", sliding_window=32))
    with pytest.raises(LoadError, match="sliding-window"):
        load_hf_llama(tmp_path)
    check_supported(dict(LLAMA_TEXT, model_type="mistral", sliding_window=None))   # plain Llama layout
    check_supported(_llava())


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>", "<image>"])
    tok.train_from_iterator(["USER: <image> what is in the picture? ASSISTANT: a cat on a mat",
                             "the quick brown fox jumps over the lazy dog"] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}ASSISTANT:"
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template}))
    return template


def test_tokenizer_special_tokens_and_chat_template_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = _tiny_tokenizer(tmp_path)
    assets = load_hf_llava_assets(tmp_path)
    assert assets.image_processor is None
    assert assets.chat_template == template
    assert assets.special_tokens == {"bos_token": ("<s>", 1), "eos_token": ("</s>", 2), "unk_token": ("<unk>", 0)}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["USER: <image> what is in the picture? ASSISTANT:", "a lazy cat jumps", "zebra!"]:
        assert assets.tokenizer.encode(text).ids == hf(text)["input_ids"]
        ids = assets.tokenizer.encode(text).ids
        assert assets.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())    # the older AddedToken-dict form
    cfg["pad_token"] = {"__type": "AddedToken", "content": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_hf_llava_assets(tmp_path).special_tokens["pad_token"] == ("<unk>", 0)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert load_hf_llava_assets(tmp_path).chat_template == "{{ messages }}"
    assert read_hf_tokenizer(tmp_path / "nowhere") is None


LLAVA_PRE = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 40},
             "resample": 3, "do_center_crop": True, "crop_size": {"height": 36, "width": 36}, "do_rescale": True,
             "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_convert_rgb": True,
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def test_image_processor_matches_transformers_clip_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    hf = cls(**{k: v for k, v in LLAVA_PRE.items() if k != "image_processor_type"})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_PRE))
    ours = load_hf_llava_assets(tmp_path).image_processor
    assert ours == ClipImageProcessor(shortest_edge=40, crop_size=(36, 36), rescale_factor=LLAVA_PRE["rescale_factor"],
                                      image_mean=tuple(LLAVA_PRE["image_mean"]), image_std=tuple(LLAVA_PRE["image_std"]))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(57, 83, 3), dtype=np.uint8)),          # landscape
              Image.fromarray(rng.integers(0, 256, size=(90, 45), dtype=np.uint8)),             # portrait, grey
              Image.fromarray(rng.integers(0, 256, size=(30, 31, 4), dtype=np.uint8), "RGBA")]  # smaller than crop
    for im in images:
        want = np.asarray(hf(im, return_tensors="np")["pixel_values"])[0].transpose(1, 2, 0)
        got = ours(im)
        assert got.shape == (1, 36, 36, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], want, atol=1e-5)


@pytest.mark.parametrize("config,match", [
    (dict(LLAVA_PRE, image_processor_type="SiglipImageProcessor"), "SiglipImageProcessor"),
    (dict(LLAVA_PRE, image_grid_pinpoints=[[336, 672]]), "AnyRes"),
    (dict(LLAVA_PRE, crop_size={"shortest_edge": 3}), "crop_size"),
])
def test_image_processor_config_errors_are_named(config, match):
    with pytest.raises(LoadError, match=match):
        ClipImageProcessor.from_config(config)
