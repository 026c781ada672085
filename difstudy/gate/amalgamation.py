"""GATE, step 5: feature amalgamation.

**Amalgamation** (:class:`Amalgamation`) follows the official code
(``scarce_segmentation_gate/segmentation/pixel_classifier.py`` and
``correspondence_gate/correspondence/aggregation_network.py``): ``k`` weight
assigners, each applied to every bucket (basic or technique features of the
same activations) and giving a weight per bucket and channel, softmax over the
buckets; the ``k`` weighted sums are concatenated for the head. Assigner:
``Linear(C, 128) -> ReLU -> BatchNorm1d -> Dropout(0.5) -> Linear(128, C)``
on pixel vectors, ``Conv3x3(C, 128, no bias) -> ReLU -> BatchNorm2d ->
Dropout(0.5) -> global average pool -> Linear(128, C)`` on feature maps (one
weight per image and channel). ``k = 1`` (both official task scripts build
``weight_num=1``). The official sparsity term (mean L2 norm of the weights
across buckets, rewarded) is available with a fixed coefficient, default 0
(the official scripts random-walk it from 0 in steps of 1e-5).

**Bucket normalisation** (``bucket_norm``): the official code calls the assigner once per bucket,
so in training its BatchNorm normalises each bucket over that bucket's own batch
(``"per-bucket"``, the default). That removes what tells the buckets apart: on a planted task
(one bucket holds the label, two are noise) the official assigner's weights stay near uniform in
training mode and move away from the informative bucket in eval mode
(``tests/test_gate_official.py``). ``"shared"`` (a difstudy variant, labelled wherever it is
used) runs the assigner once over all buckets stacked in one batch, so the BatchNorm statistics
are shared across buckets; on the same task its weights go to the informative bucket.

:class:`PixelAssigners` are the per-pixel assigners that the official label-scarce segmentation
trains jointly inside each pixel classifier. The amalgamated buckets as a feature source of the
protocol layer are :mod:`difstudy.gate.sources`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightAssigner(nn.Module):
    """One official GATE weight assigner: features of one bucket -> a logit per channel.

    Maps (B, C, H, W): ``Conv3x3(C, hidden, no bias) -> ReLU -> BatchNorm2d -> Dropout -> GAP ->
    Linear(hidden, C)`` (a logit per image and channel). Vectors (B, C): ``Linear(C, hidden) ->
    ReLU -> BatchNorm1d -> Dropout -> Linear(hidden, C)``."""

    def __init__(self, channels: int, hidden: int = 128, dropout: float = 0.5, spatial: bool = True):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.BatchNorm2d(hidden),
                nn.Dropout(dropout),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(hidden, channels),
            )
        else:
            self.net = nn.Sequential(
                nn.Linear(channels, hidden),
                nn.ReLU(),
                nn.BatchNorm1d(hidden),
                nn.Dropout(dropout),
                nn.Linear(hidden, channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BUCKET_NORMS = ("per-bucket", "shared")


class Amalgamation(nn.Module):
    """``k`` learned weight assigners combining ``n_buckets`` feature buckets of ``channels`` each.

    Input: buckets concatenated along channels, (B, V*C, H, W) (or (B, V*C) with
    ``spatial=False``), bucket ``v`` in channels ``v*C:(v+1)*C`` (so the probes' 4D batches
    carry them unchanged). Output ``(features (B, k*C, ...), weights (B, k, V, C))``: per
    assigner, softmax over buckets of its per-channel logits, and the weighted sum of the buckets.
    ``weights=`` fixes the weights instead ((V,), (k, V) or (B, k, V, C); e.g. one-hot picks a bucket).
    ``bucket_norm``: ``"per-bucket"`` (official) or ``"shared"`` (see the module docstring).
    """

    def __init__(
        self,
        channels: int,
        n_buckets: int,
        k: int = 1,
        hidden: int = 128,
        dropout: float = 0.5,
        spatial: bool = True,
        bucket_norm: str = "per-bucket",
    ):
        super().__init__()
        if channels < 1 or n_buckets < 1 or k < 1:
            raise ValueError(f"channels, n_buckets and k must be >= 1, got {channels}, {n_buckets}, {k}")
        if bucket_norm not in BUCKET_NORMS:
            raise ValueError(f"bucket_norm must be one of {list(BUCKET_NORMS)}, got {bucket_norm!r}")
        self.channels, self.n_buckets, self.k, self.spatial = channels, n_buckets, k, spatial
        self.bucket_norm = bucket_norm
        self.assigners = nn.ModuleList(WeightAssigner(channels, hidden, dropout, spatial) for _ in range(k))

    @property
    def out_channels(self) -> int:
        return self.k * self.channels

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        want = 4 if self.spatial else 2
        if x.ndim != want or x.shape[1] != self.n_buckets * self.channels:
            shape = "(B, V*C, H, W)" if self.spatial else "(B, V*C)"
            raise ValueError(
                f"expected {shape} with V*C = {self.n_buckets}*{self.channels} = {self.n_buckets * self.channels}, "
                f"got shape {tuple(x.shape)}"
            )
        return x.float().reshape(x.shape[0], self.n_buckets, self.channels, *x.shape[2:])

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self.buckets(x)  # (B, V, C, ...)
        B, V, C = xb.shape[:3]
        if weights is None and self.bucket_norm == "shared":  # one batch of all buckets: shared statistics
            flat = xb.transpose(0, 1).reshape(V * B, C, *xb.shape[3:])
            logits = torch.stack([a(flat).reshape(V, B, C).transpose(0, 1) for a in self.assigners], 1)
            w = F.softmax(logits, dim=2)  # (B, k, V, C)
        elif weights is None:  # official: the assigner once per bucket
            logits = torch.stack([torch.stack([a(xb[:, v]) for v in range(V)], 1) for a in self.assigners], 1)
            w = F.softmax(logits, dim=2)  # (B, k, V, C)
        else:
            w = torch.as_tensor(weights, dtype=xb.dtype, device=xb.device)
            if w.ndim == 1:
                w = w[None, None, :, None].expand(B, self.k, V, C)
            elif w.ndim == 2:
                w = w[None, :, :, None].expand(B, self.k, V, C)
            if tuple(w.shape) != (B, self.k, V, C):
                raise ValueError(f"weights must have shape (V,), (k, V) or (B, k, V, C) = {(B, self.k, V, C)}")
        extra = (None,) * (xb.ndim - 3)
        mixed = [(w[(slice(None), j, slice(None), slice(None), *extra)] * xb).sum(1) for j in range(self.k)]
        return torch.cat(mixed, 1), w

    @staticmethod
    def sparsity(weights: torch.Tensor) -> torch.Tensor:
        """The official sparsity term: L2 norm of the weights across buckets, mean over the batch
        and channels, averaged over the ``k`` assigners (1 for one-hot weights, 1/sqrt(V) for uniform)."""
        return torch.linalg.norm(weights, dim=2).mean()


class AmalgamatedHead(nn.Module):
    """An :class:`Amalgamation` followed by a probe head (e.g. :class:`difstudy.probes.SegHead`
    built for ``amalgamation.out_channels``); accepts what the probes' training loops pass
    (a tensor or a one-element list of (B, V*C, H, W)). ``weights`` fixes the bucket weights."""

    def __init__(self, amalgamation: Amalgamation, head: nn.Module, weights: torch.Tensor | None = None):
        super().__init__()
        self.amalgamation, self.head = amalgamation, head
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32))
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats):
        x = feats if isinstance(feats, torch.Tensor) else feats[0]
        if not isinstance(feats, torch.Tensor) and len(feats) != 1:
            raise ValueError(f"AmalgamatedHead takes one feature level (the buckets), got {len(feats)}")
        mixed, self.last_weights = self.amalgamation(x, self.weights)
        return self.head(mixed)


def train_amalgamated_head(
    train_iter_fn,
    channels: int,
    n_buckets: int,
    num_classes: int,
    kind: str = "linear",
    k: int = 1,
    weights: torch.Tensor | None = None,
    dim: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    sparsity: float = 0.0,
    seed: int = 0,
    ignore_index: int = 255,
    show_progress: bool | None = None,
) -> AmalgamatedHead:
    """Train amalgamation and segmentation head jointly, as :func:`difstudy.probes.train_seg_head`
    (same head, initialisation from ``seed``, AdamW and loss) on bucketed features (B, V*C, h, w).

    ``weights`` fixes the bucket weights (no assigner is trained): with one-hot weights the result
    equals ``train_seg_head`` on that bucket alone. ``sparsity`` > 0 adds ``-sparsity *
    Amalgamation.sparsity(w)`` to the loss (the official term, with a fixed coefficient)."""
    from ..probes.runner import progress as _progress
    from ..probes.segmentation import LinearPixelProbe, SegHead, seg_logits

    if kind not in ("conv", "linear"):
        raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
    amal = Amalgamation(channels, n_buckets, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head first: the same initialisation as train_seg_head
        head = (
            SegHead([amal.out_channels], num_classes, dim)
            if kind == "conv"
            else LinearPixelProbe([amal.out_channels], num_classes)
        )
        torch.manual_seed(seed + 1)
        amal = Amalgamation(channels, n_buckets, k)
    model = AmalgamatedHead(amal, head, weights)
    params = list(head.parameters()) + ([] if weights is not None else list(amal.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in _progress(range(epochs), desc=f"amalgamated head ({kind}, k={k})", enabled=show_progress):
        for feats, labels in train_iter_fn():
            x = (feats if isinstance(feats, torch.Tensor) else feats[0]).float()
            labels = torch.as_tensor(labels).long()
            if labels.ndim != 3 or labels.shape[0] != x.shape[0]:
                raise ValueError(f"label maps must have shape ({x.shape[0]}, H, W), got shape {tuple(labels.shape)}")
            if not (labels != ignore_index).any():
                continue
            loss = F.cross_entropy(seg_logits(model, [x], labels.shape[1:]), labels, ignore_index=ignore_index)
            if sparsity and weights is None:
                loss = loss - sparsity * Amalgamation.sparsity(model.last_weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def stack_buckets(per_bucket: Sequence[torch.Tensor]) -> torch.Tensor:
    """Buckets (each (B, C, h, w) or (B, C), same shape) -> (B, V*C, ...) for :class:`Amalgamation`."""
    shapes = {tuple(x.shape) for x in per_bucket}
    if len(shapes) != 1:
        raise ValueError(f"buckets must share one shape, got {sorted(shapes)}; resize them to a common size first")
    return torch.cat([x.float() for x in per_bucket], 1)


class PixelAssigners(nn.Module):
    """GATE's per-pixel weight assigners as the front of a pixel classifier
    (``scarce_segmentation_gate/segmentation/pixel_classifier.py``, ``weight_assigner``): pixel
    vectors (N, V*C), bucket ``v`` in columns ``v*C:(v+1)*C``, -> the ``k`` weighted sums of the
    buckets (N, k*C), weights from :class:`Amalgamation` with ``spatial=False`` (a weight per
    pixel, bucket and channel, softmax over buckets). Put in front of every MLP of
    :class:`difstudy.probes.PixelMLPEnsemble` (its ``front``) it is trained jointly with it."""

    def __init__(
        self,
        channels: int,
        n_buckets: int,
        k: int = 1,
        hidden: int = 128,
        dropout: float = 0.5,
        passthrough: int = 0,
        bucket_norm: str = "per-bucket",
    ):
        super().__init__()
        self.amalgamation = Amalgamation(channels, n_buckets, k, hidden, dropout, False, bucket_norm)
        self.n_in = channels * n_buckets
        self.passthrough = int(passthrough)  # trailing columns passed on unweighted (attention maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.amalgamation(x[:, : self.n_in])[0]
        return torch.cat([mixed, x[:, self.n_in :]], 1) if self.passthrough else mixed

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(N, k, V, C) bucket weights of pixel vectors ``x`` (eval mode)."""
        self.eval()
        return self.amalgamation(x[:, : self.n_in])[1]
