"""Chat-template prompts for a pretrained VLM: ``[prefix][image x K][question suffix]``, answers as single tokens.

A :class:`ChatPrompt` renders the tokenizer's chat template once around two markers (the image and the question),
so every prompt is ``prefix_ids`` (static: system turn and the start of the user turn), then the image span, then
``question_ids(q)`` (the rest of the user turn, the end-of-turn and the assistant header). The question part has a
static length: it is left-padded with ``-1`` (padding sits between the image span and the question, which the
LLM's attention mask and position ids skip).

Answers are scored as the logits of their first token at the last prompt position; :meth:`answer_ids` checks that
the first tokens are distinct.

Dimension vocabulary: P prefix tokens, K image tokens, L question tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IMAGE_MARK = "\x00IMAGE\x00"
QUESTION_MARK = "\x00QUESTION\x00"


class ChatPrompt:
    """``ChatPrompt(tokenizer, max_question_tokens=32)``. ``tokenizer``: a :class:`loaders.text_tokenizer.TextTokenizer`
    (``encode``, ``apply_chat_template``). ``system``: an optional system message (``None`` = the template's default)."""

    def __init__(self, tokenizer, *, max_question_tokens: int = 32, system: str | None = None,
                 question_suffix: str = "?"):
        messages = [{"role": "user", "content": f"{IMAGE_MARK}\n{QUESTION_MARK}{question_suffix}"}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if text.count(IMAGE_MARK) != 1 or text.count(QUESTION_MARK) != 1:
            raise ValueError("the chat template must render the user message once")
        pre, rest = text.split(IMAGE_MARK)
        self._mid, self._post = rest.split(QUESTION_MARK)
        self.tokenizer = tokenizer
        self.template_text = text
        self.prefix_ids = tuple(int(i) for i in tokenizer.encode(pre))
        self.max_question_tokens = int(max_question_tokens)

    def question_ids(self, question: str) -> np.ndarray:
        """``int32 [L]``: the user turn after the image, end of turn and assistant header, left-padded with -1.
        Raises ``ValueError`` when it does not fit (never truncates: the assistant header must stay last)."""
        ids = self.tokenizer.encode(self._mid + question + self._post)
        if len(ids) > self.max_question_tokens:
            raise ValueError(f"question {question!r} takes {len(ids)} tokens > max_question_tokens="
                             f"{self.max_question_tokens}")
        out = np.full(self.max_question_tokens, -1, np.int32)
        out[self.max_question_tokens - len(ids):] = ids
        return out

    def answer_ids(self, answers: Sequence[str]) -> tuple[int, ...]:
        """First token id of each answer as the assistant would start it; raises if two answers share one."""
        firsts = []
        for a in answers:
            ids = self.tokenizer.encode(a)
            if not ids:
                raise ValueError(f"answer {a!r} encodes to no token")
            firsts.append(int(ids[0]))
        seen: dict[int, str] = {}
        for a, t in zip(answers, firsts):
            if t in seen:
                raise ValueError(f"answers {seen[t]!r} and {a!r} start with the same token {t}; score them by "
                                 f"their full token sequences or drop one")
            seen[t] = a
        return tuple(firsts)

    def render(self, question: str) -> str:
        """The full prompt text with ``<image>`` where the image span goes (for logs and docs)."""
        return self.template_text.replace(IMAGE_MARK, "<image>").replace(QUESTION_MARK, question)


__all__ = ["ChatPrompt"]
