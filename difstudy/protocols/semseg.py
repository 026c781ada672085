"""Semantic segmentation (ADE20K, Cityscapes protocol) with a light head on cached features.

A multi-scale head (:class:`~difstudy.probes.SegHead`, one input level per
activation) is trained with generic-diffusion-feature's optimiser, batch size
and shuffled sampling (:class:`~difstudy.protocols.config.SemSegConfig`) and
scored with mmseg's mIoU. The official decoder (UperNet with per-activation
ResBlocks, trained on augmented crops with features recomputed per crop) is
not reproduced; every result row says so in its ``protocol`` column.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..probes import eval_seg_head, train_seg_head
from .config import SemSegConfig, protocol_label
from .features import FeatureSource, scale_maps
from .partseg import resize_labels
from .records import Records, canonical, concat_records
from .results import result_frame


def _batches(
    source: FeatureSource, records: Records, order: Sequence[int], batch_size: int, cfg: SemSegConfig
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``(levels, labels)`` batches: levels a list of (B, C_i, h_i, w_i), labels B label maps."""
    for s in range(0, len(order), batch_size):
        recs = [records[i] for i in order[s : s + batch_size]]
        maps = [scale_maps(source.maps(r), cfg.norm) for r in recs]
        levels = [torch.stack([m[a] for m in maps]) for a in range(len(maps[0]))]
        labels = [
            torch.as_tensor(np.asarray(r.mask, dtype=np.int64))
            if cfg.label_size is None
            else resize_labels(r.mask, cfg.label_size)
            for r in recs
        ]
        yield levels, labels


def semantic_segmentation(
    features: FeatureSource,
    train: Records,
    test: Records,
    cfg: SemSegConfig = SemSegConfig(),
    seed: int = 0,
) -> pd.DataFrame:
    """mIoU of a light segmentation head on ``features`` for one run seed.

    Args:
        features: a feature source; ``features.for_seed(seed)`` is used.
        train, test: image records with ``mask`` label maps; ``train.labels`` gives the classes.
        cfg: :class:`SemSegConfig`.
        seed: the run seed: noise draw, head initialisation and the order of every epoch.

    Returns:
        Tidy rows: ``mIoU`` (mmseg) and ``pixel accuracy`` (over labelled test pixels).
    """
    if train.labels is None:
        raise ValueError(f"{train.name!r} declares no label space; semantic segmentation needs num_classes")
    k, ignore = train.labels.num_classes, train.labels.ignore_index
    train = canonical(train)
    source = features.for_seed(seed)
    source.prepare(concat_records(train, test))
    chans = [m.shape[0] for m in source.maps(train[0])]
    gen = torch.Generator().manual_seed(seed)

    def epoch():
        return _batches(source, train, torch.randperm(len(train), generator=gen).tolist(), cfg.batch_size, cfg)

    head = train_seg_head(
        epoch,
        chans,
        k,
        kind=cfg.head,
        dim=cfg.dim,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        min_lr=cfg.min_lr,
        total_steps=cfg.epochs * math.ceil(len(train) / cfg.batch_size),
        seed=seed,
        ignore_index=ignore,
        show_progress=False,
    )
    scores = eval_seg_head(head, _batches(source, test, range(len(test)), cfg.batch_size, cfg), k, ignore)
    metrics = {"mIoU": scores["miou"], "pixel accuracy": scores["pixel_acc"]}
    return result_frame("semantic-seg", protocol_label(cfg), metrics, seed, features.label, len(train), len(test))
