"""Dataset records: the one input type of every protocol.

Whatever the source (the toy world, or a real dataset read by
:mod:`difstudy.data.loaders` from its official layout), a protocol sees

- :class:`ImageRecord`: one image with the annotations a task needs (class
  label, label map, keypoints, box, captions);
- :class:`PairRecord`: two image records and their matched keypoints (the
  SPair-71k pair annotation);
- :class:`Records`: a lazy, random-access sequence of records with its
  :class:`LabelSpace` (classes, ignored label), and the one dataset-subset
  type (:meth:`Records.subset`, :meth:`Records.head`).

Adapters turn each source into records: :func:`toy_records`,
:func:`toy_part_records` and :func:`toy_pairs` for the toy world,
:func:`loader_records` and :func:`spair_pairs` for the loaders. The toy
adapters produce the same records as the loaders give on the toy world
exported to the official layouts (:mod:`difstudy.data.export`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..data.toyworld import CLASS_NAMES, CLASSES, NUM_PARTS, PART_NAMES, ToySample, ToyWorld, local_part_mask
from ..extract import image_digest


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its annotations (fields a task does not need stay None).

    Attributes:
        image_id: the dataset's id of the image (unique within a run).
        image: RGB ``uint8`` (H, W, 3).
        label: class index (classification).
        mask: (H, W) integer label map in the record set's :class:`LabelSpace`.
        keypoints: (K, 2) float32 ``(x, y)`` pixels; ``visible`` (K,) bool.
        bbox: ``(x1, y1, x2, y2)`` pixels.
        category: class name.
        caption, fine_caption: prompts for the ``generic`` / ``fine`` conditioning variants.
    """

    image_id: str
    image: np.ndarray
    label: int | None = None
    mask: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    bbox: tuple[float, float, float, float] | None = None
    category: str | None = None
    caption: str | None = None
    fine_caption: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return tuple(self.image.shape[:2])  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class PairRecord:
    """A correspondence pair: row k of ``src_kps`` (source pixels) matches row k of
    ``trg_kps`` (target pixels); ``trg_bbox`` ``(x1, y1, x2, y2)`` sets the bbox threshold."""

    pair_id: str
    src: ImageRecord
    trg: ImageRecord
    src_kps: np.ndarray
    trg_kps: np.ndarray
    trg_bbox: tuple[float, float, float, float]
    category: str | None = None

    @property
    def src_id(self) -> str:
        return self.src.image_id

    @property
    def trg_id(self) -> str:
        return self.trg.image_id


@dataclass(frozen=True)
class LabelSpace:
    """Classes of a record set: ``num_classes`` labels ``0 .. K-1`` and the value of
    unlabelled pixels (``ignore_index``; None when every pixel is labelled)."""

    num_classes: int
    ignore_index: int | None = None
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Records(Sequence):
    """A lazy, random-access sequence of records: item ``i`` is ``getter(indices[i])``.

    Use :meth:`from_sequence` to wrap a loader; :meth:`subset` / :meth:`head` select
    records without loading anything.
    """

    name: str
    getter: Callable[[int], Any]
    indices: tuple[int, ...]
    labels: LabelSpace | None = None

    @classmethod
    def from_sequence(
        cls, name: str, seq: Sequence, convert: Callable[[Any], Any] | None = None, labels: LabelSpace | None = None
    ) -> Records:
        """Records over ``seq`` (any ``len`` + indexing object), item ``i`` being ``convert(seq[i])``."""
        get = (lambda i: convert(seq[i])) if convert is not None else seq.__getitem__
        return cls(name, get, tuple(range(len(seq))), labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self.getter(self.indices[i])

    def __iter__(self) -> Iterator[Any]:
        return (self.getter(j) for j in self.indices)

    def subset(self, positions: Iterable[int]) -> Records:
        """The records at ``positions`` (0-based positions in this sequence), in that order."""
        positions = list(positions)
        bad = [p for p in positions if not -len(self) <= p < len(self)]
        if bad:
            raise IndexError(f"positions {bad[:5]} out of range for {self.name!r} ({len(self)} records)")
        return replace(self, indices=tuple(self.indices[p] for p in positions))

    def head(self, n: int | None) -> Records:
        """The first ``n`` records (all when ``n`` is None)."""
        return self if n is None else self.subset(range(min(int(n), len(self))))

    def __repr__(self) -> str:
        return f"Records({self.name!r}, n={len(self)}, labels={self.labels})"


def concat_records(*parts: Sequence, name: str | None = None) -> Records:
    """One lazy sequence of the records of ``parts`` in turn (label space of the first)."""
    sizes = [len(p) for p in parts]
    starts = np.cumsum([0, *sizes])

    def get(i: int) -> Any:
        k = int(np.searchsorted(starts, i, side="right") - 1)
        return parts[k][i - int(starts[k])]

    label = name or "+".join(getattr(p, "name", type(p).__name__) for p in parts)
    return Records(label, get, tuple(range(int(starts[-1]))), getattr(parts[0], "labels", None) if parts else None)


def content_key(image: np.ndarray) -> str:
    """An id for an image's pixels: ``img-`` + :func:`difstudy.extract.image_digest`
    (a hash of shape, dtype and bytes, the key of the extraction's noise draw too)."""
    return "img-" + image_digest(image)


def canonical(records: Records) -> Records:
    """``records`` sorted by :func:`content_key` (loads every image once).

    Protocols that train on a record set put it in this order before their seeded
    shuffles, so results depend on which images a set holds, not on the order a loader
    lists them in (the toy world and its export list the same images differently)."""
    keys = [content_key(r.image) for r in records]
    return records.subset(sorted(range(len(records)), key=keys.__getitem__))


# ----------------------------------------------------------------------------
# toy world
TOY_TARGETS = ("class", "object", "parts")


def _toy_image(s: ToySample, mask: np.ndarray | None) -> ImageRecord:
    return ImageRecord(
        image_id=s.image_id,
        image=s.image,
        label=s.label,
        mask=None if mask is None else mask.astype(np.int64),
        keypoints=s.keypoints,
        visible=s.visible,
        bbox=tuple(float(v) for v in s.bbox),
        category=s.class_name,
        caption=s.caption,
        fine_caption=s.fine_caption,
    )


def toy_records(world: ToyWorld, indices: Iterable[int] | None = None, target: str = "class") -> Records:
    """Toy-world images as records, in ``indices`` order (default: all).

    ``target`` sets the label map and label space: ``"class"`` (no map; 10 classes, for
    classification), ``"object"`` (0 background, ``1 + label`` inside the object: 11 classes,
    for semantic segmentation) or ``"parts"`` (global part ids: every part of every class).
    """
    if target not in TOY_TARGETS:
        raise ValueError(f"unknown toy-world target {target!r}; use one of {TOY_TARGETS}")
    spaces = {
        "class": LabelSpace(len(CLASS_NAMES), None, CLASS_NAMES),
        "object": LabelSpace(len(CLASS_NAMES) + 1, None, ("background", *CLASS_NAMES)),
        "parts": LabelSpace(NUM_PARTS, None, PART_NAMES),
    }

    def get(i: int) -> ImageRecord:
        s = world[i]
        mask = {"class": None, "object": np.where(s.mask > 0, s.label + 1, 0), "parts": s.mask}[target]
        return _toy_image(s, mask)

    idx = tuple(range(len(world)) if indices is None else (int(i) for i in indices))
    return Records(f"toyworld/{world.split}/{target}", get, idx, spaces[target])


def toy_class_indices(class_name: str, n: int) -> list[int]:
    """Indices of the first ``n`` images of ``class_name`` in a toy-world split (classes cycle)."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown toy-world class {class_name!r}; use one of {CLASS_NAMES}")
    c = CLASS_NAMES.index(class_name)
    return [c + len(CLASS_NAMES) * k for k in range(n)]


def toy_part_records(world: ToyWorld, class_name: str, n: int) -> Records:
    """The first ``n`` images of one class with class-local part masks (0 background,
    1..P its parts): the label-scarce part-segmentation set, as Horse-21 is one category."""
    idx = toy_class_indices(class_name, n)
    if idx[-1] >= len(world):
        raise ValueError(f"{world!r} holds fewer than {n} {class_name!r} images; make it at least {idx[-1] + 1} long")
    spec = CLASSES[CLASS_NAMES.index(class_name)]
    space = LabelSpace(len(spec.parts) + 1, None, ("background", *(p.name for p in spec.parts)))

    def get(i: int) -> ImageRecord:
        s = world[i]
        return _toy_image(s, local_part_mask(s.mask, s.label))

    return Records(f"toyworld/{world.split}/{class_name}-parts", get, tuple(idx), space)


def toy_pairs(world: ToyWorld, n_pairs: int, seed: int = 0) -> Records:
    """``world.pairs(n_pairs, seed)`` as pair records, keypoints visible in both images,
    pair ids as the SPair-71k export writes them (``<k>-<src>-<trg>:<class>``)."""
    pairs = world.pairs(n_pairs, seed)

    def get(k: int) -> PairRecord:
        a, b = pairs[k]
        src, trg = world[a], world[b]
        common = src.visible & trg.visible
        return PairRecord(
            pair_id=f"{k + 1:06d}-{src.image_id}-{trg.image_id}:{src.class_name}",
            src=_toy_image(src, None),
            trg=_toy_image(trg, None),
            src_kps=src.keypoints[common],
            trg_kps=trg.keypoints[common],
            trg_bbox=tuple(float(v) for v in trg.bbox),
            category=src.class_name,
        )

    return Records(f"toyworld/{world.split}/pairs-{seed}", get, tuple(range(len(pairs))))


# ----------------------------------------------------------------------------
# loaders of the official layouts
def _loader_image(item: dict) -> ImageRecord:
    mask = item.get("mask")
    label = item.get("label")
    return ImageRecord(
        image_id=str(item["image_id"]),
        image=item["image"],
        label=None if label is None else int(label),
        mask=None if mask is None else np.asarray(mask, dtype=np.int64),
        caption=item.get("caption"),
        fine_caption=item.get("fine_caption"),
    )


def label_space(ds: Any) -> LabelSpace | None:
    """The :class:`LabelSpace` a loader declares (``num_classes``, ``ignore_index``, ``class_names``)."""
    k = getattr(ds, "num_classes", None)
    if k is None:
        return None
    return LabelSpace(int(k), getattr(ds, "ignore_index", None), tuple(getattr(ds, "class_names", None) or ()))


def loader_records(ds: Sequence, n: int | None = None, name: str | None = None) -> Records:
    """The first ``n`` items (all when None) of a loader of :mod:`difstudy.data.loaders`
    (dicts with ``image_id``, ``image`` and ``mask`` or ``label``) as image records."""
    recs = Records.from_sequence(name or repr(ds), ds, _loader_image, label_space(ds))
    return recs.head(n)


def spair_pairs(ds: Sequence, n: int | None = None) -> Records:
    """The first ``n`` pairs (all when None) of a :class:`~difstudy.data.loaders.SPair71k` as pair records."""

    def convert(p: dict) -> PairRecord:
        return PairRecord(
            pair_id=str(p["pair_id"]),
            src=ImageRecord(str(p["src_id"]), p["src_image"], category=p.get("category")),
            trg=ImageRecord(str(p["trg_id"]), p["trg_image"], category=p.get("category")),
            src_kps=np.asarray(p["src_kps"], dtype=np.float32),
            trg_kps=np.asarray(p["trg_kps"], dtype=np.float32),
            trg_bbox=tuple(float(v) for v in p["trg_bbox"]),
            category=p.get("category"),
        )

    return Records.from_sequence(repr(ds), ds, convert).head(n)


def pair_images(pairs: Iterable[PairRecord]) -> list[ImageRecord]:
    """The distinct images of ``pairs`` (first occurrence of each id, in order)."""
    seen: dict[str, ImageRecord] = {}
    for p in pairs:
        seen.setdefault(p.src.image_id, p.src)
        seen.setdefault(p.trg.image_id, p.trg)
    return list(seen.values())
