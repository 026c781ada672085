"""GATE (Meng et al., "Suppress Content Shift", NeurIPS 2024): content shift,
the Img2Img guideline, generation techniques as extraction variants, and
feature amalgamation.

**Content shift, measured.** The paper shows content shift only as pictures
(contours and exact shapes that the U-Net's reconstruction of a noised image
gets wrong), and its official repository (Darkbblue/diffusion-content-shift)
has no scoring code. difstudy therefore defines two scores between an input
image ``x`` and a reconstruction ``y`` (both RGB, compared in [0, 1]):

- ``contour``: mean absolute difference of the Laplacians of the grey images,
  ``mean_p |L(g(x))_p - L(g(y))_p|`` with ``g`` = luminance
  (``skimage.color.rgb2gray``) after an optional Gaussian blur of ``sigma``
  pixels (``skimage.filters.gaussian``, default 1; 0 = none) and ``L`` the
  3x3 Laplacian of ``skimage.filters.laplace``. Edges that move, vanish or
  appear all add to it; a vertical step edge of height 1 that moves by one
  pixel gives ``4 / W`` (without blur) on a ``W`` px wide image.
- ``structure``: ``1 - SSIM(x, y)`` (``skimage.metrics.structural_similarity``
  over the RGB channels, data range 1, default 7x7 window).

Both are 0 for identical images. ``vae`` rows (encode then decode, no U-Net)
measure the floor that the autoencoder alone causes; the claims compare the
U-Net's reconstructions against it.

**Reconstructions**, through diffusers only:

- ``x0``: the predicted clean image of one U-Net forward at timestep ``t`` on
  the noised VAE latent (the same latent, noise draw and forward as feature
  extraction, :class:`GateExtractor` with the activation ``unet-out``), turned
  into ``x0`` by ``DDPMScheduler.step(...).pred_original_sample`` (epsilon,
  v or sample prediction from the scheduler config) and decoded by the VAE.
  This is what the features "see".
- ``img2img``: diffusers' Img2Img pipeline (``AutoPipelineForImage2Image.from_pipe``,
  the ControlNet variant when a technique has one) at strength ``t / 1000`` with a
  DDIM scheduler of ``steps`` steps (trailing spacing, so the first step is at
  ``t - 1`` for multiples of ``1000 / steps``; the ``t_start`` column records it),
  no classifier-free guidance, a seeded generator.

**Techniques** are conditioning variants of the one extraction protocol
(:class:`Technique`): a prompt rule (``empty``, ``generic``, ``fine``,
``text:<prompt>``; real data get fine captions from a CSV with
:func:`with_captions`), optionally a ControlNet fed the image's Canny edges
(its residuals are added to the U-Net as ``down_block_additional_residuals`` /
``mid_block_additional_residual``), optionally a LoRA adapter (diffusers/peft
format). All techniques of a batch go through **one** U-Net forward: rows
without a ControlNet get zero residuals (adding 0 is exact) and LoRA rows are
routed through peft's mixed-adapter batches (``adapter_names``; other rows use
``__base__``), with capture and early stop as usual. Each technique is a cache
variant: a prompt-only technique has exactly the key of that prompt variant
(``fine`` features from ``difstudy extract --variants fine`` are reused), a
ControlNet/LoRA technique gets ``<prompt>+<name>-<digest of its weights>``.
The official code runs one full extraction per technique.

**Amalgamation** (:class:`Amalgamation`) follows the official code
(``scarce_segmentation_gate/segmentation/pixel_classifier.py`` and
``correspondence_gate/correspondence/aggregation_network.py``): ``k`` weight
assigners, each applied to every bucket (basic or technique features of the
same activations) and giving a weight per bucket and channel, softmax over the
buckets; the ``k`` weighted sums are concatenated for the head. Assigner:
``Linear(C, 128) -> ReLU -> BatchNorm1d -> Dropout(0.5) -> Linear(128, C)``
on pixel vectors, ``Conv3x3(C, 128, no bias) -> ReLU -> BatchNorm2d ->
Dropout(0.5) -> global average pool -> Linear(128, C)`` on feature maps (one
weight per image and channel). ``k = 1`` (both official task scripts build
``weight_num=1``). The official sparsity term (mean L2 norm of the weights
across buckets, rewarded) is available with a fixed coefficient, default 0
(the official scripts random-walk it from 0 in steps of 1e-5).

**Claims** are decided by :mod:`difstudy.verdicts` only, on paired differences in the claimed
direction against a minimum effect declared beside each claim (``MIN_*`` constants):
:func:`content_shift_claims` and :func:`guideline_table` pair over the images (an image's
difference is its mean over the measured t); :func:`feature_claims` pairs over the run seeds
(the protocols report one score per seed, so with fewer than 5 seeds a feature claim is
inconclusive). The guideline's ``helps`` / ``hurts`` labels are display text derived from those
verdicts (:func:`guideline_effect`); a claim whose weights are missing is an inconclusive row
noted ``not measured``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import verdicts
from .cache import FeatureCache, Key
from .capture import Capture, split_batch
from .errors import DifstudyError, ModelNotFoundError
from .extract import Extractor, Summary, cache_group, image_digest, prompt_for, variant_key

MODELS_DIR = Path(__file__).parent / "models"
MINI_CONTROLNET_PATH = MODELS_DIR / "difstudy-mini-canny"
MINI_LORA_PATH = MODELS_DIR / "difstudy-mini-lora-checkered"
CONTROLNET_ALIASES = {
    "sd15-canny": "lllyasviel/sd-controlnet-canny",  # what the official GATE code uses for SD1.5
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",  # ... and for SDXL
}
TIMESTEPS = (25, 50, 100, 200, 400)
METHODS = ("vae", "x0", "img2img")
MEASURES = ("contour", "structure")


# ================================================================================
# 1. content shift: the two scores
def _rgb01(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DifstudyError(f"{name} must be an RGB image (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise DifstudyError(
            f"{name}: float images must lie in [0, 1], got values in [{a.min():.3g}, {a.max():.3g}]; "
            "pass uint8 or rescale"
        )
    return a


def laplacian_map(image, sigma: float = 1.0) -> np.ndarray:
    """Laplacian (skimage 3x3 kernel) of the grey image in [0, 1], after a Gaussian blur of ``sigma`` px."""
    from skimage.color import rgb2gray
    from skimage.filters import gaussian, laplace

    g = rgb2gray(_rgb01(image, "image"))
    if sigma > 0:
        g = gaussian(g, sigma=sigma, preserve_range=True)
    return laplace(g, ksize=3)


def content_shift(image, reconstruction, sigma: float = 1.0) -> dict[str, float]:
    """``{"contour", "structure"}`` between an image and its reconstruction (module doc).

    Both RGB (H, W, 3), uint8 or float in [0, 1], of the same size."""
    from skimage.metrics import structural_similarity

    x, y = _rgb01(image, "image"), _rgb01(reconstruction, "reconstruction")
    if x.shape != y.shape:
        raise DifstudyError(
            f"image {x.shape} and reconstruction {y.shape} differ in size; resize the image to the model's size first"
        )
    contour = float(np.abs(laplacian_map(x, sigma) - laplacian_map(y, sigma)).mean())
    ssim = structural_similarity(x, y, channel_axis=2, data_range=1.0)
    return {"contour": contour, "structure": float(1.0 - ssim)}


def edge_map(image, sigma: float = 1.0) -> np.ndarray:
    """Canny edges (``skimage.feature.canny``, default thresholds) of the grey image: (H, W) bool."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    return canny(rgb2gray(_rgb01(image, "image")), sigma=sigma)


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 at ``size`` x ``size`` (bicubic, as :func:`difstudy.extract.to_tensor`)."""
    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def control_images(images: Sequence[np.ndarray], size: int, sigma: float = 1.0) -> torch.Tensor:
    """ControlNet conditions: Canny edges of each image at ``size`` px as (B, 3, size, size) in {0, 1}."""
    e = np.stack([edge_map(resize_uint8(im, size), sigma) for im in images]).astype(np.float32)
    return torch.from_numpy(e)[:, None].expand(-1, 3, -1, -1).contiguous()


# ================================================================================
# 2. techniques, ControlNets and LoRAs
@dataclass(frozen=True)
class Technique:
    """A generation technique as an extraction variant.

    name: unique label (``basic``, ``fine``, ``controlnet``, ``lora`` ...).
    prompt: prompt rule of :func:`difstudy.extract.prompt_for` (``empty``, ``generic``,
        ``fine``, ``text:<prompt>``).
    controlnet: ``None``, a ``ControlNetModel``, ``"mini"`` (the committed mini canny
        ControlNet), an alias (``sd15-canny``, ``sdxl-canny``), a hub id or a folder.
    lora: ``None``, ``"mini"`` (the committed mini LoRA), or a diffusers/peft LoRA
        folder, file or hub id (its U-Net part is used).
    conditioning_scale: ControlNet residual scale (1 as in the official code).
    canny_sigma: Gaussian sigma of the Canny edge detector for the ControlNet condition.
    """

    name: str
    prompt: str = "empty"
    controlnet: Any = None
    lora: str | os.PathLike | None = None
    conditioning_scale: float = 1.0
    canny_sigma: float = 1.0

    def __post_init__(self):
        if not self.name or "|" in self.name or "/" in self.name:
            raise DifstudyError(f"technique name {self.name!r} must be non-empty without '|' or '/'")
        prompt_for(self.prompt, {"generic": "x", "fine": "x"})  # validates the rule


BASIC = Technique("basic")


def _weights_digest(tensors) -> str:
    h = hashlib.sha1()
    for name, p in tensors:
        h.update(name.encode())
        h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def load_controlnet(name_or_path, dtype=None, device=None):
    """A diffusers ``ControlNetModel`` from a built-in name, alias, hub id or folder (see :class:`Technique`)."""
    from diffusers import ControlNetModel

    if isinstance(name_or_path, ControlNetModel):
        cn = name_or_path
    else:
        name = str(name_or_path)
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        path = MINI_CONTROLNET_PATH if name == "mini" else Path(name).expanduser()
        if name == "mini" or path.exists() or name.startswith((".", "/", "~")):
            if not path.is_dir():
                hint = " Train it with `python -m difstudy.train.controlnet`." if name == "mini" else ""
                raise ModelNotFoundError(f"ControlNet folder {str(path)!r} does not exist.{hint}")
            if not (path / "config.json").exists():
                found = sorted(p.name for p in path.iterdir())[:10]
                raise ModelNotFoundError(
                    f"{str(path)!r} is not a diffusers ControlNet folder: config.json is missing (found: {found}). "
                    "Expected config.json and diffusion_pytorch_model.safetensors, as written by "
                    "`controlnet.save_pretrained(folder)` or `huggingface-cli download ID --local-dir folder`."
                )
            try:
                cn = ControlNetModel.from_pretrained(str(path), local_files_only=True, **kw)
            except (OSError, ValueError) as e:
                raise ModelNotFoundError(f"could not load the ControlNet folder {str(path)!r}: {e}") from None
        elif "/" in CONTROLNET_ALIASES.get(name, name):
            repo = CONTROLNET_ALIASES.get(name, name)
            try:
                cn = ControlNetModel.from_pretrained(repo, **kw)
            except Exception as e:  # hub/network errors come in many types
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ModelNotFoundError(
                    f"could not load the ControlNet {repo!r} from the Hugging Face hub or its local cache: {reason}. "
                    f"On a machine with network run `huggingface-cli download {repo} --local-dir DIR` and pass DIR."
                ) from None
        else:
            raise ModelNotFoundError(
                f"unknown ControlNet {name!r}: use 'mini', an alias ({', '.join(CONTROLNET_ALIASES)}), "
                "a hub id (org/name) or an existing folder"
            )
    if (dtype is not None and cn.dtype != dtype) or (device is not None and cn.device != torch.device(device)):
        cn = cn.to(device=device, dtype=dtype)
    return cn.eval().requires_grad_(False)


def build_controlnet(pipe):
    """A new ControlNet initialised from the pipeline's U-Net (``ControlNetModel.from_unet``), its
    condition encoder downsampling by the VAE factor (4 for the mini model, 8 for SD)."""
    from diffusers import ControlNetModel

    from .models import vae_scale_factor

    levels = int(np.log2(vae_scale_factor(pipe))) + 1
    channels = (16, 32, 96, 256, 256)[:levels]
    return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)


def _check_controlnet(cn, unet, label: str) -> None:
    for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
        a, b = getattr(cn.config, key), getattr(unet.config, key)
        if (tuple(a) if isinstance(a, (list, tuple)) else a) != (tuple(b) if isinstance(b, (list, tuple)) else b):
            raise DifstudyError(
                f"ControlNet of technique {label!r} has {key}={a}, the pipeline's U-Net {key}={b}: "
                "use a ControlNet made for this model family (e.g. sd15-canny for SD1.5)"
            )


def _lora_source(lora) -> str:
    if str(lora) == "mini":
        if not MINI_LORA_PATH.is_dir():
            raise ModelNotFoundError(
                f"the mini LoRA is missing from {MINI_LORA_PATH}; train it with `python -m difstudy.train.lora`"
            )
        return str(MINI_LORA_PATH)
    p = Path(str(lora)).expanduser()
    if p.exists():
        return str(p)
    if str(lora).startswith((".", "/", "~")) or str(lora).count("/") != 1:
        raise ModelNotFoundError(
            f"LoRA {str(lora)!r} does not exist: pass 'mini', a folder holding pytorch_lora_weights.safetensors "
            "(as written by `StableDiffusionPipeline.save_lora_weights`), a .safetensors file or a hub id (org/name)"
        )
    return str(lora)


def load_lora(pipe, lora, adapter_name: str) -> str:
    """Load the U-Net part of a diffusers/peft LoRA into ``pipe.unet`` as ``adapter_name``;
    returns a digest of its weights. Remove it with ``pipe.unet.delete_adapters(adapter_name)``."""
    src = _lora_source(lora)
    kw = {}
    if Path(src).is_file():
        kw = {"weight_name": Path(src).name}
        src = str(Path(src).parent)
    try:
        got = pipe.lora_state_dict(src, **kw)
    except Exception as e:
        raise ModelNotFoundError(f"could not read the LoRA {str(lora)!r}: {str(e).splitlines()[0][:200]}") from None
    state, alphas = got[0], got[1]
    unet_keys = [k for k in state if k.startswith("unet.")]
    if not unet_keys:
        raise DifstudyError(f"LoRA {str(lora)!r} holds no U-Net weights (keys start with {sorted(state)[:3]})")
    digest = _weights_digest(sorted((k, state[k]) for k in unet_keys))
    pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=adapter_name, _pipeline=pipe)
    pipe.unet.enable_lora()
    return digest


@contextmanager
def _adapter_rows(unet, names: list[str] | None):
    """Route each batch row through its own LoRA adapter (peft mixed-adapter batches)."""
    if names is None:
        yield
        return
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _has_peft_layers(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def _remove_adapters(unet, names: list[str], keep_layers: bool) -> None:
    """Delete ``names``; without other adapters (``keep_layers`` False) unload the peft layers too."""
    if keep_layers:
        unet.delete_adapters(names)
    else:
        unet.unload_lora()


# ================================================================================
# 3. extraction with techniques as variants
class GateExtractor(Extractor):
    """The extraction protocol of :class:`difstudy.extract.Extractor` with techniques as variants.

    ``GateExtractor(pipe, activations, techniques=(BASIC,), timesteps=(50,), seed=0)``; use it as a
    context manager (LoRA adapters are loaded into ``pipe.unet`` for its lifetime and removed on
    exit). :meth:`features` returns ``{Key: tensor}`` with ``Key.variant`` = :attr:`variant_keys`.
    """

    def __init__(
        self, pipe, activations, techniques=(BASIC,), timesteps=(50,), seed=0, image_size=None, stop_early=True
    ):
        from diffusers import DDPMScheduler

        techniques = tuple(techniques)
        names = [tq.name for tq in techniques]
        if not techniques or len(set(names)) != len(names):
            raise DifstudyError(f"techniques need distinct names, got {names}")
        super().__init__(pipe, activations, timesteps, [tq.prompt for tq in techniques], seed, image_size, stop_early)
        self.techniques = techniques
        # x0 from the model output for any prediction type (noising itself is the Extractor's ddpm_noise)
        self.step_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
        self._had_peft = _has_peft_layers(self.unet)
        self.controlnets: dict[int, Any] = {}
        self.adapters: dict[int, str] = {}
        self.variant_keys: list[str] = []
        try:
            for v, tq in enumerate(techniques):
                parts = []
                if tq.controlnet is not None:
                    cn = load_controlnet(tq.controlnet, dtype=self.dtype, device=self.device)
                    _check_controlnet(cn, self.unet, tq.name)
                    self.controlnets[v] = cn
                    parts.append(_weights_digest(cn.named_parameters()))
                    parts.append(f"{tq.conditioning_scale:g}/{tq.canny_sigma:g}")
                if tq.lora is not None:
                    adapter = f"difstudy-{tq.name}"
                    parts.append(load_lora(pipe, tq.lora, adapter))
                    self.adapters[v] = adapter
                key = variant_key(tq.prompt)
                if parts:
                    key += f"+{tq.name}-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
                self.variant_keys.append(key)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the LoRA adapters loaded for the techniques (all peft layers when the U-Net had
        none before, so its module tree, and with it its cache group, is as it was)."""
        if self.adapters:
            _remove_adapters(self.unet, list(self.adapters.values()), self._had_peft)
            self.adapters = {}

    def __enter__(self) -> GateExtractor:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @torch.no_grad()
    def unet_inputs(self, images, captions, z0=None):
        """``(sample, t, kwargs, adapter_names)`` of the one forward of B images x T timesteps x
        V techniques, rows in (b, t, v) order: :meth:`Extractor.unet_kwargs` plus the techniques'
        ControlNet residuals (zeros on other rows) and per-row LoRA adapter names."""
        B, T, V = len(images), len(self.timesteps), len(self.techniques)
        N = B * T * V
        z0 = self.encode_images(images) if z0 is None else z0
        sample, tt, kw = self.unet_kwargs(captions, self.noisy_latents(z0, images))
        ehs = kw["encoder_hidden_states"]
        tech = torch.arange(V, device=self.device).repeat(B * T)
        if self.controlnets:
            down, mid = None, None
            for v, cn in self.controlnets.items():
                tq = self.techniques[v]
                rows = (tech == v).nonzero().flatten()
                cond = control_images(images, self.image_size, tq.canny_sigma).to(self.device, self.dtype)
                extra = {}
                if self.is_xl:
                    extra["added_cond_kwargs"] = {k: x[rows] for k, x in kw["added_cond_kwargs"].items()}
                d, m = cn(
                    sample[rows],
                    tt[rows],
                    encoder_hidden_states=ehs[rows],
                    controlnet_cond=cond[rows // (T * V)],
                    conditioning_scale=tq.conditioning_scale,
                    return_dict=False,
                    **extra,
                )
                if down is None:  # rows without a ControlNet add zeros, which is exact
                    down = [x.new_zeros((N, *x.shape[1:])) for x in d]
                    mid = m.new_zeros((N, *m.shape[1:]))
                for full, part in zip(down, d):
                    full[rows] = part
                mid[rows] = m
            kw["down_block_additional_residuals"] = down
            kw["mid_block_additional_residual"] = mid
        names = [self.adapters.get(int(v), "__base__") for v in tech] if self.adapters else None
        return sample, tt, kw, names

    @torch.no_grad()
    def features(
        self, ids: Sequence[str], images: list[np.ndarray], captions: list[dict], store_dtype=None
    ) -> dict[Key, torch.Tensor]:
        """``{Key: (C, H, W)}`` for one batch, ``Key.variant`` from :attr:`variant_keys`; with
        ``store_dtype`` on the CPU in that dtype."""
        B, T, V = len(ids), len(self.timesteps), len(self.techniques)
        sample, tt, kw, adapter_names = self.unet_inputs(images, captions)
        with (
            _adapter_rows(self.unet, adapter_names),
            Capture(self.unet, self.names, stop=self.stop_early, catalog=self.catalog) as cap,
        ):
            cap.run(sample, tt, **kw)
        out: dict[Key, torch.Tensor] = {}
        for name, val in cap.cache.items():
            a = self.catalog[name] if name in self.catalog else None
            if a is not None and a.is_map:  # (N, heads, Nq, Nk) -> (N, Nk, H, W), as Extractor stores maps
                h, w = self.catalog[name.replace("-map", "-q")].shape[1:]
                val = val.float().mean(1).transpose(1, 2).reshape(val.shape[0], -1, h, w)
            if store_dtype is not None:
                val = val.to(dtype=store_dtype).cpu()
            val = split_batch(val, B, T, V)
            for b, iid in enumerate(ids):
                for j, t in enumerate(self.timesteps):
                    for k, vk in enumerate(self.variant_keys):
                        out[Key(name, t, vk, self.seed, iid)] = val[b, j, k]
        return out

    @torch.no_grad()
    def reconstruct_x0(self, images, captions) -> dict[tuple[str, int], np.ndarray]:
        """``{(technique name, t): (B, S, S, 3) uint8}``: the decoded ``pred_original_sample`` of
        the same forward that gives the features (one U-Net pass for all techniques and t)."""
        B, T, V = len(images), len(self.timesteps), len(self.techniques)
        sample, tt, kw, adapter_names = self.unet_inputs(images, captions)
        with _adapter_rows(self.unet, adapter_names):
            pred = self.unet(sample, tt, **kw).sample
        pred, sample = split_batch(pred, B, T, V), split_batch(sample, B, T, V)
        out = {}
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        for j, t in enumerate(self.timesteps):
            for v, tq in enumerate(self.techniques):
                x0 = self.step_scheduler.step(pred[:, j, v], t, sample[:, j, v], generator=g).pred_original_sample
                out[(tq.name, t)] = decode_latents(self.pipe, x0)
        return out


def _vae_dtype(pipe):
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return torch.float32 if upcast else vae.dtype


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Scaled VAE latents -> (B, H, W, 3) uint8 through the VAE decoder."""
    vae, dt = pipe.vae, _vae_dtype(pipe)
    orig = vae.dtype
    if dt != orig:
        vae.to(dt)
    try:
        x = vae.decode(latents.to(dt) / vae.config.scaling_factor).sample
    finally:
        if dt != orig:
            vae.to(orig)
    return (x.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()).copy()


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
) -> np.ndarray:
    """diffusers Img2Img (ControlNet Img2Img for a ControlNet technique) at strength ``t / 1000``,
    DDIM with ``steps`` steps, no guidance: (B, S, S, 3) uint8."""
    from diffusers import AutoPipelineForImage2Image

    from .models import vae_scale_factor

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
        generator=torch.Generator(device=pipe.unet.device).manual_seed(seed),
        output_type="np",
    )
    extra = {}
    if technique.controlnet is not None:
        cn = load_controlnet(technique.controlnet, dtype=pipe.unet.dtype, device=pipe.unet.device)
        _check_controlnet(cn, pipe.unet, technique.name)
        extra["controlnet"] = cn
        edges = control_images(images, size, technique.canny_sigma)
        call["control_image"] = [Image.fromarray((e[0].numpy() * 255).astype(np.uint8)).convert("RGB") for e in edges]
        call["controlnet_conditioning_scale"] = technique.conditioning_scale
    i2i = AutoPipelineForImage2Image.from_pipe(pipe, scheduler=_img2img_scheduler(pipe), **extra)
    i2i.set_progress_bar_config(disable=True)
    adapter, had_peft = None, _has_peft_layers(pipe.unet)
    disabled = technique.lora is None and had_peft  # e.g. a GateExtractor's LoRAs: not part of this technique
    try:
        if technique.lora is not None:
            adapter = f"difstudy-{technique.name}"
            if adapter in (getattr(pipe.unet, "peft_config", None) or {}):  # a GateExtractor holds that name
                adapter += "-img2img"
            load_lora(pipe, technique.lora, adapter)
            pipe.unet.set_adapters([adapter])
        elif disabled:
            pipe.unet.disable_adapters()
        out = i2i(**call).images
    finally:
        if adapter is not None:
            _remove_adapters(pipe.unet, [adapter], had_peft)
        if disabled:
            pipe.unet.enable_adapters()
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


# ================================================================================
# 4. content shift over t, complexity and techniques; claims and the guideline
@dataclass(frozen=True)
class ShiftConfig:
    """What :func:`content_shift_table` measures."""

    timesteps: tuple[int, ...] = TIMESTEPS
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    steps: int = 50  # img2img DDIM steps
    batch_size: int = 8
    sigma: float = 1.0  # Gaussian blur before the Laplacian of the contour score
    image_size: int | None = None

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise DifstudyError(f"unknown reconstruction methods {bad}; use some of {list(METHODS)}")


def _sample(ds, i):
    """(image_id, RGB uint8, captions dict, complexity or None) of a ToySample or a loader dict."""
    s = ds[i]
    if isinstance(s, dict):
        caps = {"generic": s.get("caption"), "fine": s.get("fine_caption")}
        return str(s["image_id"]), s["image"], caps, s.get("complexity")
    return s.image_id, s.image, {"generic": s.caption, "fine": s.fine_caption}, getattr(s, "complexity", None)


def content_shift_table(
    pipe, dataset, techniques=(BASIC,), config: ShiftConfig = ShiftConfig(), progress: bool = True
) -> pd.DataFrame:
    """Content shift of every image, technique, method and t: a tidy frame with columns
    ``image_id, complexity, technique, method, t, t_start, contour, structure``.

    ``vae`` rows (technique ``basic``, t = 0) are the autoencoder floor; ``x0`` runs one U-Net
    forward per batch for all t and techniques; ``img2img`` one pipeline call per (t, technique)."""
    from .models import vae_scale_factor

    size = int(config.image_size or pipe.unet.config.sample_size * vae_scale_factor(pipe))
    starts = {t: img2img_start(pipe, t, config.steps) for t in config.timesteps} if "img2img" in config.methods else {}
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
                            pipe, images, t, tq, caps, config.seed, config.steps, size
                        )
            for (name, method, t), rec in recs.items():
                for b, it in enumerate(items):
                    cs = content_shift(images[b], rec[b], config.sigma)
                    t_start = starts[t] if method == "img2img" else t
                    rows.append(
                        dict(
                            image_id=ids[b], complexity=it[3], technique=name, method=method, t=t, t_start=t_start, **cs
                        )
                    )
    return pd.DataFrame(rows)


# -- claims: every verdict comes from difstudy.verdicts ---------------------------------
HOLDS, FAILS, INCONCLUSIVE = verdicts.VERDICTS

# The smallest change of a content-shift score that matters to a reader, per score. Fixed before
# any claim was measured, from the scores' own scale, never from an effect:
# - structure (1 - SSIM): 0.01, one point of SSIM; the between-image standard deviation of the
#   score is 0.05-0.09 on the mini model's 64 px toy images (VAE, x0 and img2img at t = 50 and
#   200, 16 validation images), so one point is about a sixth of it, a small standardised effect.
# - contour (mean |Laplacian difference|, blur sigma 1): 0.002, a fifth of the typical
#   between-image standard deviation of the score (0.007-0.016, mean 0.011, on the same 16 images),
#   Cohen's "small" effect (d = 0.2); about a thirtieth of a full-contrast edge across a 64 px image
#   moving by one pixel (4 / 64 without blur). The score is per pixel, so at another image size
#   (SD1.5 at 512 px) its scale differs and the page says so.
MIN_SHIFT = {"contour": 0.002, "structure": 0.01}
# "content shift exists": the reconstruction's shift above the VAE floor, per image, reaches this
MIN_SHIFT_EXISTS = MIN_SHIFT
# "content shift grows with t": the per-image Spearman correlation of t and the shift, mean over
# images, reaches 0.3, Cohen's "medium" correlation; below it t orders less than a tenth of the
# shift's rank variance, which is not what "grows with t" tells a reader.
MIN_SHIFT_RHO = 0.3


def _claim_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(verdicts.CLAIM_COLUMNS))


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either is constant."""
    return float(pd.Series(np.asarray(x, float)).rank().corr(pd.Series(np.asarray(y, float)).rank()))


def content_shift_claims(
    df: pd.DataFrame, technique: str = "basic", t_ref: int = 50, confidence: float = 0.95
) -> pd.DataFrame:
    """Claim rows (:data:`difstudy.verdicts.CLAIM_COLUMNS`), per reconstruction method and score,
    decided by :func:`difstudy.verdicts.paired` over the images (the sampling units):

    - "content shift exists": per image, the reconstruction's shift at ``t_ref`` (the middle t
      when ``t_ref`` was not measured) minus the image's VAE floor (the raw shift without ``vae``
      rows); minimum effect :data:`MIN_SHIFT_EXISTS`;
    - "content shift grows with t" (two or more t): per image, Spearman's rho of t and the shift
      over the measured t; minimum effect :data:`MIN_SHIFT_RHO`."""
    rows = []
    d = df[df["technique"] == technique]
    floor = df[df["method"] == "vae"].groupby("image_id")[list(MEASURES)].mean()
    for method in [m for m in ("x0", "img2img") if m in set(d["method"])]:
        dm = d[d["method"] == method]
        ts = sorted(dm["t"].unique())
        t0 = t_ref if t_ref in ts else ts[len(ts) // 2]
        what = ", above the VAE floor" if len(floor) else ""
        for measure in MEASURES:
            at = dm[dm["t"] == t0].groupby("image_id", sort=False)[measure].mean()
            if len(floor):
                at = at - floor[measure].reindex(at.index)
            v = verdicts.paired(at.to_numpy(), MIN_SHIFT_EXISTS[measure], confidence=confidence)
            claim = f"content shift exists ({method}, t={t0}{what})"
            rows.append(v.row(claim, f"{measure} shift{' - VAE floor' if what else ''}, mean over images"))
            if len(ts) > 1:
                rho = [spearman(g["t"], g[measure]) for _, g in dm.groupby("image_id", sort=False)]
                v = verdicts.paired(rho, MIN_SHIFT_RHO, confidence=confidence)
                claim = f"content shift grows with t ({method}, t={ts[0]}..{ts[-1]})"
                rows.append(v.row(claim, f"Spearman rho(t, {measure}) per image, mean over images"))
    return _claim_frame(rows)


def t_label(ts) -> str:
    """``t=50`` for one timestep, ``t=25,50,100`` for several (names claims measured at different t apart)."""
    return "t=" + ",".join(str(int(t)) for t in sorted(set(ts)))


# "<technique> lowers content shift": per image, the shift without the technique minus with it
# reaches the smallest change that matters, MIN_SHIFT (the same scale as "content shift exists")
MIN_SHIFT_REDUCTION = MIN_SHIFT
# display text of the guideline, each derived from verdicts (:func:`guideline_effect`)
EFFECTS = ("helps", "hurts", "negligible", "no clear effect")


def guideline_effect(lowers: verdicts.Verdict, raises: verdicts.Verdict) -> str:
    """Display text of the guideline from two verdicts of :mod:`difstudy.verdicts` on the same
    images: ``helps`` when "lowers content shift" holds, ``hurts`` when "raises content shift"
    holds, ``negligible`` when both fail (the interval rules out a change as large as the minimum
    either way), else ``no clear effect``."""
    if lowers.verdict == HOLDS:
        return "helps"
    if raises.verdict == HOLDS:
        return "hurts"
    return "negligible" if lowers.verdict == FAILS and raises.verdict == FAILS else "no clear effect"


def guideline_table(df: pd.DataFrame, baseline: str = "basic", confidence: float = 0.95) -> pd.DataFrame:
    """The GATE guideline per technique, method and measure, paired over images (the sampling
    units; an image's difference is its mean over the measured t).

    Columns: ``without`` / ``with_technique`` (mean shift); ``estimate``, ``lo``, ``hi``,
    ``min_effect``, ``n_units``, ``claim_verdict`` and ``note``: :func:`difstudy.verdicts.paired`
    on the reduction (without - with, the claim's direction) against :data:`MIN_SHIFT_REDUCTION`;
    ``claim``: the claim's name (:func:`guideline_claims`); ``verdict``: display text
    (:func:`guideline_effect`: ``helps``, ``hurts``, ``negligible``, ``no clear effect``);
    ``difference``, ``ci_low``, ``ci_high``: with - without and its interval (the plot's axis,
    ``-estimate``, ``-hi``, ``-lo``)."""
    d = df[df["method"] != "vae"]
    base = d[d["technique"] == baseline].set_index(["image_id", "method", "t"])
    rows = []
    for (name, method), g in d[d["technique"] != baseline].groupby(["technique", "method"], sort=False):
        for measure in MEASURES:
            b = base.loc[[(i, method, t) for i, t in zip(g["image_id"], g["t"])], measure].to_numpy()
            per = g[["image_id"]].assign(r=b - g[measure].to_numpy()).groupby("image_id", sort=False)["r"].mean()
            m = MIN_SHIFT_REDUCTION[measure]
            lowers = verdicts.paired(per.to_numpy(), m, confidence=confidence)
            raises = verdicts.paired(-per.to_numpy(), m, confidence=confidence)
            tl = t_label(g["t"])
            row = lowers.row(f"{name} lowers content shift ({method}, {tl})", f"{measure} shift without - with")
            rows.append(
                dict(
                    technique=name,
                    method=method,
                    t=tl,
                    measure=measure,
                    without=float(b.mean()),
                    with_technique=float(g[measure].mean()),
                    estimate=lowers.estimate,
                    lo=lowers.lo,
                    hi=lowers.hi,
                    min_effect=m,
                    n_units=lowers.n_units,
                    claim_verdict=lowers.verdict,
                    verdict=guideline_effect(lowers, raises),
                    difference=-lowers.estimate,
                    ci_low=-lowers.hi,
                    ci_high=-lowers.lo,
                    claim=row["claim"],
                    note=row["note"],
                )
            )
    return pd.DataFrame(rows)


def guideline_claims(table: pd.DataFrame) -> pd.DataFrame:
    """Claim rows (:data:`difstudy.verdicts.CLAIM_COLUMNS`) "<technique> lowers content shift"
    from :func:`guideline_table`: its verdicts, copied (``claim_verdict``), not decided again."""
    if not len(table):
        return _claim_frame([])
    t = table.dropna(subset=["claim"])
    out = t.assign(measure=[f"{m} shift without - with, mean over images" for m in t["measure"]], control=np.nan)
    return _claim_frame(out.drop(columns=["verdict"]).rename(columns={"claim_verdict": "verdict"}).to_dict("records"))


# ================================================================================
# 5. real data: fine-grained captions from a CSV
def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{image_id: caption}`` from a CSV with the header ``image_id,caption``."""
    p = Path(path)
    if not p.is_file():
        raise DifstudyError(f"caption file {str(p)!r} does not exist; expected a CSV with columns image_id,caption")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image_id", "caption"} <= set(reader.fieldnames):
            raise DifstudyError(
                f"caption file {str(p)!r} has columns {reader.fieldnames}; it needs a header image_id,caption"
            )
        return {row["image_id"]: row["caption"] for row in reader}


class with_captions:  # noqa: N801 - used like a function
    """A dataset view whose items carry fine-grained captions from a CSV (``image_id,caption``).

    ``extract(..., variants=["fine"])`` and ``Technique("fine", prompt="fine")`` then read the
    user's captions: ``ds = with_captions(load_dataset("spair", root), "captions.csv")``.
    Items become dicts (``image_id``, ``image``, ``caption``, ``fine_caption`` and the item's
    other fields); an image without a caption is an error naming it. The cache keys these
    features ``fine``: keep one caption file per cache folder."""

    def __init__(self, dataset, path: str | os.PathLike):
        self.dataset, self.path = dataset, str(path)
        self.captions = read_captions(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        d = dict(s) if isinstance(s, dict) else {k: getattr(s, k) for k in s.__dataclass_fields__}
        if "caption" not in d:
            d["caption"] = None
        iid = str(d["image_id"])
        if iid not in self.captions:
            raise DifstudyError(f"image {iid!r} has no caption in {self.path!r}; add a row '{iid},<caption>'")
        d["fine_caption"] = self.captions[iid]
        return d


# ================================================================================
# 6. extraction of techniques into the feature cache
def extract_techniques(
    model,
    dataset,
    activations,
    techniques=(BASIC,),
    timesteps=(50,),
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 8,
    cache_dir="cache/features",
    store_dtype=torch.float16,
    dtype=None,
    device=None,
    model_name: str | None = None,
    progress: bool = True,
) -> tuple[FeatureCache, Summary]:
    """:func:`difstudy.extract.extract` with techniques as variants: the same cache group (the
    base model's), keys and resumability; only missing (image, activation, t, technique) entries
    are computed, all techniques of a batch in one U-Net forward."""
    from .models import load

    t0 = time.time()
    if isinstance(model, str):
        model_name = model_name or model
        model = load(model, dtype=dtype, device=device)
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    probe = Extractor(model, activations, timesteps, [tq.prompt for tq in techniques], seed, image_size)
    group, meta = cache_group(model, model_name, probe.image_size, store_dtype)  # before any LoRA is loaded
    cache = FeatureCache(cache_dir, group, meta)
    summary = Summary(cache_dir=str(cache.dir))
    summary.repaired = len(cache.verify())
    n = len(dataset)
    pending = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    seen: dict[str, int] = {}
    with GateExtractor(model, activations, techniques, timesteps, seed, probe.image_size) as ex:
        per_image = len(ex.names) * len(ex.timesteps) * len(ex.variant_keys)

        def keys_of(ids):
            return [Key(a, t, v, seed, i) for i in ids for a in ex.names for t in ex.timesteps for v in ex.variant_keys]

        def load_batch(idx):
            items = [_sample(dataset, i) for i in idx]
            for i, it in zip(idx, items):
                if seen.setdefault(it[0], i) != i:
                    raise DifstudyError(
                        f"image id {it[0]!r} names two images of the dataset (index {seen[it[0]]} and {i}); "
                        "ids key the feature cache: make them unique, e.g. '<dataset>/<split>/<path>'"
                    )
            digests = {it[0]: image_digest(it[1]) for it in items}
            for iid, d in digests.items():
                if cache.image_digest(iid) not in (None, d):
                    raise DifstudyError(
                        f"image id {iid!r} is cached in {cache.dir} for another image (different pixels); "
                        "namespace the ids or use another cache_dir"
                    )
            return items, digests

        bar = tqdm(total=n, desc=f"extract {len(techniques)} techniques", unit="img", disable=not progress)
        while pending:
            busy = []
            for idx in pending:
                items, digests = load_batch(idx)
                ids = [it[0] for it in items]
                if not cache.missing(keys_of(ids)):
                    summary.reused += len(ids) * per_image
                    bar.update(len(idx))
                    continue
                bk = hashlib.sha1(repr([ids, ex.names, ex.timesteps, ex.variant_keys, seed]).encode()).hexdigest()[:16]
                lock = cache.claim(bk)
                if lock is None:  # another process computes this batch
                    busy.append(idx)
                    continue
                try:
                    cache.refresh()
                    todo = set(cache.missing(keys_of(ids)))
                    if todo:
                        need = {k.image_id for k in todo}
                        sel = [it for it in items if it[0] in need]
                        feats = ex.features([s[0] for s in sel], [s[1] for s in sel], [s[2] for s in sel], store_dtype)
                        feats = {k: v for k, v in feats.items() if k in todo}
                        cache.write(bk, feats, extra=dict(model=model_name), images={i: digests[i] for i in need})
                        summary.computed += len(feats)
                        summary.images += len(sel)
                    summary.reused += len(ids) * per_image - len(todo)
                finally:
                    lock.release()
                bar.update(len(idx))
            if busy:
                summary.skipped_busy += len(busy)
                time.sleep(0.5)
                cache.refresh()
            pending = busy
        bar.close()
    summary.seconds = time.time() - t0
    if progress:
        print(summary)
    return cache, summary


# ================================================================================
# 7. feature amalgamation
class WeightAssigner(nn.Module):
    """One official GATE weight assigner: features of one bucket -> a logit per channel.

    Maps (B, C, H, W): ``Conv3x3(C, hidden, no bias) -> ReLU -> BatchNorm2d -> Dropout -> GAP ->
    Linear(hidden, C)`` (a logit per image and channel). Vectors (B, C): ``Linear(C, hidden) ->
    ReLU -> BatchNorm1d -> Dropout -> Linear(hidden, C)``."""

    def __init__(self, channels: int, hidden: int = 128, dropout: float = 0.5, spatial: bool = True):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.BatchNorm2d(hidden),
                nn.Dropout(dropout),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(hidden, channels),
            )
        else:
            self.net = nn.Sequential(
                nn.Linear(channels, hidden),
                nn.ReLU(),
                nn.BatchNorm1d(hidden),
                nn.Dropout(dropout),
                nn.Linear(hidden, channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Amalgamation(nn.Module):
    """``k`` learned weight assigners combining ``n_buckets`` feature buckets of ``channels`` each.

    Input: buckets concatenated along channels, (B, V*C, H, W) (or (B, V*C) with
    ``spatial=False``), bucket ``v`` in channels ``v*C:(v+1)*C`` (so the probes' 4D batches
    carry them unchanged). Output ``(features (B, k*C, ...), weights (B, k, V, C))``: per
    assigner, softmax over buckets of its per-channel logits, and the weighted sum of the buckets.
    ``weights=`` fixes the weights instead ((V,), (k, V) or (B, k, V, C); e.g. one-hot picks a bucket).
    """

    def __init__(
        self, channels: int, n_buckets: int, k: int = 1, hidden: int = 128, dropout: float = 0.5, spatial: bool = True
    ):
        super().__init__()
        if channels < 1 or n_buckets < 1 or k < 1:
            raise ValueError(f"channels, n_buckets and k must be >= 1, got {channels}, {n_buckets}, {k}")
        self.channels, self.n_buckets, self.k, self.spatial = channels, n_buckets, k, spatial
        self.assigners = nn.ModuleList(WeightAssigner(channels, hidden, dropout, spatial) for _ in range(k))

    @property
    def out_channels(self) -> int:
        return self.k * self.channels

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        want = 4 if self.spatial else 2
        if x.ndim != want or x.shape[1] != self.n_buckets * self.channels:
            shape = "(B, V*C, H, W)" if self.spatial else "(B, V*C)"
            raise ValueError(
                f"expected {shape} with V*C = {self.n_buckets}*{self.channels} = {self.n_buckets * self.channels}, "
                f"got shape {tuple(x.shape)}"
            )
        return x.float().reshape(x.shape[0], self.n_buckets, self.channels, *x.shape[2:])

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xb = self.buckets(x)  # (B, V, C, ...)
        B, V, C = xb.shape[:3]
        if weights is None:
            logits = torch.stack([torch.stack([a(xb[:, v]) for v in range(V)], 1) for a in self.assigners], 1)
            w = F.softmax(logits, dim=2)  # (B, k, V, C)
        else:
            w = torch.as_tensor(weights, dtype=xb.dtype, device=xb.device)
            if w.ndim == 1:
                w = w[None, None, :, None].expand(B, self.k, V, C)
            elif w.ndim == 2:
                w = w[None, :, :, None].expand(B, self.k, V, C)
            if tuple(w.shape) != (B, self.k, V, C):
                raise ValueError(f"weights must have shape (V,), (k, V) or (B, k, V, C) = {(B, self.k, V, C)}")
        extra = (None,) * (xb.ndim - 3)
        mixed = [(w[(slice(None), j, slice(None), slice(None), *extra)] * xb).sum(1) for j in range(self.k)]
        return torch.cat(mixed, 1), w

    @staticmethod
    def sparsity(weights: torch.Tensor) -> torch.Tensor:
        """The official sparsity term: L2 norm of the weights across buckets, mean over the batch
        and channels, averaged over the ``k`` assigners (1 for one-hot weights, 1/sqrt(V) for uniform)."""
        return torch.linalg.norm(weights, dim=2).mean()


class AmalgamatedHead(nn.Module):
    """An :class:`Amalgamation` followed by a probe head (e.g. :class:`difstudy.probes.SegHead`
    built for ``amalgamation.out_channels``); accepts what the probes' training loops pass
    (a tensor or a one-element list of (B, V*C, H, W)). ``weights`` fixes the bucket weights."""

    def __init__(self, amalgamation: Amalgamation, head: nn.Module, weights: torch.Tensor | None = None):
        super().__init__()
        self.amalgamation, self.head = amalgamation, head
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32))
        self.last_weights: torch.Tensor | None = None

    def forward(self, feats):
        x = feats if isinstance(feats, torch.Tensor) else feats[0]
        if not isinstance(feats, torch.Tensor) and len(feats) != 1:
            raise ValueError(f"AmalgamatedHead takes one feature level (the buckets), got {len(feats)}")
        mixed, self.last_weights = self.amalgamation(x, self.weights)
        return self.head(mixed)


def train_amalgamated_head(
    train_iter_fn,
    channels: int,
    n_buckets: int,
    num_classes: int,
    kind: str = "linear",
    k: int = 1,
    weights: torch.Tensor | None = None,
    dim: int = 128,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    sparsity: float = 0.0,
    seed: int = 0,
    ignore_index: int = 255,
    show_progress: bool | None = None,
) -> AmalgamatedHead:
    """Train amalgamation and segmentation head jointly, as :func:`difstudy.probes.train_seg_head`
    (same head, initialisation from ``seed``, AdamW and loss) on bucketed features (B, V*C, h, w).

    ``weights`` fixes the bucket weights (no assigner is trained): with one-hot weights the result
    equals ``train_seg_head`` on that bucket alone. ``sparsity`` > 0 adds ``-sparsity *
    Amalgamation.sparsity(w)`` to the loss (the official term, with a fixed coefficient)."""
    from .probes.runner import progress as _progress
    from .probes.segmentation import LinearPixelProbe, SegHead, seg_logits

    if kind not in ("conv", "linear"):
        raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
    amal = Amalgamation(channels, n_buckets, k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head first: the same initialisation as train_seg_head
        head = (
            SegHead([amal.out_channels], num_classes, dim)
            if kind == "conv"
            else LinearPixelProbe([amal.out_channels], num_classes)
        )
        torch.manual_seed(seed + 1)
        amal = Amalgamation(channels, n_buckets, k)
    model = AmalgamatedHead(amal, head, weights)
    params = list(head.parameters()) + ([] if weights is not None else list(amal.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in _progress(range(epochs), desc=f"amalgamated head ({kind}, k={k})", enabled=show_progress):
        for feats, labels in train_iter_fn():
            x = (feats if isinstance(feats, torch.Tensor) else feats[0]).float()
            labels = torch.as_tensor(labels).long()
            if labels.ndim != 3 or labels.shape[0] != x.shape[0]:
                raise ValueError(f"label maps must have shape ({x.shape[0]}, H, W), got shape {tuple(labels.shape)}")
            if not (labels != ignore_index).any():
                continue
            loss = F.cross_entropy(seg_logits(model, [x], labels.shape[1:]), labels, ignore_index=ignore_index)
            if sparsity and weights is None:
                loss = loss - sparsity * Amalgamation.sparsity(model.last_weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def stack_buckets(per_bucket: Sequence[torch.Tensor]) -> torch.Tensor:
    """Buckets (each (B, C, h, w) or (B, C), same shape) -> (B, V*C, ...) for :class:`Amalgamation`."""
    shapes = {tuple(x.shape) for x in per_bucket}
    if len(shapes) != 1:
        raise ValueError(f"buckets must share one shape, got {sorted(shapes)}; resize them to a common size first")
    return torch.cat([x.float() for x in per_bucket], 1)


__all__ = [
    "BASIC",
    "Amalgamation",
    "AmalgamatedHead",
    "GateExtractor",
    "ShiftConfig",
    "Technique",
    "WeightAssigner",
    "build_controlnet",
    "content_shift",
    "content_shift_claims",
    "content_shift_table",
    "control_images",
    "decode_latents",
    "edge_map",
    "extract_techniques",
    "guideline_claims",
    "guideline_table",
    "img2img",
    "img2img_start",
    "laplacian_map",
    "load_controlnet",
    "load_lora",
    "predicted_x0",
    "read_captions",
    "spearman",
    "stack_buckets",
    "train_amalgamated_head",
    "vae_reconstruction",
    "with_captions",
]


# ================================================================================
# 8. techniques and their amalgamation as feature sources of the protocol layer
TRAIN_COMMANDS = {
    "controlnet": (
        "python -m difstudy.train.controlnet --model mini --out runs/controlnet "
        f"--export {MINI_CONTROLNET_PATH.relative_to(MODELS_DIR.parent.parent)}"
    ),
    "lora": (
        "python -m difstudy.train.lora --model mini --background checkered --out runs/lora "
        f"--export {MINI_LORA_PATH.relative_to(MODELS_DIR.parent.parent)}"
    ),
}
NOT_MEASURED = "not measured"
TASK_METRICS = {"correspondence": "PCK@0.1 img", "label-scarce-seg": "mIoU", "classification": "accuracy"}


def technique_status(techniques: Sequence[Technique]) -> pd.DataFrame:
    """Whether each technique's weights can be found: columns ``technique, available, reason,
    how_to_get``. Nothing is loaded into a pipeline (a ControlNet given by hub id is read from the
    hub cache, or downloaded, to check it)."""
    rows = []
    for tq in techniques:
        reason, how = "", ""
        try:
            if tq.controlnet is not None and not hasattr(tq.controlnet, "config"):
                if str(tq.controlnet) == "mini":
                    if not (MINI_CONTROLNET_PATH / "config.json").exists():
                        raise ModelNotFoundError(f"the mini ControlNet is missing from {MINI_CONTROLNET_PATH}")
                else:
                    load_controlnet(tq.controlnet)
            if tq.lora is not None:
                _lora_source(tq.lora)
        except ModelNotFoundError as e:
            reason = str(e)
            how = TRAIN_COMMANDS["controlnet" if tq.controlnet is not None else "lora"]
            if str(tq.controlnet if tq.controlnet is not None else tq.lora) != "mini":
                how = "pass an existing ControlNet/LoRA (folder or hub id) as the technique's parameter"
        rows.append(dict(technique=tq.name, available=not reason, reason=reason, how_to_get=how))
    return pd.DataFrame(rows, columns=["technique", "available", "reason", "how_to_get"])


def bucket_label(technique: str, t: int) -> str:
    """Table label of one bucket: ``"<technique> (t=<t>)"``."""
    return f"{technique} (t={t})"


class TechniqueFeatures:
    """A feature source (:class:`difstudy.protocols.FeatureSource`) of technique buckets.

    All ``techniques`` at all ``timesteps`` are extracted together (:func:`extract_techniques`:
    one U-Net forward per batch, one cache, keyed by image content as
    :class:`~difstudy.protocols.CachedFeatures`); :meth:`maps` reads the activations of the
    selected ``bucket`` ``(technique name, t)``. :meth:`bucket_maps` reads any bucket.

    Args:
        pipe: a loaded pipeline; activations: names or named sets;
        techniques: the techniques extracted together; timesteps: their timesteps;
        extraction: :class:`~difstudy.protocols.ExtractionConfig` (its ``t`` and ``variant`` unused);
        seed: noise-draw seed; bucket: ``(technique, t)`` that :meth:`maps` reads (default: the
        first technique at the first t); label: table label (default: the bucket's).
    """

    def __init__(
        self,
        pipe,
        activations: Sequence[str],
        techniques: Sequence[Technique],
        timesteps: Sequence[int] = (50,),
        extraction=None,
        seed: int = 0,
        model_name: str | None = None,
        bucket: tuple[str, int] | None = None,
        label: str | None = None,
    ):
        from .catalog import Catalog
        from .protocols import ExtractionConfig

        self.pipe, self.seed = pipe, int(seed)
        self.extraction = extraction or ExtractionConfig()
        self.activations, self.techniques = tuple(activations), tuple(techniques)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.model_name = model_name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
        self.names = tuple(Catalog(pipe.unet).resolve(list(self.activations)))
        self.bucket = self._check_bucket(bucket or (self.techniques[0].name, self.timesteps[0]))
        self.label = label or bucket_label(*self.bucket)
        self._keys: dict[str, str] = {}
        self._variants: dict[str, str] = {}  # technique name -> cache variant key
        self._cache = None

    def _check_bucket(self, bucket) -> tuple[str, int]:
        name, t = bucket
        names = [tq.name for tq in self.techniques]
        if name not in names or int(t) not in self.timesteps:
            raise DifstudyError(
                f"bucket {bucket!r} is not extracted here: techniques {names}, timesteps {self.timesteps}"
            )
        return name, int(t)

    def select(self, bucket: tuple[str, int], label: str | None = None) -> TechniqueFeatures:
        """The same source (cache, seed, prepared images) reading another bucket."""
        import copy

        other = copy.copy(self)
        other.bucket = self._check_bucket(bucket)
        other.label = label or bucket_label(*other.bucket)
        return other

    def for_seed(self, seed: int) -> TechniqueFeatures:
        import copy

        if int(seed) == self.seed:
            return self
        other = copy.copy(self)
        other.seed, other._keys, other._cache = int(seed), dict(self._keys), None
        return other

    def prepare(self, records) -> None:
        """Extract every technique and t of every distinct image of ``records`` (cached entries reused)."""
        from .protocols.features import ExtractionView, distinct_images

        positions, keys = distinct_images(records, self._keys)
        if not positions:
            return
        cfg = self.extraction
        if not self._variants:
            with GateExtractor(
                self.pipe, ["unet-out"], self.techniques, self.timesteps, self.seed, cfg.image_size
            ) as ex:
                self._variants = dict(zip([tq.name for tq in self.techniques], ex.variant_keys))
        self._cache, _ = extract_techniques(
            self.pipe,
            ExtractionView(records, positions, keys),
            list(self.names),
            self.techniques,
            self.timesteps,
            seed=self.seed,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            cache_dir=cfg.cache_dir,
            store_dtype=torch.float16 if cfg.store_dtype == "fp16" else torch.float32,
            model_name=self.model_name,
            progress=cfg.progress,
        )

    def bucket_maps(self, record, bucket: tuple[str, int]) -> list[torch.Tensor]:
        """The activations (C_i, h_i, w_i) float32 of ``record`` in ``bucket``."""
        from .protocols import content_key

        if self._cache is None:
            raise DifstudyError(f"features of {self.label!r} were never extracted; call prepare(records) first")
        name, t = self._check_bucket(bucket)
        key = self._keys.get(record.image_id) or content_key(record.image)
        v = self._variants[name]
        return [self._cache.get(Key(n, t, v, self.seed, key)).float() for n in self.names]

    def maps(self, record) -> list[torch.Tensor]:
        return self.bucket_maps(record, self.bucket)


@dataclass(frozen=True)
class AmalgamationConfig:
    """How :class:`AmalgamatedFeatures` fits its weight assigners.

    ``k`` assigners (official 1) of ``hidden`` units with ``dropout``; AdamW (``lr``,
    ``weight_decay``) for ``epochs`` passes over the task's training data in minibatches of
    ``batch_size`` images (pairs for correspondence); ``sparsity``: the official sparsity term's
    fixed coefficient (0 = off); ``temperature``: of the correspondence contrastive loss."""

    k: int = 1
    hidden: int = 128
    dropout: float = 0.5
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sparsity: float = 0.0
    temperature: float = 0.07


FIT_TASKS = ("correspondence", "label-scarce-seg", "classification")
# settings of learned amalgamation name the deviation in their label (the official code trains the
# weight assigners jointly with the task head; difstudy fits them first, then the protocol's head)
AMALGAMATED_LABEL = "amalgamated (2-stage fit): "


class AmalgamatedFeatures:
    """A feature source: buckets of a :class:`TechniqueFeatures` combined by learned weight assigners.

    Per image, the assigners see each bucket's activations (resized to the largest and
    concatenated, (C, H, W)) and give a weight per bucket and channel (softmax over buckets, one
    weight per image and channel, :class:`Amalgamation`); :meth:`maps` returns, per activation,
    the ``k`` weighted sums of the buckets' maps at the activation's own size, concatenated
    ((k*C_i, h_i, w_i)). A per-channel weight commutes with the protocols' bilinear resizing, so
    with one-hot ``weights`` and ``k = 1`` the maps are exactly the chosen bucket's.

    **Fitting** (difstudy's two-stage deviation from the official joint training): on
    :meth:`prepare` for a run seed, the assigners are trained on ``train`` (records, or pairs for
    correspondence, or a function ``seed -> records``) together with a light task head
    (``task``: ``label-scarce-seg``: a per-pixel linear layer on the label maps resized to
    the assigners' grid; ``classification``: a linear layer on pooled features;
    ``correspondence``: the official contrastive loss on the amalgamated maps, no head), then
    frozen; the protocol then trains its own head (pixel-MLP ensemble, linear probe, nearest
    neighbour) on the amalgamated features. ``weights`` ((V,) or (k, V)) fixes the weights
    instead (no fit)."""

    def __init__(
        self,
        base: TechniqueFeatures,
        buckets: Sequence[tuple[str, int]],
        task: str | None = None,
        train=None,
        config: AmalgamationConfig = AmalgamationConfig(),
        weights=None,
        label: str | None = None,
    ):
        if len(buckets) < 1:
            raise DifstudyError("an amalgamation needs at least one bucket")
        self.base, self.buckets = base, [base._check_bucket(b) for b in buckets]
        if weights is None and task not in FIT_TASKS:
            raise DifstudyError(f"learned weights need a task in {list(FIT_TASKS)}, got {task!r} (or pass weights=)")
        if weights is None and train is None:
            raise DifstudyError("learned weights need training records (train=)")
        self.task, self.train, self.config = task, train, config
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.label = label or AMALGAMATED_LABEL + " + ".join(bucket_label(*b) for b in self.buckets)
        self.amalgamation: Amalgamation | None = None
        self.fit_seconds = 0.0

    @property
    def seed(self) -> int:
        return self.base.seed

    def for_seed(self, seed: int) -> AmalgamatedFeatures:
        import copy

        if int(seed) == self.seed:
            return self
        other = copy.copy(self)
        other.base, other.amalgamation = self.base.for_seed(seed), None
        return other

    def _stacked(self, record) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """(V*C, H, W) assigner input and the buckets' raw maps."""
        from .protocols import concat_maps

        per = [self.base.bucket_maps(record, b) for b in self.buckets]
        return stack_buckets([concat_maps(m)[None] for m in per])[0], per

    def _new_amalgamation(self, channels: int) -> Amalgamation:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            return Amalgamation(channels, len(self.buckets), c.k, c.hidden, c.dropout)

    def _train_items(self) -> Sequence:
        return self.train(self.seed) if callable(self.train) else self.train

    def prepare(self, records) -> None:
        """Extract the buckets of ``records`` (and of the training data); fit the assigners
        once per run seed unless the weights are fixed."""
        self.base.prepare(records)
        if self.weights is not None or self.amalgamation is not None:
            if self.amalgamation is None:
                x, _ = self._stacked(records[0])
                self.amalgamation = self._new_amalgamation(x.shape[0] // len(self.buckets)).eval()
            return
        t0 = time.time()
        self.amalgamation = fit_amalgamation(self, self.task, self._train_items(), self.config)
        self.fit_seconds = time.time() - t0

    @torch.no_grad()
    def bucket_weights(self, record) -> torch.Tensor:
        """(k, V, C) weights of ``record`` (softmax over buckets; C = all activations' channels)."""
        if self.amalgamation is None:
            raise DifstudyError(f"{self.label!r} is not prepared; call prepare(records) first")
        x, _ = self._stacked(record)
        self.amalgamation.eval()
        _, w = self.amalgamation(x[None], self.weights)
        return w[0]

    def mix(self, per_bucket: list[list[torch.Tensor]], w: torch.Tensor) -> list[torch.Tensor]:
        """Per activation i, ``cat_j sum_v w[j, v, channels of i] * maps[v][i]``."""
        out, start = [], 0
        for i in range(len(per_bucket[0])):
            c = per_bucket[0][i].shape[0]
            wi = w[:, :, start : start + c]  # (k, V, c)
            out.append(
                torch.cat(
                    [
                        sum(wi[j, v][:, None, None] * per_bucket[v][i] for v in range(len(per_bucket)))
                        for j in range(wi.shape[0])
                    ]
                )
            )
            start += c
        return out

    def maps(self, record) -> list[torch.Tensor]:
        per = [self.base.bucket_maps(record, b) for b in self.buckets]
        return self.mix(per, self.bucket_weights(record))


def _pair_images(items) -> list:
    from .protocols import pair_images

    return pair_images(items)


def fit_amalgamation(source: AmalgamatedFeatures, task: str, train, config: AmalgamationConfig) -> Amalgamation:
    """Train an :class:`Amalgamation` for ``source``'s buckets on ``task`` (see
    :class:`AmalgamatedFeatures`); returns it frozen, in eval mode."""
    from .probes.correspondence import contrastive_loss
    from .protocols.partseg import resize_labels

    if task not in FIT_TASKS:
        raise DifstudyError(f"unknown amalgamation task {task!r}; use one of {list(FIT_TASKS)}")
    images = _pair_images(train) if task == "correspondence" else list(train)
    if not images:
        raise DifstudyError("fit_amalgamation needs at least one training record")
    source.base.prepare(images)
    stacked = {r.image_id: source._stacked(r)[0] for r in images}
    first = next(iter(stacked.values()))
    amal = source._new_amalgamation(first.shape[0] // len(source.buckets))
    c = config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed + 2)
        head: nn.Module
        if task == "label-scarce-seg":
            k = train.labels.num_classes if getattr(train, "labels", None) is not None else None
            k = k or int(max(int(np.asarray(r.mask).max()) for r in images)) + 1
            head = nn.Conv2d(amal.out_channels, k, 1)
        elif task == "classification":
            k = train.labels.num_classes if getattr(train, "labels", None) is not None else None
            k = k or int(max(r.label for r in images)) + 1
            head = nn.Linear(amal.out_channels, k)
        else:
            head = nn.Identity()
    # standardise the assigner-space features per channel (a fixed scale, so raw magnitudes don't decide)
    allx = torch.stack(list(stacked.values()))
    scale = allx.transpose(0, 1).flatten(1).std(1).clamp_min(1e-6)[None, :, None, None]
    params = list(amal.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(source.seed + 3)
    items = list(train)
    amal.train()
    head.train()
    for _ in range(c.epochs):
        order = torch.randperm(len(items), generator=gen).tolist()
        for s in range(0, len(order), c.batch_size):
            batch = [items[i] for i in order[s : s + c.batch_size]]
            if task == "correspondence":
                ids = [i for p in batch for i in (p.src_id, p.trg_id)]
            else:
                ids = [r.image_id for r in batch]
            x = torch.stack([stacked[i] for i in ids]) / scale
            if x.shape[0] < 2:
                continue  # BatchNorm needs two images
            mixed, w = amal(x)
            if task == "label-scarce-seg":
                y = torch.stack([resize_labels(r.mask, x.shape[-1]) for r in batch])
                loss = F.cross_entropy(head(mixed), y, ignore_index=255)
            elif task == "classification":
                y = torch.as_tensor([r.label for r in batch])
                loss = F.cross_entropy(head(mixed.mean((2, 3))), y)
            else:
                losses = []
                for j, p in enumerate(batch):
                    pair = dict(
                        src_feat=mixed[2 * j],
                        trg_feat=mixed[2 * j + 1],
                        src_kps=p.src_kps,
                        trg_kps=p.trg_kps,
                        src_size=p.src.size,
                        trg_size=p.trg.size,
                    )
                    losses.append(contrastive_loss(head, pair, c.temperature))
                loss = torch.stack(losses).mean()
            if c.sparsity:
                loss = loss - c.sparsity * Amalgamation.sparsity(w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    amal.eval().requires_grad_(False)
    # the assigners were trained on standardised inputs: fold the scale into the input
    return _Scaled(amal, scale[0])


class _Scaled(nn.Module):
    """An :class:`Amalgamation` whose input is divided by a fixed per-channel scale first."""

    def __init__(self, amalgamation: Amalgamation, scale: torch.Tensor):
        super().__init__()
        self.amalgamation = amalgamation
        self.register_buffer("scale", scale)

    @property
    def out_channels(self) -> int:
        return self.amalgamation.out_channels

    def forward(self, x: torch.Tensor, weights=None):
        return self.amalgamation(x / self.scale, weights)


# -- the GATE page: settings, probes over seeds, tables and claims -----------------------
def gate_sources(
    base: TechniqueFeatures,
    techniques: Sequence[str],
    t: int,
    records: dict,
    bench,
    control_timesteps: Sequence[int] | None = None,
    config: AmalgamationConfig = AmalgamationConfig(),
    baseline: str = "basic",
    control_base: TechniqueFeatures | None = None,
) -> dict[str, dict[str, Any]]:
    """``{setting: {task: source}}``: the baseline, each technique alone, all of them amalgamated
    (``baseline`` and ``techniques`` at ``t``) and, when ``control_timesteps`` has two or more
    timesteps, the baseline at those timesteps amalgamated (read from ``control_base``, default
    ``base``, which must extract them; a source of the baseline alone shares its cache entries).
    ``records`` and ``bench`` are :func:`difstudy.tables.task_records` and its
    :class:`~difstudy.tables.BenchConfig`; an amalgamation is fit per task on the training
    data its protocol trains on for the seed."""
    from .protocols import toy_pairs
    from .protocols.partseg import split_for_seed

    train = {
        "correspondence": lambda seed: toy_pairs(records["correspondence"]["train_world"], bench.n_pairs, seed),
        "label-scarce-seg": lambda seed: split_for_seed(
            records["label-scarce-seg"]["train"],
            records["label-scarce-seg"]["test"],
            seed,
            bench.part_seg.shuffle_split,
        )[0],
        "classification": lambda seed: records["classification"]["train"],
    }
    tasks = list(bench.tasks)
    out: dict[str, dict[str, Any]] = {}
    out[baseline] = {task: base.select((baseline, t), label=baseline) for task in tasks}
    for name in techniques:
        out[name] = {task: base.select((name, t), label=name) for task in tasks}
    if techniques:
        label = AMALGAMATED_LABEL + " + ".join([baseline, *techniques])
        buckets = [(baseline, t)] + [(n, t) for n in techniques]
        out[label] = {
            task: AmalgamatedFeatures(base, buckets, task, train[task], config, label=label) for task in tasks
        }
    if control_timesteps is not None and len(control_timesteps) >= 2:
        label = AMALGAMATED_LABEL + " + ".join(f"{baseline} t={s}" for s in control_timesteps)
        buckets = [(baseline, int(s)) for s in control_timesteps]
        cb = control_base or base
        out[label] = {task: AmalgamatedFeatures(cb, buckets, task, train[task], config, label=label) for task in tasks}
    return out


def run_gate_probes(sources: dict[str, dict[str, Any]], records: dict, bench, progress: bool = True) -> pd.DataFrame:
    """Every setting, task and seed through the protocols (:func:`difstudy.tables.run_task`):
    tidy rows with ``setting``, ``model``, ``t`` and ``seconds`` added."""
    from .tables import run_task

    frames = []
    total = sum(len(v) for v in sources.values()) * len(bench.seeds)
    bar = tqdm(total=total, desc="GATE probes", disable=not progress)
    for setting, per_task in sources.items():
        for task, source in per_task.items():
            for seed in bench.seeds:
                t0 = time.time()
                df = run_task(task, source, records[task], bench, int(seed))
                frames.append(df.assign(setting=setting, model=bench.model, seconds=round(time.time() - t0, 2)))
                bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True)


def _paired(results: pd.DataFrame, task: str, a: str, b: str) -> np.ndarray:
    """Per seed, main metric of setting ``a`` minus setting ``b`` on ``task`` (seeds both ran)."""
    d = results[(results["task"] == task) & (results["metric"] == TASK_METRICS[task])]
    pa = d[d["setting"] == a].set_index("seed")["value"]
    pb = d[d["setting"] == b].set_index("seed")["value"]
    common = sorted(set(pa.index) & set(pb.index))
    return (pa.loc[common] - pb.loc[common]).to_numpy(float)


# The feature claims' minimum effects, in the task's main metric (PCK@0.1, mIoU, accuracy, all in
# [0, 1]): one point (0.01), the smallest difference a reader of a benchmark table acts on (the
# paper's GATE gains are 0.7 to 2.6 points).
# "<technique> improves features": technique - baseline reaches one point
MIN_FEATURE_GAIN = 0.01
# "amalgamation beats the best single technique": amalgamated - best single setting, one point
MIN_AMALGAMATION_GAIN = 0.01
# "the gain is not just diversity": amalgamated techniques - amalgamated timesteps, one point
MIN_DIVERSITY_GAIN = 0.01
# what the units of a feature claim are, in its note
SEED_UNITS = "units: run seeds (the protocols report one score per seed, no per-pair or per-image scores)"


def _seed_row(claim: str, measure: str, diffs, min_effect: float, confidence: float) -> dict:
    """A claim row from per-seed differences (:func:`difstudy.verdicts.paired` over the seeds;
    fewer than :data:`difstudy.verdicts.MIN_UNITS` seeds are inconclusive, and the note says so)."""
    v = verdicts.paired(diffs, min_effect, confidence=confidence)
    return replace(v, note="; ".join(x for x in (SEED_UNITS, v.note) if x)).row(claim, measure)


def _not_measured(claim: str, measure: str, status: pd.DataFrame, names: Sequence[str], min_effect: float) -> dict:
    """The row of a claim whose techniques' weights are missing: no units, so
    :func:`difstudy.verdicts.paired` finds it inconclusive; the note says why and how to get them."""
    how = "; ".join(f"{r.technique}: {r.how_to_get}" for r in status.itertuples() if r.technique in names)
    row = verdicts.paired([], min_effect).row(claim, measure)
    row["note"] = f"{NOT_MEASURED}: weights missing ({how})"
    return row


def guideline_rows(guide: pd.DataFrame, status: pd.DataFrame, method: str = "img2img") -> pd.DataFrame:
    """Claim rows "<technique> lowers content shift" (:func:`guideline_claims` on ``method``),
    plus an inconclusive row per score, noted ``not measured``, for every technique of ``status``
    whose weights are missing."""
    measured = guideline_claims(guide[guide["method"] == method] if len(guide) else guide)
    missing = [_not_measured(f"{r.technique} lowers content shift ({method})",
                             f"{m} shift without - with, mean over images", status, [r.technique],
                             MIN_SHIFT_REDUCTION[m])
               for r in status.itertuples() if not r.available for m in MEASURES]  # fmt: skip
    return _claim_frame([*measured.to_dict("records"), *missing])


def feature_claims(
    results: pd.DataFrame,
    status: pd.DataFrame,
    baseline: str = "basic",
    control: str | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The feature claims of GATE per task (main metric of :data:`TASK_METRICS`) as claim rows
    (:data:`difstudy.verdicts.CLAIM_COLUMNS`), each :func:`difstudy.verdicts.paired` on the
    per-seed differences (the protocols report one score per seed, so the seeds are the units;
    with fewer than 5 seeds a claim is inconclusive):

    - "<technique> improves features": technique - baseline, for every technique of ``status``
      (inconclusive, noted ``not measured``, when its weights are missing); :data:`MIN_FEATURE_GAIN`;
    - "amalgamation beats the best single technique": amalgamated - the best single setting
      (baseline or technique, by mean); :data:`MIN_AMALGAMATION_GAIN`;
    - "the gain is not just diversity": amalgamated techniques - amalgamated timesteps
      (``control``); :data:`MIN_DIVERSITY_GAIN`."""
    rows = []
    settings = list(dict.fromkeys(results["setting"]))
    amal = next((s for s in settings if s.startswith("amalgamated") and s != control), None)
    missing = [r.technique for r in status.itertuples() if not r.available]
    note = f" ({', '.join(missing)} {NOT_MEASURED})" if missing else ""
    for task in dict.fromkeys(results["task"]):
        metric = TASK_METRICS.get(task)
        if metric is None:
            continue
        for r in status.itertuples():
            claim = f"{r.technique} improves features ({task})"
            measure = f"{metric}: {r.technique} - {baseline}, mean over seeds"
            if not r.available:
                rows.append(_not_measured(claim, measure, status, [r.technique], MIN_FEATURE_GAIN))
                continue
            d = _paired(results, task, r.technique, baseline)
            rows.append(_seed_row(claim, measure, d, MIN_FEATURE_GAIN, confidence))
        if amal is None:
            continue
        singles = [s for s in settings if not s.startswith("amalgamated")]
        d = results[(results["task"] == task) & (results["metric"] == metric)]
        best = d[d["setting"].isin(singles)].groupby("setting")["value"].mean().idxmax()
        rows.append(_seed_row(f"amalgamation beats the best single technique ({task}){note}",
                              f"{metric}: {amal} - {best}, mean over seeds",
                              _paired(results, task, amal, best), MIN_AMALGAMATION_GAIN, confidence))  # fmt: skip
        if control is not None and control in settings:
            rows.append(_seed_row(f"the gain is not just diversity ({task}){note}",
                                  f"{metric}: {amal} - {control}, mean over seeds",
                                  _paired(results, task, amal, control), MIN_DIVERSITY_GAIN, confidence))  # fmt: skip
    return _claim_frame(rows)


def technique_summary(results: pd.DataFrame, status: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """:func:`difstudy.protocols.render` of ``results`` by setting, with a row ``not measured``
    for every technique whose weights are missing."""
    from .protocols import render

    table = render(results.assign(features=results["setting"]), index="features", digits=digits)
    for r in status.itertuples():
        if not r.available and r.technique not in table.index:
            table.loc[r.technique] = NOT_MEASURED
    table.index.name = "setting"
    return table


def guideline_summary(guide: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """The guideline table with a ``not measured`` row per technique whose weights are missing."""
    rows = [dict(technique=r.technique, verdict=NOT_MEASURED, reason=r.reason, how_to_get=r.how_to_get)
            for r in status.itertuples() if not r.available]  # fmt: skip
    return pd.concat([guide, pd.DataFrame(rows)], ignore_index=True)


def reference_table() -> pd.DataFrame:
    """The paper's GATE (SD1.5) numbers from ../shared/STUDY.md (reference only, not measured here)."""
    rows = [
        ("SPair-71k PCK@0.1 img", 73.96, 76.60, ""),
        ("SPair-71k PCK@0.1 bbox", 65.74, 69.10, ""),
        ("ADE20K mIoU", np.nan, 40.51, ""),
        ("Cityscapes mIoU", np.nan, 64.20, ""),
        ("Horse-21 mIoU", np.nan, 67.2, "± 1.1"),
        ("CIFAR-10 accuracy", 94.55, 95.21, "ResNet-50: 93.62"),
    ]
    return pd.DataFrame(rows, columns=["metric", "baseline (SD1.5)", "GATE (SD1.5)", "note"]).set_index("metric")


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
