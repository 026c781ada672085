"""Loaders for the real datasets difstudy evaluates on, and a factory.

Each loader is a small random-access sequence (``len`` and indexing) over the
*official* folder layout of one dataset. Items are plain dicts; every image is
an RGB ``uint8`` array of shape (H, W, 3) and every label map an ``int64``
array of shape (H, W). Nothing is downloaded here: a missing or malformed
folder raises :class:`~difstudy.errors.DatasetError` naming the path, the
layout that was expected and the official download page, and a corrupt file
raises it naming the file.

Image ids are namespaced, ``"<dataset>/<split>/<path below the split folder>"``
without the file suffix (SPair-71k: ``"spair/<category>/<name>"``, since its
images are shared by the splits' pairs), so that ids are unique across splits
and datasets: the feature cache is keyed by them, and two images that shared
an id would share features (a test image served its train namesake's).

The toy world can be written in the same layouts with
:mod:`difstudy.data.export`, so every loader here also reads toy data.

Kinds accepted by :func:`load_dataset`:

- ``spair``: :class:`SPair71k` (semantic correspondence pairs)
- ``ddpmseg``: :class:`DDPMSeg` (few-shot segmentation folders)
- ``horse21`` / ``bedroom28``: :meth:`DDPMSeg.horse21` / :meth:`DDPMSeg.bedroom28`
- ``ade20k``: :class:`ADE20K` (SceneParsing, 150 classes)
- ``cityscapes``: :class:`Cityscapes` (19 train ids)
- ``cifar10``: :class:`CIFAR10` (python pickles)
- ``classfolders``: :class:`ClassFolders` (``<split>/<class>/*.png``)
- ``toyworld``: :class:`~difstudy.data.toyworld.ToyWorld`
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

SPAIR_URL = "https://cvlab.postech.ac.kr/research/SPair-71k/"
HYPERFEATURES_URL = "https://github.com/diffusion-hyperfeatures/diffusion_hyperfeatures (annotations/*.json)"
DDPMSEG_URL = "https://github.com/yandex-research/ddpm-segmentation (datasets/download_datasets.sh)"
ADE20K_URL = "http://sceneparsing.csail.mit.edu/ (ADEChallengeData2016.zip)"
CITYSCAPES_URL = (
    "https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; "
    "make the *_gtFine_labelTrainIds.png files with cityscapesscripts' createTrainIdLabelImgs)"
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz)"
CLASSFOLDERS_SOURCE = "any CIFAR-style export, e.g. difstudy.data.export.to_class_folders"

SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip
HORSE21_CLASSES = (
    "background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head", "hoof",
    "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder", "leg protection",
)  # fmt: skip
BEDROOM28_CLASSES = (
    "background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling",
    "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser",
    "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall",
    "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth",
    "door / door frame", "pouf", "wardrobe", "plant", "table staff",
)  # fmt: skip
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASET_KINDS = (
    "spair", "horse21", "bedroom28", "ddpmseg", "ade20k", "cityscapes", "cifar10", "classfolders", "toyworld",
)  # fmt: skip


# ----------------------------------------------------------------------------
# file readers: every failure becomes a DatasetError naming the file
def _missing(what: str, path: Path, expected: str, source: str) -> DatasetError:
    """A DatasetError for a missing or incomplete folder."""
    return DatasetError(f"{what} not found at {path}: expected {expected}; the data comes from {source}")


def _require_dirs(what: str, root: Path, dirs: Sequence[Path], expected: str, source: str) -> None:
    """Raise a DatasetError unless ``root`` and every folder in ``dirs`` exist."""
    for d in (root, *dirs):
        if not d.is_dir():
            raise _missing(what, d, expected if d != root else f"a folder holding {expected}", source)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image file as RGB ``uint8`` (H, W, 3); a missing or corrupt file raises DatasetError."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"image file missing: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"corrupt or unreadable image file {path}: {e}") from e


def read_label_png(path: Path | str) -> np.ndarray:
    """Read a single-channel label map (L, P or I mode PNG) as ``int64`` (H, W)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode, label = im.mode, np.array(im, dtype=np.int64)
    except FileNotFoundError as e:
        raise DatasetError(f"label map missing: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"corrupt or unreadable label map {path}: {e}") from e
    if label.ndim != 2:
        raise DatasetError(f"label map {path} has mode {mode!r}; expected a single-channel (L/P/I) PNG")
    return label


def _read_npy(path: Path) -> np.ndarray:
    """Load a ``.npy`` array (no pickles); a missing or corrupt file raises DatasetError."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DatasetError(f"mask file missing: {path}") from e
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"corrupt or unreadable .npy mask {path}: {e}") from e


def _read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file raises DatasetError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"annotation file missing: {path}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"malformed JSON in {path}: {e}") from e


def _read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read list file {path}: {e}") from e


def _points(value: Any) -> np.ndarray:
    """``[[x, y], ...]`` as float32 (N, 2); raises ValueError on another shape."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 2), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected a list of [x, y] points, got shape {arr.shape}")
    return arr


def _box(value: Any) -> np.ndarray:
    """``[x1, y1, x2, y2]`` as float32 (4,); raises ValueError on another shape."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (4,):
        raise ValueError(f"expected a box [x1, y1, x2, y2], got shape {arr.shape}")
    return arr


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def image_id(dataset: str, split: str | None, path: Path | str, base: Path | None = None) -> str:
    """Namespaced image id ``"<dataset>/<split>/<path below base, no suffix>"`` (no split part when None)."""
    rel = Path(path).relative_to(base) if base is not None else Path(path)
    parts = [dataset] + ([split] if split is not None else []) + [rel.with_suffix("").as_posix()]
    return "/".join(parts)


def _check_same_size(image: np.ndarray, mask: np.ndarray, mask_path: Path) -> None:
    """Raise DatasetError unless ``mask`` is (H, W) for the (H, W, 3) ``image``."""
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"mask {mask_path} has shape {mask.shape}, but its image is {image.shape[:2]}")


# ----------------------------------------------------------------------------
# SPair-71k
_SPAIR_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "test": "test"}
_SPAIR_KEYS = ("src_imname", "trg_imname", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox", "category")
_HYPER_KEYS = ("source_path", "target_path", "source_points", "target_points")


class SPair71k:
    """SPair-71k semantic-correspondence pairs (Min et al., 2019), from
    https://cvlab.postech.ac.kr/research/SPair-71k/ .

    Official layout under ``root`` (the ``SPair-71k`` folder)::

        JPEGImages/<category>/<name>.jpg
        PairAnnotation/{trn,val,test}/<pair>.json   # src_imname, trg_imname, src_kps, trg_kps,
                                                    # src_bndbox, trg_bndbox, category, kps_ids, ...
        Layout/large/{trn,val,test}.txt             # lines "ID-srcname-trgname:category" (optional)

    ``split`` is ``"train"``/``"trn"``, ``"val"`` or ``"test"``; ``category``
    keeps one category. Pairs follow the layout file when there is one, else
    the sorted annotation files. Each item is a dict with ``pair_id``,
    ``category``, ``src_image``/``trg_image`` (RGB uint8), ``src_kps``/``trg_kps``
    (N, 2) float32 x, y pixels (row k of both is one correspondence),
    ``src_bbox``/``trg_bbox`` (4,) float32 ``[x1, y1, x2, y2]`` and
    ``src_id``/``trg_id`` (``"spair/<category>/<name>"``, the same image having
    the same id in every split). Annotations are parsed on access.
    """

    def __init__(self, root: str | Path, split: str = "test", category: str | None = None):
        if split not in _SPAIR_SPLITS:
            raise ValueError(f"unknown SPair-71k split {split!r}; use one of {sorted(_SPAIR_SPLITS)}")
        root = Path(root)
        ann_dir = root / "PairAnnotation" / _SPAIR_SPLITS[split]
        expected = f"JPEGImages/ and PairAnnotation/{ann_dir.name}/"
        _require_dirs("SPair-71k", root, [root / "JPEGImages", ann_dir], expected, SPAIR_URL)
        class_names = tuple(sorted(d.name for d in (root / "JPEGImages").iterdir() if d.is_dir()))
        entries: list[Path | dict] = list(_spair_pair_files(root, ann_dir))
        if not entries:
            raise DatasetError(f"no pair annotations in {ann_dir}: expected <pair>.json files; see {SPAIR_URL}")
        if category is not None:
            if category not in class_names:
                raise DatasetError(
                    f"SPair-71k category {category!r} not found under {root / 'JPEGImages'}; "
                    f"available: {', '.join(class_names)}"
                )
            entries = [p for p in entries if _spair_file_category(p) == category]
        self._setup(root, root / "JPEGImages", ann_dir.name, category, entries, class_names)

    def _setup(
        self,
        root: Path,
        image_root: Path,
        split: str,
        category: str | None,
        entries: list[Path | dict],
        class_names: tuple[str, ...],
    ) -> None:
        """Set the attributes shared by both constructors."""
        self.root, self.image_root, self.split, self.category = root, image_root, split, category
        self._entries = entries
        self.class_names = class_names
        self.num_classes = len(class_names)

    @classmethod
    def from_hyperfeatures_json(
        cls, json_path: str | Path, image_root: str | Path, category: str | None = None
    ) -> SPair71k:
        """Pairs from a Diffusion Hyperfeatures list, e.g. ``annotations/spair_71k_test-360.json`` of
        https://github.com/diffusion-hyperfeatures/diffusion_hyperfeatures .

        The file is a JSON list of dicts with ``source_path``/``target_path``
        (relative to ``image_root``; a bare file name is also looked up under
        ``image_root/<category>/`` and ``image_root/JPEGImages/<category>/``),
        ``source_points``/``target_points`` ``[[x, y], ...]``, ``category`` and
        ``source_bounding_box``/``target_bounding_box``. Items are the same
        dicts as for the official layout; ``pair_id`` is
        ``"<index>-<src>-<trg>:<category>"``.
        """
        json_path, image_root = Path(json_path), Path(image_root)
        if not image_root.is_dir():
            raise _missing("SPair-71k image folder", image_root, "the SPair-71k images (e.g. JPEGImages/)", SPAIR_URL)
        data = _read_json(json_path)
        if not isinstance(data, list):
            raise DatasetError(f"malformed pair list {json_path}: expected a JSON list; see {HYPERFEATURES_URL}")
        entries = [_hyperfeatures_record(i, d, json_path, image_root) for i, d in enumerate(data)]
        if category is not None:
            entries = [e for e in entries if e["category"] == category]
        class_names = tuple(sorted({e["category"] for e in entries}))
        obj = cls.__new__(cls)
        obj._setup(image_root, image_root, json_path.stem, category, entries, class_names)
        return obj

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SPair71k(root={str(self.root)!r}, split={self.split!r}, category={self.category!r}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        entry = self._entries[i]
        rec = _spair_record(entry, self.image_root) if isinstance(entry, Path) else entry
        src, trg = read_image(rec["src_path"]), read_image(rec["trg_path"])
        for side, image in (("src", src), ("trg", trg)):
            size = rec.get(f"{side}_imsize")
            if size is not None and tuple(size) != image.shape[1::-1]:
                raise DatasetError(
                    f"{rec[f'{side}_path']} is {image.shape[1]}x{image.shape[0]} but pair {rec['pair_id']} "
                    f"says {size[0]}x{size[1]} ({rec.get('ann_path', 'annotation')})"
                )
        return dict(
            pair_id=rec["pair_id"],
            category=rec["category"],
            src_image=src,
            trg_image=trg,
            src_kps=rec["src_kps"],
            trg_kps=rec["trg_kps"],
            src_bbox=rec["src_bbox"],
            trg_bbox=rec["trg_bbox"],
            src_id=self._image_id(rec["src_path"], rec["category"]),
            trg_id=self._image_id(rec["trg_path"], rec["category"]),
        )

    def _image_id(self, path: Path, category: str) -> str:
        """``"spair/<category>/<name>"`` (the path below the image root when the file lies under it)."""
        path = Path(path)
        try:
            rel = path.relative_to(self.image_root)
        except ValueError:  # a hyperfeatures list may point outside image_root
            rel = Path(category) / path.name
        if rel.parts[0] == "JPEGImages":  # image_root given as the SPair-71k folder
            rel = rel.relative_to("JPEGImages")
        return image_id("spair", None, rel)


def _spair_pair_files(root: Path, ann_dir: Path) -> list[Path]:
    """Pair annotation files in layout order (``Layout/large/<split>.txt``), else sorted."""
    layout = root / "Layout" / "large" / f"{ann_dir.name}.txt"
    if layout.is_file():
        return [ann_dir / f"{line}.json" for line in _read_lines(layout)]
    return sorted(ann_dir.glob("*.json"))


def _spair_file_category(path: Path) -> str:
    """Category of a pair file: the ``:category`` suffix of its name, else its JSON."""
    if ":" in path.stem:
        return path.stem.rsplit(":", 1)[1]
    data = _read_json(path)
    return str(data.get("category")) if isinstance(data, dict) else ""


def _spair_record(path: Path, image_root: Path) -> dict:
    """Parse one official pair annotation into the normalised record used by ``__getitem__``."""
    data = _read_json(path)
    try:
        missing = [k for k in _SPAIR_KEYS if k not in data]
        if missing:
            raise KeyError(f"missing keys {missing}")
        cat = str(data["category"])
        rec = dict(
            pair_id=path.stem,
            category=cat,
            src_path=image_root / cat / str(data["src_imname"]),
            trg_path=image_root / cat / str(data["trg_imname"]),
            src_kps=_points(data["src_kps"]),
            trg_kps=_points(data["trg_kps"]),
            src_bbox=_box(data["src_bndbox"]),
            trg_bbox=_box(data["trg_bndbox"]),
            src_imsize=_imsize(data.get("src_imsize")),
            trg_imsize=_imsize(data.get("trg_imsize")),
            ann_path=str(path),
        )
        if len(rec["src_kps"]) != len(rec["trg_kps"]):
            raise ValueError(f"{len(rec['src_kps'])} source but {len(rec['trg_kps'])} target keypoints")
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(
            f"malformed SPair-71k pair annotation {path}: {e}; expected keys {', '.join(_SPAIR_KEYS)} ({SPAIR_URL})"
        ) from e
    return rec


def _imsize(value: Any) -> tuple[int, int] | None:
    """``[W, H, C]`` (or ``[W, H]``) as ``(W, H)``; None when absent."""
    if not value:
        return None
    return int(value[0]), int(value[1])


def _hyperfeatures_record(i: int, d: Any, json_path: Path, image_root: Path) -> dict:
    """Normalise entry ``i`` of a Diffusion Hyperfeatures pair list."""
    try:
        if not isinstance(d, dict):
            raise TypeError(f"entry is a {type(d).__name__}, not an object")
        missing = [k for k in _HYPER_KEYS if k not in d]
        if missing:
            raise KeyError(f"missing keys {missing}")
        cat = str(d.get("category") or Path(d["source_path"]).parent.name)
        src = _resolve_image(image_root, str(d["source_path"]), cat)
        trg = _resolve_image(image_root, str(d["target_path"]), cat)
        src_kps, trg_kps = _points(d["source_points"]), _points(d["target_points"])
        if len(src_kps) != len(trg_kps):
            raise ValueError(f"{len(src_kps)} source but {len(trg_kps)} target points")
        return dict(
            pair_id=f"{i:06d}-{src.stem}-{trg.stem}:{cat}",
            category=cat,
            src_path=src,
            trg_path=trg,
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_bbox=_box(d.get("source_bounding_box", [np.nan] * 4)),
            trg_bbox=_box(d.get("target_bounding_box", [np.nan] * 4)),
            ann_path=f"{json_path} entry {i}",
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(
            f"malformed pair {i} in {json_path}: {e}; expected keys {', '.join(_HYPER_KEYS)} ({HYPERFEATURES_URL})"
        ) from e


def _resolve_image(image_root: Path, rel: str, category: str) -> Path:
    """First existing of ``image_root/rel``, ``image_root/category/rel``, ``image_root/JPEGImages/category/rel``."""
    candidates = [image_root / rel, image_root / category / rel, image_root / "JPEGImages" / category / rel]
    return next((p for p in candidates if p.is_file()), candidates[0])


# ----------------------------------------------------------------------------
# segmentation folders
class DDPMSeg:
    """Few-shot segmentation folders of DDPM-segmentation (Baranchuk et al., 2022), from
    https://github.com/yandex-research/ddpm-segmentation (``datasets/download_datasets.sh``).

    Layout: ``<root>/real/{train,test}/`` holding images (png/jpg, found
    recursively, sorted by path) and, next to each, a mask with the same stem
    and a ``.npy`` extension (H, W integer class ids). ``root`` is a dataset
    folder such as ``datasets/horse_21`` (or its ``real/`` folder). Items are
    dicts ``image_id`` (``"<name>/<split>/<path below the split folder>"``, no
    suffix; ``name`` defaults to the dataset folder's name), ``image``, ``mask``
    (H, W) int64. Presets: :meth:`horse21`, :meth:`bedroom28`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
    ):
        root = Path(root)
        self.name = name or (root.parent.name if root.name == "real" else root.name) or "ddpmseg"
        folder = root / "real" / split
        if not folder.is_dir() and (root / split).is_dir() and root.name == "real":
            folder = root / split
        expected = f"real/{split}/ with images and .npy masks"
        _require_dirs("DDPM-segmentation dataset", root, [folder], expected, DDPMSEG_URL)
        self.root, self.split, self.folder = root, split, folder
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self.image_paths = _list_images(folder)
        if not self.image_paths:
            raise DatasetError(f"no images in {folder}: expected *.png/*.jpg with *.npy masks; see {DDPMSEG_URL}")
        missing = [p for p in self.image_paths if not p.with_suffix(".npy").is_file()]
        if missing:
            example = missing[0].with_suffix(".npy")
            raise DatasetError(f"{len(missing)} image(s) in {folder} lack a .npy mask, e.g. {example}")

    @classmethod
    def horse21(cls, root: str | Path, split: str = "train") -> DDPMSeg:
        """Horse-21 (LSUN horses): 21 classes, ignore 255."""
        return cls(root, split, num_classes=21, ignore_index=255, class_names=HORSE21_CLASSES, name="horse21")

    @classmethod
    def bedroom28(cls, root: str | Path, split: str = "train") -> DDPMSeg:
        """Bedroom-28 (LSUN bedrooms): 29 ids with 0 the unlabelled background, ignored."""
        return cls(root, split, num_classes=29, ignore_index=0, class_names=BEDROOM28_CLASSES, name="bedroom28")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"DDPMSeg(root={str(self.root)!r}, split={self.split!r}, num_classes={self.num_classes}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        path = self.image_paths[i]
        image = read_image(path)
        mask_path = path.with_suffix(".npy")
        mask = _read_npy(mask_path)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        _check_same_size(image, mask, mask_path)
        iid = image_id(self.name, self.split, path, self.folder)
        return dict(image_id=iid, image=image, mask=mask.astype(np.int64))


class ADE20K:
    """ADE20K SceneParsing benchmark (150 classes), from
    http://sceneparsing.csail.mit.edu/ (``ADEChallengeData2016.zip``).

    Layout: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
    ``ADEChallengeData2016/annotations/{training,validation}/*.png``; ``root``
    is that folder or its parent. Label 0 ("other") becomes ``ignore_index``
    255 and labels 1..150 are shifted to 0..149 (``reduce_zero_label``).
    ``split`` also accepts ``"train"``/``"val"``. Items: ``image_id``
    (``"ade20k/<split>/<stem>"``), ``image``, ``mask`` (H, W) int64.
    """

    num_classes = 150
    ignore_index = 255
    class_names = ADE20K_CLASSES

    def __init__(self, root: str | Path, split: str = "training"):
        split = {"train": "training", "val": "validation"}.get(split, split)
        if split not in ("training", "validation"):
            raise ValueError(f"unknown ADE20K split {split!r}; use 'training' or 'validation'")
        root = Path(root)
        base = root if (root / "images").is_dir() else root / "ADEChallengeData2016"
        img_dir, ann_dir = base / "images" / split, base / "annotations" / split
        expected = f"ADEChallengeData2016/images/{split}/ and ADEChallengeData2016/annotations/{split}/"
        _require_dirs("ADE20K", root, [img_dir, ann_dir], expected, ADE20K_URL)
        self.root, self.split = root, split
        self.image_paths = sorted(img_dir.glob("*.jpg"))
        self.label_paths = [ann_dir / f"{p.stem}.png" for p in self.image_paths]
        _check_pairs("ADE20K", img_dir, self.image_paths, self.label_paths, ADE20K_URL)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"ADE20K(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.image_paths[i])
        raw = read_label_png(self.label_paths[i])
        _check_same_size(image, raw, self.label_paths[i])
        mask = raw - 1
        mask[raw == 0] = self.ignore_index
        return dict(image_id=image_id("ade20k", self.split, self.image_paths[i].name), image=image, mask=mask)


class Cityscapes:
    """Cityscapes fine annotations with the 19 training ids, from
    https://www.cityscapes-dataset.com/downloads/ (``gtFine`` + ``leftImg8bit``; train-id label maps
    come from cityscapesscripts' ``createTrainIdLabelImgs``).

    Layout under ``root``: ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png``
    and ``gtFine/{train,val,test}/<city>/*_gtFine_labelTrainIds.png`` (ids
    0..18, 255 ignore). Items: ``image_id`` (e.g.
    ``cityscapes/train/aachen_000000_000019``), ``image``, ``mask`` (H, W) int64.
    """

    num_classes = 19
    ignore_index = 255
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train"):
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown Cityscapes split {split!r}; use 'train', 'val' or 'test'")
        root = Path(root)
        img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        expected = f"leftImg8bit/{split}/<city>/ and gtFine/{split}/<city>/"
        _require_dirs("Cityscapes", root, [img_dir, gt_dir], expected, CITYSCAPES_URL)
        self.root, self.split = root, split
        self.image_paths = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        self.label_paths = [
            gt_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
            for p in self.image_paths
        ]
        _check_pairs("Cityscapes", img_dir, self.image_paths, self.label_paths, CITYSCAPES_URL)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"Cityscapes(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.image_paths[i])
        mask = read_label_png(self.label_paths[i])
        _check_same_size(image, mask, self.label_paths[i])
        stem = self.image_paths[i].name.removesuffix("_leftImg8bit.png")
        return dict(image_id=f"cityscapes/{self.split}/{stem}", image=image, mask=mask)


def _check_pairs(what: str, img_dir: Path, images: list[Path], labels: list[Path], source: str) -> None:
    """Raise DatasetError when ``img_dir`` holds no images or an image lacks its label file."""
    if not images:
        raise DatasetError(f"no {what} images in {img_dir}; see {source}")
    missing = [p for p in labels if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} {what} label file(s) missing, e.g. {missing[0]}; see {source}")


# ----------------------------------------------------------------------------
# classification
class CIFAR10:
    """CIFAR-10, python version, from
    https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-10-python.tar.gz``).

    ``root`` is the ``cifar-10-batches-py/`` folder or its parent. Train
    reads ``data_batch_1`` .. ``data_batch_5``, test reads ``test_batch``
    (pickles with ``b"data"`` N x 3072 uint8, channel-major, and
    ``b"labels"``); class names come from ``batches.meta`` (``b"label_names"``).
    Pickles run code when loaded: only point this at files you trust. All
    images are held in memory (180 MB for train). Items: ``image_id``
    (``"cifar10/<split>/<index>"``), ``image`` (32, 32, 3), ``label``.
    """

    ignore_index = None

    def __init__(self, root: str | Path, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"unknown CIFAR-10 split {split!r}; use 'train' or 'test'")
        root = Path(root)
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
        expected = f"cifar-10-batches-py/ with {', '.join(names)} and batches.meta"
        for name in names:
            if not (base / name).is_file():
                raise _missing("CIFAR-10 batch", base / name, expected, CIFAR10_URL)
        batches = [_cifar_batch(base / n) for n in names]
        self.root, self.split = root, split
        self.images = np.concatenate([b[0] for b in batches])
        self.labels = np.concatenate([b[1] for b in batches])
        self.class_names = _cifar_class_names(base / "batches.meta")
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"CIFAR10(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {self!r}")
        i = i % len(self)
        return dict(image_id=f"cifar10/{self.split}/{i:05d}", image=self.images[i], label=int(self.labels[i]))


def _unpickle(path: Path) -> Any:
    """Load a CIFAR python pickle (``encoding="bytes"``), wrapping any failure in DatasetError."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError as e:
        raise DatasetError(f"CIFAR-10 file missing: {path}") from e
    except Exception as e:  # unpickling a bad file can raise nearly anything
        raise DatasetError(f"corrupt CIFAR-10 pickle {path}: {type(e).__name__}: {e}") from e


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of one CIFAR batch file."""
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data has shape {data.shape} for {len(labels)} labels; expected (N, 3072)")
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed CIFAR-10 batch {path}: {e}; expected keys b'data' and b'labels'") from e
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _cifar_class_names(meta: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (the standard ten when the file is absent)."""
    if not meta.is_file():
        return CIFAR10_CLASSES
    d = _unpickle(meta)
    try:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in d[b"label_names"])
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise DatasetError(f"malformed CIFAR-10 meta file {meta}: {e}; expected key b'label_names'") from e


class ClassFolders:
    """Images in class folders, CIFAR-export style: ``<root>/<split>/<class_name>/*.png`` (or jpg).

    Class order is the lines of ``<root>/classes.txt`` (or
    ``<root>/<split>/classes.txt``) when present, so labels agree across
    splits even if a split lacks a class; otherwise the sorted folder names.
    Items: ``image_id`` (``"classfolders/<split>/<class>/<path below it>"``, no
    suffix), ``image``, ``label``.
    """

    ignore_index = None

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        split_dir = root / split
        _require_dirs("class-folder dataset", root, [split_dir], f"{split}/<class_name>/*.png", CLASSFOLDERS_SOURCE)
        folders = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        listing = next((p for p in (root / "classes.txt", split_dir / "classes.txt") if p.is_file()), None)
        class_names = tuple(_read_lines(listing)) if listing else tuple(folders)
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise DatasetError(f"class folder(s) {unknown} in {split_dir} are not listed in {listing}")
        self.root, self.split, self.split_dir = root, split, split_dir
        self.class_names, self.num_classes = class_names, len(class_names)
        self.samples = [(p, label) for label, name in enumerate(class_names) for p in _list_images(split_dir / name)]
        if not self.samples:
            raise DatasetError(f"no images in {split_dir}: expected <class_name>/*.png; see {CLASSFOLDERS_SOURCE}")

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ClassFolders(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        iid = image_id("classfolders", self.split, path, self.split_dir)
        return dict(image_id=iid, image=read_image(path), label=label)


# ----------------------------------------------------------------------------
def _factories() -> dict[str, Callable[..., Any]]:
    """Constructor for every dataset kind, called as ``f(root, **kw)``."""
    return {
        "spair": SPair71k,
        "horse21": DDPMSeg.horse21,
        "bedroom28": DDPMSeg.bedroom28,
        "ddpmseg": DDPMSeg,
        "ade20k": ADE20K,
        "cityscapes": Cityscapes,
        "cifar10": CIFAR10,
        "classfolders": ClassFolders,
        "toyworld": lambda root, **kw: ToyWorld(**kw),
    }


def load_dataset(kind: str, root: str | Path | None = None, **kw: Any) -> Any:
    """Open dataset ``kind`` (one of ``DATASET_KINDS``) at ``root``; ``kw`` go to its constructor.

    ``load_dataset("spair", "data/SPair-71k", split="test")``,
    ``load_dataset("toyworld", split="val", n=100)`` (``root`` unused).
    """
    factories = _factories()
    key = kind.lower()
    if key not in factories:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    if root is None and key != "toyworld":
        raise ValueError(f"dataset kind {kind!r} needs a root folder")
    return factories[key](root, **kw)
