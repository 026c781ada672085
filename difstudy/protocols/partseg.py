"""Label-scarce part segmentation (DDPM-seg protocol: Horse-21, Bedroom-28).

As ``scarce_segmentation/task-pixel.py`` of generic-diffusion-feature (a copy of
DDPM-segmentation's ``train_interpreter.py``): per image, every activation is
bilinearly resized to ``resolution`` x ``resolution`` and concatenated raw, the
label map nearest-resized to the same size; in training images, a class
covering fewer than 20 pixels becomes ignored; an ensemble of pixel MLPs
(:class:`~difstudy.probes.PixelMLPEnsemble`) trains on the labelled pixels and
votes on every test pixel; the score is the official ``compute_iou``
(:func:`~difstudy.probes.ddpmseg_miou`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..probes import PixelMLPEnsemble, ddpmseg_miou, label_confusion, miou_from_confusion
from .config import PartSegConfig, protocol_label
from .features import FeatureSource, concat_maps
from .records import LabelSpace, Records, canonical, concat_records
from .results import result_frame

DEFAULT_IGNORE = 255  # DDPM-seg's ignore label where a record set declares none


def resize_labels(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) labels -> (size, size) int64 by nearest neighbour (as OpenCV's ``INTER_NEAREST``,
    which DDPM-seg's ``ImageLabelDataset`` uses)."""
    y = torch.as_tensor(np.asarray(mask, dtype=np.int64))
    if tuple(y.shape) == (size, size):
        return y
    return F.interpolate(y[None, None].double(), size=(size, size), mode="nearest")[0, 0].long()


def drop_small_labels(y: torch.Tensor, num_classes: int, ignore_index: int, min_pixels: int) -> torch.Tensor:
    """A copy of ``y`` where every class with ``0 < count < min_pixels`` pixels becomes
    ``ignore_index`` (DDPM-seg's "Delete small annotation" step on training images)."""
    y = y.clone()
    counts = torch.bincount(y[(y >= 0) & (y < num_classes)].flatten(), minlength=num_classes)
    for c in range(num_classes):
        if c != ignore_index and 0 < counts[c] < min_pixels:
            y[y == c] = ignore_index
    return y


def split_for_seed(train: Records, test: Records, seed: int, shuffle: bool) -> tuple[Records, Records]:
    """``(train, test)``; with ``shuffle`` the pooled images (in :func:`canonical` order) are
    permuted with ``seed`` and split again with the original sizes (official ``shuffle_split``)."""
    if not shuffle:
        return canonical(train), test
    pool = canonical(concat_records(train, test))
    perm = np.random.default_rng(seed).permutation(len(pool))
    return pool.subset(perm[: len(train)]), pool.subset(perm[len(train) :])


def _space(train: Records) -> tuple[LabelSpace, int]:
    if train.labels is None:
        raise ValueError(f"{train.name!r} declares no label space; part segmentation needs num_classes")
    ignore = train.labels.ignore_index
    return train.labels, DEFAULT_IGNORE if ignore is None else ignore


def part_segmentation(
    features: FeatureSource,
    train: Records,
    test: Records,
    cfg: PartSegConfig = PartSegConfig(),
    seed: int = 0,
) -> pd.DataFrame:
    """mIoU of a pixel-MLP ensemble on ``features`` for one run seed.

    Args:
        features: a feature source; ``features.for_seed(seed)`` is used.
        train, test: image records with ``mask`` label maps; ``train.labels`` gives the classes.
        cfg: :class:`PartSegConfig` (official defaults).
        seed: the run seed: noise draw, train/test reshuffle (``shuffle_split``), MLP
            initialisations and minibatch orders.

    Returns:
        Tidy rows: ``mIoU`` (``cfg.metric``) and ``pixel accuracy`` (over labelled test pixels).
    """
    space, ignore = _space(train)
    k = space.num_classes
    tr, te = split_for_seed(train, test, seed, cfg.shuffle_split)
    source = features.for_seed(seed)
    source.prepare(concat_records(tr, te))

    def pixels(records: Records, training: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for r in records:
            f = concat_maps(source.maps(r), cfg.resolution, cfg.norm)
            y = resize_labels(r.mask, cfg.resolution)
            if training and cfg.drop_small:
                y = drop_small_labels(y, k, ignore, cfg.drop_small)
            yield f.flatten(1).T.contiguous(), y.flatten()

    in_dim = concat_maps(source.maps(tr[0]), cfg.resolution, cfg.norm).shape[0]
    # a source may put a per-pixel module in front of every MLP, trained jointly with it (GATE's
    # per-pixel weight assigners); it names itself in the source's label
    front = getattr(source, "pixel_front", None)
    ens = PixelMLPEnsemble(
        in_dim, k, n_models=cfg.n_models, hidden=cfg.hidden, seed=seed, ignore_index=ignore, front=front
    )
    ens.fit(
        lambda: pixels(tr, True),
        max_epochs=cfg.max_epochs,
        batch_pixels=cfg.batch_size,
        lr=cfg.lr,
        min_epochs=cfg.min_epochs,
        patience=cfg.patience,
        buffer_pixels=cfg.buffer_pixels,
        show_progress=False,
    )
    cm = sum(label_confusion(ens.predict(x), y, k, ignore) for x, y in pixels(te, False))
    labelled = cm[:k].copy()
    if 0 <= ignore < k:
        labelled[ignore] = 0
    if cfg.metric == "ddpmseg":
        score = ddpmseg_miou(cm, ignore)
    else:
        score = miou_from_confusion(labelled)
    metrics = {"mIoU": score, "pixel accuracy": float(np.trace(labelled) / max(1, labelled.sum()))}
    return result_frame("label-scarce-seg", protocol_label(cfg), metrics, seed, features.label, len(tr), len(te))
