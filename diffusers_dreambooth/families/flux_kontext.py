"""FLUX.1 Kontext: Flux's transformer reading the noisy target's packed latents followed by a condition image's, as
diffusers' `train_dreambooth_lora_flux_kontext.py` trains it.

Two ways, as that script: on subject photos alone (no `--cond_image_column`) it trains exactly as Flux (one packed
sequence); on (condition, target) pairs of a `--dataset_name` (`--image_column`, `--cond_image_column`,
`--caption_column`) each example's sample holds the target latents and the condition latents as twice the channels
(`sample_shape`, `encode_image_distribution`). Only the target half is noised; `predict` packs both, marks the
condition's position ids as a second image (first id 1, as `FluxKontextPipeline.prepare_latents`), runs the
transformer on the concatenated sequence, and returns the prediction of the target tokens only.

Latents are the VAE posterior's mode by default (`--vae_encode_mode mode`, the script's and the pipeline's).
Sampling (class, validation images) is at the training resolution's area (`max_area`), and `--validation_image` is
edited at the training size, where the pipeline would otherwise work at 1024x1024.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxKontextPipeline
from PIL import ImageOps

from ..data import RESAMPLING, load_image
from ..safeguards import DreamBoothInputError
from .base import ImageConditioning
from .flux import FluxFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    family_options = ("cond_image_column", "validation_image")
    # The script's card tags `flux` and `flux-kontextflux-diffusers` (a missing comma joins `flux-kontext` and
    # `flux-diffusers`); these are the tags it means.
    hub_tags = ("flux", "flux-kontext", "flux-diffusers")
    pipeline_class_names = ("FluxKontextPipeline",)
    # The script is LoRA-only; a full fine-tune takes the same values.
    option_defaults = {
        adapter: {**FluxFamily.option_defaults["lora"], "vae_encode_mode": "mode"} for adapter in ("full", "lora")
    }

    conditioned = False
    sampling_size = 1024
    validation_image = None

    def configure(self, config: DreamBoothConfig) -> None:
        """Flux's options; whether examples carry condition images; the validation image and sampling size."""
        super().configure(config)
        self.conditioned = config.cond_image_column is not None
        self.sampling_size = config.resolution
        self.validation_image = None
        if config.validation_image:
            try:
                image = load_image(config.validation_image)
            except (OSError, ValueError) as error:
                raise DreamBoothInputError(f"`--validation_image={config.validation_image}`: {error}") from error
            size = (config.resolution, config.resolution)
            self.validation_image = ImageOps.fit(image, size, RESAMPLING[config.image_interpolation_mode])

    def sampling_inputs(self) -> dict[str, Any]:
        """Images at the training resolution's area (the pipeline's default is 1024 px whatever the model)."""
        return {"max_area": self.sampling_size**2}

    def validation_inputs(self) -> dict[str, Any]:
        """With `--validation_image`, that image (cut to the training square, as conditions are in training)
        edited."""
        inputs = self.sampling_inputs()
        if self.validation_image is not None:
            inputs.update(image=self.validation_image, _auto_resize=False)
        return inputs

    # Images

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """Flux's latents; with condition images, the target's channels then the condition's."""
        channels, height, width = super().sample_shape(resolution)
        return (2 * channels if self.conditioned else channels, height, width)

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's posterior, and an image-to-image example's condition's (its last 3 pixel channels) after it."""
        encode = super().encode_image_distribution
        parts = [encode(part) for part in pixel_values.split(3, dim=1)]
        return torch.cat([mean for mean, _ in parts], dim=1), torch.cat([std for _, std in parts], dim=1)

    # Objective

    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target latents and condition latents (None without condition images) of a sample."""
        if not self.conditioned:
            return latents, None
        target, condition = latents.chunk(2, dim=1)
        return target, condition

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux's noisy target and velocity; the condition latents stay clean beside the noisy target."""
        target_latents, condition = self.split(latents)
        noisy, target = super().noisy_input_and_target(target_latents, self.split(noise)[0], timesteps)
        if condition is None:
            return noisy, target
        return torch.cat([noisy, condition.to(noisy.dtype)], dim=1), target

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The velocity of the target tokens, `(B, C, H, W)`, read with the condition tokens after them."""
        noisy, condition = self.split(noisy)
        batch, _, height, width = noisy.shape
        ids = FluxKontextPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        hidden_states = self.pack(noisy)
        if condition is not None:
            condition_ids = FluxKontextPipeline._prepare_latent_image_ids(
                batch, condition.shape[2] // 2, condition.shape[3] // 2, noisy.device, noisy.dtype
            )
            condition_ids[..., 0] = 1  # the pipeline's mark of the condition image
            hidden_states = torch.cat([hidden_states, self.pack(condition)], dim=1)
            ids = torch.cat([ids, condition_ids], dim=0)
        packed = denoiser(
            hidden_states=hidden_states,
            timestep=timesteps / 1000,  # the transformer scales it back by 1000
            guidance=self.guidance(batch),
            img_ids=ids,
            return_dict=False,
            **self.denoiser_kwargs(prompt_embeds, image_conditioning),
        )[0]
        packed = packed[:, : (height // 2) * (width // 2)]  # the target's tokens come first
        return self.preconditioned(self.unpack(packed, height, width), noisy, timesteps)
