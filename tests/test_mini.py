"""Integration tests on the committed mini model and judge (seconds on CPU).

Thresholds are the issue's goals where the committed model meets them, and
otherwise the floor it measured (the model card reports every goal with its
number, met or missed; lowering a threshold here would hide a regression)."""

import numpy as np
import pytest
import torch

from difstudy import card
from difstudy.capture import run_with_cache
from difstudy.data.toyworld import ToyWorld
from difstudy.extract import Extractor
from difstudy.judge import load_judge, wilson_interval
from difstudy.models import load

pytestmark = pytest.mark.slow

# measured on the committed model by the model card (CI parameters)
PSNR_FLOOR = 25.0
# a pooled-classification activation near the card's best on the committed model (t=50, 300/300
# images, 3 seeds: trained 0.32, random weights 0.12, pixels 0.11; the best, down-level3-repeat0-res-out,
# 0.33; the goal of 0.50 is missed and the card says so). 100 training images are too few
# for a 10-class probe.
CLS_ACT = "mid-repeat1-res-out"
PCK_ACT = "up-level1-upsampler-out"
MARGIN = 0.05


@pytest.fixture(scope="module")
def mini():
    return load("mini")


def test_mini_capture_shapes_and_unchanged_output(mini):
    ex = Extractor(mini, ["all"])
    z = ex.encode_images([ToyWorld("test", n=2)[i].image for i in range(2)])
    assert z.shape == (2, 4, 16, 16)
    ehs = mini.encode_prompt("", "cpu", 1, False)[0].expand(2, -1, -1)
    with torch.no_grad():
        ref = mini.unet(z, 50, ehs).sample
    out, cache = run_with_cache(mini.unet, "all", z, 50, encoder_hidden_states=ehs, stop=False)
    assert torch.equal(out.sample, ref) and len(cache) == 197
    assert cache["up-level3-repeat0-vit-block0-self-map"].shape == (2, 8, 256, 256)
    assert cache["mid-vit-block0-cross-map"].shape == (2, 8, 4, 32)


def test_mini_is_a_v_prediction_model_with_the_sd15_catalogue(mini):
    assert mini.scheduler.config.prediction_type == "v_prediction"


def test_the_class_prompt_steers_the_mini_model(mini):
    """The prompt must matter: with its own class prompt a test image is denoised better than with
    another class's prompt (the model card's prompt_effect). The first 2,000-step model ignored the
    class word (other / own 1.0016); the committed one (9,400 U-Net steps, the last 7,400 with
    Min-SNR-gamma 1) gives 1.033 (own-class loss 0.2039, measured by ``train.evaluate
    --prompt-effect`` on its last snapshot)."""
    effect = card.prompt_effect(mini)
    assert effect.loc["mean", "other / own"] > 1.02, effect


def test_judge_recognises_real_images():
    judge, meta = load_judge()
    acc = card.judge_accuracy(judge, n_test=500)
    assert acc >= 0.9
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-9)  # the committed record is what the weights do


def test_wilson_interval_matches_the_formula():
    lo, hi = wilson_interval(50, 200)
    # hand computation: p=0.25, z=1.96, n=200
    z, n, p = 1.96, 200, 0.25
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert lo < 0.25 < hi


def test_mini_vae_reconstructs(mini):
    psnr = card.vae_psnr(mini, ToyWorld("val", n=50))
    assert psnr["psnr"].mean() > PSNR_FLOOR


def test_mini_features_beat_random_weights_and_pixels(mini, tmp_path):
    df = card.feature_scores(
        mini, [CLS_ACT, PCK_ACT], n_train=300, n_test=300, n_pairs=30, seeds=(0,), cache_dir=str(tmp_path)
    )
    for metric, act in (("accuracy", CLS_ACT), ("PCK@0.1 img", PCK_ACT)):
        m = df[df["metric"] == metric]
        trained = m[(m.weights == "trained") & (m.activation == act)]["value"].mean()
        random = m[(m.weights == "random") & (m.activation == act)]["value"].mean()
        pixels = m[m.weights == "raw pixels"]["value"].mean()
        assert trained > random + MARGIN, metric
        assert trained > pixels + MARGIN, metric


def _denoising_loss(pipe, images, controlnet=None, timesteps=(100, 300, 500, 700)) -> float:
    """Mean MSE to the model's prediction target (v) over fixed noise draws, empty prompt."""
    from difstudy import gate
    from difstudy.diffusion import denoising_losses

    cond = gate.control_images(images, 64) if controlnet is not None else None
    losses = denoising_losses(pipe, images, {"empty": [""] * len(images)}, timesteps, 0, controlnet, cond)
    return float(np.mean(losses["empty"]))


def test_committed_controlnet_helps_the_mini_model_denoise(mini):
    """The committed canny ControlNet loads and its edge condition lowers the denoising loss on test
    images it never saw (what it was trained for; an untrained one adds exactly nothing). Measured on
    the committed weights (32 images, t = 100/300/500/700): 0.174 -> 0.157 (-10%)."""
    from difstudy import gate

    world = ToyWorld("test", n=300)
    images = [world[i].image for i in range(300) if world[i].attributes["background"] != "checkered"][:32]
    cn = gate.load_controlnet("mini")
    plain, with_cn = _denoising_loss(mini, images), _denoising_loss(mini, images, controlnet=cn)
    assert with_cn < 0.95 * plain, (with_cn, plain)


def test_committed_lora_adapts_to_the_held_out_background():
    """The committed LoRA lowers the denoising loss on checkered-background test images (the
    sub-domain the U-Net never saw) and is fully removed again. Measured on the committed weights
    (32 images, t = 100/300/500/700): 0.327 -> 0.263 (-19%); on other backgrounds it rises,
    0.174 -> 0.206, as an adaptation to one sub-domain should."""
    from difstudy import gate

    pipe = load("mini")
    world = ToyWorld("test", n=600)
    images = [world[i].image for i in gate.domain_indices(world, "checkered", 32)]
    plain = _denoising_loss(pipe, images)
    gate.load_lora(pipe, "mini", "checkered")
    adapted = _denoising_loss(pipe, images)
    pipe.unet.delete_adapters("checkered")
    assert adapted < 0.9 * plain, (adapted, plain)
    assert _denoising_loss(pipe, images) == pytest.approx(plain, rel=1e-6)
