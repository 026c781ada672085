"""Image classification probe: a logistic-regression linear probe on globally
average-pooled feature maps.

Layouts: feature maps (B, C, h, w); pooled features (N, C); labels (N,) int.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import accuracy, as_numpy


class ProbeResult(NamedTuple):
    """Test accuracy and the fitted ``StandardScaler -> LogisticRegression`` pipeline."""

    accuracy: float
    model: Pipeline


def pool_features(feat: Any) -> torch.Tensor:
    """Global average pooling: (B, C, h, w) -> (B, C) float32."""
    feat = torch.as_tensor(feat)
    if feat.ndim != 4:
        raise ValueError(f"pool_features expects (B, C, h, w) feature maps, got shape {tuple(feat.shape)}")
    return feat.float().mean(dim=(2, 3))


def _check_xy(name: str, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X, y = as_numpy(X), as_numpy(y)
    if X.ndim != 2:
        hint = "; pool (B, C, h, w) maps with pool_features first" if X.ndim == 4 else ""
        raise ValueError(f"{name}_X must have shape (N, C), got shape {X.shape}{hint}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"{name}_y must have shape ({X.shape[0]},) to match {name}_X, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError(f"{name} set is empty")
    return X.astype(np.float64), y


def linear_probe(
    train_X: Any, train_y: Any, test_X: Any, test_y: Any, seed: int = 0, C: float = 1.0, max_iter: int = 5000
) -> ProbeResult:
    """Fit ``StandardScaler -> LogisticRegression(C)`` on (N, C) features and score the test set.

    Args:
        train_X: (N, C) training features (numpy or torch; pool maps with :func:`pool_features`).
        train_y: (N,) training labels.
        test_X: (M, C) test features, same C.
        test_y: (M,) test labels.
        seed: ``random_state`` of the classifier (lbfgs itself is deterministic).
        C: inverse L2 regularisation strength.
        max_iter: lbfgs iterations.

    Returns:
        :class:`ProbeResult` ``(accuracy, model)``.
    """
    Xtr, ytr = _check_xy("train", train_X, train_y)
    Xte, yte = _check_xy("test", test_X, test_y)
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train_X and test_X differ in feature count: {Xtr.shape[1]} vs {Xte.shape[1]}")
    if len(np.unique(ytr)) < 2:
        raise ValueError("train_y holds a single class; a linear probe needs at least two")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    model.fit(Xtr, ytr)
    return ProbeResult(accuracy(model.predict(Xte), yte), model)
