"""Lumina-Image 2.0 (Alpha-VLLM): a unified next-DiT on 2x2 patches of AutoencoderKL latents, conditioned on Gemma 2's
penultimate hidden states, trained by rectified flow with Lumina's reversed time, as diffusers'
`train_dreambooth_lora_lumina2.py` trains it.

Prompts are `Lumina2Pipeline.encode_prompt`'s: `--system_prompt` (default: the pipeline's own) + `" <Prompt Start> "`
+ the prompt, `--max_sequence_length` tokens with their attention mask; validation samples with the same system
prompt.

Lumina's transformer reads time the other way round: `Lumina2Pipeline` gives it `1 - t / 1000` (0 is noise, 1 the
image) and integrates the negative of its output, so the transformer predicts `x - noise`. Training here draws the
noise level sigma from the checkpoint's (shifted) schedule as for the other flow-matching families, noises
`(1 - sigma) * x + sigma * noise`, gives the transformer `1 - sigma`, and compares the negated output with the
velocity `noise - x`: the same regression as the script's `target = x - noise`. One deliberate difference: the
script draws its sigma from the shifted schedule and then uses it as the weight of the image (its lerp is reversed),
which mirrors the shift (with Lumina 2's shift of 6, mostly nearly clean inputs); here the shift weights noise levels
as the pipeline's sampling schedule does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .base import ImageConditioning, latent_scale_factor
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


class Lumina2Family(LLMPromptFamily):
    name = "lumina2"
    family_options = ("system_prompt",)
    hub_tags = ("lumina2", "lumina2-diffusers")
    pipeline_class_names = ("Lumina2Pipeline",)
    denoiser_name = "transformer"
    # diffusers' Lumina 2 script's `--lora_layers` default.
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 256,
        }
        for adapter in ("full", "lora")
    }
    max_sequence_length = 256
    system_prompt: str | None = None

    def configure(self, config: DreamBoothConfig) -> None:
        super().configure(config)
        self.system_prompt = config.system_prompt

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation prompts get the training system prompt (None: the pipeline's own, in both)."""
        return {"system_prompt": self.system_prompt}

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One latent patch: the VAE's factor times the transformer's `patch_size` (2)."""
        return latent_scale_factor(configs["vae"]) * configs["transformer"].get("patch_size", 2)

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            system_prompt=self.system_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "prompt_attention_mask": mask}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The velocity `noise - x`: the negated output of the transformer, given Lumina's time `1 - t / 1000` as
        `Lumina2Pipeline` gives it."""
        output = denoiser(
            hidden_states=noisy,
            timestep=1 - timesteps / self.noise_scheduler.config.num_train_timesteps,
            encoder_hidden_states=prompt_embeds["prompt_embeds"],
            # The trainer caches every tensor as float; the rotary embedder counts tokens from the mask.
            encoder_attention_mask=prompt_embeds["prompt_attention_mask"].long(),
            return_dict=False,
        )[0]
        return self.preconditioned(-output, noisy, timesteps)
