"""A word-level vocabulary for template questions: lower-case, split on spaces, strip punctuation."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordVocab:
    """Index 0 is padding, 1 is unknown; the rest are the given words in order."""

    def __init__(self, tokens: Sequence[str]):
        self.itos = [PAD, UNK] + [t for t in tokens if t not in (PAD, UNK)]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordVocab":
        """Sorted set of all words in ``texts`` (deterministic whatever the text order)."""
        return cls(sorted({w for t in texts for w in words(t)}))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """``int32 [max_len]``: word ids, truncated or right-padded with 0."""
        ids = [self.stoi.get(w, 1) for w in words(text)][:max_len]
        out = np.zeros(max_len, np.int32)
        out[: len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i != 0)
