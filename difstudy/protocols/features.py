"""Feature sources: what a protocol reads per-image feature maps from.

A feature source maps an :class:`~difstudy.protocols.records.ImageRecord` to a
list of (C, h, w) float32 maps, one per activation (in the order of its
``names``: the U-Net's forward order, as the catalogue resolves them):

- :class:`CachedFeatures`: a diffusion U-Net's activations, extracted once into
  the feature cache by :func:`difstudy.extract.extract` and read back with
  :meth:`difstudy.cache.FeatureCache.get`;
- :class:`RandomUNetFeatures`: the same architecture with fresh random weights;
- :class:`PixelFeatures`: the image itself (3, H, W) in [-1, 1].

``for_seed(seed)`` gives the source for one run seed (the U-Net's noise draw,
and for the random U-Net its weights); ``prepare(records)`` extracts what is
missing; ``maps(record)`` reads.

Cache entries are keyed by the image's **content** (:func:`content_key`, a hash
of its pixels), not by its dataset id. Features are a function of the pixels
(and the noise seed), so the same picture gets the same features under any id,
whichever loader produced it, and two different pictures can never share
features because their ids collide (issue 9, defect 2). :meth:`CachedFeatures.prepare`
also refuses one id naming two different images.

Extraction protocol, as documented in :mod:`difstudy.extract`: VAE encoding,
forward noise at timestep ``t``, one U-Net forward. The latent is the VAE
posterior **mean**; the official generic-diffusion-feature code encodes with
``pipe.prepare_latents``, which **samples** the posterior
(``retrieve_latents(..., sample_mode="sample")``), adding a small extra random
perturbation (std ``exp(logvar / 2)`` per latent element) before the forward
noise. difstudy keeps the mean so that the only randomness of a feature is the
seeded noise draw; this is a deliberate, documented deviation.

Combining activations (:func:`concat_maps`): the official code upsamples each
activation bilinearly to a common size and concatenates them **raw**
(``correspondence/aggregation_network.py``, ``scarce_segmentation/task-pixel.py``).
That is the default, ``norm="raw"``. The named option ``norm="rms"`` divides each
activation by its root-mean-square over the image first, so that activations of
very different magnitudes weigh alike (a difstudy deviation, labelled as such).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DifstudyError
from .records import ImageRecord, content_key

FEATURE_NORMS = ("raw", "rms")


@runtime_checkable
class FeatureSource(Protocol):
    """What every protocol reads features through (see the module docstring)."""

    label: str

    def for_seed(self, seed: int) -> FeatureSource: ...

    def prepare(self, records: Sequence[ImageRecord]) -> None: ...

    def maps(self, record: ImageRecord) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class ExtractionConfig:
    """How :class:`CachedFeatures` runs :func:`difstudy.extract.extract`.

    ``t`` is the papers' timestep (50 of 1000 for most tasks); ``variant`` the
    conditioning (``empty``, ``generic``, ``fine`` or ``text:<prompt>``);
    ``image_size`` None means the model's native size.
    """

    t: int = 50
    variant: str = "empty"
    image_size: int | None = None
    batch_size: int = 8
    cache_dir: str = "cache/features"
    store_dtype: str = "fp16"
    progress: bool = False


class ExtractionView:
    """The distinct images of a record sequence as :func:`extract` items (loaded lazily),
    each under its content key (see :func:`distinct_images`)."""

    def __init__(self, records: Sequence[ImageRecord], positions: list[int], keys: list[str]):
        self.records, self.positions, self.keys = records, positions, keys

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> dict:
        r = self.records[self.positions[j]]
        return {"image_id": self.keys[j], "image": r.image, "caption": r.caption, "fine_caption": r.fine_caption}


def distinct_images(records: Sequence[ImageRecord], seen_ids: dict[str, str]) -> tuple[list[int], list[str]]:
    """Positions and content keys of the distinct images of ``records`` (the first of each).

    ``seen_ids`` maps every image id met so far to its content key and is updated; an id that
    names two different images is refused (a train/test leak otherwise)."""
    positions, keys, seen = [], [], set()
    for i, r in enumerate(records):
        key = content_key(r.image)
        if seen_ids.setdefault(r.image_id, key) != key:
            raise DifstudyError(
                f"image id {r.image_id!r} names two different images; ids must be unique across "
                "splits and datasets (namespace them, e.g. '<dataset>/<split>/<name>')"
            )
        if key not in seen:
            seen.add(key)
            positions.append(i)
            keys.append(key)
    return positions, keys


class CachedFeatures:
    """A U-Net's activations through the feature cache.

    Args:
        pipe: a loaded diffusers pipeline (:func:`difstudy.models.load`).
        activations: paper names, module paths or named sets (``ours-v1.5``).
        extraction: :class:`ExtractionConfig`.
        seed: the noise-draw seed of :func:`difstudy.extract.extract`.
        model_name: names the cache group (default: the pipeline's path).
        label: the table label of this source (default: the activations).

    :meth:`without_massive` gives the same source with each map's massive channels zeroed (DiTF's
    treatment of transformer features, :func:`difstudy.properties.massive_channels`), labelled.
    """

    drop_ratio: float | None = None
    drop_control: bool = False

    def __init__(
        self,
        pipe,
        activations: Sequence[str],
        extraction: ExtractionConfig = ExtractionConfig(),
        seed: int = 0,
        model_name: str | None = None,
        label: str | None = None,
    ):
        from ..denoisers import pipeline_catalog

        self.pipe, self.extraction, self.seed = pipe, extraction, int(seed)
        self.activations = tuple(activations)
        self.model_name = model_name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
        self.names = tuple(pipeline_catalog(pipe).resolve(list(self.activations)))
        self.label = label or " ".join(self.activations)
        self._keys: dict[str, str] = {}
        self._cache = None

    def for_seed(self, seed: int) -> CachedFeatures:
        if seed == self.seed:
            return self
        other = copy.copy(self)
        other.seed, other._keys, other._cache = int(seed), dict(self._keys), None
        return other

    def select(self, activations: Sequence[str], label: str | None = None) -> CachedFeatures:
        """The same source (weights, seed, cache) reading only ``activations``, which must be among
        the names it extracts: nothing is extracted again for images it has prepared."""
        from ..denoisers import pipeline_catalog

        names = tuple(pipeline_catalog(self.pipe).resolve(list(activations)))
        missing = [n for n in names if n not in self.names]
        if missing:
            raise DifstudyError(f"{missing} are not among the activations of this source: {list(self.names)}")
        other = copy.copy(self)
        other.activations, other.names, other._keys = tuple(activations), names, dict(self._keys)
        other.label = label or " ".join(activations)
        return other

    def without_massive(self, ratio: float | None = None, control: bool = False) -> CachedFeatures:
        """This source with the massive channels of every map zeroed: channels whose mean magnitude
        on that image exceeds ``ratio`` (default :data:`~difstudy.properties.MASSIVE_RATIO`) times the
        median channel's; zeroed rather than removed, so every image keeps the activation's width.
        Found per image from its own map (no label, no other image takes part); the label says so.

        ``control``: zero as many channels, drawn at random among the map's other channels (seeded
        by the image, the activation and the run seed), instead: the control of "dropping the
        massive channels helps" (any dropped channel changes a probe a little)."""
        from ..properties import MASSIVE_RATIO

        other = copy.copy(self)
        other.drop_ratio, other.drop_control = float(ratio or MASSIVE_RATIO), bool(control)
        massive = f"massive channels > {other.drop_ratio:g}x median"
        which = f"control: as many random channels as {massive}" if control else massive
        other.label = f"{self.label} ({which} dropped)"
        return other

    def _cached(self, keys: list[str]) -> bool:
        """Whether every activation of every image ``keys`` is already in the cache."""
        from ..cache import Key
        from ..extract import variant_key

        if self._cache is None:
            return False
        self._cache.refresh()
        v = variant_key(self.extraction.variant)
        return not self._cache.missing([Key(n, self.extraction.t, v, self.seed, k) for k in keys for n in self.names])

    def _register(self, records: Sequence[ImageRecord]) -> tuple[list[int], list[str]]:
        return distinct_images(records, self._keys)

    def prepare(self, records: Sequence[ImageRecord]) -> None:
        """Extract the activations of every distinct image of ``records`` (resumable: cached
        entries are reused)."""
        from ..extract import extract

        positions, keys = self._register(records)
        if not positions or self._cached(keys):
            return
        cfg = self.extraction
        self._cache, _ = extract(
            self.pipe,
            ExtractionView(records, positions, keys),
            list(self.names),
            timesteps=[cfg.t],
            variants=[cfg.variant],
            seed=self.seed,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            cache_dir=cfg.cache_dir,
            store_dtype=torch.float16 if cfg.store_dtype == "fp16" else torch.float32,
            model_name=self.model_name,
            progress=cfg.progress,
        )

    def maps(self, record: ImageRecord) -> list[torch.Tensor]:
        from ..cache import Key
        from ..extract import variant_key

        if self._cache is None:
            raise DifstudyError(f"features of {self.label!r} were never extracted; call prepare(records) first")
        key = self._keys.get(record.image_id) or content_key(record.image)
        v = variant_key(self.extraction.variant)
        maps = [self._cache.get(Key(n, self.extraction.t, v, self.seed, key)).float() for n in self.names]
        if self.drop_ratio is not None:
            from ..properties import massive_channels

            for name, m in zip(self.names, maps):
                drop = massive_channels(m, self.drop_ratio)
                if self.drop_control and drop:
                    rest = np.setdiff1d(np.arange(m.shape[0]), drop)
                    rng = np.random.default_rng([zlib.crc32(f"{key}/{name}".encode()), self.seed])
                    drop = rng.choice(rest, size=min(len(drop), len(rest)), replace=False).tolist()
                m[drop] = 0.0
        return maps


class RandomUNetFeatures(CachedFeatures):
    """:class:`CachedFeatures` of the same architecture with freshly initialised weights
    (the "random-weight U-Net" baseline); the run seed sets the weights as well as the noise."""

    def __init__(
        self,
        pipe,
        activations: Sequence[str],
        extraction: ExtractionConfig = ExtractionConfig(),
        seed: int = 0,
        model_name: str | None = None,
        label: str | None = None,
    ):
        from ..models.tiny import with_random_unet

        base = model_name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
        rnd = with_random_unet(pipe, seed)
        super().__init__(rnd, activations, extraction, seed, f"{base}-random{int(seed)}", label)
        self._base_pipe, self._base_name = pipe, base

    def for_seed(self, seed: int) -> RandomUNetFeatures:
        if seed == self.seed:
            return self
        return RandomUNetFeatures(self._base_pipe, self.activations, self.extraction, seed, self._base_name, self.label)


class PixelFeatures:
    """Raw pixels as the only 'activation': (3, H, W) float32 in [-1, 1] at the image's size."""

    label = "raw pixels"
    names = ("pixels",)

    def for_seed(self, seed: int) -> PixelFeatures:
        return self

    def prepare(self, records: Sequence[ImageRecord]) -> None:
        return None

    def maps(self, record: ImageRecord) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(record.image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1]


# ----------------------------------------------------------------------------
# combining activations
def check_norm(norm: str) -> str:
    if norm not in FEATURE_NORMS:
        raise ValueError(f"unknown feature norm {norm!r}; use 'raw' (official: concatenate as extracted) or 'rms'")
    return norm


def scale_maps(maps: Sequence[torch.Tensor], norm: str = "raw") -> list[torch.Tensor]:
    """float32 copies of ``maps``; with ``norm="rms"`` each is divided by its RMS over the map."""
    check_norm(norm)
    out = [m.float() for m in maps]
    if norm == "rms":
        out = [m / m.pow(2).mean().sqrt().clamp_min(1e-6) for m in out]
    return out


def largest_size(maps: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(h, w) of the map with the most cells."""
    return tuple(max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1]))  # type: ignore[return-value]


def concat_maps(
    maps: Sequence[torch.Tensor], size: int | tuple[int, int] | None = None, norm: str = "raw"
) -> torch.Tensor:
    """Activations (C_i, h_i, w_i) bilinearly resized (``align_corners=False``, as the official
    ``F.interpolate(..., mode="bilinear")``) to ``size`` (default: the largest) and concatenated
    along channels: (sum C_i, h, w)."""
    scaled = scale_maps(maps, norm)
    hw = largest_size(scaled) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    return torch.cat(
        [
            m if tuple(m.shape[-2:]) == hw else F.interpolate(m[None], size=hw, mode="bilinear", align_corners=False)[0]
            for m in scaled
        ]
    )
