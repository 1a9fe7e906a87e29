"""A learned delete gate inside the LLM, after MrT5 (Kallini et al., ICLR 2025, arXiv 2410.20771).

MrT5 puts a one-unit linear gate on the hidden states entering one encoder layer of ByT5 and trains it with the
model: the gate's value acts as an additive key bias in that layer and every later one (a soft, differentiable
deletion), and at inference the tokens whose gate lies below a threshold are removed from the sequence. The paper
reports sequences shortened by up to 75% with accuracy comparable to ByT5 on XNLI, TyDi QA and character-level
tasks (abstract, v3), and a 25-55% shorter run time.

Here the same gate sits inside the VLM's LLM prefill, on the image tokens (``side="image"``) or on the text tokens
(``side="text"``) of the sequence.

Shapes and contracts (B batch, T tokens, C channels, M images per example):

* :func:`gate_values` ``(hidden [B, T, C], w [C], b [], scale) -> G [B, T]`` float32,
  ``G = scale * sigmoid(-(hidden @ w + b))`` with ``scale < 0``, so ``G`` lies in ``(scale, 0)``: near 0 keeps,
  near ``scale`` deletes. ``hidden`` is what the LLM hands a reducer before layer ``K``: layer ``K - 1``'s output
  through the LM's final RMSNorm (MrT5 normalises with an RMSNorm of its own; the learned ``w`` absorbs the scale).
* :func:`candidate_mask` ``-> [B, T]`` bool: the tokens the gate may delete. ``side="image"``: the image span (one
  image per example). ``side="text"``: the valid tokens outside the image span, except the last ``protect_last``
  (the last instruction token, whose logits give the answer). Everything else is never deleted.
* :func:`soft_delete_step`: the identity step with ``size_scale = exp(G)`` on the candidates (1 elsewhere). The LLM
  adds ``log(sizes)`` as a key bias to every later layer after a reducer with ``prop_attn`` (the generic hook), so
  every later layer sees ``+G`` on that token's key logits: MrT5's soft deletion. Fully static, differentiable.
* :func:`hard_delete_step`: keep the candidates with ``G > threshold`` (and every non-candidate), compacted to a
  static capacity with the step's ``valid`` marking the unused slots (:func:`reduction.atp.threshold_prune_step`,
  highest gate first if more pass than fit). ``side="image"``: capacity ``T - M * (image_len - kept)`` with
  ``kept = candidates_kept(image_len, keep_ratio, keep)``, so the later layers run on fewer tokens. ``side="text"``: capacity
  ``T`` (nothing moves, deleted text is only masked), because the text around an image has a data-dependent length
  per example and the LLM tracks image spans with one static length.
* :func:`deletion_loss`: the auxiliary loss, ``(mean soft deleted fraction - target)^2`` over the candidates,
  where the soft deleted fraction of a token is ``G / scale`` in ``(0, 1)``.

What the official code (jkallini/mrt5 @ e79c3e7) does, and where this port differs:

* Gate: ``k * sigmoid(-(w . RMSNorm(h) + b))``, xavier weights, bias initialised to 1, ``k = -30`` in its
  ``train.py`` (config default -10), at encoder layer 3 (config default 2); threshold ``k / 2 = -15``. Pad tokens are
  forced to ``G = k``. Here pads are never candidates (the LLM masks them already).
* Soft mode adds ``G`` to the key logits of the gated layer and every later encoder layer (and the decoder's
  cross-attention; a decoder-only LLM has none). Same here, through the token sizes.
* Hard mode keeps ``G > threshold`` and compacts to the batch's largest kept count, and kept tokens get no bias;
  here the count is a static capacity (slots beyond an example's kept count are invalid) and kept tokens get no bias
  either (their sizes stay 1).
* Loss: cross-entropy plus ``alpha * mean(G)`` with ``alpha`` set each step by a PI controller towards the target
  deletion rate (k_p 0.5, k_i 1e-5). **Not ported**: this port uses the squared distance of the soft deleted
  fraction to the target with a fixed weight (``weight``), which needs no state across steps (**GUESS**).

Guessed defaults (**GUESS**, for a frozen 30-layer SmolLM2 and 64 image tokens, none from the paper):
``layer 2`` (MrT5 uses an early layer, 3 of 12), ``scale -30`` and ``threshold -15`` (MrT5's train.py), bias
initialised to ``init_bias = 2`` (``G ~ -3.6`` at start, most tokens kept, since the LM here is frozen and a gate
that starts by deleting much of the image would wreck it; MrT5 uses 1), zero initial weights (MrT5: xavier; zero
makes every token start at the same gate), ``target 0.5``, ``weight 10``, ``keep_ratio 0.75`` for the image-side
capacity (a margin above ``1 - target``).

The learned module is :class:`reduction.nnx.DeleteGateModule`; the registered spec ``{"method": "delete_gate",
...}`` builds :class:`DeleteGate`, the declaration a model turns into that module (``VLM.attach_learned``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction import atp
from reduction.reducers import HIDDEN, LayerInfo, Reducer, candidates_kept, register
from reduction.state import TokenState
from reduction.step import ReductionStep, identity_step, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

SIDES = ("image", "text")


def gate_values(hidden: jax.Array, w: jax.Array, b, *, scale: float) -> jax.Array:
    """MrT5's gate ``scale * sigmoid(-(hidden @ w + b))``: ``hidden [B, T, C]``, ``w [C]`` -> ``[B, T]`` float32."""
    check_rank(hidden, 3, "hidden")
    logit = jnp.einsum("btc,c->bt", hidden.astype(jnp.float32), jnp.asarray(w, jnp.float32))
    return float(scale) * jax.nn.sigmoid(-(logit + jnp.asarray(b, jnp.float32)))


def candidate_mask(num_tokens: int, *, side: str, image_starts: jax.Array, image_len: int,
                   valid: Optional[jax.Array] = None, protect_last: int = 1) -> jax.Array:
    """The tokens the gate may delete, ``[B, T]`` bool (see the module docstring). ``image_starts: [B]``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if image_starts.ndim != 1:
        raise ValueError("delete_gate in the LLM supports one image per example (image_starts [B])")
    pos = jnp.arange(num_tokens)[None]
    image = (pos >= image_starts[:, None]) & (pos < image_starts[:, None] + image_len)
    if side == "image":
        return image
    text = ~image & (pos < num_tokens - protect_last)
    return text if valid is None else text & valid


def soft_delete_step(gate: jax.Array, candidates: jax.Array) -> ReductionStep:
    """Training: every token stays; ``size_scale = exp(G)`` on the candidates, 1 elsewhere (``[B, T]`` each)."""
    check_rank(gate, 2, "gate")
    check_leading(candidates, gate.shape, "candidates", "gate")
    b, t = gate.shape
    return dataclasses.replace(identity_step(b, t), size_scale=jnp.exp(jnp.where(candidates, gate, 0.0)))


def hard_delete_step(gate: jax.Array, candidates: jax.Array, *, threshold: float, capacity: int,
                     valid: Optional[jax.Array] = None) -> ReductionStep:
    """Inference: keep ``G > threshold`` among the candidates and every other token, in ``capacity`` slots (the
    step's ``valid`` marks the used ones). A candidate invalid in ``valid`` is never kept; every non-candidate,
    padding included, takes a slot, so the candidates' share of the capacity never depends on padding (as ATP's span
    pruning; :func:`reduction.step.apply_step` ands the state's own mask in)."""
    check_rank(gate, 2, "gate")
    check_leading(candidates, gate.shape, "candidates", "gate")
    t = gate.shape[1]
    capacity = check_count(capacity, "capacity", allow_zero=False)
    score = jnp.where(candidates, jax.lax.stop_gradient(gate).astype(jnp.float32), 0.0)
    passing = candidates & (score > float(threshold))
    if valid is not None:
        passing = passing & valid
    idx, kept = atp.compact_keep(passing | ~candidates, score, capacity=capacity, forced=~candidates)
    return prune_step(idx, t, valid=kept)


def deletion_fraction(gate: jax.Array, candidates: jax.Array, *, scale: float,
                      threshold: Optional[float] = None) -> jax.Array:
    """Per-example deleted fraction of the candidates, ``[B]``: soft (``G / scale``) or, with ``threshold``, hard
    (``G <= threshold``)."""
    c = candidates.astype(jnp.float32)
    d = gate / float(scale) if threshold is None else (gate <= float(threshold)).astype(jnp.float32)
    return jnp.sum(d * c, axis=-1) / jnp.maximum(jnp.sum(c, axis=-1), 1.0)


def deletion_loss(gate: jax.Array, candidates: jax.Array, *, scale: float, target: float) -> jax.Array:
    """``(mean_b soft deleted fraction - target)^2``, a float32 scalar (the fraction pooled over the batch)."""
    c = candidates.astype(jnp.float32)
    frac = jnp.sum(gate / float(scale) * c) / jnp.maximum(jnp.sum(c), 1.0)
    return (frac - float(target)) ** 2


def image_capacity(num_tokens: int, info: LayerInfo, keep_ratio: float, keep: Optional[int]) -> int:
    """Static tokens after image-side hard deletion: every text token plus the capacity of the image span."""
    return num_tokens - info.num_images * (info.image_len - candidates_kept(info.image_len, keep_ratio, keep))


@dataclasses.dataclass(frozen=True)
class DeleteGate(Reducer):
    """The registered declaration of a delete gate (static, hashable): its options, its static counts and costs.

    It holds no weights: a model that meets it in a plan attaches a :class:`reduction.nnx.DeleteGateModule` built
    by :meth:`make_module` (``VLM.attach_learned``) and runs that instead. Run alone (no module attached, e.g. in a
    sweep over every registered method), :meth:`plan` is the hard mode of the gate at its initialisation (kernel 0:
    every candidate gets ``G = scale * sigmoid(-init_bias)``, so the capacity keeps the first image tokens): a
    placeholder that runs, not the method."""

    side: str = "image"
    scale: float = -30.0
    threshold: float = -15.0
    keep_ratio: float = 0.75
    keep: Optional[int] = None
    target: float = 0.5
    weight: float = 10.0
    init_bias: float = 2.0
    protect_last: int = 1
    needs: ClassVar[frozenset] = frozenset({HIDDEN})
    prop_attn: ClassVar[bool] = True       # the soft gate reaches the later layers as log(sizes)
    spans: ClassVar[bool] = True
    learned: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        if self.side == "text" or not info.in_spans:
            return num_tokens
        return image_capacity(num_tokens, info, self.keep_ratio, self.keep)

    def train_num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        if not info.in_spans or info.image_starts is None:
            raise ValueError("delete_gate runs inside the LLM (it needs the image span: info.image_starts, image_len)")
        b, t = state.x.shape[:2]
        g = jnp.full((b, t), self.scale / (1.0 + math.exp(min(self.init_bias, 700.0))), jnp.float32)
        cand = candidate_mask(t, side=self.side, image_starts=info.image_starts, image_len=info.image_len,
                              valid=state.valid, protect_last=self.protect_last)
        return hard_delete_step(g, cand, threshold=self.threshold, capacity=self.num_out(t, info), valid=state.valid)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return 2 * num_tokens * dim

    def make_module(self, dim: int, *, rngs):
        from reduction.nnx import DeleteGateModule

        return DeleteGateModule(dim=dim, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                                rngs=rngs)


def check_options(side: str, scale: float, threshold: float, keep_ratio: float, keep: Optional[int], target: float,
                  weight: float, protect_last: int) -> None:
    """Named errors for bad delete-gate options (before anything is traced)."""
    if side not in SIDES:
        raise ValueError(f"delete_gate: side must be one of {SIDES}, got {side!r}")
    if not float(scale) < 0:
        raise ValueError(f"delete_gate: scale must be < 0 (G lies in (scale, 0)), got {scale}")
    if not float(scale) < float(threshold) < 0:
        raise ValueError(f"delete_gate: threshold must lie in (scale, 0) = ({scale}, 0), got {threshold}")
    check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        check_count(keep, "keep", allow_zero=False)
    if not 0.0 <= float(target) < 1.0:
        raise ValueError(f"delete_gate: target (deleted fraction) must be in [0, 1), got {target}")
    if float(weight) < 0:
        raise ValueError(f"delete_gate: weight must be >= 0, got {weight}")
    check_count(protect_last, "protect_last")


@register("delete_gate", points=("llm",))
def _delete_gate_layers(num_layers: int, side: str = "image", scale: float = -30.0, threshold: float = -15.0,
                        keep_ratio: float = 0.75, keep: Optional[int] = None, target: float = 0.5,
                        weight: float = 10.0, init_bias: float = 2.0, protect_last: int = 1,
                        layers=None) -> list[Optional[Reducer]]:
    """MrT5-style learned delete gate (train it: the model attaches its module): soft key bias in training, hard
    deletion of ``G <= threshold`` at inference up to a capacity of ``keep_ratio`` (or ``keep``) of the image
    tokens; ``side`` ``"image"`` or ``"text"``; aux loss ``weight * (soft deleted fraction - target)^2``."""
    check_options(side, scale, threshold, keep_ratio, keep, target, weight, protect_last)
    red = DeleteGate(side=str(side), scale=float(scale), threshold=float(threshold), keep_ratio=float(keep_ratio),
                     keep=None if keep is None else int(keep), target=float(target), weight=float(weight),
                     init_bias=float(init_bias), protect_last=int(protect_last))
    return [red if i in set(layers) else None for i in range(num_layers)]


__all__ = ["gate_values", "candidate_mask", "soft_delete_step", "hard_delete_step", "deletion_fraction",
           "deletion_loss", "image_capacity", "DeleteGate", "SIDES"]
