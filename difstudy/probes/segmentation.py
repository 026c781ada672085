"""Semantic segmentation probes.

- :class:`PixelMLPEnsemble`: the DDPM-seg protocol (Baranchuk et al., 2022,
  yandex-research/ddpm-segmentation): an ensemble of small MLPs
  (Linear-ReLU-BatchNorm1d blocks) classifying per-pixel feature vectors,
  each model with its own seed, trained on pixels streamed through a bounded
  shuffle buffer, predicting by majority vote.
- :class:`SegHead` (multi-scale light decoder) and :class:`LinearPixelProbe`
  (per-pixel linear), trained with :func:`train_seg_head` and evaluated with
  :func:`eval_seg_head` by accumulating a confusion matrix over a stream.

Layouts: per-pixel features (N, C) float, labels (N,) int64; feature maps
(B, C, h, w); label maps (B, H, W) int64; ``ignore_index`` marks unlabelled pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import confusion_matrix, miou_from_confusion
from .runner import progress

PixelChunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _seed_of(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (independent streams per key tuple)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def pixels_from_map(feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(C, h, w) feature map -> (H * W, C) float32 per-pixel features, bilinearly
    upsampled to ``size = (H, W)`` first when given (row-major pixel order)."""
    if feat.ndim != 3:
        raise ValueError(f"feature map must have shape (C, h, w), got shape {tuple(feat.shape)}")
    feat = feat.float()
    if size is not None and tuple(size) != tuple(feat.shape[1:]):
        feat = F.interpolate(feat[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return feat.flatten(1).T.contiguous()


# ----------------------------------------------------------------------------
# streaming
class ShuffleBuffer:
    """A bounded shuffle buffer of pixel rows.

    Rows are pushed in chunks of any size; whenever the buffer holds
    ``capacity`` rows, a random half of them (seeded ``generator``) is emitted as
    one block, the other half stays to mix with later rows. The buffer never holds
    more than ``capacity`` rows (``max_rows`` records the peak).
    """

    def __init__(self, capacity: int, generator: torch.Generator):
        if capacity < 2:
            raise ValueError(f"buffer capacity must be >= 2 rows, got {capacity}")
        self.capacity, self.generator = capacity, generator
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.size = 0
        self.max_rows = 0

    def push(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Add (n, C) rows with (n,) labels; yields the blocks this fills."""
        if self.x is None:
            self.x = torch.empty(self.capacity, x.shape[1], dtype=torch.float32)
            self.y = torch.empty(self.capacity, dtype=torch.long)
        i = 0
        while i < len(x):
            take = min(self.capacity - self.size, len(x) - i)
            self.x[self.size : self.size + take] = x[i : i + take]
            self.y[self.size : self.size + take] = y[i : i + take]
            self.size += take
            i += take
            self.max_rows = max(self.max_rows, self.size)
            if self.size == self.capacity:
                yield self._emit(self.capacity // 2)

    def flush(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield all remaining rows (shuffled) as one block and empty the buffer."""
        if self.size:
            yield self._emit(self.size)

    def _emit(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(self.size, generator=self.generator)
        out, keep = idx[:n], idx[n:]
        block = self.x[out].clone(), self.y[out].clone()
        self.x[: len(keep)], self.y[: len(keep)] = self.x[keep].clone(), self.y[keep].clone()
        self.size = len(keep)
        return block


def _check_chunk(x: torch.Tensor, y: torch.Tensor, in_dim: int, num_classes: int, ignore_index: int):
    """Validated float32 (n, C) features and int64 (n,) labels with ignored rows removed."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or x.shape[1] != in_dim:
        raise ValueError(f"pixel features must have shape (N, {in_dim}), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"pixel labels must have shape ({x.shape[0]},) to match the features, got {tuple(y.shape)}")
    y = y.long()
    keep = y != ignore_index
    x, y = x[keep].float(), y[keep]
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"pixel labels must lie in 0..{num_classes - 1} or equal ignore_index={ignore_index}")
    return x, y


def _blocks(batch_fn: PixelChunks, buffer: ShuffleBuffer, check) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled blocks of one pass over ``batch_fn()`` through ``buffer``."""
    for x, y in batch_fn():
        x, y = check(x, y)
        yield from buffer.push(x, y)
    yield from buffer.flush()


# ----------------------------------------------------------------------------
# DDPM-seg ensemble
def pixel_mlp(in_dim: int, num_classes: int, hidden: Sequence[int] = (256, 128)) -> nn.Sequential:
    """DDPM-seg ``pixel_classifier``: ``[Linear, ReLU, BatchNorm1d] * len(hidden)``, then Linear.
    DDPM-seg uses hidden (256, 128) for >= 30 classes and (128, 32) below."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.BatchNorm1d(h)]
        d = h
    layers.append(nn.Linear(d, num_classes))
    net = nn.Sequential(*layers)
    for m in net.modules():  # DDPM-seg init_weights(init_type="normal", gain=0.02)
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
    return net


class PixelMLPEnsemble:
    """Ensemble of ``n_models`` pixel MLPs (DDPM-seg protocol).

    Model ``m`` is initialised with seed ``(seed, m)`` and sees each shuffled
    block in its own seeded order; all models train in one pass over the
    stream, so features are read ``epochs`` times, not ``epochs * n_models``.

    Prediction is the **majority vote** of the models' argmax labels (as
    DDPM-seg's ``torch.mode``), ties broken by the highest mean softmax;
    :meth:`predict_proba` gives the mean of the softmaxes.

    Attributes after :meth:`fit`: ``max_buffer_rows_`` (peak rows held by the
    shuffle buffer, never above ``buffer_pixels``), ``n_steps_`` (optimizer steps
    per model), ``n_pixels_`` (labelled pixels seen).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        n_models: int = 10,
        hidden: Sequence[int] = (256, 128),
        seed: int = 0,
        ignore_index: int = 255,
        device: str | torch.device = "cpu",
    ):
        if in_dim < 1 or num_classes < 2 or n_models < 1:
            got = f"{in_dim}, {num_classes}, {n_models}"
            raise ValueError(f"need in_dim >= 1, num_classes >= 2, n_models >= 1; got {got}")
        self.in_dim, self.num_classes, self.n_models = in_dim, num_classes, n_models
        self.seed, self.ignore_index, self.device = seed, ignore_index, torch.device(device)
        self.models: list[nn.Sequential] = []
        for m in range(n_models):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_of(seed, m))
                self.models.append(pixel_mlp(in_dim, num_classes, hidden).to(self.device))
        self.max_buffer_rows_ = 0
        self.n_steps_ = 0
        self.n_pixels_ = 0

    def fit(
        self,
        batch_fn: PixelChunks,
        epochs: int = 4,
        batch_pixels: int = 64,
        buffer_pixels: int = 65536,
        lr: float = 1e-3,
        max_steps: int | None = None,
        show_progress: bool | None = None,
    ) -> PixelMLPEnsemble:
        """Train every model on pixels streamed from ``batch_fn``.

        Args:
            batch_fn: returns a fresh iterator of ``(features (n, C) float, labels (n,) int64)``
                chunks (one pass over the training pixels); ``ignore_index`` rows are dropped.
            epochs: passes over the stream.
            batch_pixels: minibatch size (DDPM-seg: 64); minibatches of one row are skipped
                (BatchNorm needs two).
            buffer_pixels: shuffle buffer capacity in rows: the most pixels held at once.
            lr: Adam learning rate (DDPM-seg: 1e-3), cross-entropy loss.
            max_steps: stop after this many steps per model (None: run all epochs).
            show_progress: tqdm bar (None: only on a terminal).

        Returns:
            self.
        """
        opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in self.models]
        gens = [torch.Generator().manual_seed(_seed_of(self.seed, m, 1)) for m in range(self.n_models)]
        buffer = ShuffleBuffer(buffer_pixels, torch.Generator().manual_seed(_seed_of(self.seed, 2**31)))

        def check(x, y):
            return _check_chunk(x, y, self.in_dim, self.num_classes, self.ignore_index)

        for net in self.models:
            net.train()
        self.n_steps_ = self.n_pixels_ = 0
        bar = progress(desc="pixel MLP ensemble", total=max_steps, enabled=show_progress)
        for _ in range(epochs):
            for bx, by in _blocks(batch_fn, buffer, check):
                self.n_pixels_ += len(by)
                steps = self._train_block(bx.to(self.device), by.to(self.device), opts, gens, batch_pixels, max_steps)
                self.n_steps_ += steps
                bar.update(steps)
                if max_steps is not None and self.n_steps_ >= max_steps:
                    break
            if max_steps is not None and self.n_steps_ >= max_steps:
                break
        bar.close()
        self.max_buffer_rows_ = buffer.max_rows
        for net in self.models:
            net.eval()
        return self

    def _train_block(self, bx, by, opts, gens, batch_pixels: int, max_steps: int | None) -> int:
        """One pass of every model over a block in its own order; returns steps per model."""
        budget = None if max_steps is None else max_steps - self.n_steps_
        n_steps = 0
        for net, opt, gen in zip(self.models, opts, gens, strict=True):
            perm = torch.randperm(len(by), generator=gen).to(self.device)
            starts = [s for s in range(0, len(by), batch_pixels) if min(batch_pixels, len(by) - s) >= 2]
            starts = starts if budget is None else starts[:budget]
            for s in starts:
                idx = perm[s : s + batch_pixels]
                loss = F.cross_entropy(net(bx[idx]), by[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            n_steps = len(starts)
        return n_steps

    @torch.no_grad()
    def _logits(self, features: torch.Tensor, chunk_pixels: int) -> Iterator[torch.Tensor]:
        """(M, n, K) logits of every model, chunk by chunk over the N pixels."""
        x = torch.as_tensor(features)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"features must have shape (N, {self.in_dim}), got shape {tuple(x.shape)}")
        for net in self.models:
            net.eval()
        for s in range(0, len(x), chunk_pixels):
            xc = x[s : s + chunk_pixels].float().to(self.device)
            yield torch.stack([net(xc) for net in self.models])

    def predict_proba(self, features: torch.Tensor, chunk_pixels: int = 65536) -> torch.Tensor:
        """(N, C) features -> (N, K) mean over models of the softmax."""
        out = [logits.softmax(-1).mean(0).cpu() for logits in self._logits(features, chunk_pixels)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, features: torch.Tensor, chunk_pixels: int = 65536) -> torch.Tensor:
        """(N, C) features -> (N,) int64 labels: majority vote, ties to the highest mean softmax."""
        out = []
        for logits in self._logits(features, chunk_pixels):
            votes = F.one_hot(logits.argmax(-1), self.num_classes).sum(0).float()  # (n, K)
            mean_p = logits.softmax(-1).mean(0)  # in [0, 1]: only breaks ties between integer counts
            out.append((votes + 0.5 * mean_p).argmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def predict_map(self, feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(C, h, w) feature map -> (H, W) label map (upsampled to ``size`` first when given)."""
        H, W = size if size is not None else feat.shape[1:]
        return self.predict(pixels_from_map(feat, size)).reshape(H, W)

    def evaluate(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """mIoU and pixel accuracy over a stream of ``(features (n, C), labels (n,))`` chunks,
        accumulated as a confusion matrix."""
        cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for x, y in chunks:
            cm += confusion_matrix(self.predict(x), y, self.num_classes, self.ignore_index)
        return _scores(cm)


# ----------------------------------------------------------------------------
# decoder heads on feature maps
def _as_levels(feats: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    levels = [feats] if isinstance(feats, torch.Tensor) else list(feats)
    for i, f in enumerate(levels):
        if f.ndim != 4:
            raise ValueError(f"feature level {i} must have shape (B, C, h, w), got shape {tuple(f.shape)}")
    return [f.float() for f in levels]


class _MultiScale(nn.Module):
    """Shared input checks and the largest output size of a multi-scale head."""

    def __init__(self, in_channels_list: Sequence[int]):
        super().__init__()
        if not in_channels_list or min(in_channels_list) < 1:
            raise ValueError(f"in_channels_list must list positive channel counts, got {list(in_channels_list)}")
        self.in_channels_list = list(in_channels_list)

    def _levels(self, feats) -> tuple[list[torch.Tensor], tuple[int, int]]:
        levels = _as_levels(feats)
        got = [f.shape[1] for f in levels]
        if got != self.in_channels_list:
            raise ValueError(f"expected feature levels with channels {self.in_channels_list}, got {got}")
        largest = max(levels, key=lambda f: f.shape[2] * f.shape[3])
        return levels, tuple(largest.shape[2:])

    @staticmethod
    def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x if tuple(x.shape[2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegHead(_MultiScale):
    """Light multi-scale decoder: per level a 1x1 conv to ``dim``, bilinear upsampling
    to the largest level, sum, 3x3 conv + ReLU, 1x1 classifier.

    Input: a list of (B, C_i, h_i, w_i) maps (or one tensor); output (B, K, h, w) logits
    at the largest level's resolution.
    """

    def __init__(self, in_channels_list: Sequence[int], num_classes: int, dim: int = 128):
        super().__init__(in_channels_list)
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in self.in_channels_list)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        levels, size = self._levels(feats)
        x = sum(self._up(p(f), size) for p, f in zip(self.proj, levels, strict=True))
        return self.classifier(self.fuse(x))


class LinearPixelProbe(_MultiScale):
    """Per-pixel linear probe: per level a 1x1 conv to K logits, bilinear upsampling to
    the largest level, sum (linear in the features). Layouts as :class:`SegHead`."""

    def __init__(self, in_channels_list: Sequence[int], num_classes: int):
        super().__init__(in_channels_list)
        self.proj = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.in_channels_list)

    def forward(self, feats: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        levels, size = self._levels(feats)
        return sum(self._up(p(f), size) for p, f in zip(self.proj, levels, strict=True))


SegBatches = Callable[[], Iterable[tuple[Any, torch.Tensor]]]


def _check_labels(labels: torch.Tensor, batch: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 3 or labels.shape[0] != batch:
        raise ValueError(f"label maps must have shape ({batch}, H, W), got shape {tuple(labels.shape)}")
    return labels.long()


def seg_logits(head: nn.Module, feats: Any, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, H, W) logits of ``head`` bilinearly upsampled to the label size (H, W)."""
    logits = head(feats)
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def train_seg_head(
    train_iter_fn: SegBatches,
    in_channels_list: Sequence[int],
    num_classes: int,
    kind: str = "conv",
    dim: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    ignore_index: int = 255,
    show_progress: bool | None = None,
) -> nn.Module:
    """Train a :class:`SegHead` (``kind="conv"``) or :class:`LinearPixelProbe` (``"linear"``).

    Args:
        train_iter_fn: returns a fresh iterator of ``(feats, labels)`` batches per epoch:
            feats a list of (B, C_i, h_i, w_i) maps (or one tensor), labels (B, H, W) int64.
            Shuffle in the iterator if wanted (seeded).
        in_channels_list: C_i of the levels.
        num_classes: K.
        kind: ``"conv"`` or ``"linear"``.
        dim: SegHead's common width.
        epochs, lr, weight_decay: AdamW schedule (constant rate).
        seed: seeds the initialisation.
        ignore_index: label of unlabelled pixels.
        show_progress: tqdm bar (None: only on a terminal).

    Returns:
        The trained head in eval mode; the loss is pixel cross-entropy on logits
        upsampled to the label resolution.
    """
    if kind not in ("conv", "linear"):
        raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "conv":
            head: nn.Module = SegHead(in_channels_list, num_classes, dim)
        else:
            head = LinearPixelProbe(in_channels_list, num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in progress(range(epochs), desc=f"seg head ({kind})", enabled=show_progress):
        for feats, labels in train_iter_fn():
            levels = _as_levels(feats)
            labels = _check_labels(labels, levels[0].shape[0])
            if not (labels != ignore_index).any():
                continue
            loss = F.cross_entropy(seg_logits(head, levels, labels.shape[1:]), labels, ignore_index=ignore_index)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def seg_confusion(
    head: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(K, K) confusion matrix of ``head`` summed over a stream of ``(feats, labels)`` batches."""
    head.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for feats, labels in batches:
        levels = _as_levels(feats)
        labels = _check_labels(labels, levels[0].shape[0])
        pred = seg_logits(head, levels, labels.shape[1:]).argmax(1)
        cm += confusion_matrix(pred, labels, num_classes, ignore_index)
    return cm


def _scores(cm: np.ndarray) -> dict[str, float]:
    total = cm.sum()
    return {"miou": miou_from_confusion(cm), "pixel_acc": float(np.trace(cm) / total) if total else float("nan")}


def eval_seg_head(
    head: nn.Module,
    eval_iter: Iterable[tuple[Any, torch.Tensor]] | SegBatches,
    num_classes: int,
    ignore_index: int = 255,
) -> dict[str, float]:
    """Streamed evaluation: ``{"miou", "pixel_acc"}`` from the confusion matrix accumulated
    over ``eval_iter`` (an iterable of ``(feats, labels)`` batches or a function returning one)."""
    batches = eval_iter() if callable(eval_iter) else eval_iter
    return _scores(seg_confusion(head, batches, num_classes, ignore_index))
