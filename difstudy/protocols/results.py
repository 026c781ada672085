"""Tidy results of the protocols, runs over seeds, and the mean +- std table.

Every protocol returns one row per metric with the columns of
:data:`RESULT_COLUMNS`; :func:`over_seeds` stacks runs; :func:`render` turns
a frame into the "mean +- std over seeds" table, with ``n/a`` for the
spread when a cell holds one seed (a sample std of one value is undefined,
not zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

RESULT_COLUMNS = ["task", "protocol", "metric", "value", "seed", "features", "n_train", "n_test"]


def result_frame(
    task: str,
    protocol: str,
    metrics: Mapping[str, float],
    seed: int,
    features: str,
    n_train: int,
    n_test: int,
) -> pd.DataFrame:
    """One row per metric (columns :data:`RESULT_COLUMNS`)."""
    rows = [
        dict(
            task=task,
            protocol=protocol,
            metric=m,
            value=float(v),
            seed=int(seed),
            features=features,
            n_train=n_train,
            n_test=n_test,
        )
        for m, v in metrics.items()
    ]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def over_seeds(run: Callable[[int], pd.DataFrame], seeds: Iterable[int]) -> pd.DataFrame:
    """``run(seed)`` for every seed, stacked."""
    frames = [run(int(s)) for s in seeds]
    if not frames:
        raise ValueError("over_seeds needs at least one seed")
    return pd.concat(frames, ignore_index=True)


def summarize(df: pd.DataFrame, by: Iterable[str] = ("task", "protocol", "metric")) -> pd.DataFrame:
    """Mean, sample std (NaN for one seed) and number of seeds of ``value`` per group."""
    g = df.groupby(list(by), sort=False)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()


def cell(mean: float, std: float, n: int, digits: int = 1, scale: float = 100.0) -> str:
    """``"m ± s"`` in percent; ``"m ± n/a"`` when there is one seed (or no spread is defined)."""
    spread = "n/a" if n < 2 or not np.isfinite(std) else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {spread}"


def render(df: pd.DataFrame, index: str = "features", digits: int = 1) -> pd.DataFrame:
    """Mean +- std over seeds in %, one row per ``index`` value (first-seen order), one column
    per (task, protocol, metric): the protocol label names every deviation from the official code."""
    stats = summarize(df, (index, "task", "protocol", "metric"))
    stats["cell"] = [cell(m, s, n, digits) for m, s, n in zip(stats["mean"], stats["std"], stats["n"])]
    out = stats.pivot(index=index, columns=["task", "protocol", "metric"], values="cell")
    cols = list(dict.fromkeys(zip(stats["task"], stats["protocol"], stats["metric"])))
    return out.reindex(index=list(dict.fromkeys(df[index])), columns=pd.MultiIndex.from_tuples(cols))
