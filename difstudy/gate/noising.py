"""How a technique's latent reaches the feature timestep ``t``: the official paths.

**ControlNet denoising path** (generic-diffusion-feature, ``feature/diffusion_feature.py``,
``extract(denoising_from=...)`` and ``_denoise``; the GATE correspondence run uses
``--control canny --denoising_from 60`` for features at t = 50): the clean latent is noised to
``denoising_from = t + span``, the pipeline's own scheduler (a fresh copy of ``pipe.scheduler``'s
class and config, as the official code copies ``pipe.scheduler``) takes ControlNet-guided steps
from there down to ``t``, and the feature forward runs at ``t`` on the denoised latent, with the
ControlNet. The steps lie on the scheduler's grid of 1,000 inference steps when the span is at
most 50, of 100 otherwise (the official rule); ``t`` must lie on that grid.
:func:`denoising_steps` gives the timesteps, :func:`denoise` runs them.

**DDIM inversion** (``feature/components/ddim_inversion.py``, ``use_ddim_inversion=True``):
instead of forward noising, the clean latent is carried to ``t`` by inverted DDIM steps of a
100-step grid (step 10), the noise predicted by the U-Net with the technique's prompt (no
ControlNet, as the official inversion): ``x_next = sqrt(a_next) (x - sqrt(1 - a) eps) / sqrt(a)
+ sqrt(1 - a_next) eps`` with ``eps`` the prediction at ``(x, next)`` as the official loop
evaluates it. difstudy stops exactly at ``t`` (the last step is shorter when ``t`` is not a
multiple of 10; the official loop stops at the first grid step at or above ``t``), converts a
v- or x0-prediction into ``eps`` (the official code assumes epsilon models), and starts from the
VAE posterior mean (the official code samples the posterior). Rows that use it are labelled
``ddim-inversion``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import DifstudyError

NOISINGS = ("ddpm", "ddim-inversion")
INVERSION_STEPS = 100  # the official ddim_inversion(..., num_inference_steps=100, ...)


def step_scheduler(scheduler):
    """A fresh scheduler of ``scheduler``'s class and config (the official code deep-copies
    ``pipe.scheduler`` before every extraction)."""
    return type(scheduler).from_config(scheduler.config)


def denoising_steps(scheduler, t: int, span: int) -> tuple[object, list[int]]:
    """``(scheduler, steps)``: a fresh scheduler set to the official grid and the timesteps at
    which the guided denoising steps run, from ``t + span`` down to the last one above ``t``
    (the latent is noised to ``steps[0]``; each step goes to the next grid timestep; the last
    lands on ``t``).

    Grid: ``scheduler.set_timesteps(1000)`` when ``span <= 50``, else ``set_timesteps(100)``
    (``diffusion_feature.py``); the steps are the grid timesteps in ``(t, t + span]``."""
    t, span = int(t), int(span)
    if span <= 0:
        raise DifstudyError(f"denoising_from must be above the feature timestep t={t}, got {t + span}")
    sched = step_scheduler(scheduler)
    n = 1000 if span <= 50 else 100
    sched.set_timesteps(n)
    grid = [int(s) for s in sched.timesteps]
    if t not in grid:
        near = sorted(grid, key=lambda s: abs(s - t))[:3]
        raise DifstudyError(
            f"the feature timestep t={t} is not on the scheduler's {n}-step grid "
            f"({type(scheduler).__name__}, spacing {sched.config.get('timestep_spacing', '?')!r}); "
            f"nearest: {sorted(near)}; choose t on the grid or a span <= 50 (1000-step grid)"
        )
    steps = [s for s in grid if t < s <= t + span]
    if not steps:
        raise DifstudyError(f"no grid timestep in ({t}, {t + span}] on the {n}-step grid of {type(scheduler).__name__}")
    return sched, steps


@torch.no_grad()
def denoise(model_fn: Callable[[torch.Tensor, int], torch.Tensor], sched, latents: torch.Tensor, steps: Sequence[int]):
    """Run ``sched.step`` over ``steps`` from ``latents`` (noised to ``steps[0]``):
    ``model_fn(latents, s)`` returns the model output (ControlNet-guided U-Net) at timestep ``s``."""
    for s in steps:
        out = model_fn(sched.scale_model_input(latents, s), s)
        latents = sched.step(out, s, latents, return_dict=False)[0]
    return latents


def eps_from_output(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The noise ``eps`` implied by a model output of ``prediction_type`` at ``(x, alpha_bar)``."""
    a = alpha_bar.to(x.device, torch.float32)
    if prediction_type == "epsilon":
        return out.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * out.float() + (1 - a).sqrt() * x.float()
    if prediction_type == "sample":
        return (x.float() - a.sqrt() * out.float()) / (1 - a).sqrt()
    raise DifstudyError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def inversion_steps(t: int, n_steps: int = INVERSION_STEPS, n_train: int = 1000) -> list[tuple[int, int]]:
    """``[(from, to), ...]`` of DDIM inversion from 0 to ``t`` on the ``n_steps`` grid
    (step ``n_train // n_steps``), the last step ending exactly at ``t``."""
    if not 0 < int(t) < n_train:
        raise DifstudyError(f"DDIM inversion needs 0 < t < {n_train}, got t={t}")
    stride = n_train // n_steps
    points = list(range(0, int(t), stride)) + [int(t)]
    return list(zip(points[:-1], points[1:]))


@torch.no_grad()
def ddim_invert(
    model_fn: Callable[[torch.Tensor, int], torch.Tensor],
    z0: torch.Tensor,
    t: int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    n_steps: int = INVERSION_STEPS,
) -> torch.Tensor:
    """Clean latents ``z0`` -> latents at ``t`` by DDIM inversion (see the module docstring).
    ``model_fn(x, s)`` is the U-Net's output at timestep ``s``."""
    ac = alphas_cumprod.detach().to("cpu", torch.float64)
    x = z0.float()
    for cur, nxt in inversion_steps(t, n_steps, len(ac)):
        out = model_fn(x.to(z0.dtype), nxt)
        eps = eps_from_output(out, x, ac[nxt].float(), prediction_type)
        a, a_next = ac[cur].float().to(x.device), ac[nxt].float().to(x.device)
        x = (x - (1 - a).sqrt() * eps) * (a_next.sqrt() / a.sqrt()) + (1 - a_next).sqrt() * eps
    return x.to(z0.dtype)
