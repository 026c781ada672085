"""Extraction from the tiny diffusion-transformer pipelines (issue 25): the cache, resuming, and the
forward noising of each family checked against the schedulers' own numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difstudy.data.toyworld import ToyWorld
from difstudy.extract import Extractor, _item, cache_group, extract, image_digest, noise_for
from difstudy.models import load

TINY = ["tiny-pixart", "tiny-sd3", "tiny-flux"]


@pytest.fixture(scope="module")
def world():
    return ToyWorld("test", n=3, size=64, seed=0)


@pytest.fixture(scope="module")
def pipes():
    return {name: load(name) for name in TINY}


def _batch(ds, n=2):
    return [list(x) for x in zip(*[_item(ds, i) for i in range(n)])]


@pytest.mark.parametrize("name", TINY)
def test_extract_fills_the_cache_at_the_catalogue_shapes_and_resumes(name, pipes, world, tmp_path):
    pipe = pipes[name]
    names = ["transformer-in", "vit-block0-out", "vit-block1-cross-map", "transformer-out"]
    cache, first = extract(pipe, [world[0], world[1]], names, timesteps=(50, 300), variants=("generic",),
                           cache_dir=tmp_path, progress=False, model_name=name)  # fmt: skip
    assert first.computed == 2 * 4 * 2 and first.reused == 0
    cache, again = extract(pipe, world, names, timesteps=(50, 300), variants=("generic",),
                           cache_dir=tmp_path, progress=False, model_name=name)  # fmt: skip
    assert again.reused == 16 and again.computed == 8 and again.images == 1  # only the third image ran
    ex = Extractor(pipe, names, timesteps=(50,))
    for key in [k for k in cache.keys() if k.t == 50 and k.image_id == world[2].image_id]:
        shape = tuple(cache.get(key).shape)
        a = ex.catalog[key.activation]
        want = (a.shape[2], *ex._map_hw(key.activation)) if a.is_map else a.shape  # maps: (keys, h, w)
        assert shape == want, key.activation
    assert tuple(cache.get(next(k for k in cache.keys() if k.activation.endswith("cross-map"))).shape)[0] == (
        ex.catalog.text_len
    )


def _captured_input(pipe, world, t, **kw):
    """The denoiser's input map and forward kwargs of one extraction at ``t`` (fp32, no storage cast)."""
    ex = Extractor(pipe, ["transformer-in"], timesteps=(t,), variants=("generic",), **kw)
    seen = {}
    hook = ex.unet.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        ids, images, caps = _batch(world)
        feats = ex.features(ids, images, caps)
    finally:
        hook.remove()
    x = torch.stack([feats[k] for k in sorted(feats, key=lambda k: ids.index(k.image_id))])
    z0 = ex.encode_images(images)
    noise = torch.stack([noise_for(image_digest(im), t, 0, z0.shape[1:]) for im in images])
    return ex, x, z0, noise, seen


def test_pixart_is_ddpm_noised_as_its_scheduler_computes(pipes, world):
    from diffusers import DDPMScheduler

    t = 300
    ex, x, z0, noise, seen = _captured_input(pipes["tiny-pixart"], world, t)
    want = DDPMScheduler.from_config(pipes["tiny-pixart"].scheduler.config).add_noise(z0, noise, torch.tensor([t]))
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert seen["timestep"].tolist() == [t, t] and seen["encoder_attention_mask"].shape == (2, ex.catalog.text_len)


def test_sd3_is_flow_noised_with_the_schedulers_sigma(pipes, world):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, t = pipes["tiny-sd3"], 300
    ex, x, z0, noise, seen = _captured_input(pipe, world, t)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # shift 3, static
    sigma = float(sched.sigmas[sched.config.num_train_timesteps - t])  # the training sigmas, shifted
    vae = pipe.vae.config
    assert vae.shift_factor and z0.shape[1] == 16  # SD3's latents: (z - shift) * scale, 16 channels
    torch.testing.assert_close(x, (1 - sigma) * z0 + sigma * noise, rtol=1e-5, atol=1e-5)
    assert sigma == pytest.approx(3 * 0.3 / (1 + 2 * 0.3))
    torch.testing.assert_close(seen["timestep"], torch.full((2,), sigma * 1000))
    assert seen["pooled_projections"].shape == (2, pipe.transformer.config.pooled_projection_dim)


def test_flux_is_flow_noised_on_the_official_img2img_grid_and_packed(pipes, world):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe, t, steps = pipes["tiny-flux"], 50, 28
    ex, x, z0, noise, seen = _captured_input(pipe, world, t)
    # FluxImg2ImgPipeline(strength=t/1000, 28 steps) as the official extraction runs it
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seq = (z0.shape[-2] // 2) * (z0.shape[-1] // 2)
    c = sched.config
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    start = int(max(steps - steps * t / 1000, 0))
    sigma = float(sched.sigmas[start])
    packed = FluxPipeline._pack_latents((1 - sigma) * z0 + sigma * noise, 2, 16, z0.shape[-2], z0.shape[-1])
    want = packed.transpose(1, 2).reshape(2, 64, z0.shape[-2] // 2, z0.shape[-1] // 2)  # transformer-in's map
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["timestep"], torch.full((2,), sigma))  # FLUX multiplies by 1000 itself
    assert seen["guidance"].tolist() == [1.0, 1.0]  # the official guidance_scale=1
    assert seen["img_ids"].shape == (seq, 3) and seen["txt_ids"].shape == (ex.catalog.text_len, 3)
    # the named alternative: sigma from t / 1000 without the grid (and its own cache group)
    ex2, x2, *_ = _captured_input(pipe, world, t, flow_steps="continuous")
    assert ex2.noising.label == "flow sigma continuous" and not torch.allclose(x, x2)
    assert ex2.noising.fingerprint() != ex.noising.fingerprint()


@pytest.mark.parametrize(("name", "other"), [("tiny-pixart", "DDIMScheduler"),
                                             ("tiny-sd3", "FlowMatchHeunDiscreteScheduler")])  # fmt: skip
def test_features_do_not_depend_on_the_sampling_scheduler(name, other, pipes, world):
    import copy

    import diffusers

    pipe = pipes[name]
    swapped = copy.copy(pipe)
    swapped.scheduler = getattr(diffusers, other).from_config(pipe.scheduler.config)
    ids, images, caps = _batch(world)
    a = Extractor(pipe, ["vit-block1-out"], timesteps=(300,)).features(ids, images, caps)
    b = Extractor(swapped, ["vit-block1-out"], timesteps=(300,)).features(ids, images, caps)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cache_group(pipe, name, 64, torch.float16) == cache_group(swapped, name, 64, torch.float16)


def test_a_flow_timestep_out_of_range_is_refused_before_any_forward(pipes):
    from difstudy.errors import DifstudyError

    for name in ("tiny-sd3", "tiny-flux"):  # t = 0 is clean data, which no rectified-flow step sees
        with pytest.raises(DifstudyError, match="out of range.*0 < t <= 1000"):
            Extractor(pipes[name], ["vit-block0-out"], timesteps=(0,))
    ex = Extractor(pipes["tiny-flux"], ["vit-block0-out"], timesteps=(20,))  # the grid's last step (sigma 1/28)
    assert ex.noising.sigma(20, 64) == pytest.approx(ex.noising.sigma(1, 64))


def test_the_cli_extracts_a_tiny_flux(tmp_path, capsys):
    from difstudy.cli import main

    main(["extract", "--model", "tiny-flux", "--n", "2", "--cache", str(tmp_path), "--t", "50", "--batch", "2"])
    assert "tiny-flux" in capsys.readouterr().out
    groups = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(groups) == 1 and groups[0].name.startswith("tiny-flux-") and "-s128-" in groups[0].name


def test_the_properties_take_a_transformer(pipes, tmp_path):
    from difstudy.properties import MEASURES, measure_properties

    ds = ToyWorld("val", n=3, size=64, seed=1)
    acts = ["vit-block0-out", "vit-block1-increment", "vit-block1-self-q"]
    df = measure_properties(pipes["tiny-pixart"], ds, timesteps=[50], seeds=[0, 1], activations=acts,
                            cache_dir=tmp_path, model_name="tiny-pixart", progress=False)  # fmt: skip
    assert set(df["measure"]) == set(MEASURES) and set(df["activation"]) == set(acts)
    assert df.loc[df["measure"] == "granularity", "value"].notna().all()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_the_protocols_and_the_random_weight_control_take_a_transformer(name, pipes, tmp_path):
    from difstudy.protocols import (
        CachedFeatures,
        ClassifyConfig,
        CorrespondenceConfig,
        ExtractionConfig,
        RandomUNetFeatures,
        classification,
        correspondence,
        toy_pairs,
        toy_records,
    )  # fmt: skip

    pipe = pipes[name]
    ex = ExtractionConfig(t=300, cache_dir=str(tmp_path))
    train = toy_records(ToyWorld("train", n=20, size=64))
    test = toy_records(ToyWorld("test", n=10, size=64))
    pairs = toy_pairs(ToyWorld("test", n=12), 4, seed=0)
    assert len(pairs)
    trained = CachedFeatures(pipe, ["vit-block1-out"], ex, seed=0, model_name=name)
    random = RandomUNetFeatures(pipe, ["vit-block1-out"], ex, seed=0, model_name=name)
    assert type(random.pipe.transformer) is type(pipe.transformer) and getattr(random.pipe, "unet", None) is None
    w = next(random.pipe.transformer.parameters())
    assert not torch.equal(w, next(pipe.transformer.parameters()))  # fresh weights, the model untouched
    for source in (trained, random):
        acc = classification(source, train, test, ClassifyConfig(), 0)
        assert acc.loc[acc["metric"] == "accuracy", "value"].between(0, 1).all()
    pck = correspondence(trained, pairs, CorrespondenceConfig(), 0)
    assert pck.loc[pck["metric"] == "PCK@0.1 img", "value"].between(0, 1).all()


def test_the_explorer_takes_a_transformer(pipes):
    from difstudy.explorer import build_widget, explore

    ds = ToyWorld("test", n=2, size=64)
    view = explore(pipes["tiny-flux"], "vit-block3-out", 300, ds[0], seeds=(0, 1))  # a single-stream block
    assert view.activation == "vit-block3-out" and view.picture.shape == (8, 8, 3) and 0 <= view.noise_share <= 1
    ui = build_widget(["tiny-flux"], dataset=ds, t=300, seeds=(0, 1), preloaded={"tiny-flux": pipes["tiny-flux"]})
    assert ui.error is None and "self-map" in ui.kind.options and ui.activation.value


@pytest.mark.parametrize("name", TINY)
def test_the_cards_denoising_loss_takes_a_transformer(name, pipes):
    from difstudy.diffusion import denoising_losses

    ds = ToyWorld("test", n=2, size=64)
    prompts = {"own": [s.caption for s in ds], "empty": ["", ""]}
    losses = denoising_losses(pipes[name], [s.image for s in ds], prompts, (300, 600), seed=0)
    assert set(losses) == {"own", "empty"} and all(len(v) == 2 and all(x > 0 for x in v) for v in losses.values())


def test_a_source_without_massive_channels_zeroes_them_per_image(pipes, tmp_path):
    from difstudy.protocols import CachedFeatures, ExtractionConfig, toy_records

    recs = toy_records(ToyWorld("test", n=2, size=64))
    src = CachedFeatures(pipes["tiny-pixart"], ["vit-block1-out"], ExtractionConfig(t=300, cache_dir=str(tmp_path)))
    src.prepare(recs)
    plain = src.maps(recs[0])[0]
    mag = plain.abs().mean((1, 2))
    ratio = float(mag.max() / mag.median()) * 0.99  # just below the largest channel: exactly it is massive
    dropped = src.without_massive(ratio)
    out = dropped.maps(recs[0])[0]
    top = int(mag.argmax())
    assert torch.all(out[top] == 0) and torch.equal(
        out[torch.arange(len(mag)) != top], plain[torch.arange(len(mag)) != top]
    )
    assert "massive channels" in dropped.label and src.drop_ratio is None and torch.equal(src.maps(recs[0])[0], plain)
    # the control drops as many channels, never the massive one, the same ones on every read
    ctrl = src.without_massive(ratio, control=True)
    a, b = ctrl.maps(recs[0])[0], ctrl.maps(recs[0])[0]
    zeroed = [c for c in range(len(mag)) if torch.all(a[c] == 0) and not torch.all(plain[c] == 0)]
    assert len(zeroed) == 1 and zeroed[0] != top and torch.equal(a, b) and torch.equal(a[top], plain[top])
    assert "control: as many random channels" in ctrl.label
