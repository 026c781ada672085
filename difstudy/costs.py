"""What the full GPU run will cost, counted in its rehearsal (issue 23, item 6).

During ``difstudy run --params full --rehearse`` every pipeline that :func:`difstudy.models.load`
returns is watched (:func:`watch`, switched on by :data:`ENV`): a forward pre-hook on its U-Net
counts the forwards, the samples they carry (a batch of B is B samples) and the latent cells, and
the notebook's kernel writes them, with its peak memory (RSS) and the growth of the feature cache
under its working folder (``cache/``, walked at most every 30 s), to ``<ENV folder>/<notebook>.json``
(atomically, at most once a second and at exit).

:func:`table` turns those counts into the full run's: every count parameter the rehearsal scaled
down (:func:`difstudy.rehearsal.rehearse_params`) gives a ratio full / rehearsal, and so do the seed
lists and sampling steps. Which forwards each count drives differs per page, so the full run's
forwards are given as a range: at least the rehearsal's times the smallest count ratio, at most
times the largest count ratio, the seed ratio and the step ratio. The cache grows with the images
and seeds (at most the largest count ratio times the seed ratio) and with the pixel area of the feature maps (full image size / rehearsal image size, squared).
GPU time is the samples divided by a measured rate: the batched SD1.5-width forward at 512 px in
fp16 of the last ``difstudy bench --device cuda`` (``report/measured.json``, section ``gpu``), named
with its device in every row; without one the table gives forwards only. The peak memory is the
rehearsal's own (CPU, fp32, small images): a floor, not an extrapolation.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import resource
import threading
import time
from pathlib import Path

ENV = "DIFSTUDY_COST_LOG"
_lock = threading.Lock()
_state: dict = {}


def _cache_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _write(force: bool = False) -> None:
    with _lock:
        if not _state or (not force and time.time() - _state["written"] < 1.0):
            return
        _state["written"] = time.time()
        if force or time.time() - _state["cache_scanned"] >= 30:  # a walk of the cache folder: rarely
            _state["cache_bytes"] = max(0, _cache_bytes(_state["cache"]) - _state["cache_at_start"])
            _state["cache_scanned"] = time.time()
        rec = {k: v for k, v in _state.items() if k not in ("written", "path", "cache", "cache_scanned")}
        rec["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        path = _state["path"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)


def _pre_hook(module, args, kwargs):
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    b = int(sample.shape[0]) if hasattr(sample, "shape") else 1
    cells = int(math.prod(sample.shape[2:])) if hasattr(sample, "shape") and sample.dim() >= 3 else 0
    with _lock:
        _state["forwards"] += 1
        _state["samples"] += b
        _state["latent_cells"] += b * cells
    _write()


def watch(pipe, name: str) -> None:
    """Count ``pipe``'s denoiser forwards (U-Net or transformer) for this notebook when :data:`ENV`
    names a folder (else nothing)."""
    folder = os.environ.get(ENV)
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if not folder or net is None:
        return
    from .study import ENV_NOTEBOOK

    notebook = os.environ.get(ENV_NOTEBOOK) or "outside-difstudy-run"
    with _lock:
        if not _state:
            Path(folder).mkdir(parents=True, exist_ok=True)
            cache = Path.cwd() / "cache"
            _state.update(
                notebook=notebook, models=[], forwards=0, samples=0, latent_cells=0, written=0.0,
                path=Path(folder) / f"{notebook}.json", cache=cache, cache_at_start=_cache_bytes(cache),
                cache_bytes=0, cache_scanned=time.time(),
            )  # fmt: skip
            atexit.register(_write, True)
        _state["models"].append(name)
    net.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    _write(force=True)


def flush() -> None:
    """Write the counts now (the notebook's last cell may call it; exit does too)."""
    _write(force=True)


# -- the full run's cost ----------------------------------------------------------------------
def scale_ratios(full: dict, rehearsal: dict) -> dict:
    """Ratios full / rehearsal of the parameters the rehearsal scaled: ``counts`` (one per count
    parameter; "all" in the full run is left out and named in ``unbounded``), ``seeds``, ``steps``
    and ``area`` (image size squared)."""
    from .rehearsal import MINIMUM, SEED_KEYS, SIZE_KEYS, STEP_KEYS

    counts, unbounded, seeds, steps, area = {}, [], 1.0, 1.0, 1.0
    for key, value in full.items():
        small = rehearsal.get(key)
        if key in MINIMUM and small:
            if value is None:
                unbounded.append(key)
            elif isinstance(value, int) and value > small:
                counts[key] = value / small
        elif key in SEED_KEYS and isinstance(value, list) and small:
            seeds = max(seeds, len(value) / len(small))
        elif key in STEP_KEYS and isinstance(value, int) and small:
            steps = max(steps, value / small)
        elif key == "denoising_from" and isinstance(value, int) and small and isinstance(full.get("timestep"), int):
            span, short = value - full["timestep"], small - full["timestep"]
            steps = max(steps, (span + 1) / (short + 1))  # guided steps plus the feature forward
        elif key in SIZE_KEYS and isinstance(value, int) and small:
            area = max(area, (value / small) ** 2)
    return dict(counts=counts, unbounded=unbounded, seeds=seeds, steps=steps, area=area)


def gpu_rate(measured: dict | None = None) -> dict | None:
    """Samples per second of the batched SD1.5-width forward at 512 px on the GPU of the last
    ``difstudy bench --device cuda`` (``report/measured.json``), with its provenance; None without one."""
    from .report import read_measured

    sec = (read_measured() if measured is None else measured).get("gpu") or {}
    per_item = (sec.get("per_item_s") or {}).get("batched")
    if not per_item:
        return None
    return dict(
        samples_per_s=1.0 / per_item,
        source=f"batched forward, SD1.5 widths, 512 px, {sec.get('cfg_dtype', 'fp16')}, "
        f"{sec.get('device_name', 'GPU')}, commit {sec.get('commit', '?')}",
    )


def table(log_dir: str | os.PathLike, params: dict[str, tuple[dict, dict]], rate: dict | None = None):
    """One row per rehearsed notebook: what the rehearsal counted and the full run's range.
    ``params``: notebook -> (full parameter values, rehearsal parameter values)."""
    import pandas as pd

    rows = []
    for path in sorted(Path(log_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        full, small = params.get(rec["notebook"], ({}, {}))
        r = scale_ratios(full, small)
        lo = min(r["counts"].values(), default=1.0)
        hi = max(r["counts"].values(), default=1.0) * r["seeds"] * r["steps"]
        row = dict(
            notebook=rec["notebook"],
            forwards=rec["forwards"],
            samples=rec["samples"],
            count_ratio_min=round(lo, 1),
            count_ratio_max=round(max(r["counts"].values(), default=1.0), 1),
            seed_step_ratio=round(r["seeds"] * r["steps"], 2),
            full_samples_low=math.ceil(rec["samples"] * lo),
            full_samples_high=math.ceil(rec["samples"] * hi),
            cache_mb=round(rec["cache_bytes"] / 2**20, 2),
            full_cache_gb_high=round(rec["cache_bytes"] * hi / r["steps"] * r["area"] / 2**30, 2),
            peak_rss_mb=rec["peak_rss_mb"],
            unbounded=", ".join(r["unbounded"]),
        )
        if rate:
            row["gpu_min_low"] = round(row["full_samples_low"] / rate["samples_per_s"] / 60, 1)
            row["gpu_min_high"] = round(row["full_samples_high"] / rate["samples_per_s"] / 60, 1)
            row["rate_source"] = rate["source"]
        rows.append(row)
    return pd.DataFrame(rows)
