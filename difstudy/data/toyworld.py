"""Toy world: a seeded procedural dataset with dense ground truth.

Every image holds one object of one of ten classes, drawn from named parts
(polygons in a canonical frame) with a random pose (position, scale, rotation,
horizontal flip), colours, part proportions and a background whose detail is
set by a per-image *complexity* level (0 plain ... 3 cluttered).

Each sample carries the class label, a part mask with **global** part ids
(0 is background; ids are consistent across instances of a class), named
keypoints with visibility, a bounding box, a generic caption
("a photo of a bird") and a fine-grained caption built from the attributes.

Samples are addressed by ``(seed, split, index)`` and rendered on demand, so a
split is a deterministic, random-access sequence: ``ToyWorld("test")[7]`` is
the same picture on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2000, "val": 300, "test": 300}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 50, 170),
    "pink": (240, 140, 180),
    "brown": (120, 75, 40),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "gray": (128, 128, 128),
}
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "cluttered")


# ----------------------------------------------------------------------------
# geometry helpers (canonical frame: x right, y down, object inside [-1, 1]^2)
def _ellipse(cx, cy, rx, ry, angle=0.0, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts + np.array([cx, cy])


def _rect(cx, cy, w, h, angle=0.0):
    pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])


def _poly(*pts):
    return np.array(pts, dtype=float)


@dataclass(frozen=True)
class PartSpec:
    name: str
    polygons: tuple  # tuple of (N, 2) arrays in canonical coordinates


@dataclass(frozen=True)
class ClassSpec:
    name: str
    parts: tuple[PartSpec, ...]  # in drawing order (later parts cover earlier)
    keypoints: tuple[tuple[str, str, tuple[float, float]], ...]  # (name, part, (x, y))
    default_colours: tuple[str, ...] = field(default=())


def _classes() -> tuple[ClassSpec, ...]:
    P = PartSpec
    return (
        ClassSpec(
            "bird",
            (
                P("tail", (_poly((-0.45, -0.05), (-0.95, -0.32), (-0.95, 0.18)),)),
                P("legs", (_rect(0.0, 0.5, 0.08, 0.36), _rect(0.22, 0.5, 0.08, 0.36))),
                P("body", (_ellipse(0, 0, 0.55, 0.35),)),
                P("head", (_ellipse(0.55, -0.35, 0.23, 0.23),)),
                P("beak", (_poly((0.72, -0.43), (0.98, -0.33), (0.72, -0.25)),)),
                P("wing", (_ellipse(-0.08, -0.03, 0.36, 0.17, -0.3),)),
            ),
            (
                ("beak tip", "beak", (0.9, -0.34)),
                ("crown", "head", (0.52, -0.5)),
                ("tail tip", "tail", (-0.88, -0.07)),
                ("wing tip", "wing", (-0.36, 0.1)),
                ("left foot", "legs", (0.0, 0.64)),
                ("right foot", "legs", (0.22, 0.64)),
                ("chest", "body", (0.38, 0.15)),
            ),
        ),
        ClassSpec(
            "fish",
            (
                P("tail", (_poly((-0.45, 0), (-0.95, -0.38), (-0.95, 0.38)),)),
                P("fin", (_poly((-0.2, -0.2), (0.15, -0.25), (-0.1, -0.62)), _ellipse(0.02, 0.2, 0.17, 0.07, 0.4))),
                P("body", (_ellipse(0, 0, 0.6, 0.32),)),
                P("eye", (_ellipse(0.36, -0.08, 0.09, 0.09),)),
            ),
            (
                ("nose", "body", (0.54, 0.03)),
                ("eye", "eye", (0.36, -0.08)),
                ("fin tip", "fin", (-0.1, -0.52)),
                ("tail top", "tail", (-0.88, -0.28)),
                ("tail bottom", "tail", (-0.88, 0.28)),
                ("belly", "body", (0.1, 0.24)),
            ),
        ),
        ClassSpec(
            "car",
            (
                P("cabin", (_poly((-0.48, -0.1), (0.38, -0.1), (0.22, -0.52), (-0.32, -0.52)),)),
                P("body", (_rect(0, 0.1, 1.8, 0.46),)),
                P("window", (_poly((-0.36, -0.16), (0.26, -0.16), (0.14, -0.44), (-0.25, -0.44)),)),
                P("wheels", (_ellipse(-0.55, 0.36, 0.21, 0.21), _ellipse(0.55, 0.36, 0.21, 0.21))),
                P("light", (_rect(0.84, 0.0, 0.1, 0.14),)),
            ),
            (
                ("front wheel", "wheels", (0.55, 0.38)),
                ("rear wheel", "wheels", (-0.55, 0.38)),
                ("rear", "body", (-0.82, 0.1)),
                ("window", "window", (-0.05, -0.3)),
                ("roof", "cabin", (-0.05, -0.48)),
                ("headlight", "light", (0.84, 0.0)),
            ),
        ),
        ClassSpec(
            "house",
            (
                P("chimney", (_rect(0.4, -0.62, 0.14, 0.36),)),
                P("walls", (_rect(0, 0.2, 1.2, 1.0),)),
                P("roof", (_poly((-0.78, -0.3), (0.78, -0.3), (0, -0.96)),)),
                P("door", (_rect(0.18, 0.48, 0.26, 0.44),)),
                P("window", (_rect(-0.3, 0.1, 0.28, 0.28),)),
            ),
            (
                ("roof apex", "roof", (0, -0.86)),
                ("roof left", "roof", (-0.66, -0.34)),
                ("roof right", "roof", (0.66, -0.34)),
                ("door", "door", (0.18, 0.5)),
                ("window", "window", (-0.3, 0.1)),
                ("wall corner", "walls", (-0.54, 0.64)),
                ("chimney top", "chimney", (0.4, -0.76)),
            ),
        ),
        ClassSpec(
            "tree",
            (
                P("roots", (_poly((-0.34, 0.95), (0.34, 0.95), (0, 0.68)),)),
                P("trunk", (_rect(0, 0.42, 0.22, 0.9),)),
                P("crown", (_ellipse(0, -0.3, 0.62, 0.55),)),
                P(
                    "fruit",
                    (
                        _ellipse(-0.28, -0.35, 0.09, 0.09),
                        _ellipse(0.22, -0.12, 0.09, 0.09),
                        _ellipse(0.05, -0.6, 0.09, 0.09),
                    ),
                ),
            ),
            (
                ("crown top", "crown", (0, -0.78)),
                ("crown left", "crown", (-0.55, -0.3)),
                ("crown right", "crown", (0.55, -0.3)),
                ("trunk", "trunk", (0, 0.45)),
                ("roots", "roots", (0, 0.86)),
                ("left fruit", "fruit", (-0.28, -0.35)),
                ("right fruit", "fruit", (0.22, -0.12)),
            ),
        ),
        ClassSpec(
            "dog",
            (
                P("tail", (_rect(-0.62, -0.25, 0.1, 0.45, 0.6),)),
                P("legs", tuple(_rect(x, 0.38, 0.12, 0.42) for x in (-0.4, -0.22, 0.22, 0.4))),
                P("body", (_ellipse(0, 0, 0.58, 0.3),)),
                P("head", (_ellipse(0.6, -0.32, 0.24, 0.2),)),
                P("ears", (_poly((0.46, -0.45), (0.56, -0.48), (0.42, -0.72)),)),
            ),
            (
                ("nose", "head", (0.78, -0.3)),
                ("ear tip", "ears", (0.45, -0.6)),
                ("tail tip", "tail", (-0.72, -0.42)),
                ("front foot", "legs", (0.4, 0.55)),
                ("back foot", "legs", (-0.4, 0.55)),
                ("back", "body", (-0.1, -0.2)),
            ),
        ),
        ClassSpec(
            "flower",
            (
                P("stem", (_rect(0, 0.35, 0.08, 1.1),)),
                P("leaf", (_ellipse(0.2, 0.45, 0.22, 0.08, -0.5),)),
                P(
                    "petals",
                    tuple(
                        _ellipse(0.28 * math.cos(a), -0.38 + 0.28 * math.sin(a), 0.17, 0.11, -a)
                        for a in np.linspace(0, 2 * np.pi, 6, endpoint=False)
                    ),
                ),
                P("center", (_ellipse(0, -0.38, 0.15, 0.15),)),
            ),
            (
                ("center", "center", (0, -0.38)),
                ("right petal", "petals", (0.36, -0.38)),
                ("left petal", "petals", (-0.36, -0.38)),
                ("stem base", "stem", (0, 0.85)),
                ("leaf tip", "leaf", (0.34, 0.34)),
                ("lower petal", "petals", (0.18, -0.07)),
            ),
        ),
        ClassSpec(
            "rocket",
            (
                P("flame", (_poly((-0.15, 0.5), (0.15, 0.5), (0, 0.97)),)),
                P(
                    "fins",
                    (_poly((-0.2, 0.18), (-0.2, 0.52), (-0.48, 0.62)), _poly((0.2, 0.18), (0.2, 0.52), (0.48, 0.62))),
                ),
                P("body", (_rect(0, 0, 0.42, 1.1),)),
                P("nose", (_poly((-0.21, -0.54), (0.21, -0.54), (0, -0.96)),)),
                P("window", (_ellipse(0, -0.2, 0.11, 0.11),)),
            ),
            (
                ("nose tip", "nose", (0, -0.86)),
                ("left fin", "fins", (-0.38, 0.55)),
                ("right fin", "fins", (0.38, 0.55)),
                ("flame tip", "flame", (0, 0.85)),
                ("window", "window", (0, -0.2)),
                ("body", "body", (0, 0.25)),
            ),
        ),
        ClassSpec(
            "mushroom",
            (
                P("base", (_ellipse(0, 0.72, 0.42, 0.1),)),
                P("stem", (_rect(0, 0.35, 0.3, 0.72),)),
                P("cap", (np.concatenate([_ellipse(0, -0.05, 0.72, 0.58, n=32)[16:], [[0.72, -0.05]]]),)),
                P(
                    "spots",
                    (
                        _ellipse(-0.3, -0.3, 0.1, 0.08),
                        _ellipse(0.25, -0.38, 0.09, 0.07),
                        _ellipse(0.0, -0.18, 0.08, 0.06),
                    ),
                ),
            ),
            (
                ("cap top", "cap", (0, -0.55)),
                ("cap left", "cap", (-0.6, -0.1)),
                ("cap right", "cap", (0.6, -0.1)),
                ("stem", "stem", (0, 0.35)),
                ("base left", "base", (-0.34, 0.72)),
                ("spot", "spots", (-0.3, -0.3)),
            ),
        ),
        ClassSpec(
            "boat",
            (
                P("mast", (_rect(0, -0.3, 0.07, 1.0),)),
                P("flag", (_poly((-0.03, -0.8), (-0.03, -0.96), (-0.32, -0.88)),)),
                P("sail", (_poly((0.06, -0.72), (0.06, 0.1), (0.58, 0.1)),)),
                P("hull", (_poly((-0.82, 0.18), (0.82, 0.18), (0.56, 0.5), (-0.56, 0.5)),)),
            ),
            (
                ("bow", "hull", (0.72, 0.22)),
                ("stern", "hull", (-0.72, 0.22)),
                ("keel", "hull", (0, 0.45)),
                ("flag tip", "flag", (-0.24, -0.88)),
                ("sail corner", "sail", (0.48, 0.05)),
                ("mast", "mast", (0, -0.5)),
            ),
        ),
    )


CLASSES: tuple[ClassSpec, ...] = _classes()
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
# global part ids: 0 background, then every (class, part) in order
PART_NAMES: tuple[str, ...] = ("background",) + tuple(f"{c.name}/{p.name}" for c in CLASSES for p in c.parts)
_PART_OFFSET = np.cumsum([0] + [len(c.parts) for c in CLASSES])
NUM_PARTS = len(PART_NAMES)


def part_id(class_index: int, part_name: str) -> int:
    """Global part id of ``part_name`` in class ``class_index``."""
    names = [p.name for p in CLASSES[class_index].parts]
    return int(_PART_OFFSET[class_index] + names.index(part_name) + 1)


def local_part_mask(mask: np.ndarray, class_index: int) -> np.ndarray:
    """Map global part ids to class-local ids (0 background, 1..P the parts)."""
    out = mask.astype(np.int64) - int(_PART_OFFSET[class_index])
    out[mask == 0] = 0
    return out.astype(np.uint8)


@dataclass(frozen=True)
class ToySample:
    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, global part ids
    label: int
    keypoints: np.ndarray  # (K, 2) float32, (x, y) pixels
    visible: np.ndarray  # (K,) bool
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (inclusive)
    caption: str
    fine_caption: str
    complexity: int
    attributes: dict

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        return tuple(k[0] for k in CLASSES[self.label].keypoints)


def _texture(rng, h, w, kind, c1, c2):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "plain":
        t = np.zeros((h, w), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / max(h, w)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == "striped":
        a, f = rng.uniform(0, np.pi), rng.uniform(0.15, 0.45)
        t = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * f) > 0).astype(np.float32)
    elif kind == "checkered":
        s = rng.integers(4, 10) * (h // 64 or 1)
        t = (((xx // s) + (yy // s)) % 2).astype(np.float32)
    else:  # spots, used for object textures
        t = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(6, 14)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.0, 3.5) * (h / 64)
            t[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 1
    c1, c2 = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _jitter(rng, rgb, amount=25):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


class ToyWorld:
    """A split of the toy world: ``ToyWorld("train", n=2000, size=64, seed=0)``.

    ``len`` is ``n`` (defaults in ``SPLIT_SIZES``); indexing renders a
    :class:`ToySample`. Class labels cycle through the ten classes so every
    split is balanced.
    """

    def __init__(self, split: str = "train", n: int | None = None, size: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown toy-world split {split!r}; use one of {SPLITS}")
        if size < 32 or size % 8:
            raise ValueError(f"toy-world image size must be a multiple of 8 and >= 32, got {size}")
        self.split, self.size, self.seed = split, size, seed
        self.n = SPLIT_SIZES[split] if n is None else int(n)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"ToyWorld(split={self.split!r}, n={self.n}, size={self.size}, seed={self.seed})"

    def __getitem__(self, i: int) -> ToySample:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self!r}")
        return render(self.seed, self.split, i, self.size)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def pairs(self, n_pairs: int, seed: int = 0, min_common: int = 3) -> list[tuple[int, int]]:
        """Correspondence pairs: (source, target) indices of two different
        instances of one class sharing at least ``min_common`` visible keypoints."""
        rng = np.random.default_rng([seed, 99, SPLITS.index(self.split)])
        by_class: dict[int, list[int]] = {}
        for i in range(self.n):
            by_class.setdefault(i % len(CLASSES), []).append(i)
        out: list[tuple[int, int]] = []
        tries = 0
        while len(out) < n_pairs and tries < 50 * n_pairs:
            tries += 1
            idx = by_class[len(out) % len(CLASSES)]
            if len(idx) < 2:
                continue
            a, b = (int(x) for x in rng.choice(idx, 2, replace=False))
            if (a, b) in out:
                continue
            va, vb = self[a].visible, self[b].visible
            if (va & vb).sum() >= min_common:
                out.append((a, b))
        return out


@lru_cache(maxsize=4096)
def render(seed: int, split: str, index: int, size: int = 64) -> ToySample:
    """Render sample ``index`` of ``split`` for ``seed`` (deterministic; the
    last 4096 renders are memoised, about 16 kB each at 64 px). The arrays of
    a returned sample are read-only: copy before modifying."""
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    label = index % len(CLASSES)
    spec = CLASSES[label]
    ss = 2  # supersampling for the RGB image
    S = size * ss

    complexity = int(rng.integers(0, 4))
    bg_kind = {0: "plain", 1: "gradient", 2: str(rng.choice(["striped", "checkered"])), 3: "cluttered"}[complexity]
    scale = rng.uniform(0.26, 0.42)
    size_word = "small" if scale < 0.31 else ("large" if scale > 0.37 else "")
    angle = rng.uniform(-0.35, 0.35)
    flip = bool(rng.integers(0, 2))
    cx, cy = rng.uniform(0.38, 0.62, size=2)

    colour_names = list(COLOURS)
    part_colours = [str(rng.choice(colour_names)) for _ in spec.parts]
    bg_names = [n for n in colour_names if n not in part_colours]
    bg1, bg2 = (str(x) for x in rng.choice(bg_names, 2, replace=False))

    def to_px(pts, fx=1.0, fy=1.0, centre=(0.0, 0.0)):
        pts = (np.asarray(pts, float) - centre) * [fx, fy] + centre
        if flip:
            pts = pts * [-1, 1]
        c, s = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
        return (pts * scale + [cx, cy]) * size

    # background
    if bg_kind == "cluttered":
        canvas = _texture(rng, S, S, "gradient", _jitter(rng, COLOURS[bg1]), _jitter(rng, COLOURS[bg2]))
        img = Image.fromarray(canvas.astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(10, 20))):
            x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(2, 7) * ss * size / 64
            col = _jitter(rng, COLOURS[str(rng.choice(bg_names))], 40)
            if rng.random() < 0.5:
                d.ellipse([x - r, y - r, x + r, y + r], fill=col)
            else:
                d.rectangle([x - r, y - r / 2, x + r, y + r / 2], fill=col)
        canvas = np.asarray(img, np.float32)
        canvas += rng.normal(0, 8, canvas.shape)
    else:
        canvas = _texture(rng, S, S, bg_kind, _jitter(rng, COLOURS[bg1]), _jitter(rng, COLOURS[bg2]))

    mask_img = Image.new("L", (S, S), 0)
    md = ImageDraw.Draw(mask_img)
    for pi, part in enumerate(spec.parts):
        fx, fy = rng.uniform(0.85, 1.15, size=2)
        allpts = np.concatenate(part.polygons)
        centre = allpts.mean(0)
        for poly in part.polygons:
            px = to_px(poly, fx, fy, centre) * ss
            md.polygon([tuple(p) for p in px], fill=int(_PART_OFFSET[label] + pi + 1))
    mask_ss = np.asarray(mask_img)
    for pi in range(len(spec.parts)):
        region = mask_ss == _PART_OFFSET[label] + pi + 1
        if not region.any():
            continue
        base = _jitter(rng, COLOURS[part_colours[pi]], 20)
        if complexity >= 2 and rng.random() < 0.6:
            second = _jitter(rng, COLOURS[str(rng.choice(colour_names))], 20)
            tex = _texture(rng, S, S, str(rng.choice(["striped", "spots"])), base, second)
        else:
            tex = _texture(rng, S, S, "gradient" if complexity >= 1 else "plain", base, tuple(0.7 * np.array(base)))
        canvas[region] = tex[region]
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))
    mask = mask_ss[ss // 2 :: ss, ss // 2 :: ss].copy()

    # keypoints (the same part-proportion jitter is not applied: keypoints sit
    # well inside their parts, and visibility is read off the final mask)
    names = [p.name for p in spec.parts]
    kps = np.array([to_px([xy])[0] for _, _, xy in spec.keypoints], np.float32)
    vis = np.zeros(len(kps), bool)
    for k, (_, part, _) in enumerate(spec.keypoints):
        x, y = int(math.floor(kps[k, 0])), int(math.floor(kps[k, 1]))
        if 0 <= x < size and 0 <= y < size:
            vis[k] = mask[y, x] == _PART_OFFSET[label] + names.index(part) + 1
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (0, 0, size - 1, size - 1)

    name = spec.name
    facing = "left" if flip else "right"
    main = part_colours[names.index(_main_part(spec))]
    others = [(part_colours[i], p) for i, p in enumerate(names) if p != _main_part(spec)][:2]
    detail = " and ".join(f"a {c} {p}" for c, p in others)
    size_txt = f"{size_word} " if size_word else ""
    fine = f"a photo of a {size_txt}{main} {name} with {detail}, facing {facing}, on a {bg_kind} {bg1} background"
    attrs = dict(
        colours=dict(zip(names, part_colours)),
        background=bg_kind,
        background_colours=(bg1, bg2),
        scale=float(scale),
        angle=float(angle),
        flip=flip,
        centre=(float(cx), float(cy)),
    )
    for arr in (image, mask, kps, vis):
        arr.setflags(write=False)
    return ToySample(
        image_id=f"{split}_{seed}_{index:06d}",
        image=image,
        mask=mask,
        label=label,
        keypoints=kps,
        visible=vis,
        bbox=bbox,
        caption=f"a photo of a {name}",
        fine_caption=fine,
        complexity=complexity,
        attributes=attrs,
    )


def _main_part(spec: ClassSpec) -> str:
    names = [p.name for p in spec.parts]
    for cand in ("body", "walls", "crown", "cap", "petals", "hull"):
        if cand in names:
            return cand
    return names[0]


def vocabulary() -> list[str]:
    """Every word a toy-world caption can contain (for the mini tokenizer)."""
    words = set("a photo of with and facing left right on background small large".split())
    words |= set(CLASS_NAMES) | set(COLOURS) | set(BACKGROUNDS)
    for c in CLASSES:
        for p in c.parts:
            words |= set(p.name.split())
    return sorted(words)


def stack(samples, what: str = "image") -> np.ndarray:
    """Stack one field of many samples into an array."""
    return np.stack([getattr(s, what) for s in samples])
