"""Selection inside image spans of a longer sequence (the LLM point), shared by every span-aware method.

A VLM prompt holds ``M`` images of ``image_len`` tokens each, starting at traced positions ``image_starts``
(``[B]`` or ``[B, M]``; left padding moves them per example). A pruning method that selects ``kept`` tokens of
each image writes one function for a single span and lets :func:`span_keep_indices` place it: text tokens all
survive, the image tokens kept are the method's, and the output is in the original order with the static
length ``T - M * (image_len - kept)``.

Outside the LLM the candidates are the tokens after a protected prefix (the class token, registers):
:func:`prefix_keep_indices` places a single-example selection the same way for that layout.

Dimension vocabulary: B batch, T sequence tokens, M images per example, L = image_len, C channels.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from reduction.validate import check_count, check_leading, check_rank


def check_starts(image_starts, batch: int) -> jax.Array:
    """``image_starts: [B]`` or ``[B, M]`` integer -> ``[B, M]`` int32 (named errors otherwise)."""
    if getattr(image_starts, "ndim", None) not in (1, 2):
        raise ValueError(f"image_starts must have rank 1 ([B]) or 2 ([B, M]), got shape "
                         f"{getattr(image_starts, 'shape', None)}")
    check_leading(image_starts, (batch,), "image_starts", "tokens")
    if not jnp.issubdtype(image_starts.dtype, jnp.integer):
        raise ValueError(f"image_starts must be an integer array, got dtype {image_starts.dtype}")
    starts = image_starts.astype(jnp.int32)
    return starts[:, None] if starts.ndim == 1 else starts


def check_span_bounds(starts: jax.Array, image_len: int, num_tokens: int) -> jax.Array:
    """Spans ``[s, s + image_len)`` must lie inside ``[0, T)`` and not overlap. ``starts: [B, M]`` int32.

    Concrete starts (an eager call, or :func:`models.generate.start_decoding`, which checks before its jitted
    prefill) that break this raise ``ValueError`` naming ``image_starts`` and the offending example. Traced starts
    cannot be checked before the compile; they are clipped to ``[0, T - image_len]`` so the selection, the span
    mask and the static output count stay consistent (a span past the end is read as the last ``image_len``
    tokens; the text tokens it then covers count as image tokens). Valid starts pass through unchanged.
    """
    if not isinstance(starts, jax.core.Tracer):
        s = np.asarray(starts)
        bad = (s < 0) | (s + image_len > num_tokens)
        if bad.any():
            e, m = map(int, np.argwhere(bad)[0])
            raise ValueError(f"image_starts[{e}] = {s[e].tolist()}: image {m}'s span [{int(s[e, m])}, "
                             f"{int(s[e, m]) + image_len}) runs outside the sequence [0, {num_tokens}) "
                             f"(image_len={image_len})")
        if s.shape[1] > 1:
            srt = np.sort(s, axis=1)
            gap = np.diff(srt, axis=1) < image_len
            if gap.any():
                e = int(np.argwhere(gap)[0][0])
                raise ValueError(f"image_starts[{e}] = {s[e].tolist()}: image spans of {image_len} tokens overlap")
        return starts
    return jnp.clip(starts, 0, num_tokens - image_len)


def check_concrete_spans(image_starts, image_len, num_tokens: int, batch: int) -> None:
    """Before an eager call of a compiled op (:mod:`reduction._compiled`): run :func:`check_span_bounds` on
    concrete ``image_starts`` so that spans outside the sequence raise their named error, as an uncompiled call
    would. Anything else wrong (rank, dtype, a bad ``image_len``) is left to the op's own checks while it traces."""
    if image_starts is None or isinstance(image_starts, jax.core.Tracer):
        return
    if isinstance(image_len, bool) or not isinstance(image_len, int) or image_len <= 0:
        return
    shape = getattr(image_starts, "shape", None)
    dtype = getattr(image_starts, "dtype", None)
    if shape is None or len(shape) not in (1, 2) or shape[0] != batch or not jnp.issubdtype(dtype, jnp.integer):
        return
    starts = np.asarray(image_starts).reshape(batch, -1)
    if starts.shape[1] * image_len <= num_tokens:
        check_span_bounds(starts, image_len, num_tokens)


def span_mask(starts: jax.Array, image_len: int, num_tokens: int) -> jax.Array:
    """``starts: [M]`` -> ``[T]`` bool, True on every image token of one example."""
    pos = jnp.arange(num_tokens)[:, None]
    return jnp.any((pos >= starts[None]) & (pos < starts[None] + image_len), axis=1)


def assemble(starts: jax.Array, kept_pos: jax.Array, image_len: int, num_tokens: int, num_out: int) -> jax.Array:
    """Sorted keep indices of one example: every non-image position plus ``kept_pos: [M, k]`` -> ``[num_out]``."""
    keep = ~span_mask(starts, image_len, num_tokens)
    keep = keep.at[kept_pos.reshape(-1)].set(True)
    return jnp.nonzero(keep, size=num_out)[0].astype(jnp.int32)


def span_keep_indices(select: Callable[[jax.Array], jax.Array], values: jax.Array, image_starts: jax.Array, *,
                      image_len: int, kept: int) -> jax.Array:
    """Keep ``kept`` tokens of each image span, chosen by ``select``, and every other token.

    Args:
      select: ``fn(span [L, ...]) -> [kept] int32`` indices into the span (one image of one example).
      values: ``[B, T, ...]`` what ``select`` reads (features, scores).
      image_starts: ``[B]`` or ``[B, M]`` traced span starts; image_len, kept: static.

    Returns:
      ``keep_idx: [B, T - M * (image_len - kept)]`` int32, ascending.
    """
    check_rank(values, values.ndim, "values")
    b, t = values.shape[:2]
    starts = check_starts(image_starts, b)
    m = starts.shape[1]
    image_len = check_count(image_len, "image_len", allow_zero=False)
    kept = check_count(kept, "kept", allow_zero=False)
    if kept > image_len:
        raise ValueError(f"kept={kept} exceeds image_len={image_len}")
    if m * image_len > t:
        raise ValueError(f"{m} images of {image_len} tokens exceed the sequence length T={t}")
    starts = check_span_bounds(starts, image_len, t)
    num_out = t - m * (image_len - kept)

    def one(v, s):
        def image(start):
            span = jax.lax.dynamic_slice_in_dim(v, start, image_len, axis=0)
            return start + select(span).astype(jnp.int32)

        return assemble(s, jax.vmap(image)(s), image_len, t, num_out)

    return jax.vmap(one)(values, starts)


def require_spans(info, method: str) -> None:
    """Refuse, before any tracing, a span-only method planned where the point gives no image spans."""
    if not info.in_spans:
        raise ValueError(f"{method} runs inside the LLM (it needs image spans and the text's attention rows)")


def span_num_out(num_tokens: int, info, kept: Callable[[int], int]) -> int:
    """Static output length of a method that keeps ``kept(image_len)`` tokens of each image span (the LLM point);
    ``num_tokens`` unchanged where the point has no spans."""
    if not info.in_spans:
        return num_tokens
    return num_tokens - info.num_images * (info.image_len - kept(info.image_len))


def prefix_keep_indices(select: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, *, keep: int,
                        num_protected: int = 0, valid: Optional[jax.Array] = None) -> jax.Array:
    """Keep the first ``num_protected`` tokens and ``keep`` of the rest, chosen by ``select``.

    Args:
      select: ``fn(candidates [T - P, ...], valid [T - P] bool) -> [keep] int32`` ascending indices into the
        candidates (one example).
      x: ``[B, T, ...]`` what ``select`` reads; ``valid``: ``[B, T]`` bool or ``None`` (all valid).
      keep, num_protected: static counts, ``num_protected + keep <= T``.

    Returns:
      ``keep_idx: [B, num_protected + keep]`` int32, ascending.
    """
    check_rank(x, 3, "x")
    b, t = x.shape[:2]
    keep = check_count(keep, "keep")
    p = check_count(num_protected, "num_protected")
    if p > t:
        raise ValueError(f"num_protected={p} exceeds the token count T={t}")
    if keep > t - p:
        raise ValueError(f"keep={keep} exceeds the {t - p} unprotected tokens")
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "x")
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    if keep == 0:
        return prefix
    ok = jnp.ones((b, t - p), bool) if valid is None else valid[:, p:].astype(bool)
    sel = jax.vmap(select)(x[:, p:], ok).astype(jnp.int32)
    return jnp.concatenate([prefix, sel + p], axis=1)


__all__ = ["check_starts", "check_span_bounds", "check_concrete_spans", "span_mask", "assemble", "span_keep_indices",
           "prefix_keep_indices", "require_spans", "span_num_out"]
