"""Krea 2 (Krea AI): a single-stream MMDiT trained by rectified flow on 2x2 patches of Qwen-Image VAE latents,
conditioned on several hidden states of a Qwen3-VL text encoder, stacked per token.

The objective is that of diffusers' `train_dreambooth_lora_krea2.py`: timesteps from the `--weighting_scheme`
density on the scheduler's unshifted grid (Krea 2's scheduler shifts only at sampling, by resolution), the noisy
input `(1 - sigma) * x + sigma * noise`, the velocity `noise - x` as target and the transformer read at
`timestep / 1000`. Latents are the VAE posterior normalised by its `latents_mean` / `latents_std`, as the pipeline
undoes them before decoding. Prompts are encoded by the pipeline's own `encode_prompt` (its chat template padded in
the middle, the selected layers stacked), a fixed `--max_sequence_length` per prompt, with their mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import Krea2Pipeline

from .base import ImageConditioning, height_and_width
from .llm import LLMPromptFamily

#: The pixel size of one transformer token's side is the VAE's factor times this patch side.
PATCH_SIZE = 2


def qwen_vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side of the Qwen-Image VAE: one halving per `temperal_downsample` entry."""
    return 2 ** len(vae_config["temperal_downsample"])


class Krea2Family(LLMPromptFamily):
    name = "krea2"
    hub_tags = ("krea2", "krea2-diffusers")
    pipeline_class_names = ("Krea2Pipeline",)
    denoiser_name = "transformer"
    # diffusers' script's default `--lora_layers`: the Krea 2 authors' recommended set (patch embedding, final
    # projection, attention with its gate, MLP, text fusion and text/time embeddings).
    denoiser_lora_target_modules = (
        "img_in",
        "final_layer.linear",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "to_gate",
        "ff.up",
        "ff.down",
        "text_fusion.projector",
        "txt_in.linear_1",
        "txt_in.linear_2",
        "time_embed.linear_1",
        "time_embed.linear_2",
        "time_mod_proj",
    )
    # diffusers' script is LoRA-only; full fine-tuning takes the same values.
    option_defaults = {
        adapter: {
            "learning_rate": 3e-4,
            "rank": 32,  # the script's rank and alpha (alpha = rank by default)
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 512,
        }
        for adapter in ("full", "lora")
    }

    # Components

    @property
    def vae_scale_factor(self) -> int:
        return qwen_vae_scale_factor(self.vae.config)

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents."""
        return qwen_vae_scale_factor(configs["vae"]) * PATCH_SIZE

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """`(z_dim, height / 8, width / 8)`: the Qwen-Image VAE's latents of one frame."""
        height, width = height_and_width(resolution)
        return (self.vae.config.z_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`Krea2Pipeline.encode_prompt`: `(prompt, max_sequence_length, layers, dim)` states and their mask."""
        embeds, mask = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds.float(), "prompt_embeds_mask": mask}

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Qwen-Image VAE's posterior of single-frame videos, normalised as `(z - latents_mean) / latents_std`."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(self.device, vae.dtype).unsqueeze(2)).latent_dist
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(shape)
        return ((posterior.mean[:, :, 0] - mean) / std).float(), (posterior.std[:, :, 0] / std).float()

    # Objective

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
        embeds = prompt_embeds["prompt_embeds"]
        position_ids = Krea2Pipeline.prepare_position_ids(
            embeds.shape[1], height // PATCH_SIZE, width // PATCH_SIZE, noisy.device
        )
        packed = denoiser(
            hidden_states=self.pipeline._pack_latents(noisy, batch, channels, height, width),
            encoder_hidden_states=embeds,
            timestep=timesteps / 1000,
            position_ids=position_ids,
            encoder_attention_mask=prompt_embeds["prompt_embeds_mask"].bool(),
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor
        velocity = self.pipeline._unpack_latents(packed, height * factor, width * factor)[:, :, 0]
        return self.preconditioned(velocity, noisy, timesteps)
