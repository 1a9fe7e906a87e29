"""Key/value cache for decoder-only LMs whose layers may hold different numbers of tokens.

In-LLM pruning (DART, FastV, ATP) removes tokens before decoder layer ``K`` during prefill: layers ``< K``
cache every prompt token, layers ``>= K`` only the kept ones. Each layer therefore owns its own static
capacity. Decoding appends one token per step at the same write index for the whole batch (the index is
per layer because the prompt lengths differ per layer); padding and ATP's unused capacity are masked by a
per-slot ``valid`` flag, so every shape stays static and the decode step compiles once.

Dimension vocabulary: B batch, S cache slots of one layer (its capacity), G key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's cache.

    Attributes:
      k, v: ``[B, S, G, D]`` keys (after RoPE) and values.
      valid: ``[B, S]`` bool; ``False`` for padding, pruned-capacity slots and slots not written yet.
      index: ``[]`` int32, the next slot to write (shared by the batch).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """All layers' caches plus ``next_position: [B]`` int32, the RoPE position of the next token.

    ``next_position`` continues from the original (unpruned) prompt length, so tokens generated after
    pruning see the same positions as without pruning.
    """

    layers: tuple
    next_position: jax.Array

    @property
    def capacities(self) -> tuple:
        return tuple(c.capacity for c in self.layers)

    def lengths(self) -> jax.Array:
        """``[L, B]`` number of valid cached tokens per layer and example."""
        return jnp.stack([jnp.sum(c.valid, axis=1) for c in self.layers])


def layer_cache_from_prefill(k: jax.Array, v: jax.Array, valid: jax.Array, extra: int) -> LayerCache:
    """Cache holding the prefill keys/values ``[B, T, G, D]`` with ``extra`` free slots after them."""
    b, t = k.shape[:2]
    pad = ((0, 0), (0, extra), (0, 0), (0, 0))
    return LayerCache(
        k=jnp.pad(k, pad),
        v=jnp.pad(v, pad),
        valid=jnp.pad(valid.astype(bool), ((0, 0), (0, extra))),
        index=jnp.asarray(t, jnp.int32),
    )


def append(cache: LayerCache, k: jax.Array, v: jax.Array) -> LayerCache:
    """Write one new token's ``k, v: [B, 1, G, D]`` at ``cache.index`` (traced) and mark it valid.

    Writing past the capacity is clamped by ``dynamic_update_slice`` to the last slot; callers size the
    capacity as prompt tokens + ``max_new_tokens``.
    """
    i = cache.index
    kk = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, i, 0, 0))
    vv = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, i, 0, 0))
    ones = jnp.ones((cache.valid.shape[0], 1), bool)
    valid = jax.lax.dynamic_update_slice(cache.valid, ones, (0, i))
    return LayerCache(k=kk, v=vv, valid=valid, index=i + 1)


__all__ = ["LayerCache", "KVCache", "layer_cache_from_prefill", "append"]
