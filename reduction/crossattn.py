"""Text-to-image attention inside the LLM: the pieces PyramidDrop, SparseVLM and ToDRE stage 2 share.

The LLM point hands a reducer the attention rows of the last ``Tq`` prompt queries, ``rows: [B, H, Tq, T]`` (row
``r`` is slot ``T - Tq + r``). These helpers turn them into one score per token and per image, and keep the top
image tokens of each span with every text token.

* :func:`last_row_scores` -- the head-mean row of the last valid query (FastV's and PyramidDrop's query).
* :func:`text_row_mask` -- for each image, the rows that are text after that image: valid, at or after the span's
  end, inside no image span (SparseVLM's and ToDRE's raters are chosen among them).
* :func:`weighted_row_scores` -- head-mean attention averaged over a per-image set of rows, falling back to the
  last valid row for an image whose set is empty.
* :func:`span_topk_keep` -- kept slots: every non-image slot plus the ``kept`` (possibly 0) highest-scoring tokens of
  each image span, each image scored by its own row of ``scores: [B, M, T]``; ascending.

Dimension vocabulary: B batch, H heads, Tq query rows, T tokens, M images per example, L = image_len.
Scores are float32 and never carry gradients (selection only); NaN scores count as ``-inf``. Ties: lower slot
first (``lax.top_k``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reduction.spans import assemble, check_starts, span_mask
from reduction.validate import check_count, check_leading, check_rank


def check_rows(rows: jax.Array, num_tokens: int, name: str = "text_attention") -> tuple[int, int]:
    """``rows: [B, H, Tq, T]`` with ``Tq <= T == num_tokens``; returns ``(B, Tq)``."""
    check_rank(rows, 4, name)
    b, _, tq, t = rows.shape
    if t != num_tokens:
        raise ValueError(f"{name} has {t} keys but the state has {num_tokens} tokens")
    if tq > t:
        raise ValueError(f"{name} has {tq} query rows but only {t} keys")
    return b, tq


def _row_valid(valid, b: int, tq: int, t: int) -> jax.Array:
    return jnp.ones((b, tq), bool) if valid is None else valid[:, t - tq:].astype(bool)


def last_valid_row(valid, b: int, tq: int, t: int) -> jax.Array:
    """``[B]`` int32: the last row whose slot is valid (the last row if none is)."""
    rv = _row_valid(valid, b, tq, t)
    last = tq - 1 - jnp.argmax(rv[:, ::-1], axis=-1)
    return jnp.where(jnp.any(rv, axis=-1), last, tq - 1).astype(jnp.int32)


def _head_mean(rows: jax.Array) -> jax.Array:
    a = jnp.mean(jax.lax.stop_gradient(rows).astype(jnp.float32), axis=1)       # [B, Tq, T]
    return jnp.where(jnp.isnan(a), -jnp.inf, a)


def last_row_scores(rows: jax.Array, valid=None) -> jax.Array:
    """``[B, H, Tq, T] -> [B, T]``: the head-mean attention row of the last valid query."""
    b, tq = check_rows(rows, rows.shape[-1])
    t = rows.shape[-1]
    a = _head_mean(rows)
    last = last_valid_row(valid, b, tq, t)
    return jnp.take_along_axis(a, last[:, None, None], axis=1)[:, 0]


def text_row_mask(starts: jax.Array, image_len: int, tq: int, t: int, valid=None) -> jax.Array:
    """``starts: [B, M]`` -> ``[B, M, Tq]`` bool: row ``r`` (slot ``T - Tq + r``) is valid, not inside any image
    span, and at or after the end of image ``m``'s span."""
    b = starts.shape[0]
    slot = t - tq + jnp.arange(tq, dtype=jnp.int32)
    rv = _row_valid(valid, b, tq, t)
    in_img = jax.vmap(lambda s: span_mask(s, image_len, t))(starts)[:, t - tq:]           # [B, Tq]
    after = slot[None, None, :] >= (starts + image_len)[:, :, None]                         # [B, M, Tq]
    return after & (rv & ~in_img)[:, None, :]


def weighted_row_scores(rows: jax.Array, weights: jax.Array, valid=None) -> jax.Array:
    """``rows: [B, H, Tq, T]``, ``weights: [B, M, Tq]`` (non-negative; a row set is ``weights > 0``) ->
    ``[B, M, T]``: head-mean attention averaged over each image's rows with those weights. An image whose
    weights are all zero falls back to the last valid row."""
    b, tq = check_rows(rows, rows.shape[-1])
    t = rows.shape[-1]
    a = _head_mean(rows)
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    w = weights.astype(jnp.float32)
    total = jnp.sum(w, axis=-1, keepdims=True)
    last = jax.nn.one_hot(last_valid_row(valid, b, tq, t), tq, dtype=jnp.float32)[:, None, :]
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), last)
    return jnp.einsum("bmq,bqt->bmt", w, a, precision=jax.lax.Precision.HIGHEST)


def span_topk_keep(scores: jax.Array, image_starts: jax.Array, *, image_len: int, kept: int) -> jax.Array:
    """``scores: [B, M, T]`` (or ``[B, T]``, shared by every image) -> ``keep_idx: [B, T - M * (image_len - kept)]``
    int32 ascending: every non-image slot and the ``kept`` best tokens of each span (``kept = 0`` drops every
    image token)."""
    if scores.ndim == 2:
        scores = scores[:, None, :]
    check_rank(scores, 3, "scores")
    b, _, t = scores.shape
    starts = check_starts(image_starts, b)
    m = starts.shape[1]
    if scores.shape[1] not in (1, m):
        raise ValueError(f"scores has {scores.shape[1]} rows per example but there are {m} images")
    check_leading(scores, (b,), "scores", "image_starts")
    image_len = check_count(image_len, "image_len", allow_zero=False)
    kept = check_count(kept, "kept")
    if kept > image_len:
        raise ValueError(f"kept={kept} exceeds image_len={image_len}")
    if m * image_len > t:
        raise ValueError(f"{m} images of {image_len} tokens exceed the sequence length T={t}")
    scores = jnp.broadcast_to(scores, (b, m, t))
    s = jnp.where(jnp.isnan(scores), -jnp.inf, jax.lax.stop_gradient(scores).astype(jnp.float32))
    num_out = t - m * (image_len - kept)

    def one(s_b, st_b):
        def image(s_m, start):
            span = jax.lax.dynamic_slice_in_dim(s_m, start, image_len)
            return start + jax.lax.top_k(span, kept)[1].astype(jnp.int32)

        return assemble(st_b, jax.vmap(image)(s_b, st_b), image_len, t, num_out)

    return jax.vmap(one)(s, starts)


def rows_attention_flops(rows: int, num_tokens: int, dim: int) -> int:
    """FLOPs of explicit attention for ``rows`` queries over ``num_tokens`` keys (logits and the weighted values,
    as :func:`models.llama.explicit_attention` computes them; ``dim`` = heads x head dim)."""
    return 4 * rows * num_tokens * dim


__all__ = ["check_rows", "last_valid_row", "last_row_scores", "text_row_mask", "weighted_row_scores",
           "span_topk_keep", "rows_attention_flops"]


def stage_count(image_len: int, stage: int, num_stages: int, keep=None, keep_ratio=None, *, minimum: int = 1) -> int:
    """Image tokens per image a staged method leaves after stage ``stage`` (0-based) of ``num_stages``, from the
    span's current length ``image_len`` (static):

    * ``keep`` a tuple: ``keep[stage]``; an int: the count after the *last* stage, reached geometrically
      (``round(image_len * (keep / image_len) ** (1 / stages_left))``, so every stage keeps the same fraction);
    * else ``keep_ratio`` (a tuple: per stage; a float: every stage), a fraction of the current span,
      ``int(image_len * ratio)``.

    Clamped to ``[minimum, image_len]``."""
    if keep is not None:
        if isinstance(keep, tuple):
            target = int(keep[stage])
        else:
            left = num_stages - stage
            target = int(round(image_len * (int(keep) / image_len) ** (1.0 / left))) if keep else 0
    else:
        r = keep_ratio[stage] if isinstance(keep_ratio, tuple) else keep_ratio
        target = int(image_len * float(r))
    return max(minimum, min(target, image_len))


def resolve_stages(name: str, layers, keep, keep_ratio, *, allow_zero: bool = False):
    """Check a staged spec's amounts against its ``layers``: ``keep`` (int or per-stage list of ints) and
    ``keep_ratio`` (float or per-stage list, each in ``[0, 1]`` or ``(0, 1]``). Returns ``(keep, keep_ratio)`` with
    lists as tuples. A named ``ValueError`` otherwise."""
    from reduction.validate import check_ratio

    def seq(v):
        return isinstance(v, (list, tuple))

    if keep is not None:
        if seq(keep):
            if len(keep) != len(layers):
                raise ValueError(f"{name}: keep has {len(keep)} entries but layers has {len(layers)} stages")
            keep = tuple(check_count(k, "keep", allow_zero=allow_zero) for k in keep)
        else:
            keep = check_count(keep, "keep", allow_zero=allow_zero)
    if keep_ratio is not None:
        def ratio(r):
            if allow_zero and not isinstance(r, bool) and isinstance(r, (int, float)) and float(r) == 0.0:
                return 0.0
            return check_ratio(r, "keep_ratio")

        if seq(keep_ratio):
            if len(keep_ratio) != len(layers):
                raise ValueError(f"{name}: keep_ratio has {len(keep_ratio)} entries but layers has {len(layers)} "
                                 f"stages")
            keep_ratio = tuple(ratio(r) for r in keep_ratio)
        else:
            keep_ratio = ratio(keep_ratio)
    if keep is None and keep_ratio is None:
        raise ValueError(f"{name}: give keep or keep_ratio")
    return keep, keep_ratio


def scaled_layers(num_layers: int, reference: tuple, depth: int = 32) -> list:
    """A paper's layer list on a ``depth``-layer LLM scaled to ``num_layers``, each in ``[1, num_layers)``,
    sorted and unique (``[8, 16, 24]`` of 32 -> ``[1, 2, 3]`` on 4 layers, ``[8, 15, 22]`` on 30)."""
    if num_layers < 2:
        raise ValueError("pruning inside the LLM needs at least 2 layers")
    return sorted({min(num_layers - 1, max(1, int(round(l * num_layers / depth)))) for l in reference})


__all__ += ["stage_count", "resolve_stages", "scaled_layers"]
