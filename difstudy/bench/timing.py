"""The timed cases (U-Net forwards with and without capture, batching, GATE's amalgamation,
extraction against the naive approach) and their interleaved runs."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..capture import Capture, expand_batch
from ..catalog import Catalog
from ..models import as_dtype
from .config import PerfConfig
from .workload import as_dataset, forward_until, last_module, naive_extract


@dataclass
class Case:
    key: str
    label: str
    items: int  # samples (or images) one call processes
    fn: Callable[[], object]


def forward_cases(unet, cfg: PerfConfig, catalog: Catalog | None = None) -> list[Case]:
    """The U-Net forward cases: bare, capture without stop, early stop, batched vs one-per-item."""
    catalog = catalog or Catalog(unet, latent_size=cfg.latent)
    g = torch.Generator().manual_seed(cfg.seed)
    s, d = cfg.latent, unet.config.cross_attention_dim
    x1 = on(unet, torch.randn(1, 4, s, s, generator=g))
    e1 = on(unet, torch.randn(1, 77, d, generator=g))
    t1 = torch.tensor([cfg.timesteps[0]], device=unet.device)
    conds = on(unet, torch.randn(cfg.variants, 77, d, generator=g))
    sample, tt, ehs = expand_batch(on(unet, torch.randn(1, 4, s, s, generator=g)), cfg.timesteps, conds)
    sample, ehs = sample.contiguous(), ehs.contiguous()
    n = sample.shape[0]

    def bare():
        with torch.no_grad():
            return unet(x1, t1, encoder_hidden_states=e1)

    def capture(names, stop, x, t, e):
        with Capture(unet, names, stop=stop, catalog=catalog) as cap:
            cap.run(x, t, encoder_hidden_states=e)
        return cap.cache

    def per_item():
        for i in range(n):
            capture(cfg.acts, True, sample[i : i + 1], tt[i : i + 1], ehs[i : i + 1])

    k = cfg.techniques
    tech = on(unet, torch.randn(k, 77, d, generator=g))  # one conditioning per technique variant
    xk, tk = x1.expand(k, -1, -1, -1).contiguous(), t1.expand(k).contiguous()

    def gate_sequential():  # the official code: one full pass per technique
        for i in range(k):
            capture(cfg.acts, False, x1, t1, tech[i : i + 1])

    tv = f"T x V = {len(cfg.timesteps)} x {cfg.variants}"
    return [
        Case("bare", "bare U-Net forward", 1, bare),
        Case("capture", f"capture {cfg.acts}, stop=False", 1, lambda: capture(cfg.acts, False, x1, t1, e1)),
        Case("early", f"capture {cfg.early_acts}, stop=True", 1, lambda: capture(cfg.early_acts, True, x1, t1, e1)),
        Case("batched", f"{tv} in one forward ({cfg.acts}, stop)", n, lambda: capture(cfg.acts, True, sample, tt, ehs)),
        Case("per_item", f"{tv}, one forward per item", n, per_item),
        Case("gate_batched", f"{k} technique variants in one forward ({cfg.acts}, stop)", k,
             lambda: capture(cfg.acts, True, xk, tk, tech)),
        Case("gate_sequential", f"{k} technique variants, {k} full passes", k, gate_sequential),
    ]  # fmt: skip


def extraction_cases(pipe, images: np.ndarray, cfg: PerfConfig, workdir: str | os.PathLike) -> list[Case]:
    """difstudy's extract() vs naive_extract() on the same images (one batch), fresh cache each call,
    and the bare U-Net forward over that batch up to the last needed module."""
    from ..extract import extract

    ds = as_dataset(images)
    counter = iter(range(1 << 30))

    def fresh() -> Path:
        p = Path(workdir) / f"run{next(counter)}"
        p.mkdir(parents=True)
        return p

    def ours():
        return extract(
            pipe, ds, cfg.acts, batch_size=len(ds), cache_dir=fresh(), progress=False, model_name="bench", seed=cfg.seed
        )

    def naive():
        return naive_extract(pipe, ds, cfg.acts, batch_size=len(ds), seed=cfg.seed, out_path=fresh() / "naive.pt")

    n = len(ds)
    unet = pipe.unet
    s = images.shape[1] // 8
    g = torch.Generator().manual_seed(cfg.seed)
    x, ehs = torch.randn(n, 4, s, s, generator=g), torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    x, ehs, tt = on(unet, x), on(unet, ehs), torch.full((n,), 50, device=unet.device)
    last = last_module(Catalog(unet, latent_size=s), cfg.acts)
    return [
        Case("extract", f"difstudy extract(), {n} images", n, ours),
        Case("naive", f"naive hooks + list + stack, {n} images", n, naive),
        Case("until", f"bare forward up to {last}, {n} images", n, lambda: forward_until(unet, last, x, tt, ehs)),
    ]


def transformer_cases(cfg: PerfConfig, layout: str = "tiny-flux", latent: int = 32) -> list[Case]:
    """A diffusion transformer's bare forward against early stop after its middle block's output
    (the tiny FLUX layout: double- then single-stream blocks, at ``latent`` cells: 256 tokens)."""
    from ..models import layouts

    model = layouts.tiny_transformer(layout)
    if cfg.device != "cpu" or cfg.dtype != "fp32":
        model = model.to(cfg.device, as_dtype(cfg.dtype))
    kw = {k: v.to(cfg.device, model.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in layouts.example_inputs(layout, batch=1, seed=cfg.seed, latent=latent).items()}  # fmt: skip
    catalog = Catalog(model, latent_size=latent, text_len=layouts.layout(layout)["text_len"])
    blocks = sorted({a.block for a in catalog if a.block is not None})
    mid = f"vit-block{blocks[len(blocks) // 2 - 1]}-out"

    def bare():
        with torch.no_grad():
            return model(**kw)

    def early():
        with Capture(model, [mid], stop=True, catalog=catalog) as cap:
            cap.run(**kw)
        return cap.cache

    return [
        Case("dit_bare", f"bare {layout} forward ({len(blocks)} blocks)", 1, bare),
        Case("dit_early", f"capture {mid} of {layout}, stop=True", 1, early),
    ]


def on(unet, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the U-Net's device and in its dtype (the timed inputs are drawn on CPU, so a seed
    gives the same inputs on every device)."""
    return x.to(unet.device, unet.dtype)


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What makes a timing honest on ``device``: CUDA kernels run asynchronously, so the clock is
    read only after ``torch.cuda.synchronize``; nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run_interleaved(
    cases: Sequence[Case], repeats: int, warmup: int = 0, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Each repeat runs every case once; the order rotates between repeats. ``sync`` is called
    before the clock starts and before it stops (see :func:`synchronizer`)."""
    for _ in range(warmup):
        for c in cases:
            c.fn()
    times: dict[str, list[float]] = {c.key: [] for c in cases}
    for r in range(repeats):
        k = r % len(cases)
        for c in list(cases[k:]) + list(cases[:k]):
            gc.collect()
            sync()
            t0 = time.perf_counter()
            c.fn()
            sync()
            times[c.key].append(time.perf_counter() - t0)
    return times


def timing_rows(cases: Sequence[Case], times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for c in cases:
        ts = times[c.key]
        med = float(np.median(ts))
        rows.append(
            dict(
                section="time",
                case=c.key,
                what=c.label,
                items=c.items,
                repeats=len(ts),
                median_s=med,
                min_s=float(min(ts)),
                max_s=float(max(ts)),
                per_item_s=med / c.items,
            )
        )
    return rows
