"""Integration tests on the committed mini model (seconds on CPU)."""

import numpy as np
import pytest
import torch

from difstudy.capture import run_with_cache
from difstudy.data.toyworld import ToyWorld
from difstudy.extract import Extractor
from difstudy.models import load
from difstudy.models.card import feature_pck, vae_psnr

# measured by the model-card notebook on the committed model: VAE PSNR 23.6 dB on 100 val images;
# PCK@0.1 of up-level1-upsampler-out 23.8% trained vs 10.3% random weights vs 11.1% raw pixels
ACT = "up-level1-upsampler-out"
THRESHOLDS = {"psnr": 20.0, "margin": 0.05}


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


def test_mini_vae_reconstructs(mini):
    psnr = vae_psnr(mini, ToyWorld("val", n=20))
    assert psnr["psnr"].mean() > THRESHOLDS["psnr"]


def test_mini_features_beat_random_weights_and_pixels(tmp_path):
    df = feature_pck("mini", [ACT], n_pairs=30, seeds=(0,), n_images=40, cache_dir=str(tmp_path))
    pck = df.groupby("weights")["pck"].mean()
    assert pck["trained"] > pck["random"] + THRESHOLDS["margin"]
    assert pck["trained"] > pck["raw pixels"] + THRESHOLDS["margin"]
    assert np.isfinite(pck.values).all()
