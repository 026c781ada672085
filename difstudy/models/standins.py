"""Random-weight stand-ins of the real models, for rehearsing the GPU study on a CPU (issue 23).

A stand-in has the real model's architecture and configuration (the embedded JSON files under
``difstudy/models/configs/<name>/``, the architecture fields of the published configs) with
random weights from a fixed seed, so every code path of a full run (the real widths, the real
catalogue of 197 activations, the real ControlNet layout) runs without downloading anything. Its
numbers mean nothing: a rehearsal's pages say so on every page.

- :func:`meta_unet` builds the real U-Net on the meta device (no memory, instant): the real
  catalogue without weights (``difstudy catalog sd15`` when the hub cannot be reached);
- :func:`standin_pipeline` / :func:`standin_controlnet` build the stand-in once, save it under a
  cache folder (fp16 on disk, atomically: a temporary folder renamed into place) and load it from
  there afterwards (seconds instead of the ~40 s a fresh SD1.5-width initialisation takes on 2 cores);
- :func:`rehearsal_cache` is the cache folder of the current rehearsal (``DIFSTUDY_REHEARSAL``), or
  None outside one; :func:`difstudy.models.load` and :func:`difstudy.gate.load_controlnet` return
  stand-ins for the real names while it is set.

The tokenizer is the closed-vocabulary CLIP BPE of the tiny models (:mod:`difstudy.models.tokenizer`):
the real CLIP vocabulary cannot be downloaded here, and with random weights it would change nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"
REHEARSAL_ENV = "DIFSTUDY_REHEARSAL"  # the rehearsal's stand-in cache folder; unset outside one
# real names (aliases and hub ids) -> stand-in
PIPELINES = {
    "sd15": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
}
CONTROLNETS = {"sd15-canny": "sd15", "lllyasviel/sd-controlnet-canny": "sd15"}
SEEDS = {"unet": 1, "vae": 2, "text_encoder": 3, "controlnet": 4}


@cache
def config(model: str, part: str) -> dict:
    """The embedded configuration ``part`` (unet, vae, text_encoder, scheduler, controlnet) of
    ``model``, without its ``_source`` note."""
    path = CONFIGS / model / f"{part}.json"
    if not path.exists():
        have = sorted(p.name for p in CONFIGS.iterdir())
        raise KeyError(f"no embedded {part} configuration for {model!r} ({path}); stand-ins exist for {have}")
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_source"}


def standin_name(name: str, kind: str = "pipeline") -> str | None:
    """The stand-in of a real model name (alias or hub id), or None."""
    return (PIPELINES if kind == "pipeline" else CONTROLNETS).get(str(name))


def rehearsal_cache() -> Path | None:
    value = os.environ.get(REHEARSAL_ENV)
    return Path(value) if value else None


def meta_unet(model: str = "sd15"):
    """The real U-Net of ``model`` on the meta device: its structure without memory or weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config(model, "unet"))


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build_pipeline(model: str = "sd15"):
    """A fresh stand-in pipeline of ``model`` (random weights, fixed seeds), fp32."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import TINY_WORDS
    from .tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(TINY_WORDS, model_max_length=77)
    text_cfg = CLIPTextConfig(
        **config(model, "text_encoder"),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    sched = config(model, "scheduler")
    if sched.pop("_class_name") != "PNDMScheduler":
        raise ValueError(f"{model}: only PNDMScheduler configurations are embedded")
    return StableDiffusionPipeline(
        unet=_seeded(SEEDS["unet"], lambda: UNet2DConditionModel(**config(model, "unet")).eval()),
        vae=_seeded(SEEDS["vae"], lambda: AutoencoderKL(**config(model, "vae")).eval()),
        text_encoder=_seeded(SEEDS["text_encoder"], lambda: CLIPTextModel(text_cfg).eval()),
        tokenizer=tok,
        scheduler=PNDMScheduler.from_config(sched),  # as diffusers reads the hub file (clip_sample unused)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_controlnet(model: str = "sd15"):
    from diffusers import ControlNetModel

    return _seeded(SEEDS["controlnet"], lambda: ControlNetModel(**config(model, "controlnet")).eval())


def _saved(folder: Path, build, marker: str):
    """``folder`` holding what ``build()`` makes (fp16 on disk), made once: written to a temporary
    folder beside it and renamed into place, so an interrupted build leaves nothing half-written."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        from . import cast

        cast(build(), torch.float16).save_pretrained(tmp)
        if (folder / marker).exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def standin_pipeline(model: str, cache: str | Path, dtype=None):
    """The stand-in pipeline of ``model`` from ``cache`` (built there the first time); fp32 unless
    ``dtype``. The pipeline's ``difstudy_standin`` attribute names what it stands in for."""
    from diffusers import StableDiffusionPipeline

    from . import dtype_kwargs

    folder = _saved(Path(cache) / f"{model}-pipeline", lambda: build_pipeline(model), "model_index.json")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), **dtype_kwargs(dtype or torch.float32), local_files_only=True, safety_checker=None
    )
    pipe.difstudy_standin = model
    return pipe


def standin_controlnet(model: str, cache: str | Path, dtype=None):
    from diffusers import ControlNetModel

    from . import dtype_kwargs

    folder = _saved(Path(cache) / f"{model}-controlnet", lambda: build_controlnet(model), "config.json")
    return ControlNetModel.from_pretrained(str(folder), **dtype_kwargs(dtype or torch.float32), local_files_only=True)
