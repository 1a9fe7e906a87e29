"""Text tokenizers for the language models: a ``tokenizers.Tokenizer`` plus special ids and a chat template.

:class:`TextTokenizer` is built either from a byte-level BPE vocabulary and merge list
(:meth:`TextTokenizer.from_bpe`, what a GGUF file stores; see :func:`loaders.gguf.load_gguf_tokenizer`) or
from a Hugging Face folder's ``tokenizer.json`` (:meth:`TextTokenizer.from_hf_dir`). Chat templates are
rendered with Jinja2 in a sandbox, with the same environment options and helpers transformers uses
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``, ``strftime_now``), so a
template renders to the same text here and in ``apply_chat_template``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Mapping, Optional, Sequence

from loaders.common import LoadError

# llama.cpp's ``tokenizer.ggml.pre`` names -> how text is split before BPE. "smollm" (and the StarCoder
# family) isolates every digit, then applies GPT-2's byte-level regex, exactly as SmolLM2's tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "minerva")
_GPT2 = (None, "default", "gpt2", "gpt-2", "olmo", "jais")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")
SUPPORTED_PRE = tuple(p for p in _DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3 if p)

CONTROL = 3        # llama.cpp token type of special tokens such as <|im_start|>
USER_DEFINED = 4   # added tokens matched whole but not special


def _pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LoadError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {', '.join(SUPPORTED_PRE)}")


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _byte_spelling(token: str, alphabet: set) -> str:
    """A vocabulary entry in the byte alphabet (entries written with other characters are respelled)."""
    if set(token) <= alphabet:
        return token
    table = _byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the special ids a generator needs and an optional chat template.

    Attributes: ``bos_id, eos_id, pad_id, unk_id`` (``int`` or ``None``), ``vocab_size`` (including added
    tokens), ``chat_template`` (Jinja source or ``None``), ``add_bos`` / ``add_eos`` (what
    ``encode(..., add_special_tokens=True)`` adds)."""

    def __init__(self, tokenizer, *, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, unk_id: Optional[int] = None, add_bos: bool = False,
                 add_eos: bool = False, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_bpe(cls, tokens: Sequence[str], merges: Sequence[str], *, token_types: Optional[Sequence[int]] = None,
                 pre: Optional[str] = None, **kw) -> "TextTokenizer":
        """Byte-level BPE from a vocabulary (``tokens[i]`` is id ``i``) and merges (``"left right"`` strings,
        best first). Tokens of type ``CONTROL`` become special added tokens, ``USER_DEFINED`` plain added
        tokens, both matched whole in the text. ``pre``: llama.cpp's pre-tokenizer name (``SUPPORTED_PRE``)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models

        alphabet = set(_byte_alphabet().values())
        vocab = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(_byte_spelling(tok, alphabet), i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        types = list(token_types or ())
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == CONTROL and set(t) <= alphabet]
        plain = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                 if ty == USER_DEFINED and t in vocab]
        if special:
            tok.add_special_tokens(special)
        if plain:
            tok.add_tokens(plain)
        return cls(tok, **kw)

    @classmethod
    def from_hf_dir(cls, path) -> "TextTokenizer":
        """A Hugging Face tokenizer folder: ``tokenizer.json``, plus ``tokenizer_config.json`` (special tokens,
        ``add_bos_token``, ``chat_template``) and ``chat_template.jinja`` / ``chat_template.json`` when present."""
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        conf: Mapping[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            conf = json.loads((path / "tokenizer_config.json").read_text())

        def special(name):
            value = conf.get(name)
            if isinstance(value, Mapping):
                value = value.get("content")
            return None if value is None else tok.token_to_id(value)

        template = conf.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template", template)
        if isinstance(template, list):  # named templates: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(tok, bos_id=special("bos_token"), eos_id=special("eos_token"), pad_id=special("pad_token"),
                   unk_id=special("unk_token"), add_bos=bool(conf.get("add_bos_token", False)),
                   add_eos=bool(conf.get("add_eos_token", False)), chat_template=template)

    # -- use --------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (as the vocabulary spells it); ``KeyError`` if absent."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``text -> ids``. Special tokens written in the text (``<|im_start|>``) stay whole; with
        ``add_special_tokens`` BOS / EOS are added as the checkpoint asks (``add_bos`` / ``add_eos``)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``ids -> text`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _token(self, i: Optional[int]) -> Optional[str]:
        return None if i is None else self.tokenizer.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template, as text.
        ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` and ``kwargs`` are visible to the template.
        ``ValueError`` if the tokenizer has no template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        context = dict(bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id),
                       pad_token=self._token(self.pad_id), unk_token=self._token(self.unk_id))
        context.update(kwargs)
        return _compile_template(self.chat_template).render(messages=messages,
                                                           add_generation_prompt=add_generation_prompt, **context)

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})")


__all__ = ["TextTokenizer", "SUPPORTED_PRE"]
