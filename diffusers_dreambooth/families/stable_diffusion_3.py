"""Stable Diffusion 3: an MMDiT transformer trained by rectified flow (Esser et al., 2024), conditioned on two CLIP
text encoders and an optional T5.

The objective is that of diffusers' `train_dreambooth_sd3.py` and `train_dreambooth_lora_sd3.py`: timesteps drawn
from the `--weighting_scheme` density, the noisy input `(1 - sigma) * x + sigma * noise`, the velocity target
`noise - x`, or with `--precondition_outputs` the clean latents `x`, the prediction then read as `x_t - sigma * v`
(EDM, Karras et al., 2022, Sec. 5), and the scheme's loss weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .base import DreamBoothFamily, ImageConditioning

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

CLIP_TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class StableDiffusion3Family(DreamBoothFamily):
    name = "stable-diffusion-3"
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
    noise_scheduler_class = FlowMatchEulerDiscreteScheduler
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
    logit_mean = 0.0
    logit_std = 1.0
    mode_scale = 1.29
    precondition_outputs = True
    max_sequence_length = 77

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        super().__init__(pipeline)
        if pipeline.text_encoder_3 is None:
            # Saved without T5: train on the CLIP encoders, with zeros for T5's part as the pipeline samples.
            self.text_encoder_names = CLIP_TEXT_ENCODER_NAMES
            self.tokenizer_names = ("tokenizer", "tokenizer_2")

    def configure(self, config: DreamBoothConfig) -> None:
        """Take the flow-matching options; reject the DDPM-only `--snr_gamma` and UNet-only `--output_kohya_format`."""
        if config.snr_gamma is not None:
            raise ValueError(
                "`--snr_gamma` (min-SNR weighting) applies to DDPM models; SD3 trains by flow matching, weighted by"
                " `--weighting_scheme` (`sigma_sqrt` or `cosmap` weight the loss). Remove `--snr_gamma`."
            )
        if config.output_kohya_format:
            raise ValueError("`--output_kohya_format` exports SD 1.x/2.x and SDXL LoRAs only, not SD3 ones.")
        if config.lora_blocks:
            blocks = [int(block) for block in config.lora_blocks.split(",")]
            num_layers = self.denoiser.config.num_layers
            if max(blocks) >= num_layers:
                raise ValueError(
                    f"`--lora_blocks={config.lora_blocks}` names a block the transformer does not have: it has"
                    f" {num_layers}, numbered 0 to {num_layers - 1}."
                )
        self.weighting_scheme = config.weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = config.logit_mean, config.logit_std, config.mode_scale
        self.precondition_outputs = bool(config.precondition_outputs)
        self.max_sequence_length = config.max_sequence_length

    # Components

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.denoiser.config.patch_size

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

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps of the training schedule at `u * num_train_timesteps`, u drawn from the `--weighting_scheme`
        density (`logit_normal`, `mode`; uniform otherwise)."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=generator.device,
            generator=generator,
        )
        steps = self.noise_scheduler.config.num_train_timesteps
        # u = 1 (a sigmoid that rounds up, `mode` at 0) would index past the schedule's end.
        indices = (u * steps).long().clamp(max=steps - 1)
        return self.noise_scheduler.timesteps.to(generator.device)[indices]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise level sigma of each training timestep, shaped `(batch, 1, 1, 1)` to scale latents."""
        schedule = self.noise_scheduler.timesteps.to(timesteps.device)
        indices = (schedule[None, :] == timesteps[:, None]).int().argmax(dim=1)
        return self.noise_scheduler.sigmas.to(timesteps.device)[indices].view(-1, 1, 1, 1)

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(1 - sigma) * latents + sigma * noise`, and the velocity `noise - latents` (the latents when
        preconditioned)."""
        sigmas = self.sigmas(timesteps)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return noisy, latents if self.precondition_outputs else noise - latents

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """`compute_loss_weighting_for_sd3`'s weights for `sigma_sqrt` and `cosmap`; None (uniform) otherwise."""
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas(timesteps)).flatten()

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
        if not self.precondition_outputs:
            return velocity
        return noisy - self.sigmas(timesteps).to(velocity.dtype) * velocity

    # LoRA

    def denoiser_lora_targets(self, config: DreamBoothConfig) -> list[str]:
        """The family's (or `--lora_target_modules`) modules, in the blocks `--lora_blocks` numbers if given."""
        targets = super().denoiser_lora_targets(config)
        if not config.lora_blocks:
            return targets
        blocks = [int(block) for block in config.lora_blocks.split(",")]
        return [f"transformer_blocks.{block}.{name}" for block in blocks for name in targets]
