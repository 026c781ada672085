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
  - ``early_stop_dit``: the same for a diffusion transformer (the tiny FLUX layout,
    :func:`~difstudy.bench.timing.transformer_cases`: 2 double- and 2 single-stream blocks, 256
    tokens): capture of the middle block's output with ``stop=True`` / bare forward;
  - ``batching``: T x V items (2 timesteps x 2 conditioning variants) laid
    out by :func:`~difstudy.capture.expand_batch` in one forward vs one
    forward per item (per-sample speed-up, both with ``ours-v1.5`` capture);
  - ``amalgamation``: GATE's feature amalgamation on the official bucket set
    (:mod:`difstudy.bench.official`: 2 prompt seeds, a LoRA at 2 weights, the canny ControlNet
    with 2 seeds on its denoising path): the official code runs one full extraction per variant,
    difstudy one extraction with the six variants along the batch axis, stopped after the last
    needed module (speed-up, sequential / batched, both capturing ``ours-v1.5``, both loading
    their adapters); ``amalgamation_prompts`` (info): the same for ``k`` prompt variants
    (``--techniques``, 3) of one bare U-Net forward each;
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

The parts: :mod:`~difstudy.bench.config` (goals, presets, ratios),
:mod:`~difstudy.bench.workload` (the timed U-Net, toy images, the naive approach),
:mod:`~difstudy.bench.timing` (the timed cases), :mod:`~difstudy.bench.rss` (peak-RSS processes) and
:mod:`~difstudy.bench.run` (:func:`run_bench`, the tables and the ratio line).
"""

from .config import (
    DEFINITIONS,
    GOALS,
    MIN_INCREASE,
    RATIO_KEYS,
    SD15_WIDTHS,
    PerfConfig,
    compute_ratios,
    config_for,
    format_line,
    parse_line,
    ratio_rows,
    status,
)
from .rss import rss_rows, rss_run, rss_start, rss_wait
from .run import run_bench
from .timing import Case, extraction_cases, forward_cases, run_interleaved, timing_rows
from .workload import (
    as_dataset,
    build_unet,
    feature_bytes,
    forward_until,
    last_module,
    naive_extract,
    pipeline_with,
    seeded_init,
    toy_images,
)

__all__ = [
    "DEFINITIONS",
    "GOALS",
    "MIN_INCREASE",
    "RATIO_KEYS",
    "SD15_WIDTHS",
    "Case",
    "PerfConfig",
    "as_dataset",
    "build_unet",
    "compute_ratios",
    "config_for",
    "extraction_cases",
    "feature_bytes",
    "format_line",
    "forward_cases",
    "forward_until",
    "last_module",
    "naive_extract",
    "parse_line",
    "pipeline_with",
    "ratio_rows",
    "rss_rows",
    "rss_run",
    "rss_start",
    "rss_wait",
    "run_bench",
    "run_interleaved",
    "seeded_init",
    "status",
    "timing_rows",
    "toy_images",
]
