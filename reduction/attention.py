"""Attention-side helpers usable by any attention implementation.

Both return additive biases of shape ``[B, 1, 1, T]`` (broadcast over heads and queries) that go on the
*scaled* logits before the softmax, which is also what ``jax.nn.dot_product_attention(bias=...)`` expects.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from reduction.validate import check_rank


def proportional_attention_bias(sizes: jax.Array) -> jax.Array:
    """ToMe's proportional attention: ``log(sizes)`` as a per-key bias.

    ``sizes: [B, T] -> [B, 1, 1, T]`` float32. A token standing for ``s`` originals gets ``log s`` added to
    every logit that attends to it, so softmax treats it like ``s`` copies. Zero sizes (padding) give a
    large negative bias instead of ``-inf`` so a fully masked row never produces NaN.
    """
    check_rank(sizes, 2, "sizes")
    logs = jnp.log(jnp.maximum(sizes.astype(jnp.float32), 1e-30))
    return logs[:, None, None, :]


def key_mask_bias(valid: Optional[jax.Array], dtype=jnp.float32) -> Optional[jax.Array]:
    """``valid: [B, T] bool -> [B, 1, 1, T]`` with 0 for valid keys and a large negative value otherwise."""
    if valid is None:
        return None
    check_rank(valid, 2, "valid")
    neg = jnp.asarray(jnp.finfo(dtype).min / 2, dtype)
    return jnp.where(valid, jnp.asarray(0, dtype), neg)[:, None, None, :]


def combine_biases(*biases: Optional[jax.Array]) -> Optional[jax.Array]:
    """Sum the non-``None`` biases (``None`` if all are ``None``)."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    out = present[0]
    for b in present[1:]:
        out = out + b
    return out
