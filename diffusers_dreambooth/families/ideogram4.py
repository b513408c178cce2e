"""Ideogram 4: a flow-matching transformer over one packed sequence `[left-padded text | image tokens]`, conditioned
on 13 concatenated Qwen3-VL hidden states per text token; a second, unconditional transformer (frozen here, as in
diffusers' script) is blended with it at sampling.

The objective is that of diffusers' `train_dreambooth_lora_ideogram4.py`:
- sigma is drawn directly from the `--weighting_scheme` density (default `logit_normal`, std 1.5), its mean shifted
  by `0.5 * log(pixels / 512**2)` as the pipeline's schedule is; not from the scheduler's grid. Timesteps are carried
  as `1000 * sigma`. The shift uses `--resolution`'s pixels (with `--aspect_ratio_buckets`, every bucket's mean is
  that of the square resolution: the script shifts per batch).
- latents are the VAE posterior's mode, packed into 2x2 patches (channels ordered patch row, patch column, latent
  channel, as the pipeline unpacks them) and normalised by the VAE's batch-norm statistics. They stay
  `(B, 4C, H/2, W/2)` in the loop; `predict` flattens them into the sequence.
- the transformer reads the time `1 - sigma` and predicts `x - noise`; `predict` returns its negation, the velocity
  `noise - x`, so the loss is the script's and `--precondition_outputs` works as for the other flow families.

Prompts are encoded once by the pipeline's `encode_prompt`; its text part (and the mask of real tokens) is cached,
and `predict` rebuilds the position, segment and indicator ids for each batch's image grid with the pipeline's
`_prepare_ids`, which is what `encode_prompt` returns for that grid.

`--upsample_prompt` (LoRA only, as diffusers' script) loads `--prompt_enhancer_head_id` as the pipeline's
`prompt_enhancer_head` and rewrites every prompt with `Ideogram4Pipeline.upsample_prompt` before it is encoded, as the
script rewrites its instance, class and per-image prompts: at the training resolution's aspect ratio (the script uses
each batch's; with `--aspect_ratio_buckets` the square one here), temperature 1.0, at most 1024 new tokens (the
script's; the caption in its chat template must fit `--max_sequence_length`). Unlike the script, each prompt is
rewritten alone from a generator seeded with `--seed` (0 if unset): its caption depends only on the prompt and the
seed. Class images are generated from the plain class prompt, as in the script. The validation prompt (and the card's
samples) are rewritten by the pipeline itself (`prompt_upsampling=True`) from validation's fixed-seed generator: the
same captions at every validation, one per validation image where the script rewrites once for all.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, Ideogram4Pipeline, Ideogram4PromptEnhancerHead
from diffusers.models.transformers.transformer_ideogram4 import LLM_TOKEN_INDICATOR
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..safeguards import DreamBoothInputError
from .base import ImageConditioning, height_and_width, latent_scale_factor
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

logger = logging.getLogger(__name__)

PATCH_SIZE = 2
#: The pipeline's default guidance for its main steps (`guidance_schedule` is 7.0 for 45 steps, then 3.0).
DEFAULT_GUIDANCE_SCALE = 7.0


class Ideogram4Family(LLMPromptFamily):
    name = "ideogram4"
    # `--disable_training_autocast` (the README's commands): the trainer's Accelerator then autocasts nothing, so the
    # transformer trains in its own dtype on inputs already cast to it, as the pipeline samples (and validates) it.
    family_options = ("disable_training_autocast", "upsample_prompt", "fsdp_text_encoder")
    hub_tags = ("ideogram4", "ideogram4-diffusers")
    pipeline_class_names = ("Ideogram4Pipeline",)
    denoiser_name = "transformer"
    # diffusers' script's default `--lora_layers`: each block's attention projections and feed-forward.
    denoiser_lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    # diffusers' script is LoRA-only; full fine-tuning takes the same values.
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "logit_normal",
            "logit_std": 1.5,  # the script's (the pipeline's schedule)
            "precondition_outputs": 0,
            "max_sequence_length": 2048,
        }
        for adapter in ("full", "lora")
    }

    size = (512, 512)
    pixels = 512 * 512
    guidance_scale = None
    autocast_disabled = False
    #: The generator seed of `--upsample_prompt`'s rewriting; None without it.
    upsample_seed = None
    #: Most new tokens of a rewritten caption: `upsample_prompt`'s default, as diffusers' script calls it.
    upsample_max_new_tokens = 1024

    def configure(self, config: DreamBoothConfig) -> None:
        super().configure(config)
        self.size = height_and_width(config.resolution)
        self.pixels = self.size[0] * self.size[1]
        self.guidance_scale = config.guidance_scale
        self.autocast_disabled = config.disable_training_autocast
        #: `--upsample_prompt`'s caption of each prompt rewritten so far: what is encoded in its place.
        self.captions: dict[str, str] = {}
        self.upsample_seed = None
        if config.upsample_prompt:
            self.attach_prompt_enhancer(config)

    def attach_prompt_enhancer(self, config: DreamBoothConfig) -> None:
        """Load `--prompt_enhancer_head_id` as the pipeline's `prompt_enhancer_head`; refuse a full fine-tune, which
        diffusers' LoRA-only script has no `--upsample_prompt` for (its save would hold the head)."""
        if config.adapter != "lora":
            raise DreamBoothInputError(
                f"`--upsample_prompt` trains LoRA only, as diffusers' Ideogram 4 script; got"
                f" `--adapter {config.adapter}`. Pass `--adapter lora` or remove `--upsample_prompt`."
            )
        source = config.prompt_enhancer_head_id
        try:
            head = Ideogram4PromptEnhancerHead.from_pretrained(source, cache_dir=config.cache_dir)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DreamBoothInputError(
                f"`--prompt_enhancer_head_id={source}`: cannot load an `Ideogram4PromptEnhancerHead` ({reason})."
                " Pass a local folder or Hub id of the head, or remove `--upsample_prompt`."
            ) from error
        self.pipeline.register_modules(prompt_enhancer_head=head.requires_grad_(False))
        self.upsample_seed = 0 if config.seed is None else config.seed

    @contextlib.contextmanager
    def prompt_enhancer_on_device(self) -> Iterator[None]:
        """The head beside the text encoder (its device and dtype) for the block, then back on the CPU. The pipeline's
        cached enhancer holds the text encoder it was built on, which is released and loaded again between uses
        (`IdleModules`): it is dropped after each, and the next use builds it on the encoder loaded then."""
        pipeline = self.pipeline
        pipeline.prompt_enhancer_head.to(pipeline.text_encoder.device, pipeline.text_encoder.dtype)
        try:
            yield
        finally:
            pipeline._prompt_enhancer = pipeline._caption_logits_processor = None
            pipeline.prompt_enhancer_head.to("cpu")

    def upsampled(self, prompts: list[str]) -> list[str]:
        """`prompts` rewritten by `Ideogram4Pipeline.upsample_prompt`, each alone from a generator seeded with
        `upsample_seed`, at the training resolution (its aspect ratio goes into the enhancer's instruction)."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self.captions]
        if missing:
            height, width = self.size
            with self.prompt_enhancer_on_device():
                for prompt in missing:
                    (caption,) = self.pipeline.upsample_prompt(
                        prompt,
                        height=height,
                        width=width,
                        max_new_tokens=self.upsample_max_new_tokens,
                        generator=torch.Generator().manual_seed(self.upsample_seed),
                        device=self.pipeline.text_encoder.device,
                    )
                    logger.info("`--upsample_prompt`: %r is trained as %r", prompt, caption)
                    self.captions[prompt] = caption
        return [self.captions[prompt] for prompt in prompts]

    @contextlib.contextmanager
    def validation_pipeline(self, lora_weights: str | Path | None = None) -> Iterator[DiffusionPipeline]:
        """The trained pipeline; without autocast (`--disable_training_autocast`), its frozen unconditional
        transformer first takes the trained one's base dtype (bf16 under `--mixed_precision bf16`), as the script loads
        both in it: the pipeline casts the inputs of each to its own dtype, and the timestep to the trained one's."""
        if self.autocast_disabled:
            self.pipeline.unconditional_transformer.to(self.denoiser.dtype)
        with self.prompt_enhancer_on_device() if self.upsample_seed is not None else contextlib.nullcontext():
            yield self.pipeline

    def validation_inputs(self) -> dict[str, Any]:
        """`sampling_inputs`; with `--upsample_prompt`, the pipeline rewrites the validation prompt too, as the
        script does, so that validation is conditioned on captions like the trained ones."""
        if self.upsample_seed is None:
            return self.sampling_inputs()
        return {**self.sampling_inputs(), "prompt_upsampling": True}

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation at the training resolution, as diffusers' script validates (the pipeline's default is 2048 px),
        with a constant guidance instead of the pipeline's 48-step schedule, which fails at other step counts:
        `--guidance_scale`, else the schedule's main value (7.0)."""
        height, width = self.size
        inputs = {"height": height, "width": width, "guidance_schedule": None}
        if self.guidance_scale is None:
            inputs["guidance_scale"] = DEFAULT_GUIDANCE_SCALE
        return inputs

    # Components

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents."""
        return latent_scale_factor(configs["vae"]) * PATCH_SIZE

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """`(4 * latent_channels, height / 2f, width / 2f)`: latents packed into 2x2 patches."""
        height, width = height_and_width(resolution)
        side = self.vae_scale_factor * PATCH_SIZE
        return (self.vae.config.latent_channels * PATCH_SIZE**2, height // side, width // side)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text part of `Ideogram4Pipeline.encode_prompt` (left-padded to `--max_sequence_length`) and the mask
        of its real tokens; the image part depends on the grid, and is rebuilt by `predict`. With
        `--upsample_prompt`, those of the prompts' rewritten captions (`upsampled`)."""
        if self.upsample_seed is not None:
            prompts = self.upsampled(prompts)
        length = self.max_sequence_length
        embeds, _, _, indicator = self.pipeline.encode_prompt(
            prompts, grid_h=1, grid_w=1, max_sequence_length=length, device=self.device
        )
        mask = (indicator[:, :length] == LLM_TOKEN_INDICATOR).float()
        return {"prompt_embeds": embeds[:, :length].float(), "prompt_embeds_mask": mask}

    # Images

    def normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per packed channel mean and std, the VAE's batch-norm running statistics (as the pipeline's)."""
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mode (the script's `latent_dist.mode()`), packed and normalised, with zero spread."""
        vae = self.vae
        mode = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist.mode().float()
        latents = pack(mode)
        mean, std = self.normalisation(latents)
        latents = (latents - mean) / std
        return latents, torch.zeros_like(latents)

    def decodable(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised packed latents back to the VAE's `(B, C, H, W)` latents, as the pipeline decodes them."""
        mean, std = self.normalisation(latents)
        return unpack(latents * std + mean)

    # Objective

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """`1000 * sigma`, sigma drawn from the `--weighting_scheme` density around the resolution-shifted mean."""
        sigmas = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean + 0.5 * math.log(self.pixels / 512**2),
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=generator.device,
            generator=generator,
        )
        return sigmas * 1000

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps / 1000).view(-1, 1, 1, 1)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The velocity `noise - x`: the negated transformer output at the image positions of the packed sequence."""
        batch, channels, height, width = noisy.shape
        text = prompt_embeds["prompt_embeds"]
        text_length = text.shape[1]
        lengths = prompt_embeds["prompt_embeds_mask"].sum(dim=1).round().long().tolist()
        position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(
            lengths, height, width, text_length, noisy.device
        )
        features = torch.cat([text, text.new_zeros(batch, height * width, text.shape[2])], dim=1)
        tokens = noisy.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        output = denoiser(
            hidden_states=torch.cat([tokens.new_zeros(batch, text_length, channels), tokens], dim=1),
            timestep=1 - timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=features,
            position_ids=position_ids,
            segment_ids=segment_ids,
            indicator=indicator,
            return_dict=False,
        )[0][:, text_length:]
        velocity = -output.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return self.preconditioned(velocity, noisy, timesteps)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` VAE latents as `(B, 4C, H/2, W/2)` patches, channels ordered (patch row, patch column, C)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return patches.reshape(batch, 4 * channels, height // 2, width // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`."""
    batch, channels, height, width = packed.shape
    patches = packed.view(batch, 2, 2, channels // 4, height, width).permute(0, 3, 4, 1, 5, 2)
    return patches.reshape(batch, channels // 4, height * 2, width * 2)
