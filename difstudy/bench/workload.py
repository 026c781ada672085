"""What the benchmark runs: the timed U-Net (SD1.5 layout, seeded random weights), a pipeline
around it, toy-world images, the official code's naive extraction re-implemented for
comparison, and a bare forward interrupted after a module."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..catalog import QKV_KINDS, Catalog
from .config import SD15_WIDTHS


def build_unet(widths: Sequence[int] = SD15_WIDTHS, latent: int = 8, seed: int = 0, norm_num_groups: int = 32):
    """SD1.5 block layout (and, with the default widths, its real sizes), random seeded weights.

    Built on the meta device and filled once (:func:`seeded_init`) instead of
    initialised by every layer and then overwritten: the same kind of weights in
    a fraction of the time (860 M parameters at the SD1.5 widths)."""
    from diffusers import UNet2DConditionModel

    from ..models.tiny import SD_DOWN, SD_UP

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=SD_DOWN,
            up_block_types=SD_UP,
            block_out_channels=tuple(widths),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=norm_num_groups,
            sample_size=latent,
            in_channels=4,
            out_channels=4,
        )
    return seeded_init(unet.to_empty(device="cpu"), seed).eval().requires_grad_(False)


@torch.no_grad()
def seeded_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """PyTorch's default ranges from one seeded generator: weights of linear and conv
    layers uniform in +-1/sqrt(fan_in), biases zero, normalisation scales one."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            bound = p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=g)
        else:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def pipeline_with(unet):
    """A StableDiffusionPipeline around ``unet`` with tiny-sd15's VAE, text encoder and scheduler,
    so :func:`~difstudy.extract.extract` can drive it (the U-Net dominates the cost)."""
    from diffusers import StableDiffusionPipeline

    from ..models.tiny import build_tiny

    tiny = build_tiny("tiny-sd15")
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 toy-world test images."""
    from ..data.toyworld import ToyWorld

    return np.stack([s.image for s in ToyWorld("test", n=n, size=size, seed=seed)])


def feature_bytes(catalog: Catalog, activations, bytes_per_value: int = 4) -> int:
    """Bytes of one image's features for ``activations`` (catalogue shapes)."""
    return sum(int(np.prod(catalog[n].shape)) * bytes_per_value for n in catalog.resolve(activations))


def as_dataset(images: np.ndarray) -> list[dict]:
    """A list of loader-style samples (``image``, ``image_id``)."""
    return [{"image": images[i], "image_id": f"toy{i:05d}"} for i in range(len(images))]


# -- the naive approach -----------------------------------------------------------
def naive_extract(
    pipe,
    dataset,
    activations,
    t: int = 50,
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 8,
    out_path: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The official code's approach, re-implemented naively for comparison.

    Same inputs as :class:`~difstudy.extract.Extractor` (VAE mean, DDPM
    noising with the same noise draw per image, empty prompt), but: a forward hook on every
    requested module (``to_q``/``to_k``/``to_v`` for q/k/v, the module itself
    otherwise), a **full** forward (no early stop), each output appended to a
    Python list in RAM as captured (float32, diffusers' layout), and
    everything stacked at the end (and ``torch.save``-d to ``out_path``).
    Attention maps and ``unet-in`` are not supported.
    """
    from ..extract import ddpm_alphas_cumprod, ddpm_noise, image_digest, noise_for, to_tensor
    from ..models import vae_scale_factor

    unet = pipe.unet
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise ValueError("naive_extract supports the SD1.x/2.x layout only")
    factor = vae_scale_factor(pipe)
    size = int(image_size or unet.config.sample_size * factor)
    cat = Catalog(unet, latent_size=size // factor)
    names = cat.resolve(activations)
    mods = dict(unet.named_modules())
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        a = cat[n] if n in cat else None
        if a is None:
            path = n
        elif a.kind in QKV_KINDS:
            path = f"{a.module}.to_{a.kind[-1]}"
        elif a.is_map or a.kind == "unet-in":
            raise ValueError(f"naive_extract does not support {a.kind} ({n})")
        else:
            path = a.module
        handles.append(
            mods[path].register_forward_hook(lambda m, i, o, n=n: feats[n].append(_output_tensor(o).detach().cpu()))
        )
    alphas_cumprod = ddpm_alphas_cumprod(pipe.scheduler)
    try:
        with torch.no_grad():
            ehs = pipe.encode_prompt("", unet.device, 1, False)[0]
            for start in range(0, len(dataset), batch_size):
                images = [dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))]
                x = torch.stack([to_tensor(im, size) for im in images]).to(unet.device, pipe.vae.dtype)
                z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
                noise = torch.stack([noise_for(image_digest(im), t, seed, z.shape[1:]) for im in images]).to(z)
                tt = torch.full((len(images),), t, dtype=torch.long, device=unet.device)
                zt = ddpm_noise(z, noise, t, alphas_cumprod)
                unet(zt.to(unet.dtype), tt, encoder_hidden_states=ehs.expand(len(images), -1, -1))
    finally:
        for h in handles:
            h.remove()
    stacked = {n: torch.cat(v) for n, v in feats.items()}
    if out_path is not None:
        torch.save(stacked, out_path)
    return stacked


def _output_tensor(out):
    """The tensor of a module output (a tensor, a diffusers output with ``sample``, or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


class _Stop(Exception):
    pass


def last_module(catalog: Catalog, activations) -> str:
    """Module path after which every activation of ``activations`` is available (forward order)."""
    last = catalog.resolve(activations)[-1]
    return catalog[last].module if last in catalog else last


def forward_until(unet, module_path: str, *args, **kwargs) -> None:
    """A bare forward of ``unet`` interrupted right after ``module_path`` runs: one forward
    hook, nothing recorded (the least any extraction of activations up to there must do)."""

    def stop(module, inputs, output):
        raise _Stop

    handle = dict(unet.named_modules())[module_path].register_forward_hook(stop)
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
