"""A Llama-family decoder-only LM in Flax NNX, with an in-LLM token-pruning hook and a per-layer KV cache.

Pieces: RMSNorm, the shared :class:`models.layers.Attention` (separate ``q/k/v/o_proj`` projections, grouped-query
heads, rotary position embeddings in Hugging Face's ``rotate_half`` layout, so HF weights load as they are), the
shared :class:`models.layers.Mlp` in its SwiGLU layout, tied or untied LM head. ``rope_cos_sin``, ``apply_rope``
and ``explicit_attention`` live in :mod:`models.layers` and are re-exported here.

Position ids are explicit inputs: a pruned sequence keeps its original positions (with gaps), and
left-padded batches count positions from each example's first real token.

Token reduction inside the LLM: the same :class:`reduction.Reducer` objects as everywhere, one (or ``None``) per
layer. The reducer of layer ``K`` runs during prefill just before layer ``K``, on what layer ``K - 1`` produced
(its output hidden states through the final norm, its post-RoPE keys, its attention probabilities or only the
last prompt queries' rows) and the image spans; :func:`reduction.apply_step` moves the tokens, and every later
layer (and its KV cache) holds only the kept tokens. Several layers may reduce (staged pruning).

A reducer with ``prop_attn`` (the learned delete gate's soft mode, whose identity step scales the token sizes by
``exp(G)``) turns on a key bias ``log(sizes)`` in every later layer, so later attention sees ``+G`` on those keys.

Attention uses ``jax.nn.dot_product_attention`` everywhere except in a layer whose outputs a reducer reads as
probabilities; there they are computed explicitly, for the last ``reducer.text_rows`` queries only when the
reducer reads text attention (FastV reads one row). A reducer that reads ``LAYER_ATTENTION`` gets the rows of the layer
it runs before, computed on that layer's input (PyramidDrop's next-layer score).

Dimension vocabulary: B batch, T current tokens, N original tokens, C channels (``dim``), H query heads,
G key/value heads, D head dim, V vocabulary, K kept tokens, S cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models.kv_cache import KVCache, LayerCache, append, layer_cache_from_prefill
from models.layers import DEFAULT_INIT, Attention, Mlp, apply_rope, explicit_attention, rope_cos_sin
from reduction.reducers import (ATTENTION, HIDDEN, KEYS, LAYER_ATTENTION, TEXT_ATTENTION, LayerInfo, Reducer,
                                tokens_per_layer)
from reduction.state import init_state
from reduction.validate import check_count, check_rank


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static shape of the LM. ``head_dim`` defaults to ``dim // num_heads``.

    ``dtype`` is the compute dtype of the projections and the embedding; ``param_dtype`` the storage dtype of
    every parameter (norm scales included). The default keeps float32 parameters whatever ``dtype`` is; a
    bfloat16 checkpoint load sets both to ``jnp.bfloat16``. ``attn_implementation``: the fused attention kernel
    (:func:`models.layers.choose_implementation`; ``None``: cuDNN on a GPU where it accepts the operands, else XLA).
    """

    vocab_size: int = 32000
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    mlp_dim: int = 11008
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: Optional[str] = None

    @property
    def dh(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


# -- layers --------------------------------------------------------------------------------------------


def decoder_layer_flops(cfg: LlamaConfig, num_tokens):
    """FLOPs (2 x MACs) of one decoder layer on ``num_tokens`` tokens: the q/k/v/o projections, causal attention
    counted in full (as the dense kernels compute it) and the SwiGLU MLP. ``num_tokens``: an int, or an integer
    array (elementwise)."""
    t = num_tokens
    qdim, kvdim = cfg.num_heads * cfg.dh, cfg.num_kv_heads * cfg.dh
    return 2 * t * cfg.dim * (2 * qdim + 2 * kvdim) + 4 * t * t * qdim + 6 * t * cfg.dim * cfg.mlp_dim


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` computed in float32, cast back to ``x.dtype`` before the scale (as HF does)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def _linear(din: int, dout: int, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def attention(cfg: LlamaConfig, *, rngs: nnx.Rngs) -> Attention:
    """Llama's attention: the shared :class:`models.layers.Attention` with separate ``q/k/v/o_proj`` projections,
    ``num_kv_heads`` grouped heads, no biases and RoPE."""
    return Attention(cfg.dim, cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.dh, fused_qkv=False,
                     qkv_bias=False, out_bias=False, rope_theta=cfg.rope_theta, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, kernel_init=DEFAULT_INIT, implementation=cfg.attn_implementation,
                     rngs=rngs)


def mlp(cfg: LlamaConfig, *, rngs: nnx.Rngs) -> Mlp:
    """SwiGLU ``down_proj(silu(gate_proj(x)) * up_proj(x))``: the shared :class:`models.layers.Mlp`, no biases."""
    return Mlp(cfg.dim, cfg.mlp_dim, act="swiglu", bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               kernel_init=DEFAULT_INIT, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.self_attn = attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.mlp = mlp(cfg, rngs=rngs)

    def prefill(self, x: jax.Array, positions: jax.Array, mask: jax.Array, *, probs: str = "none",
                rows: Optional[int] = None, bias: Optional[jax.Array] = None):
        """``x: [B, T, C]``, ``mask: [B, 1, T, T]`` bool -> ``(y [B, T, C], k, v [B, T, G, D], p)``.
        ``bias``: an optional additive key bias ``[B, 1, 1, T]`` (the log token sizes after a ``prop_attn`` reducer).

        ``probs``: ``"none"`` (fused attention, ``p = None``), ``"rows"`` (fused attention plus explicit
        probabilities of the last ``rows`` queries) or ``"all"`` (explicit attention, ``p: [B, H, T, T]``).
        """
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        o, p = self.self_attn.attend(q, k, v, mask=mask, bias=bias, probs=probs, rows=rows)
        x = x + self.self_attn.out(o)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v, p

    def attention_rows(self, x: jax.Array, positions: jax.Array, mask: jax.Array, rows: int) -> jax.Array:
        """This block's attention probabilities of the last ``rows`` queries on its input ``x: [B, T, C]``,
        without running the block: ``-> [B, H, rows, T]`` float32 (``mask: [B, 1, T, T]`` as in :meth:`prefill`).
        Only the keys of every token and the queries of the last ``rows`` are projected."""
        attn = self.self_attn
        h, g, dh = attn.heads, attn.num_kv_heads, attn.head_dim
        b, t, _ = x.shape
        xn = self.input_layernorm(x)
        q = attn.q_proj(xn[:, -rows:]).reshape(b, rows, h, dh)
        k = attn.k_proj(xn).reshape(b, t, g, dh)
        cos, sin = rope_cos_sin(positions, dh, attn.rope_theta)
        q = apply_rope(q, cos[:, -rows:], sin[:, -rows:])
        k = jnp.repeat(apply_rope(k, cos, sin), h // g, axis=2)
        logits = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), k.astype(jnp.float32)) * (dh ** -0.5)
        logits = jnp.where(mask[:, :, -rows:], logits, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits, axis=-1)

    def decode(self, x: jax.Array, positions: jax.Array, cache: LayerCache):
        """One token per example: ``x: [B, 1, C]``, ``positions: [B, 1]`` -> ``(y [B, 1, C], cache)``."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        cache = append(cache, k, v)
        o, _ = self.self_attn.attend(q, cache.k, cache.v, mask=cache.valid[:, None, None, :])
        x = x + self.self_attn.out(o)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


def _is_bound_learned(red) -> bool:
    """A model's binding of a learned reducer (:class:`models.vit._Bound`): it carries the module it runs."""
    from reduction.nnx import LearnedReducer

    return isinstance(getattr(red, "module", None), LearnedReducer)


def prefill_mask(valid: jax.Array) -> jax.Array:
    """``valid: [B, T]`` -> ``[B, 1, T, T]`` bool: causal by sequence index, invalid keys masked, and the
    diagonal always allowed so padded queries never see an empty row. Sequence order is position order
    (pruning keeps the original order), so this equals the sub-block of the unpruned causal mask."""
    t = valid.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & valid[:, None, :]
    mask = mask | jnp.eye(t, dtype=bool)[None]
    return mask[:, None]


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Left-padding positions: ``cumsum(valid) - 1`` clipped at 0 (HF generate's rule). ``[B, T] -> [B, T]``."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


class Llama(nnx.Module):
    """The decoder LM. ``Llama(cfg, rngs=nnx.Rngs(0))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

    # -- pieces ---------------------------------------------------------------------------------------

    def embed(self, ids: jax.Array) -> jax.Array:
        """``ids: [B, T]`` int -> ``[B, T, C]``."""
        return self.embed_tokens(ids)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm + LM head: ``[..., C] -> [..., V]`` float32."""
        h = self.norm(h)
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return out.astype(jnp.float32)

    # -- prefill ----------------------------------------------------------------------------------------

    def _reducers(self, reducers) -> tuple:
        n = self.cfg.num_layers
        if reducers is None:
            return (None,) * n
        reducers = tuple(reducers)
        if len(reducers) != n:
            raise ValueError(f"reducers has {len(reducers)} entries but the LLM has {n} layers")
        if reducers[0] is not None:
            raise ValueError("a reducer in the LLM acts before layer K >= 1 (on layer K - 1's outputs), not at layer 0")
        for i, red in enumerate(reducers):
            if red is not None and not isinstance(red, Reducer) and not _is_bound_learned(red):
                raise ValueError(f"reducers[{i}] must be a reduction.Reducer or None, got {type(red).__name__}")
        return reducers

    def tokens_per_layer(self, num_tokens: int, reducers=None, *, image_len: int = 0, num_images: int = 1) -> list[int]:
        """Static tokens each layer runs on (its KV cache length) under ``reducers``."""
        counts = tokens_per_layer(num_tokens, self._reducers(reducers), num_protected=0, image_len=image_len,
                                  num_images=num_images)
        return [a for a, _ in counts]

    def prefill_flops(self, num_tokens: int, reducers=None, *, image_len: int = 0, num_images: int = 1,
                      logits_tokens: int = 1) -> int:
        """Analytic prefill FLOPs (2 x MACs) of ``num_tokens`` prompt tokens under ``reducers``: every layer at its
        static token count (causal attention counted in full, as the dense kernels compute it), the reducers' own
        cost, and the LM head on ``logits_tokens`` positions."""
        cfg = self.cfg
        reducers = self._reducers(reducers)
        counts = self.tokens_per_layer(num_tokens, reducers, image_len=image_len, num_images=num_images)
        total = 0
        prev = num_tokens
        for t, red in zip(counts, reducers):
            if red is not None:
                total += int(red.flops(prev, dim=cfg.dim, heads=cfg.num_heads))
            total += decoder_layer_flops(cfg, t)
            prev = t
        return int(total + 2 * logits_tokens * cfg.dim * cfg.vocab_size)

    def decode_flops(self, cache_lengths) -> int:
        """Analytic FLOPs of one decoded token per example whose layer ``l`` attends over ``cache_lengths[l]``
        entries (the head included)."""
        cfg = self.cfg
        qdim, kvdim = cfg.num_heads * cfg.dh, cfg.num_kv_heads * cfg.dh
        per_layer = 2 * cfg.dim * (2 * qdim + 2 * kvdim) + 6 * cfg.dim * cfg.mlp_dim
        return int(sum(per_layer + 4 * int(s) * qdim for s in cache_lengths) + 2 * cfg.dim * cfg.vocab_size)

    def kv_cache_bytes(self, cache_lengths, dtype=None) -> int:
        """Bytes of the K and V caches per example for per-layer lengths ``cache_lengths``."""
        cfg = self.cfg
        itemsize = jnp.dtype(dtype or cfg.dtype or jnp.float32).itemsize
        return int(sum(2 * int(s) * cfg.num_kv_heads * cfg.dh * itemsize for s in cache_lengths))

    def prefill_embeds(self, x: jax.Array, positions: jax.Array, valid: jax.Array, *, reducers=None,
                       image_starts: Optional[jax.Array] = None, image_len: int = 0, rng: Optional[jax.Array] = None):
        """Run all layers on ``x: [B, N, C]`` with ``positions, valid: [B, N]``.

        ``reducers``: one :class:`reduction.Reducer` (or ``None``) per layer, static. The reducer of layer ``K``
        (``K >= 1``) runs before layer ``K`` and sees layer ``K - 1``'s outputs: the hidden states through the final
        norm (``HIDDEN``), its post-RoPE keys with the KV heads repeated (``KEYS``), its attention probabilities
        (``ATTENTION``: all rows, explicit attention in that layer) or the rows of the last ``reducer.text_rows``
        queries (``TEXT_ATTENTION``); or layer ``K``'s own attention rows of those queries on its input, computed
        before any token moves (``LAYER_ATTENTION``, PyramidDrop's score; :meth:`Block.attention_rows`); and the image spans (``image_starts [B]`` or ``[B, M]``, static
        ``image_len``). Kept tokens keep their original position ids.

        Returns ``(h [B, K, C], kv, aux)``: the final hidden states (before the final norm) of the ``K``
        tokens left after reduction, ``kv`` a list of per-layer ``(k, v, valid)`` with ``k, v: [B, T_l, G, D]``,
        and ``aux`` with ``positions``/``valid`` ``[B, K]`` and ``tokens_per_layer`` (static list of ``T_l``).
        """
        check_rank(x, 3, "x")
        cfg = self.cfg
        reducers = self._reducers(reducers)
        num_images = 1
        if any(r is not None for r in reducers):
            if image_starts is None:
                raise ValueError("image_starts is required when the LLM has reducers")
            check_count(image_len, "image_len", allow_zero=False)
            num_images = 1 if image_starts.ndim == 1 else image_starts.shape[1]
        state = init_state(x, valid=valid, positions=positions)
        kv, counts = [], []
        prev_keys = prev_probs = None
        key_bias = False            # after a prop_attn reducer: log(sizes) is a key bias in every later layer
        for layer, block in enumerate(self.layers):
            red = reducers[layer]
            if red is not None:
                info = LayerInfo(
                    layer=layer, num_layers=cfg.num_layers, num_protected=0,
                    hidden=self.norm(state.x) if HIDDEN in red.needs else None,
                    keys=prev_keys if KEYS in red.needs else None,
                    attention=prev_probs if ATTENTION in red.needs else None,
                    text_attention=prev_probs if TEXT_ATTENTION in red.needs else None,
                    layer_attention=(block.attention_rows(state.x, state.positions, prefill_mask(state.valid),
                                                          min(red.text_rows, state.num_tokens))
                                     if LAYER_ATTENTION in red.needs else None),
                    image_starts=image_starts, image_len=image_len, num_images=num_images,
                    rng=None if rng is None else jax.random.fold_in(rng, layer))
                t_in = state.num_tokens
                state = red(state, info)
                key_bias = key_bias or bool(red.prop_attn)
                # span methods keep every text token, so each image span shrinks by the same static count
                removed = (t_in - state.num_tokens) // num_images
                image_len -= removed
                if image_starts.ndim == 2:
                    image_starts = image_starts - removed * jnp.arange(num_images, dtype=image_starts.dtype)[None]
            nxt = reducers[layer + 1] if layer + 1 < cfg.num_layers else None
            probs, rows = "none", None
            if nxt is not None and ATTENTION in nxt.needs:
                probs = "all"
            elif nxt is not None and TEXT_ATTENTION in nxt.needs:
                probs, rows = "rows", min(nxt.text_rows, state.num_tokens)
            bias = jnp.log(state.sizes.astype(jnp.float32))[:, None, None, :] if key_bias else None
            h, k, v, p = block.prefill(state.x, state.positions, prefill_mask(state.valid), probs=probs, rows=rows,
                                       bias=bias)
            prev_probs = p
            prev_keys = None
            if nxt is not None and KEYS in nxt.needs:
                prev_keys = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2).reshape(k.shape[0], k.shape[1], cfg.num_heads * k.shape[3])
            kv.append((k, v, state.valid))
            counts.append(state.num_tokens)
            state = state.replace(x=h)
        aux = dict(positions=state.positions, valid=state.valid, tokens_per_layer=counts)
        return state.x, kv, aux

    def __call__(self, ids: jax.Array, *, positions: Optional[jax.Array] = None, valid: Optional[jax.Array] = None,
                 reducers=None, image_starts: Optional[jax.Array] = None, image_len: int = 0):
        """Full forward for scoring: ``ids: [B, N]`` -> ``(logits [B, K, V] float32, aux)``."""
        check_rank(ids, 2, "ids")
        valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
        positions = positions_from_valid(valid) if positions is None else positions
        h, _, aux = self.prefill_embeds(self.embed(ids), positions, valid, reducers=reducers,
                                        image_starts=image_starts, image_len=image_len)
        return self.logits(h), aux

    # -- generation pieces ------------------------------------------------------------------------------

    def prefill_cache(self, x: jax.Array, positions: jax.Array, valid: jax.Array, *, extra: int,
                      reducers=None, image_starts: Optional[jax.Array] = None,
                      image_len: int = 0, rng: Optional[jax.Array] = None):
        """Prefill for generation: ``(last_logits [B, V], cache, aux)``; each layer's cache gets ``extra``
        free slots. The next position is ``max(positions of valid tokens) + 1`` per example, i.e. it continues
        from the original, unpruned prompt length."""
        extra = check_count(extra, "extra")
        h, kv, aux = self.prefill_embeds(x, positions, valid, reducers=reducers, image_starts=image_starts,
                                         image_len=image_len, rng=rng)
        layers = tuple(layer_cache_from_prefill(k, v, m, extra) for k, v, m in kv)
        next_pos = jnp.max(jnp.where(valid, positions, -1), axis=1).astype(jnp.int32) + 1
        return self.logits(h[:, -1]), KVCache(layers=layers, next_position=next_pos), aux

    def decode_step(self, tokens: jax.Array, cache: KVCache):
        """``tokens: [B]`` int -> ``(logits [B, V], cache)`` with every layer's cache advanced by one slot."""
        x = self.embed(tokens[:, None])
        pos = cache.next_position[:, None]
        new_layers = []
        for block, lc in zip(self.layers, cache.layers):
            x, lc = block.decode(x, pos, lc)
            new_layers.append(lc)
        return self.logits(x[:, 0]), KVCache(layers=tuple(new_layers), next_position=cache.next_position + 1)


__all__ = [
    "LlamaConfig", "Llama", "Block", "Attention", "Mlp", "attention", "mlp", "RMSNorm",
    "rope_cos_sin", "apply_rope", "explicit_attention", "prefill_mask", "positions_from_valid",
]
