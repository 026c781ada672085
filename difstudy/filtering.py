"""Filtering the activation catalogue: the paper's qualitative filter, then a quantitative comparison.

Meng et al. (NeurIPS'24) do not probe every one of the hundreds of candidate
activations on every task. They first drop candidates *qualitatively*, by the
three properties of diffusion U-Nets, and only compare the survivors
*quantitatively*. Here both steps are reproducible functions of measured
numbers (:mod:`difstudy.properties`):

**1. Qualitative filter** (:func:`qualitative_filter`, thresholds in
:class:`FilterConfig`), applied in this order, each activation dropped by the
first rule it fails, read at one timestep ``cfg.t``:

- *asymmetric diffusion noise* (property 1): an activation whose noise share
  is above ``max_noise_share`` is dropped as noise-dominated (default 0.5:
  more of its variance changes with the noise draw than is shared by the
  draws). A constant map (noise share undefined) is dropped too.
- *locality without positional embeddings* (property 3), only for the tasks in
  ``locality_tasks`` (correspondence: matching by nearest neighbour suffers
  when near pixels look alike whatever they show): an activation whose
  locality index exceeds the median locality of its resolution level by more
  than ``max_locality_excess`` is dropped ("locality dominates"). The rule is
  relative to the level because the index also grows with how smooth a level's
  maps are in general (every 8x8 level of the mini model scores above 0.6);
  the paper's point is activations that are *more* local than their peers.
  Activations without a locality value (2x2 maps have no far pixel pairs) pass.
- *in-resolution granularity changes* (property 2): inside one resolution
  level (:func:`difstudy.properties.resolution_group`; unet-in/-out form the
  level ``unet``) the surviving activations are sorted by granularity and cut
  into ``n_granularity_groups`` groups of (nearly) equal size, coarse to fine;
  activations of similar granularity are taken as redundant and only the
  ``representatives`` of each group with the lowest noise share (ties: forward
  order) are kept. Activations without a granularity value form one extra
  group of their level.

**2. Quantitative comparison**: each candidate is scored alone on a task
through the protocol layer (:class:`Scorer` wraps
:func:`difstudy.protocols.correspondence` or
:func:`difstudy.protocols.classification`; nothing is reimplemented), then
:func:`greedy_select` builds a set of ``k`` activations, adding at each step
the candidate that most improves the task metric of the concatenated set and
stopping early when no candidate improves it.

**3. Check of the method**: :func:`recall_at_k` compares the filter's
candidates with an exhaustive ranking of every activation;
:func:`ranking_cost` measures the CPU seconds (``time.process_time``) of
extraction and probing each way, into a fresh feature cache so that nothing
is read back from an earlier run.

Every table is tidy; :func:`claims` states the two claims of this page
(the filter keeps the best activations; the selected set beats the legacy
set) with their measured numbers and verdicts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .properties import MEASURES, resolution_group

FILTER_COLUMNS = [
    "activation", "kind", "stage", "level", "group", "t", "kept", "reason", "noise_share", "granularity", "locality",
]  # fmt: skip
SCORE_COLUMNS = ["activation", "task", "metric", "value", "rank"]
GREEDY_COLUMNS = ["step", "activation", "set", "value", "gain", "n_tried", "task", "metric"]
TASKS = ("correspondence", "classification")
KEPT = "kept"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of :func:`qualitative_filter` (the rules are in the module docstring).

    Attributes:
        t: timestep the properties are read at (None: 50 if the table holds it, else its smallest).
        max_noise_share: drop an activation whose noise share is above this (property 1).
        max_locality_excess: drop an activation whose locality index is more than this above the
            median of its resolution level (property 3), for the tasks in ``locality_tasks``;
            None switches the rule off.
        locality_tasks: tasks the locality rule applies to.
        n_granularity_groups: equal-size granularity groups per resolution level (property 2).
        representatives: activations kept per granularity group (lowest noise share first).
    """

    t: int | None = 50
    max_noise_share: float = 0.5
    max_locality_excess: float | None = 0.15
    locality_tasks: tuple[str, ...] = ("correspondence",)
    n_granularity_groups: int = 3
    representatives: int = 1

    def __post_init__(self):
        if not 0 <= self.max_noise_share <= 1:
            raise ValueError(f"max_noise_share must lie in [0, 1], got {self.max_noise_share}")
        if self.n_granularity_groups < 1 or self.representatives < 1:
            raise ValueError(
                f"n_granularity_groups and representatives must be >= 1, got "
                f"{self.n_granularity_groups} and {self.representatives}"
            )
        object.__setattr__(self, "locality_tasks", tuple(self.locality_tasks))


# -- 1. the qualitative filter ------------------------------------------------------------
def _wide(properties_df: pd.DataFrame, t: int | None) -> tuple[pd.DataFrame, int]:
    """One row per activation (forward order) with a column per measure, at timestep ``t``."""
    missing = [c for c in ("activation", "kind", "stage", "level", "t", "measure", "value") if c not in properties_df]
    if missing:
        raise ValueError(f"the property table lacks the columns {missing}; use difstudy.properties.measure_properties")
    ts = sorted(int(x) for x in properties_df["t"].unique())
    if not ts:
        raise ValueError("the property table is empty")
    if t is None:
        t = 50 if 50 in ts else ts[0]
    if int(t) not in ts:
        raise ValueError(f"t={t} is not in the property table; it holds timesteps {ts}")
    d = properties_df[properties_df["t"] == int(t)]
    info = d.drop_duplicates("activation").set_index("activation")[["kind", "stage", "level"]]
    wide = d.pivot_table(index="activation", columns="measure", values="value", aggfunc="mean", dropna=False)
    wide = info.join(wide.reindex(columns=list(MEASURES)))
    wide = wide.reset_index()
    wide["group"] = resolution_group(wide).replace("", "unet").to_numpy()
    return wide, int(t)


def qualitative_filter(properties_df: pd.DataFrame, cfg: FilterConfig = FilterConfig(), task: str = "correspondence"):
    """The qualitative filter on a property table (:func:`difstudy.properties.measure_properties`).

    Returns one row per activation in the table's order: ``activation, kind, stage, level,
    group`` (resolution level), ``t``, ``kept`` (bool), ``reason`` (``"kept"`` or why it was dropped, with the numbers) and the three
    property values at ``cfg.t``. Raises ``ValueError`` when a measure a rule needs is missing
    from the table (``noise_share`` and ``granularity`` always; ``locality`` when the locality
    rule applies to ``task``)."""
    wide, t = _wide(properties_df, cfg.t)
    use_locality = task in cfg.locality_tasks and cfg.max_locality_excess is not None
    need = ["noise_share", "granularity"] + (["locality"] if use_locality else [])
    absent = [m for m in need if m not in set(properties_df["measure"])]
    if absent:
        raise ValueError(
            f"the filter for task {task!r} needs the measures {need}; the table lacks {absent} "
            f"(measure them with difstudy.properties.measure_properties(..., measures={need}))"
        )
    reason = pd.Series(KEPT, index=wide.index, dtype=object)
    ns = wide["noise_share"]
    const = ns.isna()
    reason[const] = "constant map (noise share undefined)"
    noisy = ~const & (ns > cfg.max_noise_share)
    reason[noisy] = [f"noise-dominated (noise_share={v:.2f} > {cfg.max_noise_share:g})" for v in ns[noisy]]
    if use_locality:
        loc = wide["locality"]
        median = loc.groupby(wide["group"]).transform("median")
        local = (reason == KEPT) & loc.notna() & (loc - median > cfg.max_locality_excess)
        reason[local] = [
            f"locality dominates (locality={v:.2f} > {g} median {m:.2f} + {cfg.max_locality_excess:g})"
            for v, m, g in zip(loc[local], median[local], wide["group"][local])
        ]
    survivors = wide[reason == KEPT]
    for group, d in survivors.groupby("group", sort=False):
        measured = d[d["granularity"].notna()].sort_values("granularity", kind="stable")
        parts = np.array_split(np.arange(len(measured)), min(cfg.n_granularity_groups, len(measured)))
        blocks = [(f"{i + 1}/{len(parts)}", measured.iloc[p]) for i, p in enumerate(parts) if len(p)]
        unmeasured = d[d["granularity"].isna()]
        if len(unmeasured):
            blocks.append(("without granularity", unmeasured))
        for label, b in blocks:
            ranked = b.assign(_pos=b.index).sort_values(["noise_share", "_pos"], kind="stable")
            reps = ranked.iloc[: cfg.representatives]
            lo, hi = b["granularity"].min(), b["granularity"].max()
            span = f"granularity {lo:.3f}-{hi:.3f}" if np.isfinite(lo) else "granularity undefined"
            for i in ranked.index[cfg.representatives :]:
                reason[i] = (
                    f"not a representative of its granularity group ({group} group {label}, {span}; "
                    f"kept: {', '.join(reps['activation'])})"
                )
    out = wide.assign(kept=reason == KEPT, reason=reason, t=t)
    return out[FILTER_COLUMNS].reset_index(drop=True)


def candidates(filter_df: pd.DataFrame) -> list[str]:
    """The kept activations of a :func:`qualitative_filter` table, in its order."""
    return filter_df.loc[filter_df["kept"].astype(bool), "activation"].tolist()


def filter_summary(filter_df: pd.DataFrame) -> pd.DataFrame:
    """How many activations each rule dropped: rows ``rule, n`` (``kept`` last)."""
    rule = filter_df["reason"].str.extract(r"^([^(]+)")[0].str.strip()
    counts = rule.value_counts(sort=False)
    order = [r for r in counts.index if r != KEPT] + ([KEPT] if KEPT in counts.index else [])
    return pd.DataFrame({"rule": order, "n": [int(counts[r]) for r in order]})


# -- properties: read what the property notebooks wrote, or measure ----------------------
def _expected_sizes(frame: pd.DataFrame) -> dict[str, int]:
    """Spatial side of every non-map activation of a catalogue frame (its ``shape`` is CxHxW)."""
    out = {}
    for name, kind, shape in zip(frame["name"], frame["kind"], frame["shape"]):
        dims = [int(s) for s in str(shape).split("x")]
        if kind not in ("self-map", "cross-map") and len(dims) == 3:
            out[name] = min(dims[1:])
    return out


def check_property_split(df: pd.DataFrame, path) -> None:
    """Refuse a property table measured on test images: the filter chooses activations from it,
    and the test pairs must play no part in that choice."""
    from .properties import CHOICE_SPLITS

    if "split" not in df.columns:
        raise ValueError(
            f"{path} does not record the split its images came from (a table from before splits were "
            f"recorded); delete it and rerun the property notebooks (they measure on the validation split)"
        )
    bad = sorted(set(df["split"].astype(str)) - set(CHOICE_SPLITS))
    if bad:
        raise ValueError(
            f"{path} was measured on the {bad} split; the filter chooses activations from it, so it must come "
            f"from {' or '.join(CHOICE_SPLITS)} images: rerun the property notebooks with split: val"
        )


def read_properties(paths, frame: pd.DataFrame, t: int, measures=MEASURES):
    """The property table in ``paths`` if it fits this model, else None; returns ``(table, why)``.

    ``paths``: one CSV, or several whose rows are put together (the property notebooks write one
    each: ``results.csv`` in their own ``out_dir``); a missing file means no table. It fits when it
    holds every measure in ``measures`` at timestep ``t`` for exactly the activations of the
    catalogue ``frame`` (:meth:`difstudy.catalog.Catalog.to_frame`, built at the image size used
    here), with the map sizes of that catalogue: the property notebooks' CSVs do not name their
    model, and SD1.5 and the mini model share their 197 names. A measure found in two of the files
    is refused (which one would the filter use?)."""
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        return None, "no property table given"
    missing = [p for p in paths if not p.exists()]
    if missing:
        return None, f"{missing[0]} does not exist"
    where = str(paths[0]) if len(paths) == 1 else ", ".join(map(str, paths))
    frames, owner = [], {}
    for path in paths:
        df = pd.read_csv(path)
        check_property_split(df, path)
        for m in df["measure"].unique():
            if m in owner:
                raise ValueError(f"the measure {m!r} is in both {owner[m]} and {path}; give each property table once")
            owner[m] = path
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df = df[df["t"] == int(t)]
    names = set(frame["name"])
    for m in measures:
        got = set(df.loc[df["measure"] == m, "activation"])
        if got != names:
            return None, f"{where} lacks {m} at t={t} for {len(names - got)} of the {len(names)} activations"
    sizes = df.drop_duplicates("activation").set_index("activation")["size"]
    wrong = [n for n, s in _expected_sizes(frame).items() if int(sizes[n]) != s]
    if wrong:
        return None, f"{where} was measured on another model or image size (map sizes differ, e.g. {wrong[0]})"
    return df[df["measure"].isin(list(measures))].reset_index(drop=True), f"read from {where}"


def properties_for(
    pipe,
    paths,
    dataset,
    t: int = 50,
    seeds: Sequence[int] = (0, 1, 2, 3),
    image_size: int | None = None,
    cache_dir: str | os.PathLike = "cache/features",
    model_name: str | None = None,
):
    """The property table the filter needs: :func:`read_properties` of ``paths`` (one CSV, or one
    per property notebook) when it fits this model, else
    :func:`difstudy.properties.measure_properties` on ``dataset`` at ``t``.

    Returns ``(table, origin, cpu_seconds)``: ``origin`` says where the numbers came from,
    ``cpu_seconds`` is the ``time.process_time`` of measuring them (NaN when read)."""
    from .denoisers import pipeline_catalog
    from .models import vae_scale_factor
    from .properties import CHOICE_SPLITS, dataset_split, measure_properties

    split = dataset_split(dataset)
    if split not in CHOICE_SPLITS:
        raise ValueError(
            f"the filter's properties must be measured on {' or '.join(CHOICE_SPLITS)} images, not on the "
            f"{split!r} split (no test image may take part in the choice); pass ToyWorld('val', n=...)"
        )
    catalog = pipeline_catalog(pipe, image_size)
    frame = catalog.to_frame()
    size = catalog.latent_hw[0] * vae_scale_factor(pipe)
    table, why = read_properties(paths, frame, t)
    if table is not None:
        return table, why, float("nan")
    c0 = time.process_time()
    table = measure_properties(
        pipe, dataset, timesteps=[t], seeds=seeds, image_size=size, cache_dir=cache_dir,
        model_name=model_name, progress=False,
    ).assign(split=split)  # fmt: skip
    origin = f"measured here ({len(dataset)} {split} images, seeds {list(seeds)}, t={t}; {why})"
    return table, origin, time.process_time() - c0


# -- 2. quantitative comparison through the protocol layer -------------------------------
def run_protocol(task: str, source, data, cfg=None, seed: int = 0) -> pd.DataFrame:
    """One protocol call of :mod:`difstudy.protocols`: ``data`` is the test pair records
    (``correspondence``) or ``(train, test)`` image records (``classification``)."""
    from . import protocols as P

    if task == "correspondence":
        return P.correspondence(source, data, cfg or P.CorrespondenceConfig(), seed)
    if task == "classification":
        train, test = data
        return P.classification(source, train, test, cfg or P.ClassifyConfig(), seed)
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


def task_images(task: str, data) -> list:
    """The distinct image records a task's ``data`` (see :func:`run_protocol`) needs features of."""
    from . import protocols as P

    if task == "correspondence":
        return P.pair_images(data)
    if task == "classification":
        return list(P.concat_records(*data))
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


def task_config(task: str, options: Mapping | None = None):
    """The protocol config of ``task`` with ``options`` (fields of
    :class:`~difstudy.protocols.CorrespondenceConfig` or :class:`~difstudy.protocols.ClassifyConfig`;
    each non-default field shows in the rows' ``protocol`` label)."""
    from . import protocols as P

    kinds = {"correspondence": P.CorrespondenceConfig, "classification": P.ClassifyConfig}
    if task not in kinds:
        raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")
    return kinds[task](**dict(options or {}))


def toy_task_data(task: str, split: str, n_images: int, n_pairs: int = 0, image_size: int = 64, n_train: int = 0):
    """Toy-world data for :func:`run_protocol`: pairs among the first ``n_images`` of ``split``
    (correspondence, pair seed 0), or ``(train, split)`` image records (classification, the first
    ``n_train`` train images)."""
    from . import protocols as P
    from .data.toyworld import ToyWorld

    world = ToyWorld(split, n=n_images, size=image_size)
    if task == "correspondence":
        if n_pairs < 1:
            raise ValueError(f"correspondence needs n_pairs >= 1, got {n_pairs}")
        return P.toy_pairs(world, n_pairs, seed=0)
    if task == "classification":
        if n_train < 1:
            raise ValueError(f"classification needs n_train >= 1 training images, got {n_train}")
        return P.toy_records(ToyWorld("train", n=n_train, size=image_size)), P.toy_records(world)
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


@dataclass(frozen=True)
class Sources:
    """Builds the :class:`~difstudy.protocols.CachedFeatures` of a set of activations of one model.

    ``batch_size`` 1 (one image per cache shard) keeps shard headers small, which makes reading
    one activation at a time, as single-activation ranking does, several times faster."""

    pipe: object
    t: int = 50
    image_size: int | None = None
    model_name: str | None = None
    cache_dir: str = "cache/features"
    variant: str = "empty"
    batch_size: int = 1

    def __call__(self, names: Sequence[str], cache_dir: str | None = None, label: str | None = None):
        from . import protocols as P

        ex = P.ExtractionConfig(
            t=self.t, variant=self.variant, image_size=self.image_size, batch_size=self.batch_size,
            cache_dir=str(cache_dir or self.cache_dir),
        )  # fmt: skip
        return P.CachedFeatures(self.pipe, list(names), ex, 0, self.model_name, label=label)


def default_metric(task: str, cfg=None) -> str:
    if task == "correspondence":
        return f"PCK@{getattr(cfg, 'alpha', 0.1):g} img"
    if task == "classification":
        return "accuracy"
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


@dataclass
class Scorer:
    """The task metric of a set of activations, through the protocol layer.

    ``source`` extracts every activation that will be scored (a
    :class:`~difstudy.protocols.CachedFeatures`; each call reads a subset with ``select``,
    nothing is extracted again); ``data`` as in :func:`run_protocol`. ``calls`` counts the
    protocol runs (activations or sets probed)."""

    source: object
    task: str
    data: object
    cfg: object = None
    seed: int = 0
    metric: str | None = None
    calls: int = field(default=0, init=False)

    def __post_init__(self):
        self.metric = self.metric or default_metric(self.task, self.cfg)

    def prepare(self) -> None:
        """Extract the features of every image the task needs (once, for all activations)."""
        self.source.prepare(task_images(self.task, self.data))

    def __call__(self, names: Sequence[str]) -> float:
        self.calls += 1
        df = run_protocol(self.task, self.source.select(list(names)), self.data, self.cfg, self.seed)
        values = df.loc[df["metric"] == self.metric, "value"]
        if values.empty:
            raise ValueError(f"the {self.task} protocol reports {list(df['metric'])}, not {self.metric!r}")
        return float(values.iloc[0])


def score_each(scorer: Callable[[Sequence[str]], float], names: Sequence[str]) -> pd.DataFrame:
    """Each activation alone: rows ``activation, task, metric, value, rank`` (1 = best; ties share
    the best rank), best first (ties in the order of ``names``)."""
    rows = [dict(activation=n, value=float(scorer([n]))) for n in names]
    df = pd.DataFrame(rows, columns=["activation", "value"])
    df["task"] = getattr(scorer, "task", "")
    df["metric"] = getattr(scorer, "metric", "")
    df["rank"] = df["value"].rank(ascending=False, method="min").astype(int)
    return df.sort_values("rank", kind="stable").reset_index(drop=True)[SCORE_COLUMNS]


def greedy_select(
    scorer: Callable[[Sequence[str]], float],
    candidates: Sequence[str],
    k: int = 4,
    singles: pd.DataFrame | None = None,
    pool: int | None = None,
) -> pd.DataFrame:
    """Greedy forward selection of up to ``k`` activations by ``scorer`` (higher is better).

    Step 1 takes the best single candidate (from ``singles``, a :func:`score_each` table, when
    given, so singles are not probed again); each later step tries every remaining candidate
    added to the current set and keeps the one that raises the set's score most, stopping at
    ``k`` or when no candidate raises it. Ties go to the candidate listed first. ``pool``
    restricts the search to the ``pool`` best single candidates (None: all).

    Returns one row per step taken: ``step, activation`` (added), ``set`` (space-separated),
    ``value`` (score of the set), ``gain`` (over the previous step; the first step's over 0),
    ``n_tried`` (sets probed in that step), ``task, metric``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cands = list(dict.fromkeys(candidates))
    if not cands:
        raise ValueError("greedy_select needs at least one candidate")
    if singles is None:
        singles = score_each(scorer, cands)
        tried_first = len(cands)
    else:
        missing = [c for c in cands if c not in set(singles["activation"])]
        if missing:
            raise ValueError(f"singles has no score for the candidates {missing[:5]}")
        tried_first = 0
    single = singles.set_index("activation")["value"]
    order = sorted(cands, key=lambda c: (-single[c], cands.index(c)))
    if pool is not None:
        order = order[: max(int(pool), 1)]
    chosen, best = [order[0]], float(single[order[0]])
    task, metric = getattr(scorer, "task", ""), getattr(scorer, "metric", "")
    rows = [dict(step=1, activation=order[0], set=order[0], value=best, gain=best, n_tried=tried_first)]
    while len(chosen) < k:
        rest = [c for c in order if c not in chosen]
        if not rest:
            break
        scores = [float(scorer([*chosen, c])) for c in rest]
        i = int(np.argmax(scores))
        if not scores[i] > best:
            break
        chosen.append(rest[i])
        rows.append(
            dict(
                step=len(chosen),
                activation=rest[i],
                set=" ".join(chosen),
                value=scores[i],
                gain=scores[i] - best,
                n_tried=len(rest),
            )
        )
        best = scores[i]
    return pd.DataFrame(rows).assign(task=task, metric=metric)[GREEDY_COLUMNS]


def selected(greedy_df: pd.DataFrame) -> list[str]:
    """The final set of a :func:`greedy_select` table."""
    return greedy_df["activation"].tolist()


# -- 3. the check of the method ------------------------------------------------------------
def top_k(scores: pd.DataFrame, k: int) -> list[str]:
    """Activations scoring at least the ``k``-th best value of a :func:`score_each` table (ties at
    the boundary included, so it may hold more than ``k``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = scores["value"].sort_values(ascending=False, kind="stable")
    if values.empty:
        return []
    cut = values.iloc[min(k, len(values)) - 1]
    return scores.loc[scores["value"] >= cut, "activation"].tolist()


def recall_at_k(scores: pd.DataFrame, kept: Sequence[str], k: int) -> float:
    """Share of the exhaustive top-``k`` (:func:`top_k`, ties included) that is among ``kept``."""
    top = top_k(scores, k)
    if not top:
        raise ValueError("recall_at_k needs a non-empty score table")
    kept = set(kept)
    return sum(a in kept for a in top) / len(top)


def recall_table(scores: pd.DataFrame, kept: Sequence[str], ks: Sequence[int] = (5, 10)) -> pd.DataFrame:
    """Rows ``k, n_top, n_top_kept, recall, chance``: the exhaustive top-k among the filter's
    candidates; ``chance`` is the recall of ``len(kept)`` activations drawn at random."""
    kept_set = set(kept)
    rows = []
    for k in ks:
        top = top_k(scores, k)
        hit = sum(a in kept_set for a in top)
        rows.append(
            dict(
                k=int(k),
                n_top=len(top),
                n_top_kept=hit,
                recall=hit / len(top),
                chance=len(kept_set & set(scores["activation"])) / len(scores),
            )
        )
    return pd.DataFrame(rows)


def ranking_cost(make_source: Callable[..., object], names: Sequence[str], task: str, data, cfg=None):
    """Rank ``names`` alone on ``task`` into a fresh temporary feature cache and time it.

    ``make_source(names, cache_dir=...)`` builds the feature source (a :class:`Sources`).
    Returns ``(scores, cost)``: the :func:`score_each` table and a dict with the CPU seconds
    (``time.process_time``) of ``extraction`` and ``probing``, the wall ``seconds`` and the number
    of activations ``probed``. The temporary cache is deleted afterwards."""
    tmp = tempfile.mkdtemp(prefix="difstudy-ranking-")
    try:
        w0, c0 = time.time(), time.process_time()
        scorer = Scorer(make_source(list(names), cache_dir=tmp), task, data, cfg)
        scorer.prepare()
        c1 = time.process_time()
        scores = score_each(scorer, names)
        c2 = time.process_time()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cost = dict(extraction=c1 - c0, probing=c2 - c1, seconds=time.time() - w0, probed=scorer.calls)
    return scores, cost


def cost_table(filtered: Mapping[str, float], exhaustive: Mapping[str, float]) -> pd.DataFrame:
    """Tidy rows ``approach, quantity, value`` of the two :func:`ranking_cost` dicts (``filtered``
    may carry ``properties``: the CPU seconds of measuring them, NaN when they were read)."""
    rows = []
    for approach, c in (("filter then rank", filtered), ("exhaustive", exhaustive)):
        props = float(c.get("properties", 0.0)) if approach == "filter then rank" else 0.0
        total = c["extraction"] + c["probing"] + (props if np.isfinite(props) else 0.0)
        rows += [
            dict(approach=approach, quantity="activations probed", value=float(c["probed"])),
            dict(approach=approach, quantity="CPU s: properties", value=props),
            dict(approach=approach, quantity="CPU s: extraction", value=float(c["extraction"])),
            dict(approach=approach, quantity="CPU s: probing", value=float(c["probing"])),
            dict(approach=approach, quantity="CPU s: total", value=float(total)),
        ]
    return pd.DataFrame(rows)


# -- 4. the chosen set against the paper's sets --------------------------------------------
def compare_sets(
    make_source: Callable[..., object],
    sets: Mapping[str, Sequence[str]],
    task: str,
    data,
    cfg=None,
    seeds: Sequence[int] = (0,),
) -> pd.DataFrame:
    """Every set of ``sets`` ({label: activations}) through the same protocol for every seed:
    the protocol's tidy rows (:data:`~difstudy.protocols.RESULT_COLUMNS`) plus ``setting`` and
    ``activations``. ``make_source(names, label=...)`` builds the feature source of a set (a
    :class:`Sources`)."""
    from . import protocols as P

    frames = []
    for label, names in sets.items():
        source = make_source(list(names), label=label)
        df = P.over_seeds(lambda s, src=source: run_protocol(task, src, data, cfg, s), seeds)
        frames.append(df.assign(setting=label, activations=" ".join(names)))
    return pd.concat(frames, ignore_index=True)


def set_means(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std and number of seeds of ``metric`` per setting of :func:`compare_sets` (its order)."""
    d = results[results["metric"] == metric]
    if d.empty:
        raise ValueError(f"no rows for metric {metric!r}; the results hold {sorted(results['metric'].unique())}")
    g = d.groupby("setting", sort=False)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index().assign(metric=metric)


# -- 5. claims ---------------------------------------------------------------------------------
MIN_RECALL_GAIN = 0.2
"""The filter keeps the best activations: recall@k at least 20 points above a random subset of
the same size (two more of the exhaustive top ten than chance would keep)."""
MIN_SET_GAIN = 0.01
"""The selected set beats the legacy set: one point of the task metric (PCK, accuracy)."""


def claims(
    recall: pd.DataFrame,
    results: pd.DataFrame,
    metric: str,
    recall_k: int = 10,
    selected_label: str = "selected",
    legacy_label: str = "legacy-v1.5",
) -> pd.DataFrame:
    """This page's claims, one ledger row each (:data:`difstudy.verdicts.CLAIM_COLUMNS`):

    - the filter keeps the best activations: the share of the exhaustive top ``recall_k``
      (:func:`recall_table`, the units) that the filter keeps, against chance (a random subset of
      the filter's size keeps ``len(kept) / N`` of them in expectation, the hypergeometric mean):
      :func:`difstudy.verdicts.proportion_vs_chance` with :data:`MIN_RECALL_GAIN`. A filter that
      keeps everything has chance 1 and cannot hold;
    - the selected set beats the legacy set: test ``metric`` of ``selected_label`` minus that of
      ``legacy_label`` (:func:`compare_sets` rows), paired per run seed (the units: each seed is
      a noise draw of the whole test set), :func:`difstudy.verdicts.paired` with
      :data:`MIN_SET_GAIN`; the legacy set's value is the control.
    """
    from .verdicts import paired, proportion_vs_chance

    r = recall[recall["k"] == recall_k]
    if r.empty:
        raise ValueError(f"the recall table has no k={recall_k}; it holds {sorted(recall['k'])}")
    r = r.iloc[0]
    d = results[results["metric"] == metric]
    per_seed = d.pivot_table(index="seed", columns="setting", values="value")
    for label in (selected_label, legacy_label):
        if label not in per_seed.columns:
            raise ValueError(f"no setting {label!r} with metric {metric!r}; the results hold {list(per_seed.columns)}")
    diff = per_seed[selected_label] - per_seed[legacy_label]
    recall_v = proportion_vs_chance(int(r["n_top_kept"]), int(r["n_top"]), float(r["chance"]), MIN_RECALL_GAIN)
    return pd.DataFrame(
        [
            recall_v.row(
                "the filter keeps the best activations",
                f"recall@{recall_k} of the exhaustive single-activation ranking among the filter's candidates, "
                f"minus chance (a random subset of the same size)",
                control=float(r["chance"]),
            ),
            paired(diff.to_numpy(), MIN_SET_GAIN).row(
                "the selected set beats the legacy set",
                f"test {metric}, {selected_label} minus {legacy_label}, paired per run seed ({len(diff)} seeds)",
                control=float(per_seed[legacy_label].mean()),
            ),
        ]
    )


# -- plots -------------------------------------------------------------------------------------
def plot_ranking(scores: pd.DataFrame, filter_df: pd.DataFrame, ax=None):
    """Exhaustive single-activation score of every activation in forward order, coloured by
    the filter's decision (kept, or the rule that dropped it)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 3.5))
    d = filter_df[["activation", "reason"]].merge(scores[["activation", "value"]], on="activation", how="inner")
    d["rule"] = d["reason"].str.extract(r"^([^(]+)")[0].str.strip()
    colours = {KEPT: "tab:green", "noise-dominated": "tab:red", "locality dominates": "tab:orange"}
    x = np.arange(len(d))
    for rule, g in d.groupby("rule", sort=False):
        ax.scatter(x[g.index], g["value"], s=14, label=rule, color=colours.get(rule, "tab:gray"), zorder=2)
    ax.set_xlabel("activation (forward order: unet-in, down, mid, up, unet-out)")
    ax.set_ylabel(str(scores["metric"].iloc[0]) if "metric" in scores and len(scores) else "score")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, zorder=0)
    return ax


def plot_greedy(greedy_df: pd.DataFrame, reference: Mapping[str, float] | None = None, ax=None):
    """Score of the greedy set after each step, with optional horizontal reference lines."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(greedy_df["step"], greedy_df["value"], marker="o", label="greedy set")
    for (label, v), style in zip((reference or {}).items(), ("--", ":", "-.")):
        ax.axhline(v, linestyle=style, color="gray", label=label)
    ax.set_xticks(list(greedy_df["step"]))
    ax.set_xlabel("activations in the set")
    ax.set_ylabel(str(greedy_df["metric"].iloc[0]) if len(greedy_df) else "score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


__all__ = [
    "FilterConfig",
    "qualitative_filter",
    "candidates",
    "filter_summary",
    "read_properties",
    "properties_for",
    "run_protocol",
    "task_config",
    "toy_task_data",
    "Sources",
    "task_images",
    "Scorer",
    "score_each",
    "greedy_select",
    "selected",
    "top_k",
    "recall_at_k",
    "recall_table",
    "ranking_cost",
    "cost_table",
    "compare_sets",
    "set_means",
    "claims",
    "check_property_split",
    "MIN_RECALL_GAIN",
    "MIN_SET_GAIN",
    "plot_ranking",
    "plot_greedy",
]
