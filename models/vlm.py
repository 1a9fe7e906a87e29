"""LLaVA-style VLM: vision tower -> connector -> Llama, with token reduction at one of three points.

A :class:`ReductionPlan` (static, hashable) selects where tokens are reduced:

(a) ``vision``: per-layer reducers inside the vision tower (ToMe, PiToMe, ... from :mod:`reduction`);
(b) ``connector``: a :class:`~models.connector.ConnectorReduction` on the vision features (pooling, ToMe,
    PiToMe, DART-on-vision) before the projector;
(c) ``llm``: an :class:`~models.llama.LLMPruner` run once inside the LLM during prefill at layer ``K``
    (:class:`DARTPruner`, :class:`FastVPruner`, :class:`ATPPruner`); later layers and their KV cache hold only the kept tokens,
    which keep their original position ids.

Build a plan from a plain config dict with :func:`build_plan`, e.g. ``{"point": "llm", "method": "dart",
"layer": 2, "budget": 128}``, ``{"point": "connector", "method": "pool", "k": 2}`` or ``{"point": "vision",
"method": "tome", "r": 8}``.

Prompts carry one placeholder id per image token (:func:`build_prompts` expands a single placeholder and
left-pads a batch); the image span may start anywhere and differ per example.

Dimension vocabulary: B batch, T prompt tokens, N vision tokens, K image tokens after the connector,
C channels, V vocabulary, R new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.clip_vision import CLIPVision, CLIPVisionConfig
from models.connector import ConnectorReduction, Projector, image_starts_from_mask, place_image_tokens
from models.generate import Sampling, generate_from_embeds
from models.llama import Llama, LlamaConfig, LLMPruner, PruneInputs, positions_from_valid
from reduction.reducers import Reducer, build_layer_reducers
from reduction.validate import check_count, check_rank


# -- in-LLM pruners -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DARTPruner(LLMPruner):
    """DART at layer ``K`` (:func:`reduction.dart.dart_keep_indices`): ``budget`` image tokens per image before
    the reference's ``4 + 8 * (budget // 8)`` rule (196/132/68 for 192/128/64)."""

    budget: int = 128
    num_image_pivots: int = 4
    num_text_pivots: int = 4
    pivot_order: str = "ascending"
    needs_hidden: ClassVar[bool] = True
    needs_keys: ClassVar[bool] = True

    def kept_per_image(self, image_len: int) -> int:
        from reduction.dart import dart_kept_per_image

        return dart_kept_per_image(image_len, self.budget, self.num_image_pivots,
                                   self.num_image_pivots + self.num_text_pivots)

    def num_out(self, num_tokens: int, image_len: int, num_images: int = 1) -> int:
        return num_tokens - num_images * (image_len - self.kept_per_image(image_len))

    def select(self, inputs: PruneInputs):
        from reduction.dart import dart_keep_indices

        idx = dart_keep_indices(inputs.hidden, inputs.keys, image_starts=inputs.image_starts,
                                image_len=inputs.image_len, budget=self.budget, valid=inputs.valid,
                                num_image_pivots=self.num_image_pivots, num_text_pivots=self.num_text_pivots,
                                pivot_order=self.pivot_order)
        return idx, None


@dataclasses.dataclass(frozen=True)
class FastVPruner(LLMPruner):
    """FastV at layer ``K``: keep the ``budget`` image tokens that the last prompt token attends to most in
    layer ``K - 1`` (heads averaged); only that one attention row is materialised."""

    budget: int = 128
    needs_attention: ClassVar[bool] = True
    attention_rows: ClassVar[Optional[int]] = 1

    def num_out(self, num_tokens: int, image_len: int, num_images: int = 1) -> int:
        return num_tokens - num_images * (image_len - min(self.budget, image_len))

    def select(self, inputs: PruneInputs):
        from reduction.baselines import fastv_keep_indices

        idx = fastv_keep_indices(inputs.attention, image_starts=inputs.image_starts, image_len=inputs.image_len,
                                 budget=self.budget, valid=inputs.valid)
        return idx, None


@dataclasses.dataclass(frozen=True)
class ATPPruner(LLMPruner):
    """ATP-style instance-adaptive pruning at layer ``K`` with a fixed threshold (:mod:`reduction.atp`).

    Image tokens score by the attention they receive in layer ``K - 1`` from the other image tokens (self)
    and from the text after the image (cross); those scoring below ``theta`` are dropped, so the kept count
    differs per example. Shapes stay static: at most ``capacity`` image tokens per image are kept and the
    unused slots are masked (``keep_valid``). Needs the full attention map of layer ``K - 1`` (explicit
    attention there only). The learned threshold module (:class:`reduction.nnx.ATPModule`) is not wired in.
    """

    theta: float = 0.3
    capacity: int = 64
    self_weight: float = 0.5
    needs_attention: ClassVar[bool] = True

    def num_out(self, num_tokens: int, image_len: int, num_images: int = 1) -> int:
        return num_tokens - num_images * (image_len - min(self.capacity, image_len))

    def select(self, inputs: PruneInputs):
        from reduction import atp

        starts = inputs.image_starts
        if starts.ndim != 1:
            raise ValueError("ATPPruner supports one image per example (image_starts [B])")
        attn = inputs.attention
        t = attn.shape[-1]
        pos = jnp.arange(t)[None]
        image = (pos >= starts[:, None]) & (pos < starts[:, None] + inputs.image_len)
        text_after = (pos >= starts[:, None] + inputs.image_len) & inputs.valid
        self_recv = atp.received_attention(attn, image.astype(jnp.float32), exclude_self=True)
        cross_recv = atp.received_attention(attn, text_after.astype(jnp.float32))
        score = atp.redundancy_score(self_recv, cross_recv, image, self_weight=self.self_weight)
        theta = jnp.full((attn.shape[0],), self.theta, jnp.float32)
        keep = atp.hard_keep_mask(score, theta, candidates=image)
        cap = self.num_out(t, inputs.image_len)
        return atp.compact_keep(keep, score, capacity=cap, forced=~image)


LLM_PRUNERS = {"dart": DARTPruner, "fastv": FastVPruner, "atp": ATPPruner}


# -- reduction plan --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """Where and how tokens are reduced. ``vision``: per-layer reducers of the tower (tuple, ``None`` entries
    for plain layers); ``connector``: the connector-side reduction; ``llm``: the in-LLM pruner or ``None``."""

    vision: Optional[tuple] = None
    connector: ConnectorReduction = ConnectorReduction()
    llm: Optional[LLMPruner] = None


def build_plan(spec: Optional[Mapping[str, Any]], *, vision_layers: int = 0) -> ReductionPlan:
    """Resolve a config dict ``{"point": "none" | "vision" | "connector" | "llm", "method": ..., **options}``.

    ``vision_layers``: blocks that run in the tower (needed for ``point="vision"``; see
    :meth:`VLM.vision_layers`)."""
    if spec is None:
        return ReductionPlan()
    spec = dict(spec)
    point = spec.pop("point", "none")
    if point == "none":
        return ReductionPlan()
    if point == "vision":
        if vision_layers <= 0:
            raise ValueError("vision_layers must be given for point='vision'")
        return ReductionPlan(vision=tuple(build_layer_reducers(vision_layers, spec)))
    if point == "connector":
        if "grid" in spec and spec["grid"] is not None:
            spec["grid"] = tuple(spec["grid"])
        return ReductionPlan(connector=ConnectorReduction(**spec))
    if point == "llm":
        method = spec.pop("method", None)
        if method not in LLM_PRUNERS:
            raise ValueError(f"unknown in-LLM method {method!r}; available: {sorted(LLM_PRUNERS)}")
        return ReductionPlan(llm=LLM_PRUNERS[method](**spec))
    raise ValueError(f"point must be 'none', 'vision', 'connector' or 'llm', got {point!r}")


# -- model -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: LlamaConfig = LlamaConfig()
    image_token_id: int = 32000
    projector_dtype: Any = jnp.float32


class VLM(nnx.Module):
    """``VLM(cfg, rngs=nnx.Rngs(0))``: CLIP vision tower, LLaVA-1.5 projector, Llama LM."""

    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = CLIPVision(cfg.vision, rngs=rngs)
        self.multi_modal_projector = Projector(cfg.vision.dim, cfg.text.dim, dtype=cfg.projector_dtype, rngs=rngs)
        self.language_model = Llama(cfg.text, rngs=rngs)

    @property
    def vision_layers(self) -> int:
        return self.cfg.vision.layers_run

    def num_image_tokens(self, plan: ReductionPlan = ReductionPlan()) -> int:
        """Static image tokens per image entering the LLM under ``plan``."""
        return plan.connector.num_out(self.vision_tower.num_features(plan.vision))

    def encode_images(self, images: jax.Array, plan: ReductionPlan = ReductionPlan()) -> jax.Array:
        """``images: [B, H, W, 3]`` -> projected image tokens ``[B, K, C]`` (reduction points (a) and (b))."""
        feats, _ = self.vision_tower(images, reducers=plan.vision)
        state = plan.connector(feats)
        return self.multi_modal_projector(state.x)

    def embed(self, ids: jax.Array, images: jax.Array, plan: ReductionPlan = ReductionPlan()):
        """``ids: [B, T]`` with ``K`` placeholders each -> ``(x [B, T, C], is_image [B, T])``."""
        check_rank(ids, 2, "ids")
        is_image = ids == self.cfg.image_token_id
        text = self.language_model.embed(jnp.where(is_image, 0, ids))
        return place_image_tokens(text, self.encode_images(images, plan), is_image), is_image

    def __call__(self, ids: jax.Array, images: jax.Array, *, valid: Optional[jax.Array] = None,
                 plan: ReductionPlan = ReductionPlan()):
        """Scoring forward: ``-> (logits [B, T', V] float32, aux)``; ``T' < T`` under in-LLM pruning."""
        valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
        x, is_image = self.embed(ids, images, plan)
        lm = self.language_model
        h, _, aux = lm.prefill_embeds(x, positions_from_valid(valid), valid, pruner=plan.llm,
                                      image_starts=image_starts_from_mask(is_image),
                                      image_len=self.num_image_tokens(plan))
        return lm.logits(h), aux

    def generate(self, ids: jax.Array, images: jax.Array, *, valid: Optional[jax.Array] = None,
                 max_new_tokens: int, plan: ReductionPlan = ReductionPlan(), stop_tokens=None,
                 sampling: Sampling = Sampling(), rng: Optional[jax.Array] = None, pad_id: int = 0,
                 return_info: bool = False):
        """Batched generation: ``ids: [B, T]`` (left-padded, ``valid: [B, T]``), ``images: [B, H, W, 3]`` ->
        ``tokens [B, R]`` (see :func:`models.generate.generate_from_embeds`)."""
        valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
        n_img = self.num_image_tokens(plan)
        x, starts = _embed_jit(*nnx.split(self), jnp.asarray(ids, jnp.int32), images, plan=plan)
        return generate_from_embeds(self.language_model, x, valid, max_new_tokens=max_new_tokens,
                                    stop_tokens=stop_tokens, sampling=sampling, rng=rng, pad_id=pad_id,
                                    pruner=plan.llm, image_starts=starts, image_len=n_img,
                                    return_info=return_info)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _embed_jit(graphdef, params, ids, images, *, plan):
    model = nnx.merge(graphdef, params)
    x, is_image = model.embed(ids, images, plan)
    return x, image_starts_from_mask(is_image)


def build_prompts(token_lists: Sequence[Sequence[int]], *, image_token_id: int, num_image_tokens: int,
                  pad_id: int = 0, length: Optional[int] = None):
    """Host helper: each list holds exactly one ``image_token_id``, expanded to ``num_image_tokens`` copies;
    the batch is left-padded. Returns ``(ids [B, T] int32, valid [B, T] bool)``."""
    from models.generate import left_pad

    num_image_tokens = check_count(num_image_tokens, "num_image_tokens", allow_zero=False)
    out = []
    for i, toks in enumerate(token_lists):
        toks = list(toks)
        if toks.count(image_token_id) != 1:
            raise ValueError(f"prompt {i} must contain image_token_id={image_token_id} exactly once")
        j = toks.index(image_token_id)
        out.append(toks[:j] + [image_token_id] * num_image_tokens + toks[j + 1:])
    return left_pad(out, pad_id, length)


__all__ = ["VLM", "VLMConfig", "ReductionPlan", "build_plan", "build_prompts", "DARTPruner", "FastVPruner", "ATPPruner",
           "LLM_PRUNERS"]
