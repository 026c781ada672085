"""The benchmark tables on the toy world: every protocol of :mod:`difstudy.protocols`
for the settings of the papers' tables.

``run_benchmark(BenchConfig(...))`` builds the toy-world records, a feature
source per setting, and calls the four protocol functions for every seed; it
returns a tidy DataFrame (one row per setting, task, protocol, metric and
seed) and the single-activation ranking. ``render(df)`` gives the mean +- std
table (``n/a`` for one seed). :data:`REFERENCE` holds the papers' numbers
(:func:`difstudy.reference.reference_frame`: each row with its ``source`` and what it
``includes``), only ever shown as separate, labelled reference rows.

Records and the protocol calls are the protocol layer's
(:mod:`difstudy.protocols.tasks`: :func:`~difstudy.protocols.task_records`,
:func:`~difstudy.protocols.run_task`); :class:`BenchConfig` is its
:class:`~difstudy.protocols.TaskConfig` plus the feature settings.

Settings: ``raw pixels``; ``random-weight U-Net`` (the model's architecture,
fresh weights, ours-v1.5 set); ``legacy-v1.5``; ``ours-v1.5``; ``best single
activation`` (the catalogue entry with the best validation correspondence).

The task configs default to the official protocols; the toy images are 64 px,
so the parameter files scale some sizes down, and each such change appears in
the ``protocol`` label of the rows it affects.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import pandas as pd

from . import protocols as P
from .catalog import NAMED_SETS
from .protocols.tasks import TASKS as TASKS  # re-exported, as seg_world_size: their home is the protocol layer
from .protocols.tasks import run_task, task_records
from .protocols.tasks import seg_world_size as seg_world_size
from .reference import reference_frame

SETTINGS = ("raw pixels", "random-weight U-Net", "legacy-v1.5", "ours-v1.5", "best single activation")

# Papers' numbers, each row with its source and what it includes (difstudy.reference). Reference only.
REFERENCE = reference_frame()


@dataclass(frozen=True)
class BenchConfig(P.TaskConfig):
    """Parameters of one benchmark run (the notebooks' ``ci``/``full`` sets): the tasks of
    :class:`~difstudy.protocols.TaskConfig` and the feature settings.

    The four task configs may be given as dicts of their fields (as in the YAML
    parameter files); lists become tuples.
    """

    timestep: int = 50
    variant: str = "empty"
    n_val: int = 40  # images for ranking single activations
    settings: tuple[str, ...] = SETTINGS
    rank_candidates: str = "all"  # catalogue entries ranked for the best single activation
    cache_dir: str = "cache/features"
    batch_size: int = 16
    # real datasets (the full parameters): {task: dataset} under data_root (difstudy data prepare);
    # None: the toy world
    data_root: str | None = None
    datasets: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "datasets", dict(self.datasets or {}))
        bad = [s for s in self.settings if s not in SETTINGS and s not in NAMED_SETS]
        if bad:
            raise ValueError(
                f"unknown setting {bad[0]!r}; use raw pixels, random-weight U-Net, best single activation "
                f"or a named set {sorted(NAMED_SETS)}"
            )

    def extraction(self) -> P.ExtractionConfig:
        return P.ExtractionConfig(
            t=self.timestep,
            variant=self.variant,
            image_size=self.image_size,
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,
        )


# -- settings ----------------------------------------------------------------------
def rank_single(pipe, cfg: BenchConfig, names) -> pd.DataFrame:
    """Validation correspondence PCK (seed 0, zero-shot protocol of ``cfg``) of every
    activation alone, best first (the toy world's val split, or the real correspondence
    dataset's val pairs with ``cfg.data_root``)."""
    if cfg.data_root:
        from .real import validation_pairs

        pairs = validation_pairs(cfg, cfg.data_root, cfg.datasets, cfg.n_pairs)
    else:
        pairs = P.toy_pairs(P.toy_world("val", cfg.n_val, cfg), cfg.n_pairs, seed=0)
    everyone = P.CachedFeatures(pipe, list(names), cfg.extraction(), 0, cfg.model)
    everyone.prepare(P.pair_images(pairs))  # one forward per batch for all candidates
    nn_cfg = replace(cfg.correspondence, method="nn")
    rows = []
    for n in names:
        df = P.correspondence(everyone.select([n]), pairs, nn_cfg, seed=0)  # read back, nothing recomputed
        rows.append(dict(activation=n, **dict(zip(df["metric"], df["value"]))))
    img = f"PCK@{nn_cfg.alpha:g} img"
    return pd.DataFrame(rows).sort_values(img, ascending=False, kind="stable").reset_index(drop=True)


def feature_sources(pipe, cfg: BenchConfig) -> tuple[dict[str, tuple[P.FeatureSource, str]], pd.DataFrame]:
    """``{setting: (source, activations)}`` and the single-activation ranking (empty unless ranked)."""
    from .denoisers import pipeline_catalog

    ex, sources, ranking = cfg.extraction(), {}, pd.DataFrame()
    for s in cfg.settings:
        if s == "raw pixels":
            sources[s] = (P.PixelFeatures(), "pixels")
        elif s == "random-weight U-Net":
            acts = NAMED_SETS["ours-v1.5"]
            sources[s] = (P.RandomUNetFeatures(pipe, acts, ex, 0, cfg.model, label=s), "ours-v1.5")
        elif s in NAMED_SETS:
            sources[s] = (P.CachedFeatures(pipe, NAMED_SETS[s], ex, 0, cfg.model, label=s), s)
        else:  # best single activation
            cat = pipeline_catalog(pipe, cfg.image_size)
            cands = cat.resolve([cfg.rank_candidates])
            ends = ("unet-in", "unet-out", "transformer-in", "transformer-out")
            cands = [c for c in cands if c not in ends] or cands
            ranking = rank_single(pipe, cfg, cands)
            best = ranking.iloc[0]["activation"]
            sources[s] = (P.CachedFeatures(pipe, [best], ex, 0, cfg.model, label=s), best)
    return sources, ranking


# -- the whole run ---------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns ``(results, ranking)``: tidy results and the single-activation ranking."""
    from tqdm.auto import tqdm

    from .models import load

    pipe = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    sources, ranking = feature_sources(pipe, cfg)
    if cfg.data_root:
        from .real import dataset_records

        records = dataset_records(cfg, cfg.data_root, cfg.datasets)
    else:
        records = task_records(cfg)
    frames = []
    bar = tqdm(total=len(sources) * len(cfg.tasks) * len(cfg.seeds), desc="benchmark", disable=not progress)
    for setting, (source, acts) in sources.items():
        for task in cfg.tasks:
            for seed in cfg.seeds:
                t0 = time.time()
                df = run_task(task, source, records[task], cfg, seed)
                frames.append(
                    df.assign(
                        dataset=cfg.datasets.get(task, "toy world") if cfg.data_root else "toy world",
                        setting=setting,
                        activations=acts,
                        model=cfg.model,
                        t=cfg.timestep,
                        seconds=round(time.time() - t0, 2),
                    )
                )
                bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True), ranking


def render(df: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Mean +- std over seeds (in %; ``n/a`` for one seed), one row per setting, one
    column per (task, protocol, metric)."""
    return P.render(df, index="setting", digits=digits)


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)
