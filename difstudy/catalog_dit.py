"""The activation catalogue of diffusion transformers (PixArt-α/Σ, SD3, FLUX), beside the U-Net's
(:mod:`difstudy.catalog`), under one grammar that keeps the papers' words where they apply::

    transformer-in | transformer-after-patch-embed | transformer-out
    vit-block{i}-{kind}

Blocks count from 0 in forward order over every block of the model: FLUX's 19 double-stream
blocks are ``vit-block0`` .. ``vit-block18`` and its 38 single-stream blocks continue as
``vit-block19`` .. ``vit-block56``, the numbering of the official code (generic-diffusion-feature
at e4361a6, ``feature/components/feature_extractor.py``), so a user of it finds the same activation.

Kinds per block family, in forward order (``*``: a name the official code also exposes):

- PixArt (``BasicTransformerBlock``, AdaLN-single): ``self-q`` ``self-k`` ``self-v`` ``self-map``
  ``cross-q`` ``cross-map`` (*, the official names of the U-Net's transformer blocks),
  ``norm-out`` (the AdaLN-modulated input of the feed-forward), ``ffn-inner`` (*), ``out`` (*),
  ``increment`` (output minus input: the analogue of the U-Net's ``res-increment``);
- SD3 (``JointTransformerBlock``) and FLUX double-stream (``FluxTransformerBlock``): ``q`` ``k``
  ``v`` (*, the image stream's projections, before any q/k norm and rotary embedding, as
  officially) ``self-map`` ``cross-map`` (*) ``attn-out`` (*, the image half of the joint
  attention after its output projection) ``norm-out`` (*) ``ffn-inner`` (*) ``out`` ``increment``;
- FLUX single-stream (``FluxSingleTransformerBlock``): ``norm-out`` (the modulated input of
  attention and MLP) ``q`` ``k`` ``v`` ``self-map`` ``cross-map`` ``attn-out`` ``out`` (*)
  ``increment``.

Text tokens never enter an image feature map: where text and image tokens share a sequence (FLUX
single-stream blocks) the text tokens are sliced off, as officially. Token grids are reshaped to
``(C, h, w)`` with ``h, w`` the latent size divided by the patch size (FLUX packs 2x2 latent cells
into one token: its grid is the latent size / 2, and the packing is row-major over that grid, so
no unpacking is needed). Attention maps are ``(heads, h*w, keys)`` over the image queries: in a
joint attention (SD3, FLUX) ``self-map`` and ``cross-map`` are the image-key and text-key slices of
one softmax, so their rows sum to 1 together (the official code slices the same way); in PixArt
each is its own softmax.

**Deliberate difference from the official code**: its FLUX double-stream ``vit-block{i}-out``
stores the feed-forward's normalised input (the same tensor as ``-norm-out``; the gather call sits
after the residual but names ``norm_hidden_states``); difstudy's ``out`` is the block's output.
"""

from __future__ import annotations

import torch.nn as nn

PIXART_KINDS = ("self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "norm-out", "ffn-inner", "out")
JOINT_KINDS = ("q", "k", "v", "self-map", "cross-map", "attn-out", "norm-out", "ffn-inner", "out")
SINGLE_KINDS = ("norm-out", "q", "k", "v", "self-map", "cross-map", "attn-out", "out")
DIT_MAP_KINDS = ("self-map", "cross-map")
FAMILIES = {
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def family(model: nn.Module) -> str | None:
    """``pixart``, ``sd3`` or ``flux`` for a diffusers diffusion transformer, else None."""
    return FAMILIES.get(type(model).__name__)


def patch_size(model: nn.Module) -> int:
    """Latent cells per token side: the config's patch size, FLUX's 2x2 packing."""
    return 2 if family(model) == "flux" else int(model.config.patch_size)


def token_grid(model: nn.Module, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a latent of ``latent_hw`` cells: divided by the patch size (FLUX: by its
    2x2 packing)."""
    p = patch_size(model)
    if latent_hw[0] % p or latent_hw[1] % p:
        raise ValueError(f"latent size {latent_hw} is not a multiple of the patch size {p}")
    return latent_hw[0] // p, latent_hw[1] // p


def _ffn_inner(ff: nn.Module) -> int:
    return [m for m in ff.net if isinstance(m, nn.Linear)][0].in_features


def _block_rows(fam: str, i: int, path: str, blk: nn.Module, single: bool, grid, text_len: int):
    """(name, module, kind, block, shape) of one block, in forward order."""
    n = grid[0] * grid[1]
    if fam == "pixart":
        dim, kinds = blk.attn1.to_q.out_features, PIXART_KINDS
        attn = {"self": (f"{path}.attn1", blk.attn1.heads), "cross": (f"{path}.attn2", blk.attn2.heads)}
    else:
        dim, kinds = blk.attn.to_q.out_features, SINGLE_KINDS if single else JOINT_KINDS
        attn = {"self": (f"{path}.attn", blk.attn.heads), "cross": (f"{path}.attn", blk.attn.heads)}
    for kind in (*kinds, "increment"):
        name = f"vit-block{i}-{kind}"
        if kind in DIT_MAP_KINDS:
            mod, heads = attn[kind.split("-")[0]]
            yield name, mod, kind, i, (heads, n, n if kind == "self-map" else text_len)
        elif kind in ("self-q", "self-k", "self-v", "cross-q", "q", "k", "v"):
            mod = attn["cross" if kind == "cross-q" else "self"][0]
            yield name, f"{mod}.to_{kind[-1]}", kind, i, (dim, *grid)
        elif kind == "ffn-inner":
            yield name, f"{path}.ff.net.0", kind, i, (_ffn_inner(blk.ff), *grid)
        elif kind == "norm-out":
            yield name, f"{path}.norm" if single else f"{path}.ff", kind, i, (dim, *grid)
        elif kind == "attn-out":
            yield name, attn["self"][0], kind, i, (dim, *grid)
        else:  # out, increment: the block's own call
            yield name, path, kind, i, (dim, *grid)


def enumerate_transformer(model: nn.Module, latent_hw: tuple[int, int], text_len: int) -> list[tuple]:
    """Rows ``(name, module, kind, stage, level, repeat, block, shape)`` of a diffusion transformer,
    in forward order (:class:`difstudy.catalog.Catalog` makes them :class:`~difstudy.catalog.Activation`)."""
    fam = family(model)
    if fam is None:
        raise TypeError(f"{type(model).__name__} is not a diffusion transformer difstudy knows ({sorted(FAMILIES)})")
    cfg = model.config
    grid = token_grid(model, latent_hw)
    dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
    rows = []
    # the model's input and output: FLUX's are packed tokens (64 channels = 16 latent channels x 2 x 2)
    io_hw = grid if fam == "flux" else latent_hw
    embed = "x_embedder" if fam == "flux" else "pos_embed"
    rows.append(("transformer-in", "", "transformer-in", (cfg.in_channels, *io_hw)))
    rows.append(("transformer-after-patch-embed", embed, "transformer-after-patch-embed", (dim, *grid)))
    blocks = [(f"transformer_blocks.{j}", blk, False) for j, blk in enumerate(model.transformer_blocks)]
    singles = getattr(model, "single_transformer_blocks", None) or []
    blocks += [(f"single_transformer_blocks.{j}", blk, True) for j, blk in enumerate(singles)]
    out = [
        row
        for i, (path, blk, single) in enumerate(blocks)
        for row in _block_rows(fam, i, path, blk, single, grid, text_len)
    ]
    full = [(name, mod, kind, "transformer", None, None, None, shape) for name, mod, kind, shape in rows]
    full += [(name, mod, kind, "transformer", None, None, b, shape) for name, mod, kind, b, shape in out]
    out_channels = cfg.out_channels or cfg.in_channels
    full.append(("transformer-out", "", "transformer-out", "transformer", None, None, None, (out_channels, *io_hw)))
    return full
