"""Architecture of ``difstudy-mini``: a small latent text-to-image model with the
real Stable Diffusion 1.5 layout, trained on the toy world by
:mod:`difstudy.train.mini`. This module only defines the architecture; it
knows nothing of the toy world (the tokenizer's vocabulary is passed in).

- VAE: ``AutoencoderKL``, 3 levels (downsampling factor 4), widths (32, 64, 64), 4 latent
  channels, no mid-block attention (the full-resolution convolutions dominate
  its CPU cost),
  so 64 px images become 4 x 16 x 16 latents (the U-Net's largest resolution
  stays at 16 x 16, which keeps self-attention cheap on CPU).
- Text encoder: a 2-layer ``CLIPTextModel`` over the toy-world vocabulary.
- U-Net: ``UNet2DConditionModel`` with exactly SD1.5's block types, two
  layers per block, one transformer per attention block, 8 heads, widths
  (32, 64, 96, 96): its activation catalogue is the same 197 names as SD1.5.
  ``pooled_text=True`` (``train.mini --pooled-text``, an experiment, not the
  committed model) also feeds the prompt, pooled, into every ResNet through
  the time embedding (diffusers' ``addition_embed_type="text"``,
  ``TextTimeEmbedding``, as in DeepFloyd IF); the catalogue stays 197 names.
- Scheduler: SD's scaled-linear betas over 1000 training steps; the U-Net
  predicts ``v`` (as SD2.1 does), which trains faster at this size than epsilon.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tiny import SD_DOWN, SD_UP
from .tokenizer import build_clip_tokenizer

IMAGE_SIZE = 64
TEXT_LENGTH = 32
SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
)


def build_tokenizer(vocabulary: list[str]):
    """A CLIP tokenizer in which every word of ``vocabulary`` is one token."""
    return build_clip_tokenizer(vocabulary, model_max_length=TEXT_LENGTH)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_unet(pooled_text: bool = False) -> UNet2DConditionModel:
    """The mini U-Net (SD1.5 layout); ``pooled_text`` adds the pooled-text time embedding."""
    return UNet2DConditionModel(
        addition_embed_type="text" if pooled_text else None,
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=SD_DOWN,
        up_block_types=SD_UP,
        block_out_channels=(32, 64, 96, 96),
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_KW)


def build_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_KW, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
