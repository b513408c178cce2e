"""Stable Diffusion 3: an MMDiT transformer trained by rectified flow (Esser et al., 2024), conditioned on two CLIP
text encoders and an optional T5.

The objective is that of diffusers' `train_dreambooth_sd3.py` and `train_dreambooth_lora_sd3.py`
(`FlowMatchingFamily`), with their defaults: `logit_normal` timesteps and preconditioned outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline

from ..safeguards import DreamBoothInputError
from .base import ImageConditioning, latent_scale_factor
from .flow_matching import FlowMatchingFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

CLIP_TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class StableDiffusion3Family(FlowMatchingFamily):
    name = "stable-diffusion-3"
    hub_tags = ("sd3", "sd3-diffusers")
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    text_encoder_names = (*CLIP_TEXT_ENCODER_NAMES, "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    # diffusers' SD3 LoRA script: the attention projections of both streams (image and text) of every block.
    denoiser_lora_target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "text_encoder_lr": 5e-6,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "logit_normal",
            "precondition_outputs": 1,
            "max_sequence_length": 77,
        }
        for adapter in ("full", "lora")
    }

    # The objective's options as diffusers' SD3 scripts default them, until `configure` reads the run's.
    weighting_scheme = "logit_normal"
    precondition_outputs = True
    max_sequence_length = 77

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        super().__init__(pipeline)
        if pipeline.text_encoder_3 is None:
            # Saved without T5: train on the CLIP encoders, with zeros for T5's part as the pipeline samples.
            self.text_encoder_names = CLIP_TEXT_ENCODER_NAMES
            self.tokenizer_names = ("tokenizer", "tokenizer_2")

    def configure(self, config: DreamBoothConfig) -> None:
        """The flow-matching options, and `--lora_blocks` checked against the transformer's blocks."""
        super().configure(config)
        if config.lora_blocks:
            blocks = [int(block) for block in config.lora_blocks.split(",")]
            num_layers = self.denoiser.config.num_layers
            if max(blocks) >= num_layers:
                raise DreamBoothInputError(
                    f"`--lora_blocks={config.lora_blocks}` names a block the transformer does not have: it has"
                    f" {num_layers}, numbered 0 to {num_layers - 1}."
                )

    # Components

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One patch of latents."""
        return latent_scale_factor(configs["vae"]) * configs[cls.denoiser_name]["patch_size"]

    def check_sample_size(self, height: int, width: int) -> None:
        """The transformer's positional embedding covers at most `pos_embed_max_size` patches a side."""
        limit = self.denoiser.config.pos_embed_max_size
        patches = max(height, width) // self.resolution_multiple
        if limit is not None and patches > limit:
            raise DreamBoothInputError(
                f"An aspect-ratio bucket of {width}x{height} pixels is {patches} patches long, more than this"
                f" transformer's `pos_embed_max_size={limit}`. Lower `--bucket_max_aspect_ratio` or `--resolution`"
                " (or, with an `--aspect_ratio_buckets` list, shorten that size)."
            )

    def trained_text_encoder_names(self, adapter: str) -> tuple[str, ...]:
        """All text encoders for a full fine-tune; with LoRA the CLIP encoders only, T5 stays frozen (as diffusers)."""
        return self.text_encoder_names if adapter == "full" else CLIP_TEXT_ENCODER_NAMES

    # Prompts

    def token_limits(self, max_length: int | None = None) -> list[int]:
        """CLIP ids to `max_length` or the tokenizer's own (77), T5 ids to `--max_sequence_length`."""
        limits = super().token_limits(max_length)
        return limits[:2] + [self.max_sequence_length] * len(limits[2:])

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        """`StableDiffusion3Pipeline.encode_prompt`'s embeddings: the CLIP encoders' penultimate hidden states side by
        side, zero-padded to T5's width, then T5's last hidden states (zeros without T5) along the sequence; the
        pooled embedding is both CLIP projections side by side."""
        hidden_states, pooled = [], []
        for ids, encoder in zip(token_ids[:2], text_encoders[:2]):
            output = encoder(ids.to(self.device), output_hidden_states=True)
            pooled.append(output[0])
            hidden_states.append(output.hidden_states[-2])
        clip = torch.cat(hidden_states, dim=-1)
        if len(token_ids) > 2:
            t5 = text_encoders[2](token_ids[2].to(self.device))[0]
        else:
            width = self.denoiser.config.joint_attention_dim
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    # Objective

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        return {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"],
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"],
        }

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity, or with `--precondition_outputs` the clean latents it implies."""
        kwargs = self.denoiser_kwargs(prompt_embeds, image_conditioning)
        velocity = denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **kwargs)[0]
        return self.preconditioned(velocity, noisy, timesteps)

    # LoRA

    def denoiser_lora_targets(self, config: DreamBoothConfig) -> list[str]:
        """The family's (or `--lora_target_modules`) modules, in the blocks `--lora_blocks` numbers if given."""
        targets = super().denoiser_lora_targets(config)
        if not config.lora_blocks:
            return targets
        blocks = [int(block) for block in config.lora_blocks.split(",")]
        return [f"transformer_blocks.{block}.{name}" for block in blocks for name in targets]
