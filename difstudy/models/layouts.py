"""Diffusion-transformer layouts: the real ones embedded as small JSON files, and tiny ones.

Real layouts (``difstudy/models/configs/dit/<name>.json``: the architecture fields of the published
``transformer/config.json``, the hub id, the text length the pipeline pads to, the VAE factor and
the native image size) let ``difstudy catalog pixart-sigma`` list the real model's activations and
shapes on the meta device, without downloading anything (:func:`meta_transformer`). Tiny layouts
(``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``: the same block structure at small widths, random
weights from a fixed seed) are what the tests run (:func:`tiny_transformer`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

DIT_CONFIGS = Path(__file__).parent / "configs" / "dit"
TINY_DIT = {
    "tiny-pixart": dict(
        class_name="PixArtTransformer2DModel", text_len=16, vae_scale_factor=8, native_size=64,
        transformer=dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                         num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
                         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                         activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
                         use_additional_conditions=False, interpolation_scale=1),
    ),
    "tiny-sd3": dict(
        class_name="SD3Transformer2DModel", text_len=77 + 12, vae_scale_factor=8, native_size=64,  # CLIP 77 + T5
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16),
    ),
    "tiny-flux": dict(
        class_name="FluxTransformer2DModel", text_len=12, vae_scale_factor=8, native_size=128,
        transformer=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    ),
}  # fmt: skip


@cache
def _real() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DIT_CONFIGS.glob("*.json"))}


def names() -> list[str]:
    """The embedded real layouts and the tiny ones."""
    return [*_real(), *TINY_DIT]


def layout_name(name: str) -> str | None:
    """The layout of a model name (``pixart-sigma``, its hub id, ``tiny-flux``), or None."""
    real = _real()
    if name in real or name in TINY_DIT:
        return name
    return next((k for k, v in real.items() if v["hub"] == name), None)


def layout(name: str) -> dict:
    """The layout record of ``name`` (see the module doc); a clear error for an unknown one."""
    key = layout_name(name)
    if key is None:
        raise KeyError(f"no diffusion-transformer layout {name!r}; known: {', '.join(names())}")
    return TINY_DIT.get(key) or _real()[key]


def _build(name: str):
    import diffusers

    rec = layout(name)
    return getattr(diffusers, rec["class_name"])(**rec["transformer"])


def meta_transformer(name: str):
    """The transformer of ``name`` on the meta device: its structure without memory or weights."""
    with torch.device("meta"):
        return _build(name)


def tiny_transformer(name: str, seed: int = 0):
    """A tiny layout with random weights from ``seed`` (the tests' models)."""
    if name not in TINY_DIT:
        raise KeyError(f"{name!r} is not a tiny transformer layout ({', '.join(TINY_DIT)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name).eval()


def latent_size(name: str) -> int:
    """The latent size of the layout's native image size."""
    rec = layout(name)
    return rec["native_size"] // rec["vae_scale_factor"]


def example_inputs(name: str, batch: int = 2, seed: int = 0, latent: int | None = None) -> dict:
    """Random keyword inputs of one forward of the layout ``name``'s transformer (the tests' and the
    bench's): latents (FLUX: packed 2x2 tokens with their position ids), text states of the layout's
    text length (PixArt: with its caption mask, the last quarter padding), pooled text, timestep
    (FLUX: sigma in [0, 1] and the guidance of FLUX-dev)."""
    rec = layout(name)
    cfg, text_len = rec["transformer"], rec["text_len"]
    lat = latent or latent_size(name)
    g = torch.Generator().manual_seed(seed)
    ctx = cfg.get("caption_channels") or cfg.get("joint_attention_dim")
    ehs = torch.randn(batch, text_len, ctx, generator=g)
    if rec["class_name"] == "FluxTransformer2DModel":
        side = lat // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
        kw = dict(
            hidden_states=torch.randn(batch, side * side, cfg["in_channels"], generator=g),
            encoder_hidden_states=ehs,
            pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
            timestep=torch.full((batch,), 0.3),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text_len, 3),
        )
        if cfg.get("guidance_embeds"):
            kw["guidance"] = torch.full((batch,), 3.5)
        return kw
    x = torch.randn(batch, cfg["in_channels"], lat, lat, generator=g)
    if rec["class_name"] == "SD3Transformer2DModel":
        pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
        return dict(
            hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=torch.full((batch,), 300.0)
        )
    mask = torch.ones(batch, text_len)
    mask[:, text_len - text_len // 4 :] = 0
    return dict(
        hidden_states=x, encoder_hidden_states=ehs, timestep=torch.full((batch,), 300), encoder_attention_mask=mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )  # fmt: skip
