"""Paper 1's property claims on per-image property tables (:mod:`difstudy.properties`), each
decided by :mod:`difstudy.verdicts` against a declared minimum effect and a random-weight control.
Re-exported by :mod:`difstudy.properties` (``properties.claims``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .properties import IMAGE_COLUMNS, _at_t

# The claims' minimum effects: the smallest effect that would matter to a reader, declared
# here beside the claims' definitions (never tuned to a result). Each claim must reach it on
# the trained model and beat the random-weight control by it, paired over images.
MIN_NOISE_GAP = 0.05
"""Noise-share claims: 5 points of an activation's spatial variance (noise share is a share in [0, 1])."""
MIN_NOISE_GROWTH = 0.05
"""Noise share growing with t: 5 points of variance between the smallest and the largest t."""
MIN_GRANULARITY_RHO = 0.3
"""Granularity within a level: a Spearman correlation of 0.3 (a moderate monotone trend)."""
MIN_LOCALITY_GAP = 0.05
"""Locality: 0.05 of cosine similarity between q/k and the block output of the same block."""


def _forward_position(images: pd.DataFrame) -> pd.Series:
    order = {n: i for i, n in enumerate(dict.fromkeys(images["activation"]))}
    return images["activation"].map(order)


def _check_images(images: pd.DataFrame, what: str) -> None:
    missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(
            f"the {what} property table lacks {missing}: the claims need one row per image; "
            "use measure_properties(..., per_image=True)"
        )


def noise_stage_gaps(images: pd.DataFrame, t: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Per image, the noise-share gaps of the asymmetric-noise claims at ``t``: ``down`` = median
    noise share of the down stage minus the lower of the mid stage's and the early up stage's
    (up levels in the first half), ``late`` = the last up level's (highest resolution) minus that
    same low. Returns ``(DataFrame indexed by image id, {"t", "early", "late"})``."""
    d, t0 = _at_t(images, "noise_share", t)
    up_levels = sorted(int(g[2:]) for g in d["group"].unique() if g.startswith("up"))
    early = [f"up{lv}" for lv in up_levels if lv < len(up_levels) / 2]
    late = f"up{up_levels[-1]}" if up_levels else None

    def gaps(g):
        med = lambda groups: float(g.loc[g["group"].isin(groups), "value"].median())
        low = min(med(["mid"]), med(early))
        return med([x for x in g["group"].unique() if x.startswith("down")]) - low, med([late]) - low

    out = {iid: gaps(g) for iid, g in d.groupby("image_id", sort=False)}
    return pd.DataFrame.from_dict(out, orient="index", columns=["down", "late"]), dict(t=t0, early=early, late=late)


def noise_growth(images: pd.DataFrame) -> tuple[pd.Series, list[int]]:
    """Per image, the mean over activations of noise share at the largest t minus at the smallest."""
    d = images[images["measure"] == "noise_share"]
    ts = sorted(int(t) for t in d["t"].unique())
    if len(ts) < 2:
        return pd.Series(dtype=float), ts
    w = d.pivot_table(index=["image_id", "activation"], columns="t", values="value")
    return (w[ts[-1]] - w[ts[0]]).groupby(level="image_id").mean(), ts


def granularity_order(images: pd.DataFrame, t: int | None = None, min_size: int = 8) -> pd.DataFrame:
    """Per image and resolution level, Spearman's rho of granularity with the forward order of
    the level's activations (positive: coarse to fine along the forward pass, the paper's
    in-resolution granularity change). Levels whose maps are narrower than ``min_size`` pixels
    are left out (a 2x2 map has just three frequencies), as are levels with fewer than 3
    activations. Columns ``image_id, group, rho, n_activations``."""
    from scipy.stats import spearmanr

    d, t0 = _at_t(images, "granularity", t)
    d["position"] = _forward_position(d)
    d = d[(d["group"] != "") & (d["size"] >= min_size)].dropna(subset=["value"])
    rows = []
    for (iid, grp), g in d.groupby(["image_id", "group"], sort=False):
        if len(g) >= 3 and np.ptp(g["value"]) > 0:
            rows.append(
                dict(
                    image_id=iid,
                    group=grp,
                    rho=float(spearmanr(g["position"], g["value"]).statistic),
                    n_activations=len(g),
                )
            )
    return pd.DataFrame(rows, columns=["image_id", "group", "rho", "n_activations"])


def locality_gaps(images: pd.DataFrame, t: int | None = None) -> pd.DataFrame:
    """Per image and transformer block, the locality index of its self-attention q and k (their
    mean) minus that of the block's output (``vit-out`` of the same stage, level and repeat: the
    same resolution). Columns ``image_id, block, gap``."""
    d, _ = _at_t(images, "locality", t)
    d = d[d["kind"].isin(["self-q", "self-k", "vit-out"])].copy()
    d["block"] = d["stage"].astype(str) + d["level"].astype(str) + "-" + d["repeat"].astype(str)
    d["part"] = np.where(d["kind"] == "vit-out", "out", "qk")
    w = d.pivot_table(index=["image_id", "block"], columns="part", values="value", aggfunc="mean")
    if not {"qk", "out"} <= set(w.columns):
        return pd.DataFrame(columns=["image_id", "block", "gap"])
    return (w["qk"] - w["out"]).rename("gap").dropna().reset_index()


def _controlled(claim, measure, trained: pd.Series, control: pd.Series, min_effect: float) -> dict:
    from .verdicts import controlled_row, paired

    both = pd.concat([trained.rename("trained"), control.rename("control")], axis=1)
    return controlled_row(
        claim,
        measure,
        paired(both["trained"].to_numpy(), min_effect),
        paired((both["trained"] - both["control"]).to_numpy(), min_effect),
        control=float(both["control"].mean()),
    )


def claims(images: pd.DataFrame, control: pd.DataFrame, t: int | None = None, min_size: int = 8) -> pd.DataFrame:
    """Paper 1's property claims, one ledger row each (:data:`difstudy.verdicts.CLAIM_COLUMNS` and
    the control columns of :func:`difstudy.verdicts.controlled_row`).

    ``images`` and ``control`` are per-image property tables (:data:`IMAGE_COLUMNS`,
    ``measure_properties(..., per_image=True)``) of the trained model and of the same
    architecture with random weights, on the same images. Only claims whose measure is in
    ``images`` are stated. The sampling units are the images: each claim's statistic is computed
    per image, and the claim holds when the trained model shows it (:func:`difstudy.verdicts.paired`
    against its minimum effect) *and* beats the random-weight control by that minimum, paired over
    images. Stage claims are read at ``t`` (default 50, the papers' t, else the smallest in the
    table); groups are resolution levels (:func:`resolution_group`). The claims:

    - asymmetric noise, down (:func:`noise_stage_gaps` ``down``) and late up (``late``),
      minimum :data:`MIN_NOISE_GAP`;
    - noise grows with t (:func:`noise_growth`), minimum :data:`MIN_NOISE_GROWTH`;
    - in-resolution granularity (:func:`granularity_order`: per image the mean over levels of the
      rank correlation with forward order), minimum :data:`MIN_GRANULARITY_RHO`;
    - locality (:func:`locality_gaps`: per image the mean over transformer blocks of q/k minus
      the same block's output), minimum :data:`MIN_LOCALITY_GAP`.
    """
    _check_images(images, "trained")
    _check_images(control, "control")
    measures = set(images["measure"])
    rows = []
    if "noise_share" in measures:
        tr, info = noise_stage_gaps(images, t)
        ct, _ = noise_stage_gaps(control, info["t"])
        low = f"min(mid, {'+'.join(info['early'])})"
        rows.append(_controlled(
            "asymmetric noise: the down stage is noisier than the mid and early up stages",
            f"per image: median noise share of the down stage minus {low}, t={info['t']}",
            tr["down"], ct["down"], MIN_NOISE_GAP,
        ))  # fmt: skip
        rows.append(_controlled(
            "asymmetric noise: noise partly reappears late in the up stage",
            f"per image: median noise share of {info['late']} minus {low}, t={info['t']}",
            tr["late"], ct["late"], MIN_NOISE_GAP,
        ))  # fmt: skip
        g_tr, ts = noise_growth(images)
        g_ct, _ = noise_growth(control)
        rows.append(_controlled(
            "asymmetric noise: the noise share grows with t",
            f"per image: mean over activations of noise share at t={ts[-1] if ts else '?'} minus t={ts[0] if ts else '?'}",
            g_tr, g_ct, MIN_NOISE_GROWTH,
        ))  # fmt: skip
    if "granularity" in measures:
        o_tr, o_ct = granularity_order(images, t, min_size), granularity_order(control, t, min_size)
        levels = "+".join(dict.fromkeys(o_tr["group"]))
        rows.append(_controlled(
            "in-resolution granularity: within a resolution level, activations go from coarse to fine along the forward order",
            f"per image: mean over levels {levels} (maps >= {min_size} px) of Spearman's rho of granularity with forward order",
            o_tr.groupby("image_id")["rho"].mean(), o_ct.groupby("image_id")["rho"].mean(), MIN_GRANULARITY_RHO,
        ))  # fmt: skip
    if "locality" in measures:
        l_tr, l_ct = locality_gaps(images, t), locality_gaps(control, t)
        rows.append(_controlled(
            "locality: in self-attention q/k, near pixels of different parts are more alike than far pixels of the same part, more than in the block's output",
            f"per image: mean over {l_tr['block'].nunique()} transformer blocks of the locality index of self-q/k minus the same block's vit-out",
            l_tr.groupby("image_id")["gap"].mean(), l_ct.groupby("image_id")["gap"].mean(), MIN_LOCALITY_GAP,
        ))  # fmt: skip
    return pd.DataFrame(rows)
