"""Plots used by the notebooks: functions ``plot_x(data, ax=None)`` that take tidy frames or arrays
and return the matplotlib axes. Statistical plots are seaborn calls on the tidy frame; an interval the
table carries (``lo``/``hi``, ``ci_low``/``ci_high``, ``ci95_*``) is drawn from its columns with
``errorbar=None`` on the seaborn call, never bootstrapped again; where seaborn aggregates over seeds or
images the docstring names its errorbar. Image and PCA grids are matplotlib ``imshow``."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from .verdicts import VERDICTS


def _ax(ax, figsize=(6, 4)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _table_interval(ax, pos, lo, hi, horizontal: bool = False, color="k"):
    """Error bars of a table's own interval ``[lo, hi]`` at each position (rows with a NaN end are
    skipped); the bars' LineCollection has gid ``interval``. Returns the ErrorbarContainer."""
    pos, lo, hi = (np.asarray(v, dtype=float) for v in (pos, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    mid, half = (lo + hi)[ok] / 2, (hi - lo)[ok] / 2
    xy, err = ((mid, pos[ok]), dict(xerr=half)) if horizontal else ((pos[ok], mid), dict(yerr=half))
    bars = ax.errorbar(*xy, fmt="none", ecolor=color, elinewidth=1.2, capsize=3, **err)
    bars.lines[2][0].set_gid("interval")
    return bars


def plot_training_curves(df: pd.DataFrame, ax=None, smooth: int = 50):
    """Loss per stage against step (running mean over ``smooth`` steps), log scale; the logged
    rows are drawn as they are (``estimator=None``)."""
    ax = _ax(ax, (7, 4))
    loss = df.groupby("stage", sort=False)["loss"].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    d = df.assign(loss=loss, stage=df["stage"].astype(str) + f" (running mean of {smooth})")
    sns.lineplot(d, x="step", y="loss", hue="stage", estimator=None, errorbar=None, sort=False, ax=ax)
    ax.set(yscale="log", xlabel="training step", ylabel="loss", title="Mini model training loss")
    sns.move_legend(ax, "best", title=None)
    return ax


def plot_recognition_curve(curve: pd.DataFrame, ax=None):
    """Share of samples the judge recognised against training step, with the curve's own 95%
    intervals (``ci95_low``, ``ci95_high``)."""
    ax = _ax(ax, (6, 3.5))
    sns.lineplot(curve, x="step", y="recognised", marker="o", estimator=None, errorbar=None, label="recognised", ax=ax)
    _table_interval(ax, curve["step"], curve["ci95_low"], curve["ci95_high"], color=ax.lines[-1].get_color())
    ax.axhline(0.1, ls=":", c="grey", label="chance (10 classes)")
    ax.axhline(0.5, ls="--", c="tab:red", lw=1, label="goal")
    ax.set(ylim=(0, 1), xlabel="U-Net training step (EMA snapshot)", ylabel="share recognised by the judge")
    ax.set_title("Class-conditional samples recognised vs training step")
    ax.legend(fontsize=8)
    return ax


WEIGHT_COLOURS = {"trained weights": "tab:blue", "random weights": "tab:grey"}


def plot_card_scores(scores: pd.DataFrame, metric: str = "accuracy", ax=None):
    """One metric of each activation alone in forward order, trained vs random weights: mean over
    seeds with seaborn's ``errorbar="sd"`` (± one std over seeds); raw pixels (mean over seeds) as
    a dashed line. ``scores`` from :func:`difstudy.card.feature_scores`."""
    df = scores[scores["metric"] == metric]
    if df.empty:
        raise ValueError(f"no rows for metric {metric!r}; metrics: {sorted(set(scores['metric']))}")
    ax = _ax(ax, (10, 3.8))
    acts = [a for a in dict.fromkeys(df["activation"]) if a != "pixels"]
    d = df[df["weights"].isin(["trained", "random"])].assign(weights=lambda g: g["weights"] + " weights")
    style = dict(order=acts, palette=WEIGHT_COLOURS, markersize=3, linewidth=1, err_kws=dict(linewidth=0.8))
    sns.pointplot(d, x="activation", y="value", hue="weights", errorbar="sd", **style, ax=ax)
    ax.axhline(df[df["weights"] == "raw pixels"]["value"].mean(), ls="--", c="tab:orange", label="raw pixels")
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    ax.set(xlabel="", ylabel=metric, title=f"{metric} of each activation alone (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return ax


def plot_image_grid(images: np.ndarray, ncols: int, titles=None, ax=None, title: str = ""):
    """Images (N, H, W, 3) uint8 tiled in a grid on one axes; optional per-row titles on the left."""
    n, h, w, _ = images.shape
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + 2), ncols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    ax = _ax(ax, (ncols * 0.9, nrows * 0.9))
    ax.imshow(canvas)
    ax.set_xticks([])
    if titles is not None:
        ax.set_yticks([(h + 2) * r + h / 2 for r in range(nrows)])
        ax.set_yticklabels(titles)
    else:
        ax.set_yticks([])
    ax.set_title(title)
    return ax


def plot_pck_bars(df: pd.DataFrame, ax=None, value: str = "pck"):
    """Bars of ``value`` (in %) per activation and weights (tidy rows with ``weights``,
    ``activation`` and ``value``): mean over the rows (seeds) with seaborn's ``errorbar="sd"``
    (± one std; none for a single seed)."""
    ax = _ax(ax, (8, 4))
    d = df.assign(**{value: 100 * df[value]})
    sns.barplot(d, x="activation", y=value, hue="weights", errorbar="sd", capsize=0.2, err_kws=dict(linewidth=1), ax=ax)
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set(xlabel="", ylabel="PCK@0.1 (img), %")
    ax.set_title("Keypoint matching with single activations (toy-world test pairs)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), title=None, frameon=False)
    return ax


def plot_ranking(ranking: pd.DataFrame, top: int = 15, ax=None, metric: str = "PCK@0.1 img"):
    """Horizontal bars of the best ``top`` single activations by validation ``metric``, best on
    top (one row of ``ranking`` per bar, nothing aggregated)."""
    ax = _ax(ax, (7, 0.3 * top + 1))
    d = ranking.head(top)
    sns.barplot(d.assign(pct=100 * d[metric]), x="pct", y="activation", orient="y", errorbar=None, ax=ax)
    ax.set(xlabel=f"{metric} on validation pairs, %", ylabel="", title=f"Top {top} single activations")
    ax.tick_params(axis="y", labelsize=7)
    return ax


def plot_pca_panels(pictures: dict[str, np.ndarray], images: np.ndarray, axes=None):
    """Rows: input images then one row per activation of PCA-to-RGB pictures (N, h, w, 3) in [0, 1]."""

    n = images.shape[0]
    rows = 1 + len(pictures)
    if axes is None:
        _, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.3 * rows), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
    for r, (name, pic) in enumerate(pictures.items(), start=1):
        for j in range(n):
            axes[r, j].imshow(pic[j], interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=7)
    return axes


# -- the three U-Net properties (difstudy.properties) ---------------------------------
STAGE_COLOURS = {"unet": "0.4", "down": "tab:blue", "mid": "tab:green", "up": "tab:red"}
PROPERTY_LABELS = {
    "noise_share": "noise share (0 ignores the draw, 1 pure noise)",
    "granularity": "granularity (cycles / pixel)",
    "locality": "locality index (near minus far similarity)",
}


def _level_label(stage, level) -> str:
    if stage == "unet":
        return ""
    if stage == "mid" or pd.isna(level):
        return stage
    return f"{stage[0]}{int(level)}"


def plot_property_profile(df: pd.DataFrame, measure: str, t: int | None = None, ax=None):
    """One property along the U-Net's forward order (rows in forward order, as
    :func:`difstudy.properties.measure_properties` returns them), one point per
    activation coloured by stage, level boundaries dotted; ``t`` picks a
    timestep when the table holds several. Values are drawn as the table has them."""
    d = df[df["measure"] == measure]
    if d.empty:
        raise ValueError(f"measure {measure!r} is not in the table; it holds {sorted(df['measure'].unique())}")
    ts = sorted(int(t) for t in d["t"].unique())
    if t is None and len(ts) > 1:
        raise ValueError(f"the table holds timesteps {ts} for {measure}; pass t= (or use plot_properties_grid)")
    t = ts[0] if t is None else t
    d = d[d["t"] == t]
    if d.empty:
        raise ValueError(f"t={t} is not in the table for {measure}; it holds timesteps {ts}")
    d = d.drop_duplicates("activation").reset_index(drop=True).rename_axis("position").reset_index()
    ax = _ax(ax, (10, 3))
    d["run"] = d["value"].isna().cumsum()  # one line per run of measured activations: NaNs stay gaps
    sns.lineplot(d, x="position", y="value", units="run", color="0.8", lw=0.8, estimator=None, sort=False, ax=ax)
    stages = [s for s in STAGE_COLOURS if s in set(d["stage"])]
    sns.scatterplot(d, x="position", y="value", hue="stage", hue_order=stages, palette=STAGE_COLOURS, s=12, lw=0, ax=ax)
    labels = [_level_label(s, lv) for s, lv in zip(d["stage"], d["level"])]
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.85", ls=":", lw=0.8, zorder=0)
    ends = starts[1:] + [len(labels)]
    ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)], [labels[a] or "io" for a in starts], fontsize=7)
    ax.set_xlabel("activations in forward order (d = down level, u = up level)")
    ax.set_ylabel(PROPERTY_LABELS.get(measure, measure), fontsize=8)
    ax.set_title(f"{measure} per activation, t={t}", fontsize=9)
    sns.move_legend(ax, "best", title=None, fontsize=7, ncol=4)
    return ax


def plot_properties_grid(df: pd.DataFrame, measures=None, axes=None):
    """Small multiples of :func:`plot_property_profile`, one full-width panel per measure and
    timestep, stacked (a U-Net has ~200 activations: side-by-side panels would squeeze them)."""
    present = list(dict.fromkeys(df["measure"]))
    measures = present if measures is None else ([measures] if isinstance(measures, str) else list(measures))
    bad = [m for m in measures if m not in present]
    if bad:
        raise ValueError(f"measures {bad} are not in the table; it holds {present}")
    ts = sorted(int(t) for t in df[df["measure"].isin(measures)]["t"].unique())
    if axes is None:
        _, axes = plt.subplots(len(measures) * len(ts), 1, figsize=(16, 3.2 * len(measures) * len(ts)), squeeze=False)
        axes = axes.reshape(len(measures), len(ts))
    for r, m in enumerate(measures):
        for c, t in enumerate(ts):
            plot_property_profile(df, m, t=t, ax=axes[r, c])
            if r or c:
                axes[r, c].get_legend().remove()
    axes[0, 0].figure.tight_layout()
    return axes


def _pca_row_col(a, name: str) -> tuple[str, str]:
    """(row label, column label) of a catalogue row in the paper-style PCA grid."""
    if a.stage == "unet":
        return name, "block out"
    if a.kind in ("downsampler-out", "upsampler-out"):
        return name.removesuffix("-out"), "block out"
    block = getattr(a, "block", None)
    col = a.kind if block is None or pd.isna(block) or int(block) == 0 else f"{a.kind} b{int(block)}"
    if a.stage == "mid":
        return ("mid-vit" if pd.isna(a.repeat) else f"mid-repeat{int(a.repeat)}"), col
    return f"{a.stage}-level{int(a.level)}-repeat{int(a.repeat)}", col


def plot_pca_grid(
    pictures: dict, frame: pd.DataFrame, image: np.ndarray | None = None, ax=None, cell: int = 64, inches: float = 1.1
):
    """PCA-to-RGB pictures of every activation of one image, laid out like the paper's figure.

    ``pictures``: ``{name: (h, w, 3) array in [0, 1]}`` (e.g.
    :func:`difstudy.properties.pca_pictures`); ``frame``: catalogue rows
    (:meth:`difstudy.catalog.Catalog.to_frame`) or a property table (its
    ``activation, kind, stage, level, repeat`` columns), in forward order. Rows: stage x level x repeat
    in forward order (unet input/output and down/upsamplers on rows of their
    own, in the "block out" column); columns: the kinds side by side. Each
    picture is scaled to ``cell`` pixels with nearest-neighbour and drawn ``inches`` wide (large
    enough to see parts in a 16x16 map); ``image`` (the input) goes on a first row."""
    from PIL import Image

    rows: list[str] = []
    cols: list[str] = ["block out", "res-increment", "res-out"]
    cells = {}
    key = "name" if "name" in frame.columns else "activation"
    for a in frame.drop_duplicates(key).itertuples(index=False):
        name = getattr(a, key)
        if name not in pictures:
            continue
        r, c = _pca_row_col(a, name)
        if r not in rows:
            rows.append(r)
        if c not in cols:
            cols.append(c)
        cells[r, c] = pictures[name]
    cols = [c for c in cols if any((r, c) in cells for r in rows)]
    if not cells:
        raise ValueError(f"none of the {len(pictures)} pictures is named in the catalogue frame")
    if image is not None:
        rows.insert(0, "input")
        cells["input", cols[0]] = np.asarray(image)
    pad = 2
    canvas = np.ones((len(rows) * (cell + pad), len(cols) * (cell + pad), 3))
    for (r, c), pic in cells.items():
        pic = np.asarray(pic)
        pic = pic / 255.0 if pic.dtype == np.uint8 else np.clip(pic, 0, 1)
        im = Image.fromarray((pic * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        i, j = rows.index(r), cols.index(c)
        canvas[i * (cell + pad) : i * (cell + pad) + cell, j * (cell + pad) : j * (cell + pad) + cell] = (
            np.asarray(im) / 255.0
        )
    made = ax is None
    ax = _ax(ax, (2.5 + inches * len(cols), 1.5 + inches * len(rows)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([(cell + pad) * i + cell / 2 for i in range(len(rows))])
    ax.set_yticklabels(rows, fontsize=9)
    ax.set_xticks([(cell + pad) * j + cell / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, fontsize=9, rotation=45, ha="left", rotation_mode="anchor")
    ax.xaxis.tick_top()
    if made:
        ax.figure.tight_layout()
    return ax


# the axis label of each content-shift score (difstudy.gate.scores.MEASURES)
SHIFT_LABELS = {
    "contour": "mean |Laplacian difference|",
    "structure": "1 - SSIM",
    "lost": "detail lost: input detail missing nearby in the reconstruction",
    "invented": "detail invented: reconstruction detail missing nearby in the input",
    "judge": "1 - cos of the toy-world judge's features",
}


def plot_content_shift(df: pd.DataFrame, measure: str = "contour", method: str = "x0", ax=None):
    """Content shift against t (tidy frame of :func:`difstudy.gate.content_shift_table`), technique
    ``basic``: per complexity level the mean over its images; over all images the mean with
    seaborn's ``errorbar=("se", 1.96)`` (± 1.96 standard errors, a normal 95% interval); the VAE
    floor dashed. ``measure``: any score column (:data:`SHIFT_LABELS`)."""
    if measure not in df.columns:
        raise ValueError(f"no column {measure!r}; scores in the frame: {[m for m in SHIFT_LABELS if m in df.columns]}")
    ax = _ax(ax, (6, 4))
    d = df[(df["technique"] == "basic") & (df["method"] == method)]
    if d.empty:
        raise ValueError(f"no rows with technique 'basic' and method {method!r}; methods: {sorted(set(df['method']))}")
    levels = d.sort_values("complexity").assign(level=lambda g: "complexity " + g["complexity"].astype(str))
    sns.lineplot(levels, x="t", y=measure, hue="level", marker="o", lw=1, alpha=0.8, errorbar=None, ax=ax)
    ci = dict(errorbar=("se", 1.96), err_style="bars", err_kws=dict(capsize=3, elinewidth=1.5))
    sns.lineplot(d, x="t", y=measure, color="k", lw=2, **ci, label="all images (95% CI)", ax=ax)
    floor = df[df["method"] == "vae"][measure]
    if len(floor):
        ax.axhline(floor.mean(), color="gray", ls="--", label="VAE only (no U-Net)")
    ts = sorted(d["t"].unique())
    ax.set(xscale="log", xlabel="timestep t (noise level of the forward)")
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()  # the log axis's minor labels would overprint the t labels
    ax.set_ylabel(textwrap.fill(f"{measure} ({SHIFT_LABELS.get(measure, measure)})", 40))
    ax.set_title(f"Content shift of the {method} reconstruction vs t")
    ax.legend(fontsize=7)
    return ax


# the colour of each guideline effect (difstudy.gate.guideline_effect); any other is grey
EFFECT_COLOURS = {"helps": "tab:green", "hurts": "tab:red", "negligible": "tab:gray", "no clear effect": "goldenrod"}


def plot_guideline(table: pd.DataFrame, measure: str = "contour", ax=None):
    """Paired change of content shift per technique (with - without), from
    :func:`difstudy.gate.guideline_table`: a bar at ``difference`` coloured by the row's
    ``verdict`` and the table's own 95% interval ``[ci_low, ci_high]``; below 0 the technique
    suppresses content shift. A measure the table lacks gives an empty panel saying so."""
    ax = _ax(ax, (6, 3))
    ax.set_title(f"GATE guideline ({measure}): does the technique lower content shift?", fontsize=10)
    d = table[table["measure"] == measure].reset_index(drop=True)
    if d.empty:  # e.g. the judge switched off: guideline_table leaves its measure out
        ax.text(0.5, 0.5, f"no rows for {measure}", ha="center", transform=ax.transAxes, color="grey")
        return ax
    label = d["technique"] + " (" + d["method"] + ")"
    if label.duplicated().any():  # the same technique and method at several t
        label = d["technique"] + " (" + d["method"] + ", " + d["t"].astype(str) + ")"
    d = d.assign(label=label)
    palette = {v: EFFECT_COLOURS.get(v, "tab:gray") for v in d["verdict"]}
    bars = dict(dodge=False, saturation=1, errorbar=None)  # the interval is the table's (below)
    sns.barplot(d, x="difference", y="label", hue="verdict", palette=palette, **bars, ax=ax)
    _table_interval(ax, np.arange(len(d)), d["ci_low"], d["ci_high"], horizontal=True)
    ax.axvline(0, color="k", lw=1)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))  # small scores: a shared exponent
    ax.locator_params(axis="x", nbins=6)
    ax.set(ylabel="", xlabel=f"{measure} shift: with technique - without\n(mean over images and t; line: 95% interval)")
    sns.move_legend(ax, "best", title=None, fontsize=7)
    return ax


def plot_gate_features(results: pd.DataFrame, task: str, metric: str, ax=None):
    """One task's metric (in %) per GATE setting (tidy rows of :func:`difstudy.gate.run_gate_probes`):
    a bar at the mean over seeds with seaborn's ``errorbar="sd"`` (± one std over seeds; none for
    a single seed); the dashed line is the first setting's mean (the baseline)."""
    d = results[(results["task"] == task) & (results["metric"] == metric)]
    if d.empty:
        raise ValueError(f"no rows for task {task!r} and metric {metric!r}; tasks: {sorted(set(results['task']))}")
    ax = _ax(ax, (6, 3))
    d = d.assign(value=100 * d["value"], setting=[textwrap.fill(s, 32) for s in d["setting"]])
    order = list(dict.fromkeys(d["setting"]))
    colours = ["tab:gray"] + ["tab:purple" if o.startswith("amalgamated") else "tab:blue" for o in order[1:]]
    bars = dict(errorbar="sd", capsize=0.3, err_kws=dict(linewidth=1, color="k"), saturation=1, legend=False)
    sns.barplot(d, x="value", y="setting", hue="setting", palette=dict(zip(order, colours)), **bars, ax=ax)
    ax.axvline(d[d["setting"] == order[0]]["value"].mean(), color="k", ls="--", lw=1)
    ax.tick_params(axis="y", labelsize=7)
    ax.set(ylabel="", xlabel=f"{metric} (%), mean ± std over seeds", title=f"GATE features: {task}")
    return ax


# the colour of each verdict, in the order of difstudy.verdicts.VERDICTS: holds, fails, inconclusive
VERDICT_COLOURS = dict(zip(VERDICTS, ("tab:green", "tab:red", "goldenrod"), strict=True))


def plot_forest(claims: pd.DataFrame, ax=None, relative: bool = False, wrap: int = 48):
    """Forest plot of a claims ledger (:func:`difstudy.study.collect_claims`, rows from
    :mod:`difstudy.verdicts`): one row per claim, top to bottom in the table's order; the
    estimate as a dot (seaborn, hue = verdict, one unit per claim), the table's interval
    ``[lo, hi]`` as a line (just the dot where the interval is NaN), a black tick at the claim's
    own ``min_effect`` and a vertical line at 0, coloured by verdict (:data:`VERDICT_COLOURS`).
    Rows with ``vs_lo``/``vs_hi`` (a claim about training, ``controlled_row``) also show the
    trained-minus-random-weights interval as a thin line just below, with its own
    ``vs_min_effect`` tick. Nothing is re-estimated.

    ``relative=True`` divides every number of a row by its minimum effect, so claims measured on
    different scales share one axis (0: no effect, 1: the minimum effect). Claim text is
    wrapped at ``wrap`` characters. Returns the axes."""
    missing = [c for c in ("claim", "estimate", "lo", "hi", "min_effect", "verdict") if c not in claims.columns]
    if missing:
        raise ValueError(f"plot_forest needs the columns {missing}; give it the claims ledger (collect_claims)")
    if claims.empty:
        raise ValueError("no claims to plot: run the pages that write claims first (difstudy run)")
    bad = sorted(set(claims["verdict"]) - set(VERDICT_COLOURS), key=str)
    if bad:
        raise ValueError(f"unknown verdicts {bad}; the ledger knows {list(VERDICT_COLOURS)}")
    own, vs = ["estimate", "lo", "hi", "min_effect"], ["vs_control", "vs_lo", "vs_hi", "vs_min_effect"]
    x = claims.reset_index(drop=True).reindex(columns=own + vs).astype(float)  # vs_*: NaN where absent
    if relative:
        x[own], x[vs] = x[own].div(x["min_effect"], axis=0), x[vs].div(x["vs_min_effect"], axis=0)
    x = x.assign(row=range(len(x)), verdict=claims["verdict"].to_numpy())
    labels = [textwrap.fill(str(c), wrap) for c in claims["claim"]]
    lines = [lab.count("\n") + 1 for lab in labels]
    tallest = max([(a + b) / 2 for a, b in zip(lines, lines[1:])] or lines)  # rows sit at 0, 1, 2, ...
    ax = _ax(ax, (8, max(2.5, len(x) * (0.125 * tallest + 0.08) + 1.2)))
    for i, r in x.iterrows():
        colour = VERDICT_COLOURS[r["verdict"]]
        if np.isfinite(r["lo"]) and np.isfinite(r["hi"]):
            ax.plot([r["lo"], r["hi"]], [i, i], color=colour, lw=2.5, solid_capstyle="butt", gid="interval")
        if not np.isfinite(r["estimate"]):
            ax.text(0, i, " no estimate", va="center", fontsize=7, color="grey")
        ax.plot([r["min_effect"]], [i], marker="|", color="k", ms=13, mew=2, ls="none", gid="min_effect")
        if np.isfinite(r["vs_lo"]) and np.isfinite(r["vs_hi"]):
            y = i + 0.28
            ax.plot([r["vs_lo"], r["vs_hi"]], [y, y], color=colour, lw=1, gid="vs_interval")
            ax.plot([r["vs_control"]], [y], "o", mfc="white", mec=colour, ms=4, gid="vs_estimate")
            ax.plot([r["vs_min_effect"]], [y], marker="|", color="k", ms=7, mew=1, ls="none", gid="vs_min_effect")
    drawn = len(ax.lines)
    dots = dict(marker="o", ms=7, mec="k", mew=0.6, ls="none", estimator=None, sort=False, legend=False, zorder=3)
    est = x.dropna(subset=["estimate"])
    sns.lineplot(est, x="estimate", y="row", hue="verdict", units="row", palette=VERDICT_COLOURS, **dots, ax=ax)
    for ln in ax.lines[drawn:]:
        ln.set_gid("estimate")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(x)), labels, fontsize=7.5)
    ax.set_ylim(len(x) - 0.5, -0.6)  # first claim on top
    handles = [Line2D([], [], color=c, marker="o", mec="k", lw=2.5, label=v) for v, c in VERDICT_COLOURS.items()]
    handles.append(Line2D([], [], color="k", marker="|", ms=10, mew=2, ls="none", label="minimum effect"))
    vs_handle = Line2D([], [], color="grey", lw=1, marker="o", mfc="white", ms=4, label="trained - random weights")
    handles += [vs_handle] if x["vs_lo"].notna().any() else []
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    unit = (
        "estimate / minimum effect (1 = the claim's minimum effect)" if relative else "estimate (the claim's measure)"
    )
    ax.set(ylabel="", xlabel=f"{unit}; line: interval", title="Claims ledger: estimate and interval of every claim")
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_depth_profiles(df: pd.DataFrame, measures, t: int, axes=None):
    """Each measure (one panel) along the forward pass of several denoisers at timestep ``t``:
    ``df`` is a table of means (:func:`difstudy.properties.summarise`) with ``model`` and
    ``weights`` columns; x is the activation's relative depth (forward position over the
    denoiser's activations, 0 to 1), so a U-Net and a transformer share the axis. One line per
    model and weights (trained solid, random dashed), the values as measured (``estimator=None``)."""
    measures = list(measures)
    if axes is None:
        _, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4), squeeze=False)
        axes = axes[0]
    d = df[(df["t"] == t) & df["measure"].isin(measures)].copy()
    order = d.groupby(["model", "weights"], sort=False)["activation"].transform(lambda s: pd.factorize(s)[0])
    size = d.groupby(["model", "weights"], sort=False)["activation"].transform("nunique")
    d["relative depth"] = order / (size - 1).clip(lower=1)
    for ax, m in zip(axes, measures):
        sns.lineplot(data=d[d["measure"] == m], x="relative depth", y="value", hue="model", style="weights",
                     estimator=None, units=None, ax=ax, linewidth=1, legend=ax is axes[-1])  # fmt: skip
        ax.set_title(m)
        ax.set_ylabel(m)
        if m == "massive_ratio":
            ax.set_yscale("log")
    if len(axes) and axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return axes
