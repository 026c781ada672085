"""The amalgamation case on GATE's official bucket set (issue 21): the six technique variants of the
official SPair-71k run (:func:`difstudy.gate.official_techniques`: the fine prompt with two noise
seeds, a LoRA at two weights, the canny ControlNet with two noise seeds, each ControlNet variant
on its official denoising path from t + 10), with a random LoRA of difstudy's recipe and a
ControlNet made from the timed U-Net (random weights, the real layout).

- ``official_sequential``: what the official code does, one full extraction per variant (a
  :class:`~difstudy.gate.GateExtractor` of that one technique, no early stop, its LoRA loaded and
  removed);
- ``official_batched``: difstudy, one :class:`~difstudy.gate.GateExtractor` of all six (the
  variants along the batch axis of one feature forward, LoRA rows routed through their adapters,
  early stop after the last needed module).

Both include their adapter loading; the ControlNet variants' denoising steps are the same work on
both sides (they run per variant in both), which bounds the ratio from above.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..models import save_random_lora
from .config import PerfConfig
from .timing import Case
from .workload import seeded_init

OFFICIAL_VARIANTS = 6


def official_cases(pipe, image: np.ndarray, cfg: PerfConfig, workdir: str | os.PathLike) -> list[Case]:
    """The two cases of the module docstring, on one image at t = 50."""
    from diffusers import ControlNetModel

    from ..gate import GateExtractor, official_techniques

    unet = pipe.unet
    controlnet = seeded_init(ControlNetModel.from_unet(unet), cfg.seed + 7).eval()
    if (unet.device.type, unet.dtype) != ("cpu", torch.float32):
        controlnet = controlnet.to(unet.device, unet.dtype)
    lora = save_random_lora(unet, Path(workdir) / "lora", seed=cfg.seed)
    techniques = official_techniques(controlnet=controlnet, lora=str(lora))
    assert len(techniques) == OFFICIAL_VARIANTS
    ids, images = ["bench0"], [image]
    captions = [{"generic": "a photo of an object", "fine": "a photo of a bird on a checkered background"}]

    def run(techs, stop: bool) -> None:
        with GateExtractor(pipe, cfg.acts, techs, (50,), seed=cfg.seed, stop_early=stop) as ex:
            ex.features(ids, images, captions)

    k = OFFICIAL_VARIANTS
    return [
        Case("official_batched", f"official bucket set, {k} variants in one GATE forward (stop)", k,
             lambda: run(techniques, True)),
        Case("official_sequential", f"official bucket set, {k} full extractions", k,
             lambda: [run([tq], False) for tq in techniques]),
    ]  # fmt: skip
