"""Per-layer schedules, resolved to Python ints before tracing.

Every function here is plain Python: the results are static shapes for ``jax.jit``. The token counts
they report already include each method's clamp, so the clamp is visible in ``tokens_per_layer``.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

from reduction.validate import check_count, check_ratio

RSpec = Union[int, Sequence[int], tuple]


def tome_r_schedule(num_layers: int, r: RSpec) -> list[int]:
    """ToMe's ``parse_r``: the number of tokens each layer asks to remove (before the per-layer clamp).

    * ``int r`` -> ``[r] * num_layers``;
    * ``(r, inflect)`` (a 2-tuple with a float second item) -> linear from ``lo = int(r * (1 - inflect))``
      to ``hi = 2r - lo``, each value truncated toward zero (``(r, -1)`` is the paper's decreasing
      schedule: ``(16, -1)`` on 12 layers gives ``[32, 29, ..., 2, 0]``);
    * a list -> padded with zeros to ``num_layers`` (longer lists are an error).
    """
    num_layers = check_count(num_layers, "num_layers", allow_zero=False)
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        base = check_count(base, "r")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        if num_layers == 1:
            return [max(lo, 0)]
        step = (hi - lo) / (num_layers - 1)
        out = [int(lo + step * i) for i in range(num_layers)]
        for i, v in enumerate(out):
            if v < 0:
                raise ValueError(f"r schedule {r} gives a negative r={v} at layer {i}")
        return out
    if isinstance(r, (list, tuple)):
        values = [check_count(v, f"r[{i}]") for i, v in enumerate(r)]
        if len(values) > num_layers:
            raise ValueError(f"r has {len(values)} entries for {num_layers} layers")
        return values + [0] * (num_layers - len(values))
    return [check_count(r, "r")] * num_layers


def tome_clamp(num_tokens: int, r: int, protected: int) -> int:
    """ToMe's per-layer cap: at most half of the mergeable tokens, ``min(r, (T - protected) // 2)``."""
    return max(0, min(r, (num_tokens - protected) // 2))


def tome_tokens_per_layer(num_tokens: int, r_schedule: Sequence[int], *, protected: int = 1) -> tuple[list[int], list[int]]:
    """Apply the ToMe clamp layer by layer.

    Returns ``(effective_r, tokens)`` where ``tokens[l]`` is the count entering layer ``l`` and
    ``tokens[-1]`` the count leaving the last layer (length ``L + 1``). DeiT-S with ``r=13`` gives
    ``197, 184, ..., 41``.
    """
    tokens = [num_tokens]
    eff = []
    for r in r_schedule:
        e = tome_clamp(tokens[-1], r, protected)
        eff.append(e)
        tokens.append(tokens[-1] - e)
    return eff, tokens


def ratio_to_r(num_tokens: int, ratio: float, *, protected: int = 1) -> int:
    """PiToMe's count rule: ``r = floor(T' - T' * ratio)`` on the ``T' = T - protected`` mergeable tokens,
    evaluated in Python float64 (``T'=196, ratio=0.9 -> 19``). ``ratio`` is the fraction *kept*."""
    ratio = check_ratio(ratio, "ratio")
    t = num_tokens - protected
    return int(math.floor(t - t * ratio))


def keep_count(num_tokens: int, ratio: float, *, protected: int = 0) -> int:
    """Tokens kept by a pruning method at keep ratio ``ratio`` in (0, 1]: the ``protected`` tokens plus
    ``floor(candidates * ratio)`` candidates (at least one)."""
    ratio = check_ratio(ratio, "ratio")
    cand = num_tokens - protected
    return protected + max(1, int(math.floor(cand * ratio))) if cand > 0 else num_tokens


def constant_ratio_tokens(num_tokens: int, num_layers: int, ratio: float, *, protected: int = 1) -> list[int]:
    """Token counts under a keep ratio applied in every layer (geometric decay, PiToMe style), with
    PiToMe's constraint that ``2r`` cannot exceed the mergeable count. Length ``L + 1``."""
    tokens = [num_tokens]
    for _ in range(num_layers):
        r = min(ratio_to_r(tokens[-1], ratio, protected=protected), (tokens[-1] - protected) // 2)
        tokens.append(tokens[-1] - max(r, 0))
    return tokens
