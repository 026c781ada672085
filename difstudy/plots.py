"""Plots used by the notebooks: functions ``plot_x(data, ax=None)`` that take
tidy frames or arrays and return the matplotlib axes."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from .verdicts import VERDICTS


def _ax(ax, figsize=(6, 4)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_training_curves(df: pd.DataFrame, ax=None, smooth: int = 50):
    """Loss per stage against step (running mean over ``smooth`` steps), log scale."""
    ax = _ax(ax, (7, 4))
    for stage, d in df.groupby("stage", sort=False):
        ax.plot(d["step"], d["loss"].rolling(smooth, min_periods=1).mean(), label=f"{stage} (running mean of {smooth})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Mini model training loss")
    ax.legend()
    return ax


def plot_recognition_curve(curve: pd.DataFrame, ax=None):
    """Share of samples the judge recognised against training step, with 95% intervals."""
    ax = _ax(ax, (6, 3.5))
    yerr = [curve["recognised"] - curve["ci95_low"], curve["ci95_high"] - curve["recognised"]]
    ax.errorbar(curve["step"], curve["recognised"], yerr=yerr, marker="o", capsize=3, label="recognised")
    ax.axhline(0.1, ls=":", c="grey", label="chance (10 classes)")
    ax.axhline(0.5, ls="--", c="tab:red", lw=1, label="goal")
    ax.set_ylim(0, 1)
    ax.set_xlabel("U-Net training step (EMA snapshot)")
    ax.set_ylabel("share recognised by the judge")
    ax.set_title("Class-conditional samples recognised vs training step")
    ax.legend(fontsize=8)
    return ax


def plot_card_scores(scores: pd.DataFrame, metric: str = "accuracy", ax=None):
    """One metric of each activation alone (mean over seeds) in forward order, trained vs
    random weights, raw pixels as a dashed line; ``scores`` from :func:`difstudy.card.feature_scores`."""
    ax = _ax(ax, (10, 3.8))
    df = scores[scores["metric"] == metric]
    acts = [a for a in dict.fromkeys(df["activation"]) if a != "pixels"]
    for weights, colour in (("trained", "tab:blue"), ("random", "tab:grey")):
        m = df[df["weights"] == weights].groupby("activation")["value"].mean().reindex(acts)
        ax.plot(range(len(acts)), m.values, marker="o", ms=3, c=colour, label=f"{weights} weights")
    pix = df[df["weights"] == "raw pixels"]["value"].mean()
    ax.axhline(pix, ls="--", c="tab:orange", label="raw pixels")
    ax.set_xticks(range(len(acts)))
    ax.set_xticklabels(acts, rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of each activation alone")
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
    """Mean +- std of ``value`` per activation and weights (tidy rows with ``weights``, ``activation`` and ``value``)."""
    ax = _ax(ax, (8, 4))
    g = df.groupby(["activation", "weights"], sort=False)[value].agg(["mean", "std"]).reset_index()
    acts = list(dict.fromkeys(g["activation"]))
    kinds = list(dict.fromkeys(g["weights"]))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        d = g[g["weights"] == kind].set_index("activation").reindex(acts)
        ax.bar(np.arange(len(acts)) + k * width, 100 * d["mean"], width, yerr=100 * d["std"].fillna(0), label=kind)
    ax.set_xticks(np.arange(len(acts)) + width * (len(kinds) - 1) / 2)
    ax.set_xticklabels(acts, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("PCK@0.1 (img), %")
    ax.set_title("Keypoint matching with single activations (toy-world test pairs)")
    ax.legend()
    return ax


def plot_ranking(ranking: pd.DataFrame, top: int = 15, ax=None, metric: str = "PCK@0.1 img"):
    """Horizontal bars of the best ``top`` single activations by validation ``metric``."""
    ax = _ax(ax, (7, 0.3 * top + 1))
    d = ranking.head(top).iloc[::-1]
    ax.barh(d["activation"], 100 * d[metric])
    ax.set_xlabel(f"{metric} on validation pairs, %")
    ax.set_title(f"Top {top} single activations")
    ax.tick_params(axis="y", labelsize=7)
    return ax


def plot_pca_panels(pictures: dict[str, np.ndarray], images: np.ndarray, axes=None):
    """Rows: input images then one row per activation of PCA-to-RGB pictures (N, h, w, 3) in [0, 1]."""
    import matplotlib.pyplot as plt

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
    timestep when the table holds several."""
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
    order = list(dict.fromkeys(d["activation"]))
    d = d.drop_duplicates("activation").set_index("activation").loc[order]
    x = np.arange(len(d))
    ax = _ax(ax, (10, 3))
    ax.plot(x, d["value"], color="0.8", lw=0.8, zorder=1)
    for stage, colour in STAGE_COLOURS.items():
        sel = (d["stage"] == stage).to_numpy()
        if sel.any():
            ax.scatter(x[sel], d["value"][sel], s=9, color=colour, label=stage, zorder=2)
    labels = [_level_label(s, lv) for s, lv in zip(d["stage"], d["level"])]
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="0.85", ls=":", lw=0.8, zorder=0)
    ends = starts[1:] + [len(labels)]
    ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)])
    ax.set_xticklabels([labels[a] or "io" for a in starts], fontsize=7)
    ax.set_xlabel("activations in forward order (d = down level, u = up level)")
    ax.set_ylabel(PROPERTY_LABELS.get(measure, measure), fontsize=8)
    ax.set_title(f"{measure} per activation, t={t}", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="best")
    return ax


def plot_properties_grid(df: pd.DataFrame, measures=None, axes=None):
    """Small multiples of :func:`plot_property_profile`: one row per measure, one column per timestep."""
    import matplotlib.pyplot as plt

    present = list(dict.fromkeys(df["measure"]))
    measures = present if measures is None else ([measures] if isinstance(measures, str) else list(measures))
    bad = [m for m in measures if m not in present]
    if bad:
        raise ValueError(f"measures {bad} are not in the table; it holds {present}")
    ts = sorted(int(t) for t in df[df["measure"].isin(measures)]["t"].unique())
    if axes is None:
        _, axes = plt.subplots(
            len(measures), len(ts), figsize=(5.5 * len(ts), 2.8 * len(measures)), squeeze=False, sharey="row"
        )
    for r, m in enumerate(measures):
        for c, t in enumerate(ts):
            plot_property_profile(df, m, t=t, ax=axes[r, c])
            if c:
                axes[r, c].set_ylabel("")
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


def plot_pca_grid(pictures: dict, frame: pd.DataFrame, image: np.ndarray | None = None, ax=None, cell: int = 32):
    """PCA-to-RGB pictures of every activation of one image, laid out like the paper's figure.

    ``pictures``: ``{name: (h, w, 3) array in [0, 1]}`` (e.g.
    :func:`difstudy.properties.pca_pictures`); ``frame``: catalogue rows
    (:meth:`difstudy.catalog.Catalog.to_frame`) or a property table (its
    ``activation, kind, stage, level, repeat`` columns), in forward order. Rows: stage x level x repeat
    in forward order (unet input/output and down/upsamplers on rows of their
    own, in the "block out" column); columns: the kinds side by side. Each
    picture is scaled to ``cell`` pixels with nearest-neighbour; ``image``
    (the input) goes on a first row."""
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
    ax = _ax(ax, (2.2 + 0.5 * len(cols), 1.2 + 0.5 * len(rows)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([(cell + pad) * i + cell / 2 for i in range(len(rows))])
    ax.set_yticklabels(rows, fontsize=6)
    ax.set_xticks([(cell + pad) * j + cell / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, fontsize=6, rotation=60, ha="left", rotation_mode="anchor")
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
    """Content shift against t (tidy frame of :func:`difstudy.gate.content_shift_table`): mean over
    images per complexity level and overall (technique ``basic``), the VAE floor as a dashed line.
    ``measure``: any score column (:data:`SHIFT_LABELS`)."""
    if measure not in df.columns:
        raise ValueError(f"no column {measure!r}; scores in the frame: {[m for m in SHIFT_LABELS if m in df.columns]}")
    ax = _ax(ax, (6, 4))
    d = df[(df["technique"] == "basic") & (df["method"] == method)]
    if d.empty:
        raise ValueError(f"no rows with technique 'basic' and method {method!r}; methods: {sorted(set(df['method']))}")
    for level, g in d.groupby("complexity"):
        m = g.groupby("t")[measure].mean()
        ax.plot(m.index, m.values, marker="o", lw=1, alpha=0.7, label=f"complexity {level}")
    m = d.groupby("t")[measure].agg(["mean", "sem"])
    ax.errorbar(m.index, m["mean"], yerr=1.96 * m["sem"], color="k", lw=2, capsize=3, label="all images (95% CI)")
    floor = df[df["method"] == "vae"][measure]
    if len(floor):
        ax.axhline(floor.mean(), color="gray", ls="--", label="VAE only (no U-Net)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(d["t"].unique()))
    ax.set_xticklabels([str(t) for t in sorted(d["t"].unique())])
    ax.minorticks_off()  # the log axis's minor labels would overprint the t labels
    ax.set_xlabel("timestep t (noise level of the forward)")
    ax.set_ylabel("\n".join(textwrap.wrap(f"{measure} ({SHIFT_LABELS.get(measure, measure)})", 40)))
    ax.set_title(f"Content shift of the {method} reconstruction vs t")
    ax.legend(fontsize=7)
    return ax


def plot_guideline(table: pd.DataFrame, measure: str = "contour", ax=None):
    """Paired change of content shift per technique (with - without, 95% CI), from
    :func:`difstudy.gate.guideline_table`; below 0 the technique suppresses content shift."""
    ax = _ax(ax, (6, 3))
    d = table[table["measure"] == measure].reset_index(drop=True)
    labels = [f"{r.technique} ({r.method})" for r in d.itertuples()]
    err = np.vstack([d["difference"] - d["ci_low"], d["ci_high"] - d["difference"]])
    colors = ["tab:green" if v == "helps" else ("tab:red" if v == "hurts" else "tab:gray") for v in d["verdict"]]
    ax.barh(range(len(d)), d["difference"], xerr=err, color=colors, capsize=3)
    ax.axvline(0, color="k", lw=1)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))  # small scores: a shared exponent
    ax.set_yticks(range(len(d)))
    ax.set_yticklabels(labels)
    ax.set_xlabel(f"{measure} shift with technique - without (mean over images and t)")
    ax.set_title("GATE guideline: does the technique lower content shift?")
    return ax


def plot_gate_features(results: pd.DataFrame, task: str, metric: str, ax=None):
    """Mean +- std over seeds of one task's metric per GATE setting (tidy rows of
    :func:`difstudy.gate.run_gate_probes`); the dashed line is the first setting (the baseline)."""
    ax = _ax(ax, (6, 3))
    d = results[(results["task"] == task) & (results["metric"] == metric)]
    if d.empty:
        raise ValueError(f"no rows for task {task!r} and metric {metric!r}; tasks: {sorted(set(results['task']))}")
    order = list(dict.fromkeys(d["setting"]))
    s = d.groupby("setting")["value"].agg(["mean", "std"]).reindex(order)
    colors = ["tab:gray"] + ["tab:purple" if o.startswith("amalgamated") else "tab:blue" for o in order[1:]]
    ax.barh(range(len(s)), 100 * s["mean"], xerr=100 * s["std"].fillna(0), color=colors, capsize=3)
    ax.axvline(100 * s["mean"].iloc[0], color="k", ls="--", lw=1)
    ax.set_yticks(range(len(s)))
    ax.set_yticklabels(order, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (%), mean ± std over seeds")
    ax.set_title(f"GATE features: {task}")
    return ax


# the colour of each verdict, in the order of difstudy.verdicts.VERDICTS: holds, fails, inconclusive
VERDICT_COLOURS = dict(zip(VERDICTS, ("tab:green", "tab:red", "goldenrod"), strict=True))


def plot_forest(claims: pd.DataFrame, ax=None, relative: bool = False, wrap: int = 48):
    """Forest plot of a claims ledger (:func:`difstudy.study.collect_claims`, rows from
    :mod:`difstudy.verdicts`): one row per claim, top to bottom in the table's order; the
    estimate as a dot, its interval ``[lo, hi]`` as a line (just the dot where the interval is
    NaN), a black tick at the claim's own ``min_effect`` and a vertical line at 0, coloured by
    verdict (:data:`VERDICT_COLOURS`). Rows with ``vs_lo``/``vs_hi`` (a claim about training,
    ``controlled_row``) also show the trained-minus-random-weights interval as a thin line just
    below, with its own ``vs_min_effect`` tick.

    ``relative=True`` divides every number of a row by its minimum effect, so claims measured on
    different scales share one axis (0: no effect, 1: the minimum effect). Claim text is
    wrapped at ``wrap`` characters. Returns the axes."""
    missing = [c for c in ("claim", "estimate", "lo", "hi", "min_effect", "verdict") if c not in claims.columns]
    if missing:
        raise ValueError(f"plot_forest needs the columns {missing}; give it the claims ledger (collect_claims)")
    bad = sorted(set(claims["verdict"]) - set(VERDICT_COLOURS), key=str)
    if bad:
        raise ValueError(f"unknown verdicts {bad}; the ledger knows {list(VERDICT_COLOURS)}")
    d = claims.reset_index(drop=True)
    labels = [textwrap.fill(str(c), wrap) for c in d["claim"]]
    height = sum(0.2 * (lab.count("\n") + 1) + 0.15 for lab in labels) + 1.2
    ax = _ax(ax, (8, max(2.5, height)))
    controlled = {"vs_lo", "vs_hi", "vs_control", "vs_min_effect"} <= set(d.columns)

    def scaled(v, me):
        return float(v) / float(me) if relative else float(v)

    for i, r in d.iterrows():
        colour = VERDICT_COLOURS[r["verdict"]]
        me = r["min_effect"]
        lo, hi, est = scaled(r["lo"], me), scaled(r["hi"], me), scaled(r["estimate"], me)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [i, i], color=colour, lw=2.5, solid_capstyle="butt", gid="interval")
        if np.isfinite(est):
            ax.plot([est], [i], "o", color=colour, ms=7, mec="k", mew=0.6, gid="estimate")
        else:
            ax.text(0, i, " no estimate", va="center", fontsize=7, color="grey")
        ax.plot([scaled(me, me)], [i], marker="|", color="k", ms=13, mew=2, ls="none", gid="min_effect")
        if controlled and np.isfinite(r["vs_lo"]) and np.isfinite(r["vs_hi"]):
            vme = r["vs_min_effect"]
            y = i + 0.28
            ax.plot([scaled(r["vs_lo"], vme), scaled(r["vs_hi"], vme)], [y, y], color=colour, lw=1, gid="vs_interval")
            ax.plot([scaled(r["vs_control"], vme)], [y], "o", mfc="white", mec=colour, ms=4, gid="vs_estimate")
            ax.plot([scaled(vme, vme)], [y], marker="|", color="k", ms=7, mew=1, ls="none", gid="vs_min_effect")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(d)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(d) - 0.5, -0.6)  # first claim on top
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", mec="k", lw=2.5, label=v) for v, c in VERDICT_COLOURS.items()]
    handles.append(Line2D([], [], color="k", marker="|", ms=10, mew=2, ls="none", label="minimum effect"))
    if controlled:
        handles.append(
            Line2D([], [], color="grey", lw=1, marker="o", mfc="white", ms=4, label="trained - random weights")
        )
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    unit = (
        "estimate / minimum effect (1 = the claim's minimum effect)" if relative else "estimate (each claim's measure)"
    )
    ax.set_xlabel(f"{unit}; line: interval")
    ax.set_title("Claims ledger: estimate and interval of every claim")
    ax.grid(axis="x", alpha=0.3)
    return ax
