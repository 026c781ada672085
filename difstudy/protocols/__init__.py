"""The papers' downstream protocols, implemented once.

One function per task, each taking a feature source, dataset records, a
frozen config (official defaults) and a run seed, and returning tidy rows:

- :func:`correspondence` (SPair-71k PCK; zero-shot NN or the trained conv head),
- :func:`part_segmentation` (DDPM-seg pixel-MLP ensemble, Horse-21 / Bedroom-28),
- :func:`semantic_segmentation` (light head, ADE20K / Cityscapes),
- :func:`classification` (linear probe on pooled features, CIFAR-10).

On the toy world, :mod:`~difstudy.protocols.tasks` builds the records of every task from one
:class:`TaskConfig` and calls the task's function (:func:`run_task`).

Records come from the toy world or from the official-layout loaders through
the adapters of :mod:`~difstudy.protocols.records`; feature sources are in
:mod:`~difstudy.protocols.features`. The toy-world tables
(:mod:`difstudy.tables`), the GATE page (:mod:`difstudy.gate`), the official-layout
runner (:mod:`difstudy.real`) and the model card call these functions and nothing else.
"""

from .classification import classification, correct_per_image
from .config import (
    ClassifyConfig,
    CorrespondenceConfig,
    PartSegConfig,
    SemSegConfig,
    deviations,
    protocol_label,
)
from .correspondence import correspondence
from .features import (
    CachedFeatures,
    ExtractionConfig,
    FeatureSource,
    PixelFeatures,
    RandomUNetFeatures,
    concat_maps,
    scale_maps,
)
from .partseg import drop_small_labels, part_segmentation
from .records import (
    ImageRecord,
    LabelSpace,
    PairRecord,
    Records,
    canonical,
    concat_records,
    content_key,
    loader_records,
    pair_images,
    spair_pairs,
    toy_class_indices,
    toy_pairs,
    toy_part_records,
    toy_records,
)
from .results import RESULT_COLUMNS, over_seeds, render, result_frame, summarize
from .semseg import semantic_segmentation
from .tasks import TASKS, TaskConfig, run_task, seg_world_size, task_records, toy_world, train_records

__all__ = [
    "RESULT_COLUMNS",
    "TASKS",
    "CachedFeatures",
    "ClassifyConfig",
    "CorrespondenceConfig",
    "ExtractionConfig",
    "FeatureSource",
    "ImageRecord",
    "LabelSpace",
    "PairRecord",
    "PartSegConfig",
    "PixelFeatures",
    "RandomUNetFeatures",
    "Records",
    "SemSegConfig",
    "TaskConfig",
    "canonical",
    "classification",
    "correct_per_image",
    "concat_maps",
    "concat_records",
    "content_key",
    "correspondence",
    "deviations",
    "drop_small_labels",
    "loader_records",
    "over_seeds",
    "pair_images",
    "part_segmentation",
    "protocol_label",
    "render",
    "result_frame",
    "run_task",
    "scale_maps",
    "seg_world_size",
    "semantic_segmentation",
    "spair_pairs",
    "summarize",
    "task_records",
    "toy_class_indices",
    "toy_pairs",
    "toy_part_records",
    "toy_records",
    "toy_world",
    "train_records",
]
