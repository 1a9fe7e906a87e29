"""evaluation.paired: the exact McNemar test against scipy's binomial test, the paired SE against a loop."""

import numpy as np
import pytest
from scipy import stats

from evaluation.paired import mcnemar_exact_p, paired_difference
from evaluation.vlm_sweep import paired_table


@pytest.mark.parametrize("wins,losses", [(0, 0), (3, 0), (9, 1), (10, 10), (17, 6), (0, 25)])
def test_mcnemar_matches_scipy_binomtest(wins, losses):
    want = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert mcnemar_exact_p(wins, losses) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_paired_difference_against_a_loop():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.45).astype(int)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)       # mostly the same examples right
    d = paired_difference(a.tolist(), b.tolist())
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    se = (sum((v - mean) ** 2 for v in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    assert d["diff"] == pytest.approx(a.mean() - b.mean())
    assert d["se"] == pytest.approx(se)
    assert (d["wins"], d["losses"]) == (int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
    # the paired SE is below the independent-samples one when the two settings agree on most examples
    assert d["se"] < np.sqrt(a.mean() * (1 - a.mean()) / 300 + b.mean() * (1 - b.mean()) / 300)


def test_paired_difference_refuses_different_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1, 0], [1])


def test_sweep_report_pairs_each_method_with_random_at_its_budget():
    rows = [dict(label="none", point="none", method="none", fraction=1.0, correct=[1, 1, 1, 0]),
            dict(label="connector:random@0.111", point="connector", method="random", fraction=1 / 9,
                 correct=[0, 0, 1, 0]),
            dict(label="llm:dart@0.111", point="llm", method="dart", fraction=1 / 9, correct=[1, 1, 1, 0]),
            dict(label="llm:dart@0.333", point="llm", method="dart", fraction=1 / 3, correct=[1, 1, 1, 0])]
    table = paired_table(rows)
    assert "| llm:dart@0.111 | connector:random@0.111 | +50.0 |" in table
    assert "2 / 0" in table
    assert "@0.333" not in table          # no random row at that budget
