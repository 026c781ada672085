"""The one verdict rule (difstudy.verdicts): its calibration, simulated with known truth."""

import numpy as np
import pytest

from difstudy import verdicts as V

MIN = 0.1  # a declared minimum effect; the noise below is 5x it


def _rate(draw, verdict, n_sim=1000, **kw):
    return float(np.mean([V.paired(draw(), MIN, **kw).verdict == verdict for _ in range(n_sim)]))


def test_a_null_effect_holds_at_most_5_percent():
    rng = np.random.default_rng(0)
    assert _rate(lambda: rng.normal(0, 5 * MIN, 30), "holds") <= 0.05
    # heavy tails and small samples too
    assert _rate(lambda: rng.standard_t(3, 30) * 3 * MIN, "holds") <= 0.05
    assert _rate(lambda: rng.normal(0, 5 * MIN, 8), "holds") <= 0.05


def test_an_effect_of_four_times_the_minimum_holds_at_least_90_percent():
    rng = np.random.default_rng(1)
    assert _rate(lambda: rng.normal(4 * MIN, 5 * MIN, 30), "holds") >= 0.90


def test_a_negligible_effect_with_many_units_fails_at_least_90_percent():
    rng = np.random.default_rng(2)
    assert _rate(lambda: rng.normal(0.1 * MIN, 5 * MIN, 1000), "fails", n_sim=300) >= 0.90


def test_two_way_input_counts_seeds_as_a_source_of_variation():
    rng = np.random.default_rng(3)

    def null():  # units x 3 seeds with a shared per-seed offset (what a seed changes for every unit)
        return rng.normal(0, 0.3, (30, 1)) + rng.normal(0, 0.3, (1, 3)) + rng.normal(0, 0.3, (30, 3))

    assert _rate(null, "holds") <= 0.05
    # averaging over seeds first and treating units as independent would hold far more often
    naive = np.mean([V.paired(null().mean(1), MIN).verdict == "holds" for _ in range(1000)])
    assert naive > 0.15
    assert _rate(lambda: 4 * MIN + rng.normal(0, 0.3, (30, 3)), "holds") >= 0.90


def test_rule_and_too_few_units():
    assert V.decide(0.5, 0.1, 0.9, 0.2) == "holds"
    assert V.decide(0.15, 0.01, 0.3, 0.2) == "inconclusive"  # above 0 but smaller than the minimum
    assert V.decide(0.05, 0.01, 0.1, 0.2) == "fails"  # rules out the minimum
    assert V.decide(-0.5, -0.9, -0.1, 0.2) == "fails"  # the opposite direction
    v = V.paired([1.0, 2.0, 3.0, 4.0], 0.1)
    assert v.verdict == "inconclusive" and v.n_units == 4 and "only 4 units" in v.note
    with pytest.raises(ValueError, match="min_effect"):
        V.paired(np.ones(10), 0.0)
    with pytest.raises(ValueError, match="units"):
        V.paired(np.ones((2, 2, 2)), 0.1)


def test_constant_differences_and_nan_units():
    v = V.paired(np.full(10, 0.5), 0.1)
    assert (v.lo, v.hi, v.verdict) == (0.5, 0.5, "holds")
    x = np.r_[np.full(10, 0.5), np.nan]
    assert V.paired(x, 0.1).n_units == 10


def test_bca_option_agrees_with_t_on_a_clear_effect():
    x = np.random.default_rng(4).normal(1.0, 0.5, 40)
    t, b = V.paired(x, 0.1), V.paired(x, 0.1, method="bca")
    assert t.verdict == b.verdict == "holds"
    assert abs(t.lo - b.lo) < 0.1 and abs(t.hi - b.hi) < 0.1


def test_proportion_against_chance():
    # 8 of the exhaustive top 10 kept by a filter that keeps 20 of 100: far above chance 0.2
    v = V.proportion_vs_chance(8, 10, 0.2, 0.2)
    assert v.verdict == "holds" and v.estimate == pytest.approx(0.6)
    # a filter that keeps everything: recall 1 = chance, cannot hold
    assert V.proportion_vs_chance(10, 10, 1.0, 0.2).verdict == "fails"
    # recall at chance with few units: not decided either way
    assert V.proportion_vs_chance(2, 10, 0.2, 0.2).verdict == "inconclusive"


def test_correlation_and_combination():
    rng = np.random.default_rng(5)
    x = np.arange(30.0)
    assert V.correlation(x, x + rng.normal(0, 3, 30), 0.3).verdict == "holds"
    assert V.correlation(x, -x + rng.normal(0, 3, 30), 0.3).verdict == "fails"
    a, b = V.paired(np.full(10, 1.0), 0.1), V.paired(np.full(10, -1.0), 0.1)
    assert V.all_of([a, a]) == "holds" and V.all_of([a, b]) == "fails"
    row = V.controlled_row("c", "m", a, b, control=0.3)
    assert row["verdict"] == "fails" and row["control"] == 0.3 and row["vs_control"] == -1.0
    assert set(V.CLAIM_COLUMNS) <= set(row)
