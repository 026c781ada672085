"""Plots used by the notebooks: functions ``plot_x(data, ax=None)`` that take
tidy frames or arrays and return the matplotlib axes."""

from __future__ import annotations

import numpy as np
import pandas as pd


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
    """Mean +- std of ``value`` per activation and weights (from :func:`difstudy.models.card.feature_pck`)."""
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
