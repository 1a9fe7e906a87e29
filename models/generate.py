"""Batched generation with a KV cache: jitted prefill, a decode step compiled once, greedy or sampling.

``generate_from_embeds`` is the core (the VLM calls it with image-and-text embeddings), built from the two
steps a caller can also drive itself (to time decoding, stream tokens): ``start_decoding`` (prefill + first
token) and ``decode_next`` (one compiled step);
``generate`` is the text-only convenience around it. Batches are left-padded: ``valid [B, N]`` marks
real tokens and positions count from each example's first real token, so a batched run equals running
each example alone. Every example stops at its own stop tokens; after stopping it emits ``pad_id``.

Dimension vocabulary: B batch, N prompt tokens, C channels, V vocabulary, R new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache
from models.llama import Llama, positions_from_valid
from reduction.validate import check_count, check_rank


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """``logits: [B, V]`` -> ``tokens [B]`` int32 (greedy, or temperature / top-k / top-p sampling)."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        drop_sorted = before >= sampling.top_p       # the top token always survives (before = 0)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def stop_table(stop_tokens, batch: int) -> jax.Array:
    """Normalise stop tokens to ``[B, S]`` int32 (``-1`` = unused): ``None``, one list shared by all examples,
    or one list per example (ragged lists are padded)."""
    if stop_tokens is None:
        return jnp.full((batch, 1), -1, jnp.int32)
    arr = stop_tokens
    if isinstance(stop_tokens, (list, tuple)) and stop_tokens and isinstance(stop_tokens[0], (list, tuple)):
        if len(stop_tokens) != batch:
            raise ValueError(f"stop_tokens has {len(stop_tokens)} rows for batch {batch}")
        width = max(1, max(len(s) for s in stop_tokens))
        arr = np.full((batch, width), -1, np.int32)
        for i, s in enumerate(stop_tokens):
            arr[i, : len(s)] = s
    arr = jnp.asarray(arr, jnp.int32)
    if arr.ndim == 1:
        arr = jnp.broadcast_to(arr, (batch, arr.shape[0]))
    if arr.ndim != 2 or arr.shape[0] != batch:
        raise ValueError(f"stop_tokens must be a list or a [B, S] array, got shape {arr.shape}")
    return arr


# Trace counters so tests can prove the decode step compiles once.
TRACE_COUNTS = {"prefill": 0, "decode": 0}


@functools.partial(jax.jit, static_argnames=("graphdef", "extra", "reducers", "image_len", "sampling"))
def _prefill(graphdef, params, x, positions, valid, image_starts, rng, *, extra, reducers, image_len, sampling):
    TRACE_COUNTS["prefill"] += 1
    lm = nnx.merge(graphdef, params)
    rng, sub, prune_rng = jax.random.split(rng, 3)
    logits, cache, aux = lm.prefill_cache(x, positions, valid, extra=extra, reducers=reducers,
                                          image_starts=image_starts, image_len=image_len, rng=prune_rng)
    return sample_logits(logits, sub, sampling), cache, rng, aux["valid"].sum(axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _decode(graphdef, params, cache: KVCache, tokens, done, stops, rng, pad_id, *, sampling):
    TRACE_COUNTS["decode"] += 1
    lm = nnx.merge(graphdef, params)
    logits, cache = lm.decode_step(tokens, cache)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits, sub, sampling)
    nxt = jnp.where(done, pad_id, nxt)
    done = done | jnp.any(nxt[:, None] == stops, axis=1)
    return nxt, cache, done, rng


@dataclasses.dataclass
class DecodeState:
    """The running state of batched decoding: the last sampled ``tokens [B]``, the KV ``cache``, per-example
    ``done [B]``, the sampling ``rng``, the stop table, and the compiled functions' static arguments."""

    graphdef: Any
    params: Any
    tokens: jax.Array
    cache: KVCache
    done: jax.Array
    rng: jax.Array
    stops: jax.Array
    pad: jax.Array
    sampling: Sampling
    kept_tokens: jax.Array


def start_decoding(lm: Llama, x: jax.Array, valid: jax.Array, *, max_new_tokens: int,
                   positions: Optional[jax.Array] = None, stop_tokens=None, sampling: Sampling = Sampling(),
                   rng: Optional[jax.Array] = None, pad_id: int = 0, reducers: Optional[tuple] = None,
                   image_starts: Optional[jax.Array] = None, image_len: int = 0) -> DecodeState:
    """Prefill the prompt embeddings ``x: [B, N, C]`` (left-padded, ``valid: [B, N]``) into a cache with room for
    ``max_new_tokens`` and sample the first new token. ``reducers``: one :class:`reduction.Reducer` (or ``None``)
    per LLM layer, applied during prefill with the image spans ``image_starts [B]`` and ``image_len``."""
    check_rank(x, 3, "x")
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens", allow_zero=False)
    b = x.shape[0]
    valid = jnp.asarray(valid, bool)
    positions = positions_from_valid(valid) if positions is None else jnp.asarray(positions, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    stops = stop_table(stop_tokens, b)
    if image_starts is None:
        image_starts = jnp.zeros((b,), jnp.int32)
    elif image_len and reducers is not None and any(r is not None for r in reducers):
        # Spans past the prompt would be clipped inside the jitted prefill: name them here instead.
        from reduction.spans import check_span_bounds, check_starts

        check_span_bounds(check_starts(jnp.asarray(image_starts), b), int(image_len), x.shape[1])
    graphdef, params = nnx.split(lm)
    tok, cache, rng, kept = _prefill(graphdef, params, x, positions, valid, jnp.asarray(image_starts, jnp.int32),
                                     rng, extra=max_new_tokens, reducers=reducers, image_len=image_len,
                                     sampling=sampling)
    done = jnp.any(tok[:, None] == stops, axis=1)
    return DecodeState(graphdef, params, tok, cache, done, rng, stops, jnp.asarray(pad_id, jnp.int32), sampling,
                       kept)


def decode_next(state: DecodeState) -> DecodeState:
    """One compiled decode step: every example gets its next token (``pad_id`` once it is done). The cache is
    donated: ``state`` must not be used again."""
    tok, cache, done, rng = _decode(state.graphdef, state.params, state.cache, state.tokens, state.done, state.stops,
                                    state.rng, state.pad, sampling=state.sampling)
    return dataclasses.replace(state, tokens=tok, cache=cache, done=done, rng=rng)


def generate_from_embeds(
    lm: Llama,
    x: jax.Array,
    valid: jax.Array,
    *,
    max_new_tokens: int,
    positions: Optional[jax.Array] = None,
    stop_tokens=None,
    sampling: Sampling = Sampling(),
    rng: Optional[jax.Array] = None,
    pad_id: int = 0,
    reducers: Optional[tuple] = None,
    image_starts: Optional[jax.Array] = None,
    image_len: int = 0,
    return_info: bool = False,
):
    """Generate ``max_new_tokens`` tokens after the prompt embeddings ``x: [B, N, C]`` (left-padded,
    ``valid: [B, N]``). Returns ``tokens [B, R]`` int32 (``pad_id`` after an example's stop token, which
    itself is included), and with ``return_info`` a dict with the prefill cache lengths per layer and the
    kept prompt tokens per example. ``reducers``: one :class:`reduction.Reducer` (or ``None``) per LLM layer,
    applied during prefill (see :meth:`models.llama.Llama.prefill_embeds`) with the image spans ``image_starts``
    and ``image_len``.
    """
    state = start_decoding(lm, x, valid, max_new_tokens=max_new_tokens, positions=positions, stop_tokens=stop_tokens,
                           sampling=sampling, rng=rng, pad_id=pad_id, reducers=reducers, image_starts=image_starts,
                           image_len=image_len)
    cache = state.cache
    info = dict(cache_capacity=cache.capacities, prefill_lengths=np.asarray(cache.lengths()),
                kept_tokens=state.kept_tokens)
    out = [state.tokens]
    for _ in range(max_new_tokens - 1):
        if bool(jnp.all(state.done)):
            break
        state = decode_next(state)
        out.append(state.tokens)
    tokens = jnp.stack(out, axis=1)
    if tokens.shape[1] < max_new_tokens:
        tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])), constant_values=pad_id)
    return (tokens, info) if return_info else tokens


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None):
    """Host helper: ragged token lists -> ``(ids [B, N] int32, valid [B, N] bool)`` left-padded to ``length``
    (default: the longest)."""
    n = max(len(s) for s in sequences) if length is None else length
    ids = np.full((len(sequences), n), pad_id, np.int32)
    valid = np.zeros((len(sequences), n), bool)
    for i, s in enumerate(sequences):
        if len(s) > n:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than length={n}")
        if len(s):
            ids[i, n - len(s):] = s
            valid[i, n - len(s):] = True
    return jnp.asarray(ids), jnp.asarray(valid)


def generate(lm: Llama, prompts: Union[jax.Array, Sequence[Sequence[int]]], *, max_new_tokens: int,
             valid: Optional[jax.Array] = None, pad_id: int = 0, **kw):
    """Text-only generation. ``prompts``: ragged token lists (left-padded here) or ``ids [B, N]`` with
    ``valid``. Returns ``tokens [B, R]`` (see :func:`generate_from_embeds` for the keyword options)."""
    if isinstance(prompts, (list, tuple)):
        ids, valid = left_pad(prompts, pad_id)
    else:
        ids = jnp.asarray(prompts, jnp.int32)
        valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
    x = _embed(*nnx.split(lm), ids)
    return generate_from_embeds(lm, x, valid, max_new_tokens=max_new_tokens, pad_id=pad_id, **kw)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, params, ids):
    return nnx.merge(graphdef, params).embed(ids)


__all__ = ["Sampling", "sample_logits", "generate", "generate_from_embeds", "left_pad", "stop_table", "TRACE_COUNTS"]
