"""Stable Diffusion XL: two CLIP text encoders and size/crop micro-conditioning (SDXL paper, Sec. 2.2).

EDM-style training (Karras et al., 2022, Sec. 5), as diffusers' `train_dreambooth_lora_sdxl.py` does it: with an EDM
scheduler in the pipeline (Playground v2.5 ships `EDMDPMSolverMultistepScheduler`) always, or with
`--do_edm_style_training` on an SDXL with a discrete scheduler. Timesteps are drawn uniformly from the training
scheduler's `timesteps` (`EDMEulerScheduler`'s preconditioned noise levels, or `EulerDiscreteScheduler`'s steps),
the noisy input is `x + sigma * noise`, the UNet reads it scaled by `c_in`, its output is turned into the clean
latents it implies and regressed onto `x`: with the EDM scheduler's `precondition_outputs` and uniform weights, or
with the epsilon/v formulas and `sigma^-2` weights on Euler sigmas. Latents are normalised with the VAE's
`latents_mean`/`latents_std` where it has them (Playground v2.5), as the script and the pipeline's decoding do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

from ..safeguards import DreamBoothInputError
from .base import DreamBoothFamily, ImageConditioning

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


def is_edm_scheduler(scheduler) -> bool:
    """Whether the pipeline samples with an EDM scheduler (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`): the
    script's test, `"EDM" in` the scheduler's class name."""
    return "EDM" in type(scheduler).__name__


class StableDiffusionXLFamily(DreamBoothFamily):
    name = "stable-diffusion-xl"
    family_options = ("do_edm_style_training",)
    hub_tags = ("stable-diffusion-xl",)
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    textual_inversion_keys = ("clip_l", "clip_g")
    option_defaults = {
        "full": {**DreamBoothFamily.option_defaults["full"], "resolution": 1024},
        "lora": {
            "learning_rate": 1e-4,
            "text_encoder_lr": 5e-6,
            "resolution": 1024,
            "image_interpolation_mode": "lanczos",
            "adam_weight_decay": 1e-4,
        },
    }

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        #: None (DDPM objective), "edm" (an EDM scheduler's preconditioning) or "euler" (`--do_edm_style_training`
        #: on Euler sigmas).
        self.edm_mode = None
        if is_edm_scheduler(pipeline.scheduler):
            self.edm_mode = "edm"
            self.noise_scheduler = EDMEulerScheduler.from_config(pipeline.scheduler.config)

    def configure(self, config: DreamBoothConfig) -> None:
        """`--do_edm_style_training` on a discrete scheduler trains on Euler sigmas; min-SNR needs DDPM's alphas."""
        super().configure(config)
        if config.do_edm_style_training and self.edm_mode is None:
            self.edm_mode = "euler"
            self.noise_scheduler = EulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        if self.edm_mode and config.snr_gamma is not None:
            raise DreamBoothInputError(
                "`--snr_gamma` (min-SNR weighting) needs a DDPM noise schedule; EDM-style training (an EDM scheduler,"
                " or `--do_edm_style_training`) weights the loss by the noise level instead. Remove `--snr_gamma`."
            )

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        """Penultimate hidden states of both encoders, concatenated; pooled output of the second."""
        hidden_states = []
        for ids, encoder in zip(token_ids, text_encoders):
            output = encoder(ids.to(self.device), output_hidden_states=True)
            pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        """SDXL's `time_ids`: original size, crop top-left and target size of every example."""
        target = torch.tensor(image_conditioning.target_size).expand_as(image_conditioning.original_sizes)
        time_ids = torch.cat([image_conditioning.original_sizes, image_conditioning.crops_top_left, target], dim=1)
        pooled = prompt_embeds["pooled_prompt_embeds"]
        return {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)},
        }

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x - latents_mean) * scaling_factor / latents_std` where the VAE has `latents_mean`/`latents_std`
        (Playground v2.5), as the script normalises and the pipeline un-normalises; `x * scaling_factor` otherwise."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return super().encode_image_distribution(pixel_values)
        posterior = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        mean = torch.tensor(config.latents_mean, device=self.device).view(1, -1, 1, 1)
        scale = config.scaling_factor / torch.tensor(config.latents_std, device=self.device).view(1, -1, 1, 1)
        return ((posterior.mean.float() - mean) * scale), (posterior.std.float() * scale)

    # Objective: EDM-style training

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """EDM: the training scheduler's `timesteps` at uniform indices (noise levels, not integer steps)."""
        if not self.edm_mode:
            return super().sample_timesteps(batch_size, generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        indices = torch.randint(0, steps, (batch_size,), generator=generator, device=generator.device)
        return self.noise_scheduler.timesteps.to(generator.device)[indices]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise level sigma of each training timestep, `(batch, 1, 1, 1)` (the script's `get_sigmas`)."""
        schedule = self.noise_scheduler.timesteps.to(timesteps.device)
        indices = (schedule[None, :] == timesteps[:, None]).int().argmax(dim=1)
        return self.noise_scheduler.sigmas.to(timesteps.device)[indices].view(-1, 1, 1, 1)

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM: `x + sigma * noise` (the scheduler's `add_noise`), and the clean latents `x` as the target."""
        if not self.edm_mode:
            return super().noisy_input_and_target(latents, noise, timesteps)
        return latents + self.sigmas(timesteps) * noise, latents

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """EDM: the UNet reads `c_in * x_t`; its output becomes the clean latents it implies (`precondition_outputs`
        of the EDM scheduler, or on Euler sigmas `x_t - sigma * eps` / `x_t / (sigma^2 + 1) - sigma * v /
        sqrt(sigma^2 + 1)`)."""
        if not self.edm_mode:
            return super().predict(denoiser, noisy, timesteps, prompt_embeds, image_conditioning)
        sigmas = self.sigmas(timesteps).to(noisy.dtype)
        if self.edm_mode == "edm":
            model_input = self.noise_scheduler.precondition_inputs(noisy, sigmas)
        else:
            model_input = noisy / (sigmas**2 + 1) ** 0.5
        output = super().predict(denoiser, model_input, timesteps, prompt_embeds, image_conditioning)
        if self.edm_mode == "edm":
            return self.noise_scheduler.precondition_outputs(noisy, output, sigmas)
        if self.prediction_type == "epsilon":
            return output * -sigmas + noisy
        if self.prediction_type == "v_prediction":
            return output * (-sigmas / (sigmas**2 + 1) ** 0.5) + noisy / (sigmas**2 + 1)
        raise DreamBoothInputError(f"EDM-style training predicts epsilon or v, not `{self.prediction_type}`.")

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """EDM: `sigma^-2` on Euler sigmas; uniform with an EDM scheduler (the script skips its weighting there)."""
        if not self.edm_mode:
            return super().loss_weights(timesteps, snr_gamma)
        if self.edm_mode == "edm":
            return None
        return self.sigmas(timesteps).flatten().float() ** -2.0
