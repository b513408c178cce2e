"""The per-family contract: what the one training loop asks of a model family.

A family says which pipeline attributes are the denoiser, text encoders and tokenizers, how prompts and images are
encoded, how the noisy input and the regression target are built, and which modules LoRA targets. Everything else
(data, prior images, the loop, checkpoints, saving) is family-agnostic and lives in the trainer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, SchedulerMixin
from peft.utils import get_peft_model_state_dict

from ..losses import snr_loss_weights
from ..safeguards import DreamBoothInputError
from ..validation import load_validation_image

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

logger = logging.getLogger(__name__)

#: Options of flow-matching families (SD3, Flux) that DDPM families ignore; unset (None) unless given or defaulted.
FLOW_MATCHING_OPTIONS = ("weighting_scheme", "precondition_outputs", "max_sequence_length")


def height_and_width(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """`(height, width)` of a training image: a `resolution` square, or an aspect-ratio bucket as it is."""
    return (resolution, resolution) if isinstance(resolution, int) else resolution


def latent_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side: the VAE halves the size in each block after the first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@dataclass
class ImageConditioning:
    """Per-example facts about how an image was cropped, for families that condition on them (SDXL)."""

    original_sizes: torch.Tensor  # (batch, 2): height, width before resizing
    crops_top_left: torch.Tensor  # (batch, 2): top, left of the crop in the resized image
    target_size: tuple[int, int]


class DreamBoothFamily:
    """Base of the per-family adapters; subclasses set class attributes and override a few hooks.

    The defaults implement a latent-diffusion model trained with the DDPM objective (epsilon or v-prediction, read
    from the pipeline's scheduler config), as in Stable Diffusion 1.x/2.x.
    """

    #: Short name used in cards, configs and error messages.
    name: ClassVar[str]
    #: Options of `DreamBoothConfig` that only some families' scripts have and this family reads; another family
    #: refuses them when set (`input_checks.check_family_options`) rather than ignore them.
    family_options: ClassVar[tuple[str, ...]] = ()
    #: Hub tags of its model cards beside `dreambooth` and `diffusers` (as diffusers' script for the family tags them).
    hub_tags: ClassVar[tuple[str, ...]] = ()
    #: Names of the diffusers pipeline classes this family trains.
    pipeline_class_names: ClassVar[tuple[str, ...]]
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    denoiser_lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_lora_target_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    #: Keys of each text encoder's embeddings in a pivotal-tuning file (diffusers' advanced scripts: `clip_l`,
    #: `clip_g`); empty where `--train_text_encoder_ti` is not supported.
    textual_inversion_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether the pipeline generates from a prompt alone: class, validation and sample images are drawn with it.
    #: False for pipelines that also need an input image (super-resolution); those images must then be supplied.
    generates_from_prompt: ClassVar[bool] = True
    #: Whether `--aspect_ratio_buckets` can train it: its samples may be any (height, width) multiple of
    #: `resolution_multiple`. False for DeepFloyd IF, whose stages are trained and cascaded at square sizes.
    supports_aspect_ratio_buckets: ClassVar[bool] = True
    #: Whether frozen text encoders leave memory once their embeddings are cached even on a GPU, loaded again only for
    #: sampling (`idle_modules.releases_text_encoders`): worth a reload for LLM encoders of many GB; CLIP waits on the
    #: CPU (off a GPU every family's encoders are released).
    releases_frozen_text_encoders: ClassVar[bool] = False
    #: Whether the text encoder reads the tokenizer's attention mask, as the pipeline does (T5 in DeepFloyd IF).
    uses_attention_mask: ClassVar[bool] = False
    #: The training copy of the pipeline's scheduler, built from its config (the pipeline's own keeps sampling).
    noise_scheduler_class: ClassVar[type[SchedulerMixin]] = DDPMScheduler
    #: The latent an image trains on (`--vae_encode_mode`): a `sample` of the VAE posterior, or its `mode` (the
    #: posterior mean, std 0); `configure` takes the run's.
    vae_encode_mode: str = "sample"
    #: Defaults of options left unset (None), per adapter: those of diffusers' script for this family and mode.
    option_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "full": {
            "learning_rate": 5e-6,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-2,
        },
        "lora": {
            "learning_rate": 5e-4,
            "resolution": 512,
            "image_interpolation_mode": "lanczos",
            "adam_weight_decay": 1e-2,
        },
    }

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline
        self.noise_scheduler = self.noise_scheduler_class.from_config(pipeline.scheduler.config)

    def configure(self, config: DreamBoothConfig) -> None:
        """Take the run's options that this family's objective depends on; raise on options it cannot train with.

        The trainer calls it once the family's defaults are in `config`, before any image is generated or encoded.
        """
        if config.lora_blocks:
            raise DreamBoothInputError(
                f"`--lora_blocks` numbers the transformer blocks of SD3-style models; {self.name} has a"
                f" `{self.denoiser_name}`. Choose its layers with `--lora_target_modules` instead."
            )
        ignored = [f"`--{name}`" for name in FLOW_MATCHING_OPTIONS if getattr(config, name) is not None]
        if ignored:
            names = ", ".join(ignored)
            logger.warning("%s ignored: flow-matching options (SD3, Flux) do not apply to %s.", names, self.name)
        self.warn_if_attention_mask_ignored(config)
        self.vae_encode_mode = config.vae_encode_mode or "sample"
        if config.sr_noise_level is not None and "sr_noise_level" not in self.option_defaults[config.adapter]:
            logger.warning("`--sr_noise_level` ignored: it applies to super-resolution stages, not to %s.", self.name)
        if not self.generates_from_prompt:
            self.check_prompt_only_sampling_unused(config)
        else:
            for name in ("validation_images", "class_labels_conditioning"):
                if getattr(config, name):
                    raise DreamBoothInputError(
                        f"`--{name}` is diffusers' option for DeepFloyd IF stage II (super-resolution); {self.name}"
                        " samples from prompts alone. Remove it."
                    )

    def check_prompt_only_sampling_unused(self, config: DreamBoothConfig) -> None:
        """Refuse what would sample this image-conditioned stage from a prompt alone; validation needs its images."""
        if config.evaluate:
            raise DreamBoothInputError(
                f"`--evaluate` samples the pipeline from prompts alone, but `{type(self.pipeline).__name__}` also"
                " needs an input image. Remove it; evaluate the cascade that feeds this stage."
            )
        if config.validation_prompt and not config.validation_images:
            raise DreamBoothInputError(
                f"`--validation_prompt` needs `--validation_images` with `{type(self.pipeline).__name__}`: it upscales"
                " images, so pass the low-resolution images to upscale (as diffusers' IF stage II command does)."
            )
        for path in config.validation_images or []:
            load_validation_image(path)  # a missing or unreadable file fails now, not at the first validation
        if config.class_labels_conditioning not in (None, "timesteps"):
            raise DreamBoothInputError(
                f"`--class_labels_conditioning={config.class_labels_conditioning}`: diffusers' scripts know only"
                " `timesteps`. Remove it: this stage is conditioned on `--sr_noise_level`."
            )
        if config.class_labels_conditioning:
            logger.warning(
                "`--class_labels_conditioning timesteps` is accepted but not followed: %s is conditioned on the"
                " noise level of its low-resolution input (`--sr_noise_level`), as the pipeline samples it, rather"
                " than on the diffusion timestep as diffusers' train_dreambooth.py does.",
                self.name,
            )

    def sampling_inputs(self) -> dict[str, Any]:
        """Extra arguments of the pipeline's call that make sampling match training (stage II: its noise level; an
        LLM family: its prompt template options), for every image drawn: class images, validation, card samples and
        evaluation."""
        return {}

    def validation_inputs(self) -> dict[str, Any]:
        """`sampling_inputs`, plus what validation and card samples alone take (FLUX.1 Kontext: the image to edit)."""
        return self.sampling_inputs()

    @contextlib.contextmanager
    def validation_pipeline(self, lora_weights: str | Path | None = None) -> Iterator[DiffusionPipeline]:
        """The pipeline that validation images and card samples are drawn with, for the duration of the block: the
        trained one. Krea 2 with `--validation_model_path` draws them from that checkpoint carrying the adapter
        trained so far, or the saved one in the folder `lora_weights` (the card samples after the final save)."""
        yield self.pipeline

    def warn_if_attention_mask_ignored(self, config: DreamBoothConfig) -> None:
        if config.text_encoder_use_attention_mask and not self.uses_attention_mask:
            logger.warning(
                "`--text_encoder_use_attention_mask` is ignored: it applies to T5 encoders read with their mask"
                " (DeepFloyd IF); %s's pipeline encodes prompts without a mask, and training does the same.",
                self.name,
            )

    # Components

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, name) for name in self.text_encoder_names]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self.pipeline, name) for name in self.tokenizer_names]

    @property
    def vae(self) -> torch.nn.Module | None:
        """The VAE whose latents are diffused, or None for a pixel-space model (DeepFloyd IF)."""
        return getattr(self.pipeline, "vae", None)

    @property
    def vae_scale_factor(self) -> int:
        return latent_scale_factor(self.vae.config)

    @property
    def resolution_multiple(self) -> int:
        """What the training resolution must be a multiple of: the pixel size of one latent (or one latent patch)."""
        configs = {self.denoiser_name: self.denoiser.config}
        if self.vae is not None:
            configs["vae"] = self.vae.config
        return self.resolution_multiple_of(configs)

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """`resolution_multiple` from the components' configs (`vae`, and the denoiser under its `denoiser_name`), so
        that a local model folder's `config.json` files can be checked before any weights load."""
        return latent_scale_factor(configs["vae"])

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """`(channels, height, width)` of one training example's sample, as `encode_image_distribution` returns it,
        and of the noise the trainer draws for it: the VAE latents of a `resolution`-sized square image by default,
        or of a `(height, width)` image (an aspect-ratio bucket)."""
        height, width = height_and_width(resolution)
        factor = self.vae_scale_factor
        return (self.vae.config.latent_channels, height // factor, width // factor)

    def check_sample_size(self, height: int, width: int) -> None:
        """Raise if the denoiser cannot train on a `height` x `width` pixel image (an aspect-ratio bucket); any size
        that is a multiple of `resolution_multiple` by default."""

    def sample_as_trained(self) -> None:
        """Make the pipeline sample as the trained model predicts; the trainer calls it once class images exist, and
        `DreamBoothPipeline` after applying a LoRA. Nothing to do unless a family trains only part of the model's
        output (DeepFloyd IF: epsilon, not the variance)."""

    def trained_text_encoder_names(self, adapter: str) -> tuple[str, ...]:
        """The text encoders that `--train_text_encoder` trains with this adapter (`full` or `lora`): all of them."""
        return self.text_encoder_names

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    # Prompts

    def token_limits(self, max_length: int | None = None) -> list[int]:
        """The length each tokenizer's ids are padded and truncated to: `max_length`, or the tokenizer's own."""
        return [max_length or tokenizer.model_max_length for tokenizer in self.tokenizers]

    def tokenize(self, prompts: list[str], max_length: int | None = None) -> list[torch.Tensor]:
        """Token ids of `prompts` for each tokenizer, padded to its `token_limits`."""
        return [
            tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
            for tokenizer, limit in zip(self.tokenizers, self.token_limits(max_length))
        ]

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        """Text conditioning for the denoiser; `text_encoders` may be the accelerate-wrapped modules."""
        (ids,), (encoder,) = token_ids, text_encoders
        return {"prompt_embeds": encoder(ids.to(self.device))[0]}

    def step_prompt_embeds(self, prompt_embeds: dict, is_prior: torch.Tensor, generator: torch.Generator) -> dict:
        """The conditioning one training step uses, from its examples' `prompt_embeds` (`is_prior` marks class
        examples; `generator` is the step's, drawn after its noise and timesteps): unchanged by default; FLUX.2
        [klein]'s `--caption_dropout` swaps in the empty prompt's embeddings here."""
        return prompt_embeds

    @torch.no_grad()
    def encode_frozen_prompts(self, prompts: list[str], max_length: int | None = None) -> dict:
        """Text conditioning of `prompts` by the frozen text encoders, which the trainer caches once: `encode_prompt`
        of their `tokenize` ids here; LLM families (`llm.LLMPromptFamily`) call the pipeline's own `encode_prompt`."""
        return self.encode_prompt(self.tokenize(prompts, max_length), self.text_encoders)

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, already shifted and scaled into the denoiser's latent space; the std is
        0 with `--vae_encode_mode mode` (the trainer's latent `mean + std * noise` is then the posterior's mode).

        Pixels of an image-to-image example (`--cond_image_column`) carry its condition image as 3 more channels
        (`data.crop_and_flip`); only families that read condition images (FLUX.1 Kontext) split and encode them.
        """
        if pixel_values.shape[1] > 3:
            raise DreamBoothInputError(
                f"`--cond_image_column`: {self.name} does not read condition images (image-to-image training is"
                " FLUX.1 Kontext's). Remove the option."
            )
        vae = self.vae
        posterior = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = vae.config.scaling_factor
        std = torch.zeros_like(posterior.std) if self.vae_encode_mode == "mode" else posterior.std
        return ((posterior.mean - shift) * scale).float(), (std * scale).float()

    # Objective

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (batch_size,), generator=generator, device=generator.device).long()

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward-diffused latents and what the denoiser must predict from them."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise DreamBoothInputError(
            f"The base model's scheduler has `prediction_type={self.prediction_type!r}`; DreamBooth training"
            " supports `epsilon` and `v_prediction`."
        )

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-example loss weights (min-SNR when `snr_gamma` is set), or None for uniform weights."""
        if snr_gamma is None:
            return None
        return snr_loss_weights(self.noise_scheduler, timesteps, snr_gamma, self.prediction_type)

    def denoiser_kwargs(self, prompt_embeds: dict, image_conditioning: ImageConditioning) -> dict:
        """Conditioning keyword arguments of the denoiser's forward, beyond sample and timestep."""
        return {"encoder_hidden_states": prompt_embeds["prompt_embeds"]}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        kwargs = self.denoiser_kwargs(prompt_embeds, image_conditioning)
        return denoiser(noisy, timesteps, return_dict=False, **kwargs)[0]

    # LoRA

    def denoiser_lora_targets(self, config: DreamBoothConfig) -> list[str]:
        """Module names that get LoRA in the denoiser: `--lora_target_modules`, else the family's attention layers."""
        if config.lora_target_modules:
            return [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
        return list(self.denoiser_lora_target_modules)

    def save_lora_weights(self, directory: str, modules: dict[str, torch.nn.Module]) -> None:
        """Write `pytorch_lora_weights.safetensors` with diffusers' `save_lora_weights`, for `load_lora_weights`.

        Keys keep PEFT's names (`unet.<module>.lora_A.weight`), as diffusers' SD3 and Flux scripts save them; every
        diffusers LoRA loader reads them, and resuming loads them back without conversion. One exception: a text
        encoder's DoRA magnitudes are saved as `<module>.lora_magnitude_vector.weight`, the parameter's own name.

        `modules` maps pipeline attribute names (`unet` or `transformer`, `text_encoder`, ...) to the modules holding
        PEFT adapters; each becomes the `{name}_lora_layers` argument of the pipeline's `save_lora_weights`.
        """
        kwargs = {}
        for name, module in modules.items():
            state_dict = get_peft_model_state_dict(module)
            if name in self.text_encoder_names:
                # peft's key mapping in transformers' `load_adapter` only loads a DoRA magnitude saved with `.weight`.
                state_dict = {
                    f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value
                    for key, value in state_dict.items()
                }
            kwargs[f"{name}_lora_layers"] = state_dict
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        type(self.pipeline).save_lora_weights(directory, **kwargs)

    # Helpers

    @property
    def device(self) -> torch.device:
        # Not `ModelMixin.device`: it walks every submodule for offloading hooks, 3 ms a step for the toy UNet.
        return next(self.denoiser.parameters()).device
