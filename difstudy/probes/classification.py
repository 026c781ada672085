"""Image classification probe: a linear classifier on globally average-pooled
feature maps, trained by seeded minibatch gradient descent.

Why not a closed-form / convex solver: the papers' classification code is not
public (GATE's repository holds none), and a solver run to convergence has no
random element, so "mean +- std over seeds" would only measure the features'
noise draw. Here the seed sets the initial weights and the minibatch order, as
for every other trained probe of the study.

Layouts: feature maps (B, C, h, w); pooled features (N, C); labels (N,) int.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import accuracy, as_numpy


class LinearProbe(nn.Module):
    """Standardisation (train mean and std per feature) followed by one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, X: Any) -> np.ndarray:
        """(N, C) features -> (N,) predicted labels."""
        return self(torch.as_tensor(as_numpy(X), dtype=torch.float32)).argmax(1).numpy()


class ProbeResult(NamedTuple):
    """Test accuracy and the fitted :class:`LinearProbe`."""

    accuracy: float
    model: LinearProbe


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
    return X.astype(np.float32), y.astype(np.int64)


def linear_probe(
    train_X: Any,
    train_y: Any,
    test_X: Any,
    test_y: Any,
    seed: int = 0,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit a :class:`LinearProbe` with Adam and cross-entropy, then score the test set.

    Args:
        train_X: (N, C) training features (numpy or torch; pool maps with :func:`pool_features`).
        train_y: (N,) training labels in ``0 .. K-1``.
        test_X: (M, C) test features, same C.
        test_y: (M,) test labels.
        seed: initial weights (torch's default Linear init under this seed) and the
            minibatch order of every epoch.
        epochs: passes over the training set.
        batch_size: minibatch size (the last, smaller batch of an epoch is kept).
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        num_classes: K (None: one more than the largest label seen).

    Returns:
        :class:`ProbeResult` ``(accuracy, model)``.
    """
    Xtr, ytr = _check_xy("train", train_X, train_y)
    Xte, yte = _check_xy("test", test_X, test_y)
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train_X and test_X differ in feature count: {Xtr.shape[1]} vs {Xte.shape[1]}")
    if len(np.unique(ytr)) < 2:
        raise ValueError("train_y holds a single class; a linear probe needs at least two")
    k = int(max(ytr.max(), yte.max()) + 1) if num_classes is None else num_classes
    x, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    std = x.std(0, unbiased=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe(x.mean(0), torch.where(std > 0, std, torch.ones_like(std)), k)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return ProbeResult(accuracy(model.predict(Xte), yte), model)
