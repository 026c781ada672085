"""Every verdict of the study, decided by one rule.

A claim is a statistical statement: an **estimate** of an effect in the claimed direction
(positive = the claim), a two-sided **interval** ``[lo, hi]`` over the real sampling units
(images, pairs, top-ranked activations; seeds as a second source of variation where there are
several), a declared **minimum effect** ``min_effect`` (the smallest effect that would matter to a
reader, fixed beside the claim's definition, never tuned to a result) and, where the claim is about
training, a **control** (the same measure on a random-weight model of the same architecture, or
chance). The rule (:func:`decide`):

- **holds** when ``lo > 0`` and ``estimate >= min_effect``: the effect is there and large enough;
- **fails** when ``hi < min_effect``: the interval rules out an effect as large as the claimed
  minimum (the opposite direction, or a negligible effect measured precisely);
- **inconclusive** otherwise, and always with fewer than :data:`MIN_UNITS` units (the row's
  ``note`` says why).

Intervals:

- :func:`paired` (paired differences, ``(units,)`` or ``(units, seeds)``): a Student-t interval
  on the mean. For 1-D input the standard error is ``sd / sqrt(n)`` with ``n - 1`` degrees of
  freedom; for 2-D input it comes from the two-way random-effects decomposition (units and seeds
  both vary: ``Var(mean) = (MS_units + MS_seeds - MS_residual) / (U S)``, never below the
  units-only term) with Satterthwaite's degrees of freedom, so two seeds cannot pass for many.
  ``method="bca"`` (1-D only) uses :func:`scipy.stats.bootstrap` with BCa instead. The t interval
  is the default because it keeps its coverage at the small unit counts of the CPU study, where a
  percentile bootstrap undercovers (``tests/test_verdicts.py`` simulates the calibration: a null
  effect holds at most 5% of the time with 30 units, an effect of 4x the minimum at least 90%);
- :func:`proportion_vs_chance` (a share of units against the share a random choice of the same
  size gets, e.g. recall@k of a filter): the exact Clopper-Pearson interval of the share, minus
  chance;
- :func:`correlation` (a rank correlation over units): Spearman's rho with a BCa bootstrap
  interval over the units (:func:`scipy.stats.bootstrap`, paired resampling).

:func:`all_of` combines a claim's parts (e.g. "the trained model shows it" and "it beats the
random-weight control"): holds when every part holds, fails when any part fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICTS = ("holds", "fails", "inconclusive")
MIN_UNITS = 5
# the columns of a claim row, as every page writes them and the ledger shows them
CLAIM_COLUMNS = ("claim", "measure", "estimate", "lo", "hi", "min_effect", "control", "n_units", "verdict", "note")


def decide(estimate: float, lo: float, hi: float, min_effect: float) -> str:
    """The one rule: ``holds`` when ``lo > 0`` and ``estimate >= min_effect``; ``fails`` when
    ``hi < min_effect``; ``inconclusive`` otherwise (also when any number is not finite)."""
    if min_effect <= 0:
        raise ValueError(f"min_effect must be > 0 (the smallest effect that matters), got {min_effect}")
    if not all(np.isfinite(v) for v in (estimate, lo, hi)):
        return "inconclusive"
    if lo > 0 and estimate >= min_effect:
        return "holds"
    if hi < min_effect:
        return "fails"
    return "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """An estimate, its interval, the declared minimum effect and the verdict of :func:`decide`."""

    estimate: float
    lo: float
    hi: float
    min_effect: float
    verdict: str
    n_units: int
    method: str
    note: str = ""
    confidence: float = 0.95

    def row(self, claim: str, measure: str, control: float = float("nan"), **extra) -> dict:
        """One ledger row (:data:`CLAIM_COLUMNS` plus ``extra``). ``control``: the control's value
        of the same measure (random weights, chance), shown beside the estimate."""
        d = asdict(self)
        note = "; ".join(x for x in (self.note, f"{self.method}, {self.confidence:.0%} interval") if x)
        return dict(
            claim=claim,
            measure=measure,
            estimate=d["estimate"],
            lo=d["lo"],
            hi=d["hi"],
            min_effect=d["min_effect"],
            control=float(control),
            n_units=d["n_units"],
            verdict=d["verdict"],
            note=note,
            **extra,
        )


def _too_few(estimate: float, n: int, min_effect: float, method: str, confidence: float) -> Verdict:
    return Verdict(
        float(estimate),
        float("nan"),
        float("nan"),
        float(min_effect),
        "inconclusive",
        int(n),
        method,
        f"only {n} units (at least {MIN_UNITS} are needed for an interval)",
        confidence,
    )


def _check(min_effect: float, confidence: float) -> None:
    if not min_effect > 0:
        raise ValueError(f"min_effect must be > 0 (the smallest effect that matters), got {min_effect}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _t_interval(mean: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    if se == 0:
        return mean, mean
    q = float(stats.t.ppf((1 + confidence) / 2, df))
    return mean - q * se, mean + q * se


def _two_way(x: np.ndarray) -> tuple[float, float]:
    """(standard error of the grand mean, Satterthwaite df) of a units x seeds table."""
    u, s = x.shape
    grand = x.mean()
    rows, cols = x.mean(1), x.mean(0)
    ms_r = s * float(((rows - grand) ** 2).sum()) / (u - 1)
    ms_c = u * float(((cols - grand) ** 2).sum()) / (s - 1)
    resid = x - rows[:, None] - cols[None, :] + grand
    df_e = (u - 1) * (s - 1)
    ms_e = float((resid**2).sum()) / df_e
    var = (ms_r + ms_c - ms_e) / (u * s)
    if var <= ms_r / (u * s):  # never below the units-only term
        return float(np.sqrt(ms_r / (u * s))), float(u - 1)
    denom = ms_r**2 / (u - 1) + ms_c**2 / (s - 1) + ms_e**2 / df_e
    df = (ms_r + ms_c - ms_e) ** 2 / denom if denom > 0 else float(u - 1)
    return float(np.sqrt(var)), float(max(1.0, df))


def paired(
    diffs,
    min_effect: float,
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    method: str = "t",
) -> Verdict:
    """Verdict on paired differences in the claimed direction (positive = the claim).

    ``diffs``: ``(units,)`` or ``(units, seeds)``; units with a non-finite value are left out
    (the count kept is ``n_units``). The estimate is the mean; the interval a t interval over
    units (and seeds, for 2-D input; see the module docstring), or with ``method="bca"`` (1-D
    only) a BCa bootstrap of ``n_boot`` resamples seeded by ``seed``."""
    _check(min_effect, confidence)
    if method not in ("t", "bca"):
        raise ValueError(f"unknown interval method {method!r}; use 't' or 'bca'")
    x = np.asarray(diffs, dtype=float)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim not in (1, 2):
        raise ValueError(f"diffs must be (units,) or (units, seeds), got shape {x.shape}")
    x = x[np.isfinite(x).all(axis=1)] if x.ndim == 2 else x[np.isfinite(x)]
    n = int(x.shape[0])
    label = "t over units" if x.ndim == 1 else f"t over units x {x.shape[1]} seeds (two-way)"
    estimate = float(x.mean()) if n else float("nan")
    if n < MIN_UNITS:
        return _too_few(estimate, n, min_effect, label, confidence)
    if x.ndim == 2:
        if method != "t":
            raise ValueError("method='bca' takes 1-D diffs; average over seeds first or use method='t'")
        se, df = _two_way(x)
    elif method == "bca" and np.ptp(x) > 0:
        res = stats.bootstrap(
            (x,), np.mean, confidence_level=confidence, n_resamples=n_boot, method="BCa", random_state=seed
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        return Verdict(
            estimate,
            lo,
            hi,
            float(min_effect),
            decide(estimate, lo, hi, min_effect),
            n,
            "BCa bootstrap",
            "",
            confidence,
        )
    else:
        se, df = float(x.std(ddof=1) / np.sqrt(n)), float(n - 1)
    lo, hi = _t_interval(estimate, se, df, confidence)
    return Verdict(estimate, lo, hi, float(min_effect), decide(estimate, lo, hi, min_effect), n, label, "", confidence)


def proportion_vs_chance(hits: int, n: int, chance: float, min_effect: float, *, confidence: float = 0.95) -> Verdict:
    """Verdict on a share ``hits / n`` against ``chance``, the share a random choice of the same
    size gets in expectation (for recall@k of a filter that keeps ``m`` of ``N`` activations:
    ``hits`` of the exhaustive top ``n = k`` survive, ``chance = m / N``, the hypergeometric mean).
    Estimate ``hits / n - chance``, interval the exact Clopper-Pearson interval of the share
    minus chance. A filter that keeps everything has chance 1 and cannot hold."""
    _check(min_effect, confidence)
    hits, n = int(hits), int(n)
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in [0, n], got hits={hits}, n={n}")
    if not 0 <= chance <= 1:
        raise ValueError(f"chance must be a share in [0, 1], got {chance}")
    estimate = hits / n - chance if n else float("nan")
    if n < MIN_UNITS:
        return _too_few(estimate, n, min_effect, "exact binomial vs chance", confidence)
    ci = stats.binomtest(hits, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = float(ci.low) - chance, float(ci.high) - chance
    return Verdict(
        float(estimate), lo, hi, float(min_effect), decide(estimate, lo, hi, min_effect), n,
        "Clopper-Pearson minus chance", f"chance {chance:.3f}", confidence,
    )  # fmt: skip


def correlation(
    x,
    y,
    min_effect: float,
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Verdict:
    """Verdict on a positive rank correlation (Spearman's rho) between ``x`` and ``y`` over units,
    with a BCa bootstrap interval (units resampled in pairs). For a negative claimed direction
    pass ``-y``. Pairs with a non-finite value are left out."""
    _check(min_effect, confidence)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    label = "Spearman, BCa bootstrap over units"
    if n < MIN_UNITS or np.ptp(x) == 0 or np.ptp(y) == 0:
        rho = float(stats.spearmanr(x, y).statistic) if n >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")
        return _too_few(rho, n, min_effect, label, confidence)
    rho = float(stats.spearmanr(x, y).statistic)
    res = stats.bootstrap(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        confidence_level=confidence,
        n_resamples=n_boot,
        method="BCa",
        random_state=seed,
    )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Verdict(rho, lo, hi, float(min_effect), decide(rho, lo, hi, min_effect), n, label, "", confidence)


def all_of(parts: Sequence[Verdict]) -> str:
    """The verdict of a claim made of parts: ``holds`` when every part holds, ``fails`` when any
    part fails, else ``inconclusive``."""
    if not parts:
        raise ValueError("all_of needs at least one part")
    vs = [p.verdict for p in parts]
    if "fails" in vs:
        return "fails"
    return "holds" if all(v == "holds" for v in vs) else "inconclusive"


__all__ = [
    "VERDICTS",
    "MIN_UNITS",
    "CLAIM_COLUMNS",
    "Verdict",
    "decide",
    "paired",
    "proportion_vs_chance",
    "correlation",
    "all_of",
]


def controlled_row(claim: str, measure: str, trained: Verdict, versus: Verdict, control: float, **extra) -> dict:
    """The ledger row of a claim about training: ``trained`` (the measure on the trained model,
    against its minimum effect), ``versus`` (trained minus the random-weight control, paired over
    the same units, against its minimum effect) and ``control`` (the control's value). Estimate and
    interval are the trained model's; ``vs_control``, ``vs_lo``, ``vs_hi`` and ``vs_min_effect``
    those of the difference; the verdict is :func:`all_of` both."""
    row = trained.row(claim, measure, control=control, **extra)
    row.update(
        vs_control=versus.estimate,
        vs_lo=versus.lo,
        vs_hi=versus.hi,
        vs_min_effect=versus.min_effect,
        verdict=all_of([trained, versus]),
    )
    notes = [f"trained: {trained.verdict}", f"beats random weights: {versus.verdict}"]
    notes += [n for n in (trained.note, versus.note) if n]
    row["note"] = "; ".join(dict.fromkeys(notes)) + f"; {trained.method}"
    return row


__all__ += ["controlled_row"]
