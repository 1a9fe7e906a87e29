"""ToDRE stage 2 (Li, Yang, Lu et al., arXiv 2505.18757): drop task-irrelevant image tokens at a late LLM layer.

ToDRE's second stage removes image tokens inside the LLM once the text has read what it needs from them. There is
no public code; the abstract says it "eliminate[s] task-irrelevant visual tokens within certain decoder layers"
through an "information migration" mechanism and, in another sentence, that it prunes "all visual tokens in certain
LLM decoder layers". Everything below beyond that is a **GUESS**, written as a port spec:

* Before a late layer ``K`` (default **GUESS**: ``round(5/8 * depth)``, layer 20 of 32, inside the 16-24 range the
  notes suggest; 19 of 30), every image token is scored by the cross-modal attention it receives from the text in
  layer ``K - 1``: head mean, averaged over the text tokens after the image (``query="text"``, the last ``rows``
  prompt queries, **GUESS** 64) or only the last prompt token (``query="last"``);
* the top ``keep`` image tokens per image stay (static; default **GUESS** ``keep=0``: every image token is dropped,
  the abstract's "prunes all visual tokens"); ``keep_ratio`` instead keeps a fraction of the span. Text tokens all
  stay; kept tokens keep their original order and position ids.
* The abstract's "adaptively" (v1) suggests a per-sample trigger; it is not ported (shapes would still be static with
  a validity mask, but there is nothing to reconstruct it from).

Shapes: ``state.x [B, T, C] -> [B, T - M * (L - keep), C]``. With ``keep=0`` the LLM's later layers and their KV cache
hold text only. Headline [paper v2 abstract, both stages together]: 90% of the image tokens pruned after the
encoder plus all of them in certain decoder layers, 2.6x total inference speed-up, 95.0% of the performance.

Own cost: the explicit attention rows of layer ``K - 1`` (``4 rows T C`` FLOPs), ~0.25% of a LLaVA-size layer;
``keep=0`` needs no scores at all (the plan is data independent and reads no attention).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.crossattn import (check_rows, last_row_scores, rows_attention_flops, span_topk_keep, text_row_mask,
                                 weighted_row_scores)
from reduction.reducers import TEXT_ATTENTION, LayerInfo, Reducer, register
from reduction.spans import check_starts, require_spans, span_num_out
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_ratio

QUERIES = ("text", "last")


@eager_jit
def todre_scores(rows: jax.Array, image_starts: jax.Array, *, image_len: int, valid=None, query: str = "text"
                 ) -> jax.Array:
    """Cross-modal relevance ``[B, M, T]``: head-mean attention from the text rows after each image (``"text"``;
    an image with none falls back to the last valid row) or from the last valid row (``"last"``)."""
    b, tq = check_rows(rows, rows.shape[-1])
    starts = check_starts(image_starts, b)
    if query == "last":
        return jnp.broadcast_to(last_row_scores(rows, valid)[:, None], (b, starts.shape[1], rows.shape[-1]))
    w = text_row_mask(starts, image_len, tq, rows.shape[-1], valid)
    return weighted_row_scores(rows, w, valid)


@dataclasses.dataclass(frozen=True)
class ToDRELLM(Reducer):
    """ToDRE stage 2 at one late layer: keep ``keep`` image tokens per image (0: drop them all) by text attention."""

    keep: Optional[int] = 0
    keep_ratio: Optional[float] = None
    query: str = "text"
    text_rows: int = 64
    spans: ClassVar[bool] = True

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return frozenset() if self.keep == 0 else frozenset({TEXT_ATTENTION})

    def kept(self, image_len: int) -> int:
        if self.keep is not None:
            return min(int(self.keep), image_len)
        return min(int(image_len * float(self.keep_ratio)), image_len)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return span_num_out(num_tokens, info, self.kept)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        require_spans(info, "todre_llm")
        kept = self.kept(info.image_len)
        b, t = state.x.shape[:2]
        if kept == 0:
            scores = jnp.zeros((b, t), jnp.float32)
        else:
            scores = todre_scores(info.require(TEXT_ATTENTION, "todre_llm"), info.image_starts,
                                  image_len=info.image_len, valid=state.valid, query=self.query)
        idx = span_topk_keep(scores, info.image_starts, image_len=info.image_len, kept=kept)
        return prune_step(idx, t)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        if self.keep == 0:
            return 0
        rows = 1 if self.query == "last" else min(self.text_rows, num_tokens)
        return rows_attention_flops(rows, num_tokens, dim) + 2 * rows * num_tokens


def todre_default_layer(num_layers: int) -> int:
    """The **GUESS** default acting layer: ``round(5/8 * depth)`` in ``[1, depth)``."""
    return min(num_layers - 1, max(1, int(round(num_layers * 5 / 8))))


@register("todre_llm", points=("llm",), layers="all")   # "all": the builder picks its own late default
def _todre_layers(num_layers: int, keep: Optional[int] = 0, keep_ratio: Optional[float] = None, query: str = "text",
                  rows: int = 64, layers=None) -> list[Optional[Reducer]]:
    """ToDRE stage 2: at a late LLM layer keep the image tokens the text attends to most (keep=0, the default,
    drops every image token; default layer round(5/8 * depth))."""
    if query not in QUERIES:
        raise ValueError(f"todre_llm: query must be one of {QUERIES}, got {query!r}")
    if keep is None and keep_ratio is None:
        raise ValueError("todre_llm: give keep or keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep")
    else:
        keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    rows = check_count(rows, "rows", allow_zero=False)
    chosen = set(layers) if layers is not None else {todre_default_layer(num_layers)}
    red = ToDRELLM(keep=keep, keep_ratio=keep_ratio if keep is None else None, query=query, text_rows=rows)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = ["ToDRELLM", "todre_scores", "todre_default_layer"]
