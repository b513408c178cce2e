"""Sana (NVIDIA): a linear-attention transformer on the latents of a DC-AE (32x compression), conditioned on Gemma 2's
last hidden states, trained by rectified flow as diffusers' `train_dreambooth_lora_sana.py` trains it.

Prompts are `SanaPipeline.encode_prompt`'s: Gemma 2 reads `--complex_human_instruction` (if given) followed by the
prompt, and the pipeline keeps the first token and the last `--max_sequence_length - 1`, with their attention mask.
As in diffusers' script, training uses no instruction unless one is given, and validation samples with the same
one. The option is one text: its lines are the pipeline's instruction lines (the script passes the string where the
pipeline joins a list, which would put a newline between every character).

Training noise follows diffusers' script: a `FlowMatchEulerDiscreteScheduler` built from the checkpoint's flow-mode
DPM-Solver++ config (unshifted sigmas; the config's `flow_shift` shapes sampling only), the input
`(1 - sigma) * x + sigma * noise`, the velocity `noise - x` as target. The transformer takes the timestep as the
pipeline gives it: `sigma * 1000` times its `timestep_scale`.

`--enable_vae_tiling` tiles the DC-AE's decoding for validation and card samples, as the script's `log_validation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .base import ImageConditioning
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


def dc_ae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side of a DC-AE: it halves the size in each encoder stage after the first."""
    return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)


class SanaFamily(LLMPromptFamily):
    name = "sana"
    family_options = ("complex_human_instruction", "enable_vae_tiling")
    hub_tags = ("sana", "sana-diffusers")
    pipeline_class_names = ("SanaPipeline",)
    denoiser_name = "transformer"
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v")  # diffusers' Sana script's `--lora_layers` default
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 300,
        }
        for adapter in ("full", "lora")
    }
    max_sequence_length = 300
    complex_human_instruction: str | None = None
    enable_vae_tiling = False

    def configure(self, config: DreamBoothConfig) -> None:
        super().configure(config)
        self.complex_human_instruction = config.complex_human_instruction
        self.enable_vae_tiling = config.enable_vae_tiling

    @property
    def instruction_lines(self) -> list[str] | None:
        """`--complex_human_instruction` as the pipeline's list of lines, or None (no instruction)."""
        text = self.complex_human_instruction
        return text.split("\n") if text else None

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation prompts get the training instruction: none unless given (the pipeline's own default is its
        long prompt-enhancing instruction, which the script and training do not use)."""
        return {"complex_human_instruction": self.instruction_lines}

    def validation_inputs(self) -> dict[str, Any]:
        """`--enable_vae_tiling` tiles the DC-AE from the first validation on, with the tiles of diffusers' script
        (1024 px high, 1024 px apart across), as the script does in `log_validation`: class images and the cached
        training latents, made before, are untiled."""
        if self.enable_vae_tiling:
            self.vae.enable_tiling(tile_sample_min_height=1024, tile_sample_stride_width=1024)
        return super().validation_inputs()

    # Components

    @property
    def vae_scale_factor(self) -> int:
        return dc_ae_scale_factor(self.vae.config)

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One latent patch: the DC-AE's factor times the transformer's `patch_size`."""
        return dc_ae_scale_factor(configs["vae"]) * configs["transformer"].get("patch_size", 1)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.instruction_lines,
        )
        return {"prompt_embeds": embeds.float(), "prompt_attention_mask": mask}

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DC-AE's latents (deterministic: a zero std), scaled by its `scaling_factor`, as the script encodes."""
        vae = self.vae
        latents = vae.encode(pixel_values.to(self.device, vae.dtype)).latent.float() * vae.config.scaling_factor
        return latents, torch.zeros_like(latents)

    # Objective

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity, with the timestep and mask `SanaPipeline` gives it."""
        velocity = denoiser(
            noisy,
            encoder_hidden_states=prompt_embeds["prompt_embeds"],
            encoder_attention_mask=prompt_embeds["prompt_attention_mask"],
            timestep=timesteps * self.denoiser.config.timestep_scale,
            return_dict=False,
        )[0]
        return self.preconditioned(velocity, noisy, timesteps)
