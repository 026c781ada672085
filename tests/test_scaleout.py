"""Scale-out: sharded extraction, cache verify/repair, sweeps through submitit (local and a faked Slurm)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from difstudy.cache import FeatureCache, Key, verify_cache
from difstudy.cli import main
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DifstudyError
from difstudy.extract import extract
from difstudy.scaleout import JobConfig, Shard, make_executor, parse_minutes
from difstudy.sweep import grid_points, is_finished, load_grid, load_job_config, point_id, submit_points, sweep

torch.set_num_threads(1)  # a training job shares this machine's CPUs

ROOT = Path(__file__).resolve().parents[1]
ACTS = ["up-level1-repeat2-res-out", "mid-vit-out"]
N, BATCH = 8, 2  # 4 batches: shard 0/2 takes batches 0 and 2, shard 1/2 batches 1 and 3


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _extract(pipe, cache_dir, n=N, **kw):
    kw = dict(timesteps=[50], batch_size=BATCH, model_name="tiny-sd15", progress=False) | kw
    return extract(pipe, ToyWorld("test", n=n), ACTS, cache_dir=cache_dir, **kw)


def _features(cache_dir: Path) -> dict[Key, torch.Tensor]:
    (group,) = [p for p in Path(cache_dir).iterdir() if p.is_dir()]
    cache = FeatureCache(cache_dir, group.name)
    return {k: cache.get(k).clone() for k in cache.keys()}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _sidecar_keys(cache_dir: Path) -> Counter:
    return Counter(k for side in Path(cache_dir).glob("*/shards/*.json") for k in json.loads(side.read_text())["keys"])


# ----------------------------------------------------------------------------
# 1. shard specs
def test_shards_partition_the_batches():
    batches = list(range(11))
    parts = [Shard(i, 3).select(batches) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(parts, [])) == batches
    assert Shard.parse("2/3") == Shard(2, 3) and Shard.parse(None) == Shard(0, 1)
    assert Shard.parse(" 1 / 4 ") == Shard(1, 4)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("3/2", r"--shard 3/2: I must be in 0\.\.1"),
        ("2/2", r"--shard 2/2: I must be in 0\.\.1"),
        ("-1/2", r"--shard -1/2: I must be in 0\.\.1"),
        ("0/0", r"--shard 0/0: N must be at least 1"),
        ("1of2", r"--shard '1of2' is not a shard; use I/N"),
    ],
)
def test_bad_shard_specs_are_named(spec, pattern):
    with pytest.raises(DifstudyError, match=pattern):
        Shard.parse(spec)


def test_shard_auto_reads_the_launchers_environment():
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4)  # accelerate, torchrun
    assert Shard.from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == Shard(1, 2)  # srun
    assert Shard.from_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == Shard(0, 2)
    assert Shard.from_env({}) == Shard(0, 1)
    with pytest.raises(DifstudyError, match=r"RANK='x'"):
        Shard.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_cli_bad_shard_exits_2_before_loading_anything(tmp_path, capsys):
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        main(["extract", "--model", "no-such-model", "--shard", "3/2", "--cache", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--shard 3/2: I must be in 0..1" in err and "Traceback" not in err
    assert time.time() - t0 < 5 and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------
# 2. two shards as two processes at once = one run, bit for bit
@pytest.mark.slow
def test_concurrent_shards_write_exactly_the_cache_of_one_run(tiny_sd15, tmp_path):
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "difstudy", "extract", "--model", "tiny-sd15", "--dataset", "toyworld:test"]
    cmd += ["--n", str(N), "--batch", str(BATCH), "--acts", *ACTS, "--t", "50", "--cache", str(sharded)]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    computed = [int(re.search(r"extract \[shard \d/2\]: (\d+) feature maps computed", out).group(1)) for out, _ in outs]
    assert computed == [N // 2 * len(ACTS)] * 2  # each shard did its half, nothing twice

    single = tmp_path / "single"
    _, summary = _extract(tiny_sd15, single)
    assert summary.computed == N * len(ACTS)
    _assert_same(_features(sharded), _features(single))
    counts = _sidecar_keys(sharded)
    assert len(counts) == N * len(ACTS) and set(counts.values()) == {1}  # no entry lost or stored twice
    report = verify_cache(sharded)
    assert report.complete and report.corrupt.empty and report.duplicates == 0


def _readme_launcher(name: str) -> list[str]:
    """The launcher part of the README's multi-process command (``accelerate launch ...`` or
    ``torchrun ...`` up to ``-m difstudy extract``), with 2 processes instead of the README's count."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"`?({name} [^`\n]*?) -m difstudy extract[^`]*?--shard auto", text)
    assert found, f"the README has no `{name} ... -m difstudy extract ... --shard auto` command"
    words = re.sub(r"(--num_processes|--nproc_per_node) \d+", r"\1 2", found.group(1)).split()
    assert "2" in words, words
    exe = Path(sys.executable).parent / words[0]
    return [str(exe) if exe.exists() else words[0], *words[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate launch", "torchrun"])
def test_the_readmes_multi_process_command_runs_two_ranks_that_write_one_runs_cache(launcher, tiny_sd15, tmp_path):
    """Issue 23: the README's accelerate / torchrun command with two real processes (CPU): both
    ranks run (each names its shard), and the cache equals a single run's bit for bit."""
    cache = tmp_path / "launched"
    args = ["--model", "tiny-sd15", "--dataset", "toyworld:test", "--n-images", str(N), "--batch", str(BATCH)]
    args += ["--acts", *ACTS, "--t", "50", "--cache", str(cache), "--shard", "auto"]
    cmd = [*_readme_launcher(launcher), "-m", "difstudy", "extract", *args]
    port = str(29500 + os.getpid() % 1000)
    at = 2 if launcher.startswith("accelerate") else 1  # after "accelerate launch" / "torchrun"
    cmd[at:at] = ["--main_process_port", port] if at == 2 else ["--master_port", port]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    ranks = sorted(set(re.findall(r"extract \[shard (\d)/2\]: (\d+) feature maps computed", log)))
    assert ranks == [("0", str(N // 2 * len(ACTS))), ("1", str(N // 2 * len(ACTS)))], log[-3000:]
    _, summary = _extract(tiny_sd15, tmp_path / "single")
    _assert_same(_features(cache), _features(tmp_path / "single"))
    report = verify_cache(cache)
    assert report.complete and report.corrupt.empty and report.duplicates == 0


def test_a_missing_shard_shows_as_incomplete(tiny_sd15, tmp_path):
    _, summary = _extract(tiny_sd15, tmp_path, shard="1/2")
    assert summary.computed == N // 2 * len(ACTS) and summary.shard == "1/2"
    ids = {k.image_id for k in _features(tmp_path)}
    assert ids == {f"test_0_{i:06d}" for i in (2, 3, 6, 7)}  # batches 1 and 3 of 2 images
    c = verify_cache(tmp_path).completeness
    assert len(c) == len(ACTS)
    assert c["expected"].tolist() == [N] * len(ACTS) and c["present"].tolist() == [N // 2] * len(ACTS)
    _extract(tiny_sd15, tmp_path, shard="0/2")
    report = verify_cache(tmp_path)
    assert report.complete and (report.completeness["present"] == N).all()


# ----------------------------------------------------------------------------
# 3. cache verify / --repair
def test_verify_finds_a_truncated_shard_and_repair_lets_extract_refill_it(tiny_sd15, tmp_path, capsys):
    d = tmp_path / "cache"
    _extract(tiny_sd15, d, n=4)
    before = _features(d)
    assert main_rc(["cache", "verify", str(d)]) == 0
    assert "no corrupt entries" in capsys.readouterr().out

    victim = sorted(d.glob("*/shards/*.safetensors"))[0]
    held = set(json.loads(victim.with_suffix(".json").read_text())["keys"])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a writer's disk filled up, a copy was cut short...

    report = verify_cache(d)
    [row] = report.corrupt.itertuples()
    assert row.shard == victim.name and row.entries == len(held) and "truncated" in row.reason
    assert not report.ok and not report.complete
    assert report.completeness["present"].sum() == len(before) - len(held)
    assert main_rc(["cache", "verify", str(d)]) == 1  # corrupt and not repaired
    assert victim.exists()  # verify alone changes nothing

    others = {p: p.read_bytes() for p in d.glob("*/shards/*") if p.stem != victim.stem}
    assert main_rc(["cache", "verify", str(d), "--repair"]) == 0
    assert "quarantined" in capsys.readouterr().out
    assert not victim.exists() and (victim.parent.parent / "quarantine" / victim.name).exists()
    assert {p: p.read_bytes() for p in others} == others  # good entries untouched
    after = verify_cache(d)
    assert after.corrupt.empty and after.ok and not after.complete
    assert int((after.completeness["expected"] - after.completeness["present"]).sum()) == len(held)

    _, summary = _extract(tiny_sd15, d, n=4)
    assert summary.computed == len(held) and summary.repaired == 0
    _assert_same(_features(d), before)
    assert verify_cache(d).complete


def test_repair_drops_a_wrong_shaped_tensor_and_keeps_the_rest_of_its_shard(tiny_sd15, tmp_path):
    _extract(tiny_sd15, tmp_path, n=2)
    before = _features(tmp_path)
    (group,) = tmp_path.iterdir()
    cache = FeatureCache(tmp_path, group.name)
    good = Key(ACTS[0], 50, "empty", 0, "extra/good")
    bad = Key(ACTS[0], 50, "empty", 0, "extra/bad")
    shape = next(v.shape for k, v in before.items() if k.activation == ACTS[0])
    good_t = torch.ones(shape, dtype=torch.float16)
    cache.write("manual", {good: good_t, bad: torch.zeros(3, 2, dtype=torch.float16)})

    report = verify_cache(tmp_path)
    [row] = report.corrupt.itertuples()
    assert "wrong shape" in row.reason and row.entries == 1
    assert verify_cache(tmp_path, repair=True).corrupt["action"].tolist() == [
        "rewritten without the wrong-shaped tensors"
    ]
    after = _features(tmp_path)
    assert bad not in after and torch.equal(after[good], good_t)
    _assert_same({k: v for k, v in after.items() if k != good}, before)
    assert verify_cache(tmp_path).corrupt.empty


def test_verify_without_request_records_expects_every_image_it_holds(tmp_path):
    cache = FeatureCache(tmp_path, "g", dict(model="m", dtype="float16"))
    keys = [Key("a", 50, "empty", 0, "i1"), Key("a", 50, "empty", 0, "i2"), Key("b", 50, "empty", 0, "i1")]
    cache.write("b0", {k: torch.zeros(4, 2, 2, dtype=torch.float16) for k in keys})
    c = verify_cache(tmp_path / "g").completeness.set_index("activation")
    assert c.loc["a", ["expected", "present"]].tolist() == [2, 2]
    assert c.loc["b", ["expected", "present"]].tolist() == [2, 1]  # i2 lacks activation b
    with pytest.raises(DifstudyError, match="does not exist"):
        verify_cache(tmp_path / "nope")


def main_rc(argv) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ----------------------------------------------------------------------------
# 4. sweeps through submitit
SOURCE = """import time

import pandas as pd

from difstudy.study import write_results

if a == 2:
    time.sleep(pause)
if a == 3:
    raise ValueError("point a=3 is broken on purpose")
write_results(pd.DataFrame({"seed": [0, 1], "value": [10 * a + b, 10 * a + b + 1]}), out_dir)"""


def two_cell_notebook(path: Path) -> Path:
    params = new_code_cell('a = 1\nb = 0\npause = 0\nout_dir = "results/t"', metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, new_code_cell(SOURCE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_sweep_through_submitits_local_executor(tmp_path):
    nb = two_cell_notebook(tmp_path / "nb.ipynb")
    grid = tmp_path / "grid.yaml"
    grid.write_text("a: [1, 3]\nb: [5]\nslurm: {partition: gpu, time: 10}\n")  # slurm: is not a parameter
    out = tmp_path / "sweep"
    report = sweep(nb, grid, out=out, progress=False, executor="submitit-local")
    assert report.ran == (point_id({"a": 1, "b": 5}),) and not report.skipped
    [f] = report.failed
    assert f.point == point_id({"a": 3, "b": 5}) and "broken on purpose" in f.error
    assert f.log is not None and f.log.exists() and f.log.parent == out.resolve() / "jobs"
    assert f.notebook.name == "notebook.failed.ipynb" and f.notebook.exists()
    table = pd.read_csv(report.table)
    assert table["value"].tolist() == [15, 16] and set(table["a"]) == {1}
    fails = pd.read_csv(out / "failures.csv")
    assert fails["point"].tolist() == [f.point] and fails["log"].tolist() == [str(f.log)]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_points(tmp_path):
    nb = two_cell_notebook(tmp_path / "nb.ipynb")
    grid = tmp_path / "grid.yaml"
    grid.write_text("a: [1, 2]\nb: [7]\n")
    (tmp_path / "slow.yaml").write_text("pause: 120\n")  # point a=2 sleeps: it is running when we kill the sweep
    (tmp_path / "fast.yaml").write_text("pause: 0\n")
    out = tmp_path / "sweep"
    first, second = (out / "points" / p.id for p in grid_points(load_grid(grid)))
    cmd = [sys.executable, "-m", "difstudy", "sweep", str(nb), "--grid", str(grid), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--params", str(tmp_path / "slow.yaml"), "--no-progress"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        t0 = time.time()
        while not (is_finished(first) and (second / "params.json").exists()):
            assert proc.poll() is None and time.time() - t0 < 240, "the sweep ended or hung before point 2 ran"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not is_finished(second)
    mtime = (first / "notebook.ipynb").stat().st_mtime_ns

    report = sweep(nb, grid, params=str(tmp_path / "fast.yaml"), out=out, progress=False, executor="submitit-local")
    assert report.skipped == (first.name,) and report.ran == (second.name,) and not report.failed
    assert (first / "notebook.ipynb").stat().st_mtime_ns == mtime  # not run again
    table = pd.read_csv(report.table)
    assert sorted(table["value"]) == [17, 18, 27, 28]


# ----------------------------------------------------------------------------
# 5. Slurm: the job array submitit would hand to sbatch (a fake sbatch records it)
FAKE_SBATCH = """#!/bin/sh
cp "$1" "{rec}/script-$(date +%s%N).sh"
echo "Submitted batch job 4242"
"""


def test_slurm_submission_script_has_the_grids_resources(tmp_path, monkeypatch):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir(), rec.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(rec=rec))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "t: [25, 50]\nacts: [[a], [b, c]]\nslurm:\n  partition: cpu\n  time: 30\n  gpus: 1\n  parallelism: 3\n"
    )
    job = load_job_config(grid).updated(partition="gpu", time="1:30:00", gpus=None)  # CLI flags win where given
    assert job == JobConfig(partition="gpu", time="1:30:00", gpus=1, parallelism=3)
    ex = make_executor("slurm", tmp_path / "jobs", job)
    points = grid_points(load_grid(grid))
    assert len(points) == 4 and all("slurm" not in p.values for p in points)
    items = [(p, tmp_path / "points" / p.id, {**p.values, "out_dir": str(tmp_path / p.id)}) for p in points]
    jobs = submit_points(ex, tmp_path / "nb.ipynb", items, ROOT)

    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(4)]
    [script] = rec.iterdir()  # one job array, not four jobs
    lines = set(script.read_text().splitlines())
    for want in ["--array=0-3%3", "--partition=gpu", "--time=90", "--gpus-per-node=1", "--job-name=difstudy-sweep"]:
        assert f"#SBATCH {want}" in lines, want
    assert any(ln.startswith("srun ") and f"{sys.executable} -u -m submitit.core._submit" in ln for ln in lines)
    assert all(j.paths.submitted_pickle.exists() for j in jobs)  # each task's pickled point, for the array


def test_job_config_errors_and_times():
    assert [parse_minutes(v) for v in (90, "90", "1:30:00", "30:30", "1-12", "2-00:30:00")] == [
        90,
        90,
        90,
        31,
        2160,
        2910,
    ]
    with pytest.raises(DifstudyError, match=r"'ninety' is not a Slurm time"):
        parse_minutes("ninety")
    with pytest.raises(DifstudyError, match=r"unknown slurm option.*partiton.*partition"):
        JobConfig.from_dict({"partiton": "gpu"})
    with pytest.raises(DifstudyError, match=r"unknown executor 'pbs'"):
        sweep("x.ipynb", {"a": [1]}, executor="pbs")


@pytest.mark.skipif(
    os.environ.get("DIFSTUDY_SLURM") != "1",
    reason="needs a running Slurm: `bash scripts/slurm_local.sh` (root), then DIFSTUDY_SLURM=1 (CI does both)",
)
def test_sweep_on_a_real_single_node_slurm(tmp_path):
    """A 2-point sweep as a real Slurm job array (scripts/slurm_local.sh starts the cluster)."""
    nb = two_cell_notebook(tmp_path / "nb.ipynb")
    grid = tmp_path / "grid.yaml"
    grid.write_text("a: [1, 2]\nb: [4]\nslurm: {partition: debug, time: 10, cpus: 1}\n")
    out = tmp_path / "sweep"
    report = sweep(nb, grid, out=out, progress=False, executor="slurm")
    assert not report.failed and len(report.ran) == 2
    table = pd.read_csv(report.table)
    assert sorted(table["value"].tolist()) == [14, 15, 24, 25]
    logs = list((out / "jobs").glob("*_log.out"))
    assert len(logs) == 2  # one job-array task per point, each with its own log
    again = sweep(nb, grid, out=out, progress=False, executor="slurm")  # resubmission skips finished points
    assert not again.ran and len(again.skipped) == 2
