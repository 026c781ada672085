"""Random-weight stand-ins of the real models (issue 23's rehearsal) and the real catalogue from the
embedded configurations, without downloading anything."""

from __future__ import annotations

import pytest
import torch

from difstudy.catalog import Catalog
from difstudy.cli import main
from difstudy.models import load, standins


def test_the_real_sd15_catalogue_from_the_embedded_configuration(capsys):
    unet = standins.meta_unet("sd15")
    assert unet.device.type == "meta" and tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    cat = Catalog(unet, latent_size=64)
    assert len(cat) == 197  # the paper's count for SD1.5
    assert cat["up-level1-repeat1-vit-block0-cross-q"].shape == (1280, 16, 16)
    assert cat["down-level0-repeat0-res-out"].shape == (320, 64, 64)
    tiny = Catalog(load("tiny-sd15").unet, latent_size=8)
    assert cat.names == tiny.names  # the tiny model keeps the real layout, only its widths are small
    main(["catalog", "sd15"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# sd15: the real architecture") and len(out) == 1 + 197
    with pytest.raises(KeyError, match="stand-ins exist for"):
        standins.config("sd99", "unet")


@pytest.mark.slow
def test_a_rehearsal_loads_stand_ins_at_the_real_widths_on_cpu(tmp_path, monkeypatch, capsys):
    from difstudy.gate.techniques import _check_controlnet, load_controlnet

    monkeypatch.setenv(standins.REHEARSAL_ENV, str(tmp_path))
    pipe = load("sd15", dtype="fp16", device="cuda")
    out = capsys.readouterr().out
    assert "rehearsal: sd15 on cpu instead of cuda" in out and "float32 instead of float16" in out
    assert "random-weight stand-in" in out and pipe.difstudy_standin == "sd15"
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    assert tuple(pipe.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert len(Catalog(pipe.unet, latent_size=8)) == 197
    saved = tmp_path / "sd15-pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = saved.stat().st_mtime_ns
    again = load("stable-diffusion-v1-5/stable-diffusion-v1-5")  # the hub id: the same stand-in, from the cache
    assert saved.stat().st_mtime_ns == stamp
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
    cn = load_controlnet("sd15-canny", unet=pipe.unet)
    _check_controlnet(cn, pipe.unet, "controlnet")
    assert tuple(cn.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    with torch.no_grad():
        cond = torch.zeros(1, 3, 64, 64)
        text = pipe.text_encoder(pipe.tokenizer(["a photo"], padding="max_length", return_tensors="pt").input_ids)[0]
        down, mid = cn(torch.zeros(1, 4, 8, 8), 50, text, controlnet_cond=cond, return_dict=False)
        eps = pipe.unet(torch.zeros(1, 4, 8, 8), 50, text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample  # fmt: skip
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
    monkeypatch.delenv(standins.REHEARSAL_ENV)
    with pytest.raises(Exception, match="could not load"):  # outside a rehearsal the real model is asked for
        load("sd15")
