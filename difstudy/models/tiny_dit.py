"""Tiny random-weight pipelines of the diffusion-transformer layouts: ``tiny-pixart``,
``tiny-sd3``, ``tiny-flux``.

Each is the real pipeline class (``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``) around the tiny transformer of :data:`difstudy.models.layouts.TINY_DIT`, with
every other part built small from a fixed seed: a VAE of the family's latent channels (4 for
PixArt, 16 for SD3 and FLUX, with the real models' ``scaling_factor`` / ``shift_factor``), the text
encoders the pipeline expects (CLIP with projection for SD3's two and FLUX's pooled one, T5 for
PixArt's, SD3's third and FLUX's token states) and the real scheduler configuration of the family
(DDPM betas for PixArt, flow matching with SD3's static and FLUX's dynamic shift).

No tokenizer can be downloaded here, so every text encoder of a tiny pipeline reads the
closed-vocabulary CLIP tokenizer of the tiny U-Nets (:func:`difstudy.models.tokenizer.build_clip_tokenizer`
over the toy-world words), the T5 ones padded to the layout's text length: the pipelines call
their tokenizers the same way, so ``encode_prompt`` runs as for the real models.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
)
from transformers import T5Config, T5EncoderModel

from .layouts import TINY_DIT, layout, tiny_transformer
from .tiny import TINY_WORDS, _seeded, _text_encoder
from .tokenizer import build_clip_tokenizer

TINY_DIT_MODELS = tuple(TINY_DIT)
# the real families' schedulers and VAE scalings (difstudy/models/configs/dit: pixart-alpha,
# sd3-medium, flux-dev)
REAL_OF = {"tiny-pixart": "pixart-alpha", "tiny-sd3": "sd3-medium", "tiny-flux": "flux-dev"}
SCHEDULERS = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
              "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}  # fmt: skip


def _vae(latent_channels: int, scaling: float, shift: float | None):
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=shift is None,  # SD3 and FLUX VAEs have no quant convs
        use_post_quant_conv=shift is None,
    ).eval()


def _t5(tok, d_model: int):
    cfg = T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval()


def _scheduler(name: str):
    cfg = dict(layout(REAL_OF[name])["scheduler"])
    return SCHEDULERS[cfg.pop("_class_name")].from_config(cfg)


def build_tiny_dit(name: str):
    """Build ``tiny-pixart`` / ``tiny-sd3`` / ``tiny-flux`` (seeded random weights; see the module doc)."""
    if name not in TINY_DIT:
        raise ValueError(f"unknown tiny transformer {name!r}; choose one of {TINY_DIT_MODELS}")
    rec, real = TINY_DIT[name], layout(REAL_OF[name])
    cfg = rec["transformer"]
    transformer = tiny_transformer(name, seed=1)
    v = real["vae"]
    vae = _seeded(2, lambda: _vae(v["latent_channels"], v["scaling_factor"], v.get("shift_factor")))
    clip_tok = build_clip_tokenizer(TINY_WORDS, model_max_length=77)
    t5_len = rec["text_len"] - clip_tok.model_max_length if name == "tiny-sd3" else rec["text_len"]  # SD3 stacks both
    t5_tok = build_clip_tokenizer(TINY_WORDS, model_max_length=t5_len)
    sched = _scheduler(name)
    if name == "tiny-pixart":
        t5 = _seeded(3, lambda: _t5(t5_tok, cfg["caption_channels"]))
        return PixArtAlphaPipeline(tokenizer=t5_tok, text_encoder=t5, vae=vae, transformer=transformer, scheduler=sched)
    if name == "tiny-sd3":
        # two CLIP encoders whose pooled outputs concatenate to the pooled projection, their token
        # states (zero-padded) and T5's stacked along the sequence
        half = cfg["pooled_projection_dim"] // 2
        te1 = _seeded(3, lambda: _text_encoder(clip_tok, half, 2, projection=half))
        te2 = _seeded(4, lambda: _text_encoder(clip_tok, half, 2, projection=half))
        t5 = _seeded(5, lambda: _t5(t5_tok, cfg["joint_attention_dim"]))
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tok,
            text_encoder_2=te2, tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok,
        )  # fmt: skip
    te1 = _seeded(3, lambda: _text_encoder(clip_tok, cfg["pooled_projection_dim"], 2))
    t5 = _seeded(4, lambda: _t5(t5_tok, cfg["joint_attention_dim"]))
    pipe = FluxPipeline(
        scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    )  # fmt: skip
    pipe.default_sample_size = rec["native_size"] // rec["vae_scale_factor"]  # FluxPipeline's is FLUX's 1024 px
    return pipe


__all__ = ["build_tiny_dit", "TINY_DIT_MODELS"]
