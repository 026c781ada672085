"""The rehearsal's cost accounting (difstudy.costs): forwards counted per notebook, scaled to the
full parameters, GPU minutes from the measured rate."""

import json
import os
import subprocess
import sys

import pytest

from difstudy import costs

COUNT = """
import torch
from difstudy.models import load
from tests.conftest import unet_inputs
pipe = load("tiny-sd15")
x, t, kw = unet_inputs(pipe, batch=3)
for _ in range(4):
    pipe.unet(x, t, **kw)
"""


def test_a_kernel_counts_its_forwards_and_writes_them_at_exit(tmp_path):
    from difstudy.study import ROOT

    (tmp_path / "work" / "cache").mkdir(parents=True)
    env = {**os.environ, costs.ENV: str(tmp_path / "log"), "DIFSTUDY_NOTEBOOK": "page", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", COUNT], env=env, cwd=tmp_path / "work", check=True, timeout=300)
    rec = json.loads((tmp_path / "log" / "page.json").read_text())
    assert (rec["notebook"], rec["models"], rec["forwards"], rec["samples"]) == ("page", ["tiny-sd15"], 4, 12)
    assert rec["latent_cells"] == 12 * 8 * 8 and rec["peak_rss_mb"] > 50 and rec["cache_bytes"] == 0


def test_without_the_variable_nothing_is_watched(tiny_sd15, monkeypatch):
    monkeypatch.delenv(costs.ENV, raising=False)
    before = len(tiny_sd15.unet._forward_pre_hooks)
    costs.watch(tiny_sd15, "tiny-sd15")
    assert len(tiny_sd15.unet._forward_pre_hooks) == before


def test_the_full_run_is_scaled_by_the_rehearsals_own_ratios(tmp_path):
    full = dict(n_images=400, n_pairs=200, seeds=[0, 1, 2, 3], img2img_steps=50, toy_size=512, n_val=None)
    small = dict(n_images=8, n_pairs=4, seeds=[0, 1], img2img_steps=5, toy_size=64, n_val=10)
    r = costs.scale_ratios(full, small)
    assert r == dict(counts={"n_images": 50.0, "n_pairs": 50.0}, unbounded=["n_val"], seeds=2.0, steps=10.0, area=64.0)
    rec = dict(notebook="page", forwards=10, samples=20, cache_bytes=2**20, peak_rss_mb=900.0)
    (tmp_path / "page.json").write_text(json.dumps(rec))
    rate = dict(samples_per_s=100.0, source="batched forward, H200")
    df = costs.table(tmp_path, {"page": (full, small)}, rate)
    row = df.iloc[0]
    assert (row.full_samples_low, row.full_samples_high) == (20 * 50, 20 * 50 * 2 * 10)
    assert row.gpu_min_low == pytest.approx(1000 / 100 / 60, abs=0.05)
    assert row.full_cache_gb_high == pytest.approx(50 * 2 * 64 / 1024, abs=0.01)  # images, seeds, area; not steps
    assert row.unbounded == "n_val" and row.rate_source == "batched forward, H200"
    assert "gpu_min_low" not in costs.table(tmp_path, {"page": (full, small)}, None)
    gate = costs.scale_ratios(dict(timestep=50, denoising_from=60), dict(timestep=50, denoising_from=52))
    assert gate["steps"] == 11 / 3  # ControlNet path: 10 guided steps and the feature forward, against 2 and 1


def test_the_gpu_rate_comes_from_the_measured_cuda_bench():
    measured = {"gpu": dict(per_item_s={"batched": 0.011, "bare": 0.032}, device_name="NVIDIA H200", commit="abc")}
    rate = costs.gpu_rate(measured)
    assert rate["samples_per_s"] == pytest.approx(1 / 0.011) and "NVIDIA H200" in rate["source"]
    assert costs.gpu_rate({}) is None


def test_a_rehearsals_cost_table_reads_both_parameter_files_and_the_repository_report(tmp_path):
    from difstudy import rehearsal

    repo, root = tmp_path / "repo", tmp_path / "repo" / rehearsal.FOLDER
    (repo / "notebooks").mkdir(parents=True)
    (root / "notebooks").mkdir(parents=True)
    (root / rehearsal.COSTS).mkdir()
    (repo / "notebooks" / "page.full.yaml").write_text("n_images: 400\nseeds: [0, 1, 2]\ntoy_size: 512\n")
    (root / "notebooks" / "page.rehearsal.yaml").write_text("n_images: 8\nseeds: [0, 1]\ntoy_size: 64\n")
    rec = dict(notebook="page", forwards=3, samples=6, cache_bytes=0, peak_rss_mb=700.0)
    (root / rehearsal.COSTS / "page.json").write_text(json.dumps(rec))
    (repo / "report").mkdir()
    gpu = dict(per_item_s={"batched": 0.01}, device_name="NVIDIA H200", commit="abc")
    (repo / "report" / "measured.json").write_text(json.dumps({"gpu": gpu}))
    df = rehearsal.cost_table(root, repo)
    row = df.iloc[0]
    assert (row.notebook, row.full_samples_low, row.full_samples_high) == ("page", 300, 450)
    assert row.gpu_min_high == pytest.approx(450 / 100 / 60, abs=0.05) and "NVIDIA H200" in row.rate_source
