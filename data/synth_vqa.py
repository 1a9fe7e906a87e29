"""A generated multi-object VQA set: many small objects, so answers hinge on a few image tokens.

A scene is a ``grid x grid`` board on a ``image_size`` canvas; ``min_objects..max_objects`` cells hold one
object each, a distinct (colour, shape) pair. Objects are the Noto colour emoji for "<colour> circle",
"<colour> square" and "<colour> heart" (rendered at the font's only size, 109 px, then resized), or
PIL-drawn shapes of the same names when the font or emoji list is missing (``style="shapes"``).

Question families (``qtype`` is the index in ``QTYPES``; ``families`` chooses which are drawn, default the first four):
  0 count_shape:   "how many hearts are there"              -> "0" .. "<max>"
  1 count_colour:  "how many blue objects are there"        -> "0" .. "<max>"
  2 colour_at:     "what colour is the object in row 2 column 3" -> colour
  3 relation:      "is the red circle left of the blue heart" (left/right/above/below) -> yes/no
  4 colour_of:     "what colour is the heart"               -> colour   (needs ``distinct``)
  5 shape_of:      "what shape is the red object"           -> shape    (needs ``distinct``)
  6 count:         "how many objects are there"             -> "<min>" .. "<max>"

``distinct=True`` draws each scene's objects with pairwise distinct colours *and* shapes (so at most
``len(SHAPES)`` = 3 objects), which makes "the heart" and "the red object" name one object. With few small objects
on a fine board (e.g. ``grid=7``: 12 px objects on a 112 px canvas, about 2-4 of DINOv2's 64 patches each) the
answer sits in a handful of image tokens and the rest is background: the sparse preset of the real VLM
(``configs/vlm_smol_sparse.py``) uses ``families=("colour_of", "shape_of", "count")`` so that which tokens a
reduction keeps decides the answer.

Everything is a pure function of ``(seed, split, index)``: the same arguments give the same image,
question and answer in any process, and the splits use disjoint random streams.
"""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.text import WordVocab

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black")
SHAPES = ("circle", "square", "heart")
RELATIONS = ("left of", "right of", "above", "below")
QTYPES = ("count_shape", "count_colour", "colour_at", "relation", "colour_of", "shape_of", "count")
DEFAULT_FAMILIES = QTYPES[:4]
_NEED_DISTINCT = ("colour_of", "shape_of")
SPLITS = {"train": 1, "val": 2, "test": 3}
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
_BACKGROUND = (236, 236, 228)


def answer_list(grid: int) -> list[str]:
    """All answers: ``no``, ``yes``, colours, shapes, then counts ``0 .. grid*grid``."""
    return ["no", "yes", *COLOURS, *SHAPES, *[str(i) for i in range(grid * grid + 1)]]


def question_vocab(grid: int, families: tuple[str, ...] = DEFAULT_FAMILIES) -> WordVocab:
    """Every word the templates of ``families`` can produce, sorted (independent of data; the default families'
    vocabulary is the same as before the other families existed)."""
    texts = ["how many are there objects", "what colour is the object in row column",
             "is the", *RELATIONS, *COLOURS, *SHAPES, *[s + "s" for s in SHAPES],
             " ".join(str(i) for i in range(1, grid + 1))]
    if "shape_of" in families:
        texts.append("what shape")
    return WordVocab.from_texts(texts)


def _emoji_codepoints() -> dict[tuple[str, str], str]:
    pattern = re.compile(r"^([0-9A-F ]+);\s*fully-qualified\s*#\s*\S+\s+E[\d.]+\s+(\w+) (?:large )?(\w+)$")
    found = {}
    for line in pathlib.Path(EMOJI_TEST).read_text(encoding="utf-8").splitlines():
        m = pattern.match(line)
        if m and m.group(2) in COLOURS and m.group(3) in SHAPES:
            found[(m.group(2), m.group(3))] = "".join(chr(int(c, 16)) for c in m.group(1).split())
    return found


def emoji_available() -> bool:
    return pathlib.Path(EMOJI_FONT).exists() and pathlib.Path(EMOJI_TEST).exists()


_RGB = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 210, 30), "green": (60, 170, 60),
        "blue": (40, 100, 220), "purple": (140, 60, 180), "brown": (130, 80, 40), "black": (25, 25, 25)}


def _draw_shape(colour: str, shape: str, size: int) -> Image.Image:
    big = 4 * size  # draw large, then downsample for anti-aliasing
    im = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    fill = _RGB[colour] + (255,)
    m = big // 10
    if shape == "circle":
        d.ellipse([m, m, big - m, big - m], fill=fill)
    elif shape == "square":
        d.rectangle([m, m, big - m, big - m], fill=fill)
    else:  # heart: two lobes and a point
        r = (big - 2 * m) // 4
        d.ellipse([m, m + r // 2, m + 2 * r, m + r // 2 + 2 * r], fill=fill)
        d.ellipse([big - m - 2 * r, m + r // 2, big - m, m + r // 2 + 2 * r], fill=fill)
        d.polygon([(m + r // 8, m + 3 * r // 2 + r // 2), (big - m - r // 8, m + 3 * r // 2 + r // 2),
                   (big // 2, big - m)], fill=fill)
    return im.resize((size, size), Image.LANCZOS)


@functools.lru_cache(maxsize=8)
def sprites(style: str, size: int) -> dict[tuple[str, str], np.ndarray]:
    """``{(colour, shape): uint8 [size, size, 4]}`` RGBA sprites, cached per style and size."""
    if style == "emoji":
        if not emoji_available():
            raise FileNotFoundError(f"emoji style needs {EMOJI_FONT} and {EMOJI_TEST} "
                                    "(Debian fonts-noto-color-emoji, unicode-data); use style='shapes'")
        font = ImageFont.truetype(EMOJI_FONT, 109)  # the bitmap font only has this size
        out = {}
        for key, char in _emoji_codepoints().items():
            canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((8, 8), char, font=font, embedded_color=True)
            canvas = canvas.crop(canvas.getbbox())
            out[key] = np.asarray(canvas.resize((size, size), Image.LANCZOS))
        missing = [k for k in ((c, s) for c in COLOURS for s in SHAPES) if k not in out]
        if missing:
            raise FileNotFoundError(f"emoji list {EMOJI_TEST} lacks {missing}")
        return out
    if style == "shapes":
        return {(c, s): np.asarray(_draw_shape(c, s, size)) for c in COLOURS for s in SHAPES}
    raise ValueError(f"style must be 'emoji' or 'shapes', got {style!r}")


def _paste(canvas: np.ndarray, sprite: np.ndarray, top: int, left: int) -> None:
    h, w = sprite.shape[:2]
    alpha = sprite[:, :, 3:4].astype(np.float32) / 255.0
    region = canvas[top:top + h, left:left + w].astype(np.float32)
    canvas[top:top + h, left:left + w] = np.round(region * (1 - alpha) + sprite[:, :, :3] * alpha).astype(np.uint8)


class SynthVQA:
    """Random-access source of generated scenes.

    Records: ``{"image": uint8 [S, S, 3], "question": int32 [max_len], "answer": int32, "qtype": int32}``, plus
    ``"prompt": encode_question(question_text)`` when an encoder is given (e.g.
    :meth:`data.chat_prompts.ChatPrompt.question_ids` for a pretrained LLM's tokenizer).
    Attributes ``vocab`` (questions) and ``answers`` (answer strings) describe the encodings.
    """

    max_len = 10

    def __init__(self, split: str = "train", *, size: int = 10000, seed: int = 0, image_size: int = 64,
                 grid: int = 4, min_objects: int = 3, max_objects: int = 10, style: str = "auto",
                 families: tuple[str, ...] = DEFAULT_FAMILIES, distinct: bool = False, encode_question=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if image_size % grid:
            raise ValueError(f"image_size ({image_size}) must be a multiple of grid ({grid})")
        if not 1 <= min_objects <= max_objects <= min(grid * grid, len(COLOURS) * len(SHAPES)):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {min(grid * grid, 24)}, "
                             f"got {min_objects}, {max_objects}")
        families = tuple(families)
        unknown = [f for f in families if f not in QTYPES]
        if not families or unknown or len(set(families)) != len(families):
            raise ValueError(f"families must be distinct names from {QTYPES}, got {families!r}")
        if not distinct and any(f in _NEED_DISTINCT for f in families):
            raise ValueError(f"families {[f for f in families if f in _NEED_DISTINCT]} name an object by its shape or "
                             f"colour alone: they need distinct=True")
        if distinct and max_objects > len(SHAPES):
            raise ValueError(f"distinct=True gives every object its own shape: max_objects must be <= {len(SHAPES)}, "
                             f"got {max_objects}")
        self.families, self.distinct = families, bool(distinct)
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.image_size, self.grid = image_size, grid
        self.min_objects, self.max_objects = min_objects, max_objects
        self.style = ("emoji" if emoji_available() else "shapes") if style == "auto" else style
        self.cell = image_size // grid
        self.obj = max(4, (self.cell * 3) // 4)
        self.vocab = question_vocab(grid, families)
        self.answers = answer_list(grid)
        self._a = {a: i for i, a in enumerate(self.answers)}
        self.encode_question = encode_question

    def __len__(self) -> int:
        return self.size

    def placements(self, index: int) -> tuple[list[tuple[str, str, int, int, int, int]], np.random.Generator]:
        """The objects of scene ``index`` as ``(colour, shape, row, col, top, left)`` (``top``/``left``: the sprite's
        pixel offset) and the generator, advanced to where the question is drawn."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        cells = rng.choice(self.grid * self.grid, size=n, replace=False)
        if self.distinct:
            colours = rng.choice(len(COLOURS), size=n, replace=False)
            shapes = rng.choice(len(SHAPES), size=n, replace=False)
            kinds = colours * len(SHAPES) + shapes
        else:
            kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
        slack = self.cell - self.obj
        out = []
        for cell, kind in zip(cells, kinds):
            row, col = divmod(int(cell), self.grid)
            colour, shape = COLOURS[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
            dy, dx = rng.integers(0, slack + 1, size=2)
            out.append((colour, shape, row, col, row * self.cell + int(dy), col * self.cell + int(dx)))
        return out, rng

    def scene(self, index: int) -> tuple[np.ndarray, list[tuple[str, str, int, int]], np.random.Generator]:
        """The image, its objects ``(colour, shape, row, col)`` and the generator for the question."""
        placed, rng = self.placements(index)
        canvas = np.empty((self.image_size, self.image_size, 3), np.uint8)
        canvas[:] = _BACKGROUND
        table = sprites(self.style, self.obj)
        for colour, shape, _, _, top, left in placed:
            _paste(canvas, table[(colour, shape)], top, left)
        return canvas, [o[:4] for o in placed], rng

    def question(self, objects, rng) -> tuple[str, str, int]:
        qtype = QTYPES.index(self.families[int(rng.integers(len(self.families)))])
        if qtype == 4:
            colour, shape = objects[int(rng.integers(len(objects)))][:2]
            return f"what colour is the {shape}", colour, qtype
        if qtype == 5:
            colour, shape = objects[int(rng.integers(len(objects)))][:2]
            return f"what shape is the {colour} object", shape, qtype
        if qtype == 6:
            return "how many objects are there", str(len(objects)), qtype
        if qtype == 0:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            return f"how many {shape}s are there", str(sum(o[1] == shape for o in objects)), qtype
        if qtype == 1:
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            return f"how many {colour} objects are there", str(sum(o[0] == colour for o in objects)), qtype
        if qtype == 2:
            colour, _, row, col = objects[int(rng.integers(len(objects)))]
            return f"what colour is the object in row {row + 1} column {col + 1}", colour, qtype
        if len(objects) < 2:
            a = b = objects[0]
        else:
            i, j = rng.choice(len(objects), size=2, replace=False)
            a, b = objects[int(i)], objects[int(j)]
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        holds = {"left of": a[3] < b[3], "right of": a[3] > b[3], "above": a[2] < b[2], "below": a[2] > b[2]}[rel]
        return f"is the {a[0]} {a[1]} {rel} the {b[0]} {b[1]}", "yes" if holds else "no", qtype

    def example(self, index: int) -> dict:
        """Like ``self[index]`` but with the question and answer as text too."""
        image, objects, rng = self.scene(index)
        q, a, qtype = self.question(objects, rng)
        return {"image": image, "objects": objects, "question_text": q, "answer_text": a, "qtype": qtype}

    def __getitem__(self, index: int) -> dict:
        ex = self.example(int(index))
        rec = {"image": ex["image"], "question": self.vocab.encode(ex["question_text"], self.max_len),
               "answer": np.int32(self._a[ex["answer_text"]]), "qtype": np.int32(ex["qtype"])}
        if self.encode_question is not None:
            rec["prompt"] = self.encode_question(ex["question_text"])
        return rec

    def __repr__(self) -> str:
        extra = "" if self.families == DEFAULT_FAMILIES else f", families={'/'.join(self.families)}"
        return (f"SynthVQA({self.split}, n={self.size}, style={self.style}, {self.image_size}px, grid {self.grid}"
                f"{extra})")
