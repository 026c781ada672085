"""GATE, step 5b: amalgamated technique buckets as feature sources of the protocol layer.

:class:`AmalgamatedFeatures` reads the buckets of a :class:`~difstudy.gate.TechniqueFeatures`;
with the official joint fit (label-scarce segmentation; correspondence with the trained conv head)
the protocol trains per-pixel assigners (:class:`~difstudy.gate.amalgamation.PixelAssigners`) with
its classifier or head, otherwise the assigners are fitted first (:func:`fit_amalgamation`) and
frozen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DifstudyError
from .amalgamation import BUCKET_NORMS, Amalgamation, PixelAssigners, stack_buckets
from .features import TechniqueFeatures, bucket_label


# -- amalgamated techniques as feature sources of the protocol layer -----------------
@dataclass(frozen=True)
class AmalgamationConfig:
    """How :class:`AmalgamatedFeatures` fits its weight assigners.

    ``k`` assigners (official 1) of ``hidden`` units with ``dropout``; AdamW (``lr``,
    ``weight_decay``) for ``epochs`` passes over the task's training data in minibatches of
    ``batch_size`` images (pairs for correspondence); ``sparsity``: the official sparsity term's
    fixed coefficient (0 = off); ``temperature``: of the correspondence contrastive loss;
    ``bucket_norm``: ``"per-bucket"`` (official) or ``"shared"`` BatchNorm statistics across the
    buckets (a difstudy variant, named in the source's label; see :mod:`~difstudy.gate.amalgamation`)."""

    k: int = 1
    hidden: int = 128
    dropout: float = 0.5
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sparsity: float = 0.0
    temperature: float = 0.07
    fit: str = "joint"
    bucket_norm: str = "per-bucket"

    def __post_init__(self):
        if self.fit not in FITS:
            raise DifstudyError(f"AmalgamationConfig.fit must be one of {list(FITS)}, got {self.fit!r}")
        if self.bucket_norm not in BUCKET_NORMS:
            raise DifstudyError(
                f"AmalgamationConfig.bucket_norm must be one of {list(BUCKET_NORMS)}, got {self.bucket_norm!r}"
            )


FIT_TASKS = ("correspondence", "label-scarce-seg", "classification")
# how the assigners are trained: "joint" (official for label-scarce segmentation: per-pixel
# assigners inside each of the ensemble's MLPs, trained with it) or "two-stage" (fitted first with a
# light head, then frozen under the protocol's own head; what correspondence and classification use)
FITS = ("joint", "two-stage")
# the tasks whose protocol trains a head the assigners can join (correspondence: the conv head only)
JOINT_TASKS = ("label-scarce-seg", "correspondence")
# the setting names of gate_sources; each source's label names its fit (FIT_LABELS)
AMALGAMATED_LABEL = "amalgamated: "
FIT_LABELS = {
    "joint": "amalgamated (per-pixel assigners trained jointly, official): ",
    "two-stage": "amalgamated (2-stage fit): ",
}


class AmalgamatedFeatures:
    """A feature source: buckets of a :class:`TechniqueFeatures` combined by learned weight assigners.

    Per image, the assigners see each bucket's activations (resized to the largest and
    concatenated, (C, H, W)) and give a weight per bucket and channel (softmax over buckets, one
    weight per image and channel, :class:`Amalgamation`); :meth:`maps` returns, per activation,
    the ``k`` weighted sums of the buckets' maps at the activation's own size, concatenated
    ((k*C_i, h_i, w_i)). A per-channel weight commutes with the protocols' bilinear resizing, so
    with one-hot ``weights`` and ``k = 1`` the maps are exactly the chosen bucket's.

    **Joint fit** (``config.fit="joint"``, the default, for the tasks of :data:`JOINT_TASKS`;
    official): nothing is fitted here. :meth:`maps` returns every bucket's maps, bucket after
    bucket, and :attr:`pixel_front` gives the protocol per-pixel assigners (:class:`PixelAssigners`)
    that it trains jointly with its own model: in front of each MLP of the ensemble, with the same
    epochs and early stop (:func:`difstudy.protocols.part_segmentation`), or in front of the
    correspondence conv head, with the official contrastive loss and schedule
    (:func:`difstudy.protocols.correspondence` with ``method="conv"``; the zero-shot ``"nn"``
    protocol has no head to join and refuses a joint source, see :func:`~difstudy.gate.gate_sources`).

    **Two-stage fit** (difstudy's deviation from the official joint training; what classification
    uses, correspondence with the zero-shot protocol, and any task with ``fit="two-stage"``): on
    :meth:`prepare` for a run seed, the assigners are trained on ``train`` (records, or pairs for
    correspondence, or a function ``seed -> records``) together with a light task head
    (``task``: ``label-scarce-seg``: a per-pixel linear layer on the label maps resized to
    the assigners' grid; ``classification``: a linear layer on pooled features;
    ``correspondence``: the official contrastive loss on the amalgamated maps, no head), then
    frozen; the protocol then trains its own head (pixel-MLP ensemble, linear probe, nearest
    neighbour) on the amalgamated features. ``weights`` ((V,) or (k, V)) fixes the weights
    instead (no fit)."""

    def __init__(
        self,
        base: TechniqueFeatures,
        buckets: Sequence[tuple[str, int]],
        task: str | None = None,
        train=None,
        config: AmalgamationConfig = AmalgamationConfig(),
        weights=None,
        label: str | None = None,
        extra=None,
    ):
        if len(buckets) < 1:
            raise DifstudyError("an amalgamation needs at least one bucket")
        self.extra = extra  # a feature source appended unweighted after the mix (official: attention maps)
        self._extra_channels = 0
        self.base, self.buckets = base, [base._check_bucket(b) for b in buckets]
        if weights is None and task not in FIT_TASKS:
            raise DifstudyError(f"learned weights need a task in {list(FIT_TASKS)}, got {task!r} (or pass weights=)")
        if weights is None and train is None:
            raise DifstudyError("learned weights need training records (train=)")
        self.task, self.train, self.config = task, train, config
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.joint = weights is None and task in JOINT_TASKS and config.fit == "joint"
        fit = FIT_LABELS["joint" if self.joint else "two-stage"]
        if weights is None and config.bucket_norm != "per-bucket":  # a variant: named in every row
            fit = fit.replace("amalgamated (", f"amalgamated ({config.bucket_norm} bucket norm, ", 1)
        if label is None or label.startswith(AMALGAMATED_LABEL):
            desc = label[len(AMALGAMATED_LABEL) :] if label else " + ".join(bucket_label(*b) for b in self.buckets)
            label = fit + desc
        self.label = label
        self._channels: int | None = None  # channels of one bucket (all activations), joint fit
        self.amalgamation: Amalgamation | None = None
        self.fit_seconds = 0.0

    @property
    def seed(self) -> int:
        return self.base.seed

    def for_seed(self, seed: int) -> AmalgamatedFeatures:
        import copy

        if int(seed) == self.seed:
            return self
        other = copy.copy(self)
        other.base, other.amalgamation = self.base.for_seed(seed), None
        if self.extra is not None:
            other.extra = self.extra.for_seed(seed)
        return other

    def _stacked(self, record) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """(V*C, H, W) assigner input and the buckets' raw maps."""
        from ..protocols import concat_maps

        per = [self.base.bucket_maps(record, b) for b in self.buckets]
        return stack_buckets([concat_maps(m)[None] for m in per])[0], per

    def _new_amalgamation(self, channels: int) -> Amalgamation:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            return Amalgamation(channels, len(self.buckets), c.k, c.hidden, c.dropout, bucket_norm=c.bucket_norm)

    def _train_items(self) -> Sequence:
        return self.train(self.seed) if callable(self.train) else self.train

    def prepare(self, records) -> None:
        """Extract the buckets of ``records`` (and of the training data); fit the assigners
        once per run seed unless the weights are fixed."""
        self.base.prepare(records)
        if self.extra is not None:
            self.extra.prepare(records)
            self._extra_channels = sum(m.shape[0] for m in self.extra.maps(records[0]))
        if self.joint:  # the protocol trains the assigners with its own classifier
            self._channels = sum(m.shape[0] for m in self.base.bucket_maps(records[0], self.buckets[0]))
            return
        if self.weights is not None or self.amalgamation is not None:
            if self.amalgamation is None:
                x, _ = self._stacked(records[0])
                self.amalgamation = self._new_amalgamation(x.shape[0] // len(self.buckets)).eval()
            return
        t0 = time.time()
        self.amalgamation = fit_amalgamation(self, self.task, self._train_items(), self.config)
        self.fit_seconds = time.time() - t0

    @torch.no_grad()
    def bucket_weights(self, record) -> torch.Tensor:
        """(k, V, C) weights of ``record`` (softmax over buckets; C = all activations' channels)."""
        if self.amalgamation is None:
            raise DifstudyError(f"{self.label!r} is not prepared; call prepare(records) first")
        x, _ = self._stacked(record)
        self.amalgamation.eval()
        _, w = self.amalgamation(x[None], self.weights)
        return w[0]

    def mix(self, per_bucket: list[list[torch.Tensor]], w: torch.Tensor) -> list[torch.Tensor]:
        """Per activation i, ``cat_j sum_v w[j, v, channels of i] * maps[v][i]``."""
        out, start = [], 0
        for i in range(len(per_bucket[0])):
            c = per_bucket[0][i].shape[0]
            wi = w[:, :, start : start + c]  # (k, V, c)
            out.append(
                torch.cat(
                    [
                        sum(wi[j, v][:, None, None] * per_bucket[v][i] for v in range(len(per_bucket)))
                        for j in range(wi.shape[0])
                    ]
                )
            )
            start += c
        return out

    @property
    def pixel_front(self):
        """For the joint fit: a function returning ``(PixelAssigners, out_dim)`` for the protocol's
        pixel classifiers (see the class docstring); None otherwise."""
        if not self.joint:
            return None
        if self._channels is None:
            raise DifstudyError(f"{self.label!r} is not prepared; call prepare(records) first")
        c, cfg, n, e = self._channels, self.config, len(self.buckets), self._extra_channels

        def front():
            assigners = PixelAssigners(c, n, cfg.k, cfg.hidden, cfg.dropout, e, cfg.bucket_norm)
            return assigners, cfg.k * c + e

        return front

    def maps(self, record) -> list[torch.Tensor]:
        per = [self.base.bucket_maps(record, b) for b in self.buckets]
        extra = list(self.extra.maps(record)) if self.extra is not None else []
        if self.joint:  # every bucket, bucket after bucket: the pixel front mixes them
            return [m for maps in per for m in maps] + extra
        return self.mix(per, self.bucket_weights(record)) + extra


def _pair_images(items) -> list:
    from ..protocols import pair_images

    return pair_images(items)


def fit_amalgamation(source: AmalgamatedFeatures, task: str, train, config: AmalgamationConfig) -> Amalgamation:
    """Train an :class:`Amalgamation` for ``source``'s buckets on ``task`` (see
    :class:`AmalgamatedFeatures`); returns it frozen, in eval mode."""
    from ..probes.correspondence import contrastive_loss
    from ..protocols.partseg import resize_labels

    if task not in FIT_TASKS:
        raise DifstudyError(f"unknown amalgamation task {task!r}; use one of {list(FIT_TASKS)}")
    images = _pair_images(train) if task == "correspondence" else list(train)
    if not images:
        raise DifstudyError("fit_amalgamation needs at least one training record")
    source.base.prepare(images)
    stacked = {r.image_id: source._stacked(r)[0] for r in images}
    first = next(iter(stacked.values()))
    amal = source._new_amalgamation(first.shape[0] // len(source.buckets))
    c = config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed + 2)
        head: nn.Module
        if task == "label-scarce-seg":
            k = train.labels.num_classes if getattr(train, "labels", None) is not None else None
            k = k or int(max(int(np.asarray(r.mask).max()) for r in images)) + 1
            head = nn.Conv2d(amal.out_channels, k, 1)
        elif task == "classification":
            k = train.labels.num_classes if getattr(train, "labels", None) is not None else None
            k = k or int(max(r.label for r in images)) + 1
            head = nn.Linear(amal.out_channels, k)
        else:
            head = nn.Identity()
    # standardise the assigner-space features per channel (a fixed scale, so raw magnitudes don't decide)
    allx = torch.stack(list(stacked.values()))
    scale = allx.transpose(0, 1).flatten(1).std(1).clamp_min(1e-6)[None, :, None, None]
    params = list(amal.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(source.seed + 3)
    items = list(train)
    amal.train()
    head.train()
    for _ in range(c.epochs):
        order = torch.randperm(len(items), generator=gen).tolist()
        for s in range(0, len(order), c.batch_size):
            batch = [items[i] for i in order[s : s + c.batch_size]]
            if task == "correspondence":
                ids = [i for p in batch for i in (p.src_id, p.trg_id)]
            else:
                ids = [r.image_id for r in batch]
            x = torch.stack([stacked[i] for i in ids]) / scale
            if x.shape[0] < 2:
                continue  # BatchNorm needs two images
            mixed, w = amal(x)
            if task == "label-scarce-seg":
                y = torch.stack([resize_labels(r.mask, x.shape[-1]) for r in batch])
                loss = F.cross_entropy(head(mixed), y, ignore_index=255)
            elif task == "classification":
                y = torch.as_tensor([r.label for r in batch])
                loss = F.cross_entropy(head(mixed.mean((2, 3))), y)
            else:
                losses = []
                for j, p in enumerate(batch):
                    pair = dict(
                        src_feat=mixed[2 * j],
                        trg_feat=mixed[2 * j + 1],
                        src_kps=p.src_kps,
                        trg_kps=p.trg_kps,
                        src_size=p.src.size,
                        trg_size=p.trg.size,
                    )
                    losses.append(contrastive_loss(head, pair, c.temperature))
                loss = torch.stack(losses).mean()
            if c.sparsity:
                loss = loss - c.sparsity * Amalgamation.sparsity(w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    amal.eval().requires_grad_(False)
    # the assigners were trained on standardised inputs: fold the scale into the input
    return _Scaled(amal, scale[0])


class _Scaled(nn.Module):
    """An :class:`Amalgamation` whose input is divided by a fixed per-channel scale first."""

    def __init__(self, amalgamation: Amalgamation, scale: torch.Tensor):
        super().__init__()
        self.amalgamation = amalgamation
        self.register_buffer("scale", scale)

    @property
    def out_channels(self) -> int:
        return self.amalgamation.out_channels

    def forward(self, x: torch.Tensor, weights=None):
        return self.amalgamation(x / self.scale, weights)
