"""One frozen config per task; the defaults are the official code's.

Sources read (generic-diffusion-feature, the papers' code, and DDPM-segmentation,
which its label-scarce task copies):

- correspondence: ``correspondence/task-corres.py``, ``correspondence/aggregation_network.py``,
  ``correspondence/correspondence_utils.py``;
- label-scarce segmentation: ``scarce_segmentation/task-pixel.py``,
  ``scarce_segmentation/segmentation/pixel_classifier.py`` (= ddpm-segmentation
  ``train_interpreter.py``, ``src/pixel_classifier.py``), ``.../data_util.py``,
  ddpm-segmentation ``experiments/*/ddpm.json``;
- semantic segmentation: ``segmentation/configs/ade_sd15.py``,
  ``segmentation/configs/_base_/schedules/schedule_80k.py``,
  ``segmentation/configs/_base_/datasets/ade20k.py``, ``segmentation/models/diffusion_segmentor.py``;
- classification: GATE's repository (Darkbblue/diffusion-content-shift) holds no
  classification code; the linear probe is difstudy's.

Every difference from the official protocol is either a named option (a field
whose non-default value :func:`protocol_label` lists) or, where difstudy cannot
follow the official code at all, stated in the config's ``BASE_LABEL``. The
label goes into every result row (column ``protocol``), so a table never shows
a deviation unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from .features import check_norm

CORRESPONDENCE_METHODS = {"nn": "zero-shot NN", "conv": "trained conv head"}
PARTSEG_METRICS = ("ddpmseg", "present")
SEMSEG_HEADS = ("conv", "linear")


@dataclass(frozen=True)
class CorrespondenceConfig:
    """Semantic correspondence (SPair-71k protocol).

    Attributes:
        method: ``"nn"``: zero-shot cosine nearest neighbour on the concatenated features
            (the official ``--algorithm nn``); ``"conv"``: the paper's trained 3x3 conv head
            (the official default ``--algorithm conv``, used for the paper's numbers).
            difstudy defaults to the zero-shot protocol, which needs no training pairs;
            rows say which.
        alpha: PCK threshold factor (0.1 x max(H, W) of the target image, or of its box).
        concat_size: every activation is resized to this square size before concatenation
            (official: 128); None: the largest activation's size.
        match_size: keypoints and features go to this square grid for matching and back
            (official: 512 x 512); None: each image's own pixel grid (DIFT).
        norm: ``"raw"`` (official) or ``"rms"`` (see :mod:`~difstudy.protocols.features`).
        head_epochs, head_steps_per_epoch, head_lr, head_weight_decay: the conv head's
            schedule (official: 2 epochs of at most 5000 pairs, AdamW 5e-4, weight decay 0.01).
    """

    method: str = "nn"
    alpha: float = 0.1
    concat_size: int | None = 128
    match_size: int | None = 512
    norm: str = "raw"
    head_epochs: int = 2
    head_steps_per_epoch: int = 5000
    head_lr: float = 5e-4
    head_weight_decay: float = 0.01

    BASE_LABEL: ClassVar[str] = ""

    def __post_init__(self):
        if self.method not in CORRESPONDENCE_METHODS:
            raise ValueError(
                f"unknown correspondence method {self.method!r}; use one of {list(CORRESPONDENCE_METHODS)}"
            )
        check_norm(self.norm)

    def method_label(self) -> str:
        return CORRESPONDENCE_METHODS[self.method]


@dataclass(frozen=True)
class PartSegConfig:
    """Label-scarce part segmentation (DDPM-seg protocol: Horse-21, Bedroom-28).

    Attributes:
        resolution: features (bilinear) and label maps (nearest) are brought to this square
            size, where pixels are classified and scored (official ``dim``: 256).
        n_models: ensemble size (official ``model_num``: 10).
        hidden: MLP hidden sizes; None: official (128, 32) below 30 classes, else (256, 128).
        batch_size: pixels per minibatch (official 64), lr: Adam rate (official 1e-3).
        max_epochs, min_epochs, patience: official early stop (100 epochs at most; from epoch
            4 on, stop after more than 50 batches without a new best loss).
        drop_small: in each training image a class covering fewer than this many pixels
            (but more than none) becomes ignored (official 20; 0 disables).
        shuffle_split: per seed, pool train and test images, shuffle and split them again with
            the original sizes (the official ``--shuffle_dataset``, with which the papers'
            numbers are averages over random splits).
        metric: ``"ddpmseg"``: the official ``compute_iou`` (every class but the ignored one,
            absent classes scoring 0, predictions on ignored pixels counted);
            ``"present"``: mean over classes present in prediction or target, ignored pixels
            skipped (mmseg-style; a named deviation).
        norm: ``"raw"`` (official) or ``"rms"``.
        buffer_pixels: shuffle-buffer rows (a memory bound; exact shuffling while the
            training pixels fit).
    """

    resolution: int = 256
    n_models: int = 10
    hidden: tuple[int, ...] | None = None
    batch_size: int = 64
    lr: float = 1e-3
    max_epochs: int = 100
    min_epochs: int = 4
    patience: int = 50
    drop_small: int = 20
    shuffle_split: bool = True
    metric: str = "ddpmseg"
    norm: str = "raw"
    buffer_pixels: int = 1 << 18

    BASE_LABEL: ClassVar[str] = "pixel-MLP ensemble"
    NOT_PROTOCOL: ClassVar[tuple[str, ...]] = ("buffer_pixels",)

    def __post_init__(self):
        if self.metric not in PARTSEG_METRICS:
            raise ValueError(f"unknown part-segmentation metric {self.metric!r}; use one of {PARTSEG_METRICS}")
        check_norm(self.norm)


@dataclass(frozen=True)
class SemSegConfig:
    """Semantic segmentation (ADE20K, Cityscapes) with a light head on cached features.

    The official protocol (mmseg UperNet, 512 channels, a zero-initialised ResBlock per
    activation, 80k iterations of random-resize/crop/flip/photometric augmentation with
    features recomputed for every crop) cannot run on cached features; difstudy trains a
    light multi-scale decoder instead (``BASE_LABEL``) and keeps the official optimiser,
    batch size and shuffling.

    Attributes:
        head: ``"conv"`` (:class:`~difstudy.probes.SegHead`) or ``"linear"`` (per-pixel linear).
        dim: the conv head's width (UperNet's 512 channels).
        epochs: passes over the training images (80k iterations x batch 2 = 8 ADE20K epochs).
        batch_size: images per step (official 2), shuffled every epoch (official sampler).
        lr, weight_decay, min_lr: AdamW 1.6e-4, weight decay 1e-3, poly schedule (power 0.9)
            down to 1e-4 (official ``schedule_80k.py``).
        label_size: square size of the label maps for training and scoring; None: each
            image's own size (official: scored at the original resolution).
        norm: ``"raw"`` (official) or ``"rms"``.

    The score is mmseg's ``IoUMetric`` mIoU: ignored pixels skipped, classes absent from
    both prediction and target left out of the mean.
    """

    head: str = "conv"
    dim: int = 512
    epochs: int = 8
    batch_size: int = 2
    lr: float = 1.6e-4
    weight_decay: float = 1e-3
    min_lr: float = 1e-4
    label_size: int | None = None
    norm: str = "raw"

    BASE_LABEL: ClassVar[str] = "light head (paper: UperNet)"

    def __post_init__(self):
        if self.head not in SEMSEG_HEADS:
            raise ValueError(f"unknown segmentation head {self.head!r}; use one of {SEMSEG_HEADS}")
        check_norm(self.norm)


@dataclass(frozen=True)
class ClassifyConfig:
    """Classification (CIFAR-10 protocol): a linear probe on globally average-pooled
    activations (concatenated), standardised, trained with Adam and seeded minibatches.

    GATE's repository has no classification code, so these defaults are difstudy's
    (``BASE_LABEL`` says so)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    norm: str = "raw"

    BASE_LABEL: ClassVar[str] = "linear probe (difstudy; no official code)"

    def __post_init__(self):
        check_norm(self.norm)


TaskConfig = CorrespondenceConfig | PartSegConfig | SemSegConfig | ClassifyConfig


def deviations(cfg: TaskConfig) -> list[str]:
    """``field=value`` for every protocol field that differs from the official default."""
    default = type(cfg)()
    skip = {"method", *getattr(cfg, "NOT_PROTOCOL", ())}
    if isinstance(cfg, CorrespondenceConfig) and cfg.method == "nn":
        skip |= {f.name for f in fields(cfg) if f.name.startswith("head_")}
    return [
        f"{f.name}={getattr(cfg, f.name)}"
        for f in fields(cfg)
        if f.name not in skip and getattr(cfg, f.name) != getattr(default, f.name)
    ]


def protocol_label(cfg: TaskConfig) -> str:
    """What a result row was measured with: the method (and what it stands in for) plus
    every deviation from the official defaults, e.g. ``"zero-shot NN; concat_size=None"``."""
    head = cfg.method_label() if isinstance(cfg, CorrespondenceConfig) else cfg.BASE_LABEL
    parts = [p for p in (head, *deviations(cfg)) if p]
    return "; ".join(parts) or "official"
