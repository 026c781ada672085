"""Issue 9, part A: the extraction protocol against independent computations.

- defect 1: the U-Net input is DDPM forward noising whatever scheduler the pipeline samples with;
- defect 2: train and test images that share a file name never share features;
- defect 5: the cache group changes with everything that changes a feature.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from difstudy import extract as E
from difstudy.cache import Key
from difstudy.capture import run_with_cache
from difstudy.data import loaders as L
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DifstudyError

torch.set_num_threads(1)  # a training job shares this machine's CPUs

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = (
    DDPMScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
)


def _with(pipe, **components):
    """A new pipeline object sharing ``pipe``'s modules except ``components``."""
    kw = {k: v for k, v in pipe.components.items() if k in type(pipe).__init__.__code__.co_varnames}
    if "requires_safety_checker" in type(pipe).__init__.__code__.co_varnames:
        kw["requires_safety_checker"] = False
    return type(pipe)(**(kw | components))


def _hand_alphas_cumprod(n=1000, start=0.00085, end=0.012) -> torch.Tensor:
    """SD's scaled-linear schedule written out: betas on a sqrt-linear ramp, alpha_bar their cumulative product."""
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _hand_z0(pipe, images) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


# ----------------------------------------------------------------------------
# defect 1: DDPM forward noising, whatever the sampling scheduler
@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl"])
def test_unet_input_is_ddpm_noising_for_every_scheduler(model, request, tmp_path):
    pipe = request.getfixturevalue(model)
    samples = list(ToyWorld("test", n=2))
    ts = [50, 500]
    got = {}
    for cls in SCHEDULERS:
        p = _with(pipe, scheduler=cls.from_config(pipe.scheduler.config))
        cache, _ = E.extract(p, samples, "unet-in", timesteps=ts, cache_dir=tmp_path / cls.__name__, progress=False)
        got[cls.__name__] = {k: cache.get(k) for k in cache.keys()}
    ref = got["DDPMScheduler"]
    assert len(ref) == len(samples) * len(ts)
    for name, feats in got.items():  # identical to fp16 storage precision: bit-equal after the cast
        assert set(feats) == set(ref), name
        for k in ref:
            assert torch.equal(feats[k], ref[k]), (name, k)

    # independent computation: sqrt(ab) z0 + sqrt(1 - ab) n with alpha_bar from the betas written out
    ab = _hand_alphas_cumprod()
    z0 = _hand_z0(pipe, [s.image for s in samples])
    for k, v in ref.items():
        b = next(i for i, s in enumerate(samples) if s.image_id == k.image_id)
        n = E.noise_for(E.image_digest(samples[b].image), k.t, 0, z0.shape[1:])
        want = ab[k.t].sqrt() * z0[b].double() + (1 - ab[k.t]).sqrt() * n.double()
        torch.testing.assert_close(v.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_ddpm_noise_matches_hand_formula_and_ddpm_add_noise():
    g = torch.Generator().manual_seed(0)
    z0, n = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 50, 999])
    ab = E.ddpm_alphas_cumprod(
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    )
    torch.testing.assert_close(ab.double(), _hand_alphas_cumprod(), rtol=1e-6, atol=1e-7)
    out = E.ddpm_noise(z0, n, t, ab)
    want = torch.stack([ab[ti].sqrt() * z0[i] + (1 - ab[ti]).sqrt() * n[i] for i, ti in enumerate(t.tolist())])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(out, ddpm.add_noise(z0, n, t), rtol=1e-6, atol=1e-6)
    assert E.ddpm_noise(z0.half(), n.half(), 50, ab).dtype == torch.float16  # one t for the whole batch
    with pytest.raises(DifstudyError, match="timestep 1000"):
        E.ddpm_noise(z0, n, 1000, ab)


def test_sdxl_extra_conditioning_reaches_the_unet(tiny_sdxl, tmp_path):
    """SDXL's pooled text embedding and size ids (added_cond_kwargs), checked against a hand-built forward."""
    pipe, act, t = tiny_sdxl, "up-level1-repeat0-res-out", 50
    samples = list(ToyWorld("test", n=2))
    cache, _ = E.extract(
        pipe, samples, act, variants=["generic"], cache_dir=tmp_path, store_dtype=torch.float32, progress=False
    )
    z0 = _hand_z0(pipe, [s.image for s in samples])
    n = torch.stack([E.noise_for(E.image_digest(s.image), t, 0, z0.shape[1:]) for s in samples])
    ab = _hand_alphas_cumprod()
    x = (ab[t].sqrt() * z0.double() + (1 - ab[t]).sqrt() * n.double()).float()
    embs, pooled = [], []
    with torch.no_grad():
        for s in samples:
            e, _, p, _ = pipe.encode_prompt(s.caption, device="cpu", do_classifier_free_guidance=False)
            embs.append(e[0])
            pooled.append(p[0])
    size = 64
    cond = dict(
        text_embeds=torch.stack(pooled),
        time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32),
    )
    kw = dict(encoder_hidden_states=torch.stack(embs), added_cond_kwargs=cond)
    _, ref = run_with_cache(pipe.unet, [act], x, torch.tensor([t, t]), **kw)
    for b, s in enumerate(samples):
        torch.testing.assert_close(cache.get(Key(act, t, "generic", 0, s.image_id)), ref[act][b], rtol=1e-4, atol=1e-4)
    # the pooled embedding matters: without it the activation differs
    cond0 = dict(cond, text_embeds=torch.zeros_like(cond["text_embeds"]))
    _, other = run_with_cache(pipe.unet, [act], x, torch.tensor([t, t]), **dict(kw, added_cond_kwargs=cond0))
    assert not torch.allclose(other[act], ref[act], atol=1e-3)


# ----------------------------------------------------------------------------
# defect 2: ids unique across splits and datasets
def _grey_noise(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 8, (size, size, 1)), 0, 255).astype(np.uint8).repeat(3, 2)


def _leaky_class_folders(root: Path, n_per_class: int = 2) -> Path:
    """Train: toy-world images in two class folders; test: grey noise saved under the *same* file names."""
    world = [s for s in ToyWorld("train", n=40) if s.class_name in ("bird", "car")]
    for cls in ("bird", "car"):
        for j, s in enumerate([s for s in world if s.class_name == cls][:n_per_class]):
            for split, image in (("train", s.image), ("test", _grey_noise(100 * j + len(cls)))):
                path = root / split / cls / f"img{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
    return root


def test_train_and_test_images_with_one_name_keep_their_own_features(tiny_sd15, tmp_path):
    """The reported leak: one extraction of both splits served the train features for the test ids."""
    root = _leaky_class_folders(tmp_path / "data")
    train, test = L.ClassFolders(root, "train"), L.ClassFolders(root, "test")
    tr, te = [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]
    assert not {d["image_id"] for d in tr} & {d["image_id"] for d in te}
    act, kw = "up-level1-repeat2-res-out", dict(store_dtype=torch.float32, progress=False, batch_size=3)
    both, _ = E.extract(tiny_sd15, tr + te, act, cache_dir=tmp_path / "both", **kw)
    alone, _ = E.extract(tiny_sd15, te, act, cache_dir=tmp_path / "alone", **kw)
    for d_tr, d_te in zip(tr, te, strict=True):
        key = Key(act, 50, "empty", 0, d_te["image_id"])
        # the test image's own features (batched with other images: equal up to float reordering)
        torch.testing.assert_close(both.get(key), alone.get(key), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(both.get(key), both.get(Key(act, 50, "empty", 0, d_tr["image_id"])), atol=1e-3)


def test_extract_refuses_duplicate_ids(tiny_sd15, tmp_path):
    samples = list(ToyWorld("test", n=3))
    ds = [dict(image_id="cat/img0", image=samples[0].image), dict(image_id="cat/img1", image=samples[1].image)]
    ds.append(dict(image_id="cat/img0", image=samples[2].image))
    with pytest.raises(DifstudyError, match=r"'cat/img0'.*(index 0 and 2|0 and 2).*namespace"):
        E.extract(tiny_sd15, ds, "unet-in", cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*/shards/*.json"))  # refused before anything was computed


def test_extract_refuses_an_id_cached_for_another_image(tiny_sd15, tmp_path):
    """Two runs into one cache whose datasets reuse an id for different images (e.g. un-namespaced splits)."""
    a, b = ToyWorld("test", n=2)
    E.extract(tiny_sd15, [dict(image_id="x/0", image=a.image)], "unet-in", cache_dir=tmp_path, progress=False)
    E.extract(tiny_sd15, [dict(image_id="x/0", image=a.image)], "unet-in", cache_dir=tmp_path, progress=False)
    with pytest.raises(DifstudyError, match=r"'x/0'.*another image"):
        E.extract(tiny_sd15, [dict(image_id="x/0", image=b.image)], "unet-in", cache_dir=tmp_path, progress=False)


@pytest.mark.slow
def test_probe_real_classfolders_does_not_leak(tmp_path):
    """End to end through the CLI: grey-noise test images cannot be classified (old behaviour: 100%)."""
    if not (ROOT / "difstudy" / "real.py").exists():
        pytest.skip("probe-real moved")
    root = _leaky_class_folders(tmp_path / "data", n_per_class=4)
    out = tmp_path / "res.csv"
    cmd = [sys.executable, "-m", "difstudy", "probe-real", "classfolders", "--root", str(root), "--model", "tiny-sd15"]
    cmd += ["--acts", "up-level1-repeat2-res-out", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    cmd += ["--seeds", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import pandas as pd

    df = pd.read_csv(out)
    acc = df.loc[df.metric.str.contains("acc", case=False), "value"]
    assert len(acc) and acc.max() < 0.9, df


# ----------------------------------------------------------------------------
# defect 5: the cache group covers everything that changes a feature
def _group(pipe, **kw):
    kw = dict(model_name="tiny-sdxl", image_size=64, store_dtype=torch.float16) | kw
    return E.cache_group(pipe, kw["model_name"], kw["image_size"], kw["store_dtype"])[0]


def _perturbed(module, pick):
    """A copy of ``module`` with one weight tensor scaled by 1.01 (a fused LoRA changes weights densely)."""
    import copy

    m = copy.deepcopy(module)
    with torch.no_grad():
        dict(m.named_parameters())[pick].mul_(1.01)
    return m


def test_cache_group_changes_with_everything_that_changes_a_feature(tiny_sdxl, monkeypatch):
    pipe = tiny_sdxl
    base = _group(pipe)
    vae_w = next(n for n, _ in pipe.vae.named_parameters() if n.startswith("encoder.") and n.endswith("weight"))
    q_proj = lambda m: next(n for n, _ in m.named_parameters() if "q_proj.weight" in n)  # noqa: E731
    betas = dict(pipe.scheduler.config, beta_end=0.02)
    changed = {
        "vae weights": _with(pipe, vae=_perturbed(pipe.vae, vae_w)),
        "text encoder 2 weights": _with(
            pipe, text_encoder_2=_perturbed(pipe.text_encoder_2, q_proj(pipe.text_encoder_2))
        ),
        "text encoder weights": _with(pipe, text_encoder=_perturbed(pipe.text_encoder, q_proj(pipe.text_encoder))),
        "unet weights": _with(pipe, unet=_perturbed(pipe.unet, "conv_in.weight")),
        "scheduler betas": _with(pipe, scheduler=DDIMScheduler.from_config(betas)),
        "prediction type": _with(
            pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        ),
    }
    groups = {what: _group(p) for what, p in changed.items()}
    groups["image size"] = _group(pipe, image_size=128)
    groups["store dtype"] = _group(pipe, store_dtype=torch.float32)
    monkeypatch.setattr(E, "PROTOCOL_VERSION", E.PROTOCOL_VERSION + 1)
    groups["protocol version"] = _group(pipe)
    monkeypatch.undo()
    for what, g in groups.items():
        assert g != base, f"{what} does not change the cache group"
    assert len(set(groups.values())) == len(groups)
    # the same modules under another sampling scheduler with the same betas (and timestep spacing
    # "linspace" instead of "leading"): the same features, the same group
    assert _group(_with(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))) == base
    assert E.PROTOCOL_VERSION == 2


def test_text_memo_follows_the_text_encoder_weights(tiny_sd15, tmp_path):
    """Prompt embeddings are memoised across extractions by the text encoder's fingerprint: a LoRA-like
    change of the text encoder is seen (new group, new embeddings), the same encoder is not re-run."""
    act, s = "up-level1-repeat2-res-out", ToyWorld("test", n=1)[0]
    kw = dict(variants=["generic"], store_dtype=torch.float32, progress=False)
    a, _ = E.extract(tiny_sd15, [s], act, cache_dir=tmp_path / "a", **kw)
    calls = []
    h = tiny_sd15.text_encoder.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        again, _ = E.extract(tiny_sd15, [s], act, cache_dir=tmp_path / "again", **kw)
    finally:
        h.remove()
    assert calls == []  # memoised
    q = next(n for n, _ in tiny_sd15.text_encoder.named_parameters() if "q_proj.weight" in n)
    other = _with(tiny_sd15, text_encoder=_perturbed(tiny_sd15.text_encoder, q))
    b, _ = E.extract(other, [s], act, cache_dir=tmp_path / "b", **kw)
    key = Key(act, 50, "generic", 0, s.image_id)
    assert torch.equal(a.get(key), again.get(key))
    assert b.dir.name != a.dir.name and not torch.allclose(a.get(key), b.get(key), atol=1e-4)


@pytest.mark.slow
def test_cache_group_is_the_same_in_two_processes(tiny_sdxl):
    code = (
        "import torch; from difstudy.models import load; from difstudy.extract import cache_group; "
        "print(cache_group(load('tiny-sdxl'), 'tiny-sdxl', 64, torch.float16)[0])"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="random")
    runs = [
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    for p in runs:
        assert p.returncode == 0, p.stderr[-2000:]
    got = [p.stdout.strip().splitlines()[-1] for p in runs]
    assert got[0] == got[1] == _group(tiny_sdxl)
