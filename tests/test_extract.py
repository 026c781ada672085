"""Tests of difstudy.extract and difstudy.cache: protocol, determinism, crash safety, concurrency."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difstudy.cache import FeatureCache, Key
from difstudy.capture import run_with_cache
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import CacheError, DifstudyError, UnknownActivationError
from difstudy.extract import (
    Extractor,
    cache_group,
    clear_text_memo,
    concat,
    extract,
    image_digest,
    noise_for,
    normalize,
    pca_rgb,
    resize,
)

torch.set_num_threads(1)  # a training job shares this machine's CPUs

ROOT = Path(__file__).resolve().parents[1]
ACTS = ["up-level1-repeat2-res-out", "up-level3-repeat0-vit-block0-self-k"]
N_CLI = 16  # images of the subprocess runs (CLI defaults: ours-v1.5 = 4 activations, t=50, empty, fp16)
N_ACTS_CLI = 4

# Runs the CLI (`python -m difstudy ...`) with two test hooks: a delay before each shard write
# (a slow batch, while its claim lock is held) and a start barrier so that concurrent runs overlap.
WRAPPER = r"""
import os, runpy, sys, time
from pathlib import Path
from difstudy.cache import FeatureCache

delay = float(os.environ.get("DIFSTUDY_TEST_DELAY", "0"))
barrier = os.environ.get("DIFSTUDY_TEST_BARRIER")
_write, _verify = FeatureCache.write, FeatureCache.verify

def write(self, *a, **k):
    time.sleep(delay)
    return _write(self, *a, **k)

def verify(self):  # called once by extract(), after the model is loaded and before the first batch
    if barrier:
        d, n = barrier.rsplit(":", 1)
        Path(d, f"ready-{os.getpid()}").touch()
        t0 = time.time()
        while len(list(Path(d).glob("ready-*"))) < int(n) and time.time() - t0 < 120:
            time.sleep(0.01)
    return _verify(self)

FeatureCache.write, FeatureCache.verify = write, verify
sys.argv = ["difstudy", *sys.argv[1:]]
runpy.run_module("difstudy", run_name="__main__", alter_sys=True)
"""


def _run(pipe, ds, acts=ACTS, cache_dir=None, **kw):
    kw = dict(timesteps=[50], batch_size=2, model_name="tiny-sd15", progress=False) | kw
    return extract(pipe, ds, acts, cache_dir=cache_dir, **kw)


def _features(cache: FeatureCache) -> dict[Key, torch.Tensor]:
    # clone: get() returns tensors backed by a (copy-on-write) memory map of the shard file,
    # which the corruption tests damage in place
    return {k: cache.get(k).clone() for k in cache.keys()}


def _sidecar_keys(cache_dir: Path) -> Counter:
    return Counter(k for side in Path(cache_dir).glob("*/shards/*.json") for k in json.loads(side.read_text())["keys"])


def _assert_same_features(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _cli(tmp_path: Path, *args, delay=0.0, barrier=None) -> subprocess.Popen:
    script = tmp_path / "cli_wrapper.py"
    script.write_text(WRAPPER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["DIFSTUDY_TEST_DELAY"] = str(delay)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if barrier:
        env["DIFSTUDY_TEST_BARRIER"] = barrier
    cmd = [sys.executable, str(script), "extract", "--model", "tiny-sd15", "--dataset", "toyworld:test"]
    cmd += ["--n", str(N_CLI), "--batch", "2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tiny_sd15, tmp_path_factory):
    """An uninterrupted in-process run with the CLI's defaults on the CLI's data."""
    d = tmp_path_factory.mktemp("reference")
    cache, summary = _run(tiny_sd15, ToyWorld("test", n=N_CLI), "ours-v1.5", d)
    assert summary.computed == N_CLI * N_ACTS_CLI and summary.reused == 0
    return _features(cache)


# ----------------------------------------------------------------------------
# 1. the protocol: cache round trip equals a capture computed by hand
def test_cache_round_trip_equals_direct_capture(tiny_sd15, tmp_path):
    pipe, seed, t = tiny_sd15, 7, 50
    samples = list(ToyWorld("test", n=3))
    cache, summary = _run(
        pipe, samples, cache_dir=tmp_path / "fp32", seed=seed, batch_size=3, store_dtype=torch.float32
    )
    assert summary.computed == 3 * len(ACTS) and summary.images == 3

    # VAE posterior mean (not a sample), scaled
    x = torch.stack([torch.from_numpy(s.image.copy()).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    with torch.no_grad():
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.equal(Extractor(pipe, ACTS).encode_images([s.image for s in samples]), z0)
    noise = torch.stack([noise_for(image_digest(s.image), t, seed, z0.shape[1:]) for s in samples])
    tt = torch.tensor([t] * 3)
    # DDPM forward noising, alpha_bar written out for SD's scaled-linear betas
    ab = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[t]
    noisy = (ab.sqrt() * z0.double() + (1 - ab).sqrt() * noise.double()).float()
    with torch.no_grad():
        emb, _ = pipe.encode_prompt("", "cpu", 1, False)
    _, ref = run_with_cache(pipe.unet, ACTS, noisy, tt, encoder_hidden_states=emb.repeat(3, 1, 1))

    for a in ACTS:
        for b, s in enumerate(samples):
            got = cache.get(Key(a, t, "empty", seed, s.image_id))
            assert got.dtype == torch.float32 and got.shape == ref[a][b].shape
            torch.testing.assert_close(got, ref[a][b], rtol=1e-5, atol=1e-5)

    # default storage: the same values cast to fp16
    c16, _ = _run(pipe, samples, cache_dir=tmp_path / "fp16", seed=seed, batch_size=3)
    for a in ACTS:
        for s in samples:
            got = c16.get(Key(a, t, "empty", seed, s.image_id))
            assert got.dtype == torch.float16 and torch.equal(
                got, cache.get(Key(a, t, "empty", seed, s.image_id)).half()
            )
    assert c16.dir != cache.dir  # fp16 and fp32 features live in different groups


# ----------------------------------------------------------------------------
# 2. determinism
def test_noise_for_is_a_fixed_draw_per_image_t_seed():
    shape = (4, 8, 8)
    n = noise_for("img_1", 50, 0, shape)
    assert n.shape == shape and torch.equal(n, noise_for("img_1", 50, 0, shape))
    for other in (noise_for("img_2", 50, 0, shape), noise_for("img_1", 51, 0, shape), noise_for("img_1", 50, 1, shape)):
        assert not torch.equal(n, other)
    assert noise_for("img_1", 50, 0, shape, dtype=torch.float16).dtype == torch.float16
    a, b = ToyWorld("test", n=2)
    assert image_digest(a.image) == image_digest(a.image.copy()) != image_digest(b.image)
    assert image_digest(a.image) != image_digest(a.image[:, :-1])  # the shape is part of it


def test_noise_follows_the_image_not_its_name(tiny_sd15, tmp_path):
    """The same pixels under two ids get the same features (so an exported copy of a dataset, whose
    loader names images differently, reproduces the original's numbers)."""
    s = ToyWorld("test", n=1)[0]
    ds = [dict(image_id="a/x", image=s.image), dict(image_id="b/y", image=s.image.copy())]
    cache, _ = _run(tiny_sd15, ds, cache_dir=tmp_path)
    for act in ACTS:
        assert torch.equal(cache.get(Key(act, 50, "empty", 0, "a/x")), cache.get(Key(act, 50, "empty", 0, "b/y")))


def test_same_seed_bit_identical_across_caches_other_seed_differs(tiny_sd15, tmp_path):
    ds = ToyWorld("test", n=3)
    runs = {
        name: _features(_run(tiny_sd15, ds, cache_dir=tmp_path / name, seed=seed, timesteps=[50, 500])[0])
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    }
    _assert_same_features(runs["a"], runs["b"])
    assert len(runs["a"]) == 3 * len(ACTS) * 2
    for k, v in runs["a"].items():
        other = runs["c"][Key(k.activation, k.t, k.variant, 4, k.image_id)]
        assert not torch.equal(v, other), k


def test_cache_group_is_stable_across_processes(tiny_sd15):
    """diffusers' config holds ``_use_default_values``, a list whose order follows set iteration and
    so changes between processes; the group (and so resume/concurrency) must not depend on it."""
    u = tiny_sd15.unet
    cfg = dict(u.config)
    names = []
    for order in (sorted, lambda v: sorted(v, reverse=True)):
        c = dict(cfg, _use_default_values=order(cfg.get("_use_default_values", ["a", "b"])), _name_or_path="x")
        unet = SimpleNamespace(config=c, named_parameters=u.named_parameters, named_buffers=u.named_buffers)
        pipe = SimpleNamespace(**(dict(tiny_sd15.components) | dict(unet=unet)))
        names.append(cache_group(pipe, "tiny-sd15", 64, torch.float16)[0])
    assert names[0] == names[1] == cache_group(tiny_sd15, "tiny-sd15", 64, torch.float16)[0]
    assert cache_group(tiny_sd15, "tiny-sd15", 64, torch.float32)[0] != names[0]
    assert cache_group(tiny_sd15, "tiny-sd15", 128, torch.float16)[0] != names[0]


# ----------------------------------------------------------------------------
# 3. resume after SIGKILL
@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_sd15, tmp_path, reference):
    d = tmp_path / "cache"
    proc = _cli(tmp_path, "--cache", str(d), delay=0.5)
    t0 = time.time()
    try:
        while not list(d.glob("*/shards/*.json")):
            if proc.poll() is not None:
                pytest.fail(f"extract exited ({proc.returncode}) before writing a shard:\n{proc.stderr.read()}")
            if time.time() - t0 > 90:
                pytest.fail("no shard was written within 90 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(d.glob("*/shards/*.json")))
    assert 1 <= done < N_CLI // 2, "the run was not interrupted"
    # debris of a kill in the middle of a write: a shard without sidecar and a temporary file
    shards = d / next(d.iterdir()).name / "shards"
    (shards / "0123456789abcdef-deadbeef.safetensors").write_bytes(b"\x00" * 100)
    (shards / ".0123456789abcdef-deadbeef.safetensors.tmp").write_bytes(b"\x00" * 10)

    cache, summary = _run(tiny_sd15, ToyWorld("test", n=N_CLI), "ours-v1.5", d)
    assert len(list(d.iterdir())) == 1  # another process, same model: the same cache group
    total = N_CLI * N_ACTS_CLI
    assert summary.reused == done * 2 * N_ACTS_CLI > 0
    assert summary.computed == total - summary.reused < total
    assert summary.repaired == 0
    _assert_same_features(_features(cache), reference)
    counts = _sidecar_keys(d)
    assert len(counts) == total and set(counts.values()) == {1}
    assert cache.verify() == []


# ----------------------------------------------------------------------------
# 4. corrupt shards are detected, quarantined and recomputed
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_quarantined_and_recomputed(tiny_sd15, tmp_path, damage):
    ds = ToyWorld("test", n=4)
    cache, _ = _run(tiny_sd15, ds, cache_dir=tmp_path)
    original = _features(cache)
    shard = sorted(cache.shards_dir.glob("*.safetensors"))[0]
    n_in_shard = len(json.loads(shard.with_suffix(".json").read_text())["keys"])
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # tensor bytes: the header still parses
    shard.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="corrupt"):
        cache2, summary = _run(tiny_sd15, ds, cache_dir=tmp_path)
    quarantined = {p.name for p in (cache.dir / "quarantine").iterdir()}
    assert {shard.name, shard.with_suffix(".json").name} <= quarantined
    assert not shard.exists()
    assert summary.repaired >= 1
    assert summary.computed == n_in_shard and summary.reused == len(original) - n_in_shard
    _assert_same_features(_features(cache2), original)
    assert cache2.verify() == []


def test_get_from_corrupt_shard_raises_cache_error(tiny_sd15, tmp_path):
    cache, _ = _run(tiny_sd15, ToyWorld("test", n=2), cache_dir=tmp_path)
    key = cache.keys()[0]
    shard = next(cache.shards_dir.glob("*.safetensors"))
    reader = FeatureCache(tmp_path, cache.dir.name)  # fresh process view: nothing verified yet
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(CacheError, match="extract it again"):
        reader.get(key)
    assert key not in reader and (cache.dir / "quarantine" / shard.name).exists()


def test_reads_keep_a_bounded_set_of_open_shards(tiny_sd15, tmp_path, monkeypatch):
    import pickle

    cache, _ = _run(tiny_sd15, ToyWorld("test", n=4), cache_dir=tmp_path)
    reader = FeatureCache(tmp_path, cache.dir.name)
    monkeypatch.setattr(FeatureCache, "OPEN_SHARDS", 1)
    keys = cache.keys()
    first = {k: reader.get(k) for k in keys}
    again = {k: reader.get(k) for k in reversed(keys)}  # shards reopened after being dropped
    assert all(torch.equal(first[k], again[k]) for k in keys) and len(reader._handles) == 1
    assert len({cache._index[k] for k in keys}) > 1  # more than one shard was read
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {} and torch.equal(clone.get(keys[0]), first[keys[0]])


def test_group_metadata_mismatch_is_an_error(tmp_path):
    FeatureCache(tmp_path, "g", dict(model="a"))
    with pytest.raises(CacheError, match="another --cache"):
        FeatureCache(tmp_path, "g", dict(model="b"))


# ----------------------------------------------------------------------------
# 5. two concurrent writers on one cache
@pytest.mark.slow
def test_two_concurrent_runs_split_the_work(tmp_path, reference):
    d, bar = tmp_path / "cache", tmp_path / "barrier"
    bar.mkdir()
    procs = [_cli(tmp_path, "--cache", str(d), delay=0.2, barrier=f"{bar}:2") for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    computed = [int(re.search(r"extract: (\d+) feature maps computed", out).group(1)) for out, _ in outs]
    total = N_CLI * N_ACTS_CLI
    assert sum(computed) == total  # no entry computed twice
    assert min(computed) > 0  # both worked: batches are claimed, not duplicated
    counts = _sidecar_keys(d)
    assert len(counts) == total and set(counts.values()) == {1}
    (group,) = d.iterdir()
    cache = FeatureCache(d, group.name)
    assert cache.verify() == []
    _assert_same_features(_features(cache), reference)


# ----------------------------------------------------------------------------
# 6. batching of timesteps and variants
def test_batched_timesteps_and_variants_equal_separate_runs(tiny_sd15, tmp_path):
    pipe = tiny_sd15
    ds = ToyWorld("test", n=3)
    ts, vs = [25, 50], ["empty", "generic"]
    calls = {"unet": [], "text": 0, "vae": 0}
    clear_text_memo()  # prompts embedded by earlier tests would not run the text encoder again
    hooks = [
        pipe.unet.register_forward_pre_hook(lambda m, a, k: calls["unet"].append(a[0].shape[0]), with_kwargs=True),
        pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.__setitem__("text", calls["text"] + 1)),
        pipe.vae.encoder.register_forward_pre_hook(lambda m, a: calls.__setitem__("vae", calls["vae"] + 1)),
    ]
    try:
        batched, _ = _run(pipe, ds, cache_dir=tmp_path / "all", timesteps=ts, variants=vs, batch_size=3)
    finally:
        for h in hooks:
            h.remove()
    prompts = {""} | {s.caption for s in ds}
    assert calls == {"unet": [3 * 2 * 2], "text": len(prompts), "vae": 1}
    assert len(batched) == 3 * len(ACTS) * 2 * 2
    for t in ts:
        for v in vs:
            single, _ = _run(pipe, ds, cache_dir=tmp_path / f"{t}-{v}", timesteps=[t], variants=[v], batch_size=1)
            assert len(single) == 3 * len(ACTS)
            for k in single.keys():
                a, b = batched.get(k), single.get(k)
                assert a.dtype == torch.float16 and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3), k
    # conditioning matters (otherwise the comparison above would be vacuous for variants)
    k = batched.keys()[0]
    assert not torch.equal(batched.get(k), batched.get(Key(k.activation, k.t, "generic", k.seed, k.image_id)))


# ----------------------------------------------------------------------------
# 7. bad arguments
@pytest.mark.parametrize(
    "kw, exc, pattern",
    [
        (dict(acts="ours-v9"), UnknownActivationError, r"unknown activation 'ours-v9'"),
        (dict(timesteps=[50, 1000]), DifstudyError, r"\[1000\] out of range.*0 <= t < 1000"),
        (dict(timesteps=[-1]), DifstudyError, r"\[-1\] out of range"),
        (dict(image_size=60), DifstudyError, r"image size 60 is not a multiple of 64.*try 64"),
        (dict(variants=["empty", "fancy"]), DifstudyError, r"unknown conditioning variant 'fancy'"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_sd15, tmp_path, kw, exc, pattern):
    kw = dict(kw)
    acts = kw.pop("acts", ACTS)
    with pytest.raises(exc, match=pattern):
        _run(tiny_sd15, ToyWorld("test", n=2), acts, tmp_path / "cache", **kw)
    assert not (tmp_path / "cache").exists()  # validated before anything is written


def test_cli_bad_argument_exits_2_without_traceback(tmp_path, capsys):
    from difstudy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["extract", "--model", "tiny-sd15", "--acts", "ours-v9", "--n", "2", "--cache", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "difstudy extract: error:" in err and "'ours-v9'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------
# 8. post-processing helpers
def test_resize_shapes():
    x = torch.randn(2, 5, 4, 4)
    assert resize(x, 16).shape == (2, 5, 16, 16)
    assert resize(x, (8, 12)).shape == (2, 5, 8, 12)
    assert resize(x[0], 8).shape == (5, 8, 8)
    assert resize(x, 4).dtype == torch.float32 and torch.allclose(resize(x, 4), x)  # identity at the same size
    assert resize(x.half(), 8, mode="nearest").shape == (2, 5, 8, 8)


def test_normalize_zero_mean_unit_std_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 5, generator=g) * torch.arange(1.0, 7.0)[:, None, None] + torch.arange(6.0)[:, None, None]
    y = normalize(x.half())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(6), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(6), atol=1e-3)
    y3 = normalize(x[0])
    assert torch.allclose(y3.mean((1, 2)), torch.zeros(6), atol=1e-4)
    assert torch.allclose(y3.std((1, 2)), torch.ones(6), atol=1e-3)


def test_concat_channels_and_common_size():
    a, b = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 8, 8)
    c = concat([a, b])
    assert c.shape == (2, 8, 8, 8)  # largest size by default
    assert torch.allclose(c[:, 5:], normalize(b), atol=1e-6)
    assert concat([a, b], size=6).shape == (2, 8, 6, 6)
    raw = concat([a, b], norm=False)
    assert torch.allclose(raw[:, :5], resize(a, 8)) and torch.equal(raw[:, 5:], b)
    assert concat([a[0], b[0]]).shape == (8, 8, 8)


def test_pca_rgb_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 7, generator=g)
    y = pca_rgb(x)
    assert y.shape == (2, 6, 7, 3) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1 and y.std() > 0.05
    assert pca_rgb(x[:1], fit_on=x).shape == (1, 6, 7, 3)
    # the first component follows the dominant direction of variation
    direction = torch.randn(16, generator=g)
    ramp = torch.linspace(-5, 5, 6 * 7).reshape(1, 6, 7)
    z = x * 0.01 + direction[:, None, None] * ramp  # (2, 16, 6, 7)
    r = pca_rgb(z)[..., 0].flatten()
    assert abs(torch.corrcoef(torch.stack([r, ramp.expand(2, 6, 7).flatten()]))[0, 1]) > 0.95
    # two images of a 1x1 map (SD1.5's lowest level at 64 px): the one direction two points span, the rest 0
    tiny = pca_rgb(torch.randn(2, 16, 1, 1, generator=g))
    assert tiny.shape == (2, 1, 1, 3) and torch.all(tiny[..., 1:] == 0) and tiny[..., 0].std() > 0
    # one image of a 1x1 map: no variance to fit, a flat picture and no warning (the rehearsal's book check)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.all(pca_rgb(torch.randn(1, 16, 1, 1, generator=g)) == 0)


# ----------------------------------------------------------------------------
# 9. memory: one batch of features at a time
def test_at_most_one_batch_of_features_alive(tiny_sd15, tmp_path, monkeypatch):
    batch, ts = 2, [25, 50]
    sizes, alive_before = [], []
    previous: list[weakref.ref] = []
    orig = FeatureCache.write

    def write(self, batch_key, tensors, extra=None, images=None):
        alive_before.append(sum(r() is not None for r in previous))
        previous[:] = [weakref.ref(v) for v in tensors.values()]
        sizes.append(len(tensors))
        return orig(self, batch_key, tensors, extra, images)

    monkeypatch.setattr(FeatureCache, "write", write)
    _, summary = _run(tiny_sd15, ToyWorld("test", n=5), cache_dir=tmp_path, timesteps=ts, batch_size=batch)
    per_batch = batch * len(ACTS) * len(ts) * 1
    assert len(sizes) == 3 and max(sizes) <= per_batch and sum(sizes) == summary.computed == 5 * len(ACTS) * 2
    assert alive_before == [0, 0, 0]  # the previous batch's features were freed before the next write
