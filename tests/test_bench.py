"""The benchmark at a trivial size: its ratios recomputed from its own table, its cases against
independent computations (no assertion on a timing: the machine is shared)."""

import ast
import re
from pathlib import Path

import pandas as pd
import pytest
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
    out = tmp_path / "not" / "yet" / "bench.csv"  # a folder that does not exist yet is made
    df, ratios = bench.run_bench(_tiny_cfg(), out=out, log=lines.append, rss_in_process=True)
    last = lines[-1]
    assert LINE.fullmatch(last), last
    parsed = bench.parse_line(last)
    assert list(parsed) == list(bench.RATIO_KEYS)
    assert all(abs(parsed[k] - ratios[k]) <= 0.005 + 1e-9 for k in parsed)
    # every ratio recomputed by hand from the tidy rows (medians of the timings, RSS increases)
    t = df[df.section == "time"].set_index("case")["median_s"]
    inc = df[df.section == "rss"].set_index("case")["increase_mb"].clip(lower=1.0)  # floored at 1 MiB
    want = dict(
        overhead=t["capture"] / t["bare"],
        early_stop=t["early"] / t["bare"],
        early_stop_dit=t["dit_early"] / t["dit_bare"],
        batching=t["per_item"] / t["batched"],
        amalgamation=t["official_sequential"] / t["official_batched"],
        amalgamation_prompts=t["gate_sequential"] / t["gate_batched"],
        rss_ratio=inc["difstudy-4"] / inc["difstudy-2"],
        naive_rss_ratio=inc["naive-4"] / inc["difstudy-4"],
        naive_time_ratio=t["naive"] / t["extract"],
        engine_efficiency=t["until"] / t["extract"],
    )
    for k, v in want.items():
        assert abs(ratios[k] - v) <= 1e-6 * max(1.0, v), k
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


@pytest.mark.parametrize(
    "key, value, verdict",
    [("naive_time_ratio", 1.0, "PASS"), ("naive_time_ratio", 0.99, "FAIL"), ("engine_efficiency", 0.85, "PASS"),
     ("engine_efficiency", 0.84, "FAIL"), ("overhead", 1.06, "FAIL"), ("batching", 1.3, "PASS"),
     ("naive_rss_ratio", 0.1, "info")],
)  # fmt: skip
def test_goals(key, value, verdict):
    assert bench.status(key, value) == verdict


def test_forward_until_stops_right_after_the_module(tiny_sd15):
    from conftest import unet_inputs

    unet = tiny_sd15.unet
    cat = Catalog(unet)
    acts = ["up-level1-repeat2-res-out", "up-level1-repeat0-vit-block0-self-k", "mid-vit-out"]
    last = bench.last_module(cat, acts)
    assert last == cat["up-level1-repeat2-res-out"].module  # the latest in forward order, not the last listed
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, m in unet.named_modules() if n]
    try:
        x, t, kw = unet_inputs(tiny_sd15)
        bench.forward_until(unet, last, x, t, **kw)
        upto = list(ran)
        ran.clear()
        with torch.no_grad():
            unet(x, t, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert upto[-1] == last and upto.count(last) == 1
    assert upto == ran[: len(upto)] and "conv_out" not in upto and "conv_out" in ran
    assert not any(h for m in unet.modules() for h in m._forward_hooks.values())  # its hook is removed


def test_extract_runs_the_batching_the_benchmark_times(tiny_sd15, tmp_path, monkeypatch):
    """extract lays out its batch with capture.expand_batch, the function the batching case times."""
    import difstudy.capture
    import difstudy.extract
    from difstudy.data.toyworld import ToyWorld

    assert difstudy.extract.expand_batch is difstudy.capture.expand_batch
    calls = []
    real = difstudy.extract.expand_batch
    monkeypatch.setattr(difstudy.extract, "expand_batch", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    difstudy.extract.extract(tiny_sd15, ToyWorld("test", n=3), "unet-in", timesteps=[10, 20], cache_dir=tmp_path,
                             progress=False, variants=["empty", "generic"])  # fmt: skip
    assert calls == [(3, 2, 4, 8, 8)]


def test_bench_uses_no_private_names_of_other_modules():
    files = sorted(Path(bench.__file__).parent.glob("*.py"))  # the package: each part keeps its private names
    assert len(files) > 1
    private = [
        f"{f.name}: {node.module}.{a.name}"
        for f in files
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_")
    ]
    assert private == []


def test_rss_processes_import_their_entry_points():
    """The RSS helper and its fallback children start from code strings: the names they import exist."""
    import importlib
    import inspect

    from difstudy.bench import rss

    entries = re.findall(r"from (difstudy[\w.]*) import (\w+)", inspect.getsource(rss))
    assert {name for _, name in entries} == {"_child_main", "_launcher_main"}
    for mod, name in entries:
        assert callable(getattr(importlib.import_module(mod), name)), (mod, name)


def test_cli_has_bench():
    from difstudy.cli import build_parser

    a = build_parser().parse_args(["bench", "--quick", "--out", "r.csv"])
    assert a.cmd == "bench" and a.quick and a.out == "r.csv" and a.threads == 1 and a.repeats is None


def test_the_transformer_early_stop_case_stops_at_the_middle_block():
    cfg = _tiny_cfg()
    bare, early = bench.timing.transformer_cases(cfg)
    assert (bare.key, early.key) == ("dit_bare", "dit_early") and "vit-block1-out" in early.label
    assert early.fn()["vit-block1-out"].shape[1:] == (32, 16, 16)  # 32 latent cells, 2x2 packed
    assert bare.fn().sample.shape == (1, 256, 64)
