"""The token state threaded through transformer layers.

Dimension vocabulary used across the repo:
  B batch, T current tokens, N original tokens (before any reduction), C channels,
  H heads, K kept / output tokens.

A ``TokenState`` is a pytree (``jax.tree_util.register_dataclass``), so it passes through
``jax.jit``, ``jax.vmap`` and ``lax.scan`` like any array bundle. Optional fields are ``None``
when not tracked; ``None`` is an empty pytree node, so tracking is a static (structural) choice.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.validate import check_leading, check_rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenState:
    """Tokens plus the bookkeeping every reduction keeps up to date.

    Attributes:
      x: ``[B, T, C]`` token features (any float dtype).
      sizes: ``[B, T]`` float32, how many original tokens each token stands for. Sums to the number of
        valid original tokens for every example (mass is conserved by merges; pruning drops mass).
      positions: ``[B, T]`` int32 original position id of each token (the anchor's position for a
        merged token). Pruned sequences keep their gaps, as DART and FastV require for RoPE.
      valid: ``[B, T]`` bool or ``None``. ``False`` marks padding / masked-out slots (instance-adaptive
        methods use a static capacity plus this mask).
      source: ``[B, N]`` int32 or ``None``: for every original token, the index of the current token
        that now holds it, or ``-1`` if it was pruned. This is the compact form of ToMe's ``[B, T, N]``
        0/1 source matrix (see :func:`source_matrix`).
    """

    x: jax.Array
    sizes: jax.Array
    positions: jax.Array
    valid: Optional[jax.Array] = None
    source: Optional[jax.Array] = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)


def init_state(
    x: jax.Array,
    *,
    sizes: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
    positions: Optional[jax.Array] = None,
    track_source: bool = False,
) -> TokenState:
    """Start a token state from unreduced tokens.

    Args:
      x: ``[B, N, C]`` tokens.
      sizes: optional ``[B, N]`` initial sizes (default all ones).
      valid: optional ``[B, N]`` bool mask.
      positions: optional ``[B, N]`` position ids (default ``0..N-1``).
      track_source: keep the ``[B, N]`` source map (needed for unmerge and visualisation).
    """
    check_rank(x, 3, "x")
    b, n = x.shape[:2]
    if sizes is None:
        sizes = jnp.ones((b, n), jnp.float32)
    else:
        check_rank(sizes, 2, "sizes")
        check_leading(sizes, (b, n), "sizes", "x")
        sizes = sizes.astype(jnp.float32)
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, n), "valid", "x")
        valid = valid.astype(bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    else:
        check_rank(positions, 2, "positions")
        check_leading(positions, (b, n), "positions", "x")
        positions = positions.astype(jnp.int32)
    source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if track_source else None
    return TokenState(x=x, sizes=sizes, positions=positions, valid=valid, source=source)


@eager_jit
def source_matrix(source: jax.Array, num_tokens: int) -> jax.Array:
    """Expand a ``[B, N]`` source map to ToMe's ``[B, T, N]`` 0/1 matrix (row t = members of token t)."""
    check_rank(source, 2, "source")
    return (source[:, None, :] == jnp.arange(num_tokens, dtype=source.dtype)[None, :, None]).astype(jnp.float32)


@eager_jit
def unmerge(y: jax.Array, source: jax.Array, *, fill_value: float = 0.0) -> jax.Array:
    """Broadcast reduced tokens back to the original positions, for dense outputs.

    ``y: [B, T, C], source: [B, N] -> [B, N, C]``. Every original token receives the value of the token
    that holds it; pruned tokens (``source == -1``) receive ``fill_value``.
    """
    check_rank(y, 3, "y")
    check_rank(source, 2, "source")
    check_leading(source, y.shape[:1], "source", "y")
    gathered = jnp.take_along_axis(y, jnp.maximum(source, 0)[..., None], axis=1)
    return jnp.where(source[..., None] >= 0, gathered, jnp.asarray(fill_value, y.dtype))
