"""Running probes over several seeds, and the progress bar the training loops use."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, enabled: bool | None = None):
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal."""
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, mininterval=2)


def _is_scalar(v: Any) -> bool:
    """A real number: Python, numpy, or a one-element torch tensor."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex()
    return isinstance(v, numbers.Real | np.number) and not isinstance(v, np.complexfloating)


def _metrics_of(result: Any) -> dict[str, float]:
    """Scalar metrics of one probe result: a number, or a mapping whose numeric values are kept."""
    if _is_scalar(result):
        return {"value": float(result)}
    if isinstance(result, Mapping):
        out = {str(k): float(v) for k, v in result.items() if _is_scalar(v)}
        if not out:
            raise ValueError(f"probe result mapping holds no numeric value: keys {list(result)}")
        return out
    raise ValueError(
        f"a probe function must return a number or a mapping metric -> number, got {type(result).__name__};"
        " wrap it, e.g. lambda seed: {'acc': linear_probe(..., seed=seed).accuracy}"
    )


def mean_std_over_seeds(fn: Callable[[int], Any], seeds: Iterable[int] = (0, 1, 2)) -> pd.DataFrame:
    """Run ``fn(seed)`` for each seed and collect its metrics.

    Args:
        fn: probe function taking the seed; returns a number (metric ``"value"``) or
            a mapping ``metric -> number`` (non-numeric entries are dropped).
        seeds: seeds to run.

    Returns:
        Tidy DataFrame with columns ``seed, metric, value`` (one row per seed and
        metric); :func:`seed_summary` turns it into mean and std per metric.
    """
    rows = [
        {"seed": int(seed), "metric": metric, "value": value}
        for seed in seeds
        for metric, value in _metrics_of(fn(int(seed))).items()
    ]
    if not rows:
        raise ValueError("mean_std_over_seeds needs at least one seed")
    return pd.DataFrame(rows, columns=["seed", "metric", "value"])


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and count per metric of a
    :func:`mean_std_over_seeds` frame; columns ``metric, mean, std, n``."""
    g = df.groupby("metric", sort=False)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()
