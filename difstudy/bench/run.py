"""The whole benchmark: :func:`run_bench` runs the RSS measurements and the timings, prints the
tables and the ratio line, and writes the tidy rows."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..catalog import Catalog
from ..fileio import write_csv_atomic
from ..models import as_dtype
from .config import PerfConfig, compute_ratios, format_line, ratio_rows
from .official import official_cases
from .rss import rss_rows, rss_run, rss_start, rss_wait
from .timing import extraction_cases, forward_cases, run_interleaved, synchronizer, timing_rows, transformer_cases
from .workload import build_unet, feature_bytes, pipeline_with, toy_images


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    df = pd.DataFrame(rows)[list(cols)]
    with pd.option_context("display.width", 250, "display.max_colwidth", 90, "display.max_columns", None):
        return df.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def run_bench(
    cfg: PerfConfig, out: str | os.PathLike | None = None, log=print, rss_in_process: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Run everything, print the tables and the ratio line; returns (tidy rows, ratios).

    ``rss_in_process`` runs the RSS measurements one after the other in this
    process (for tests only: the numbers are then not meaningful)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    ncpu = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    px = cfg.latent * 8
    device_name = "CPU" if cfg.device == "cpu" else torch.cuda.get_device_name(cfg.device)
    where = "CPU" if cfg.device == "cpu" else f"{cfg.device} ({device_name})"
    log(
        f"difstudy bench{' --quick' if cfg.quick else ''}: {where}, {cfg.dtype}, torch {torch.__version__}, "
        f"{cfg.threads} thread(s) of {ncpu} cores; load average {load:.2f} at start"
    )
    if load > ncpu - cfg.threads + 0.5:
        log("  note: other processes are busy on this machine; absolute timings are contended (ratios less so)")
    log(
        f"timed U-Net: SD1.5 layout, widths {tuple(cfg.widths)}, latent {cfg.latent}x{cfg.latent} "
        f"({px} px images), seed {cfg.seed}; {cfg.repeats} interleaved repeats, medians"
    )
    log(
        f"RSS: {cfg.mem_model}, {cfg.mem_image_size} px toy images, N = {cfg.mem_sizes[0]} vs {cfg.mem_sizes[1]}, "
        f"batch {cfg.mem_batch}, one fresh process per run"
    )
    for n in cfg.notes:
        log(n)
    small, large = cfg.mem_sizes
    with tempfile.TemporaryDirectory(prefix="difstudy-bench-") as tmp:
        # RSS subprocesses first: they run while the large U-Net is built, never during timings
        img_path = Path(tmp) / "images.npy"
        render = dict(path=str(img_path), n=large, size=cfg.mem_image_size, seed=cfg.seed)
        runs = [("difstudy", small), ("difstudy", large), ("naive", large)]
        if cfg.naive_small:
            runs.append(("naive", small))
        specs = []
        for i, (impl, n) in enumerate(runs):
            spec = dict(
                impl=impl,
                n=n,
                images=str(img_path),
                model=cfg.mem_model,
                acts=cfg.acts,
                image_size=cfg.mem_image_size,
                batch=cfg.mem_batch,
                cache=str(Path(tmp) / f"rss{i}"),
                threads=cfg.threads,
                seed=cfg.seed,
            )
            Path(spec["cache"]).mkdir()
            specs.append(spec)
        if rss_in_process:
            np.save(img_path, toy_images(large, cfg.mem_image_size, cfg.seed))
            rss = [rss_run(spec) for spec in specs]
        else:
            launcher = rss_start(specs, render)
            log(f"started {len(specs)} RSS measurement processes; building the timed U-Net ...")
        t0 = time.perf_counter()
        try:
            unet = build_unet(cfg.widths, cfg.latent, cfg.seed, cfg.norm_num_groups)
            n_params = sum(p.numel() for p in unet.parameters())
            pipe = pipeline_with(unet)
            if cfg.device != "cpu" or cfg.dtype != "fp32":
                pipe, unet = pipe.to(cfg.device, as_dtype(cfg.dtype)), pipe.unet
            log(f"  built in {time.perf_counter() - t0:.1f} s ({n_params / 1e6:.0f} M parameters)")
        except BaseException:
            if not rss_in_process:
                launcher.kill()
            raise
        if not rss_in_process:
            t0 = time.perf_counter()
            rss = rss_wait(launcher)
            log(f"  RSS processes done (waited {time.perf_counter() - t0:.1f} s more)")

        catalog = Catalog(unet, latent_size=cfg.latent)
        mb_512px = feature_bytes(Catalog(unet, latent_size=64), cfg.acts) / (1 << 20)
        time_imgs = toy_images(cfg.time_images, px, cfg.seed + 1)
        cases = forward_cases(unet, cfg, catalog) + extraction_cases(pipe, time_imgs, cfg, Path(tmp) / "time")
        if cfg.official_set:
            cases += official_cases(pipe, time_imgs[0], cfg, tmp)
        cases += transformer_cases(cfg)
        if cfg.warmup == 0:  # light warm-up: one bare forward per batch size used
            with torch.no_grad():
                for b in sorted({1, len(cfg.timesteps) * cfg.variants}):
                    x = torch.randn(b, 4, cfg.latent, cfg.latent, device=cfg.device, dtype=unet.dtype)
                    e = torch.randn(b, 77, unet.config.cross_attention_dim, device=cfg.device, dtype=unet.dtype)
                    unet(x, torch.full((b,), 50, device=cfg.device), encoder_hidden_states=e)
        log(f"timing {len(cases)} cases x {cfg.repeats} repeats ...")
        times = run_interleaved(cases, cfg.repeats, cfg.warmup, sync=synchronizer(cfg.device))

    ratios = compute_ratios(times, rss, cfg.mem_sizes)
    t_rows, r_rows, q_rows = timing_rows(cases, times), rss_rows(rss), ratio_rows(ratios, cfg.mem_sizes)
    log("")
    log(_table(t_rows, ["case", "what", "items", "repeats", "median_s", "min_s", "max_s", "per_item_s"]))
    log("")
    log(_table(r_rows, ["case", "what", "baseline_mb", "peak_mb", "increase_mb", "features_mb", "seconds"]))
    log(
        f"  peak RSS by {rss[0]['method']}; increase = peak - RSS after model + image list load; "
        "features_mb: naive in RAM (fp32), extract on disk (fp16); seconds: runs overlap, info only"
    )
    log(
        f"  {cfg.acts} of the timed U-Net at 512 px: {mb_512px:.1f} MB per image in fp32 (the naive approach keeps it in RAM)"
    )
    log("")
    log(_table(q_rows, ["case", "value", "goal", "status", "what"]))
    df = pd.DataFrame(t_rows + r_rows + q_rows)
    for k, v in asdict(cfg).items():
        if k != "notes":
            df[f"cfg_{k}"] = str(v)
    from ..study import git_commit  # the run's provenance, for `difstudy report`

    df["commit"], df["cpus"], df["load_at_start"] = git_commit(), ncpu, round(load, 2)
    df["device_name"] = device_name
    df["total_s"] = round(time.perf_counter() - t_start, 1)
    if out is not None:
        write_csv_atomic(df, out)  # creates the folder: a finished run is never lost to a missing one
        log(f"wrote {len(df)} rows to {out}")
    log(f"total {time.perf_counter() - t_start:.1f} s")
    log(format_line(ratios))
    return df, ratios
