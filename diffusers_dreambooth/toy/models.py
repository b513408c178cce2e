"""The toy base model's architecture: a Stable Diffusion 1.x layout small enough to pretrain on 2 CPU cores.

Sizes follow the feasibility run in the project's TOYWORLD notes (about 9 MB in all): a CLIP tokenizer learnt on the
world's prompts, a 2-layer CLIP text encoder of width 64, a 3-level VAE taking 32 px images to 8x8x4 latents, and a
3-level UNet with cross-attention. The weights here are untrained; pretraining comes on top.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ..testing_utils import build_clip_tokenizer, clip_text_config
from .world import BACKGROUNDS, CLASS_PROMPT, COLORS, SHAPES, SUBJECT_PROMPT, Scene, full_caption

TEXT_HIDDEN_SIZE = 64
LATENT_SIZE = 8

#: Token context of the world's tokenizer and text encoder: the longest world prompt is 18 tokens, and a context of
#: 24 instead of CLIP's 77 makes a pretraining step about 25% cheaper (text encoder and cross-attention keys).
TEXT_CONTEXT_LENGTH = 24


def world_prompts() -> list[str]:
    """Every full caption of the world (plain and two-colour striped), its partial forms, and the subject's prompts."""
    prompts = {"", SUBJECT_PROMPT, CLASS_PROMPT}
    plain = [(color, None) for color in COLORS]
    striped = [(first, (first, second)) for first, second in itertools.permutations(COLORS, 2)]
    for shape, background, (color, pattern) in itertools.product(SHAPES, BACKGROUNDS, plain + striped):
        prompts.add(full_caption(Scene(shape=shape, color=color, background=background, pattern=pattern)))
    for shape in SHAPES:
        article = "an" if shape[0] in "aeiou" else "a"
        prompts.add(f"a photo of {article} {shape}")
        prompts.update(f"a photo of {article} {shape} on a {background} background" for background in BACKGROUNDS)
    return sorted(prompts)


def build_world_tokenizer(save_directory: str | os.PathLike) -> CLIPTokenizer:
    """A CLIP BPE learnt on `world_prompts()`, so every word of the world is one token ("sks" included)."""
    return build_clip_tokenizer(
        save_directory, corpus=world_prompts(), vocab_size=1000, model_max_length=TEXT_CONTEXT_LENGTH
    )


def build_untrained_pipeline(tokenizer: CLIPTokenizer, seed: int = 0) -> StableDiffusionPipeline:
    """The toy base model with random weights, seeded: what pretraining starts from."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            clip_text_config(
                tokenizer,
                hidden_size=TEXT_HIDDEN_SIZE,
                intermediate_size=4 * TEXT_HIDDEN_SIZE,
                num_hidden_layers=2,
                num_attention_heads=4,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
            mid_block_add_attention=False,
        )
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=4,
            norm_num_groups=16,
        )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parameter_counts(pipeline: StableDiffusionPipeline) -> dict[str, int]:
    """Parameters per trained component, to compare with the sizes the world needs."""
    return {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("unet", "vae", "text_encoder")
    }


def save_untrained_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tokenizer and the untrained toy pipeline under `directory` (a `save_pretrained` folder)."""
    directory = Path(directory)
    tokenizer = build_world_tokenizer(directory / "tokenizer")
    build_untrained_pipeline(tokenizer, seed).save_pretrained(directory)
    return directory
