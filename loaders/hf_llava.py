"""Hugging Face Llama and LLaVA checkpoints (safetensors + ``config.json``) -> :mod:`models.llama` / :mod:`models.vlm`.

* :func:`load_hf_llama`: ``LlamaForCausalLM`` -> :class:`models.llama.Llama`;
* :func:`load_hf_llava`: ``LlavaForConditionalGeneration`` (CLIP vision tower, ``multi_modal_projector``,
  Llama ``language_model``) -> :class:`models.vlm.VLM`.

Both accept a directory with ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Key
layouts of transformers 4.x (``language_model.model.*``, ``vision_tower.vision_model.*``) and 5.x
(``model.language_model.*``, ``model.vision_tower.*``) are recognised. Supported: default RoPE
(``rope_type="default"``), a single integer ``vision_feature_layer``, the ``"default"`` (drop the class token)
and ``"full"`` feature strategies, the ``gelu`` projector. Anything else raises ``ValueError``.
Weights are converted to float32. No PyTorch is needed.

Named refusals, raised as :class:`~loaders.common.LoadError` from the config and the checkpoint's key list
(:func:`check_supported`) before any tensor is read: LLaVA-NeXT AnyRes (``model_type`` ``"llava_next"`` /
``"llava_next_video"`` / ``"llava_onevision"`` or ``image_grid_pinpoints``), Qwen2 text models (``model_type``
``"qwen2"`` or q/k/v projection biases), Mistral's sliding-window attention (``"mistral"`` with a
``sliding_window``), other text architectures, and RoPE scaling other than ``"default"``.

The tokenizer and image processor of a checkpoint directory (:func:`load_hf_llava_assets`, or
``load_hf_llava(..., return_assets=True)``): ``tokenizer.json`` through the ``tokenizers`` package
(:func:`read_hf_tokenizer`), special tokens and the chat template from ``tokenizer_config.json``,
``chat_template.json`` or ``chat_template.jinja``, and ``preprocessor_config.json`` as a
:class:`~loaders.clip_image.ClipImageProcessor`. Each is ``None`` when its file is absent.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping, Optional

import numpy as np
from flax import nnx

from models.clip_vision import clip_tower_config
from models.vision_tower import ViTTowerConfig
from loaders.hf import convert_hf_clip
from models.llama import Llama, LlamaConfig
from loaders.clip_image import ClipImageProcessor
from loaders.common import KeyTracker, LoadError, LoadReport, assign_params, torch_linear
from models.vlm import VLM, VLMConfig

# Canonical prefixes: "lm." (decoder body), "lm_head.", "vision.", "projector.".
_PREFIXES = [
    (r"^model\.language_model\.", "lm."),
    (r"^language_model\.model\.", "lm."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.vision_model\.", "vision."),
    (r"^model\.vision_tower\.", "vision."),
    (r"^vision_tower\.vision_model\.", "vision."),
    (r"^vision_tower\.", "vision."),
    (r"^model\.multi_modal_projector\.", "projector."),
    (r"^multi_modal_projector\.", "projector."),
    (r"^model\.", "lm."),
    (r"^lm_head\.", "lm_head."),
]


def _to_numpy(arr) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32) if np.asarray(arr).dtype.kind == "f" else np.asarray(arr)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
    except (TypeError, ValueError):  # bfloat16 files: read through JAX's dtype support
        from safetensors.flax import load_file

        tensors = load_file(str(path))
    return {k: _to_numpy(v) for k, v in tensors.items()}


def read_config(path) -> dict:
    """The ``config.json`` of a checkpoint directory."""
    cfg_path = pathlib.Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(cfg_path.read_text())


def checkpoint_keys(path) -> list[str]:
    """Tensor names of a checkpoint directory, from the safetensors headers / index only (no tensor is read)."""
    path = pathlib.Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return list(f.keys())
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


_ANYRES_TYPES = ("llava_next", "llava_next_video", "llava_onevision")


def _check_text(text: Mapping[str, Any], keys) -> None:
    kind = text.get("model_type", "llama")
    biased = any(re.match(r"lm\.layers\.\d+\.self_attn\.[qkv]_proj\.bias$", k) for k in canonical_keys(
        dict.fromkeys(keys)))
    if kind == "qwen2" or biased:
        raise LoadError(f"Qwen2 text models (text model_type={kind!r}, q/k/v projection biases) are not supported")
    if kind == "mistral" and text.get("sliding_window") is not None:
        raise LoadError(f"Mistral's sliding-window attention (sliding_window={text['sliding_window']}) is not "
                        f"supported")
    if kind not in ("llama", "mistral"):
        raise LoadError(f"text model_type={kind!r} is not supported (only llama, and mistral without sliding window)")
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type != "default":
        raise LoadError(f"RoPE scaling rope_type={rope_type!r} is not supported (only 'default')")


def check_supported(hf: Mapping[str, Any], keys=()) -> None:
    """Raise a :class:`LoadError` naming the first unsupported feature of an HF config (Llama or LLaVA) and its
    tensor names ``keys``; see the module docstring for the list."""
    keys = list(keys)
    kind = hf.get("model_type", "")
    if kind in _ANYRES_TYPES or hf.get("image_grid_pinpoints") is not None:
        raise LoadError(f"LLaVA-NeXT AnyRes (model_type={kind!r}, image_grid_pinpoints) is not supported; only "
                        f"LLaVA-1.5-style single-resolution models")
    if "text_config" in hf or kind == "llava":
        if kind not in ("llava", ""):
            raise LoadError(f"model_type={kind!r} is not supported (only 'llava')")
        _check_text(hf.get("text_config", {}), keys)
    else:
        _check_text(hf, keys)


def read_checkpoint(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {key: float32 array})`` from a directory (single file or sharded index)."""
    path = pathlib.Path(path)
    cfg = read_config(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        tensors = _load_safetensors(single)
    elif index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(path / shard))
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return cfg, tensors


def canonical_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        new = key
        for pattern, repl in _PREFIXES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key, count=1)
                break
        out[new] = value
    return out


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type != "default":
        raise LoadError(f"RoPE scaling rope_type={rope_type!r} is not supported (only 'default')")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
    """``LlamaConfig`` from an HF Llama config dict (HF defaults fill absent fields)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu')")
    if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias checkpoints are not supported")
    heads = int(hf.get("num_attention_heads", 32))
    dim = int(hf.get("hidden_size", 4096))
    kw = dict(
        vocab_size=int(hf.get("vocab_size", 32000)), dim=dim, num_layers=int(hf.get("num_hidden_layers", 32)),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        mlp_dim=int(hf.get("intermediate_size", 11008)), head_dim=hf.get("head_dim") or None,
        rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def clip_config_from_hf(hf: Mapping[str, Any], *, feature_layer: int, strategy: str, **overrides) -> ViTTowerConfig:
    """The tower config (:func:`models.clip_vision.clip_tower_config`) of an HF ``CLIPVisionConfig`` dict."""
    if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"vision hidden_act={hf.get('hidden_act')!r} is not supported (only 'quick_gelu')")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported")
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer={feature_layer!r}: only a single int is supported")
    kw = dict(
        image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 32)),
        dim=int(hf.get("hidden_size", 768)), num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)), mlp_dim=int(hf.get("intermediate_size", 3072)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)), feature_layer=feature_layer, drop_cls=strategy == "default",
    )
    kw.update(overrides)
    return clip_tower_config(**kw)


class _Source(KeyTracker):
    """A key tracker whose ``get`` returns ``None`` for absent keys, so they end up as *missing*."""

    def get(self, key: str):
        return super().get(key) if key in self else None


def _present(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


def _linear_or_none(w):
    return None if w is None else torch_linear(w)


def _convert_lm(src: KeyTracker, cfg: LlamaConfig, prefix: str) -> dict[str, np.ndarray]:
    """``{our path: array}`` for a :class:`Llama` whose path prefix is ``prefix``."""
    out = {f"{prefix}embed_tokens.embedding": src.get("lm.embed_tokens.weight"),
           f"{prefix}norm.scale": src.get("lm.norm.weight")}
    for i in range(cfg.num_layers):
        s, d = f"lm.layers.{i}.", f"{prefix}layers.{i}."
        out[d + "input_layernorm.scale"] = src.get(s + "input_layernorm.weight")
        out[d + "post_attention_layernorm.scale"] = src.get(s + "post_attention_layernorm.weight")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[d + f"self_attn.{name}.kernel"] = _linear_or_none(src.get(s + f"self_attn.{name}.weight"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[d + f"mlp.{name}.kernel"] = _linear_or_none(src.get(s + f"mlp.{name}.weight"))
        src.skip(s + "self_attn.rotary_emb.inv_freq")
    src.skip("lm.rotary_emb.inv_freq")
    if cfg.tie_embeddings:
        src.skip("lm_head.weight")
    else:
        out[f"{prefix}lm_head.kernel"] = _linear_or_none(src.get("lm_head.weight"))
    return out


def _finish(model, params, src: KeyTracker, source: str, strict: bool) -> LoadReport:
    params = _present(params)
    report = LoadReport(source=source)
    report.unexpected.extend(src.unused())
    report.skipped.extend(sorted(k for k in src.used if k.endswith(("inv_freq", "position_ids"))))
    assign_params(model, params, report, strict=strict)
    return report


def load_hf_llama(path, *, strict: bool = True, seed: int = 0, **config_overrides) -> tuple[Llama, LoadReport]:
    """``LlamaForCausalLM`` directory -> ``(Llama, LoadReport)``."""
    check_supported(read_config(path), checkpoint_keys(path))
    hf, tensors = read_checkpoint(path)
    cfg = llama_config_from_hf(hf, **config_overrides)
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    src = _Source(canonical_keys(tensors))
    params = _convert_lm(src, cfg, "")
    return model, _finish(model, params, src, str(path), strict)


def vlm_config_from_hf(hf: Mapping[str, Any], **text_overrides) -> VLMConfig:
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act={hf.get('projector_hidden_act')!r} is not supported (only 'gelu')")
    if not hf.get("multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=False is not supported")
    vision = clip_config_from_hf(hf.get("vision_config", {}), feature_layer=hf.get("vision_feature_layer", -2),
                                 strategy=hf.get("vision_feature_select_strategy", "default"))
    text = llama_config_from_hf(hf.get("text_config", {}), **text_overrides)
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return VLMConfig(vision=vision, text=text, image_token_id=int(image_token))


def load_hf_llava(path, *, strict: bool = True, seed: int = 0, return_assets: bool = False, **text_overrides):
    """``LlavaForConditionalGeneration`` directory -> ``(VLM, LoadReport)``, or ``(VLM, LoadReport, LlavaAssets)``
    with ``return_assets`` (:func:`load_hf_llava_assets`). Unsupported features raise :class:`LoadError` first."""
    check_supported(read_config(path), checkpoint_keys(path))
    hf, tensors = read_checkpoint(path)
    cfg = vlm_config_from_hf(hf, **text_overrides)
    model = VLM(cfg, rngs=nnx.Rngs(seed))
    src = _Source(canonical_keys(tensors))
    params = _convert_lm(src, cfg.text, "language_model.")
    params.update(convert_hf_clip(src, cfg.vision.vit, prefix="vision_tower.vit.", src_prefix="vision."))
    for n in ("linear_1", "linear_2"):
        params[f"multi_modal_projector.{n}.kernel"] = _linear_or_none(src.get(f"projector.{n}.weight"))
        params[f"multi_modal_projector.{n}.bias"] = src.get(f"projector.{n}.bias")
    report = _finish(model, params, src, str(path), strict)
    if return_assets:
        return model, report, load_hf_llava_assets(path)
    return model, report


# -- tokenizer, chat template, image processor ------------------------------------------------------------

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_hf_tokenizer(path):
    """``tokenizer.json`` of a directory as a ``tokenizers.Tokenizer``, or ``None`` when the file is absent.

    The one place the repo reads HF tokenizers for LLaVA; meant to be redirected to a shared text tokenizer.
    """
    file = pathlib.Path(path) / "tokenizer.json"
    if not file.exists():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # pragma: no cover - tokenizers is a dependency of the test environment
        raise LoadError(f"{file} needs the 'tokenizers' package") from err
    return Tokenizer.from_file(str(file))


def read_chat_template(path) -> Optional[str]:
    """The chat template (Jinja source): ``chat_template.jinja``, else ``chat_template.json``, else the
    ``chat_template`` of ``tokenizer_config.json``; ``None`` when none has one."""
    path = pathlib.Path(path)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        if template is not None:
            return template
    cfg = path / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.exists() else None
    if isinstance(template, list):  # a list of named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _token_text(value) -> Optional[str]:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


@dataclasses.dataclass(frozen=True)
class LlavaAssets:
    """What a LLaVA checkpoint directory holds besides weights.

    Attributes:
      tokenizer: a ``tokenizers.Tokenizer`` or ``None`` (no ``tokenizer.json``).
      special_tokens: ``{"bos_token": (text, id), ...}`` for the tokens ``tokenizer_config.json`` names (id
        ``None`` when the tokenizer does not know it or is absent).
      chat_template: Jinja source or ``None``.
      image_processor: :class:`~loaders.clip_image.ClipImageProcessor` or ``None`` (no preprocessor config).
    """

    tokenizer: Any = None
    special_tokens: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    chat_template: Optional[str] = None
    image_processor: Optional[ClipImageProcessor] = None


def load_hf_llava_assets(path) -> LlavaAssets:
    """Tokenizer, special tokens, chat template and image processor of a checkpoint directory."""
    path = pathlib.Path(path)
    tokenizer = read_hf_tokenizer(path)
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    special = {}
    for name in _SPECIAL:
        text = _token_text(tok_cfg.get(name))
        if text is not None:
            special[name] = (text, None if tokenizer is None else tokenizer.token_to_id(text))
    pre = path / "preprocessor_config.json"
    processor = ClipImageProcessor.from_config(json.loads(pre.read_text())) if pre.exists() else None
    return LlavaAssets(tokenizer=tokenizer, special_tokens=special, chat_template=read_chat_template(path),
                       image_processor=processor)


__all__ = ["load_hf_llama", "load_hf_llava", "load_hf_llava_assets", "LlavaAssets", "read_hf_tokenizer",
           "read_chat_template", "check_supported", "checkpoint_keys", "read_config", "read_checkpoint",
           "canonical_keys", "llama_config_from_hf", "clip_config_from_hf", "vlm_config_from_hf"]
