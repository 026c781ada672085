"""One forward of any denoiser difstudy extracts from: a U-Net (SD1.5, SD2.1, SDXL, the mini model)
or a diffusion transformer (PixArt-α/Σ, SD3, FLUX), as its own pipeline prepares it.

:func:`denoiser` is the network (``pipe.transformer`` or ``pipe.unet``), :func:`family` its kind
(``unet``, ``pixart``, ``sd3``, ``flux``). Per family:

- **text** (:func:`embed_prompt`): the pipeline's own ``encode_prompt`` without guidance: the token
  states and, where the model takes more, SDXL's / SD3's / FLUX's pooled embedding or PixArt's
  caption mask;
- **latents** (:func:`scale_latents`): the VAE posterior mean, ``(z - shift_factor) * scaling_factor``
  (SD3 and FLUX VAEs have a shift; SD's none);
- **noising** (:class:`Noising`): DDPM forward noising for U-Nets and PixArt (``alpha_bar`` from the
  scheduler config's betas, :func:`difstudy.extract.ddpm_noise`), rectified flow
  ``(1 - sigma) z0 + sigma n`` for SD3 and FLUX with sigma from the flow scheduler's configuration
  (:mod:`difstudy.flow`: static shift for SD3 and FLUX-schnell, FLUX-dev's resolution-dependent
  shift from the image's token count). FLUX's default puts ``t`` on the grid of the official
  extraction (``FluxImg2ImgPipeline`` at strength ``t / 1000`` with 28 steps); ``flow_steps=None``
  (``continuous``) takes ``sigma = shift(t / 1000)`` instead, a named option;
- **inputs** (:func:`model_kwargs`): SDXL's size ids, PixArt's caption mask and size conditions,
  SD3's timestep ``sigma * 1000`` and pooled projection, FLUX's packed 2x2 latents with their
  position ids, timestep ``sigma`` and guidance (official: 1.0, the ``guidance_scale=1`` of the
  official extraction).
"""

from __future__ import annotations

import hashlib
import json

import torch

from .catalog_dit import family as dit_family
from .catalog_dit import patch_size, token_grid
from .errors import DifstudyError
from .flow import OFFICIAL_FLUX_STEPS, flow_noise, flow_sigma, model_timestep

FLOW_FAMILIES = ("sd3", "flux")
# the FLUX guidance embedding's value (the official extraction calls the pipeline with guidance_scale=1)
OFFICIAL_FLUX_GUIDANCE = 1.0
# keys of a flow-matching scheduler config that change sigma at a training timestep
FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
             "base_image_seq_len", "max_image_seq_len", "time_shift_type")  # fmt: skip


def denoiser(pipe):
    """The pipeline's denoising network: ``pipe.transformer`` or ``pipe.unet``."""
    net = getattr(pipe, "transformer", None)
    return net if net is not None else pipe.unet


def family(pipe_or_model) -> str:
    """``unet``, ``pixart``, ``sd3`` or ``flux``."""
    net = denoiser(pipe_or_model) if hasattr(pipe_or_model, "vae") else pipe_or_model
    return dit_family(net) or "unet"


def text_len(pipe) -> int:
    """Text tokens of the pipeline's prompt embedding (the cross-attention maps' keys): SD3 stacks
    CLIP's 77 and T5's."""
    fam = family(pipe)
    if fam == "unet":
        return int(pipe.tokenizer.model_max_length)
    if fam == "sd3":
        return int(pipe.tokenizer.model_max_length) + int(pipe.tokenizer_3.model_max_length)
    tok = pipe.tokenizer if fam == "pixart" else pipe.tokenizer_2
    return int(tok.model_max_length)


def pixel_multiple(pipe, vae_factor: int) -> int:
    """Image sizes must be multiples of this: the VAE factor times the U-Net's downsamplers or the
    transformer's patch (FLUX: its 2x2 packing)."""
    net = denoiser(pipe)
    if family(pipe) == "unet":
        return vae_factor * 2 ** (len(net.config.block_out_channels) - 1)
    return vae_factor * patch_size(net)


def native_size(pipe, vae_factor: int) -> int:
    """The pipeline's default image size in pixels."""
    size = getattr(denoiser(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", None)
    return int(size or 128) * vae_factor


def pipeline_catalog(pipe, image_size: int | None = None):
    """The :class:`~difstudy.catalog.Catalog` of ``pipe``'s denoiser at ``image_size`` (default
    native) with its pipeline's text length."""
    from .catalog import Catalog
    from .models import vae_scale_factor

    factor = vae_scale_factor(pipe)
    size = int(image_size or native_size(pipe, factor))
    return Catalog(denoiser(pipe), latent_size=size // factor, text_len=text_len(pipe))


@torch.no_grad()
def embed_prompt(pipe, prompt: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens (L, D), extra)`` of one prompt: extra is SDXL's / SD3's / FLUX's pooled embedding,
    PixArt's caption mask, or None (SD1.5, SD2.1)."""
    fam, n = family(pipe), text_len(pipe)
    if fam == "unet":
        if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
            e, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
            return e[0], pooled[0]
        return pipe.encode_prompt(prompt, device, 1, False)[0][0], None
    if fam == "pixart":
        e, mask, _, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=device, max_sequence_length=n, clean_caption=False
        )
        return e[0], mask[0]
    if fam == "sd3":
        t5 = n - int(pipe.tokenizer.model_max_length)
        e, _, pooled, _ = pipe.encode_prompt(
            prompt, prompt, prompt, device=device, do_classifier_free_guidance=False, max_sequence_length=t5
        )
        return e[0], pooled[0]
    e, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device, max_sequence_length=n)
    return e[0], pooled[0]


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """``(z - shift_factor) * scaling_factor`` (no shift for SD's VAEs)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


class Noising:
    """The forward noising of a pipeline's denoiser at training timesteps ``t`` (see the module doc).

    ``flow_steps``: for SD3 / FLUX, the Img2Img grid ``t`` is put on (default: FLUX's official 28
    steps, SD3 continuous); ``"continuous"`` for ``sigma = shift(t / 1000)``."""

    def __init__(self, pipe, flow_steps: int | str | None = "default"):
        from .extract import ddpm_alphas_cumprod

        self.family = family(pipe)
        self.flow = self.family in FLOW_FAMILIES
        cfg = dict(pipe.scheduler.config)
        if self.flow:
            if "shift" not in cfg and "use_dynamic_shifting" not in cfg:
                raise DifstudyError(
                    f"{self.family} is a rectified-flow model but its scheduler {type(pipe.scheduler).__name__} has "
                    "no flow-matching configuration (shift): give the pipeline a FlowMatchEulerDiscreteScheduler"
                )
            self.config = {k: cfg[k] for k in FLOW_KEYS if k in cfg}
            self.n_train = int(self.config.get("num_train_timesteps", 1000))
            if flow_steps == "default":
                flow_steps = OFFICIAL_FLUX_STEPS if self.family == "flux" else None
            self.steps = None if flow_steps in (None, "continuous") else int(flow_steps)
        else:
            self.alphas_cumprod = ddpm_alphas_cumprod(pipe.scheduler)
            self.n_train = len(self.alphas_cumprod)
            self.steps = None

    @property
    def label(self) -> str:
        """How ``t`` becomes the model's noise level, for labels (empty for DDPM)."""
        if not self.flow:
            return ""
        return f"flow sigma on the {self.steps}-step grid" if self.steps else "flow sigma continuous"

    def check(self, timesteps) -> None:
        if self.flow:
            bad = [t for t in timesteps if not 0 < t <= self.n_train]
            rule = f"0 < t <= {self.n_train}"
        else:
            bad = [t for t in timesteps if not 0 <= t < self.n_train]
            rule = f"0 <= t < {self.n_train}"
        if bad:
            raise DifstudyError(f"timesteps {bad} out of range: the scheduler has {self.n_train} steps, use {rule}")
        for t in timesteps if self.flow else ():
            self.sigma(t, 1)  # a t on no step of the grid is an error now, not mid-extraction

    def sigma(self, t: int, image_seq_len: int) -> float:
        return flow_sigma(self.config, t, image_seq_len=image_seq_len, steps=self.steps)

    def noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """``z0`` (B, C, h, w) noised at ``t`` (B,) with ``noise``."""
        from .extract import ddpm_noise

        if not self.flow:
            return ddpm_noise(z0, noise, t, self.alphas_cumprod)
        sig = [self.sigma(int(v), image_seq_len) for v in t.reshape(-1)]
        return flow_noise(z0, noise.to(z0.device), sig)

    def model_t(self, t: torch.Tensor, image_seq_len: int, dtype) -> torch.Tensor:
        """What the denoiser takes as its timestep for training timesteps ``t``."""
        if not self.flow:
            return t
        vals = [model_timestep(self.family, self.sigma(int(v), image_seq_len)) for v in t.reshape(-1)]
        return torch.tensor(vals, device=t.device, dtype=dtype)

    def fingerprint(self) -> str:
        """What the features depend on in the schedule: ``alpha_bar`` or the flow sigma rule."""
        if not self.flow:
            return hashlib.sha1(self.alphas_cumprod.numpy().tobytes()).hexdigest()[:12]
        c = self.config  # only what the sigma rule reads, defaults filled (another scheduler class keeps it)
        rule = dict(n_train=self.n_train, steps=self.steps)
        if c.get("use_dynamic_shifting"):
            rule |= {k: c.get(k) for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")}
            rule["time_shift_type"] = c.get("time_shift_type", "exponential")
        else:
            rule["shift"] = float(c.get("shift", 1.0))
        spec = json.dumps(rule, sort_keys=True, default=str)
        return hashlib.sha1(spec.encode()).hexdigest()[:12]


def image_tokens(pipe, latent_hw: tuple[int, int]) -> int:
    """The image's token count (FLUX-dev's sigma shift depends on it)."""
    if family(pipe) == "unet":
        return latent_hw[0] * latent_hw[1]
    h, w = token_grid(denoiser(pipe), latent_hw)
    return h * w


def pack_flux(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) latents -> FLUX's packed tokens (B, h/2 * w/2, 4C) and their position ids."""
    b, c, h, w = z.shape
    tokens = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3, device=z.device, dtype=z.dtype)
    ids[..., 1] = torch.arange(h // 2, device=z.device, dtype=z.dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=z.device, dtype=z.dtype)[None]
    return tokens, ids.reshape(-1, 3)


def model_kwargs(pipe, noising: Noising, sample, t, tokens, extra, image_size: int, guidance: float) -> dict:
    """Keyword inputs of one denoiser forward for the laid-out batch (``sample`` (N, C, h, w),
    training timesteps ``t`` (N,), ``tokens`` (N, L, D), ``extra`` (N, ...) or None)."""
    fam, dtype = noising.family, sample.dtype
    seq = image_tokens(pipe, tuple(sample.shape[-2:]))
    if fam == "unet":
        kw = dict(sample=sample, timestep=t, encoder_hidden_states=tokens)
        if extra is not None:  # SDXL: pooled text embedding and size ids (original, crop top-left, target)
            s = image_size
            time_ids = torch.tensor([s, s, 0, 0, s, s], device=sample.device, dtype=dtype).expand(len(t), 6)
            kw["added_cond_kwargs"] = dict(text_embeds=extra, time_ids=time_ids)
        return kw
    if fam == "pixart":
        n = len(t)
        res = torch.tensor([[image_size, image_size]], device=sample.device, dtype=dtype).expand(n, 2)
        aspect = torch.ones(n, 1, device=sample.device, dtype=dtype)
        return dict(
            hidden_states=sample, encoder_hidden_states=tokens, encoder_attention_mask=extra, timestep=t,
            added_cond_kwargs=dict(resolution=res, aspect_ratio=aspect),
        )  # fmt: skip
    tt = noising.model_t(t, seq, dtype)
    if fam == "sd3":
        return dict(hidden_states=sample, encoder_hidden_states=tokens, pooled_projections=extra, timestep=tt)
    packed, img_ids = pack_flux(sample)
    kw = dict(
        hidden_states=packed, encoder_hidden_states=tokens, pooled_projections=extra, timestep=tt,
        img_ids=img_ids, txt_ids=torch.zeros(tokens.shape[1], 3, device=sample.device, dtype=dtype),
    )  # fmt: skip
    if denoiser(pipe).config.guidance_embeds:
        kw["guidance"] = torch.full((len(t),), float(guidance), device=sample.device, dtype=dtype)
    return kw
