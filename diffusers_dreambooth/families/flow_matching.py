"""The rectified-flow objective (Esser et al., 2024) that SD3 and Flux share, as diffusers' scripts for both train it.

Timesteps are drawn from the `--weighting_scheme` density, the noisy input is `(1 - sigma) * x + sigma * noise` and the
target the velocity `noise - x`, or with `--precondition_outputs` the clean latents `x` (EDM, Karras et al., 2022,
Sec. 5); `sigma_sqrt` and `cosmap` weight the loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..safeguards import DreamBoothInputError
from .base import DreamBoothFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


class FlowMatchingFamily(DreamBoothFamily):
    """Base of the flow-matching transformer families; subclasses say how prompts condition the denoiser."""

    noise_scheduler_class = FlowMatchEulerDiscreteScheduler

    # The objective's options until `configure` reads the run's; subclasses set their diffusers script's defaults.
    weighting_scheme = "none"
    logit_mean = 0.0
    logit_std = 1.0
    mode_scale = 1.29
    precondition_outputs = False
    max_sequence_length = 512

    def configure(self, config: DreamBoothConfig) -> None:
        """Take the flow-matching options; reject the DDPM-only `--snr_gamma` and UNet-only `--output_kohya_format`."""
        if config.snr_gamma is not None:
            raise DreamBoothInputError(
                f"`--snr_gamma` (min-SNR weighting) applies to DDPM models; {self.name} trains by flow matching,"
                " weighted by `--weighting_scheme` (`sigma_sqrt` or `cosmap` weight the loss). Remove `--snr_gamma`."
            )
        if config.output_kohya_format:
            raise DreamBoothInputError(
                f"`--output_kohya_format` exports SD 1.x/2.x and SDXL LoRAs only, not {self.name} ones."
            )
        self.weighting_scheme = config.weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = config.logit_mean, config.logit_std, config.mode_scale
        self.precondition_outputs = bool(config.precondition_outputs)
        self.max_sequence_length = config.max_sequence_length
        self.vae_encode_mode = config.vae_encode_mode or "sample"
        self.warn_if_attention_mask_ignored(config)

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

    def preconditioned(self, velocity: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The prediction the loss compares: the velocity, or with `--precondition_outputs` the clean latents it
        implies, `x_t - sigma * v`."""
        if not self.precondition_outputs:
            return velocity
        return noisy - self.sigmas(timesteps).to(velocity.dtype) * velocity
