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


# -- pruning methods' own costs (Zero-TPrune, DART, ATP, baselines) ----------------------------------------


def cosine_rows_flops(rows: int, cols: int, dim: int) -> int:
    """``rows x cols`` cosine similarities of width ``dim`` (the normalisation is O(T*C), not counted)."""
    return 2 * rows * cols * dim


def zerotprune_flops(tokens: int, heads: int, key_dim: int, *, r_similarity: int, iterations: int,
                     preview_iterations: int = 1) -> int:
    """Zero-TPrune at one layer: the one-step I' ranking on ``T`` tokens, the S-stage cosine scores
    between the two halves of the ``T - 1`` non-class tokens (keys of width ``key_dim``), and the full
    I-stage WPR on the ``T - r_similarity`` survivors."""
    cand = tokens - 1
    half_a = (cand + 1) // 2
    s_stage = cosine_rows_flops(half_a, cand - half_a, key_dim) if r_similarity > 0 else 0
    return (pagerank_flops(tokens, heads, preview_iterations) + s_stage
            + pagerank_flops(tokens - r_similarity, heads, iterations))


def dart_flops(tokens: int, dim: int, *, num_pivots: int = 8) -> int:
    """DART selection: each pivot's cosine with every candidate (at most ``T``) tokens."""
    return cosine_rows_flops(num_pivots, tokens, dim)


def attention_score_flops(queries: int, tokens: int, heads: int) -> int:
    """Averaging ``queries`` attention rows over heads and queries (ATP, EViT, FastV); adds count as FLOPs."""
    return heads * queries * tokens
