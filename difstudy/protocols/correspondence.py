"""Semantic correspondence (SPair-71k protocol): PCK@alpha of keypoint transfer.

Per pair, the activations of both images are resized to ``concat_size`` and
concatenated raw (``correspondence/aggregation_network.py``); optionally a
trained 3x3 conv head is applied (``--algorithm conv``); each source keypoint
takes the cosine nearest neighbour over the target's ``match_size`` grid
(``correspondence_utils.find_nn_source_correspondences``) and the prediction
is scaled back to the target image. Correct when within ``alpha`` x max(H, W)
of the target image (``img``) or of its bounding box (``bbox``), counted per
keypoint (the official number) and per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..errors import DifstudyError
from ..probes import evaluate_pairs, summarize_pck, train_conv_head
from .config import CorrespondenceConfig, protocol_label
from .features import FeatureSource, concat_maps
from .records import PairRecord, pair_images
from .results import result_frame


class _ProbePairs(Sequence):
    """Pair records as :func:`~difstudy.probes.evaluate_pairs` dicts, features read lazily."""

    def __init__(self, pairs: Sequence[PairRecord], source: FeatureSource, cfg: CorrespondenceConfig):
        self.pairs, self.source, self.cfg = pairs, source, cfg

    def __len__(self) -> int:
        return len(self.pairs)

    def _feat(self, record):
        return concat_maps(self.source.maps(record), self.cfg.concat_size, self.cfg.norm)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pairs[i]
        return dict(
            src_feat=self._feat(p.src),
            trg_feat=self._feat(p.trg),
            src_kps=p.src_kps,
            trg_kps=p.trg_kps,
            src_size=p.src.size,
            trg_size=p.trg.size,
            trg_bbox=p.trg_bbox,
            category=p.category,
            pair_id=p.pair_id,
        )


def correspondence(
    features: FeatureSource,
    pairs: Sequence[PairRecord],
    cfg: CorrespondenceConfig = CorrespondenceConfig(),
    seed: int = 0,
    train_pairs: Sequence[PairRecord] | None = None,
) -> pd.DataFrame:
    """PCK of ``features`` on ``pairs`` for one run seed.

    Args:
        features: a feature source; ``features.for_seed(seed)`` is used.
        pairs: test pair records (keypoints matched and visible in both images).
        cfg: :class:`CorrespondenceConfig` (official defaults).
        seed: the run seed: noise draw, and for ``method="conv"`` the head's initialisation
            and pair order. (Which pairs are tested is the caller's choice of records.)
        train_pairs: pair records to train the conv head on (``method="conv"`` only).

    Returns:
        Tidy rows (:data:`~difstudy.protocols.results.RESULT_COLUMNS`): ``PCK@a img``,
        ``PCK@a bbox`` (per keypoint) and their per-image means.
    """
    if cfg.method == "conv" and not train_pairs:
        raise ValueError("method='conv' trains a head and needs train_pairs; method='nn' needs none")
    source = features.for_seed(seed)
    images = pair_images(pairs) + (pair_images(train_pairs) if cfg.method == "conv" else [])
    source.prepare(images)
    # a source may put a per-pixel module in front of the head, trained jointly with it (GATE's
    # per-pixel weight assigners); it names itself in the source's label
    front = getattr(source, "pixel_front", None)
    if front is not None and cfg.method != "conv":
        raise DifstudyError(
            f"{features.label!r} trains its weight assigners jointly with the correspondence head, and "
            f"method={cfg.method!r} has none: use method='conv' (official), or AmalgamationConfig(fit='two-stage')"
        )
    head = None
    if cfg.method == "conv":
        head = train_conv_head(
            _ProbePairs(train_pairs, source, cfg),
            epochs=cfg.head_epochs,
            steps_per_epoch=cfg.head_steps_per_epoch,
            lr=cfg.head_lr,
            weight_decay=cfg.head_weight_decay,
            seed=seed,
            show_progress=False,
            front=front,
        )
    probe_pairs = _ProbePairs(pairs, source, cfg)
    match = None if cfg.match_size is None else (cfg.match_size, cfg.match_size)
    df = evaluate_pairs(
        (probe_pairs[i] for i in range(len(probe_pairs))), cfg.alpha, head=head, match_size=match, show_progress=False
    )
    s = summarize_pck(df)
    a = f"{cfg.alpha:g}"
    metrics = {
        f"PCK@{a} img": s["pck_img_per_kp"],
        f"PCK@{a} bbox": s["pck_bbox_per_kp"],
        f"PCK@{a} img (per image)": s["pck_img_per_image"],
        f"PCK@{a} bbox (per image)": s["pck_bbox_per_image"],
    }
    n_train = len(train_pairs) if cfg.method == "conv" else 0
    return result_frame("correspondence", protocol_label(cfg), metrics, seed, features.label, n_train, len(pairs))
