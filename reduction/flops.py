"""Analytic FLOP counts for transformers given their tokens per layer.

Convention: **FLOPs = 2 x MACs** (one multiply-add is two FLOPs), the same convention as XLA's
``compiled.cost_analysis()['flops']`` for matmuls. Only matrix products are counted for the layers;
softmax, norms, GELU and residual adds are ignored (they are O(T*C), well under 1% at ViT sizes).
The reductions' own costs are counted with the same convention (similarity matmuls and power
iterations; sorts and gathers are not FLOPs).

ToMe merges between attention and the MLP, so a layer's attention runs on ``T_l`` tokens and its MLP on
``T_l - r_l``; every function takes both counts per layer.
"""

from __future__ import annotations

from typing import Optional, Sequence


def attention_flops(tokens: int, dim: int, *, kv_tokens: Optional[int] = None, kv_dim: Optional[int] = None) -> int:
    """Self-attention of ``tokens`` queries over ``kv_tokens`` keys (default: the same tokens).

    qkv projections ``T*C*(C + 2*Ckv)``, logits ``T*Tkv*C``, weighted values ``T*Tkv*C``, output
    projection ``T*C*C`` MACs. ``kv_dim`` is the key/value width (smaller under grouped-query attention).
    """
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    kv_dim = dim if kv_dim is None else kv_dim
    macs = tokens * dim * (dim + 2 * kv_dim) + 2 * tokens * kv_tokens * dim + tokens * dim * dim
    return 2 * macs


def mlp_flops(tokens: int, dim: int, mlp_dim: int, *, gated: bool = False) -> int:
    """Two-layer MLP (``gated=True``: SwiGLU with three matrices)."""
    mats = 3 if gated else 2
    return 2 * tokens * dim * mlp_dim * mats


def block_flops(attn_tokens: int, mlp_tokens: int, dim: int, mlp_dim: int, **kw) -> int:
    """One pre-norm transformer block whose MLP may see fewer tokens than its attention."""
    gated = kw.pop("gated", False)
    return attention_flops(attn_tokens, dim, **kw) + mlp_flops(mlp_tokens, dim, mlp_dim, gated=gated)


def transformer_flops(
    attn_tokens: Sequence[int],
    dim: int,
    mlp_dim: int,
    *,
    mlp_tokens: Optional[Sequence[int]] = None,
    reduction_flops: Optional[Sequence[int]] = None,
    gated: bool = False,
    kv_dim: Optional[int] = None,
) -> int:
    """Sum of block FLOPs over layers plus the reductions' own cost.

    Args:
      attn_tokens: tokens entering each layer's attention (length L).
      mlp_tokens: tokens entering each layer's MLP (default: same as ``attn_tokens``).
      reduction_flops: per-layer cost of the reduction op itself (default 0).
    """
    mlp_tokens = list(attn_tokens) if mlp_tokens is None else list(mlp_tokens)
    if len(mlp_tokens) != len(attn_tokens):
        raise ValueError(f"mlp_tokens has {len(mlp_tokens)} layers, attn_tokens has {len(attn_tokens)}")
    total = sum(
        block_flops(a, m, dim, mlp_dim, gated=gated, kv_dim=kv_dim) for a, m in zip(attn_tokens, mlp_tokens)
    )
    if reduction_flops is not None:
        total += int(sum(reduction_flops))
    return int(total)


def vit_flops(
    attn_tokens: Sequence[int],
    *,
    dim: int,
    mlp_dim: int,
    patch_size: int,
    num_patches: int,
    in_chans: int = 3,
    num_classes: int = 0,
    mlp_tokens: Optional[Sequence[int]] = None,
    reduction_flops: Optional[Sequence[int]] = None,
) -> int:
    """Whole ViT: patch embedding, blocks, and a linear head on one pooled token."""
    patch = 2 * num_patches * in_chans * patch_size * patch_size * dim
    head = 2 * dim * num_classes
    return patch + transformer_flops(
        attn_tokens, dim, mlp_dim, mlp_tokens=mlp_tokens, reduction_flops=reduction_flops
    ) + head


# -- the reductions' own costs --------------------------------------------------------------------------


def bipartite_flops(num_a: int, num_b: int, metric_dim: int) -> int:
    """Scores of a bipartite matching: ``|A| x |B|`` dot products of width ``metric_dim``."""
    return 2 * num_a * num_b * metric_dim


def tome_flops(tokens: int, metric_dim: int) -> int:
    """ToMe: even/odd split, ``ceil(T/2) x floor(T/2)`` cosine scores."""
    return bipartite_flops((tokens + 1) // 2, tokens // 2, metric_dim)


def pitome_flops(tokens: int, metric_dim: int) -> int:
    """PiToMe: the full ``T x T`` similarity for the energy (the A x B scores are gathered from it)."""
    return 2 * tokens * tokens * metric_dim


def pagerank_flops(tokens: int, heads: int, iterations: int) -> int:
    """Weighted PageRank: ``iterations`` products of ``A^T s`` per head."""
    return 2 * heads * iterations * tokens * tokens
