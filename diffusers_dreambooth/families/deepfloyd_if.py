"""DeepFloyd IF: a cascade of pixel-space UNets conditioned on a frozen T5 encoder, the open model closest to the
Imagen cascade the DreamBooth paper fine-tuned (64x64 base model, 64 -> 256 super-resolution).

Stage I (`IFPipeline`) has no VAE: the "latents" are the images themselves in [-1, 1], at 64x64 by default. Its UNet
predicts epsilon and a variance (6 output channels, "learned_range"); as diffusers' `train_dreambooth.py` does, only
the epsilon half is regressed, and the trained pipeline samples with a fixed variance (`variance_type="fixed_small"`),
the learned one no longer matching the trained epsilon. T5 can be fine-tuned fully (`--train_text_encoder`), not with
LoRA: diffusers' IF pipelines cannot load a T5 LoRA. Prompts are encoded as `IFPipeline.encode_prompt` does:
lower-cased, 77 T5 tokens, and T5 reads the tokenizer's attention mask.

Stage II (`IFSuperResolutionPipeline`) is fine-tuned on pairs made from the subject's own images (DreamBooth Sec. 4.1,
"super-resolution"): the high-resolution image is the photo at `--resolution` (256 by default); the low-resolution one
is the same photo resized to a quarter of it (stage I's 64), upscaled back bilinearly and noise-augmented with the
pipeline's `image_noising_scheduler` at `--sr_noise_level`, exactly as the pipeline treats stage I's output. The UNet
reads `cat([noisy_high_res, augmented_low_res])` with `class_labels=noise_level`.

The noise-augmentation level. The paper lowers it from 1e-3 to 1e-5 so that the subject's fine detail survives. IF's
level is an integer timestep `t` of the noising scheduler (1000 steps, squared-cosine), which adds noise of variance
`1 - alpha_bar[t]`: 4.1e-5 at `t=0`, 8.7e-5 at 1, 1.9e-3 at 20, 0.15 at IF's sampling default 250. Read as a variance,
1e-5 is below the smallest level IF has; read as continuous diffusion time (Imagen's `aug_level`), 1e-5 is
`t = 0.01`. Either way it maps to `t = 0`, the default of `--sr_noise_level` (the paper's former 1e-3 is `t = 1` as a
time, about 13 as a variance). The trained level is recorded with the subject, and `DreamBoothPipeline` upscales at it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin

from ..safeguards import DreamBoothInputError
from .base import DreamBoothFamily, ImageConditioning, height_and_width

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

#: IF's stage II upsamples 4x (stage I's 64 -> 256): the low-resolution side of a training pair is a quarter.
LOW_RESOLUTION_FACTOR = 4
#: The paper's low noise-augmentation level (1e-5), on IF's integer scale: see the module docstring.
DEFAULT_SR_NOISE_LEVEL = 0
#: IF's pipelines cut prompts at 77 T5 tokens, whatever the tokenizer allows.
IF_MAX_LENGTH = 77
#: Variance types whose UNet output holds a variance half after the epsilon half.
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def low_resolution_condition(images: torch.Tensor, low_resolution: int) -> torch.Tensor:
    """`images` (B, C, H, W) in [-1, 1] resized to `low_resolution` (antialiased bicubic, as photos are downscaled),
    then upscaled back to (H, W) as `IFSuperResolutionPipeline` upscales stage I's output (bilinear, aligned corners).
    """
    low = F.interpolate(images, size=low_resolution, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(low.clamp(-1, 1), size=images.shape[-2:], mode="bilinear", align_corners=True)


def noise_augmentation_moments(
    upscaled: torch.Tensor, image_noising_scheduler: SchedulerMixin, noise_level: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of `image_noising_scheduler.add_noise(upscaled, noise, noise_level)` over the noise: the pipeline's
    noise augmentation is `mean + std * noise`, `mean = sqrt(alpha_bar) * upscaled` and `std = sqrt(1 - alpha_bar)`.
    """
    alpha_bar = image_noising_scheduler.alphas_cumprod.to(upscaled.device, upscaled.dtype)[noise_level]
    return alpha_bar**0.5 * upscaled, ((1 - alpha_bar) ** 0.5).expand_as(upscaled)


class DeepFloydIFFamily(DreamBoothFamily):
    name = "deepfloyd-if"
    hub_tags = ("if", "if-diffusers")
    pipeline_class_names = ("IFPipeline",)
    uses_attention_mask = True
    supports_aspect_ratio_buckets = False  # square pixel stages; stage II's low-resolution side is square too
    # diffusers' `train_dreambooth_lora.py` on IF: the UNet's attention, including the text projections of its
    # added-KV attention; T5's attention projections for the text encoder.
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    text_encoder_lora_target_modules = ("q", "k", "v", "o")
    # diffusers' DreamBooth docs for IF stage I: full fine-tuning at a very low learning rate (1e-7), LoRA at 5e-6.
    option_defaults = {
        "full": {**DreamBoothFamily.option_defaults["full"], "learning_rate": 1e-7, "resolution": 64},
        "lora": {**DreamBoothFamily.option_defaults["lora"], "learning_rate": 5e-6, "resolution": 64},
    }

    def configure(self, config: DreamBoothConfig) -> None:
        """Refuse a pipeline without T5, a T5 LoRA (diffusers' `load_lora_weights` reads CLIP text-encoder LoRAs
        only) and a Kohya export (SD and SDXL UNets only)."""
        super().configure(config)
        if self.pipeline.text_encoder is None:
            raise DreamBoothInputError(
                f"`{type(self.pipeline).__name__}` was loaded without its T5 `text_encoder`, which training needs to"
                " encode the prompts. Load the pipeline with its text encoder."
            )
        if config.output_kohya_format:
            raise DreamBoothInputError(
                f"`--output_kohya_format` exports SD 1.x/2.x and SDXL LoRAs only, not {self.name} ones."
            )
        if config.train_text_encoder and config.adapter == "lora":
            raise DreamBoothInputError(
                f"`--train_text_encoder` with `--adapter lora` is not supported for {self.name}: diffusers'"
                f" `{type(self.pipeline).__name__}.load_lora_weights` cannot load a LoRA of the T5 text encoder, so"
                " nobody could use it. Train the UNet's LoRA alone (drop `--train_text_encoder`), or fine-tune T5 with"
                " `--adapter full`."
            )

    # Components

    @property
    def image_channels(self) -> int:
        """Channels of the images the UNet denoises (3)."""
        return self.denoiser.config.in_channels

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """The UNet's total downsampling: IF works on pixels, without a VAE."""
        return 2 ** (len(configs[cls.denoiser_name]["block_out_channels"]) - 1)

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        return (self.image_channels, *height_and_width(resolution))

    def sample_as_trained(self) -> None:
        """Sample with a fixed variance: training regresses epsilon only, so the learned variance no longer fits."""
        scheduler = self.pipeline.scheduler
        if scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES:
            self.pipeline.scheduler = type(scheduler).from_config(scheduler.config, variance_type="fixed_small")

    # Prompts

    def token_limits(self, max_length: int | None = None) -> list[int]:
        """`max_length` or IF's 77 tokens."""
        return [max_length or IF_MAX_LENGTH]

    def tokenize(self, prompts: list[str], max_length: int | None = None) -> list[torch.Tensor]:
        """T5 ids of the prompts lower-cased and stripped, as IF's pipelines do without `clean_caption`."""
        return super().tokenize([prompt.lower().strip() for prompt in prompts], max_length)

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        """`IFPipeline.encode_prompt`: T5's last hidden states, T5 reading the mask of the padded ids."""
        (ids,), (encoder,) = token_ids, text_encoders
        ids = ids.to(self.device)
        attention_mask = (ids != self.tokenizers[0].pad_token_id).long()
        return {"prompt_embeds": encoder(ids, attention_mask=attention_mask)[0]}

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels themselves, with no spread: a pixel-space model diffuses the image."""
        pixels = pixel_values.to(self.device, torch.float32)
        return pixels, torch.zeros_like(pixels)

    # Objective

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The epsilon half of the UNet's output (its other half is the variance, not trained)."""
        output = super().predict(denoiser, noisy, timesteps, prompt_embeds, image_conditioning)
        return output[:, : self.image_channels]


class DeepFloydIFSuperResolutionFamily(DeepFloydIFFamily):
    """IF stage II: the training sample of an image is its pair, `cat([high_res, augmented_low_res])` (6 channels).

    `encode_image_distribution` returns that pair's distribution: the high-resolution pixels exactly, and the
    noise-augmented low-resolution image as its mean and std, so the trainer's per-example latent noise draws the
    augmentation noise anew each step. Only the high-resolution half is diffused and denoised.
    """

    name = "deepfloyd-if-super-resolution"
    hub_tags = ("if", "if-diffusers", "super-resolution")
    pipeline_class_names = ("IFSuperResolutionPipeline",)
    generates_from_prompt = False
    # diffusers' DreamBooth docs for IF stage II: 256x256, learning rate 5e-6 (full and LoRA).
    option_defaults = {
        adapter: {
            **DreamBoothFamily.option_defaults[adapter],
            "learning_rate": 5e-6,
            "resolution": 256,
            "sr_noise_level": DEFAULT_SR_NOISE_LEVEL,
        }
        for adapter in ("full", "lora")
    }

    sr_noise_level = DEFAULT_SR_NOISE_LEVEL

    def configure(self, config: DreamBoothConfig) -> None:
        """Stage I's checks, and `--sr_noise_level` checked against the pipeline's noising scheduler."""
        super().configure(config)
        steps = self.pipeline.image_noising_scheduler.config.num_train_timesteps
        if not 0 <= config.sr_noise_level < steps:
            raise DreamBoothInputError(
                f"`--sr_noise_level={config.sr_noise_level}` must be a timestep of the pipeline's"
                f" `image_noising_scheduler`, from 0 to {steps - 1}; the DreamBooth paper's low level is 0."
            )
        self.sr_noise_level = config.sr_noise_level

    def sampling_inputs(self) -> dict[str, Any]:
        """Upscale at the noise-augmentation level the stage was trained at."""
        return {"noise_level": self.sr_noise_level}

    # Components

    @property
    def image_channels(self) -> int:
        """The UNet reads the noisy image and the upscaled low-resolution one side by side: half its input."""
        return self.denoiser.config.in_channels // 2

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """The UNet's downsampling and the 4x low-resolution side of a pair."""
        return math.lcm(super().resolution_multiple_of(configs), LOW_RESOLUTION_FACTOR)

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        return (2 * self.image_channels, *height_and_width(resolution))

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair: high-res pixels (no spread), the low-res condition as its noise augmentation's mean and std."""
        pixels, spread = super().encode_image_distribution(pixel_values)
        upscaled = low_resolution_condition(pixels, pixels.shape[-1] // LOW_RESOLUTION_FACTOR)
        mean, std = noise_augmentation_moments(upscaled, self.pipeline.image_noising_scheduler, self.sr_noise_level)
        return torch.cat([pixels, mean], dim=1), torch.cat([spread, std], dim=1)

    # Objective

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's input `cat([noisy_high_res, augmented_low_res])` and the high-res noise as target."""
        high_res, augmented = latents.split(self.image_channels, dim=1)
        noisy, target = super().noisy_input_and_target(high_res, noise[:, : self.image_channels], timesteps)
        return torch.cat([noisy, augmented], dim=1), target

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        """The text, and `class_labels`: the noise-augmentation level of the low-resolution input."""
        embeds = prompt_embeds["prompt_embeds"]
        noise_level = torch.full((embeds.shape[0],), self.sr_noise_level, device=embeds.device, dtype=torch.long)
        return {"encoder_hidden_states": embeds, "class_labels": noise_level}
