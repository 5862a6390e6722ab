"""A tiny Stable-Diffusion-layout pipeline built from configs (random weights, no downloads).

Used by ``rglcd demo`` and the tests: it is saved with ``save_pretrained`` and then loaded through
:func:`rglcd.models.load_teacher`, the same path a hub id takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def char_tokenizer(model_max_length: int = 77):
    """A real CLIPTokenizer over the 256 byte-level symbols (no merges): every character is a token."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def clip_text_encoder(
    tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, projection_dim: int = 0
):
    """An untrained CLIPTextModel sized for ``tokenizer`` (its vocabulary, special tokens and context length);
    with ``projection_dim``, a CLIPTextModelWithProjection (SDXL's second encoder, whose projection is pooled)."""
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection_dim or 512,
        )
    )


def sd_scheduler(prediction_type: str):
    """A DDPM schedule with Stable Diffusion's scaled-linear betas and steps offset."""
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of these parts, without a safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_vae(resolution: int):
    """An AutoencoderKL with 3 blocks (scale factor 4) and 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def tiny_unet(resolution: int, cross_attention_dim: int, **extra):
    """A two-level UNet2DConditionModel for ``resolution // 4`` latents; ``extra``: e.g. SDXL's added conditions."""
    return UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def build_tiny_pipeline(
    prediction_type: str = "epsilon",
    resolution: int = 32,
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
):
    """A randomly initialised StableDiffusionPipeline with SD's scaled-linear DDPM schedule.

    The VAE has 3 blocks (scale factor 4), so a ``resolution`` image has ``resolution // 4`` latents.
    """
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(model_max_length=16)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    vae = tiny_vae(resolution)  # before the UNet: the order of the random initialisations is the seed's
    unet = tiny_unet(resolution, cross_attention_dim=32, time_cond_proj_dim=time_cond_proj_dim)
    return sd_pipeline(vae, text_encoder, tokenizer, unet, sd_scheduler(prediction_type))


def build_tiny_sdxl_pipeline(prediction_type: str = "epsilon", resolution: int = 32, seed: int = 0):
    """A randomly initialised StableDiffusionXLPipeline: two text encoders (the second with a projection, whose
    output is the pooled embedding), a UNet with SDXL's text-and-time added conditions."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(model_max_length=16), char_tokenizer(model_max_length=16)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    text_encoder_2 = clip_text_encoder(
        tokenizer_2, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, projection_dim=24
    )
    time_embed_dim = 8
    unet = tiny_unet(
        resolution,
        cross_attention_dim=32 + 32,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=24 + 6 * time_embed_dim,  # pooled embedding + 6 size numbers
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(resolution), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_scheduler(prediction_type),
    )  # fmt: skip


def save_tiny_pipeline(out_dir: str | Path, sdxl: bool = False, **kwargs) -> Path:
    out_dir = Path(out_dir)
    (build_tiny_sdxl_pipeline if sdxl else build_tiny_pipeline)(**kwargs).save_pretrained(out_dir)
    return out_dir
