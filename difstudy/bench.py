"""Benchmark of capture and extraction: ``python -m difstudy bench [--quick] [--out results.csv]``.

Everything runs on CPU with a fixed thread count (``--threads``, default 1:
on a small shared machine more threads than free cores makes OpenMP spin and
inflates every timing). Measured side by side in one run:

- **timings** on a U-Net with the SD1.5 block layout *and* the real SD1.5
  widths (``UNet2DConditionModel``, channels 320/640/1280/1280, 2 layers per
  block, 8 heads, cross-attention 768; random weights from a fixed seed) at
  a small latent size. Every case runs once per repeat, the cases interleaved
  (their order rotates between repeats), and medians are reported:

  - ``overhead``: capture of ``ours-v1.5`` with ``stop=False`` / bare forward;
  - ``early_stop``: capture of ``mid-vit-out`` with ``stop=True`` / bare forward;
  - ``batching``: T x V items (2 timesteps x 2 conditioning variants) laid
    out by :func:`~difstudy.capture.expand_batch` in one forward vs one
    forward per item (per-sample speed-up, both with ``ours-v1.5`` capture);
  - ``amalgamation``: GATE's feature amalgamation needs the features of
    ``k`` technique variants (``--techniques``, 3: e.g. empty, generic and
    fine-grained prompts) of one image: the official code runs ``k``
    sequential full passes (``stop=False``), difstudy one forward with the
    variants along the batch axis, stopped after the last needed module
    (speed-up, sequential / batched, both capturing ``ours-v1.5``);
  - ``naive_time_ratio``: time per image of :func:`naive_extract` (the
    official code's approach, see below) / :func:`difstudy.extract.extract`,
    both on the same images with this U-Net (tiny VAE and text encoder);
  - ``engine_efficiency``: a bare U-Net forward over the same batch, stopped
    right after the last module the activations need (:func:`forward_until`)
    / :func:`~difstudy.extract.extract` (everything it does besides that
    forward, VAE, text encoder, noising, hooks, cache group, shard write, is
    overhead; 1.0 would be none).

- **peak RSS**, each run in a fresh process with the ``tiny-sd15`` model
  and a list of toy-world images: :func:`~difstudy.extract.extract` into a
  temporary cache for 512 and 64 images (``rss_ratio``) and
  :func:`naive_extract` for 512 images (``naive_rss_ratio``). The processes
  are forked from one helper subprocess that only imported the libraries (so
  the import is paid once) and run while the large U-Net is built, never
  during the timings; they overlap each other, so their times are info only.
  The measure is
  the *increase* of peak RSS over the RSS after the model and the image list
  are loaded (the kernel's high-water mark, reset at that point through
  ``/proc/self/clear_refs``, and a psutil sampler; the larger is used), so
  the interpreter, torch and the weights, identical in every run, do not
  dilute the ratio. The raw peak ratios are printed beside them.

The last line printed holds the ratios as ``key=value`` pairs. Goals are
printed as PASS/FAIL, but this is a measurement: the command exits 0.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .capture import Capture, expand_batch
from .catalog import QKV_KINDS, Catalog
from .fileio import write_csv_atomic

SD15_WIDTHS = (320, 640, 1280, 1280)
RATIO_KEYS = (
    "overhead", "early_stop", "batching", "amalgamation", "rss_ratio", "naive_rss_ratio", "naive_time_ratio",
    "engine_efficiency",
)  # fmt: skip
# metric -> (comparison, threshold); None: reported only, no goal was set
GOALS: dict[str, tuple[str, float] | None] = {
    "overhead": ("<=", 1.05),
    "early_stop": ("<=", 0.60),
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
    "batching": "per-sample time, one forward per item / TxV in one forward",
    "amalgamation": "k technique variants: k sequential full passes (official GATE) / one batched early-stopped forward",
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
    techniques: int = 3  # k of the amalgamation case
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
    notes: list[str] = field(default_factory=list)


def config_for(quick: bool = False) -> PerfConfig:
    if not quick:
        return PerfConfig()
    return PerfConfig(
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


# -- models ------------------------------------------------------------------------
def build_unet(widths: Sequence[int] = SD15_WIDTHS, latent: int = 8, seed: int = 0, norm_num_groups: int = 32):
    """SD1.5 block layout (and, with the default widths, its real sizes), random seeded weights.

    Built on the meta device and filled once (:func:`seeded_init`) instead of
    initialised by every layer and then overwritten: the same kind of weights in
    a fraction of the time (860 M parameters at the SD1.5 widths)."""
    from diffusers import UNet2DConditionModel

    from .models.tiny import SD_DOWN, SD_UP

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=SD_DOWN,
            up_block_types=SD_UP,
            block_out_channels=tuple(widths),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=norm_num_groups,
            sample_size=latent,
            in_channels=4,
            out_channels=4,
        )
    return seeded_init(unet.to_empty(device="cpu"), seed).eval().requires_grad_(False)


@torch.no_grad()
def seeded_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """PyTorch's default ranges from one seeded generator: weights of linear and conv
    layers uniform in +-1/sqrt(fan_in), biases zero, normalisation scales one."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            bound = p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=g)
        else:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def pipeline_with(unet):
    """A StableDiffusionPipeline around ``unet`` with tiny-sd15's VAE, text encoder and scheduler,
    so :func:`~difstudy.extract.extract` can drive it (the U-Net dominates the cost)."""
    from diffusers import StableDiffusionPipeline

    from .models.tiny import build_tiny

    tiny = build_tiny("tiny-sd15")
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 toy-world test images."""
    from .data.toyworld import ToyWorld

    return np.stack([s.image for s in ToyWorld("test", n=n, size=size, seed=seed)])


def feature_bytes(catalog: Catalog, activations, bytes_per_value: int = 4) -> int:
    """Bytes of one image's features for ``activations`` (catalogue shapes)."""
    return sum(int(np.prod(catalog[n].shape)) * bytes_per_value for n in catalog.resolve(activations))


def as_dataset(images: np.ndarray) -> list[dict]:
    """A list of loader-style samples (``image``, ``image_id``)."""
    return [{"image": images[i], "image_id": f"toy{i:05d}"} for i in range(len(images))]


# -- the naive approach -----------------------------------------------------------
def naive_extract(
    pipe,
    dataset,
    activations,
    t: int = 50,
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 8,
    out_path: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The official code's approach, re-implemented naively for comparison.

    Same inputs as :class:`~difstudy.extract.Extractor` (VAE mean, DDPM
    noising with the same noise draw per image, empty prompt), but: a forward hook on every
    requested module (``to_q``/``to_k``/``to_v`` for q/k/v, the module itself
    otherwise), a **full** forward (no early stop), each output appended to a
    Python list in RAM as captured (float32, diffusers' layout), and
    everything stacked at the end (and ``torch.save``-d to ``out_path``).
    Attention maps and ``unet-in`` are not supported.
    """
    from .extract import ddpm_alphas_cumprod, ddpm_noise, image_digest, noise_for, to_tensor
    from .models import vae_scale_factor

    unet = pipe.unet
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise ValueError("naive_extract supports the SD1.x/2.x layout only")
    factor = vae_scale_factor(pipe)
    size = int(image_size or unet.config.sample_size * factor)
    cat = Catalog(unet, latent_size=size // factor)
    names = cat.resolve(activations)
    mods = dict(unet.named_modules())
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        a = cat[n] if n in cat else None
        if a is None:
            path = n
        elif a.kind in QKV_KINDS:
            path = f"{a.module}.to_{a.kind[-1]}"
        elif a.is_map or a.kind == "unet-in":
            raise ValueError(f"naive_extract does not support {a.kind} ({n})")
        else:
            path = a.module
        handles.append(
            mods[path].register_forward_hook(lambda m, i, o, n=n: feats[n].append(_output_tensor(o).detach().cpu()))
        )
    alphas_cumprod = ddpm_alphas_cumprod(pipe.scheduler)
    try:
        with torch.no_grad():
            ehs = pipe.encode_prompt("", unet.device, 1, False)[0]
            for start in range(0, len(dataset), batch_size):
                images = [dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))]
                x = torch.stack([to_tensor(im, size) for im in images]).to(unet.device, pipe.vae.dtype)
                z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
                noise = torch.stack([noise_for(image_digest(im), t, seed, z.shape[1:]) for im in images]).to(z)
                tt = torch.full((len(images),), t, dtype=torch.long, device=unet.device)
                zt = ddpm_noise(z, noise, t, alphas_cumprod)
                unet(zt.to(unet.dtype), tt, encoder_hidden_states=ehs.expand(len(images), -1, -1))
    finally:
        for h in handles:
            h.remove()
    stacked = {n: torch.cat(v) for n, v in feats.items()}
    if out_path is not None:
        torch.save(stacked, out_path)
    return stacked


def _output_tensor(out):
    """The tensor of a module output (a tensor, a diffusers output with ``sample``, or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


class _Stop(Exception):
    pass


def last_module(catalog: Catalog, activations) -> str:
    """Module path after which every activation of ``activations`` is available (forward order)."""
    last = catalog.resolve(activations)[-1]
    return catalog[last].module if last in catalog else last


def forward_until(unet, module_path: str, *args, **kwargs) -> None:
    """A bare forward of ``unet`` interrupted right after ``module_path`` runs: one forward
    hook, nothing recorded (the least any extraction of activations up to there must do)."""

    def stop(module, inputs, output):
        raise _Stop

    handle = dict(unet.named_modules())[module_path].register_forward_hook(stop)
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()


# -- timings ------------------------------------------------------------------------
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
    x1 = torch.randn(1, 4, s, s, generator=g)
    e1 = torch.randn(1, 77, d, generator=g)
    t1 = torch.tensor([cfg.timesteps[0]])
    conds = torch.randn(cfg.variants, 77, d, generator=g)
    sample, tt, ehs = expand_batch(torch.randn(1, 4, s, s, generator=g), cfg.timesteps, conds)
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
    tech = torch.randn(k, 77, d, generator=g)  # one conditioning per technique variant
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
    from .extract import extract

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
    tt = torch.full((n,), 50)
    last = last_module(Catalog(unet, latent_size=s), cfg.acts)
    return [
        Case("extract", f"difstudy extract(), {n} images", n, ours),
        Case("naive", f"naive hooks + list + stack, {n} images", n, naive),
        Case("until", f"bare forward up to {last}, {n} images", n, lambda: forward_until(unet, last, x, tt, ehs)),
    ]


def run_interleaved(cases: Sequence[Case], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Each repeat runs every case once; the order rotates between repeats."""
    for _ in range(warmup):
        for c in cases:
            c.fn()
    times: dict[str, list[float]] = {c.key: [] for c in cases}
    for r in range(repeats):
        k = r % len(cases)
        for c in list(cases[k:]) + list(cases[:k]):
            gc.collect()
            t0 = time.perf_counter()
            c.fn()
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


# -- peak RSS -------------------------------------------------------------------
class _PeakSampler:
    """Polls the process RSS with psutil in a thread."""

    def __init__(self, proc, interval: float = 0.005):
        self.proc, self.interval = proc, interval
        self.peak = proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return False


def _reset_kernel_peak() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0); False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _kernel_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_run(spec: dict, pipe=None) -> dict:
    """One RSS measurement (meant for a fresh process: see :func:`rss_start`).

    ``spec``: impl (``difstudy`` | ``naive``), n, images (an .npy path), acts,
    image_size, batch, cache (a folder), seed, model (used when ``pipe`` is None).
    Baseline: RSS after the model and the image list are loaded.
    """
    import psutil

    from .extract import extract
    from .models import load

    if pipe is None:
        pipe = load(spec["model"])
    ds = as_dataset(np.load(spec["images"], mmap_mode="r")[: spec["n"]].copy())
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    kernel = _reset_kernel_peak()
    t0 = time.perf_counter()
    with _PeakSampler(proc) as sampler:
        if spec["impl"] == "difstudy":
            cache, _ = extract(
                pipe,
                ds,
                spec["acts"],
                image_size=spec["image_size"],
                batch_size=spec["batch"],
                cache_dir=spec["cache"],
                progress=False,
                model_name=spec.get("model", "bench"),
                seed=spec.get("seed", 0),
            )
            kept = cache.summary()["bytes"]  # on disk, float16
        elif spec["impl"] == "naive":
            feats = naive_extract(
                pipe,
                ds,
                spec["acts"],
                image_size=spec["image_size"],
                batch_size=spec["batch"],
                seed=spec.get("seed", 0),
                out_path=Path(spec["cache"]) / "naive.pt",
            )
            kept = sum(v.nbytes for v in feats.values())  # in RAM, float32
        else:
            raise ValueError(f"unknown impl {spec['impl']!r}")
    secs = time.perf_counter() - t0
    peak = max(sampler.peak, _kernel_peak() if kernel else 0)
    return dict(
        impl=spec["impl"],
        n=int(spec["n"]),
        baseline_rss=int(base),
        peak_rss=int(peak),
        increase=int(max(peak - base, 0)),
        seconds=secs,
        features=int(kept),
        method="VmHWM reset + psutil sampler" if kernel else "psutil sampler (5 ms)",
    )


def _child_main() -> None:
    """Entry point of one measurement process (used where ``os.fork`` is unavailable)."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    sys.stdout.write("\n" + json.dumps(rss_run(spec)) + "\n")


def _forked(spec: dict) -> tuple[int, int]:
    """Fork one measurement child; returns (pid, read end of the pipe its JSON result comes through)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return pid, r
    os.close(r)  # child: measure, report, exit without running the parent's cleanup
    code = 0
    try:
        torch.set_num_threads(spec["threads"])
        payload = json.dumps(rss_run(spec))
    except BaseException:
        payload, code = json.dumps({"error": traceback.format_exc()}), 1
    with os.fdopen(w, "w") as f:
        f.write(payload)
    os._exit(code)


def _launcher_main() -> None:
    """Entry point of the RSS helper process.

    It imports what extraction needs once and runs no tensor code itself, then
    forks one child per measurement (all at once): each measurement gets a
    fresh process that has done nothing but import, without paying the
    import again. Prints the results as one JSON list."""
    from . import extract, models  # noqa: F401  (shared by every child)

    job = json.loads(sys.argv[1])
    specs, render = job["specs"], job.get("render")
    if render:  # the toy images every child loads (rendered here, off the main process)
        np.save(render["path"], toy_images(render["n"], render["size"], render["seed"]))
    results = []
    if hasattr(os, "fork"):
        kids = [_forked(spec) for spec in specs]
        for pid, r in kids:
            with os.fdopen(r) as f:
                data = f.read()
            os.waitpid(pid, 0)
            results.append(json.loads(data) if data else {"error": f"child {pid} died without a result"})
    else:
        code = "from difstudy.bench import _child_main; _child_main()"
        for spec in specs:
            p = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"error": p.stderr[-3000:]})
    sys.stdout.write("\n" + json.dumps(results) + "\n")


def rss_start(specs: Sequence[dict], render: dict | None = None) -> subprocess.Popen:
    """Start the RSS measurements of ``specs`` (see :func:`rss_run`) in the background;
    :func:`rss_wait` collects them. ``render`` (path, n, size, seed): toy images to
    write to ``path`` first (the specs' ``images``)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    code = "from difstudy.bench import _launcher_main; _launcher_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(dict(specs=list(specs), render=render))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def rss_wait(p: subprocess.Popen) -> list[dict]:
    out, err = p.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"RSS measurement process failed (exit {p.returncode}):\n{err[-3000:]}")
    results = json.loads(lines[-1])
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"RSS measurement failed:\n{errors[0][-3000:]}")
    return results


def rss_rows(results: Sequence[dict]) -> list[dict]:
    mb = 1 / (1 << 20)
    return [
        dict(
            section="rss",
            case=f"{r['impl']}-{r['n']}",
            what=f"{'difstudy extract()' if r['impl'] == 'difstudy' else 'naive hooks + list'}, {r['n']} images",
            items=r["n"],
            baseline_mb=r["baseline_rss"] * mb,
            peak_mb=r["peak_rss"] * mb,
            increase_mb=r["increase"] * mb,
            features_mb=r["features"] * mb,
            seconds=r["seconds"],
            per_item_s=r["seconds"] / r["n"],
            method=r["method"],
        )
        for r in results
    ]


# -- ratios and output ---------------------------------------------------------------
def compute_ratios(times: dict[str, list[float]], rss: Sequence[dict], sizes: tuple[int, int]) -> dict[str, float]:
    """The headline ratios (see :data:`DEFINITIONS`) from interleaved timings and RSS results."""
    med = {k: float(np.median(v)) for k, v in times.items()}
    by = {(r["impl"], r["n"]): r for r in rss}
    small, large = sizes
    inc = lambda impl, n: max(by[(impl, n)]["increase"], MIN_INCREASE)
    return dict(
        overhead=med["capture"] / med["bare"],
        early_stop=med["early"] / med["bare"],
        batching=med["per_item"] / med["batched"],
        amalgamation=med["gate_sequential"] / med["gate_batched"],
        rss_ratio=inc("difstudy", large) / inc("difstudy", small),
        naive_rss_ratio=inc("naive", large) / inc("difstudy", large),
        naive_time_ratio=med["naive"] / med["extract"],
        engine_efficiency=med["until"] / med["extract"],
        rss_ratio_raw=by[("difstudy", large)]["peak_rss"] / by[("difstudy", small)]["peak_rss"],
        naive_rss_ratio_raw=by[("naive", large)]["peak_rss"] / by[("difstudy", large)]["peak_rss"],
    )


def status(key: str, value: float) -> str:
    goal = GOALS.get(key)
    if goal is None:
        return "info"
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
    log(
        f"difstudy bench{' --quick' if cfg.quick else ''}: CPU, torch {torch.__version__}, "
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
        if cfg.warmup == 0:  # light warm-up: one bare forward per batch size used
            with torch.no_grad():
                for b in sorted({1, len(cfg.timesteps) * cfg.variants}):
                    x = torch.randn(b, 4, cfg.latent, cfg.latent)
                    e = torch.randn(b, 77, unet.config.cross_attention_dim)
                    unet(x, torch.full((b,), 50), encoder_hidden_states=e)
        log(f"timing {len(cases)} cases x {cfg.repeats} repeats ...")
        times = run_interleaved(cases, cfg.repeats, cfg.warmup)

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
    if out is not None:
        write_csv_atomic(df, out)  # creates the folder: a finished run is never lost to a missing one
        log(f"wrote {len(df)} rows to {out}")
    log(f"total {time.perf_counter() - t_start:.1f} s")
    log(format_line(ratios))
    return df, ratios
