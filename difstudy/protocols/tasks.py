"""The four tasks on the toy world: one config, the records of every task, and one protocol
call per task, feature source and run seed.

:class:`TaskConfig` holds what the protocols need of a toy-world run (image size, how many
images, the seeds, the tasks and each task's protocol config); :func:`task_records` builds the
records of every task from it and :func:`run_task` calls the task's protocol function. The
benchmark tables (:class:`difstudy.tables.BenchConfig` adds the feature settings) and the GATE
page (:func:`difstudy.gate.run_gate_probes`) both run their probes through these functions.

Records (:mod:`difstudy.protocols.records`): correspondence pairs are drawn from the first
``n_test`` test images (seed = run seed); label-scarce segmentation uses ``n_seg_train`` /
``n_seg_test`` images of one class with class-local part masks (as Horse-21 is one category);
semantic segmentation the object-class masks and classification the labels of the first
``n_train`` / ``n_test`` images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pandas as pd

from ..data.toyworld import ToyWorld
from .classification import classification
from .config import ClassifyConfig, CorrespondenceConfig, PartSegConfig, SemSegConfig
from .correspondence import correspondence
from .features import FeatureSource
from .partseg import part_segmentation, split_for_seed
from .records import Records, toy_class_indices, toy_pairs, toy_part_records, toy_records
from .semseg import semantic_segmentation

TASKS = ("correspondence", "label-scarce-seg", "semantic-seg", "classification")

_TASK_CONFIGS = {
    "correspondence": CorrespondenceConfig,
    "part_seg": PartSegConfig,
    "semantic_seg": SemSegConfig,
    "classification": ClassifyConfig,
}


@dataclass(frozen=True)
class TaskConfig:
    """The tasks of a toy-world run and their protocols.

    The four task configs may be given as dicts of their fields (as in the YAML parameter
    files); lists become tuples. ``model`` names the model whose features are probed (a label
    of the rows).
    """

    model: str = "mini"
    image_size: int = 64
    n_train: int = 60  # labelled images for semantic segmentation and classification
    n_test: int = 60
    n_pairs: int = 60  # correspondence pairs per seed
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = TASKS
    seg_class: str = "bird"  # label-scarce segmentation is on one category's parts, as Horse-21
    n_seg_train: int = 20  # labelled images of that category (Horse-21: 30)
    n_seg_test: int = 20
    data_seed: int = 0
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    part_seg: PartSegConfig = field(default_factory=PartSegConfig)
    semantic_seg: SemSegConfig = field(default_factory=SemSegConfig)
    classification: ClassifyConfig = field(default_factory=ClassifyConfig)

    def __post_init__(self):
        for name, kind in _TASK_CONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                kw = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                object.__setattr__(self, name, kind(**kw))
        for name in ("seeds", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; use some of {list(TASKS)}")

    @classmethod
    def from_params(cls, params: dict):
        """A config from a parameter file's dict (keys that are not fields are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names})


def toy_world(split: str, n: int, cfg: TaskConfig) -> ToyWorld:
    """The toy world of ``split`` with ``n`` images at the config's size and data seed."""
    return ToyWorld(split, n=n, size=cfg.image_size, seed=cfg.data_seed)


def seg_world_size(cfg: TaskConfig, n: int) -> int:
    """Toy-world length holding ``n`` images of ``cfg.seg_class``."""
    return toy_class_indices(cfg.seg_class, n)[-1] + 1


def task_records(cfg: TaskConfig) -> dict[str, dict]:
    """The records of every task on the toy world (pairs per seed are drawn in :func:`run_task`);
    a real dataset's records (:func:`difstudy.real.dataset_records`) hold ``test_pairs`` and
    ``train_pairs`` instead of the two worlds."""
    train, test = toy_world("train", cfg.n_train, cfg), toy_world("test", cfg.n_test, cfg)
    seg_train = toy_world("train", seg_world_size(cfg, cfg.n_seg_train), cfg)
    seg_test = toy_world("test", seg_world_size(cfg, cfg.n_seg_test), cfg)
    return {
        "correspondence": dict(train_world=train, test_world=test),
        "label-scarce-seg": dict(
            train=toy_part_records(seg_train, cfg.seg_class, cfg.n_seg_train),
            test=toy_part_records(seg_test, cfg.seg_class, cfg.n_seg_test),
        ),
        "semantic-seg": dict(train=toy_records(train, target="object"), test=toy_records(test, target="object")),
        "classification": dict(train=toy_records(train), test=toy_records(test)),
    }


def train_records(task: str, records: dict, cfg: TaskConfig, seed: int) -> Records:
    """The training data the protocol of ``task`` trains on for run seed ``seed`` (``records``:
    the task's entry of :func:`task_records`): correspondence pairs drawn with the seed, the
    label-scarce training split of the seed (:func:`~difstudy.protocols.partseg.split_for_seed`),
    else the training records."""
    if task == "correspondence":
        if "train_pairs" in records:  # a dataset's fixed pairs (SPair-71k), the same for every seed
            return records["train_pairs"]
        return toy_pairs(records["train_world"], cfg.n_pairs, seed)
    if task == "label-scarce-seg":
        return split_for_seed(records["train"], records["test"], seed, cfg.part_seg.shuffle_split)[0]
    return records["train"]


def run_task(task: str, source: FeatureSource, records: dict, cfg: TaskConfig, seed: int) -> pd.DataFrame:
    """One protocol call for one setting and seed."""
    if task == "correspondence":
        pairs = (
            records["test_pairs"] if "test_pairs" in records else toy_pairs(records["test_world"], cfg.n_pairs, seed)
        )
        train_pairs = train_records(task, records, cfg, seed)
        return correspondence(source, pairs, cfg.correspondence, seed, train_pairs=train_pairs)
    if task == "label-scarce-seg":
        return part_segmentation(source, records["train"], records["test"], cfg.part_seg, seed)
    if task == "semantic-seg":
        return semantic_segmentation(source, records["train"], records["test"], cfg.semantic_seg, seed)
    return classification(source, records["train"], records["test"], cfg.classification, seed)
