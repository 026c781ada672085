"""GATE, step 6: the claims, the guideline and the page's summary tables.

**Claims** are decided by :mod:`difstudy.verdicts` only, on paired differences in the claimed
direction against a minimum effect declared beside each claim (``MIN_*`` constants):
:func:`content_shift_claims` and :func:`guideline_table` pair over the images (an image's
difference is its mean over the measured t); :func:`feature_claims` pairs over the run seeds
(the protocols report one score per seed, so with fewer than 5 seeds a feature claim is
inconclusive). The guideline's ``helps`` / ``hurts`` labels are display text derived from those
verdicts (:func:`guideline_effect`). "Content shift exists" compares each reconstruction with the
VAE round trip of the same image (the control), for every score. A claim whose weights are
missing, or whose score a run switched off (``judge`` on real images), is an inconclusive row
noted ``not measured``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from .. import verdicts
from ..reference import GATE_PAPER, reference_frame
from .scores import MEASURES

# -- claims: every verdict comes from difstudy.verdicts ---------------------------------
HOLDS, FAILS, INCONCLUSIVE = verdicts.VERDICTS
# the note of a claim that could not be measured (weights missing, a score switched off)
NOT_MEASURED = "not measured"

# The smallest change of a content-shift score that matters to a reader, per score. Fixed before
# any claim was measured, from the scores' own scale, never from an effect:
# - structure (1 - SSIM): 0.01, one point of SSIM; the between-image standard deviation of the
#   score is 0.05-0.09 on the mini model's 64 px toy images (VAE, x0 and img2img at t = 50 and
#   200, 16 validation images), so one point is about a sixth of it, a small standardised effect.
# - contour (mean |Laplacian difference|, blur sigma 1): 0.002, a fifth of the typical
#   between-image standard deviation of the score (0.007-0.016, mean 0.011, on the same 16 images),
#   Cohen's "small" effect (d = 0.2); about a thirtieth of a full-contrast edge across a 64 px image
#   moving by one pixel (4 / 64 without blur). The score is per pixel, so at another image size
#   (SD1.5 at 512 px) its scale differs and the page says so.
# - lost, invented and judge, each a fifth (Cohen's d = 0.2) of its own between-image standard
#   deviation, measured before any claim on them: the mini model, 16 toy-world validation images
#   (ToyWorld("val", n=16, size=64, seed=0)), technique basic, VAE, x0 and img2img (50 DDIM steps)
#   at t = 50 and 200, seed 0; the sd over images per (method, t), then its mean over the 5 groups:
#   - lost (detail lost, blur sigma 1, tolerance 1 px): sd 0.0015-0.0063, mean 0.0035 -> 0.0007;
#   - invented (detail invented, the same): sd 0.00058-0.0011, mean 0.00078 -> 0.00016;
#   - judge (1 - cos of the toy-world judge's features): sd 0.054-0.081, mean 0.071 -> 0.014.
#   (On 16 test images instead: contour sd mean 0.008, lost 0.0038, invented 0.00073, judge 0.044.)
#   lost and invented are per pixel like contour, so their scale differs at other image sizes.
MIN_SHIFT = {"contour": 0.002, "structure": 0.01, "lost": 0.0007, "invented": 0.00016, "judge": 0.014}
# "content shift exists": the reconstruction's shift above the VAE floor, per image, reaches this
MIN_SHIFT_EXISTS = MIN_SHIFT
# "content shift grows with t": the per-image Spearman correlation of t and the shift, mean over
# images, reaches 0.3, Cohen's "medium" correlation; below it t orders less than a tenth of the
# shift's rank variance, which is not what "grows with t" tells a reader.
MIN_SHIFT_RHO = 0.3


def _claim_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(verdicts.CLAIM_COLUMNS))


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either is constant."""
    return float(pd.Series(np.asarray(x, float)).rank().corr(pd.Series(np.asarray(y, float)).rank()))


# the control of "content shift exists", named in the rows' notes; its mean shift is the ``control`` value
VAE_CONTROL = "control: the VAE round trip (encode, decode, no U-Net), its mean shift in `control`"


def measured(df: pd.DataFrame) -> list[str]:
    """The scores of :data:`~difstudy.gate.scores.MEASURES` that ``df`` has a column for (frames
    from before a score existed lack it; a column that is all NaN, e.g. ``judge`` switched off,
    is kept: its claims are inconclusive rows noted ``not measured``)."""
    return [m for m in MEASURES if m in df.columns]


def _unmeasured_row(claim: str, measure: str, min_effect: float, why: str) -> dict:
    """An inconclusive row (no units, so :func:`difstudy.verdicts.paired` decides it) noted ``not measured``."""
    row = verdicts.paired([], min_effect).row(claim, measure)
    row["note"] = f"{NOT_MEASURED}: {why}"
    return row


def content_shift_claims(
    df: pd.DataFrame, technique: str = "basic", t_ref: int = 50, confidence: float = 0.95
) -> pd.DataFrame:
    """Claim rows (:data:`difstudy.verdicts.CLAIM_COLUMNS`), per reconstruction method and score
    (every column of :data:`~difstudy.gate.scores.MEASURES` the frame has, :func:`measured`),
    decided by :func:`difstudy.verdicts.paired` over the images (the sampling units):

    - "content shift exists": per image, the reconstruction's shift at ``t_ref`` (the middle t
      when ``t_ref`` was not measured) minus the same image's shift through the VAE round trip
      (the control: encode, decode, no U-Net, so no shift beyond the autoencoder's; the raw shift
      when the frame has no ``vae`` rows); minimum effect :data:`MIN_SHIFT_EXISTS`. The row's
      ``control`` is the control's mean shift over the images, and its note names the control;
    - "content shift grows with t" (two or more t): per image, Spearman's rho of t and the shift
      over the measured t; minimum effect :data:`MIN_SHIFT_RHO`.

    A score whose column is all NaN (``judge`` with ``ShiftConfig(judge=False)``, for real
    images) gives the same claims as inconclusive rows noted ``not measured``."""
    rows = []
    d = df[df["technique"] == technique]
    measures = measured(df)
    floor = df[df["method"] == "vae"].groupby("image_id")[measures].mean()
    for method in [m for m in ("x0", "img2img") if m in set(d["method"])]:
        dm = d[d["method"] == method]
        ts = sorted(dm["t"].unique())
        t0 = t_ref if t_ref in ts else ts[len(ts) // 2]
        what = ", above the VAE floor" if len(floor) else ""
        exists = f"content shift exists ({method}, t={t0}{what})"
        grows = f"content shift grows with t ({method}, t={ts[0]}..{ts[-1]})"
        for measure in measures:
            shift = f"{measure} shift{' - VAE floor' if what else ''}, mean over images"
            rho_name = f"Spearman rho(t, {measure}) per image, mean over images"
            if not dm[measure].notna().any():
                why = f"no {measure} scores in the table (e.g. ShiftConfig(judge=False) for real images)"
                rows.append(_unmeasured_row(exists, shift, MIN_SHIFT_EXISTS[measure], why))
                if len(ts) > 1:
                    rows.append(_unmeasured_row(grows, rho_name, MIN_SHIFT_RHO, why))
                continue
            at = dm[dm["t"] == t0].groupby("image_id", sort=False)[measure].mean()
            control = float("nan")
            if len(floor):
                control = float(floor[measure].reindex(at.index).mean())
                at = at - floor[measure].reindex(at.index)
            v = verdicts.paired(at.to_numpy(), MIN_SHIFT_EXISTS[measure], confidence=confidence)
            if len(floor):
                v = replace(v, note="; ".join(x for x in (VAE_CONTROL, v.note) if x))
            rows.append(v.row(exists, shift, control=control))
            if len(ts) > 1:
                rho = [spearman(g["t"], g[measure]) for _, g in dm.groupby("image_id", sort=False)]
                v = verdicts.paired(rho, MIN_SHIFT_RHO, confidence=confidence)
                rows.append(v.row(grows, rho_name))
    return _claim_frame(rows)


def t_label(ts) -> str:
    """``t=50`` for one timestep, ``t=25,50,100`` for several (names claims measured at different t apart)."""
    return "t=" + ",".join(str(int(t)) for t in sorted(set(ts)))


# "<technique> lowers content shift": per image, the shift without the technique minus with it
# reaches the smallest change that matters, MIN_SHIFT (the same scale as "content shift exists")
MIN_SHIFT_REDUCTION = MIN_SHIFT
# display text of the guideline, each derived from verdicts (:func:`guideline_effect`)
EFFECTS = ("helps", "hurts", "negligible", "no clear effect")


def guideline_effect(lowers: verdicts.Verdict, raises: verdicts.Verdict) -> str:
    """Display text of the guideline from two verdicts of :mod:`difstudy.verdicts` on the same
    images: ``helps`` when "lowers content shift" holds, ``hurts`` when "raises content shift"
    holds, ``negligible`` when both fail (the interval rules out a change as large as the minimum
    either way), else ``no clear effect``."""
    if lowers.verdict == HOLDS:
        return "helps"
    if raises.verdict == HOLDS:
        return "hurts"
    return "negligible" if lowers.verdict == FAILS and raises.verdict == FAILS else "no clear effect"


def guideline_table(df: pd.DataFrame, baseline: str = "basic", confidence: float = 0.95) -> pd.DataFrame:
    """The GATE guideline per technique, method and measure, paired over images (the sampling
    units; an image's difference is its mean over the measured t). Every score the frame has a
    column for (:func:`measured`) except one that is all NaN (``judge`` switched off): it is
    left out.

    Columns: ``without`` / ``with_technique`` (mean shift); ``estimate``, ``lo``, ``hi``,
    ``min_effect``, ``n_units``, ``claim_verdict`` and ``note``: :func:`difstudy.verdicts.paired`
    on the reduction (without - with, the claim's direction) against :data:`MIN_SHIFT_REDUCTION`;
    ``claim``: the claim's name (:func:`guideline_claims`); ``verdict``: display text
    (:func:`guideline_effect`: ``helps``, ``hurts``, ``negligible``, ``no clear effect``);
    ``difference``, ``ci_low``, ``ci_high``: with - without and its interval (the plot's axis,
    ``-estimate``, ``-hi``, ``-lo``)."""
    d = df[df["method"] != "vae"]
    base = d[d["technique"] == baseline].set_index(["image_id", "method", "t"])
    measures = [m for m in measured(d) if d[m].notna().any()]  # a score switched off has no guideline
    rows = []
    for (name, method), g in d[d["technique"] != baseline].groupby(["technique", "method"], sort=False):
        for measure in measures:
            b = base.loc[[(i, method, t) for i, t in zip(g["image_id"], g["t"])], measure].to_numpy()
            per = g[["image_id"]].assign(r=b - g[measure].to_numpy()).groupby("image_id", sort=False)["r"].mean()
            m = MIN_SHIFT_REDUCTION[measure]
            lowers = verdicts.paired(per.to_numpy(), m, confidence=confidence)
            raises = verdicts.paired(-per.to_numpy(), m, confidence=confidence)
            tl = t_label(g["t"])
            row = lowers.row(f"{name} lowers content shift ({method}, {tl})", f"{measure} shift without - with")
            rows.append(
                dict(
                    technique=name,
                    method=method,
                    t=tl,
                    measure=measure,
                    without=float(b.mean()),
                    with_technique=float(g[measure].mean()),
                    estimate=lowers.estimate,
                    lo=lowers.lo,
                    hi=lowers.hi,
                    min_effect=m,
                    n_units=lowers.n_units,
                    claim_verdict=lowers.verdict,
                    verdict=guideline_effect(lowers, raises),
                    difference=-lowers.estimate,
                    ci_low=-lowers.hi,
                    ci_high=-lowers.lo,
                    claim=row["claim"],
                    note=row["note"],
                )
            )
    return pd.DataFrame(rows)


def guideline_claims(table: pd.DataFrame) -> pd.DataFrame:
    """Claim rows (:data:`difstudy.verdicts.CLAIM_COLUMNS`) "<technique> lowers content shift"
    from :func:`guideline_table`: its verdicts, copied (``claim_verdict``), not decided again."""
    if not len(table):
        return _claim_frame([])
    t = table.dropna(subset=["claim"])
    out = t.assign(measure=[f"{m} shift without - with, mean over images" for m in t["measure"]], control=np.nan)
    return _claim_frame(out.drop(columns=["verdict"]).rename(columns={"claim_verdict": "verdict"}).to_dict("records"))


# -- the feature claims and the page's tables ------------------------------------
TASK_METRICS = {"correspondence": "PCK@0.1 img", "label-scarce-seg": "mIoU", "classification": "accuracy"}


def _paired(results: pd.DataFrame, task: str, a: str, b: str) -> np.ndarray:
    """Per seed, main metric of setting ``a`` minus setting ``b`` on ``task`` (seeds both ran)."""
    d = results[(results["task"] == task) & (results["metric"] == TASK_METRICS[task])]
    pa = d[d["setting"] == a].set_index("seed")["value"]
    pb = d[d["setting"] == b].set_index("seed")["value"]
    common = sorted(set(pa.index) & set(pb.index))
    return (pa.loc[common] - pb.loc[common]).to_numpy(float)


# The feature claims' minimum effects, in the task's main metric (PCK@0.1, mIoU, accuracy, all in
# [0, 1]): one point (0.01), the smallest difference a reader of a benchmark table acts on (the
# paper's GATE gains are 0.7 to 2.6 points).
# "<technique> improves features": technique - baseline reaches one point
MIN_FEATURE_GAIN = 0.01
# "amalgamation beats the best single technique": amalgamated - best single setting, one point
MIN_AMALGAMATION_GAIN = 0.01
# "the gain is not just diversity": amalgamated techniques - amalgamated timesteps, one point
MIN_DIVERSITY_GAIN = 0.01
# what the units of a feature claim are, in its note
SEED_UNITS = "units: run seeds (the protocols report one score per seed, no per-pair or per-image scores)"


def _seed_row(claim: str, measure: str, diffs, min_effect: float, confidence: float) -> dict:
    """A claim row from per-seed differences (:func:`difstudy.verdicts.paired` over the seeds;
    fewer than :data:`difstudy.verdicts.MIN_UNITS` seeds are inconclusive, and the note says so)."""
    v = verdicts.paired(diffs, min_effect, confidence=confidence)
    return replace(v, note="; ".join(x for x in (SEED_UNITS, v.note) if x)).row(claim, measure)


def _not_measured(claim: str, measure: str, status: pd.DataFrame, names: Sequence[str], min_effect: float) -> dict:
    """The row of a claim whose techniques' weights are missing: no units, so
    :func:`difstudy.verdicts.paired` finds it inconclusive; the note says why and how to get them."""
    how = "; ".join(f"{r.technique}: {r.how_to_get}" for r in status.itertuples() if r.technique in names)
    return _unmeasured_row(claim, measure, min_effect, f"weights missing ({how})")


def guideline_rows(guide: pd.DataFrame, status: pd.DataFrame, method: str = "img2img") -> pd.DataFrame:
    """Claim rows "<technique> lowers content shift" (:func:`guideline_claims` on ``method``),
    plus an inconclusive row per score, noted ``not measured``, for every technique of ``status``
    whose weights are missing."""
    measured = guideline_claims(guide[guide["method"] == method] if len(guide) else guide)
    missing = [_not_measured(f"{r.technique} lowers content shift ({method})",
                             f"{m} shift without - with, mean over images", status, [r.technique],
                             MIN_SHIFT_REDUCTION[m])
               for r in status.itertuples() if not r.available for m in MEASURES]  # fmt: skip
    return _claim_frame([*measured.to_dict("records"), *missing])


def feature_claims(
    results: pd.DataFrame,
    status: pd.DataFrame,
    baseline: str = "basic",
    control: str | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The feature claims of GATE per task (main metric of :data:`TASK_METRICS`) as claim rows
    (:data:`difstudy.verdicts.CLAIM_COLUMNS`), each :func:`difstudy.verdicts.paired` on the
    per-seed differences (the protocols report one score per seed, so the seeds are the units;
    with fewer than 5 seeds a claim is inconclusive):

    - "<technique> improves features": technique - baseline, for every technique of ``status``
      measured alone (a setting of ``results``; inconclusive, noted ``not measured``, when its
      weights are missing); :data:`MIN_FEATURE_GAIN`;
    - "amalgamation beats the best single technique": amalgamated - the best single setting
      (baseline or technique, by mean); :data:`MIN_AMALGAMATION_GAIN`;
    - "the gain is not just diversity": amalgamated techniques - amalgamated timesteps
      (``control``); :data:`MIN_DIVERSITY_GAIN`."""
    rows = []
    settings = list(dict.fromkeys(results["setting"]))
    amal = next((s for s in settings if s.startswith("amalgamated") and s != control), None)
    missing = [r.technique for r in status.itertuples() if not r.available]
    note = f" ({', '.join(missing)} {NOT_MEASURED})" if missing else ""
    for task in dict.fromkeys(results["task"]):
        metric = TASK_METRICS.get(task)
        if metric is None:
            continue
        for r in status.itertuples():
            if r.available and r.technique not in settings:
                continue  # measured only inside the amalgamation (the official set's second seeds and weights)
            claim = f"{r.technique} improves features ({task})"
            measure = f"{metric}: {r.technique} - {baseline}, mean over seeds"
            if not r.available:
                rows.append(_not_measured(claim, measure, status, [r.technique], MIN_FEATURE_GAIN))
                continue
            d = _paired(results, task, r.technique, baseline)
            rows.append(_seed_row(claim, measure, d, MIN_FEATURE_GAIN, confidence))
        if amal is None:
            continue
        singles = [s for s in settings if not s.startswith("amalgamated")]
        d = results[(results["task"] == task) & (results["metric"] == metric)]
        best = d[d["setting"].isin(singles)].groupby("setting")["value"].mean().idxmax()
        rows.append(_seed_row(f"amalgamation beats the best single technique ({task}){note}",
                              f"{metric}: {amal} - {best}, mean over seeds",
                              _paired(results, task, amal, best), MIN_AMALGAMATION_GAIN, confidence))  # fmt: skip
        if control is not None and control in settings:
            rows.append(_seed_row(f"the gain is not just diversity ({task}){note}",
                                  f"{metric}: {amal} - {control}, mean over seeds",
                                  _paired(results, task, amal, control), MIN_DIVERSITY_GAIN, confidence))  # fmt: skip
    return _claim_frame(rows)


def technique_summary(results: pd.DataFrame, status: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """:func:`difstudy.protocols.render` of ``results`` by setting, with a row ``not measured``
    for every technique whose weights are missing."""
    from ..protocols import render

    table = render(results.assign(features=results["setting"]), index="features", digits=digits)
    for r in status.itertuples():
        if not r.available and r.technique not in table.index:
            table.loc[r.technique] = NOT_MEASURED
    table.index.name = "setting"
    return table


def guideline_summary(guide: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """The guideline table with a ``not measured`` row per technique whose weights are missing."""
    rows = [dict(technique=r.technique, verdict=NOT_MEASURED, reason=r.reason, how_to_get=r.how_to_get)
            for r in status.itertuples() if not r.available]  # fmt: skip
    return pd.concat([guide, pd.DataFrame(rows)], ignore_index=True)


def shift_summary(df: pd.DataFrame, default_subset: str = "all backgrounds") -> pd.DataFrame:
    """Mean of every content-shift score (:func:`measured`) over images and t, per technique and
    reconstruction method of :func:`difstudy.gate.content_shift_table` rows, and per ``subset``
    where the frame has that column (the images a technique was measured on, e.g. the LoRA's
    domain with its own ``basic`` rows; rows without one are ``default_subset``), so that a
    technique is only compared with the baseline on the same images."""
    keys = ["technique", "method"]
    if "subset" in df.columns:
        df, keys = df.assign(subset=df["subset"].fillna(default_subset)), ["subset", *keys]
    return df.groupby(keys, sort=False)[measured(df)].mean()


def reference_table() -> pd.DataFrame:
    """The GATE paper's numbers (reference only, not measured here), one row per setting and
    metric with its ``source`` (paper, task, row) and what it ``includes`` (models, techniques,
    head): :func:`difstudy.reference.reference_frame` of :data:`difstudy.reference.GATE_PAPER`.
    Its Horse-21 row is ``GATE (SD1.5 + LSUN-horse DDPM)``: the official code adds DDPM features."""
    return reference_frame(GATE_PAPER)
