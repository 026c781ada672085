"""Forward noising of rectified-flow models (SD3, FLUX), as their pipelines do it.

A rectified-flow model sees ``x_sigma = (1 - sigma) * z0 + sigma * noise`` (``scale_noise`` of
diffusers' ``FlowMatchEulerDiscreteScheduler``), with ``z0`` the VAE latent
``(latent - shift_factor) * scaling_factor``. For a timestep ``t`` (0..1000, the papers' unit)
:func:`flow_sigma` gives sigma from the **scheduler configuration** (never from whichever sampling
scheduler a pipeline carries):

- ``s = t / num_train_timesteps``; with ``steps`` (the official FLUX extraction: its Img2Img
  pipeline at strength ``t / 1000`` with 28 steps, generic-diffusion-feature at e4361a6) ``s`` is
  the first sigma that pipeline runs, on its grid ``linspace(1, 1/steps, steps)``;
- the shift: static (SD3, FLUX-schnell: ``shift * s / (1 + (shift - 1) * s)``) or, where the
  config sets ``use_dynamic_shifting`` (FLUX-dev), resolution-dependent: ``mu`` from the image's
  token count (``base_image_seq_len`` .. ``max_image_seq_len`` mapped linearly to ``base_shift`` ..
  ``max_shift``, the pipelines' ``calculate_shift``) and ``exp(mu) / (exp(mu) + 1 / s - 1)``.

:func:`model_timestep` is what the transformer takes: SD3 ``sigma * 1000``, FLUX ``sigma`` (it
multiplies by 1000 itself).
"""

from __future__ import annotations

import math

import torch

from .errors import DifstudyError

OFFICIAL_FLUX_STEPS = 28  # FluxImg2ImgPipeline's default num_inference_steps, as the official code runs it


def flow_shift_mu(config: dict, image_seq_len: int) -> float:
    """``mu`` of the dynamic shift for ``image_seq_len`` image tokens (diffusers' ``calculate_shift``)."""
    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (hi - lo) / (top - base)
    return image_seq_len * m + (lo - m * base)


def flow_sigma(config: dict, t: float, image_seq_len: int | None = None, steps: int | None = None) -> float:
    """Sigma of timestep ``t`` under the flow-matching scheduler ``config`` (see the module doc)."""
    n_train = config.get("num_train_timesteps", 1000)
    if not 0 < t <= n_train:
        raise DifstudyError(f"timestep {t} out of range for a flow-matching model: use 0 < t <= {n_train}")
    s = t / n_train
    if steps:
        init = min(steps * s, steps)
        start = int(max(steps - init, 0))
        if start >= steps:
            raise DifstudyError(
                f"t = {t} runs no step of a {steps}-step Img2Img: use t >= {math.ceil(n_train / steps)}"
            )
        s = 1.0 - start * (1.0 - 1.0 / steps) / (steps - 1) if steps > 1 else 1.0
    if config.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise DifstudyError(
                "this scheduler shifts sigma by resolution: give the image's token count (image_seq_len)"
            )
        mu = flow_shift_mu(config, image_seq_len)
        if config.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / s - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    shift = config.get("shift", 1.0)
    return shift * s / (1 + (shift - 1) * s)


def flow_noise(z0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``(1 - sigma) z0 + sigma noise`` (``sigma``: a float or one per sample), in ``z0``'s dtype."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=z0.device).reshape(-1, *([1] * (z0.dim() - 1)))
    return ((1 - s) * z0.float() + s * noise.float()).to(z0.dtype)


def model_timestep(family: str, sigma: float) -> float:
    """The timestep the transformer of ``family`` takes at noise level ``sigma``."""
    return sigma if family == "flux" else sigma * 1000.0
