"""CDPruner: query-conditioned DPP selection of visual tokens (Zhang et al., NeurIPS 2025, arXiv 2506.10967).

CDPruner keeps a subset of the image tokens that is both *diverse* and *relevant to the question*: it builds
the conditional DPP kernel ``L = diag(r) S diag(r)`` (``S``: cosine similarity of the token features, ``r``:
each token's relevance to the instruction) and keeps the ``K`` tokens of the greedy MAP solution, i.e. the set
picked one token at a time to maximise ``log det L[S, S]``. Registered as ``"cdpruner"`` at every point
(``x: [B, T, C] -> [B, K', C]``):

* ``"llm"`` (the query-conditioned method): before LLM layer ``K >= 1`` on layer ``K - 1``'s normed hidden
  states. Candidates are the image tokens of each image span (text tokens all survive); the relevance comes
  from the question's tokens, which are in the same sequence (see below).
* ``"vit"``, ``"vision"``, ``"connector"`` (question-free variant): no text is available there, so ``r = 1`` and
  the kernel is the plain cosine similarity ``S`` (a diversity-only DPP over the unprotected tokens).

The selection for the ``N`` candidates of one image (:func:`dpp_greedy_order`), the fast greedy MAP update of
Chen et al. (NeurIPS 2018) that the official code runs:

1. ``d = diag(L)`` (the marginal gains of a first pick), ``c = 0`` of shape ``[K, N]``.
2. For ``i = 0..K-1``: ``j = argmax d`` over unselected tokens; ``e = (L[j, :] - c[:i, j] @ c[:i, :]) / sqrt(d_j)``;
   ``c[i] = e``; ``d <- d - e**2``. After the update ``d_m`` is the Schur complement
   ``det L[S+m] / det L[S]``, so each pick is exactly the naive greedy log-det step, at ``O(K N)`` per pick
   instead of a determinant per candidate. Carried in a ``lax.fori_loop`` with static ``K``.
3. The kept indices are returned in ascending (original) order.

Relevance (``"llm"`` point, :func:`query_relevance`), **GUESS** (this repo's adaptation): the query vector is
the mean of the unit-normalised hidden states of the *instruction tokens*: the valid text tokens after the
first image span's start of each example (the question and the chat template in LLaVA-style prompts; left
padding comes before the image and is excluded as well by ``state.valid``). ``r_n = cos(h_n, q)`` for each image
token, then min-max normalised over all image tokens of the example (every span jointly, as the official code
normalises across the crops of a sample): ``r = (r - min + 1e-6) / max(max - min, 1e-6)``. An example with
no instruction token gets ``r = 1``.

The official code (Theia-4869/CDPruner, ``LlavaMetaForCausalLM.encode_images``) instead computes ``r`` before
the LLM: CLIP's *text tower* embeds the question (77-token segments, averaged), CLIP's image embeddings are
the penultimate layer's patches through ``post_layernorm`` and ``visual_projection``, and the relevance is the
*negative* cosine (``-cos(img, txt)``, a CLIP-specific sign its maintainers defend in issue #14). ``S`` uses the
post-projector features. This port has no text tower, so it reads both ``S`` and ``r`` from the LLM's own
hidden states at layer ``K - 1``, where the question is already in context. Options:

* ``relevance="similarity"`` (default, **GUESS**: the paper's description, similarity to the instruction),
  ``"negative"`` (the official code's sign, for CLIP embeddings; unclear that it carries over to LLM hidden
  states) or ``"none"`` (``r = 1``: a question-free DPP also in the LLM).
* ``theta`` (``None`` by default, as in the official code, where it is commented out): the paper's trade-off,
  ``r <- exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))``, ``0 <= theta < 1``.

Reported in the paper (not re-checked here): on LLaVA-1.5-7B, FLOPs -95% and CUDA latency -78% while keeping
94% of the original accuracy (abstract); training-free.

Where this port differs from the official code (besides the relevance above):

* Batched, every example and every image span gets its own selection with traced span starts; the official
  code selects per crop at batch size 1.
* Exhausted kernel: the official code divides by ``sqrt(d_j)`` with no guard (NaN once ``d_j <= 0``, i.e. when
  ``K`` exceeds the numerical rank of ``L``). Here a token whose gain is at most
  ``DPP_TOL * max(diag L)`` (``DPP_TOL = 1e-5``) counts as exhausted: it adds nothing (its ``c`` row is 0) and
  exhausted tokens are picked only after every token with a positive gain, lowest index first. Tokens of
  relevance below about ``3e-3`` (``r**2 < 1e-5``) are therefore exhausted from the start.
* Ties go to the lowest index (``jnp.argmax``); a selected token's score is ``-inf`` (as in the official code).
  The diagonal of ``S`` is set to exactly 1 (0 for a zero vector): with ``r = 1`` every first gain is then an
  exact tie and the first pick is token 0, where rounding would otherwise choose it.
* Optional validity (``valid: [N]``, not in the official code): invalid tokens are picked only after every
  valid token, lowest index first.
* Kept tokens keep their original position ids; the kept count is the shared rule
  (:func:`reduction.reducers.candidates_kept`: ``keep`` or ``floor(keep_ratio * N)``, at least one), per image.

Dimension vocabulary: B batch, T tokens, C channels, N candidates of one image, K kept.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from reduction._compiled import eager_jit
from reduction.spans import check_concrete_spans
from reduction import flops as flops_lib
from reduction.reducers import (HIDDEN, LayerInfo, Reducer, candidates_kept, default_layers, pruned_count,
                                register)
from reduction.spans import prefix_keep_indices, check_starts, span_keep_indices, span_mask
from reduction.state import TokenState
from reduction.step import ReductionStep, prune_step
from reduction.validate import check_count, check_leading, check_rank, check_ratio

COS_EPS = 1e-8
DPP_TOL = 1e-5          # a gain at most DPP_TOL * max(diag L) counts as exhausted (see the module docstring)
REL_EPS = 1e-6          # the official min-max offset
RELEVANCE = ("similarity", "negative", "none")
_HI = jax.lax.Precision.HIGHEST


def check_relevance(relevance: str) -> str:
    if relevance not in RELEVANCE:
        raise ValueError(f"relevance must be one of {RELEVANCE}, got {relevance!r}")
    return relevance


def check_theta(theta: Optional[float]) -> Optional[float]:
    if theta is None:
        return None
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0.0 <= float(theta) < 1.0:
        raise ValueError(f"theta must be None or a float in [0, 1), got {theta!r}")
    return float(theta)


def cosine_similarity(x: jax.Array) -> jax.Array:
    """``x: [N, C]`` -> ``S: [N, N]`` float32 cosine similarity (norms clamped at ``1e-8``; the diagonal is
    exactly 1, or 0 for a zero vector)."""
    check_rank(x, 2, "x")
    v = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    u = v / jnp.maximum(norm, COS_EPS)
    s = jnp.einsum("ic,jc->ij", u, u, precision=_HI)
    # the diagonal is exactly 1 (0 for a zero vector), so equal diagonals tie exactly instead of by rounding
    eye = jnp.eye(x.shape[0], dtype=bool)
    return jnp.where(eye, (norm[:, 0] > COS_EPS).astype(jnp.float32)[None, :], s)


def dpp_kernel(x: jax.Array, relevance: Optional[jax.Array] = None) -> jax.Array:
    """The conditional DPP kernel ``L = diag(r) S diag(r)``: ``x: [N, C]``, ``relevance: [N]`` or ``None``
    (``r = 1``) -> ``[N, N]`` float32."""
    check_rank(x, 2, "x")
    if relevance is None:
        return cosine_similarity(x)
    check_rank(relevance, 1, "relevance")
    check_leading(relevance, (x.shape[0],), "relevance", "x")
    s = cosine_similarity(x)
    r = relevance.astype(jnp.float32)
    return r[:, None] * s * r[None, :]


def dpp_greedy_order(kernel: jax.Array, kept: int, valid: Optional[jax.Array] = None) -> jax.Array:
    """The greedy MAP picks of one DPP in the order they were made: ``kernel: [N, N]`` (symmetric PSD) ->
    ``[kept]`` int32 (fast Cholesky-style update; ``order[:k]`` is the selection for every ``k <= kept``).

    ``valid: [N]`` bool or ``None``. Exhausted and invalid tokens: see the module docstring.
    """
    check_rank(kernel, 2, "kernel")
    n = kernel.shape[0]
    if kernel.shape[1] != n:
        raise ValueError(f"kernel must be square, got shape {kernel.shape}")
    kept = check_count(kept, "kept")
    if kept > n:
        raise ValueError(f"kept={kept} exceeds the token count N={n}")
    if valid is not None:
        check_rank(valid, 1, "valid")
        check_leading(valid, (n,), "valid", "kernel")
    if kept == 0:
        return jnp.zeros((0,), jnp.int32)
    lk = jax.lax.stop_gradient(kernel).astype(jnp.float32)
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    d0 = jnp.diagonal(lk)
    tol = DPP_TOL * jnp.maximum(jnp.max(jnp.where(ok, d0, 0.0)), 1e-30)

    def body(i, carry):
        d, c, selected, order = carry
        live = ok & (d > tol)
        score = jnp.where(selected, -jnp.inf, jnp.where(live, d, jnp.where(ok, -1.0, -2.0)))
        j = jnp.argmax(score).astype(jnp.int32)
        use = live[j]
        e = (lk[j] - jnp.dot(c[:, j], c, precision=_HI)) / jnp.sqrt(jnp.where(use, d[j], 1.0))
        e = jnp.where(use, e, 0.0)
        return d - e * e, c.at[i].set(e), selected.at[j].set(True), order.at[i].set(j)

    init = (d0, jnp.zeros((kept, n), jnp.float32), jnp.zeros((n,), bool), jnp.zeros((kept,), jnp.int32))
    return jax.lax.fori_loop(0, kept, body, init)[3]


@eager_jit
def dpp_select(x: jax.Array, kept: int, relevance: Optional[jax.Array] = None,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """CDPruner's kept tokens of one image: ``x: [N, C]``, ``relevance: [N]`` or ``None`` -> ``[kept]`` int32
    ascending, unique."""
    check_rank(x, 2, "x")
    return jnp.sort(dpp_greedy_order(dpp_kernel(x, relevance), kept, valid))


def query_relevance(hidden: jax.Array, image_starts: jax.Array, image_len: int, valid: Optional[jax.Array] = None,
                    *, relevance: str = "similarity", theta: Optional[float] = None) -> jax.Array:
    """Each token's relevance to its example's instruction (**GUESS**, see the module docstring).

    ``hidden: [B, T, C]``, ``image_starts: [B]`` or ``[B, M]``, static ``image_len``, ``valid: [B, T]`` or ``None``
    -> ``r: [B, T]`` float32 in ``[~0, 1]`` on image tokens (1 everywhere when ``relevance="none"`` or an
    example has no instruction token; values on text tokens are meaningless).
    """
    check_rank(hidden, 3, "hidden")
    b, t, _ = hidden.shape
    check_relevance(relevance)
    theta = check_theta(theta)
    starts = check_starts(image_starts, b)
    image_len = check_count(image_len, "image_len", allow_zero=False)
    if valid is not None:
        check_rank(valid, 2, "valid")
        check_leading(valid, (b, t), "valid", "hidden")
    if relevance == "none":
        return jnp.ones((b, t), jnp.float32)
    ok = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    img = jax.vmap(lambda s: span_mask(s, image_len, t))(starts)
    query = ok & ~img & (jnp.arange(t)[None] >= jnp.min(starts, axis=1)[:, None])
    v = jax.lax.stop_gradient(hidden).astype(jnp.float32)
    u = v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)), COS_EPS)
    q = jnp.sum(jnp.where(query[..., None], u, 0.0), axis=1)
    q = q / jnp.maximum(jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True)), COS_EPS)
    cos = jnp.einsum("btc,bc->bt", u, q, precision=_HI)
    s = cos if relevance == "similarity" else -cos
    lo = jnp.min(jnp.where(img, s, jnp.inf), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(img, s, -jnp.inf), axis=1, keepdims=True)
    r = (s - lo + REL_EPS) / jnp.maximum(hi - lo, REL_EPS)
    if theta is not None:
        r = jnp.exp(theta / (2.0 * (1.0 - theta)) * r)
    return jnp.where(jnp.any(query, axis=1, keepdims=True), r, 1.0)


def dpp_keep_indices(x: jax.Array, *, keep: int, num_protected: int = 0, valid: Optional[jax.Array] = None
                     ) -> jax.Array:
    """Batched question-free DPP (``r = 1``): the first ``num_protected`` tokens survive, ``keep`` are selected
    among the rest. ``x: [B, T, C]``, ``valid: [B, T]`` or ``None`` -> ``[B, num_protected + keep]`` int32
    ascending."""
    return prefix_keep_indices(lambda xb, vb: dpp_select(xb, keep, valid=vb), x, keep=keep,
                               num_protected=num_protected, valid=valid)


def _check_cdpruner_spans(hidden, image_starts, *, image_len, **_):
    """Eager value check (reduction._compiled): the image spans lie inside the sequence."""
    if getattr(hidden, "ndim", 0) == 3:
        check_concrete_spans(image_starts, image_len, hidden.shape[1], hidden.shape[0])


@eager_jit(check=_check_cdpruner_spans)
def cdpruner_keep_indices(hidden: jax.Array, image_starts: jax.Array, *, image_len: int, kept: int,
                          valid: Optional[jax.Array] = None, relevance: str = "similarity",
                          theta: Optional[float] = None) -> jax.Array:
    """CDPruner in an LLM sequence: ``kept`` tokens of each image span by the conditional DPP, every text token.

    ``hidden: [B, T, C]`` -> ``keep_idx: [B, T - M (image_len - kept)]`` int32 ascending."""
    check_rank(hidden, 3, "hidden")
    if check_count(kept, "kept", allow_zero=False) > check_count(image_len, "image_len", allow_zero=False):
        raise ValueError(f"kept={kept} exceeds image_len={image_len}")
    r = query_relevance(hidden, image_starts, image_len, valid, relevance=relevance, theta=theta)
    values = jnp.concatenate([hidden.astype(jnp.float32), r[..., None]], axis=-1)
    return span_keep_indices(lambda span: dpp_select(span[:, :-1], kept, span[:, -1]), values, image_starts,
                             image_len=image_len, kept=kept)


def dpp_flops(candidates: int, kept: int, dim: int) -> int:
    """The DPP selection on ``candidates`` tokens of width ``dim``: the ``N x N`` Gram matrix (``2 N^2 C``),
    row normalisation (``3 N C``), the kernel scaling (``2 N^2``) and ``kept`` fast-greedy picks (the
    ``[kept] x [kept, N]`` product, ``2 kept N``, plus the update, ``4 N``, and the argmax, ``N``)."""
    n = candidates
    return flops_lib.cosine_rows_flops(n, n, dim) + 3 * n * dim + 2 * n * n + kept * (2 * kept * n + 5 * n)


def relevance_flops(tokens: int, dim: int) -> int:
    """The relevance: normalise every token (``3 T C``), the query mean (``T C``), ``T`` cosines (``2 T C``)
    and the min-max (``4 T``)."""
    return 6 * tokens * dim + 4 * tokens


@dataclasses.dataclass(frozen=True)
class CDPruner(Reducer):
    """CDPruner at one layer: keep ``keep`` (or ``keep_ratio`` of the) candidates by greedy MAP of the
    conditional DPP on the hidden states (``info.hidden``, else ``state.x``); in the LLM per image span with
    the query relevance, elsewhere question-free (``r = 1``)."""

    keep_ratio: float = 0.5
    keep: Optional[int] = None
    relevance: str = "similarity"
    theta: Optional[float] = None
    needs: ClassVar[frozenset] = frozenset({HIDDEN})
    spans: ClassVar[bool] = True

    def num_out(self, num_tokens: int, info: LayerInfo) -> int:
        return pruned_count(num_tokens, info, self.keep_ratio, self.keep)

    def plan(self, state: TokenState, info: LayerInfo) -> ReductionStep:
        feats = info.hidden if info.hidden is not None else state.x
        t = state.num_tokens
        if info.in_spans:
            kept = candidates_kept(info.image_len, self.keep_ratio, self.keep)
            idx = cdpruner_keep_indices(feats, info.image_starts, image_len=info.image_len, kept=kept,
                                        valid=state.valid, relevance=self.relevance, theta=self.theta)
        else:
            p = min(info.num_protected, t)
            idx = dpp_keep_indices(feats, keep=self.num_out(t, info) - p, num_protected=p, valid=state.valid)
        return prune_step(idx, t)

    def flops(self, num_tokens: int, *, dim: int, heads: int) -> int:
        """Counted on all ``num_tokens`` tokens as candidates (the reducer does not see the spans here), so an
        upper bound where only some tokens are image tokens."""
        kept = candidates_kept(num_tokens, self.keep_ratio, self.keep)
        return dpp_flops(num_tokens, kept, dim) + relevance_flops(num_tokens, dim)


def _check_amount(keep_ratio, keep):
    keep_ratio = check_ratio(keep_ratio, "keep_ratio")
    if keep is not None:
        keep = check_count(keep, "keep", allow_zero=False)
    return keep_ratio, keep


@register("cdpruner", points=("vit", "vision", "connector", "llm"))
def _cdpruner_layers(num_layers: int, keep_ratio: float = 0.5, keep: Optional[int] = None,
                     relevance: str = "similarity", theta: Optional[float] = None,
                     layers=None) -> list[Optional[Reducer]]:
    """CDPruner (Zhang et al. 2025): greedy MAP of the conditional DPP ``diag(r) S diag(r)``. In the LLM ``r`` is
    the image tokens' similarity to the instruction tokens (GUESS; ``relevance="negative"``: the official sign,
    ``"none"``: r = 1); at the tower and connector ``r = 1``. ``theta``: the paper's exp trade-off (off)."""
    keep_ratio, keep = _check_amount(keep_ratio, keep)
    red = CDPruner(keep_ratio=keep_ratio, keep=keep, relevance=check_relevance(relevance), theta=check_theta(theta))
    chosen = set(default_layers(num_layers) if layers is None else layers)
    return [red if i in chosen else None for i in range(num_layers)]


__all__ = [
    "DPP_TOL",
    "cosine_similarity",
    "dpp_kernel",
    "dpp_greedy_order",
    "dpp_select",
    "query_relevance",
    "dpp_keep_indices",
    "cdpruner_keep_indices",
    "dpp_flops",
    "relevance_flops",
    "CDPruner",
]
