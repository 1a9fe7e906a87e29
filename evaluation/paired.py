"""Paired comparison of two settings scored on the same evaluation examples.

Two methods evaluated on the same examples disagree on only some of them; the exact McNemar test on those
discordant examples is the right test of "A is more accurate than B", and it is much tighter than comparing two
independent binomial accuracies. Used by the VLM sweep's report (``evaluation.vlm_sweep``).

    a, b: [N] 0/1 correctness of the two settings on the same N examples, in the same order.
"""

from __future__ import annotations

import math
from typing import Sequence


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - n/2| >= |wins - n/2|) for X ~ Binomial(n = wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_difference(a: Sequence[int], b: Sequence[int]) -> dict:
    """Accuracy of ``a`` minus that of ``b`` on the same examples, with its paired standard error and the exact
    McNemar p-value. ``wins``: examples ``a`` gets right and ``b`` wrong; ``losses``: the reverse."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same examples: {len(a)} vs {len(b)} scores")
    n = len(a)
    if n == 0:
        raise ValueError("paired comparison of zero examples")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    wins, losses = d.count(1), d.count(-1)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    return dict(n=n, diff=mean, se=math.sqrt(var / n), wins=wins, losses=losses, p=mcnemar_exact_p(wins, losses))


__all__ = ["mcnemar_exact_p", "paired_difference"]
