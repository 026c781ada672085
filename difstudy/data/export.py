"""Write the toy world in the layouts of real datasets.

The exporters here let the loaders of :mod:`difstudy.data.loaders` (and any
third-party code that reads the official layouts) run unchanged on toy data:

* :func:`to_spair` — SPair-71k (images, image/pair annotations, part masks, layout lists);
* :func:`to_ddpmseg` — DDPM-segmentation ``real/<split>/`` folders (png + npy mask);
* :func:`to_class_folders` — CIFAR-style ``<split>/<class>/*.png`` + ``classes.txt``;
* :func:`to_ade20k` — ADE20K SceneParsing (``ADEChallengeData2016/images|annotations/<split>/``);
* :func:`to_cifar10` — CIFAR-10's python batches (32 px worlds only);
* :func:`export_all` — the first three for the train/val/test splits;
* :func:`to_data_root` — SPair-71k, Horse-21, ADE20K and CIFAR-10 under one data root, in the
  folders ``difstudy data prepare`` uses (the rehearsal's stand-in for the real datasets).

Every file is written to a temporary name and moved into place with
:func:`os.replace`, so an interrupted export never leaves half-written files.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from difstudy.data.toyworld import CLASS_NAMES, SPLITS, ToySample, ToyWorld, local_part_mask

SPAIR_SPLIT_NAMES = {"train": "trn", "val": "val", "test": "test"}


# ----------------------------------------------------------------------------
# atomic writers
def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` by calling ``write(file)`` on a temporary sibling, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_image(path: Path, array: np.ndarray, **save_kw: Any) -> Path:
    """Save an image array; the format follows the suffix (``.jpg`` → JPEG, else PNG)."""
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return _atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt, **save_kw))


def _write_json(path: Path, obj: Any) -> Path:
    """Save ``obj`` as JSON."""
    return _atomic_write(path, lambda f: f.write(json.dumps(obj).encode("utf-8")))


def _write_lines(path: Path, lines: Sequence[str]) -> Path:
    """Save one string a line."""
    return _atomic_write(path, lambda f: f.write("".join(f"{ln}\n" for ln in lines).encode("utf-8")))


def _write_npy(path: Path, array: np.ndarray) -> Path:
    """Save an array in ``.npy`` format."""
    return _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _render(world: ToyWorld, desc: str, progress: bool) -> list[ToySample]:
    """Every sample of ``world``, rendered once (with a progress bar)."""
    return [world[i] for i in tqdm(range(len(world)), desc=desc, disable=not progress, leave=False)]


# ----------------------------------------------------------------------------
# SPair-71k
def _spair_image_annotation(s: ToySample) -> dict:
    """SPair-style ``ImageAnnotation`` record of one sample (``kps`` null where not visible)."""
    h, w = s.mask.shape
    x1, y1, x2, y2 = s.bbox
    kps = zip(s.keypoints.tolist(), s.visible.tolist(), strict=True)
    return dict(
        filename=f"{s.image_id}.jpg",
        src_database="difstudy-toyworld",
        category=s.class_name,
        image_width=w,
        image_height=h,
        pose="Left" if s.attributes["flip"] else "Right",
        truncated=int(x1 == 0 or y1 == 0 or x2 == w - 1 or y2 == h - 1),
        occluded=0,
        difficult=0,
        bndbox=[int(v) for v in s.bbox],
        kps={str(k): (xy if v else None) for k, (xy, v) in enumerate(kps)},
        keypoint_names=list(s.keypoint_names),
        caption=s.caption,
        fine_caption=s.fine_caption,
    )


def _spair_pair_annotation(pair_id: str, src: ToySample, trg: ToySample) -> dict:
    """Official SPair-71k pair record; only keypoints visible in both images are kept."""
    ids = np.flatnonzero(src.visible & trg.visible)
    src_ann, trg_ann = _spair_image_annotation(src), _spair_image_annotation(trg)
    area = [(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in (src.bbox, trg.bbox)]
    ratio = max(area) / max(1, min(area))
    occl = [bool((~s.visible).any()) for s in (src, trg)]
    return dict(
        pair_id=pair_id,
        filename=pair_id,
        src_imname=src_ann["filename"],
        trg_imname=trg_ann["filename"],
        src_imsize=[src.image.shape[1], src.image.shape[0], 3],
        trg_imsize=[trg.image.shape[1], trg.image.shape[0], 3],
        src_bndbox=src_ann["bndbox"],
        trg_bndbox=trg_ann["bndbox"],
        category=src.class_name,
        src_pose=src_ann["pose"],
        trg_pose=trg_ann["pose"],
        src_kps=[[float(x), float(y)] for x, y in src.keypoints[ids]],
        trg_kps=[[float(x), float(y)] for x, y in trg.keypoints[ids]],
        kps_ids=[str(int(k)) for k in ids],
        mirror=0,
        viewpoint_variation=int(src_ann["pose"] != trg_ann["pose"]),
        scale_variation=0 if ratio < 1.5 else (1 if ratio < 3 else 2),
        truncation=src_ann["truncated"] + 2 * trg_ann["truncated"],
        occlusion=int(occl[0]) + 2 * int(occl[1]),
    )


def _spair_write_images(samples: Sequence[ToySample], out: Path) -> None:
    """JPEG image (quality 95), image annotation and part-mask PNG of every sample."""
    for s in samples:
        _write_image(out / "JPEGImages" / s.class_name / f"{s.image_id}.jpg", s.image, quality=95, subsampling=0)
        _write_json(out / "ImageAnnotation" / s.class_name / f"{s.image_id}.json", _spair_image_annotation(s))
        _write_image(out / "Segmentation" / s.class_name / f"{s.image_id}.png", s.mask)


def _spair_write_pairs(
    samples: Sequence[ToySample], pairs: Sequence[tuple[int, int]], split: str, out: Path
) -> list[str]:
    """Pair annotations and the layout list of one split; returns the pair names."""
    names = []
    for k, (a, b) in enumerate(pairs):
        src, trg = samples[a], samples[b]
        name = f"{k + 1:06d}-{src.image_id}-{trg.image_id}:{src.class_name}"
        _write_json(out / "PairAnnotation" / split / f"{name}.json", _spair_pair_annotation(name, src, trg))
        names.append(name)
    _write_lines(out / "Layout" / "large" / f"{split}.txt", names)
    return names


def to_spair(world: ToyWorld, out: str | Path, n_pairs: int, seed: int = 0, progress: bool = True) -> Path:
    """Write ``world`` and ``world.pairs(n_pairs, seed)`` in the SPair-71k layout under ``out``.

    Files: ``JPEGImages/<class>/<image_id>.jpg`` (quality 95),
    ``ImageAnnotation/<class>/<image_id>.json``, ``Segmentation/<class>/<image_id>.png``
    (global part ids), ``PairAnnotation/<split>/<pair>.json`` and
    ``Layout/large/<split>.txt`` with split names train→trn, val→val, test→test.
    Returns ``out``.
    """
    out = Path(out)
    samples = _render(world, f"spair {world.split}", progress)
    _spair_write_images(samples, out)
    _spair_write_pairs(samples, world.pairs(n_pairs, seed), SPAIR_SPLIT_NAMES[world.split], out)
    return out


# ----------------------------------------------------------------------------
# DDPM-segmentation and class folders
def to_ddpmseg(world: ToyWorld, out: str | Path, class_name: str | None = None, progress: bool = True) -> Path:
    """Write ``world`` as DDPM-segmentation folders: ``<out>/real/<split>/<image_id>.png`` + ``.npy`` mask.

    With ``class_name`` only that class is kept and masks hold class-local part
    ids (0 background, 1..P, see :func:`toyworld.local_part_mask`); otherwise
    masks hold the global part ids. The official data has only train/test; a
    val world is written to ``real/val/``. Returns the split folder.
    """
    return _to_ddpmseg(_render(world, f"ddpmseg {world.split}", progress), world.split, Path(out), class_name)


def _to_ddpmseg(samples: Sequence[ToySample], split: str, out: Path, class_name: str | None) -> Path:
    """:func:`to_ddpmseg` on already rendered samples."""
    if class_name is not None and class_name not in CLASS_NAMES:
        raise ValueError(f"unknown toy-world class {class_name!r}; use one of {CLASS_NAMES}")
    folder = out / "real" / split
    folder.mkdir(parents=True, exist_ok=True)
    for s in samples:
        if class_name is not None and s.class_name != class_name:
            continue
        mask = s.mask if class_name is None else local_part_mask(s.mask, s.label)
        _write_image(folder / f"{s.image_id}.png", s.image)
        _write_npy(folder / f"{s.image_id}.npy", mask.astype(np.uint8))
    return folder


def to_class_folders(world: ToyWorld, out: str | Path, progress: bool = True) -> Path:
    """Write ``world`` as ``<out>/<split>/<class>/<image_id>.png`` plus ``<out>/classes.txt``; returns ``out``."""
    return _to_class_folders(_render(world, f"classes {world.split}", progress), world.split, Path(out))


def _to_class_folders(samples: Sequence[ToySample], split: str, out: Path) -> Path:
    """:func:`to_class_folders` on already rendered samples."""
    _write_lines(out / "classes.txt", CLASS_NAMES)
    for s in samples:
        _write_image(out / split / s.class_name / f"{s.image_id}.png", s.image)
    return out


ADE20K_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "validation"}


def to_ade20k(world: ToyWorld, out: str | Path, progress: bool = True) -> Path:
    """Write ``world`` in ADE20K's layout under ``out/ADEChallengeData2016``: images as JPEG and
    annotation PNGs where 1 is the background and ``2 + label`` the object (0, ADE20K's "other",
    is not used), so the loader's ``raw - 1`` gives 0 background and ``1 + label`` as
    :func:`~difstudy.protocols.toy_records` ``target="object"`` does. val and test both go to
    ``validation`` (ADE20K has two splits). Returns the dataset folder."""
    base = Path(out) / "ADEChallengeData2016"
    split = ADE20K_SPLIT_NAMES[world.split]
    for s in _render(world, f"ade20k {world.split}", progress):
        _write_image(base / "images" / split / f"{s.image_id}.jpg", s.image, quality=95)
        ann = np.where(s.mask > 0, s.label + 2, 1).astype(np.uint8)
        _write_image(base / "annotations" / split / f"{s.image_id}.png", ann)
    return base


def to_cifar10(world: ToyWorld, out: str | Path, progress: bool = True) -> Path:
    """Write ``world`` (32 px) as CIFAR-10's python batches under ``out/cifar-10-batches-py``: the
    train split over ``data_batch_1`` .. ``data_batch_5``, val or test as ``test_batch``, and
    ``batches.meta`` with the toy world's class names. Returns the dataset folder."""
    if world.size != 32:
        raise ValueError(f"CIFAR-10 images are 32 px; render the world with size=32, not {world.size}")
    base = Path(out) / "cifar-10-batches-py"
    samples = _render(world, f"cifar10 {world.split}", progress)
    data = np.stack([s.image.transpose(2, 0, 1).reshape(-1) for s in samples]).astype(np.uint8)
    labels = [int(s.label) for s in samples]
    files = [f"data_batch_{k}" for k in range(1, 6)] if world.split == "train" else ["test_batch"]
    for name, idx in zip(files, np.array_split(np.arange(len(samples)), len(files))):
        batch = {b"batch_label": name.encode(), b"labels": [labels[i] for i in idx], b"data": data[idx]}
        _atomic_write(base / name, lambda f, batch=batch: pickle.dump(batch, f))
    meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": len(samples)}
    _atomic_write(base / "batches.meta", lambda f: pickle.dump(meta, f))
    return base


def to_data_root(
    out: str | Path, n: int = 40, size: int = 64, seg_class: str = "bird", n_pairs: int = 20, progress: bool = True
) -> Path:
    """The toy world under one data root in the folders of the real datasets
    (:data:`difstudy.data.prepare.DATASETS`): ``SPair-71k`` (``n_pairs`` pairs per split),
    ``ddpm-segmentation/horse_21`` (``seg_class`` only, class-local part ids, train and test),
    ``ADEChallengeData2016`` and ``cifar-10-batches-py`` (32 px); ``n`` images per split."""
    out = Path(out)
    for split in SPLITS:
        world = ToyWorld(split, n=n, size=size)
        to_spair(world, out / "SPair-71k", n_pairs=n_pairs, progress=progress)
        to_ade20k(world, out, progress=progress)
        if split != "val":
            seg = ToyWorld(split, n=n * len(CLASS_NAMES), size=size)
            to_ddpmseg(seg, out / "ddpm-segmentation" / "horse_21", class_name=seg_class, progress=progress)
            to_cifar10(ToyWorld(split, n=n, size=32), out, progress=progress)
    return out


# ----------------------------------------------------------------------------
def export_all(
    out: str | Path,
    n: int | None = 100,
    size: int = 64,
    seed: int = 0,
    n_pairs: int = 50,
    progress: bool = True,
) -> dict[str, Path]:
    """Export ``n`` images per split (None: the toy world's default split sizes) in all three layouts.

    Writes ``<out>/spair/`` (:func:`to_spair`, ``n_pairs`` pairs per split),
    ``<out>/ddpmseg/`` (:func:`to_ddpmseg`, global part ids) and
    ``<out>/classes/`` (:func:`to_class_folders`) for train, val and test;
    prints a short summary and returns ``{"spair": ..., "ddpmseg": ..., "classes": ...}``.
    """
    out = Path(out)
    paths = {"spair": out / "spair", "ddpmseg": out / "ddpmseg", "classes": out / "classes"}
    counts = {}
    for split in SPLITS:
        world = ToyWorld(split, n=n, size=size, seed=seed)
        samples = _render(world, f"toy world {split}", progress)
        _spair_write_images(samples, paths["spair"])
        pairs = world.pairs(n_pairs, seed)
        _spair_write_pairs(samples, pairs, SPAIR_SPLIT_NAMES[split], paths["spair"])
        _to_ddpmseg(samples, split, paths["ddpmseg"], None)
        _to_class_folders(samples, split, paths["classes"])
        counts[split] = (len(samples), len(pairs))
    print(f"toy world (seed {seed}, {size}x{size}) exported to {out}")
    for split, (n_images, n_made) in counts.items():
        print(f"  {split:5s}: {n_images} images, {n_made} pairs")
    for kind, path in paths.items():
        print(f"  {kind:7s} -> {path}")
    return paths
