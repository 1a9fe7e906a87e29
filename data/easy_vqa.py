"""easy-VQA (``easy-vqa`` wheel): 64x64 images of one coloured shape with template questions, 13 answers.

Files are read directly from the package data (``data/{train,test}/questions.json``, ``images/<id>.png``,
``answers.txt``); the package's Python module is not imported.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

from data.sources import DataError, FileImageSource
from data.text import WordVocab

MAX_QUESTION_LEN = 12


def easy_vqa_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package easy-vqa is not installed (pip install --no-deps easy-vqa==1.0)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data"


def _questions(split: str) -> list:
    path = easy_vqa_dir() / split / "questions.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {str(path)!r}: {err}") from err


def easy_vqa_vocab() -> tuple[WordVocab, list[str]]:
    """Question vocabulary (from the train questions) and the answer list (``answers.txt`` order)."""
    vocab = WordVocab.from_texts(q for q, _, _ in _questions("train"))
    answers = [a.strip() for a in (easy_vqa_dir() / "answers.txt").read_text().splitlines() if a.strip()]
    return vocab, answers


def easy_vqa(split: str = "train", *, max_len: int = MAX_QUESTION_LEN, limit: int | None = None,
             on_error: str = "raise") -> FileImageSource:
    """Records ``{"image": uint8 [64, 64, 3], "question": int32 [max_len], "answer": int32}``.

    ``limit`` keeps the first ``limit`` questions (smoke runs). The source has ``vocab`` and ``answers``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    vocab, answers = easy_vqa_vocab()
    a_index = {a: i for i, a in enumerate(answers)}
    image_dir = easy_vqa_dir() / split / "images"
    qs = _questions(split)[:limit]
    items = [(str(image_dir / f"{image_id}.png"),
              {"question": vocab.encode(q, max_len), "answer": a_index[a]}) for q, a, image_id in qs]
    src = FileImageSource(items, channels=3, on_error=on_error, name=f"easy_vqa/{split}")
    src.vocab, src.answers = vocab, answers
    return src
