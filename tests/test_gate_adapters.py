"""LoRA adapters in GATE without peft's warnings: the causes are handled, not the warnings hidden
(one message excepted, peft's notice that several adapters are held, which difstudy means)."""

from __future__ import annotations

import warnings

import numpy as np
from conftest import lora_folder

from difstudy import gate
from difstudy.data.toyworld import ToyWorld
from difstudy.gate.techniques import adapter_name
from difstudy.models import load

ACTS = ["up-level1-repeat0-vit-out"]


def _images(n=2):
    ds = ToyWorld("test", n=n)
    return [s.image for s in ds], [{"generic": s.caption, "fine": s.fine_caption} for s in ds]


def _active(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted({a for m in unet.modules() if isinstance(m, BaseTunerLayer) for a in m.active_adapters})


def test_two_loras_and_img2img_inside_an_extractor_warn_nothing(tmp_path):
    folder = str(lora_folder(tmp_path))
    pipe = load("tiny-sd15")
    images, caps = _images()
    full, half = gate.Technique("lora", lora=folder), gate.Technique("lora-x0.5", lora=folder, lora_scale=0.5)
    alone = gate.img2img(pipe, images, 400, half, caps, steps=10)  # loads and removes its own adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with gate.GateExtractor(pipe, ACTS, [gate.BASIC, full, half], (50,), 0, 64) as ex:
            held = sorted(ex.adapters.values())
            assert _active(pipe.unet) == held
            inside = gate.img2img(pipe, images, 400, half, caps, steps=10, held=ex)
            assert _active(pipe.unet) == held  # the extractor's adapters are active again
            assert sorted(pipe.unet.peft_config) == held  # nothing loaded over them
            basic = gate.img2img(pipe, images, 400, gate.BASIC, caps, steps=10, held=ex)
    np.testing.assert_array_equal(inside, alone)  # the held adapter at its own scale = a fresh load
    assert not np.array_equal(basic, alone)
    assert not hasattr(pipe.unet, "peft_config") or not pipe.unet.peft_config


def test_a_loaded_adapter_of_someone_else_is_not_reused_and_is_deleted_quietly(tmp_path):
    folder = str(lora_folder(tmp_path))
    other = str(lora_folder(tmp_path / "other", seed=1))
    pipe = load("tiny-sd15")
    images, caps = _images()
    tq = gate.Technique("lora", lora=folder)
    fresh = gate.img2img(pipe, images, 400, tq, caps, steps=10)
    gate.load_lora(pipe, other, adapter_name("lora"))  # same name, other weights, not an extractor's
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = gate.img2img(pipe, images, 400, tq, caps, steps=10)
        assert sorted(pipe.unet.peft_config) == [adapter_name("lora")]
        assert _active(pipe.unet) == [adapter_name("lora")]
    finally:
        pipe.unet.unload_lora()
    np.testing.assert_array_equal(got, fresh)
