"""GATE, step 4: content shift over t, techniques and images: the reconstructions and the table.

**Reconstructions**, through diffusers only (scored by :mod:`difstudy.gate.scores`):

- ``vae``: encode (posterior mean) and decode, no U-Net (:func:`vae_reconstruction`): the
  autoencoder's own floor of content shift.
- ``x0``: the predicted clean image of one U-Net forward at timestep ``t`` on
  the noised VAE latent (the same latent, noise draw and forward as feature
  extraction, :class:`~difstudy.gate.GateExtractor` with the activation ``unet-out``), turned
  into ``x0`` by ``DDPMScheduler.step(...).pred_original_sample`` (epsilon,
  v or sample prediction from the scheduler config) and decoded by the VAE
  (:func:`predicted_x0`). This is what the features "see".
- ``img2img``: diffusers' Img2Img pipeline (``AutoPipelineForImage2Image.from_pipe``,
  the ControlNet variant when a technique has one) at strength ``t / 1000`` with a
  DDIM scheduler of ``steps`` steps (trailing spacing, so the first step is at
  ``t - 1`` for multiples of ``1000 / steps``; the ``t_start`` column records it),
  no classifier-free guidance, a seeded generator (:func:`img2img`).

:func:`content_shift_table` scores every image, technique, method and t (:class:`ShiftConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DifstudyError
from ..extract import Extractor, prompt_for
from .features import GateExtractor, _sample, decode_latents
from .scores import JudgeDistance, content_shift, detail_shift, resize_uint8
from .techniques import (
    BASIC,
    Technique,
    _check_controlnet,
    _has_peft_layers,
    _remove_adapters,
    active_adapters,
    adapter_name,
    control_images,
    load_controlnet,
    load_lora,
    only_adapter,
    trained_canny,
)

TIMESTEPS = (25, 50, 100, 200, 400)
METHODS = ("vae", "x0", "img2img")


# -- reconstructions -----------------------------------------------------------------
@torch.no_grad()
def vae_reconstruction(pipe, images, image_size: int | None = None) -> np.ndarray:
    """Encode (posterior mean) and decode, no U-Net: the autoencoder's own floor of content shift."""
    ex = Extractor(pipe, ["unet-out"], image_size=image_size)
    return decode_latents(pipe, ex.encode_images(list(images)))


def _captions_of(captions, n):
    if captions is None:
        return [{"generic": None, "fine": None}] * n
    if len(captions) != n:
        raise DifstudyError(f"got {len(captions)} caption dicts for {n} images")
    return list(captions)


def predicted_x0(
    pipe, images, t: int, technique: Technique = BASIC, captions=None, seed: int = 0, image_size=None
) -> np.ndarray:
    """Decoded ``x0`` predicted by one U-Net forward at timestep ``t``, on the latent noised
    exactly as feature extraction noises it: (B, S, S, 3) uint8. ``captions``: per image
    ``{"generic": ..., "fine": ...}`` for prompt rules that need them."""
    images = list(images)
    with GateExtractor(pipe, ["unet-out"], [technique], [t], seed, image_size) as ex:
        return ex.reconstruct_x0(images, _captions_of(captions, len(images)))[(technique.name, int(t))]


def img2img_start(pipe, t: int, steps: int = 50) -> int:
    """The timestep of the first denoising step of :func:`img2img` at strength ``t / 1000``."""
    sched = _img2img_scheduler(pipe)
    sched.set_timesteps(steps)
    n_train = sched.config.num_train_timesteps
    init = min(int(steps * t / n_train), steps)
    if init < 1:
        raise DifstudyError(
            f"img2img at t={t} with {steps} steps runs no step (strength {t / n_train:g} x {steps} < 1); "
            f"use steps >= {int(np.ceil(n_train / max(t, 1)))}"
        )
    return int(sched.timesteps[steps - init])


def _img2img_scheduler(pipe):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
    )


@torch.no_grad()
def img2img(
    pipe,
    images,
    t: int,
    technique: Technique = BASIC,
    captions=None,
    seed: int = 0,
    steps: int = 50,
    image_size: int | None = None,
    held: GateExtractor | None = None,
) -> np.ndarray:
    """diffusers Img2Img (ControlNet Img2Img for a ControlNet technique) at strength ``t / 1000``,
    DDIM with ``steps`` steps, no guidance: (B, S, S, 3) uint8.

    A LoRA technique's adapter is loaded for the call and removed after it, unless ``held`` (an
    open :class:`GateExtractor` over the same technique) already holds it: then that adapter is
    used, alone, and the extractor's adapters are active again afterwards."""
    from diffusers import AutoPipelineForImage2Image

    from ..models import vae_scale_factor

    images = list(images)
    size = int(image_size or pipe.unet.config.sample_size * vae_scale_factor(pipe))
    img2img_start(pipe, t, steps)  # validates t and steps
    caps = _captions_of(captions, len(images))
    pil = [Image.fromarray(resize_uint8(im, size)) for im in images]
    call: dict[str, Any] = dict(
        prompt=[prompt_for(technique.prompt, c) for c in caps],
        image=pil,
        strength=t / pipe.scheduler.config.num_train_timesteps,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator(device=pipe.unet.device).manual_seed(seed + technique.noise_seed),
        output_type="np",
    )
    extra = {}
    if technique.controlnet is not None:
        cn = load_controlnet(technique.controlnet, dtype=pipe.unet.dtype, device=pipe.unet.device, unet=pipe.unet)
        _check_controlnet(cn, pipe.unet, technique.name)
        extra["controlnet"] = cn
        edges = control_images(
            images, size, technique.canny_sigma, technique.canny or trained_canny(technique.controlnet)
        )
        call["control_image"] = [Image.fromarray((e[0].numpy() * 255).astype(np.uint8)).convert("RGB") for e in edges]
        call["controlnet_conditioning_scale"] = technique.conditioning_scale
    i2i = AutoPipelineForImage2Image.from_pipe(pipe, scheduler=_img2img_scheduler(pipe), **extra)
    i2i.set_progress_bar_config(disable=True)
    had_peft = _has_peft_layers(pipe.unet)
    if technique.lora is None:
        if not had_peft:
            return _uint8(i2i(**call).images)
        pipe.unet.disable_adapters()  # e.g. a GateExtractor's LoRAs: not part of this technique
        try:
            return _uint8(i2i(**call).images)
        finally:
            pipe.unet.enable_adapters()
    owned = held is not None and held.adapter_of(technique)
    adapter, before = owned or adapter_name(technique.name), active_adapters(pipe.unet)
    if not owned:
        if adapter in (getattr(pipe.unet, "peft_config", None) or {}):  # held by someone else: another name
            adapter += "-img2img"
        load_lora(pipe, technique.lora, adapter)
    try:
        with only_adapter(pipe.unet, adapter, technique.lora_scale, restore=before):
            return _uint8(i2i(**call).images)
    finally:
        if not owned:  # inactive again by now, so peft deletes it without a warning
            _remove_adapters(pipe.unet, [adapter], had_peft)


def _uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


# -- content shift over t, complexity and techniques --------------------------------
@dataclass(frozen=True)
class ShiftConfig:
    """What :func:`content_shift_table` measures."""

    timesteps: tuple[int, ...] = TIMESTEPS
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    steps: int = 50  # img2img DDIM steps
    batch_size: int = 8
    sigma: float = 1.0  # Gaussian blur before the Laplacian of the contour, lost and invented scores
    tolerance: int = 1  # px a detail may move and still count as kept (lost, invented)
    judge: bool = True  # the toy-world judge's distance; off for real images (its column is then NaN)
    image_size: int | None = None

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise DifstudyError(f"unknown reconstruction methods {bad}; use some of {list(METHODS)}")


def content_shift_table(
    pipe, dataset, techniques=(BASIC,), config: ShiftConfig = ShiftConfig(), progress: bool = True
) -> pd.DataFrame:
    """Content shift of every image, technique, method and t: a tidy frame with columns
    ``image_id, complexity, technique, method, t, t_start`` and one per score of
    :data:`~difstudy.gate.scores.MEASURES` (``contour, structure, lost, invented, judge``; module
    doc of :mod:`difstudy.gate.scores`).

    ``vae`` rows (technique ``basic``, t = 0) are the autoencoder floor; ``x0`` runs one U-Net
    forward per batch for all t and techniques; ``img2img`` one pipeline call per (t, technique).
    The judge (:class:`~difstudy.gate.scores.JudgeDistance`) is loaded once per call; with
    ``config.judge`` False (real images, which the toy-world judge has never seen) the ``judge``
    column is NaN."""
    from ..models import vae_scale_factor

    size = int(config.image_size or pipe.unet.config.sample_size * vae_scale_factor(pipe))
    starts = {t: img2img_start(pipe, t, config.steps) for t in config.timesteps} if "img2img" in config.methods else {}
    judge = JudgeDistance() if config.judge else None
    rows = []
    n = len(dataset)
    batches = [range(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    with GateExtractor(pipe, ["unet-out"], techniques, config.timesteps, config.seed, size) as ex:
        for idx in tqdm(batches, desc="content shift", unit="batch", disable=not progress):
            items = [_sample(dataset, i) for i in idx]
            ids, images, caps = (
                [it[0] for it in items],
                [resize_uint8(it[1], size) for it in items],
                [it[2] for it in items],
            )
            recs: dict[tuple[str, str, int], np.ndarray] = {}
            if "vae" in config.methods:
                recs[("basic", "vae", 0)] = decode_latents(pipe, ex.encode_images(images))
            if "x0" in config.methods:
                for (name, t), r in ex.reconstruct_x0(images, caps).items():
                    recs[(name, "x0", t)] = r
            if "img2img" in config.methods:
                for tq in techniques:
                    for t in config.timesteps:
                        recs[(tq.name, "img2img", t)] = img2img(
                            pipe, images, t, tq, caps, config.seed, config.steps, size, held=ex
                        )
            for (name, method, t), rec in recs.items():
                jd = judge(images, rec) if judge is not None else np.full(len(items), np.nan)
                for b, it in enumerate(items):
                    cs = content_shift(images[b], rec[b], config.sigma)
                    cs.update(detail_shift(images[b], rec[b], config.sigma, config.tolerance))
                    cs["judge"] = float(jd[b])
                    t_start = starts[t] if method == "img2img" else t
                    rows.append(
                        dict(
                            image_id=ids[b], complexity=it[3], technique=name, method=method, t=t, t_start=t_start, **cs
                        )
                    )
    return pd.DataFrame(rows)


def domain_indices(world, background: str, n: int, start: int = 0) -> list[int]:
    """Indices of the first ``n`` images of ``world`` (from ``start``) with ``background``."""
    out, i = [], start
    while len(out) < n and i < len(world):
        if world[i].attributes.get("background") == background:
            out.append(i)
        i += 1
    if len(out) < n:
        raise DifstudyError(f"{world!r} holds only {len(out)} images with a {background!r} background; make it longer")
    return out
