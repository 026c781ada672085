"""Tiny random-weight pipelines with the real Stable Diffusion block layouts.

``tiny-sd15``, ``tiny-sd21`` and ``tiny-sdxl`` keep everything that shapes the
activation catalogue and the forward pass exactly as in the real models: block
types, layers per block, transformer depth per level, attention heads,
cross-attention dims, linear vs conv projections, SD2.1's v-prediction and
SDXL's added text/time embeddings and two text encoders. Only the widths
(block channels, text-encoder depth and MLP sizes, VAE) are small, so a
forward pass on a 64 px image takes milliseconds. Weights are drawn from a
fixed seed, so every build is identical.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer

TINY_IMAGE_SIZE = 64
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

UNET_CONFIGS = {
    # real: widths (320, 640, 1280, 1280), 8 heads, cross-attention 768
    "tiny-sd15": dict(
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=8,
    ),
    # real: widths (320, 640, 1280, 1280), heads (5, 10, 20, 20), cross-attention 1024, linear projections
    "tiny-sd21": dict(
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        block_out_channels=(40, 80, 160, 160),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ),
    # real: widths (320, 640, 1280), heads (5, 10, 20), depth (1, 2, 10), cross-attention 2048, text_time embeddings
    "tiny-sdxl": dict(
        down_block_types=XL_DOWN,
        up_block_types=XL_UP,
        block_out_channels=(40, 80, 160),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=8,
    ),
}
TINY_MODELS = tuple(UNET_CONFIGS)
# The words the tiny models' tokenizer holds as one token each: the toy-world caption vocabulary
# (difstudy.data.toyworld.vocabulary(), which tests/test_models.py checks it equals), written
# out so that the models layer does not import the dataset.
TINY_WORDS = tuple(
    (
        "a and background base beak bird black blue boat body brown cabin cap car center checkered chimney "
        "cluttered crown dog door ears eye facing fin fins fish flag flame flower fruit gradient gray green "
        "head house hull large leaf left legs light mast mushroom nose of on orange petals photo pink plain "
        "purple red right rocket roof roots sail small spots stem striped tail tree trunk walls wheels white "
        "window wing with yellow"
    ).split()
)


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _text_encoder(tokenizer, hidden: int, heads: int, projection: int | None = None):
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae():
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    ).eval()


def build_tiny(name: str, words: Sequence[str] = TINY_WORDS):
    """Build ``tiny-sd15`` / ``tiny-sd21`` / ``tiny-sdxl`` (seeded, random weights); the tokenizer
    holds each of ``words`` as one token (default: the toy-world vocabulary, :data:`TINY_WORDS`)."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    ucfg = dict(UNET_CONFIGS[name], sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4)
    unet = _seeded(1, lambda: UNet2DConditionModel(**ucfg).eval())
    vae = _seeded(2, _vae)
    tok = build_clip_tokenizer(words, model_max_length=77)
    pred = "v_prediction" if name == "tiny-sd21" else "epsilon"
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=pred,
    )
    if name == "tiny-sdxl":
        te1 = _seeded(3, lambda: _text_encoder(tok, 768, 12))
        te2 = _seeded(4, lambda: _text_encoder(tok, 1280, 20, projection=1280))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched
        )
    te = _seeded(3, lambda: _text_encoder(tok, ucfg["cross_attention_dim"], 12 if name == "tiny-sd15" else 16))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def with_random_unet(pipe, seed: int = 0):
    """A shallow copy of ``pipe`` whose denoiser (U-Net or diffusion transformer) is
    :func:`random_like` (on the same device): the random-weight control of a measurement,
    everything else (VAE, text encoder) shared."""
    from ..denoisers import denoiser

    rnd = copy.copy(pipe)
    net = random_like(pipe, seed=int(seed)).to(denoiser(pipe).device)
    if getattr(pipe, "transformer", None) is not None:
        rnd.transformer = net
    else:
        rnd.unet = net
    return rnd


def random_like(pipe, seed: int = 0):
    """A copy of ``pipe``'s denoiser (U-Net or diffusion transformer) with freshly initialised
    (random) weights: the "same architecture, random weights" baseline."""
    from ..denoisers import denoiser

    net = denoiser(pipe)

    def make():
        fresh = type(net).from_config(net.config).eval()
        return fresh if net.dtype == torch.float32 else fresh.to(net.dtype)

    return _seeded(seed, make)
