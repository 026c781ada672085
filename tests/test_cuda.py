"""CUDA smoke tests: capture, extraction (fp16 and fp32), the protocol probes and one notebook on a
GPU. Skipped without one. ``DIFSTUDY_SMOKE_DEVICE=cpu`` runs the same code paths on the CPU (how
they are checked on a machine without a GPU). ``scaleout.local_device`` is tested with a faked
LOCAL_RANK everywhere."""

import os

import pytest
import torch

from difstudy import scaleout
from difstudy.cache import Key

DEVICE = os.environ.get("DIFSTUDY_SMOKE_DEVICE", "cuda")
needs_device = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU (DIFSTUDY_SMOKE_DEVICE=cpu runs these here)"
)
ACTS = ["down-level1-repeat0-vit-block0-cross-q", "mid-vit-out", "up-level1-repeat0-res-out"]


@pytest.mark.parametrize(
    "env, devices, want",
    [
        ({"LOCAL_RANK": "3"}, 2, "cuda:1"),  # ranks wrap around the GPUs of the node
        ({"LOCAL_RANK": "0"}, 4, "cuda:0"),
        ({"SLURM_LOCALID": "2"}, 4, "cuda:2"),  # srun without torchrun
        ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 4, "cuda:1"),  # torchrun's rank wins
        ({}, 4, None),  # not a multi-process launch: the caller's --device decides
    ],
)
def test_local_device_with_a_faked_local_rank(monkeypatch, env, devices, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    assert scaleout.local_device(env) == want


def test_local_device_without_cuda_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scaleout.local_device({"LOCAL_RANK": "1"}) is None


@needs_device
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_capture_and_extraction_on_the_device(tmp_path, dtype):
    from difstudy.capture import run_with_cache
    from difstudy.data.toyworld import ToyWorld
    from difstudy.extract import extract
    from difstudy.models import load

    pipe = load("tiny-sd15", dtype=dtype, device=DEVICE)
    u = pipe.unet
    assert u.device.type == torch.device(DEVICE).type
    want = torch.float16 if dtype == "fp16" else torch.float32
    x = torch.randn(2, 4, u.config.sample_size, u.config.sample_size, device=u.device, dtype=want)
    e = torch.randn(2, 77, u.config.cross_attention_dim, device=u.device, dtype=want)
    _, cache = run_with_cache(u, ACTS, x, torch.tensor([50, 50], device=u.device), encoder_hidden_states=e)
    for name in ACTS:
        assert cache[name].device.type == u.device.type and cache[name].dtype == want
        assert torch.isfinite(cache[name].float()).all(), name
    feats, summary = extract(pipe, ToyWorld("test", n=3), ACTS, (50,), cache_dir=str(tmp_path), progress=False)
    assert summary.computed == 3 * len(ACTS)
    ids = [s.image_id for s in ToyWorld("test", n=3)]
    ref, _ = extract(
        load("tiny-sd15"), ToyWorld("test", n=3), ACTS, (50,), cache_dir=str(tmp_path / "cpu"), progress=False
    )
    for name in ACTS:  # the device's features are the CPU's up to its precision
        a = [feats.get(Key(name, 50, "empty", 0, i)).float() for i in ids]
        b = [ref.get(Key(name, 50, "empty", 0, i)).float() for i in ids]
        tol = 5e-2 if dtype == "fp16" else 1e-3
        for x_, y_ in zip(a, b):
            assert (x_ - y_).abs().max() <= tol * (1 + y_.abs().max()), name


@needs_device
def test_protocol_probes_on_device_features(tmp_path):
    from difstudy import protocols as P
    from difstudy.data.toyworld import ToyWorld
    from difstudy.models import load

    pipe = load("tiny-sd15", device=DEVICE)
    train, test = P.toy_records(ToyWorld("train", n=12)), P.toy_records(ToyWorld("test", n=12))
    src = P.CachedFeatures(pipe, ["up-level1-repeat0-res-out"], P.ExtractionConfig(cache_dir=str(tmp_path)))
    df = P.classification(src, train, test, P.ClassifyConfig(epochs=2), seed=0)
    assert df["metric"].tolist() == ["accuracy"] and 0 <= df["value"].iloc[0] <= 1
    pairs = P.toy_pairs(ToyWorld("test", n=12), 4, seed=0)
    pck = P.correspondence(src, pairs, P.CorrespondenceConfig(method="nn"), seed=0)
    assert set(pck["metric"]) >= {"PCK@0.1 img"}


@needs_device
@pytest.mark.slow
def test_a_notebook_runs_with_device_cuda(tmp_path):
    from difstudy.study import ROOT, run_notebook

    out = tmp_path / "granularity.ipynb"
    params = dict(model="tiny-sd15", device=DEVICE, n_images=2, out_dir=str(tmp_path / "res"), cache_dir=str(tmp_path))
    run_notebook(ROOT / "notebooks" / "property_granularity.ipynb", out, params, cwd=ROOT, failed=tmp_path / "f.ipynb")
    assert out.exists() and (tmp_path / "res" / "results.csv").exists()


def test_bench_presets_for_a_gpu():
    from difstudy.bench import config_for

    cfg = config_for(device="cuda")
    assert (cfg.latent * 8, cfg.widths, cfg.dtype, cfg.repeats) == (512, (320, 640, 1280, 1280), "fp16", 10)
    assert "RSS rows are host memory" in cfg.notes[0]
    assert config_for().device == "cpu" and config_for().dtype == "fp32"
    assert config_for(device="cuda", dtype="fp32").dtype == "fp32"


@needs_device
def test_bench_runs_on_the_device(tmp_path):
    from difstudy import bench

    dtype = "fp16" if DEVICE == "cuda" else "fp32"
    cfg = bench.PerfConfig(
        widths=(32, 64, 64, 64), norm_num_groups=8, repeats=1, warmup=1, time_images=1, mem_sizes=(2, 4),
        mem_image_size=64, device=DEVICE, dtype=dtype,
    )  # fmt: skip
    lines: list[str] = []
    df, ratios = bench.run_bench(cfg, out=tmp_path / "bench.csv", log=lines.append, rss_in_process=True)
    assert f", {dtype}, torch" in lines[0] and ("CPU" in lines[0]) == (DEVICE == "cpu")
    assert set(bench.RATIO_KEYS) <= set(ratios) and all(v > 0 for v in ratios.values())
    assert (df["cfg_device"] == DEVICE).all()
