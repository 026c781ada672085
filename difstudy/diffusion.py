"""Diffusion helpers shared by the training scripts (:mod:`difstudy.train`) and the model card
(:mod:`difstudy.card`): the loss target of a scheduler's prediction type and the denoising loss of
a pipeline on given images and prompts. They sit below both, so the card does not import the
training package."""

from __future__ import annotations

import torch

from .extract import to_tensor as image_tensor
from .models import vae_scale_factor


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net predicts under ``scheduler.config.prediction_type`` (epsilon, v or sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":
        return z0
    raise ValueError(
        f"unknown prediction_type {kind!r} in the scheduler config; expected epsilon, v_prediction or sample"
    )


@torch.no_grad()
def denoising_losses(
    pipe, images, prompts: dict, timesteps, seed: int = 0, controlnet=None, control_image=None
) -> dict[str, list[float]]:
    """Mean MSE to the U-Net's prediction target for ``images`` (a list of HxWx3 arrays, encoded
    with the VAE's mean) at each of ``timesteps``, for each named prompt list in ``prompts`` (one
    prompt per image), on the same noise draws (one per timestep from ``seed``). With
    ``controlnet``, its residuals for ``control_image`` (the condition batch) are added, as
    ``StableDiffusionControlNetPipeline`` does. Returns ``{name: [loss per timestep]}``."""
    from .denoisers import family

    if family(pipe) != "unet":
        if controlnet is not None:
            raise ValueError("a ControlNet takes a U-Net; this pipeline's denoiser is a diffusion transformer")
        return _transformer_losses(pipe, images, prompts, timesteps, seed)
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe)
    z0 = pipe.vae.encode(torch.stack([image_tensor(im, size) for im in images])).latent_dist.mean
    z0 = z0 * pipe.vae.config.scaling_factor
    ehs = {k: pipe.encode_prompt(list(v), z0.device, 1, False)[0] for k, v in prompts.items()}
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in prompts}
    for t in timesteps:
        noise, tt = torch.randn(z0.shape, generator=g), torch.full((len(z0),), int(t))
        zt = pipe.scheduler.add_noise(z0, noise, tt)
        target = diffusion_target(pipe.scheduler, z0, noise, tt)
        for k, e in ehs.items():
            kw = {}
            if controlnet is not None:
                down, mid = controlnet(
                    zt, tt, encoder_hidden_states=e, controlnet_cond=control_image, return_dict=False
                )
                kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out[k].append(float(torch.nn.functional.mse_loss(pipe.unet(zt, tt, e, **kw).sample, target)))
    return out


def _transformer_losses(pipe, images, prompts: dict, timesteps, seed: int) -> dict[str, list[float]]:
    """:func:`denoising_losses` of a diffusion transformer: its family's noising and inputs
    (:mod:`difstudy.denoisers`); the prediction's first latent channels (PixArt's learned variance
    dropped) against the DDPM target, or the flow models' velocity ``noise - z0``."""
    from .denoisers import Noising, denoiser, embed_prompt, image_tokens, model_kwargs, native_size, scale_latents

    net, noising = denoiser(pipe), Noising(pipe)
    size = native_size(pipe, vae_scale_factor(pipe))
    z0 = scale_latents(
        pipe.vae, pipe.vae.encode(torch.stack([image_tensor(im, size) for im in images])).latent_dist.mean
    )
    embs = {k: [embed_prompt(pipe, p, z0.device) for p in v] for k, v in prompts.items()}
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in prompts}
    for t in timesteps:
        noise, tt = torch.randn(z0.shape, generator=g), torch.full((len(z0),), int(t))
        zt = noising.noise(z0, noise, tt, image_tokens(pipe, tuple(z0.shape[-2:])))
        target = noise - z0 if noising.flow else diffusion_target(pipe.scheduler, z0, noise, tt)
        for k, rows in embs.items():
            tokens = torch.stack([e for e, _ in rows])
            extra = torch.stack([x for _, x in rows]) if rows[0][1] is not None else None
            pred = net(**model_kwargs(pipe, noising, zt, tt, tokens, extra, size, 1.0)).sample
            if noising.family == "flux":  # packed tokens back to (B, C, h, w)
                b, _, h, w = z0.shape
                pred = pred.reshape(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)
            out[k].append(float(torch.nn.functional.mse_loss(pred[:, : z0.shape[1]], target)))
    return out
