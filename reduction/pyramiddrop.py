"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): staged image-token dropping inside the LLM prefill.

The LLM is cut into stages at ``layers``. At each boundary layer ``K`` the image tokens are ranked by the attention
the **last instruction token** (the last valid prompt token) pays them in layer ``K``'s own attention, computed on
layer ``K``'s input before anything moves, and a fraction ``lambda`` of them survives:

    score[t] = mean_h softmax_s( q_K(last) . k_K(s) / sqrt(D) )[t]      (causal, padding masked, float32)

The top ``kept`` image tokens of each image stay, in their original order; every text token stays. Shapes:
``state.x [B, T, C] -> [B, T - M * (L - kept), C]`` with ``M`` images of ``L`` tokens; ``kept`` static.

Headline [paper abstract]: on LLaVA-NeXT, 40% less training time and 55% fewer inference FLOPs at comparable
performance; also a training-free plug-in.

What the official code does (``pdrop_rank_drop`` @ 6444f30): after decoder layers 7, 15, 23 (0-based; its
``layer_list [8, 16, 24]``) it applies layer ``l + 1``'s ``input_layernorm``, ``q_proj``, ``k_proj`` and RoPE to the
hidden states, takes the last instruction token's row (softmax in float32 over every key, text included, then the
image columns, head mean) and keeps ``int(N0 * ratio[stage + 1])`` image tokens with ratios ``[0.5, 0.25, 0.125]``
relative to the original count ``N0`` (576 -> 288 -> 144 -> 72), sorted back into order. Batch rows are re-padded
(right padding only) and position ids compacted.

This port:

* The score is the same quantity: the LLM point's ``LAYER_ATTENTION`` gives layer ``K``'s rows on its input
  (:meth:`models.llama.Block.attention_rows`). ``attention="previous"`` instead reads layer ``K - 1``'s own last
  row (``TEXT_ATTENTION``, FastV's score): nearly free, but not the paper's quantity.
* Counts: ``keep_ratio`` is ``lambda``, the fraction of the *current* span kept at each stage (``int(L * lambda)``;
  a list gives one per stage). The official counts are fractions of ``N0``; the two agree whenever the floors do
  (576 and 65 image tokens at ``lambda = 0.5`` give identical counts; a test checks the 576 case). ``keep``: an int
  is the count left after the *last* stage, reached geometrically (every stage keeps the same fraction); a list
  gives the count after each stage.
* Kept tokens keep their original position ids (this repo's LLM convention) rather than compacted ones; padding is
  a validity mask, so left padding works and a prompt keeps the same tokens alone or batched.
* Ties: lower position first (torch ``topk`` leaves them unspecified). GQA: keys are repeated per query head (the
  official code assumes ``n_kv = n_heads``).
* Default ``layers``: the official ``[8, 16, 24]`` of 32 scaled to the depth (``[8, 15, 22]`` on 30, ``[1, 2, 3]``
  on 4). Default ``keep_ratio = 0.5``: the official lambda.
* Training-time queries (every token before an answer span) are not ported: the query is the last prompt token.

Own cost (:meth:`PyramidDrop.flops`): with ``attention="layer"`` the boundary projects keys for all ``T`` input
tokens and one query -- about ``2 T C^2`` FLOPs (MHA upper bound), ~8% of one LLaVA-size decoder layer; the official
code pays the same. ``attention="previous"`` costs one attention row.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

from reduction.crossattn import (last_row_scores, resolve_stages, rows_attention_flops, scaled_layers,
                                 span_topk_keep, stage_count)
from reduction.reducers import LAYER_ATTENTION, TEXT_ATTENTION, LayerInfo, Reducer, register
from reduction.spans import require_spans, span_num_out
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step

ATTENTION_SOURCES = ("layer", "previous")
OFFICIAL_LAYERS = (8, 16, 24)          # of 32 (LLaVA-1.5 / NeXT 7B)


@dataclasses.dataclass(frozen=True)
class PyramidDrop(Reducer):
    """One PyramidDrop boundary (stage ``stage`` of ``num_stages``): keep the image tokens the last prompt token
    attends to most in this layer's attention."""

    stage: int = 0
    num_stages: int = 1
    keep_ratio: object = 0.5
    keep: object = None
    attention: str = "layer"
    spans: ClassVar[bool] = True
    text_rows: ClassVar[int] = 1

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return frozenset({LAYER_ATTENTION if self.attention == "layer" else TEXT_ATTENTION})

    def kept(self, image_len: int) -> int:
        return stage_count(image_len, self.stage, self.num_stages, self.keep, self.keep_ratio)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return span_num_out(num_tokens, info, self.kept)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        require_spans(info, "pyramiddrop")
        name = "layer_attention" if self.attention == "layer" else "text_attention"
        scores = last_row_scores(info.require(name, "pyramiddrop"), state.valid)
        idx = span_topk_keep(scores, info.image_starts, image_len=info.image_len, kept=self.kept(info.image_len))
        return prune_step(idx, state.num_tokens)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        row = rows_attention_flops(1, num_tokens, dim) // 2          # logits only
        if self.attention == "previous":
            return rows_attention_flops(1, num_tokens, dim)           # the extra explicit row of layer K - 1
        return 2 * num_tokens * dim * dim + 2 * dim * dim + row      # keys of all tokens, one query, one row


def pyramiddrop_official_counts(num_image: int, ratios: Sequence[float] = (0.5, 0.25, 0.125)) -> list[int]:
    """The official per-stage counts ``int(N0 * ratio)`` (ratios relative to the original count)."""
    return [int(num_image * r) for r in ratios]


@register("pyramiddrop", points=("llm",), layers="all")   # "all": the builder scales its own default
def _pyramiddrop_layers(num_layers: int, keep_ratio=0.5, keep: Optional[object] = None, attention: str = "layer",
                        layers=None) -> list[Optional[Reducer]]:
    """PyramidDrop: staged drops of image tokens by the last prompt token's attention (lambda = keep_ratio per
    stage; default layers: the official [8, 16, 24] of 32 scaled to the depth)."""
    if attention not in ATTENTION_SOURCES:
        raise ValueError(f"pyramiddrop: attention must be one of {ATTENTION_SOURCES}, got {attention!r}")
    stages = list(layers) if layers is not None else scaled_layers(num_layers, OFFICIAL_LAYERS)
    keep, keep_ratio = resolve_stages("pyramiddrop", stages, keep, keep_ratio)
    out: list[Optional[Reducer]] = [None] * num_layers
    for s, layer in enumerate(stages):
        out[layer] = PyramidDrop(stage=s, num_stages=len(stages), keep_ratio=keep_ratio, keep=keep,
                                 attention=attention)
    return out


__all__ = ["PyramidDrop", "pyramiddrop_official_counts"]
