"""Qwen-Image (Alibaba Qwen): an MMDiT trained by rectified flow on 2x2 patches of the Qwen-Image VAE's latents,
conditioned on Qwen2.5-VL's last hidden states, as diffusers' `train_dreambooth_lora_qwen_image.py` trains it.

- Prompts are `QwenImagePipeline.encode_prompt`'s: the pipeline's system-prompt template, its first 34 tokens
  dropped, at most `--max_sequence_length` (default 512, the script's) tokens, padded to the longest prompt with
  their mask. The transformer gets the mask as the pipeline gives it (None when no prompt is padded), and validation
  samples with the same `max_sequence_length`.
- The VAE encodes single-frame videos: latents `(B, z_dim, 1, H/8, W/8)` whose frame axis is dropped in the training
  loop, normalised `(z - latents_mean) / latents_std` as the pipeline undoes before decoding.
- The objective is the script's: its training scheduler is the checkpoint's loaded with `shift=3.0`, which its
  dynamic shifting (`use_dynamic_shifting`, Qwen-Image's) leaves unused, so timesteps are drawn on the unshifted
  grid (sigma = t / 1000) from the `--weighting_scheme` density (default `none`: uniform), the target is the
  velocity `noise - x`, and the transformer reads `timestep / 1000` and the pipeline's `img_shapes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DiffusionPipeline, QwenImagePipeline

from .base import ImageConditioning, height_and_width
from .llm import LLMPromptFamily

#: The pixel size of one transformer token's side is the VAE's factor times this patch side.
PATCH_SIZE = 2
#: diffusers' script builds its training scheduler from the checkpoint's config with this shift.
SCRIPT_SHIFT = 3.0


def qwen_vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side of the Qwen-Image VAE: one halving per `temperal_downsample` entry."""
    return 2 ** len(vae_config["temperal_downsample"])


class QwenImageFamily(LLMPromptFamily):
    name = "qwen-image"
    hub_tags = ("qwen-image", "qwen-image-diffusers")
    pipeline_class_names = ("QwenImagePipeline",)
    denoiser_name = "transformer"
    # diffusers' script's `--lora_layers` default.
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    # diffusers' script is LoRA-only; full fine-tuning takes the same values.
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 512,
        }
        for adapter in ("full", "lora")
    }

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        super().__init__(pipeline)
        self.noise_scheduler = self.noise_scheduler_class.from_config(pipeline.scheduler.config, shift=SCRIPT_SHIFT)

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation reads prompts at the training `--max_sequence_length`."""
        return {"max_sequence_length": self.max_sequence_length}

    # Components

    @property
    def vae_scale_factor(self) -> int:
        return qwen_vae_scale_factor(self.vae.config)

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents."""
        return qwen_vae_scale_factor(configs["vae"]) * PATCH_SIZE

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """`(z_dim, height / 8, width / 8)`: the VAE's latents of one frame."""
        height, width = height_and_width(resolution)
        return (self.vae.config.z_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`QwenImagePipeline.encode_prompt`: Qwen2.5-VL's last hidden states after the template, and their mask
        (all ones where the pipeline returns None: no prompt padded)."""
        embeds, mask = self.pipeline.encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds.float(), "prompt_embeds_mask": mask}

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's posterior of single-frame videos, normalised as `(z - latents_mean) / latents_std`."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(self.device, vae.dtype).unsqueeze(2)).latent_dist
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(shape)
        posterior_std = posterior.std[:, :, 0]
        if self.vae_encode_mode == "mode":
            posterior_std = torch.zeros_like(posterior_std)
        return ((posterior.mean[:, :, 0] - mean) / std).float(), (posterior_std / std).float()

    # Objective

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        """The embeddings and their mask, None when no token is padding (as the pipeline passes it)."""
        mask = prompt_embeds["prompt_embeds_mask"]
        return {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"],
            "encoder_hidden_states_mask": None if mask.all() else mask.long(),
        }

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity on the pipeline's packing of the noisy latents, unpacked to `(B, C, H, W)`."""
        batch, channels, height, width = noisy.shape
        packed = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=timesteps / 1000,
            img_shapes=[[(1, height // PATCH_SIZE, width // PATCH_SIZE)]] * batch,
            return_dict=False,
            **self.denoiser_kwargs(prompt_embeds, image_conditioning),
        )[0]
        factor = self.vae_scale_factor
        velocity = QwenImagePipeline._unpack_latents(packed, height * factor, width * factor, factor)[:, :, 0]
        return self.preconditioned(velocity, noisy, timesteps)
