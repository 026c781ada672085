"""GATE, the page's probe runs: the feature settings (baseline, each technique, their
amalgamation, the timestep control) and every setting, task and seed through the protocol
layer (:func:`difstudy.protocols.run_task`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .amalgamation import AMALGAMATED_LABEL, FIT_TASKS, AmalgamatedFeatures, AmalgamationConfig
from .features import TechniqueFeatures


def gate_sources(
    base: TechniqueFeatures,
    techniques: Sequence[str],
    t: int,
    records: dict,
    bench,
    control_timesteps: Sequence[int] | None = None,
    config: AmalgamationConfig = AmalgamationConfig(),
    baseline: str = "basic",
    control_base: TechniqueFeatures | None = None,
) -> dict[str, dict[str, Any]]:
    """``{setting: {task: source}}``: the baseline, each technique alone, all of them amalgamated
    (``baseline`` and ``techniques`` at ``t``) and, when ``control_timesteps`` has two or more
    timesteps, the baseline at those timesteps amalgamated (read from ``control_base``, default
    ``base``, which must extract them; a source of the baseline alone shares its cache entries).
    ``records`` and ``bench`` are :func:`difstudy.protocols.task_records` and its
    :class:`~difstudy.protocols.TaskConfig` (or a config extending it); an amalgamation is fit
    per task on the training data its protocol trains on for the seed
    (:func:`difstudy.protocols.train_records`)."""
    from ..protocols import train_records

    train = {task: lambda seed, task=task: train_records(task, records[task], bench, seed) for task in FIT_TASKS}
    tasks = list(bench.tasks)
    out: dict[str, dict[str, Any]] = {}
    out[baseline] = {task: base.select((baseline, t), label=baseline) for task in tasks}
    for name in techniques:
        out[name] = {task: base.select((name, t), label=name) for task in tasks}
    if techniques:
        label = AMALGAMATED_LABEL + " + ".join([baseline, *techniques])
        buckets = [(baseline, t)] + [(n, t) for n in techniques]
        out[label] = {
            task: AmalgamatedFeatures(base, buckets, task, train[task], config, label=label) for task in tasks
        }
    if control_timesteps is not None and len(control_timesteps) >= 2:
        label = AMALGAMATED_LABEL + " + ".join(f"{baseline} t={s}" for s in control_timesteps)
        buckets = [(baseline, int(s)) for s in control_timesteps]
        cb = control_base or base
        out[label] = {task: AmalgamatedFeatures(cb, buckets, task, train[task], config, label=label) for task in tasks}
    return out


def run_gate_probes(sources: dict[str, dict[str, Any]], records: dict, bench, progress: bool = True) -> pd.DataFrame:
    """Every setting, task and seed through the protocols (:func:`difstudy.protocols.run_task`):
    tidy rows with ``setting``, ``model``, ``t`` and ``seconds`` added."""
    from ..protocols import run_task

    frames = []
    total = sum(len(v) for v in sources.values()) * len(bench.seeds)
    bar = tqdm(total=total, desc="GATE probes", disable=not progress)
    for setting, per_task in sources.items():
        for task, source in per_task.items():
            for seed in bench.seeds:
                t0 = time.time()
                df = run_task(task, source, records[task], bench, int(seed))
                frames.append(df.assign(setting=setting, model=bench.model, seconds=round(time.time() - t0, 2)))
                bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True)
