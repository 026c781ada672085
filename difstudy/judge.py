"""The toy-world judge: a small CNN that names the class of a 64 px toy-world image.

The model card uses it to score class-conditional samples of the mini model
("recognised" = the judge names the prompted class). It is trained on real
toy-world images only (by :mod:`difstudy.train.judge`, weights committed in
``difstudy/assets/judge``), and its accuracy on real test images is reported
next to every recognition rate, so a broken judge cannot pass unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import DifstudyError

JUDGE_PATH = Path(__file__).parent / "assets" / "judge"


class ToyCNN(nn.Module):
    """A 2x average-pool of the input (classes differ in shape, which 32 px
    keeps; it makes the judge 4x cheaper), four conv-BN-ReLU blocks (32, 64,
    128, 128 channels; max-pool after each of the first three), global average
    pooling and a linear head over ``n_classes`` (the caller's class list: the toy world's
    ``CLASS_NAMES`` for the committed judge; :func:`load_judge` reads it from the weights)."""

    def __init__(self, n_classes: int, widths=(32, 64, 128, 128)):
        super().__init__()
        layers, c_in = [nn.AvgPool2d(2)], 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"judge expects (N, H, W, 3) uint8 images, got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_judge(path: str | Path = JUDGE_PATH) -> tuple[ToyCNN, dict]:
    """The committed judge (eval mode) and its training record (``meta.json``); its number of
    classes is that of the weights' head."""
    from safetensors.torch import load_file

    path = Path(path)
    weights, meta = path / "model.safetensors", path / "meta.json"
    if not weights.exists():
        raise DifstudyError(
            f"no judge weights at {weights}; train them with `python -m difstudy.train.judge --out {path}`"
        )
    state = load_file(str(weights))
    net = ToyCNN(n_classes=state["head.weight"].shape[0])
    net.load_state_dict(state)
    return net.eval(), (json.loads(meta.read_text()) if meta.exists() else {})


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class index per image."""
    net.eval()
    out = [net(to_input(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)
