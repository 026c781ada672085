"""The three properties of diffusion U-Nets (Meng et al., NeurIPS'24) as numbers.

The paper shows its three properties only as PCA pictures; here each is a
number per activation, so that filtering is reproducible and each claim can be
tested:

- :func:`noise_share` (asymmetric diffusion noise): how much of an
  activation's variance comes from the noise draw of the forward process;
- :func:`granularity` (in-resolution granularity changes): the power-weighted
  mean spatial frequency of a map, in cycles per pixel of the map;
- :func:`locality_index` (locality without positional embeddings): how much
  more similar near pixels are than far ones, with the part held fixed.

All three take any activation as stored by :mod:`difstudy.extract`: spatial
maps ``(C, H, W)`` (q/k/v with heads merged) and attention maps laid out as
``(keys, H, W)``. Every function returns ``nan`` (never 0) where its value is
undefined (a constant map, too few pixel pairs), so that averages over images
skip it; ``n_images`` in the tables counts the images that gave a value.

:func:`measure_properties` computes them for every activation of a model's
catalogue over toy-world images and timesteps, through the feature cache, into
one tidy table (``activation, kind, stage, level, repeat, t, measure, value,
n_images, size``); :func:`claims` states the paper's claims on that table with the
measured number and a holds / fails verdict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .fileio import write_csv_atomic

MEASURES = ("noise_share", "granularity", "locality")
# the fourth property (issue 26, DiTF's "massive activations"), measured on request: per image the
# largest channel magnitude over the median one (massive_ratio) and the number of channels above
# MASSIVE_RATIO times the median (massive_count; :func:`massive_channels`)
MASSIVE_MEASURES = ("massive_ratio", "massive_count")
ALL_MEASURES = MEASURES + MASSIVE_MEASURES
COLUMNS = ["activation", "kind", "stage", "level", "repeat", "t", "measure", "value", "n_images", "size"]
IMAGE_COLUMNS = ["activation", "kind", "stage", "level", "repeat", "t", "measure", "image_id", "value", "size"]
BLOCK_OUTPUT_KINDS = ("res-out", "vit-out", "downsampler-out", "upsampler-out")


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _check_ndim(x: torch.Tensor, ndim: int, what: str, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{what} must be {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{what} must be {layout} with no empty dimension, got shape {tuple(x.shape)}")


# -- 1. asymmetric diffusion noise ---------------------------------------------
def noise_share(maps) -> float:
    """Share of an activation's spatial variance that comes from the noise draw.

    ``maps`` is ``(K, C, H, W)``: one image at one timestep under ``K >= 2``
    noise draws. First each channel's spatial mean is removed, per draw
    (``x[k, c] -= mean_{h,w} x[k, c]``): a constant per channel (an offset, a
    bias) is neither signal nor noise, only the spatial pattern is. Then each
    of the ``P = C*H*W`` channel-positions is a group of ``K`` values and the
    one-way random-effects ANOVA splits the variance into

    - noise variance ``s2_noise = MSW``, the mean over channel-positions of the
      variance across draws (``ddof=1``), and
    - signal variance ``s2_signal = max(0, (MSB - MSW) / K)``, the variance
      across channel-positions of the draw-mean with the noise that remains
      in a mean of ``K`` draws taken out (``MSB = K * sum_p (m_p - m)^2 / (P - 1)``),

    and returns ``s2_noise / (s2_noise + s2_signal)``: 0 when the map ignores
    the noise draw, 1 when its spatial pattern is pure noise (no structure
    shared by the draws, whatever the channels' offsets),
    ``a^2 / (a^2 + b^2)`` for ``signal * b + noise * a`` with unit-variance
    signal and independent unit-variance noise. Unlike "variance across draws /
    total variance" it has no ``(K - 1) / K`` bias for small ``K``.
    Channels with larger spatial variance weigh more (no per-channel
    normalisation). A map that is constant in space gives ``nan``.
    """
    x = _as_tensor(maps)
    _check_ndim(x, 4, "noise_share maps", "(K draws, C, H, W)")
    k = x.shape[0]
    if k < 2:
        raise ValueError(f"noise_share needs at least 2 noise draws, got shape {tuple(x.shape)} (K = {k})")
    x0 = x.double()
    x = (x0 - x0.mean(dim=(2, 3), keepdim=True)).reshape(k, -1)
    p = x.shape[1]
    mean_p = x.mean(0)
    msw = float(((x - mean_p) ** 2).sum() / (p * (k - 1)))
    msb = float(k * ((mean_p - mean_p.mean()) ** 2).sum() / (p - 1)) if p > 1 else 0.0
    signal = max(0.0, (msb - msw) / k)
    total = msw + signal
    if total <= 1e-12 * max(float((x0 * x0).mean()), 1e-300):  # constant in space (or all zero)
        return float("nan")
    return msw / total


# -- 2. in-resolution granularity ------------------------------------------------
def granularity(feat) -> float:
    """Power-weighted mean radial spatial frequency of a map, in cycles per pixel.

    ``feat`` is ``(C, H, W)``. Each channel's spatial mean is removed, the 2-D
    discrete Fourier transform taken, and the mean of the radial frequency
    ``sqrt(fy^2 + fx^2)`` (``fy = k / H``, ``fx = l / W`` cycles per pixel of
    the map, from ``torch.fft.fftfreq``) weighted by the power ``|F|^2``
    summed over channels::

        granularity = sum_{c,k,l} |F_c(k,l)|^2 r(k,l) / sum_{c,k,l} |F_c(k,l)|^2

    A single sinusoid of frequency ``f`` cycles per pixel gives ``f`` (for
    frequencies on the DFT grid); white noise gives about 0.38 at any size;
    the maximum is ``sqrt(2) / 2`` (a checkerboard). Cycles per pixel make
    maps of different resolutions comparable: a pattern with the same period
    in pixels scores the same at 16 and 64 px (multiply by ``W`` for cycles
    per image). A map that is constant in space gives ``nan``.
    """
    x = _as_tensor(feat)
    _check_ndim(x, 3, "granularity feat", "(C, H, W)")
    x0 = x.double()
    x = x0 - x0.mean(dim=(1, 2), keepdim=True)
    if float((x * x).sum()) <= 1e-24 * float((x0 * x0).sum()):  # constant in space
        return float("nan")
    power = torch.fft.fft2(x).abs().pow(2).sum(0)
    h, w = x.shape[1:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    r = torch.sqrt(fy**2 + fx**2)
    total = float(power.sum())
    return float((power * r).sum() / total)


# -- 3. locality without positional embeddings -----------------------------------
@dataclass(frozen=True)
class LocalityConfig:
    """Parameters of :func:`locality_index` (see there)."""

    near: float = 0.1
    far: float = 0.3
    n_pairs: int = 4000
    min_pairs: int = 5
    seed: int = 0


def distance_thresholds(h: int, w: int, near: float = 0.1, far: float = 0.3) -> tuple[float, float]:
    """(near_px, far_px) of :func:`locality_index` for an ``h x w`` map.

    ``near_px = max(1, near * max(h, w))`` (so the 4-neighbours are always
    near), ``far_px = max(far * max(h, w), near_px + 1)`` (so near and far
    never overlap)."""
    if not 0 < near < far:
        raise ValueError(f"locality thresholds must satisfy 0 < near < far, got near={near}, far={far}")
    size = max(h, w)
    near_px = max(1.0, near * size)
    return near_px, max(far * size, near_px + 1.0)


@lru_cache(maxsize=64)
def _pairs(h: int, w: int, near: float, far: float, n_pairs: int, seed: int):
    """Flat pixel-index pairs (i_near, j_near, i_far, j_far), deterministic in ``seed``."""
    near_px, far_px = distance_thresholds(h, w, near, far)
    rng = np.random.default_rng(seed)
    # near: every unordered pair within near_px (offsets in a half plane), subsampled
    r = int(np.floor(near_px))
    ii, jj = [], []
    ys, xs = np.mgrid[0:h, 0:w]
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > near_px * near_px:
                continue
            ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            ii.append((ys * w + xs)[ok])
            jj.append(((ys + dy) * w + xs + dx)[ok])
    i_near = np.concatenate(ii) if ii else np.zeros(0, np.int64)
    j_near = np.concatenate(jj) if jj else np.zeros(0, np.int64)
    if len(i_near) > n_pairs:
        sel = rng.choice(len(i_near), n_pairs, replace=False)
        i_near, j_near = i_near[sel], j_near[sel]
    # far: every unordered pair at >= far_px for small maps, random pairs for large ones
    n = h * w
    if n <= 1024:
        i_far, j_far = np.triu_indices(n, 1)
    else:
        i_far, j_far = rng.integers(0, n, 4 * n_pairs), rng.integers(0, n, 4 * n_pairs)
    d2 = (i_far // w - j_far // w) ** 2 + (i_far % w - j_far % w) ** 2
    keep = d2 >= far_px * far_px
    i_far, j_far = i_far[keep], j_far[keep]
    if len(i_far) > n_pairs:
        sel = rng.choice(len(i_far), n_pairs, replace=False)
        i_far, j_far = i_far[sel], j_far[sel]
    return i_near, j_near, i_far, j_far


def locality_index(
    feat, parts, near: float = 0.1, far: float = 0.3, n_pairs: int = 4000, min_pairs: int = 5, seed: int = 0
) -> float:
    """The paper's locality comparison: near pixels of *different* parts against far pixels of
    the *same* part (positive: locality wins over semantics).

    ``feat`` is ``(C, H, W)``, ``parts`` an ``(H, W)`` integer part mask (every
    id, background 0 included, is a part). Each pixel's feature vector is
    centred (each channel's spatial mean removed) and compared by cosine
    similarity ``s``. A pair of pixels is *near* when its Euclidean distance
    is at most ``near_px`` and *far* when it is at least ``far_px``
    (:func:`distance_thresholds`: fractions ``near`` and ``far`` of the map's
    larger side, so the index is comparable across resolutions). Then::

        locality = s[different parts, near] - s[same part, far]

    with ``s[...]`` the mean similarity of the pairs in that group. Meng et al.
    observe that in self-attention q and k, nearby pixels of different parts
    are more alike than far pixels of the same part (locality without
    positional embeddings): that is ``locality > 0``. A map that only encodes
    the part (one-hot of the part id) scores clearly below 0, a map that only
    encodes position (a smooth ramp, like a positional embedding) clearly
    above 0.

    Pairs are all near pairs and all far pairs of the map, each set subsampled
    to ``n_pairs`` with ``numpy.random.default_rng(seed)`` (the same pairs for
    every map of one size). ``nan`` when a group has fewer than ``min_pairs``
    pairs (e.g. a 2x2 map, or a mask with a single part) or the map is
    constant.
    """
    x = _as_tensor(feat)
    m = _as_tensor(parts)
    _check_ndim(x, 3, "locality_index feat", "(C, H, W)")
    if m.dim() != 2 or tuple(m.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"locality_index parts must be an (H, W) mask of the feature map's size {tuple(x.shape[1:])}, "
            f"got shape {tuple(m.shape)}; resize the mask with nearest-neighbour first"
        )
    if m.is_floating_point() or m.is_complex():
        raise ValueError(f"locality_index parts must be integer part ids, got dtype {m.dtype}")
    c, h, w = x.shape
    i_n, j_n, i_f, j_f = _pairs(h, w, float(near), float(far), int(n_pairs), int(seed))
    v = x.reshape(c, -1).double()
    v = v - v.mean(1, keepdim=True)
    norm = v.norm(dim=0)
    if float(norm.max()) <= 1e-12 * max(float(x.double().abs().max()), 1e-300):
        return float("nan")
    u = v / norm.clamp_min(1e-12 * float(norm.max()))
    lab = m.reshape(-1).long()

    def group_mean(i, j, same_part: bool) -> float:
        i, j = torch.from_numpy(i), torch.from_numpy(j)
        sel = (lab[i] == lab[j]) == same_part
        if int(sel.sum()) < min_pairs:
            return float("nan")
        return float((u[:, i[sel]] * u[:, j[sel]]).sum(0).mean())

    return group_mean(i_n, j_n, same_part=False) - group_mean(i_f, j_f, same_part=True)


# -- the table over a model's catalogue -------------------------------------------
# -- 4. massive activations (transformers; DiTF) ------------------------------------
MASSIVE_RATIO = 100.0  # a channel is massive when its magnitude is this many times the median channel's


def channel_magnitudes(feat) -> torch.Tensor:
    """Per channel the mean absolute value over positions (and images): ``feat`` is ``(C, H, W)`` or
    ``(N, C, H, W)``; returns ``(C,)`` float32."""
    x = _as_tensor(feat).float()
    if x.dim() == 3:
        x = x[None]
    _check_ndim(x, 4, "feat", "(C, H, W) or (N, C, H, W)")
    return x.abs().mean((0, 2, 3))


def massive_ratio(feat) -> float:
    """The largest channel magnitude over the median channel magnitude (:func:`channel_magnitudes`);
    ``nan`` for an all-zero map."""
    mag = channel_magnitudes(feat)
    med = float(mag.median())
    return float(mag.max()) / med if med > 0 else float("nan")


def massive_channels(feat, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Indices of the channels whose magnitude exceeds ``ratio`` times the median channel's (the
    "massive activations" DiTF drops from FLUX features before probing), largest first."""
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1 (a multiple of the median channel magnitude), got {ratio}")
    mag = channel_magnitudes(feat)
    med = float(mag.median())
    if med <= 0:
        return []
    idx = torch.nonzero(mag > ratio * med).flatten()
    return [int(i) for i in idx[torch.argsort(mag[idx], descending=True)]]


def _image_id(sample) -> str:
    return str(sample["image_id"] if isinstance(sample, dict) else sample.image_id)


def part_mask(sample, required: bool = True) -> np.ndarray | None:
    """The (H, W) part mask of a toy-world sample or loader item; ``None`` when it has none and
    ``required`` is False, else a clear error."""
    m = sample.get("mask") if isinstance(sample, dict) else getattr(sample, "mask", None)
    if m is None and not required:
        return None
    if m is None:
        raise ValueError(
            f"locality needs part masks, and sample {_image_id(sample)!r} has none; "
            "use the toy world or a dataset with part masks, or leave 'locality' out of measures"
        )
    return np.asarray(m)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An integer mask resized to ``hw`` = (H, W) with nearest-neighbour sampling."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a part mask must be (H, W), got shape {mask.shape}")
    if mask.shape == tuple(hw):
        return mask.astype(np.int64)
    img = Image.fromarray(mask.astype(np.int32), mode="I")
    return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST)).astype(np.int64)


def properties_from_cache(
    cache,
    frame: pd.DataFrame,
    image_ids: Sequence[str],
    timesteps: Sequence[int],
    seeds: Sequence[int],
    masks: Sequence[np.ndarray] | None = None,
    measures: Sequence[str] = MEASURES,
    variant: str = "empty",
    locality: LocalityConfig = LocalityConfig(),
    progress: bool = True,
    per_image: bool = False,
) -> pd.DataFrame:
    """The property table from features already in ``cache`` (anything with ``load``).

    ``frame``: catalogue rows (``name``, ``kind``, ``stage``, ``level``,
    ``repeat``) in forward order, as :meth:`difstudy.catalog.Catalog.to_frame`.
    ``noise_share`` uses every seed (the noise draws); the others (``granularity``,
    ``locality``, :data:`MASSIVE_MEASURES`) the first. With ``per_image`` one row per image
    (:data:`IMAGE_COLUMNS`: the claims' sampling units), else each value is the
    mean over images of the per-image measure (:func:`summarise`: ``nan``
    values skipped, ``n_images`` counts the rest); ``size`` is the map's
    spatial side (``min(H, W)``), e.g. to turn granularity into cycles per
    image (``value * size``).
    """
    measures = _check_measures(measures)
    if "noise_share" in measures and len(seeds) < 2:
        raise ValueError(f"noise_share needs at least 2 seeds (noise draws), got seeds={list(seeds)}")
    if "locality" in measures and (masks is None or len(masks) != len(image_ids)):
        raise ValueError(
            f"locality needs one part mask per image: got {0 if masks is None else len(masks)} masks "
            f"for {len(image_ids)} images"
        )
    ids = list(image_ids)
    rows = []
    bar = tqdm(list(frame.itertuples(index=False)), desc="properties", unit="act", disable=not progress)
    for a in bar:
        for t in timesteps:
            first = cache.load(a.name, ids, t, variant, seeds[0]).float()  # (N, C, H, W)
            values: dict[str, list[float]] = {m: [] for m in measures}
            if "noise_share" in measures:
                draws = torch.stack([first] + [cache.load(a.name, ids, t, variant, s).float() for s in seeds[1:]])
                values["noise_share"] = [noise_share(draws[:, n]) for n in range(len(ids))]
            if "granularity" in measures:
                values["granularity"] = [granularity(f) for f in first]
            if "massive_ratio" in measures:
                values["massive_ratio"] = [massive_ratio(f) for f in first]
            if "massive_count" in measures:
                values["massive_count"] = [len(massive_channels(f)) for f in first]
            if "locality" in measures:
                hw = tuple(first.shape[-2:])
                values["locality"] = [
                    locality_index(f, resize_mask(mk, hw), **asdict(locality)) for f, mk in zip(first, masks)
                ]
            for m in measures:
                for iid, v in zip(ids, values[m]):
                    rows.append(
                        dict(
                            activation=a.name,
                            kind=a.kind,
                            stage=a.stage,
                            level=a.level,
                            repeat=a.repeat,
                            t=int(t),
                            measure=m,
                            image_id=iid,
                            value=float(v),
                            size=int(min(first.shape[-2:])),
                        )
                    )
    images = pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype(
        {"level": "Int64", "repeat": "Int64", "t": int, "size": int, "value": float}
    )
    return images if per_image else summarise(images)


def summarise(images: pd.DataFrame) -> pd.DataFrame:
    """The table of means (:data:`COLUMNS`) from a per-image table (:data:`IMAGE_COLUMNS`): each
    value is the mean over images (``nan`` skipped; ``n_images`` counts the rest), activations in
    the per-image table's order. Extra columns that are constant per activation (``split``) are kept."""
    keys = ["activation", "kind", "stage", "level", "repeat", "t", "measure", "size"]
    extra = [c for c in images.columns if c not in IMAGE_COLUMNS]
    g = images.groupby(keys + extra, sort=False, dropna=False)["value"]
    out = g.agg(value="mean", n_images="count").reset_index()
    return _tidy(out[COLUMNS + extra])


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({"level": "Int64", "repeat": "Int64", "t": int, "n_images": int, "size": int, "value": float})


def _check_measures(measures) -> list[str]:
    measures = [measures] if isinstance(measures, str) else list(measures)
    bad = [m for m in measures if m not in ALL_MEASURES]
    if bad or not measures:
        raise ValueError(f"unknown measures {bad or measures}; use some of {list(ALL_MEASURES)}")
    return measures


def _model_frame(model, model_name, image_size, activations):
    """(pipeline, name, image size, catalogue rows of ``activations`` in forward order)."""
    from .denoisers import native_size, pipeline_catalog
    from .models import load, vae_scale_factor

    if isinstance(model, str):
        model_name = model_name or model
        model = load(model)
    size = int(image_size or native_size(model, vae_scale_factor(model)))
    catalog = pipeline_catalog(model, size)
    names = catalog.resolve(activations)
    frame = catalog.to_frame()
    return model, model_name, size, frame[frame["name"].isin(names)]


def measure_properties(
    model,
    dataset,
    timesteps: Sequence[int] = (50,),
    seeds: Sequence[int] = (0, 1, 2, 3),
    measures: Sequence[str] = MEASURES,
    activations="all",
    variant: str = "empty",
    image_size: int | None = None,
    cache_dir: str | os.PathLike = "cache/features",
    model_name: str | None = None,
    locality: LocalityConfig = LocalityConfig(),
    batch_size: int = 1,
    progress: bool = True,
    per_image: bool = False,
) -> pd.DataFrame:
    """The three properties of every activation of ``model`` over ``dataset``.

    ``model``: a pipeline or a name for :func:`difstudy.models.load`;
    ``dataset``: toy-world samples (or loader dicts with ``image``,
    ``image_id`` and, for locality, ``mask``). Features come from
    :func:`difstudy.extract.extract` (one run per noise draw ``seed``; cached,
    so a second call only reads), part masks from each sample's ``mask``
    resized with nearest-neighbour to each activation's ``(H, W)``. Only the
    seeds a measure needs are extracted (``noise_share`` all, the others the
    first). Returns the tidy table of :func:`properties_from_cache`
    (``activation, kind, stage, level, repeat, t, measure, value,
    n_images, size``; with ``per_image`` :data:`IMAGE_COLUMNS`), activations in forward order. ``batch_size`` 1 keeps cache
    shards small, which makes reading single activations fast.
    """
    from .extract import extract, variant_key

    measures = _check_measures(measures)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; give at least one noise draw (two or more for noise_share)")
    model, model_name, size, frame = _model_frame(model, model_name, image_size, activations)
    names = list(frame["name"])
    need = seeds if "noise_share" in measures else seeds[:1]
    cache = None
    for s in need:
        cache, _ = extract(
            model,
            dataset,
            names,
            timesteps=timesteps,
            variants=[variant],
            seed=s,
            image_size=size,
            batch_size=batch_size,
            cache_dir=cache_dir,
            model_name=model_name,
            progress=progress,
        )
    samples = [dataset[i] for i in range(len(dataset))]
    masks = [part_mask(s) for s in samples] if "locality" in measures else None
    return properties_from_cache(
        cache,
        frame,
        [_image_id(s) for s in samples],
        timesteps,
        need,
        masks=masks,
        measures=measures,
        variant=variant_key(variant),
        locality=locality,
        progress=progress,
        per_image=per_image,
    )


def measure_with_control(
    pipe,
    dataset,
    measure: str,
    out_dir: str | os.PathLike,
    timesteps: Sequence[int] = (50,),
    seeds: Sequence[int] = (0, 1, 2, 3),
    image_size: int | None = None,
    cache_dir: str | os.PathLike = "cache/features",
    model_name: str | None = None,
    control_seed: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One property notebook's measurements: ``measure`` per image on ``dataset`` for the trained
    ``pipe`` and for its random-weight control (:func:`difstudy.models.tiny.with_random_unet`,
    seeded by ``control_seed``), on the same images, timesteps and noise draws.

    ``dataset`` must not be the test split (:data:`CHOICE_SPLITS`): these tables choose the
    filter's activations. Writes ``{out_dir}/properties_images.csv`` (per image, both models,
    with ``weights`` = ``trained`` / ``random`` and ``split``; keyed by measure, :func:`write_part`,
    so pages that share a folder keep each other's rows). Returns ``(means, images, control)``:
    the means over images of the trained model, with ``split`` (what a property notebook writes
    as its ``results.csv`` with :func:`difstudy.study.write_results`, and what
    :func:`difstudy.filtering.read_properties` reads), and the two per-image tables for
    :func:`claims`."""
    from .models.tiny import with_random_unet

    split = dataset_split(dataset)
    if split not in CHOICE_SPLITS:
        raise ValueError(
            f"the property tables choose the filter's activations, so they are measured on the "
            f"{' or '.join(CHOICE_SPLITS)} split, not on {split!r}; use ToyWorld('val', n=...)"
        )
    name = model_name or str(getattr(pipe, "name_or_path", "") or "model")
    kw = dict(timesteps=timesteps, seeds=seeds, measures=[measure], image_size=image_size, cache_dir=cache_dir)
    kw.update(progress=progress, per_image=True)
    images = measure_properties(pipe, dataset, model_name=name, **kw)
    control = measure_properties(
        with_random_unet(pipe, control_seed), dataset, model_name=f"{name}-random{control_seed}", **kw
    )
    means = summarise(images).assign(split=split)
    both = pd.concat([images.assign(weights="trained"), control.assign(weights=f"random{control_seed}")])
    write_part(both.assign(split=split), Path(out_dir) / "properties_images.csv")
    return means, images, control


CHOICE_SPLITS = ("train", "val")
"""Splits a property table may be measured on: it chooses activations, so never the test split."""


def dataset_split(dataset) -> str:
    """The split of a toy world (``split``), or of a list of samples whose image ids start with
    it (``"val_0_000003"``); ``"unknown"`` otherwise."""
    split = getattr(dataset, "split", None)
    if split:
        return str(split)
    ids = {_image_id(dataset[i]).split("_", 1)[0] for i in range(len(dataset))}
    return ids.pop() if len(ids) == 1 else "unknown"


def activation_maps(
    model,
    sample,
    t: int = 50,
    seed: int = 0,
    activations="all",
    variant: str = "empty",
    image_size: int | None = None,
    cache_dir: str | os.PathLike = "cache/features",
    model_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Every requested activation of one image, ``{name: (C, H, W) float tensor}`` in forward order."""
    from .extract import extract, variant_key

    model, model_name, size, frame = _model_frame(model, model_name, image_size, activations)
    names = list(frame["name"])
    cache, _ = extract(
        model,
        [sample],
        names,
        timesteps=[t],
        variants=[variant],
        seed=seed,
        image_size=size,
        batch_size=1,
        cache_dir=cache_dir,
        model_name=model_name,
        progress=False,
    )
    iid = _image_id(sample)
    return {n: cache.load(n, [iid], t, variant_key(variant), seed)[0].float() for n in names}


def pca_pictures(maps: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """PCA-to-RGB picture ``(H, W, 3)`` in [0, 1] of each ``(C, H, W)`` map (one PCA per activation)."""
    from .extract import pca_rgb

    out = {}
    for name, m in maps.items():
        m = _as_tensor(m).float()
        _check_ndim(m, 3, f"map {name!r}", "(C, H, W)")
        k = min(3, m.shape[0], m.shape[1] * m.shape[2])
        pic = pca_rgb(m[None], n_components=k)[0].numpy()
        if k < 3:
            pic = np.concatenate([pic, np.repeat(pic[..., -1:], 3 - k, axis=-1)], axis=-1)
        out[name] = pic
    return out


# -- results on disk ---------------------------------------------------------------
def write_part(df: pd.DataFrame, path: str | os.PathLike, key: str = "measure") -> pd.DataFrame:
    """Replace this part of a shared CSV: rows of ``path`` whose ``key`` value
    occurs in ``df`` are replaced by ``df``, others kept. Locked
    (``filelock``) and written atomically, so notebooks that each own some
    measures (or claims) can run side by side. Returns the whole table."""
    from filelock import FileLock

    if key not in df.columns:
        raise ValueError(f"key column {key!r} is not among the columns {list(df.columns)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            old = pd.read_csv(path)
            old = old[~old[key].isin(set(df[key]))]
            both = pd.concat([old, df], ignore_index=True) if len(old) else df
        else:
            both = df
        write_csv_atomic(both, path)
    return both


# -- claims ---------------------------------------------------------------------------
def resolution_group(df: pd.DataFrame) -> pd.Series:
    """Resolution level of each row: ``"down0"``... ``"mid"``, ``"up0"``...; ``""`` for unet-in/-out;
    the stage (``"transformer"``) for a transformer's activations, which all have one resolution.

    A downsampler's (upsampler's) output has the resolution of the next level,
    so it is counted there, not under the level in its name."""
    shift = df["kind"].isin(["downsampler-out", "upsampler-out"]).astype(int)
    lev = df["level"].astype("Int64") + shift
    # a transformer's activations have no level: their group is their stage ("transformer")
    out = df["stage"].astype(str) + lev.astype("string").fillna("").astype(str)
    out[df["stage"] == "unet"] = ""
    out[df["stage"] == "mid"] = "mid"
    return out


def _at_t(df: pd.DataFrame, measure: str, t: int | None) -> tuple[pd.DataFrame, int]:
    d = df[df["measure"] == measure]
    ts = sorted(int(t) for t in d["t"].unique())
    if t is None:
        t = 50 if 50 in ts else int(ts[0])
    if t not in ts:
        raise ValueError(f"t={t} is not in the table for {measure}; it holds timesteps {ts}")
    d = d[d["t"] == t].copy()
    d["group"] = resolution_group(d)
    return d, int(t)


def group_summary(df: pd.DataFrame, measure: str, by: str = "level") -> pd.DataFrame:
    """Median of ``measure`` per resolution level (``by="level"``, :func:`resolution_group`,
    forward order) or per activation kind (``by="kind"``), one column per timestep."""
    d = df[df["measure"] == measure].copy()
    if d.empty:
        raise ValueError(f"measure {measure!r} is not in the table; it holds {sorted(df['measure'].unique())}")
    if by == "level":
        d["group"] = resolution_group(d).replace("", "unet in/out")
    elif by == "kind":
        d["group"] = d["kind"]
    else:
        raise ValueError(f"group_summary by={by!r}; use 'level' or 'kind'")
    order = list(dict.fromkeys(d["group"]))
    out = d.pivot_table(index="group", columns="t", values="value", aggfunc="median")
    out.columns = [f"t={c}" for c in out.columns]
    out.index.name = by
    return out.reindex(order)


__all__ = [
    "MEASURES",
    "MASSIVE_MEASURES",
    "ALL_MEASURES",
    "massive_ratio",
    "massive_channels",
    "channel_magnitudes",
    "COLUMNS",
    "LocalityConfig",
    "noise_share",
    "granularity",
    "locality_index",
    "distance_thresholds",
    "resize_mask",
    "properties_from_cache",
    "measure_properties",
    "activation_maps",
    "pca_pictures",
    "write_part",
    "claims",
    "summarise",
    "measure_with_control",
    "dataset_split",
    "CHOICE_SPLITS",
    "IMAGE_COLUMNS",
    "noise_stage_gaps",
    "noise_growth",
    "granularity_order",
    "locality_gaps",
    "MIN_NOISE_GAP",
    "MIN_NOISE_GROWTH",
    "MIN_GRANULARITY_RHO",
    "MIN_LOCALITY_GAP",
    "group_summary",
    "resolution_group",
]


# the claims on the property tables live in their own module (re-exported here: ``properties.claims``)
from .property_claims import (  # noqa: E402  (it reads this module's table helpers)
    MIN_GRANULARITY_RHO,
    MIN_LOCALITY_GAP,
    MIN_NOISE_GAP,
    MIN_NOISE_GROWTH,
    claims,
    granularity_order,
    locality_gaps,
    noise_growth,
    noise_stage_gaps,
)
