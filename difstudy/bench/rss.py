"""Peak RSS of extraction and of the naive approach, each measured in a fresh process forked from
one helper that only imported the libraries (see :mod:`difstudy.bench`)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .workload import as_dataset, naive_extract, toy_images


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

    from ..extract import extract
    from ..models import load

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
    from .. import extract, models  # noqa: F401  (shared by every child)

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
        code = "from difstudy.bench.rss import _child_main; _child_main()"
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
    code = "from difstudy.bench.rss import _launcher_main; _launcher_main()"
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
