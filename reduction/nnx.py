"""Learned reducers as thin Flax NNX modules (the only Flax import under ``reduction/``).

``import reduction`` does not import this module; use ``from reduction.nnx import LearnedATP`` (or
:class:`HoTRecovery`, HoT's learned token recovery, which restores the full token count instead of reducing it).

The protocol of a trainable reducer (:class:`LearnedReducer`): an ``nnx.Module`` that a model holds in its list of
reducers (:meth:`models.vit.ViT.attach_reducer`) and calls at its layer like any static
:class:`reduction.Reducer` (same ``needs``, ``position``, ``prop_attn``, static ``num_out``), except that the call
takes the mode and returns an auxiliary dict::

    state, aux = module(state, info, train=True)    # training: e.g. a soft gate, aux["loss"] = weighted aux loss
    state, aux = module(state, info, train=False)   # inference: static capacity num_out(T, info), aux["loss"] = 0

``aux`` holds ``"loss"`` (already weighted, summed by the model into ``aux["reducer_loss"]`` and added to the task
loss by the trainer) and any metrics, each a scalar or a per-example ``[B]`` array (the trainer logs their mean as
``<name>_L<layer>``). Tokens still move only through :func:`reduction.step.apply_step`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reduction import atp
from reduction import flops as flops_lib
from reduction.reducers import ATTENTION, LayerInfo
from reduction.schedule import keep_count
from reduction.state import TokenState
from reduction.step import apply_step, identity_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio


class ATPModule(nnx.Module):
    """ATP-style pruning at one LLM (or ViT) layer with an instance-wise learned threshold.

    A two-layer MLP maps pooled statistics of the scores (mean, std and max of the combined score over the
    candidates, mean self score, mean cross score; both raw received-attention means are multiplied by the
    candidate count so they are O(1)) to ``theta = sigmoid(mlp(features))`` in ``(0, 1)``, one per example.

    ``__call__(self_received [B, T], cross_received [B, T], candidates [B, T], *, train)`` returns:
      * ``train=True``: ``(mask [B, T], theta [B])`` soft mask (1 on non-candidates and the spatial grid);
      * ``train=False``: ``(keep_idx [B, capacity], valid [B, capacity], theta [B])`` hard pruning compacted
        to the static ``capacity``.

    Args:
      hidden: MLP width. capacity: static tokens kept at inference (shape of the compacted output).
      temperature: soft-mask sharpness (guess: 10, as a student re-implementation uses).
      spatial: optional static ``[T]`` bool mask of always-kept tokens (e.g. from
        :func:`reduction.atp.spatial_grid_mask` placed at the image span).
      self_weight: weight of the self-modality score in the combined score.
      init_theta: initial threshold (the output bias starts at ``logit(init_theta)``).
    """

    def __init__(self, *, capacity: int, hidden: int = 16, temperature: float = 10.0,
                 spatial: Optional[np.ndarray] = None, self_weight: float = 0.5, init_theta: float = 0.3,
                 rngs: nnx.Rngs):
        self.capacity = check_count(capacity, "capacity", allow_zero=False)
        self.temperature = float(temperature)
        self.self_weight = float(self_weight)
        self.spatial = None if spatial is None else tuple(bool(v) for v in np.asarray(spatial).reshape(-1))
        self.fc1 = nnx.Linear(5, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros_init(),
                              bias_init=nnx.initializers.constant(float(np.log(init_theta / (1 - init_theta)))),
                              rngs=rngs)

    def features(self, score, self_received, cross_received, candidates):
        """``[B, 5]`` pooled statistics over the candidates."""
        c = candidates.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(c, axis=-1), 1.0)
        mean = jnp.sum(score * c, axis=-1) / n
        std = jnp.sqrt(jnp.sum(((score - mean[:, None]) ** 2) * c, axis=-1) / n + 1e-12)
        mx = jnp.max(jnp.where(candidates, score, 0.0), axis=-1)
        ms = jnp.sum(self_received * c, axis=-1)
        mc = jnp.sum(cross_received * c, axis=-1)
        return jnp.stack([mean, std, mx, ms, mc], axis=-1)

    def threshold(self, score, self_received, cross_received, candidates):
        f = self.features(score, self_received, cross_received, candidates)
        return jax.nn.sigmoid(self.fc2(jax.nn.gelu(self.fc1(f)))[:, 0])

    def __call__(self, self_received: jax.Array, cross_received: jax.Array, candidates: jax.Array, *,
                 train: bool):
        check_rank(self_received, 2, "self_received")
        b, t = self_received.shape
        check_leading(cross_received, (b, t), "cross_received", "self_received")
        check_leading(candidates, (b, t), "candidates", "self_received")
        candidates = candidates.astype(bool)
        forced = None
        if self.spatial is not None:
            if len(self.spatial) != t:
                raise ValueError(f"spatial mask has {len(self.spatial)} entries, inputs have T={t}")
            forced = jnp.asarray(np.array(self.spatial)) & candidates
        score = atp.redundancy_score(self_received, cross_received, candidates, self_weight=self.self_weight)
        theta = self.threshold(score, self_received.astype(jnp.float32), cross_received.astype(jnp.float32),
                               candidates)
        if train:
            mask = atp.soft_keep_mask(score, theta, temperature=self.temperature, forced=forced,
                                      candidates=candidates)
            return mask, theta
        keep = atp.hard_keep_mask(score, theta, forced=forced, candidates=candidates)
        forced_all = ~candidates if forced is None else forced | ~candidates
        idx, valid = atp.compact_keep(keep, score, capacity=self.capacity, forced=forced_all)
        return idx, valid, theta


# -- the protocol of a trainable reducer ----------------------------------------------------------------------


class LearnedReducer(nnx.Module):
    """Base class of trainable reducers (see the module docstring).

    Subclasses set the class attributes ``needs`` / ``position`` / ``prop_attn`` (as on :class:`reduction.Reducer`)
    and implement :meth:`num_out` (the static inference capacity) and :meth:`__call__`. :meth:`train_num_out` is
    the static output count in training (default: :meth:`num_out`; a soft gate keeps every token).
    """

    needs: ClassVar[frozenset] = frozenset()
    position: ClassVar[str] = "after_attention"
    prop_attn: ClassVar[bool] = False

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        """Static output count at inference for ``num_tokens`` input tokens (``info``: static fields only)."""
        raise NotImplementedError

    def train_num_out(self, num_tokens: int, info: LayerInfo) -> int:
        """Static output count in training (default: the inference count)."""
        return self.num_out(num_tokens, info)

    def __call__(self, state: TokenState, info: LayerInfo, *, train: bool) -> tuple[TokenState, dict]:
        """``(state [B, T, C] -> [B, K, C], aux)`` with ``aux["loss"]`` the weighted auxiliary loss (0 at inference)."""
        raise NotImplementedError

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """The reducer's own FLOPs at this layer at inference (2 x MACs)."""
        return 0


FEATURE_KINDS = ("stats", "stats+cls")


class LearnedATP(LearnedReducer):
    """ATP-style pruning in a ViT block with an instance-wise learned threshold and a budget loss.

    The score is :func:`reduction.atp.vit_atp_inputs` on the block's attention (self: the other patches, cross: the
    class token, token 0); a spatial grid of patches (``stride``, :func:`reduction.atp.patch_grid_mask`) and the
    ``num_protected`` prefix are always kept. ``theta [B] = sigmoid(mlp(pooled score statistics))`` as in
    :class:`ATPModule` (parameters ``fc1``, ``fc2``). ``features="stats+cls"`` (an option of this port, off by default:
    the paper's MLP inputs are not public) also feeds the MLP the class token after this block's attention,
    standardised over its ``dim`` channels and detached, so the threshold can depend on what the image shows and
    not only on five pooled score statistics, which barely vary between images (docs/training.md).

    * ``train=True``: every token stays; the identity step with ``size_scale = max(m, 1e-6)`` (the clamp in the
      forward pass only) gates them through proportional attention in the later blocks, where
      ``m = soft_keep_mask(score, theta, temperature)`` (with ``straight_through``: the hard 0/1 keep set in the
      forward pass, the soft mask's gradient). ``aux``: ``loss = budget_weight * budget``, with ``budget`` the
      candidate-normalised :func:`reduction.atp.budget_loss` ``|mean kept fraction - target_keep|`` (``"abs"``) or
      its square (``"square"``); ``theta`` and ``kept_ratio`` (soft kept fraction of the candidates), ``[B]``.
    * ``train=False``: keep ``score > theta`` plus the forced tokens, compacted to the static capacity
      ``keep_count(T, capacity_ratio, protected=num_protected)`` (:func:`reduction.atp.threshold_prune_step`;
      ``valid`` marks the slots of images that keep fewer). ``aux``: ``loss = 0``, ``theta``, ``kept_ratio`` (kept
      candidates / candidates) and ``kept_tokens`` (valid tokens, prefix included), ``[B]`` each.
    """

    needs: ClassVar[frozenset] = frozenset({ATTENTION})
    position: ClassVar[str] = "after_attention"
    prop_attn: ClassVar[bool] = True      # the soft gate reaches the later blocks through log(sizes)

    def __init__(self, *, capacity_ratio: float, stride: int = 4, hidden: int = 16, temperature: float = 10.0,
                 init_theta: float = 0.3, self_weight: float = 0.5, straight_through: bool = False,
                 target_keep: float = 0.5, budget_weight: float = 1.0, budget_kind: str = "abs",
                 features: str = "stats", dim: Optional[int] = None, rngs: nnx.Rngs):
        self.capacity_ratio = float(check_ratio(capacity_ratio, "capacity_ratio"))
        if features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
        if features == "stats+cls" and (dim is None or int(dim) < 1):
            raise ValueError("features='stats+cls' needs dim (the token width) >= 1")
        self.features_kind = str(features)
        n_in = 5 + (int(dim) if features == "stats+cls" else 0)
        self.stride = int(check_count(stride, "stride"))
        if not 0.0 < float(init_theta) < 1.0:
            raise ValueError(f"init_theta must be in (0, 1), got {init_theta}")
        if not 0.0 <= float(self_weight) <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
        if not 0.0 < float(target_keep) <= 1.0:
            raise ValueError(f"target_keep must be in (0, 1], got {target_keep}")
        if float(budget_weight) < 0:
            raise ValueError(f"budget_weight must be >= 0, got {budget_weight}")
        if budget_kind not in ("abs", "square"):
            raise ValueError(f"budget_kind must be 'abs' or 'square', got {budget_kind!r}")
        self.temperature = float(temperature)
        self.self_weight = float(self_weight)
        self.straight_through = bool(straight_through)
        self.target_keep = float(target_keep)
        self.budget_weight = float(budget_weight)
        self.budget_kind = str(budget_kind)
        self.fc1 = nnx.Linear(n_in, int(hidden), rngs=rngs)
        self.fc2 = nnx.Linear(int(hidden), 1, kernel_init=nnx.initializers.zeros_init(),
                              bias_init=nnx.initializers.constant(float(np.log(init_theta / (1 - init_theta)))),
                              rngs=rngs)

    features = ATPModule.features

    def threshold(self, score, self_received, cross_received, candidates, cls=None):
        """``theta [B]`` in (0, 1). ``cls [B, C]``: the class token after this block's attention (used by
        ``features="stats+cls"``, standardised over channels and detached)."""
        f = self.features(score, self_received, cross_received, candidates)
        if self.features_kind == "stats+cls":
            if cls is None:
                raise ValueError("features='stats+cls' needs the class token")
            z = jax.lax.stop_gradient(cls.astype(jnp.float32))
            z = (z - jnp.mean(z, -1, keepdims=True)) / jnp.sqrt(jnp.var(z, -1, keepdims=True) + 1e-6)
            f = jnp.concatenate([f, z], axis=-1)
        return jax.nn.sigmoid(self.fc2(jax.nn.gelu(self.fc1(f)))[:, 0])

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return keep_count(num_tokens, self.capacity_ratio, protected=info.num_protected)

    def train_num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return flops_lib.attention_score_flops(num_tokens + 1, num_tokens, heads)

    def __call__(self, state: TokenState, info: LayerInfo, *, train: bool) -> tuple[TokenState, dict]:
        probs = info.require(ATTENTION, "LearnedATP")
        p = info.num_protected
        if p < 1:
            raise ValueError("LearnedATP needs a class token (token 0 is the cross-score query): num_protected >= 1")
        b, t = state.x.shape[:2]
        cand = jnp.broadcast_to(jnp.arange(t) >= p, (b, t))
        if state.valid is not None:
            cand = cand & state.valid
        self_r, cross_r, score = atp.vit_atp_inputs(probs, cand, self_weight=self.self_weight)
        theta = self.threshold(score, self_r, cross_r, cand, state.x[:, 0])
        grid = jnp.asarray(atp.patch_grid_mask(t, p, self.stride)) & cand
        n_ex = jnp.sum(cand, axis=-1).astype(jnp.float32)                      # [B] candidates per example
        if train:
            m = atp.soft_keep_mask(score, theta, temperature=self.temperature, forced=grid, candidates=cand)
            if self.straight_through:
                hard = atp.hard_keep_mask(score, theta, forced=grid, candidates=cand).astype(jnp.float32)
                m = hard + (m - jax.lax.stop_gradient(m))          # forward value exactly the 0/1 set
            # Clamp to 1e-6 in the forward pass only: the gradient still reaches m where the clamp is active (the
            # straight-through 0s), and d(attention)/dm stays finite, as in a mask applied inside the softmax.
            gate = m + jax.lax.stop_gradient(jnp.maximum(m, 1e-6) - m)
            step = dataclasses.replace(identity_step(b, t), size_scale=gate)
            n = jnp.maximum(jnp.mean(n_ex), 1.0)
            budget = atp.budget_loss(m, self.target_keep * n, candidates=cand, kind=self.budget_kind)
            budget = budget / (n if self.budget_kind == "abs" else n * n)
            kept = jnp.sum(jnp.where(cand, m, 0.0), axis=-1) / jnp.maximum(n_ex, 1.0)
            return apply_step(state, step), {"loss": self.budget_weight * budget, "budget": budget,
                                             "theta": theta, "kept_ratio": kept}
        forced = (jnp.arange(t) < p) | grid
        step = atp.threshold_prune_step(score, theta, forced=forced, capacity=self.num_out(t, info),
                                        valid=state.valid)
        state = apply_step(state, step)
        kept = jnp.sum(state.valid, axis=-1).astype(jnp.float32)
        kept_cand = jnp.sum(state.valid & (step.anchor >= p), axis=-1).astype(jnp.float32)  # anchor: input positions
        return state, {"loss": jnp.zeros((), jnp.float32), "theta": theta,
                       "kept_ratio": kept_cand / jnp.maximum(n_ex, 1.0), "kept_tokens": kept}


class HoTRecovery(LearnedReducer):
    """HoT's token recovering attention (TRA; Li et al., CVPR 2024): restore one token per original patch from the
    pruned tokens with a learned cross-attention, so a dense head gets ``N`` outputs (see :mod:`reduction.hot`).

    ``state.x: [B, T, C] -> [B, P + N, C]`` (``P = info.num_protected`` prefix tokens pass through unchanged,
    ``N = num_patches``). With learned queries ``Q0: [N, C]`` (one per original position; zeros at init as in the
    official code) and, with ``pos="sincos"``, the fixed code ``E = reduction.hot.sincos_2d`` of the patch grid::

        q_in = Q0 + E(0..N-1)                      # [N, C] queries, the same for every example
        kv   = x + E(positions - P)                # [B, T, C] every current token (prefix: zero code)
        out  = q_in + proj(MHA(q=W_q q_in, k=W_k kv, v=W_v kv))        # H heads, scale Dh^-0.5, keys masked by valid

    ``pos="none"`` drops both codes (the official TRA: the queries alone carry position). ``norm=True`` (**GUESS**,
    off by default as in the official code) applies a LayerNorm to the tokens before the keys and values. Linear layers with bias
    (the official ``qkv_bias=True``), no norm or MLP around it. The new state is a fresh full-length state (sizes 1,
    positions ``0..P+N-1``, no validity mask, an identity ``source`` when tracked): no token moves, so it is not an
    :func:`apply_step`; ``reduction.unmerge`` with that source is the identity. Training and inference are the same
    computation (``aux["loss"] = 0``: the dense task's loss trains it).

    **GUESS** (not in the official code): the sine-cosine codes on the queries and on the kept tokens' original
    positions (the official code adds a learned per-slot embedding right after pruning instead, and no position code
    at recovery), and running at a block's ``after_attention`` point, so that block's MLP (with its residual) still
    refines the recovered tokens (the official TRA comes after the last block, right before the head's LayerNorm).
    """

    needs: ClassVar[frozenset] = frozenset()
    position: ClassVar[str] = "after_attention"
    prop_attn: ClassVar[bool] = False

    def __init__(self, *, num_patches: int, dim: int, grid: Optional[tuple] = None, heads: int = 4,
                 pos: str = "sincos", norm: bool = False, rngs: nnx.Rngs):
        self.num_patches = check_count(num_patches, "num_patches", allow_zero=False)
        self.dim = check_count(dim, "dim", allow_zero=False)
        self.heads = check_count(heads, "heads", allow_zero=False)
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if pos not in ("sincos", "none"):
            raise ValueError(f"pos must be 'sincos' or 'none', got {pos!r}")
        if grid is None:
            side = int(round(self.num_patches ** 0.5))
            grid = (side, side)
        self.grid = (int(grid[0]), int(grid[1]))
        if self.grid[0] * self.grid[1] != self.num_patches:
            raise ValueError(f"grid {self.grid} does not hold num_patches={self.num_patches}")
        if pos == "sincos" and self.dim % 4:
            raise ValueError(f"pos='sincos' needs dim divisible by 4, got {self.dim}")
        self.pos = pos
        self.kv_norm = nnx.LayerNorm(self.dim, epsilon=1e-6, rngs=rngs) if norm else None   # GUESS option, off
        self.queries = nnx.Param(jnp.zeros((1, self.num_patches, self.dim), jnp.float32))
        self.q = nnx.Linear(self.dim, self.dim, rngs=rngs)
        self.k = nnx.Linear(self.dim, self.dim, rngs=rngs)
        self.v = nnx.Linear(self.dim, self.dim, rngs=rngs)
        self.proj = nnx.Linear(self.dim, self.dim, rngs=rngs)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return info.num_protected + self.num_patches

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        n, t, c = self.num_patches, num_tokens, self.dim
        return 2 * (n * c * c + 2 * t * c * c + 2 * n * t * c + n * c * c)

    def recover(self, x: jax.Array, positions: jax.Array, valid: Optional[jax.Array], num_protected: int):
        """``x: [B, T, C]`` (positions ``[B, T]``, ``valid [B, T]`` or ``None``) -> ``[B, N, C]`` recovered patches."""
        from reduction.hot import sincos_2d

        check_rank(x, 3, "x")
        b, t, c = x.shape
        if c != self.dim:
            raise ValueError(f"HoTRecovery was built for dim={self.dim}, tokens have C={c}")
        dtype = x.dtype
        q_in = jnp.broadcast_to(self.queries[...], (b, self.num_patches, c)).astype(jnp.float32)
        kv = x.astype(jnp.float32) if self.kv_norm is None else self.kv_norm(x.astype(jnp.float32))
        if self.pos == "sincos":
            q_in = q_in + sincos_2d(jnp.arange(self.num_patches), self.grid, c)[None]
            kv = kv + sincos_2d(positions - num_protected, self.grid, c)
        h, dh = self.heads, c // self.heads
        q = self.q(q_in.astype(dtype)).reshape(b, self.num_patches, h, dh).astype(jnp.float32)
        k = self.k(kv.astype(dtype)).reshape(b, t, h, dh).astype(jnp.float32)
        v = self.v(kv.astype(dtype)).reshape(b, t, h, dh).astype(jnp.float32)
        logits = jnp.einsum("bnhd,bthd->bhnt", q, k) * (dh ** -0.5)
        if valid is not None:
            logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhnt,bthd->bnhd", probs, v).reshape(b, self.num_patches, c)
        return (q_in + self.proj(y.astype(dtype)).astype(jnp.float32)).astype(dtype)

    def __call__(self, state: TokenState, info: LayerInfo, *, train: bool) -> tuple[TokenState, dict]:
        del train                                    # the same computation in both modes
        p = info.num_protected
        b = state.x.shape[0]
        rec = self.recover(state.x, state.positions, state.valid, p)
        x = jnp.concatenate([state.x[:, :p], rec], axis=1)
        n = p + self.num_patches
        if state.source is not None and state.source.shape[1] != n:
            raise ValueError(f"HoTRecovery restores {n} tokens (prefix {p} + {self.num_patches} patches) but the "
                             f"state tracks {state.source.shape[1]} original tokens")
        ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        out = TokenState(x=x, sizes=jnp.ones((b, n), jnp.float32), positions=ids, valid=None,
                         source=None if state.source is None else ids)
        return out, {"loss": jnp.zeros((), jnp.float32)}


__all__ = ["ATPModule", "LearnedReducer", "LearnedATP", "HoTRecovery", "DeleteGateModule"]


class DeleteGateModule(LearnedReducer):
    """MrT5-style learned delete gate in the LLM (see :mod:`reduction.delete_gate` for the method, its contracts and
    its guesses). Parameters: ``gate`` (``nnx.Linear(dim, 1)``, kernel zeros, bias ``init_bias``).

    * ``train=True``: every token stays; the identity step with ``size_scale = exp(G)`` on the candidates
      (:func:`reduction.delete_gate.soft_delete_step`), so the later layers add ``G`` to the candidates' key logits.
      ``aux``: ``loss = weight * deletion_loss``, ``deletion`` (the loss before the weight), ``deleted_soft`` and
      ``deleted_hard`` (per-example deleted fractions of the candidates, soft ``G / scale`` and hard
      ``G <= threshold``), ``[B]``.
    * ``train=False``: hard deletion to the static capacity :meth:`num_out`
      (:func:`reduction.delete_gate.hard_delete_step`). ``aux``: ``loss = 0``, ``deleted_hard`` (the threshold's
      choice) and ``deleted`` (the candidates actually removed, capacity included), ``kept_tokens``.
    """

    needs: ClassVar[frozenset] = frozenset({"hidden"})
    prop_attn: ClassVar[bool] = True

    def __init__(self, *, dim: int, side: str = "image", scale: float = -30.0, threshold: float = -15.0,
                 keep_ratio: float = 0.75, keep: Optional[int] = None, target: float = 0.5, weight: float = 10.0,
                 init_bias: float = 2.0, protect_last: int = 1, rngs: nnx.Rngs):
        from reduction import delete_gate as dg

        dg.check_options(side, scale, threshold, keep_ratio, keep, target, weight, protect_last)
        self.decl = dg.DeleteGate(side=str(side), scale=float(scale), threshold=float(threshold),
                                  keep_ratio=float(keep_ratio), keep=None if keep is None else int(keep),
                                  target=float(target), weight=float(weight), init_bias=float(init_bias),
                                  protect_last=int(protect_last))
        self.gate = nnx.Linear(check_count(dim, "dim", allow_zero=False), 1,
                               kernel_init=nnx.initializers.zeros_init(),
                               bias_init=nnx.initializers.constant(float(init_bias)), rngs=rngs)

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return self.decl.num_out(num_tokens, info)

    def train_num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return num_tokens

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        return self.decl.flops(num_tokens, dim=dim, heads=heads)

    def gates(self, hidden: jax.Array) -> jax.Array:
        """``hidden [B, T, C] -> G [B, T]`` (:func:`reduction.delete_gate.gate_values`)."""
        from reduction import delete_gate as dg

        return dg.gate_values(hidden, self.gate.kernel[...][:, 0], self.gate.bias[...][0], scale=self.decl.scale)

    def __call__(self, state: TokenState, info: LayerInfo, *, train: bool) -> tuple[TokenState, dict]:
        from reduction import delete_gate as dg

        d = self.decl
        hidden = info.require("hidden", "delete_gate")
        if not info.in_spans or info.image_starts is None:
            raise ValueError("delete_gate runs inside the LLM (it needs the image span: info.image_starts, image_len)")
        t = state.num_tokens
        cand = dg.candidate_mask(t, side=d.side, image_starts=info.image_starts, image_len=info.image_len,
                                 valid=state.valid, protect_last=d.protect_last)
        g = self.gates(hidden)
        hard = dg.deletion_fraction(g, cand, scale=d.scale, threshold=d.threshold)
        if train:
            loss = dg.deletion_loss(g, cand, scale=d.scale, target=d.target)
            return apply_step(state, dg.soft_delete_step(g, cand)), {
                "loss": d.weight * loss, "deletion": loss, "deleted_soft": dg.deletion_fraction(g, cand, scale=d.scale),
                "deleted_hard": hard}
        step = dg.hard_delete_step(g, cand, threshold=d.threshold, capacity=self.num_out(t, info), valid=state.valid)
        out = apply_step(state, step)
        n_c = jnp.maximum(jnp.sum(cand, axis=-1), 1).astype(jnp.float32)
        kept_c = jnp.sum(jnp.take_along_axis(cand, step.anchor, axis=1) & out.valid, axis=-1).astype(jnp.float32)
        return out, {"loss": jnp.zeros((), jnp.float32), "deleted_hard": hard, "deleted": 1.0 - kept_c / n_c,
                     "kept_tokens": jnp.sum(out.valid, axis=-1).astype(jnp.float32)}
