"""Classification (CIFAR-10 protocol): a linear probe on pooled activations.

Each activation is averaged over space and the vectors are concatenated; a
standardised linear classifier (:func:`~difstudy.probes.linear_probe`) is
trained with seeded initialisation and minibatch order. GATE's repository has
no classification code; the rows say ``linear probe (difstudy; ...)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..probes import linear_probe
from .config import ClassifyConfig, protocol_label
from .features import FeatureSource, scale_maps
from .records import Records, canonical, concat_records
from .results import result_frame


def pooled(source: FeatureSource, records: Records, norm: str = "raw") -> tuple[np.ndarray, np.ndarray]:
    """(N, sum C_i) pooled features and (N,) labels of ``records``."""
    X = [torch.cat([m.mean((1, 2)) for m in scale_maps(source.maps(r), norm)]).numpy() for r in records]
    y = [r.label for r in records]
    if any(v is None for v in y):
        raise ValueError(f"{getattr(records, 'name', 'records')!r} hold images without a class label")
    return np.stack(X), np.asarray(y, dtype=np.int64)


def _fit(features: FeatureSource, train: Records, test: Records, cfg: ClassifyConfig, seed: int):
    """The probe of one run seed and the test features and labels: ``(ProbeResult, Xt, yt)``."""
    train = canonical(train)
    source = features.for_seed(seed)
    source.prepare(concat_records(train, test))
    X, y = pooled(source, train, cfg.norm)
    Xt, yt = pooled(source, test, cfg.norm)
    k = train.labels.num_classes if train.labels is not None else None
    res = linear_probe(
        X, y, Xt, yt, seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, num_classes=k,
    )  # fmt: skip
    return res, Xt, yt


def classification(
    features: FeatureSource,
    train: Records,
    test: Records,
    cfg: ClassifyConfig = ClassifyConfig(),
    seed: int = 0,
) -> pd.DataFrame:
    """Test accuracy of a linear probe on ``features`` for one run seed.

    Args:
        features: a feature source; ``features.for_seed(seed)`` is used.
        train, test: image records with ``label``.
        cfg: :class:`ClassifyConfig`.
        seed: the run seed: noise draw, probe initialisation and minibatch order.

    Returns:
        Tidy rows: ``accuracy``.
    """
    res, _, _ = _fit(features, train, test, cfg, seed)
    return result_frame(
        "classification", protocol_label(cfg), {"accuracy": res.accuracy}, seed, features.label, len(train), len(test)
    )


def correct_per_image(
    features: FeatureSource,
    train: Records,
    test: Records,
    cfg: ClassifyConfig = ClassifyConfig(),
    seed: int = 0,
) -> pd.Series:
    """The same probe as :func:`classification`, per test image: 1.0 where it predicts the label,
    else 0.0, indexed by ``image_id`` (the sampling units of a claim on accuracy; their mean is
    the accuracy :func:`classification` reports)."""
    res, Xt, yt = _fit(features, train, test, cfg, seed)
    hit = (np.asarray(res.model.predict(Xt)) == yt).astype(float)
    return pd.Series(hit, index=pd.Index([r.image_id for r in test], name="image_id"), name="correct")
