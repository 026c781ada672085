"""The papers' protocols on datasets in their official layouts (real data, or the toy world
exported with :mod:`difstudy.data.export`).

Thin callers: a loader of :mod:`difstudy.data.loaders` gives records through the
adapters of :mod:`difstudy.protocols.records`, and one protocol function of
:mod:`difstudy.protocols` runs per seed. With a GPU and the datasets::

    difstudy probe-real spair --root /data/SPair-71k --model sd15 --acts ours-v1.5 --size 512 --device cuda --dtype fp16
    difstudy probe-real horse21 --root /data/ddpm-seg/horse_21 --model sdxl --acts ours-xl --size 1024 --device cuda --dtype fp16
    difstudy probe-real ade20k --root /data/ADEChallengeData2016 --model sd15 --acts ours-v1.5 --size 512 --device cuda
    difstudy probe-real cityscapes --root /data/cityscapes --model sd15 --acts ours-v1.5 --size 512 --device cuda
    difstudy probe-real cifar10 --root /data/cifar-10-batches-py --model sd15 --acts ours-v1.5 --size 512 --device cuda

Each function returns the protocol's tidy rows for every seed, with a ``dataset`` column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd

from . import protocols as P
from .data import loaders

TASK_KINDS = {
    "spair": "correspondence",
    "horse21": "label-scarce-seg",
    "bedroom28": "label-scarce-seg",
    "ddpmseg": "label-scarce-seg",
    "ade20k": "semantic-seg",
    "cityscapes": "semantic-seg",
    "cifar10": "classification",
    "classfolders": "classification",
}
CONFIGS = {
    "correspondence": P.CorrespondenceConfig,
    "label-scarce-seg": P.PartSegConfig,
    "semantic-seg": P.SemSegConfig,
    "classification": P.ClassifyConfig,
}
SEMSEG_SPLITS = {"ade20k": ("training", "validation"), "cityscapes": ("train", "val")}


def feature_source(
    model: str,
    activations: Iterable[str],
    extraction: P.ExtractionConfig = P.ExtractionConfig(),
    dtype: str | None = None,
    device: str | None = None,
) -> P.FeatureSource:
    """The U-Net feature source of ``model`` (``activations == ["pixels"]``: raw pixels)."""
    activations = list(activations)
    if activations == ["pixels"]:
        return P.PixelFeatures()
    from .models import load

    return P.CachedFeatures(load(model, dtype=dtype, device=device), activations, extraction, 0, model)


def _seeds(run, seeds: Iterable[int], dataset: str) -> pd.DataFrame:
    return P.over_seeds(run, seeds).assign(dataset=dataset)


def spair_pck(
    source: P.FeatureSource,
    root: str | Path,
    split: str = "test",
    n_pairs: int | None = None,
    cfg: P.CorrespondenceConfig = P.CorrespondenceConfig(),
    seeds: Iterable[int] = (0,),
    train_split: str = "trn",
    n_train_pairs: int | None = None,
) -> pd.DataFrame:
    """SPair-71k: PCK of the first ``n_pairs`` pairs of ``split`` (all when None); the conv head
    (``cfg.method == "conv"``) trains on ``train_split``."""
    pairs = P.spair_pairs(loaders.SPair71k(root, split=split), n_pairs)
    train = P.spair_pairs(loaders.SPair71k(root, split=train_split), n_train_pairs) if cfg.method == "conv" else None
    return _seeds(lambda s: P.correspondence(source, pairs, cfg, s, train_pairs=train), seeds, "spair")


def ddpmseg_miou(
    source: P.FeatureSource,
    root: str | Path,
    preset: str = "horse21",
    n_train: int | None = None,
    n_test: int | None = None,
    cfg: P.PartSegConfig = P.PartSegConfig(),
    seeds: Iterable[int] = (0, 1, 2),
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> pd.DataFrame:
    """DDPM-seg folders (``horse21``, ``bedroom28`` or a generic ``ddpmseg`` folder with
    ``num_classes``): pixel-MLP ensemble mIoU."""
    presets = {"horse21": loaders.DDPMSeg.horse21, "bedroom28": loaders.DDPMSeg.bedroom28}
    if preset == "ddpmseg":
        if num_classes is None:
            raise ValueError("a generic ddpmseg folder needs num_classes (e.g. --num-classes 21)")

        def make(split: str) -> loaders.DDPMSeg:
            return loaders.DDPMSeg(root, split, num_classes=num_classes, ignore_index=ignore_index)
    elif preset in presets:

        def make(split: str) -> loaders.DDPMSeg:
            return presets[preset](root, split)
    else:
        raise ValueError(f"unknown DDPM-seg preset {preset!r}; use horse21, bedroom28 or ddpmseg")
    train, test = P.loader_records(make("train"), n_train), P.loader_records(make("test"), n_test)
    return _seeds(lambda s: P.part_segmentation(source, train, test, cfg, s), seeds, preset)


def semseg_miou(
    source: P.FeatureSource,
    kind: str,
    root: str | Path,
    n_train: int | None = None,
    n_test: int | None = None,
    cfg: P.SemSegConfig = P.SemSegConfig(),
    seeds: Iterable[int] = (0, 1, 2),
) -> pd.DataFrame:
    """ADE20K / Cityscapes: light-head mIoU (train split -> validation split)."""
    if kind not in SEMSEG_SPLITS:
        raise ValueError(f"unknown semantic-segmentation dataset {kind!r}; use one of {sorted(SEMSEG_SPLITS)}")
    split_tr, split_te = SEMSEG_SPLITS[kind]
    train = P.loader_records(loaders.load_dataset(kind, root, split=split_tr), n_train)
    test = P.loader_records(loaders.load_dataset(kind, root, split=split_te), n_test)
    return _seeds(lambda s: P.semantic_segmentation(source, train, test, cfg, s), seeds, kind)


def classification_accuracy(
    source: P.FeatureSource,
    kind: str,
    root: str | Path,
    n_train: int | None = None,
    n_test: int | None = None,
    cfg: P.ClassifyConfig = P.ClassifyConfig(),
    seeds: Iterable[int] = (0, 1, 2),
) -> pd.DataFrame:
    """CIFAR-10 (python batches) or class folders: linear-probe accuracy."""
    train = P.loader_records(loaders.load_dataset(kind, root, split="train"), n_train)
    test = P.loader_records(loaders.load_dataset(kind, root, split="test"), n_test)
    return _seeds(lambda s: P.classification(source, train, test, cfg, s), seeds, kind)


def task_config(dataset: str, options: dict | None = None):
    """The protocol config of ``dataset``'s task with ``options`` (field -> value) applied."""
    if dataset not in TASK_KINDS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {list(TASK_KINDS)}")
    kind = CONFIGS[TASK_KINDS[dataset]]
    options = dict(options or {})
    unknown = sorted(set(options) - {f.name for f in fields(kind)})
    if unknown:
        raise ValueError(f"{kind.__name__} has no field(s) {unknown}; fields: {[f.name for f in fields(kind)]}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return replace(kind(), **options)


# the datasets of the benchmark tables' full parameters, one per task (the papers' choices)
PAPER_DATASETS = {
    "correspondence": "spair",
    "label-scarce-seg": "horse21",
    "semantic-seg": "ade20k",
    "classification": "cifar10",
}


def dataset_root(name: str, data_root: str | Path) -> Path:
    """Where dataset ``name`` lies under the data root (:func:`difstudy.data.prepare.target`; a
    dataset that ``difstudy data prepare`` does not know: ``<data_root>/<name>``)."""
    from .data import prepare

    return prepare.target(name, data_root) if name in prepare.DATASETS else Path(data_root) / name


def dataset_records(cfg, data_root: str | Path, datasets: dict[str, str]) -> dict[str, dict]:
    """The records of each task of ``cfg`` (a :class:`~difstudy.protocols.TaskConfig`) from the
    dataset ``datasets[task]`` (a key of :data:`TASK_KINDS` whose task it is) under ``data_root``,
    in the shape of :func:`difstudy.protocols.task_records`: correspondence ``test_pairs`` (the
    first ``n_pairs`` test pairs) and ``train_pairs`` (SPair-71k ``trn``, for the conv head);
    label-scarce segmentation ``n_seg_train`` / ``n_seg_test`` images; semantic segmentation and
    classification ``n_train`` / ``n_test``."""
    missing = [t for t in cfg.tasks if t not in datasets]
    if missing:
        raise ValueError(f"no dataset for the tasks {missing}: give datasets {{task: name}}, e.g. {PAPER_DATASETS}")
    out = {}
    for task in cfg.tasks:
        name = datasets[task]
        if TASK_KINDS.get(name) != task:
            raise ValueError(f"dataset {name!r} is not a {task} dataset; {task} datasets: "
                             f"{[d for d, t in TASK_KINDS.items() if t == task]}")  # fmt: skip
        root = dataset_root(name, data_root)
        if task == "correspondence":
            out[task] = dict(
                test_pairs=P.spair_pairs(loaders.SPair71k(root, split="test"), cfg.n_pairs),
                train_pairs=P.spair_pairs(loaders.SPair71k(root, split="trn"), cfg.n_pairs),  # read on access
            )
        elif task == "label-scarce-seg":
            make = loaders.DDPMSeg.bedroom28 if name == "bedroom28" else loaders.DDPMSeg.horse21
            out[task] = dict(
                train=P.loader_records(make(root, "train"), cfg.n_seg_train),
                test=P.loader_records(make(root, "test"), cfg.n_seg_test),
            )
        else:
            tr, te = SEMSEG_SPLITS.get(name, ("train", "test"))
            out[task] = dict(
                train=P.loader_records(loaders.load_dataset(name, root, split=tr), cfg.n_train),
                test=P.loader_records(loaders.load_dataset(name, root, split=te), cfg.n_test),
            )
    return out


def validation_pairs(cfg, data_root: str | Path, datasets: dict[str, str], n: int):
    """The first ``n`` validation pairs of the correspondence dataset (for ranking activations)."""
    root = dataset_root(datasets.get("correspondence", "spair"), data_root)
    return P.spair_pairs(loaders.SPair71k(root, split="val"), n)


def probe_real(
    dataset: str,
    root: str | Path,
    source: P.FeatureSource,
    cfg=None,
    seeds: Iterable[int] = (0,),
    n_train: int | None = None,
    n_test: int | None = None,
    num_classes: int | None = None,
) -> pd.DataFrame:
    """Run the protocol of ``dataset`` (a key of :data:`TASK_KINDS`) on the official layout at ``root``."""
    cfg = task_config(dataset) if cfg is None else cfg
    task = TASK_KINDS[dataset]
    if task == "correspondence":
        return spair_pck(source, root, n_pairs=n_test, cfg=cfg, seeds=seeds, n_train_pairs=n_train)
    if task == "label-scarce-seg":
        return ddpmseg_miou(source, root, dataset, n_train, n_test, cfg, seeds, num_classes=num_classes)
    if task == "semantic-seg":
        return semseg_miou(source, dataset, root, n_train, n_test, cfg, seeds)
    return classification_accuracy(source, dataset, root, n_train, n_test, cfg, seeds)
