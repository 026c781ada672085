"""Smoke test of the benchmark at a trivial size: format and plumbing only, no timed assertion."""

import math
import re

import pandas as pd
import torch

from difstudy import bench
from difstudy.catalog import Catalog

FLOAT = r"\d+\.\d\d"
LINE = re.compile(" ".join(f"{k}={FLOAT}" for k in bench.RATIO_KEYS))


def _tiny_cfg():
    return bench.PerfConfig(
        widths=(32, 64, 64, 64),
        norm_num_groups=8,
        repeats=1,
        warmup=1,
        time_images=1,
        mem_sizes=(2, 4),
        mem_image_size=64,
        naive_small=True,
    )


def test_run_bench_prints_tables_and_ratio_line(tmp_path):
    lines = []
    out = tmp_path / "bench.csv"
    df, ratios = bench.run_bench(_tiny_cfg(), out=out, log=lines.append, rss_in_process=True)
    last = lines[-1]
    assert LINE.fullmatch(last), last
    parsed = bench.parse_line(last)
    assert list(parsed) == list(bench.RATIO_KEYS)
    assert all(math.isfinite(v) and v > 0 for v in parsed.values())
    assert all(abs(parsed[k] - ratios[k]) <= 0.005 + 1e-9 for k in parsed)
    text = "\n".join(lines)
    for k, goal in bench.GOALS.items():  # every goal shown with its verdict
        row = next(ln for ln in text.splitlines() if ln.strip().startswith(k + " "))
        assert ("PASS" in row or "FAIL" in row) if goal else "info" in row
    assert "median_s" in text and "increase_mb" in text
    saved = pd.read_csv(out)
    assert set(saved["section"]) == {"time", "rss", "ratio"}
    assert set(saved.loc[saved.section == "rss", "case"]) == {"difstudy-2", "difstudy-4", "naive-2", "naive-4"}


def test_naive_extract_matches_extract(tiny_sd15, tmp_path):
    """The naive reimplementation computes the same activations (so the comparison is like for like)."""
    from difstudy.extract import extract

    ds = bench.as_dataset(bench.toy_images(2))
    names = ["up-level1-repeat2-res-out", "up-level3-repeat0-vit-block0-self-k"]
    naive = bench.naive_extract(tiny_sd15, ds, names, batch_size=2)
    cache, _ = extract(tiny_sd15, ds, names, cache_dir=tmp_path, progress=False, store_dtype=torch.float32)
    cat = Catalog(tiny_sd15.unet)
    for n in names:
        got = cache.load(n, [d["image_id"] for d in ds], 50, "empty", 0)
        ref = naive[n]
        if ref.dim() == 3:  # tokens (B, H*W, C) -> (B, C, H, W)
            ref = ref.transpose(1, 2).reshape(got.shape)
        assert got.shape[1:] == cat[n].shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cli_has_bench():
    from difstudy.cli import build_parser

    a = build_parser().parse_args(["bench", "--quick", "--out", "r.csv"])
    assert a.fn is bench._run_cli and a.quick and a.out == "r.csv" and a.threads == 1
