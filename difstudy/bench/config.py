"""What the benchmark measures and how it is judged: the goals, the definitions of the ratios, the
run presets (:class:`PerfConfig`, :func:`config_for`) and the ratios computed from the timings and
the RSS results, with their PASS/FAIL verdicts and the ``key=value`` line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SD15_WIDTHS = (320, 640, 1280, 1280)
RATIO_KEYS = (
    "overhead", "early_stop", "early_stop_dit", "batching", "amalgamation", "rss_ratio", "naive_rss_ratio", "naive_time_ratio",
    "engine_efficiency",
)  # fmt: skip
# metric -> (comparison, threshold); None: reported only, no goal was set
GOALS: dict[str, tuple[str, float] | None] = {
    "overhead": ("<=", 1.05),
    "early_stop": ("<=", 0.60),
    "early_stop_dit": ("<=", 0.75),
    "batching": (">=", 1.30),
    "amalgamation": (">=", 1.00),
    "rss_ratio": ("<=", 1.10),
    "naive_rss_ratio": None,
    "naive_time_ratio": (">=", 1.00),
    "engine_efficiency": (">=", 0.85),
}
DEFINITIONS = {
    "overhead": "capture ours-v1.5 stop=False / bare forward (median time)",
    "early_stop": "capture mid-vit-out stop=True / bare forward (median time)",
    "early_stop_dit": "diffusion transformer (tiny FLUX layout): capture the middle block's output stop=True / bare forward",
    "batching": "per-sample time, one forward per item / TxV in one forward",
    "amalgamation": "official bucket set (6 variants: 2 prompt seeds, 2 LoRA weights, 2 ControlNet seeds): "
    "6 full extractions (official GATE) / one batched early-stopped GATE extraction",
    "amalgamation_prompts": "k prompt variants: k sequential full passes / one batched early-stopped forward",
    "rss_ratio": "peak-RSS increase over post-load baseline, extract N=large / N=small",
    "naive_rss_ratio": "peak-RSS increase, naive / extract, both N=large (>1: naive uses more)",
    "naive_time_ratio": "time per image, naive / extract, same images (>1: naive is slower)",
    "engine_efficiency": "bare U-Net forward to the last needed module / extract, same batch (1: no overhead)",
    "rss_ratio_raw": "raw peak RSS, extract N=large / N=small (not baseline-corrected)",
    "naive_rss_ratio_raw": "raw peak RSS, naive / extract, both N=large (not baseline-corrected)",
}
MIN_INCREASE = 1 << 20  # RSS increases are floored at 1 MiB so a ratio never divides by noise


@dataclass
class PerfConfig:
    """What the benchmark runs; :func:`config_for` gives the full and quick presets."""

    widths: tuple[int, ...] = SD15_WIDTHS
    norm_num_groups: int = 32
    latent: int = 8  # latent side of the timed U-Net (images of 8x that many pixels)
    repeats: int = 5
    warmup: int = 1  # untimed rounds of every case before the timed ones
    threads: int = 1
    timesteps: tuple[int, ...] = (50, 250)  # T of the batching case
    variants: int = 2  # V of the batching case
    techniques: int = 3  # k of the prompt-variant amalgamation case
    official_set: bool = True  # the amalgamation ratio on GATE's official bucket set (bench/official.py)
    time_images: int = 4  # images of the naive-vs-extract timing (one batch)
    acts: str = "ours-v1.5"
    early_acts: str = "mid-vit-out"
    mem_model: str = "tiny-sd15"
    mem_sizes: tuple[int, int] = (64, 512)  # (small N, large N) images of the RSS runs
    mem_image_size: int = 128
    mem_batch: int = 8
    naive_small: bool = True  # also run the naive approach at the small N (shows its growth)
    seed: int = 0
    quick: bool = False
    device: str = "cpu"  # where the timed U-Net runs (the RSS runs are host-memory measurements, always CPU)
    dtype: str = "fp32"
    notes: list[str] = field(default_factory=list)


def config_for(quick: bool = False, device: str = "cpu", dtype: str | None = None) -> PerfConfig:
    """The presets. On a GPU (``device`` not ``cpu``) the timed U-Net runs at the real SD1.5 scale,
    512 px images (latent 64), fp16 by default, with 10 repeats; the RSS runs stay on CPU."""
    if device != "cpu":
        return PerfConfig(
            latent=64,
            repeats=3 if quick else 10,
            device=device,
            dtype=dtype or "fp16",
            quick=quick,
            notes=[
                f"--device {device}: the timed U-Net at SD1.5 widths on 512 px images (latent 64), "
                f"{dtype or 'fp16'}, CUDA-synchronised timings; the RSS rows are host memory on CPU (tiny-sd15)"
            ],
        )
    if not quick:
        return PerfConfig(dtype=dtype or "fp32")
    return PerfConfig(
        dtype=dtype or "fp32",
        repeats=3,
        warmup=0,
        time_images=1,
        mem_image_size=64,
        naive_small=False,
        quick=True,
        notes=[
            "--quick: 3 repeats (full: 5), no untimed warm-up round (only one bare forward per batch size), "
            "naive-vs-extract timing on 1 image (full: 4), RSS on 64 px images (full: 128 px), "
            "naive RSS only at the large N"
        ],
    )


def compute_ratios(times: dict[str, list[float]], rss: Sequence[dict], sizes: tuple[int, int]) -> dict[str, float]:
    """The headline ratios (see :data:`DEFINITIONS`) from interleaved timings and RSS results."""
    med = {k: float(np.median(v)) for k, v in times.items()}
    by = {(r["impl"], r["n"]): r for r in rss}
    small, large = sizes
    inc = lambda impl, n: max(by[(impl, n)]["increase"], MIN_INCREASE)
    return dict(
        overhead=med["capture"] / med["bare"],
        early_stop=med["early"] / med["bare"],
        early_stop_dit=med["dit_early"] / med["dit_bare"] if "dit_bare" in med else np.nan,
        batching=med["per_item"] / med["batched"],
        amalgamation=med["official_sequential"] / med["official_batched"] if "official_batched" in med else np.nan,
        rss_ratio=inc("difstudy", large) / inc("difstudy", small),
        naive_rss_ratio=inc("naive", large) / inc("difstudy", large),
        naive_time_ratio=med["naive"] / med["extract"],
        engine_efficiency=med["until"] / med["extract"],
        rss_ratio_raw=by[("difstudy", large)]["peak_rss"] / by[("difstudy", small)]["peak_rss"],
        naive_rss_ratio_raw=by[("naive", large)]["peak_rss"] / by[("difstudy", large)]["peak_rss"],
        amalgamation_prompts=med["gate_sequential"] / med["gate_batched"],
    )


def status(key: str, value: float) -> str:
    goal = GOALS.get(key)
    if goal is None:
        return "info"
    if np.isnan(value):
        return "not run"
    op, thr = goal
    ok = value <= thr if op == "<=" else value >= thr
    return "PASS" if ok else "FAIL"


def ratio_rows(ratios: dict[str, float], sizes: tuple[int, int]) -> list[dict]:
    rows = []
    for k, v in ratios.items():
        goal = GOALS.get(k)
        what = DEFINITIONS[k].replace("N=large", f"N={sizes[1]}").replace("N=small", f"N={sizes[0]}")
        rows.append(
            dict(
                section="ratio",
                case=k,
                what=what,
                value=v,
                goal=f"{goal[0]} {goal[1]:.2f}" if goal else "-",
                status=status(k, v),
            )
        )
    return rows


def format_line(ratios: dict[str, float]) -> str:
    return " ".join(f"{k}={ratios[k]:.2f}" for k in RATIO_KEYS)


def parse_line(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in line.split())}
