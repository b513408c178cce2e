"""Flux (Black Forest Labs): an MMDiT transformer trained by rectified flow on 2x2 patches of packed latents,
conditioned on CLIP's pooled embedding and T5's hidden states.

The objective is that of diffusers' `train_dreambooth_flux.py` and `train_dreambooth_lora_flux.py`
(`FlowMatchingFamily` with their defaults: uniform timesteps, unweighted velocity loss). Latents stay `(B, C, H, W)`
in the training loop; `predict` packs them into the sequence the transformer reads and unpacks its output.

`--guidance_scale` has one meaning for Flux: the guidance strength a guidance-distilled model (FLUX.1-dev,
`guidance_embeds`) is conditioned on. `FluxPipeline` samples with it as its `guidance_scale`, and diffusers' Flux
scripts train with it (default 3.5, the pipeline's own), so class and validation images are drawn with the guidance
the model is trained at. Models without guidance embedding (FLUX.1-schnell) ignore it in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxPipeline

from ..safeguards import DreamBoothInputError
from .base import ImageConditioning, latent_scale_factor
from .flow_matching import FlowMatchingFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

#: The guidance-distilled FLUX.1-dev's training and sampling guidance in diffusers' Flux scripts and pipeline.
DEFAULT_GUIDANCE_SCALE = 3.5


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    hub_tags = ("flux", "flux-diffusers")
    pipeline_class_names = ("FluxPipeline",)
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    # diffusers' Flux LoRA script's `--lora_layers` default: attention and feed-forward layers of both streams of the
    # double-stream blocks, and the MLP input projection of the single-stream blocks.
    denoiser_lora_target_modules = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "text_encoder_lr": 5e-6,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            # T5 tokens: 77 in diffusers' full fine-tuning script, 512 (the pipeline's) in its LoRA script.
            "max_sequence_length": 77 if adapter == "full" else 512,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
        }
        for adapter in ("full", "lora")
    }

    guidance_scale = DEFAULT_GUIDANCE_SCALE

    def configure(self, config: DreamBoothConfig) -> None:
        """The flow-matching options and the training guidance; `--lora_blocks` numbers SD3's blocks only."""
        if config.lora_blocks:
            raise DreamBoothInputError(
                "`--lora_blocks` is an option of SD3; choose Flux's LoRA layers with `--lora_layers` (module names"
                " such as `transformer_blocks.0.attn.to_q`)."
            )
        super().configure(config)
        self.guidance_scale = config.guidance_scale

    # Components

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents: Flux packs latents into 2x2 patches."""
        return latent_scale_factor(configs["vae"]) * 2

    def trained_text_encoder_names(self, adapter: str) -> tuple[str, ...]:
        """CLIP only, full or LoRA: diffusers' Flux scripts keep T5 frozen."""
        return ("text_encoder",)

    # Prompts

    def token_limits(self, max_length: int | None = None) -> list[int]:
        """CLIP ids to `max_length` or the tokenizer's own (77), T5 ids to `--max_sequence_length`."""
        return [max_length or self.tokenizers[0].model_max_length, self.max_sequence_length]

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        """`FluxPipeline.encode_prompt`'s embeddings: T5's last hidden states, and CLIP's pooled output."""
        (clip_ids, t5_ids), (clip, t5) = token_ids, text_encoders
        pooled = clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return {"prompt_embeds": t5(t5_ids.to(self.device))[0], "pooled_prompt_embeds": pooled}

    # Objective

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` latents as the transformer's sequence of `(H/2) * (W/2)` patches of `4C` values."""
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed patches back to `(B, C, height, width)` latents."""
        factor = self.vae_scale_factor
        return FluxPipeline._unpack_latents(packed, height * factor, width * factor, factor)

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        prompt = prompt_embeds["prompt_embeds"]
        return {
            "encoder_hidden_states": prompt,
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"],
            "txt_ids": prompt.new_zeros(prompt.shape[1], 3),
        }

    def guidance(self, batch_size: int) -> torch.Tensor | None:
        """`--guidance_scale` for each example when the transformer embeds guidance (FLUX.1-dev), else None."""
        if not self.denoiser.config.guidance_embeds:
            return None
        return torch.full((batch_size,), self.guidance_scale, device=self.device)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity on the packed noisy latents, unpacked to `(B, C, H, W)`."""
        batch, _, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        packed = denoiser(
            hidden_states=self.pack(noisy),
            timestep=timesteps / 1000,  # the transformer scales it back by 1000
            guidance=self.guidance(batch),
            img_ids=image_ids,
            return_dict=False,
            **self.denoiser_kwargs(prompt_embeds, image_conditioning),
        )[0]
        return self.preconditioned(self.unpack(packed, height, width), noisy, timesteps)
