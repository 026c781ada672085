"""Semantic segmentation probes.

- :class:`PixelMLPEnsemble`: the DDPM-seg protocol (Baranchuk et al., 2022,
  yandex-research/ddpm-segmentation): an ensemble of small MLPs
  (Linear-ReLU-BatchNorm1d blocks) classifying per-pixel feature vectors,
  each model with its own seed, trained on pixels streamed through a bounded
  shuffle buffer, predicting by majority vote.
- :class:`SegHead` (multi-scale light decoder) and :class:`LinearPixelProbe`
  (per-pixel linear), trained with :func:`train_seg_head`; :func:`seg_predictions`
  streams their label maps (metrics: :mod:`difstudy.probes.metrics`).

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


def _check_chunk(x: torch.Tensor, y: torch.Tensor, in_dim: int, num_classes: int, ignore_index: int | None):
    """Validated float32 (n, C) features and int64 (n,) labels with ignored rows removed."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or x.shape[1] != in_dim:
        raise ValueError(f"pixel features must have shape (N, {in_dim}), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"pixel labels must have shape ({x.shape[0]},) to match the features, got {tuple(y.shape)}")
    y = y.long()
    if ignore_index is not None:
        keep = y != ignore_index
        x, y = x[keep], y[keep]
    x = x.float()
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
def official_hidden(num_classes: int) -> tuple[int, int]:
    """Hidden sizes of DDPM-seg's ``pixel_classifier``: (128, 32) below 30 classes, (256, 128) otherwise."""
    return (128, 32) if num_classes < 30 else (256, 128)


def _official_init(net: nn.Module) -> nn.Module:
    """DDPM-seg's ``init_weights("normal", 0.02)``: every Linear weight from N(0, 0.02), biases 0."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


PixelFront = Callable[[], tuple[nn.Module, int]]


def pixel_mlp(in_dim: int, num_classes: int, hidden: Sequence[int] | None = None) -> nn.Sequential:
    """DDPM-seg ``pixel_classifier``: ``[Linear, ReLU, BatchNorm1d] * len(hidden)``, then Linear,
    Linear weights drawn from N(0, 0.02) and zero biases (``init_weights("normal", 0.02)``).
    ``hidden=None`` takes the official sizes (:func:`official_hidden`)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in official_hidden(num_classes) if hidden is None else hidden:
        layers += [nn.Linear(d, h), nn.ReLU(), nn.BatchNorm1d(h)]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return _official_init(nn.Sequential(*layers))


class _EarlyStop:
    """DDPM-seg's stopping rule for one model: from epoch ``min_epochs`` on, every batch loss
    below the best so far resets a counter, any other adds one; more than ``patience``
    non-improving batches in a row stop the model (``train_interpreter.py``: ``epoch > 3``,
    ``break_count > 50``)."""

    def __init__(self, min_epochs: int, patience: int | None):
        self.min_epochs, self.patience = min_epochs, patience
        self.best, self.count, self.stopped = float("inf"), 0, False

    def update(self, epoch: int, loss: float) -> bool:
        if self.patience is None or epoch < self.min_epochs:
            return False
        if loss < self.best:
            self.best, self.count = loss, 0
        else:
            self.count += 1
        self.stopped = self.count > self.patience
        return self.stopped


class PixelMLPEnsemble:
    """Ensemble of ``n_models`` pixel MLPs, trained and voting as DDPM-seg's ``train_interpreter.py``.

    Each model: :func:`pixel_mlp` (official hidden sizes unless ``hidden`` is given), Adam
    (lr 1e-3), cross-entropy, minibatches of 64 pixels in a fresh random order every epoch
    with the last incomplete batch dropped (generic-diffusion-feature's ``drop_last=True``),
    up to 100 epochs with the official early stop (:class:`_EarlyStop`).
    Prediction is the **majority vote** of the models' argmax labels, ties going to the
    smallest label (what DDPM-seg's ``torch.mode`` returns on CPU).

    Streaming (a difstudy choice, so that features never have to fit in memory): all models
    train in one pass over the stream per epoch, through a shuffle buffer of
    ``buffer_pixels`` rows. When all training pixels fit in the buffer, every epoch is one
    block and each model sees an exact uniform permutation, as the official DataLoader;
    beyond that the shuffle is local to the buffer.

    ``front`` (optional): a function returning ``(module, out_dim)``, a per-pixel module put in
    front of every model's MLP and trained jointly with it, with the same optimizer, epochs and
    early stop (GATE's per-pixel weight assigners, ``scarce_segmentation_gate``'s
    ``pixel_classifier``: each of the ensemble's models has its own); its Linear layers get the
    official initialisation too (the official ``init_weights`` applies to the whole classifier).

    Model ``m`` is initialised with seed ``(seed, m)`` and shuffles with its own seeded
    generator. Attributes after :meth:`fit`: ``max_buffer_rows_``, ``n_steps_`` (optimizer
    steps per model), ``epochs_`` (epochs each model trained, its last one included),
    ``n_pixels_`` (labelled pixels streamed).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        n_models: int = 10,
        hidden: Sequence[int] | None = None,
        seed: int = 0,
        ignore_index: int | None = 255,
        device: str | torch.device = "cpu",
        front: PixelFront | None = None,
    ):
        if in_dim < 1 or num_classes < 2 or n_models < 1:
            got = f"{in_dim}, {num_classes}, {n_models}"
            raise ValueError(f"need in_dim >= 1, num_classes >= 2, n_models >= 1; got {got}")
        self.in_dim, self.num_classes, self.n_models = in_dim, num_classes, n_models
        self.hidden = tuple(official_hidden(num_classes) if hidden is None else hidden)
        self.seed, self.ignore_index, self.device = seed, ignore_index, torch.device(device)
        self.models: list[nn.Sequential] = []
        for m in range(n_models):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_of(seed, m))
                if front is None:
                    net = pixel_mlp(in_dim, num_classes, self.hidden)
                else:
                    f, d = front()
                    net = nn.Sequential(_official_init(f), pixel_mlp(d, num_classes, self.hidden))
                self.models.append(net.to(self.device))
        self.max_buffer_rows_ = 0
        self.n_steps_ = [0] * n_models
        self.epochs_ = [0] * n_models
        self.n_pixels_ = 0

    def fit(
        self,
        batch_fn: PixelChunks,
        max_epochs: int = 100,
        batch_pixels: int = 64,
        lr: float = 1e-3,
        min_epochs: int = 4,
        patience: int | None = 50,
        buffer_pixels: int = 1 << 18,
        show_progress: bool | None = None,
    ) -> PixelMLPEnsemble:
        """Train every model on pixels streamed from ``batch_fn``.

        Args:
            batch_fn: returns a fresh iterator of ``(features (n, C) float, labels (n,) int64)``
                chunks (one pass over the training pixels); ``ignore_index`` rows are dropped.
            max_epochs: most passes over the stream (DDPM-seg: 100).
            batch_pixels: minibatch size (DDPM-seg: 64); incomplete batches are dropped.
            lr: Adam learning rate (DDPM-seg: 1e-3).
            min_epochs: epochs before the early stop starts watching (DDPM-seg: 4, ``epoch > 3``).
            patience: non-improving batches tolerated (DDPM-seg: 50); None never stops early.
            buffer_pixels: shuffle buffer capacity in rows: the most pixels held at once.
            show_progress: tqdm bar over epochs (None: only on a terminal).

        Returns:
            self.
        """
        opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in self.models]
        gens = [torch.Generator().manual_seed(_seed_of(self.seed, m, 1)) for m in range(self.n_models)]
        stops = [_EarlyStop(min_epochs, patience) for _ in range(self.n_models)]
        buffer = ShuffleBuffer(buffer_pixels, torch.Generator().manual_seed(_seed_of(self.seed, 2**31)))

        def check(x, y):
            return _check_chunk(x, y, self.in_dim, self.num_classes, self.ignore_index)

        for net in self.models:
            net.train()
        self.n_steps_, self.epochs_, self.n_pixels_ = [0] * self.n_models, [0] * self.n_models, 0
        for epoch in progress(range(max_epochs), desc="pixel MLP ensemble", enabled=show_progress):
            live = [m for m in range(self.n_models) if not stops[m].stopped]
            if not live:
                break
            for m in live:
                self.epochs_[m] = epoch + 1
            for bx, by in _blocks(batch_fn, buffer, check):
                if epoch == 0:
                    self.n_pixels_ += len(by)
                bx, by = bx.to(self.device), by.to(self.device)
                for m in live:
                    if not stops[m].stopped:
                        self._train_block(m, bx, by, opts[m], gens[m], stops[m], epoch, batch_pixels)
        self.max_buffer_rows_ = buffer.max_rows
        for net in self.models:
            net.eval()
        return self

    def _train_block(self, m, bx, by, opt, gen, stop: _EarlyStop, epoch: int, batch_pixels: int) -> None:
        """Model ``m``'s pass over one block in its own order (full batches only)."""
        net = self.models[m]
        perm = torch.randperm(len(by), generator=gen).to(self.device)
        for s in range(0, len(by) - batch_pixels + 1, batch_pixels):
            idx = perm[s : s + batch_pixels]
            loss = F.cross_entropy(net(bx[idx]), by[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.n_steps_[m] += 1
            if stop.update(epoch, loss.item()):
                return

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
        """(N, C) features -> (N,) int64 labels: majority vote, ties to the smallest label."""
        out = []
        for logits in self._logits(features, chunk_pixels):
            votes = F.one_hot(logits.argmax(-1), self.num_classes).sum(0)  # (n, K) counts
            out.append(votes.argmax(-1).cpu())  # first maximum: the smallest tied label
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def predict_map(self, feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(C, h, w) feature map -> (H, W) label map (upsampled to ``size`` first when given)."""
        H, W = size if size is not None else feat.shape[1:]
        return self.predict(pixels_from_map(feat, size)).reshape(H, W)


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


SegBatches = Callable[[], Iterable[tuple[Any, Any]]]


def _label_list(labels: Any, batch: int) -> list[torch.Tensor]:
    """Label maps of a batch as a list of (H_i, W_i) int64 tensors (sizes may differ per image)."""
    if isinstance(labels, torch.Tensor | np.ndarray):
        labels = torch.as_tensor(labels)
        if labels.ndim != 3 or labels.shape[0] != batch:
            raise ValueError(f"label maps must have shape ({batch}, H, W), got shape {tuple(labels.shape)}")
        return [y.long() for y in labels]
    labels = [torch.as_tensor(y).long() for y in labels]
    if len(labels) != batch or any(y.ndim != 2 for y in labels):
        raise ValueError(f"expected {batch} label maps of shape (H, W), got {[tuple(y.shape) for y in labels]}")
    return labels


def seg_logits(head: nn.Module, feats: Any, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, H, W) logits of ``head`` bilinearly upsampled to the label size (H, W)."""
    logits = head(feats)
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _per_image_logits(head: nn.Module, levels: list[torch.Tensor], labels: list[torch.Tensor]):
    """(1, K, H_i, W_i) logits per image, each upsampled to its own label size."""
    logits = head(levels)
    for i, y in enumerate(labels):
        yield F.interpolate(logits[i : i + 1], size=tuple(y.shape), mode="bilinear", align_corners=False)


def poly_lr(step: int, total: int, lr: float, min_lr: float, power: float = 0.9) -> float:
    """mmseg's ``PolyLR``: ``(lr - min_lr) * (1 - step / total) ** power + min_lr``."""
    return (lr - min_lr) * max(0.0, 1 - step / total) ** power + min_lr


def train_seg_head(
    train_iter_fn: SegBatches,
    in_channels_list: Sequence[int],
    num_classes: int,
    kind: str = "conv",
    dim: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    min_lr: float = 0.0,
    total_steps: int | None = None,
    seed: int = 0,
    ignore_index: int | None = 255,
    show_progress: bool | None = None,
) -> nn.Module:
    """Train a :class:`SegHead` (``kind="conv"``) or :class:`LinearPixelProbe` (``"linear"``).

    AdamW, optionally with mmseg's poly schedule (:func:`poly_lr`, power 0.9, down to
    ``min_lr`` at ``total_steps``; None keeps the rate constant). The official values
    (lr 1.6e-4, weight decay 1e-3, poly down to 1e-4, width 512) are the defaults of
    :class:`difstudy.protocols.SemSegConfig`, which passes them here.

    Args:
        train_iter_fn: returns a fresh iterator of ``(feats, labels)`` batches per epoch:
            feats a list of (B, C_i, h_i, w_i) maps (or one tensor), labels (B, H, W) int64
            or a list of B (H_i, W_i) maps of any sizes. Shuffle in the iterator (seeded).
        in_channels_list: C_i of the levels.
        num_classes: K.
        kind: ``"conv"`` or ``"linear"``.
        dim: SegHead's common width.
        epochs: passes over the batches.
        lr, weight_decay, min_lr, total_steps: the schedule above.
        seed: seeds the initialisation.
        ignore_index: label of unlabelled pixels (None: every pixel is labelled).
        show_progress: tqdm bar (None: only on a terminal).

    Returns:
        The trained head in eval mode; the loss is the pixel cross-entropy, averaged over
        the labelled pixels of the batch, on logits upsampled to each label map's size.
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
    ignore = -100 if ignore_index is None else ignore_index
    head.train()
    step = 0
    for _ in progress(range(epochs), desc=f"seg head ({kind})", enabled=show_progress):
        for feats, labels in train_iter_fn():
            levels = _as_levels(feats)
            ys = _label_list(labels, levels[0].shape[0])
            n_valid = sum(int((y != ignore).sum()) for y in ys)
            if n_valid == 0:
                continue
            if total_steps is not None:
                for g in opt.param_groups:
                    g["lr"] = poly_lr(step, total_steps, lr, min_lr)
            if isinstance(labels, torch.Tensor | np.ndarray):  # one label size: one loss call
                y = torch.stack(ys)
                loss = F.cross_entropy(seg_logits(head, levels, y.shape[1:]), y, ignore_index=ignore)
            else:  # label maps of different sizes: the same mean over all labelled pixels
                total = sum(
                    F.cross_entropy(lg, y[None], ignore_index=ignore, reduction="sum")
                    for lg, y in zip(_per_image_logits(head, levels, ys), ys)
                )
                loss = total / n_valid
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def seg_predictions(head: nn.Module, batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction (H, W), label (H, W)) per image of a stream of ``(feats, labels)`` batches,
    logits upsampled to each label map's size."""
    head.eval()
    for feats, labels in batches:
        levels = _as_levels(feats)
        ys = _label_list(labels, levels[0].shape[0])
        for lg, y in zip(_per_image_logits(head, levels, ys), ys):
            yield lg[0].argmax(0), y


def eval_seg_head(
    head: nn.Module,
    eval_iter: Iterable[tuple[Any, Any]] | SegBatches,
    num_classes: int,
    ignore_index: int | None = 255,
) -> dict[str, float]:
    """``{"miou", "pixel_acc"}`` (mmseg rules: ignored pixels skipped, absent classes left out)
    over ``eval_iter`` (an iterable of ``(feats, labels)`` batches or a function returning one)."""
    batches = eval_iter() if callable(eval_iter) else eval_iter
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, y in seg_predictions(head, batches):
        cm += confusion_matrix(pred, y, num_classes, -1 if ignore_index is None else ignore_index)
    total = cm.sum()
    return {"miou": miou_from_confusion(cm), "pixel_acc": float(np.trace(cm) / total) if total else float("nan")}
