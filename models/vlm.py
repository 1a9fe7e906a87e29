"""LLaVA-style VLM: vision tower -> connector -> Llama, with token reduction at any of three points.

A :class:`ReductionPlan` (static, hashable) holds the reducers of each point, all built from the same specs and
the same registry (:func:`reduction.build_layer_reducers`):

(a) ``vision``: per-layer reducers inside the vision tower (as in a ViT block);
(b) ``connector``: reducers on the tower's features before the projector (:mod:`models.connector`);
(c) ``llm``: per-layer reducers inside the LLM during prefill (the reducer of layer ``K`` acts before layer ``K``
    on layer ``K - 1``'s outputs, inside the image spans); later layers and their KV cache hold only the kept
    tokens, which keep their original position ids.

Build a plan from a plain config dict with :func:`build_plan`, e.g. ``{"point": "llm", "method": "dart",
"layers": [2], "keep": 128}``, ``{"point": "connector", "method": "pool", "k": 2}`` or ``{"point": "vision",
"method": "tome", "r": 8}``; several points at once with ``{"vision": {...}, "llm": {...}}``.

Prompts carry one placeholder id per image token (:func:`build_prompts` expands a single placeholder and
left-pads a batch); the image span may start anywhere and differ per example.

Dimension vocabulary: B batch, T prompt tokens, N vision tokens, K image tokens after the connector,
C channels, V vocabulary, R new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.clip_vision import clip_tower_config
from models.connector import (Projector, connector_flops, connector_num_out, connector_reduce, image_starts_from_mask,
                              place_image_tokens)
from models.generate import Sampling, generate_from_embeds
from models.llama import Llama, LlamaConfig, positions_from_valid
from models.vision_tower import ViTTower, ViTTowerConfig
from reduction.reducers import SpecError, build_layer_reducers
from reduction.validate import check_count, check_rank

PLAN_POINTS = ("vision", "connector", "llm")


# -- reduction plan --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """Where and how tokens are reduced: per point a tuple with one reducer (or ``None``) per layer, or ``None``.
    ``vision``: the tower's blocks; ``connector``: its passes (one by default); ``llm``: the LLM's layers."""

    vision: Optional[tuple] = None
    connector: Optional[tuple] = None
    llm: Optional[tuple] = None


def build_plan(spec: Optional[Mapping[str, Any]], *, vision_layers: int = 0, llm_layers: int = 0) -> ReductionPlan:
    """Resolve ``{"point": "none" | "vision" | "connector" | "llm", "method": ..., **options}`` (or a mapping of
    points to such specs without ``point``) into a :class:`ReductionPlan`.

    ``vision_layers``: blocks that run in the tower (:attr:`VLM.vision_layers`); ``llm_layers``: the LLM's layers
    (:attr:`VLM.llm_layers`). Both are needed for their points."""
    if spec is None:
        return ReductionPlan()
    spec = dict(spec)
    if "point" not in spec and set(spec) <= set(PLAN_POINTS):
        parts = {p: build_plan(dict(s, point=p), vision_layers=vision_layers, llm_layers=llm_layers)
                 for p, s in spec.items() if s}
        return ReductionPlan(**{p: getattr(plan, p) for p, plan in parts.items()})
    point = spec.pop("point", "none")
    if point == "none" or spec.get("method", "none") in ("none", ""):
        return ReductionPlan()
    if point == "vision":
        if vision_layers <= 0:
            raise SpecError("vision_layers must be given for point='vision'")
        return ReductionPlan(vision=tuple(build_layer_reducers(vision_layers, spec, point="vision")))
    if point == "connector":
        return ReductionPlan(connector=tuple(build_layer_reducers(1, spec, point="connector")))
    if point == "llm":
        if llm_layers <= 0:
            raise SpecError("llm_layers must be given for point='llm'")
        return ReductionPlan(llm=tuple(build_layer_reducers(llm_layers, spec, point="llm")))
    raise SpecError(f"point must be 'none', 'vision', 'connector' or 'llm', got {point!r}")


# -- model -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """``vision``: the tower, a :class:`ViTTowerConfig` (LLaVA's CLIP tower is one,
    :func:`models.clip_vision.clip_tower_config`; or any ViT such as DINOv2-small); ``text``: the Llama LM;
    ``image_token_id``: the placeholder id in prompts. ``tiling``: ``None`` (one tower image per example) or
    AnyRes ``(rows, cols)``: images are ``rows * S x cols * S`` (``S`` the tower's size); a thumbnail (the image
    resized to ``S``) and the ``rows x cols`` crops run through the tower in one call, and their tokens form one
    image span: thumbnail first, then the crops row-major, each tile as the tower emits it (see
    :func:`tile_images`)."""

    vision: ViTTowerConfig = clip_tower_config()
    text: LlamaConfig = LlamaConfig()
    image_token_id: int = 32000
    projector_dtype: Any = jnp.float32
    tiling: Optional[tuple] = None

    def __post_init__(self):
        if self.tiling is not None:
            t = tuple(self.tiling)
            if len(t) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in t):
                raise ValueError(f"tiling must be None or (rows, cols) of ints >= 1, got {self.tiling!r}")
            object.__setattr__(self, "tiling", t)

    @property
    def num_tiles(self) -> int:
        """Tower images per example: 1, or the thumbnail plus ``rows * cols`` crops under :attr:`tiling`."""
        return 1 if self.tiling is None else 1 + self.tiling[0] * self.tiling[1]


def make_tower(cfg: ViTTowerConfig, rngs: nnx.Rngs) -> nnx.Module:
    if isinstance(cfg, ViTTowerConfig):
        return ViTTower(cfg, rngs=rngs)
    raise TypeError(f"VLMConfig.vision must be a ViTTowerConfig (models.clip_vision.clip_tower_config builds "
                    f"LLaVA's CLIP tower), got {type(cfg).__name__}")


def _narrow_dtype(dtype):
    """``dtype`` when it is a floating dtype narrower than float32 (bfloat16, float16), else ``None``."""
    if dtype is None:
        return None
    dt = jnp.dtype(dtype)
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4 else None


class VLM(nnx.Module):
    """``VLM(cfg, rngs=nnx.Rngs(0))``: vision tower, LLaVA-1.5 projector, Llama LM.

    Parts already built (e.g. loaded checkpoints) are passed as ``vision_tower=`` / ``language_model=`` /
    ``projector=``; only the missing parts are initialised from ``rngs``."""

    def __init__(self, cfg: VLMConfig, *, rngs: Optional[nnx.Rngs] = None, vision_tower: Optional[nnx.Module] = None,
                 language_model: Optional[Llama] = None, projector: Optional[Projector] = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        # a random tower (models.vision_tower.ViTTower) and LM land in a narrow compute dtype (bf16), as loaded ones do
        self.vision_tower = vision_tower if vision_tower is not None else make_tower(cfg.vision, rngs)
        self.multi_modal_projector = projector if projector is not None else Projector(
            cfg.vision.dim, cfg.text.dim, dtype=cfg.projector_dtype, rngs=rngs)
        if language_model is None:
            text = cfg.text
            low = _narrow_dtype(text.dtype)
            if low is not None and jnp.dtype(text.param_dtype) == jnp.float32:
                text = dataclasses.replace(text, param_dtype=low)   # as a bf16 checkpoint load sets it
            language_model = Llama(text, rngs=rngs)
        self.language_model = language_model

    @property
    def vision_layers(self) -> int:
        return self.cfg.vision.layers_run

    @property
    def llm_layers(self) -> int:
        return self.cfg.text.num_layers

    def build_plan(self, spec: Optional[Mapping[str, Any]]) -> ReductionPlan:
        """:func:`build_plan` with this model's layer counts."""
        return build_plan(spec, vision_layers=self.vision_layers, llm_layers=self.llm_layers)

    # -- learned reducers in the LLM ------------------------------------------------------------------------

    def attach_reducer(self, layer: int, module) -> "VLM":
        """Attach a trainable reducer (:class:`reduction.nnx.LearnedReducer`) before LLM layer ``layer >= 1``.

        The module goes to ``self.learned`` (``nnx.Dict`` keyed ``str(layer)``; parameter paths ``learned/<layer>/...``,
        so ``optim.trainable=("^learned/",)`` trains only the learned reducers) and runs there in the mode
        ``model(..., train=)`` picks, in place of the plan's declaration at that layer. Returns ``self``."""
        from reduction.nnx import LearnedReducer

        layer = int(layer)
        if not 1 <= layer < self.llm_layers:
            raise ValueError(f"attach_reducer: LLM layer {layer} out of range [1, {self.llm_layers})")
        if not isinstance(module, LearnedReducer):
            raise ValueError(f"attach_reducer needs a reduction.nnx.LearnedReducer, got {type(module).__name__}")
        current = dict(self.learned.items()) if getattr(self, "learned", None) is not None else {}
        current[str(layer)] = module
        self.learned = nnx.Dict({k: current[k] for k in sorted(current, key=int)})
        return self

    def attach_learned(self, plan: ReductionPlan, *, rngs: Optional[nnx.Rngs] = None, seed: int = 0) -> "VLM":
        """For every learned declaration in ``plan.llm`` (a reducer with ``learned = True`` and ``make_module``, e.g.
        ``delete_gate``) without a module at its layer yet, build its module (``make_module(dim, rngs=)``) and
        :meth:`attach_reducer` it. Returns ``self``."""
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        have = set(self.learned_layers)
        for i, red in enumerate(plan.llm or ()):
            if red is not None and getattr(red, "learned", False) and i not in have:
                self.attach_reducer(i, red.make_module(self.cfg.text.dim, rngs=rngs))
        return self

    @property
    def learned_layers(self) -> tuple:
        """LLM layers with an attached learned reducer (:meth:`attach_reducer`), ascending."""
        learned = getattr(self, "learned", None)
        return () if learned is None else tuple(sorted(int(k) for k in learned.keys()))

    def llm_reducers(self, plan: ReductionPlan, *, train: bool = False, sink: Optional[dict] = None):
        """``plan.llm`` with the attached learned reducers bound to the mode at their layers (replacing the plan's
        learned declaration there; a static reducer at such a layer is refused). A learned declaration without a
        module is left in place (its ``plan`` raises a named error)."""
        learned = self.learned_layers
        if not learned:
            return plan.llm
        from models.vit import _Bound

        reds = tuple(plan.llm) if plan.llm is not None else (None,) * self.llm_layers
        clash = [i for i in learned if reds[i] is not None and not getattr(reds[i], "learned", False)]
        if clash:
            raise ValueError(f"plan.llm reducers at layers {clash} collide with the learned reducers attached there")
        return tuple(_Bound(self.learned[str(i)], train, sink) if i in learned else red for i, red in enumerate(reds))

    def num_image_tokens(self, plan: ReductionPlan = ReductionPlan()) -> int:
        """Static image tokens per image entering the LLM under ``plan``."""
        return connector_num_out(plan.connector, self.cfg.num_tiles * self.vision_tower.num_features(plan.vision),
                                 self._num_protected)

    @property
    def _num_protected(self) -> int:
        return getattr(self.vision_tower, "num_protected", 0)

    def image_tokens(self, images: jax.Array, plan: ReductionPlan = ReductionPlan()):
        """``images: [B, H, W, 3]`` -> ``(tokens [B, K, C], valid [B, K] bool or None)``: the projected image tokens
        after reduction points (a) and (b), and which of them are real (``None``: all; a capacity-padded reducer
        such as ATP or tokencorr in the tower or at the connector leaves invalid slots, which the LLM masks).
        Under ``cfg.tiling`` the tiles' features are concatenated per example before the connector."""
        if self.cfg.tiling is not None:
            feats, aux = self._tiled_features(images, plan)
        else:
            feats, aux = self.vision_tower(images, reducers=plan.vision)
        state = connector_reduce(plan.connector, feats, num_protected=self._num_protected, valid=aux.get("valid"))
        return self.multi_modal_projector(state.x), state.valid

    def _tiled_features(self, images: jax.Array, plan: ReductionPlan):
        """AnyRes: ``images [B, rows S, cols S, 3]`` -> ``(features [B, M * F, C], aux)``, one tower call on
        ``B * M`` tiles (``M`` = :attr:`VLMConfig.num_tiles`, ``F`` features per tile)."""
        b, m = images.shape[0], self.cfg.num_tiles
        feats, aux = self.vision_tower(tile_images(images, self.cfg.tiling, self.cfg.vision.image_size),
                                       reducers=plan.vision)
        valid = aux.get("valid")
        aux = dict(aux, valid=None if valid is None else valid.reshape(b, m * valid.shape[1]))
        return feats.reshape(b, m * feats.shape[1], feats.shape[2]), aux

    def encode_images(self, images: jax.Array, plan: ReductionPlan = ReductionPlan()) -> jax.Array:
        """``images: [B, H, W, 3]`` -> projected image tokens ``[B, K, C]`` (see :meth:`image_tokens`)."""
        return self.image_tokens(images, plan)[0]

    def embed(self, ids: jax.Array, images: jax.Array, plan: ReductionPlan = ReductionPlan(), *,
              return_valid: bool = False):
        """``ids: [B, T]`` with ``K`` placeholders each -> ``(x [B, T, C], is_image [B, T])``; with ``return_valid``
        also ``token_valid [B, T]`` bool (``False`` at image slots a reducer left invalid) or ``None``."""
        check_rank(ids, 2, "ids")
        is_image = ids == self.cfg.image_token_id
        text = self.language_model.embed(jnp.where(is_image, 0, ids))
        tokens, image_valid = self.image_tokens(images, plan)
        x = place_image_tokens(text, tokens, is_image)
        if not return_valid:
            return x, is_image
        token_valid = None
        if image_valid is not None:
            placed = place_image_tokens(jnp.ones(ids.shape + (1,), jnp.float32),
                                        image_valid[..., None].astype(jnp.float32), is_image)
            token_valid = placed[..., 0] > 0.5
        return x, is_image, token_valid

    def prompt_embeddings(self, ids: jax.Array, images: jax.Array, plan: ReductionPlan = ReductionPlan()):
        """Compiled :meth:`embed` for generation: ``ids [B, T]``, ``images [B, H, W, 3]`` -> ``(x [B, T, C],
        image_starts [B], token_valid [B, T] bool or None)``, the inputs of :func:`models.generate.start_decoding`
        (its ``valid`` is the prompt's validity ``& token_valid``; ``plan.llm`` and :meth:`num_image_tokens` are its
        reducers and ``image_len``)."""
        return _embed_jit(*nnx.split(self), jnp.asarray(ids, jnp.int32), images, plan=plan)

    def flops(self, plan: ReductionPlan = ReductionPlan(), *, text_tokens: int, logits_tokens: int = 1) -> dict:
        """Analytic FLOPs per example (2 x MACs): ``tower``, ``connector`` (its reducers and the projector),
        ``prefill`` (``text_tokens`` + the image tokens through the LLM, the head on ``logits_tokens`` positions),
        ``decode`` (one new token over the prefill's cache), ``total`` = tower + connector + prefill; and
        ``cache_lengths`` (per LLM layer)."""
        tower = self.cfg.num_tiles * int(self.vision_tower.flops(plan.vision))
        n_feat = self.cfg.num_tiles * self.vision_tower.num_features(plan.vision)
        k = self.num_image_tokens(plan)
        conn = connector_flops(plan.connector, n_feat, self._num_protected, dim=self.cfg.vision.dim)
        proj = self.multi_modal_projector
        c_in, c_out = proj.linear_1.in_features, proj.linear_1.out_features
        conn += 2 * k * (c_in * c_out + c_out * proj.linear_2.out_features)
        lm = self.language_model
        n = text_tokens + k
        prefill = lm.prefill_flops(n, plan.llm, image_len=k, logits_tokens=logits_tokens)
        lengths = lm.tokens_per_layer(n, plan.llm, image_len=k)
        return dict(tower=tower, connector=int(conn), prefill=int(prefill), decode=lm.decode_flops(lengths),
                    total=int(tower + conn + prefill), cache_lengths=lengths, image_tokens=k)

    def __call__(self, ids: jax.Array, images: jax.Array, *, valid: Optional[jax.Array] = None,
                 plan: ReductionPlan = ReductionPlan(), last_logits: bool = False, train: bool = False):
        """Scoring forward: ``-> (logits [B, T', V] float32, aux)``; ``T' < T`` under in-LLM pruning.
        ``last_logits``: the head runs on the last position only (``[B, 1, V]``). ``train`` (static): the mode of the
        attached learned reducers (:meth:`attach_reducer`); ``aux`` then has ``reducer_aux`` (``{layer: aux dict}``)
        and ``reducer_loss`` (the sum of their ``loss``). ``aux["layer_valid"]``: per LLM layer the ``[B, T_l]`` mask of
        the tokens it ran on (padding and the empty slots of capacity-padded reducers are ``False``)."""
        valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
        x, is_image, token_valid = self.embed(ids, images, plan, return_valid=True)
        if token_valid is not None:
            valid = valid & token_valid
        lm = self.language_model
        sink: dict = {}
        h, kv, aux = lm.prefill_embeds(x, positions_from_valid(valid), valid,
                                       reducers=self.llm_reducers(plan, train=train, sink=sink),
                                       image_starts=image_starts_from_mask(is_image),
                                       image_len=self.num_image_tokens(plan))
        aux["layer_valid"] = [m for _, _, m in kv]
        if self.learned_layers:
            aux["reducer_aux"] = {layer: sink[layer] for layer in sorted(sink)}
            aux["reducer_loss"] = sum((jnp.asarray(a["loss"], jnp.float32) for a in aux["reducer_aux"].values()),
                                      jnp.zeros((), jnp.float32))
        return lm.logits(h[:, -1:] if last_logits else h), aux

    def generate(self, ids: jax.Array, images: jax.Array, *, valid: Optional[jax.Array] = None,
                 max_new_tokens: int, plan: ReductionPlan = ReductionPlan(), stop_tokens=None,
                 sampling: Sampling = Sampling(), rng: Optional[jax.Array] = None, pad_id: int = 0,
                 return_info: bool = False):
        """Batched generation: ``ids: [B, T]`` (left-padded, ``valid: [B, T]``), ``images: [B, H, W, 3]`` ->
        ``tokens [B, R]`` (see :func:`models.generate.generate_from_embeds`)."""
        if self.learned_layers:
            raise NotImplementedError("VLM.generate with attached learned reducers is not wired (the generation jit "
                                      "takes reducers as static values); score with VLM(...) instead")
        valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
        n_img = self.num_image_tokens(plan)
        x, starts, token_valid = self.prompt_embeddings(ids, images, plan)
        if token_valid is not None:
            valid = valid & token_valid
        return generate_from_embeds(self.language_model, x, valid, max_new_tokens=max_new_tokens,
                                    stop_tokens=stop_tokens, sampling=sampling, rng=rng, pad_id=pad_id,
                                    reducers=plan.llm, image_starts=starts, image_len=n_img,
                                    return_info=return_info)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _embed_jit(graphdef, params, ids, images, *, plan):
    model = nnx.merge(graphdef, params)
    x, is_image, token_valid = model.embed(ids, images, plan, return_valid=True)
    return x, image_starts_from_mask(is_image), token_valid


def tile_images(images: jax.Array, tiling: tuple, size: int) -> jax.Array:
    """AnyRes tiles: ``images [B, rows * size, cols * size, C]`` -> ``[B * (1 + rows * cols), size, size, C]``,
    per example the thumbnail (``jax.image.resize(..., "bilinear")``, antialiased, the same call as
    :func:`training.tasks.batch_images`' ``input_size``) then the crops row-major."""
    check_rank(images, 4, "images")
    rows, cols = tiling
    b, h, w, c = images.shape
    if (h, w) != (rows * size, cols * size):
        raise ValueError(f"tiling {tuple(tiling)} at tower size {size} needs images of {rows * size} x {cols * size}"
                         f" pixels, got {h} x {w}")
    thumb = jax.image.resize(images, (b, size, size, c), "bilinear")
    crops = images.reshape(b, rows, size, cols, size, c).transpose(0, 1, 3, 2, 4, 5)
    crops = crops.reshape(b, rows * cols, size, size, c).astype(thumb.dtype)
    return jnp.concatenate([thumb[:, None], crops], axis=1).reshape(b * (1 + rows * cols), size, size, c)


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


__all__ = ["VLM", "VLMConfig", "make_tower", "tile_images", "ReductionPlan", "build_plan", "build_prompts",
           "PLAN_POINTS"]
