"""FLUX.2 (Black Forest Labs): [dev] (`Flux2Pipeline`, a Mistral3 text encoder, guidance-distilled) and [klein]
(`Flux2KleinPipeline`, a Qwen3 text encoder, no guidance embedding), trained as diffusers'
`train_dreambooth_lora_flux2.py` and `train_dreambooth_lora_flux2_klein.py` train them.

What both share (`Flux2Family`):
- Latents: the VAE's posterior mode (the scripts take `latent_dist.mode()`), patchified into 2x2 patches
  (`_patchify_latents`: `4C` channels at half the size) and normalised by the VAE's batch-norm running statistics,
  `(x - mean) / sqrt(var + eps)`, the inverse of what the pipeline does before decoding. The training loop sees these
  `(B, 4C, H/2, W/2)` latents; `predict` packs them into the transformer's sequence (`_pack_latents`) with 4-axis
  position ids (`_prepare_latent_ids`, `_prepare_text_ids`) and unpacks its output (`_unpack_latents_with_ids`).
- Objective: rectified flow (`FlowMatchingFamily`), uniform timesteps and unweighted velocity loss by default.
- Prompts: the pipeline's own `encode_prompt` (its chat template, system message, `--max_sequence_length` tokens
  padded), stacking the hidden states of `--text_encoder_out_layers` (FLUX.2 [dev]: 10 20 30, as the script and the
  pipeline; [klein]: 9 18 27, the pipeline's, where diffusers' klein script passes 10 20 30 to `encode_prompt` and so
  trains on other layers than its pipeline samples with). The layers are passed to the pipeline at validation too.
- Guidance: `--guidance_scale` (3.5, the scripts' default) for every example when the transformer embeds guidance
  ([dev]); [klein] has no guidance embedding, and its pipeline uses `--guidance_scale` as classifier-free guidance.

[klein] also takes `--caption_dropout` as its script does: each subject example of a step is trained on the empty
prompt's embeddings with that probability (drawn from the step's seeded generator; class examples never).

Loading without torchvision: FLUX.2 [dev]'s `tokenizer` component is a `PixtralProcessor`, which transformers loads
only with torchvision installed. Training reads only its tokenizer (`apply_chat_template`), so when the processor
cannot be loaded, `pipeline_loading.load_base_pipeline` loads the tokenizer of that folder alone
(`AutoTokenizer`). Install torchvision for the full processor, which image-conditioned sampling
(`Flux2Pipeline(image=...)`) and prompt upsampling (`caption_upsample_temperature`) need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from ..remote_text_encoder import remote_text_encoder_for, use_remote_text_encoder
from ..safeguards import DreamBoothInputError
from .base import ImageConditioning, height_and_width, latent_scale_factor
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

#: `--guidance_scale` default of diffusers' FLUX.2 scripts.
DEFAULT_GUIDANCE_SCALE = 3.5


def flux2_option_defaults(out_layers: list[int]) -> dict[str, dict[str, Any]]:
    """The defaults of diffusers' FLUX.2 LoRA scripts (also used for full fine-tuning, which they lack)."""
    return {
        adapter: {
            "learning_rate": 1e-4,
            "text_encoder_lr": 5e-6,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 512,
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "text_encoder_out_layers": out_layers,
        }
        for adapter in ("full", "lora")
    }


class Flux2Family(LLMPromptFamily):
    """What FLUX.2 [dev] and [klein] share; subclasses name the pipeline and the default text-encoder layers."""

    denoiser_name = "transformer"
    # The scripts' `--lora_layers` default: the attention projections of the double-stream blocks (the single-stream
    # blocks fuse theirs into `to_qkv_mlp_proj`, which `--lora_layers` can name).
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    pipeline_class: ClassVar[type[Flux2Pipeline]] = Flux2Pipeline
    #: Whether `--caption_dropout` is this model's option (diffusers' klein script's).
    drops_captions: ClassVar[bool] = False

    guidance_scale = DEFAULT_GUIDANCE_SCALE
    text_encoder_out_layers: tuple[int, ...] = ()
    caption_dropout = 0.0

    def configure(self, config: DreamBoothConfig) -> None:
        """The flow-matching options, the training guidance, the text-encoder layers (checked against its depth)."""
        if config.caption_dropout and not self.drops_captions:
            raise DreamBoothInputError(
                f"`--caption_dropout` is an option of diffusers' FLUX.2 [klein] script, not {self.name}'s. Remove it."
            )
        if not 0.0 <= config.caption_dropout < 1.0:
            raise DreamBoothInputError(f"`--caption_dropout={config.caption_dropout}` must be in [0, 1).")
        super().configure(config)
        self.guidance_scale = config.guidance_scale
        self.caption_dropout = config.caption_dropout
        self.text_encoder_out_layers = tuple(config.text_encoder_out_layers)
        if self.text_encoders[0] is not None:  # else `--remote_text_encoder`: its answers are checked as they come
            self.check_text_encoder_out_layers()

    def check_text_encoder_out_layers(self) -> None:
        """Refuse `--text_encoder_out_layers` the text encoder does not have or the transformer cannot read."""
        encoder_config = self.text_encoders[0].config
        encoder_config = getattr(encoder_config, "text_config", encoder_config)
        depth, layers = encoder_config.num_hidden_layers, self.text_encoder_out_layers
        given = f"`--text_encoder_out_layers {' '.join(map(str, layers))}`"
        if not all(0 <= k <= depth for k in layers):
            raise DreamBoothInputError(
                f"{given}: the text encoder has {depth} layers, so its hidden states are numbered 0 to {depth}."
            )
        width = self.denoiser.config.joint_attention_dim
        if len(layers) * encoder_config.hidden_size != width:
            raise DreamBoothInputError(
                f"{given}: the transformer reads {width // encoder_config.hidden_size} stacked hidden states"
                f" ({width} values per token), not {len(layers)}."
            )

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation samples with the text-encoder layers and sequence length the model is trained with."""
        return {
            "text_encoder_out_layers": self.text_encoder_out_layers,
            "max_sequence_length": self.max_sequence_length,
        }

    # Components

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents."""
        return latent_scale_factor(configs["vae"]) * 2

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """Patchified latents: `4C` channels at half the latent size."""
        height, width = height_and_width(resolution)
        factor = self.vae_scale_factor * 2
        return (self.vae.config.latent_channels * 4, height // factor, width // factor)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`encode_prompt`'s embeddings (padded to `--max_sequence_length`, so one length for all prompts); with
        `--caption_dropout`, the empty prompt's too, kept for `step_prompt_embeds`."""
        embeds = self.encode_with_pipeline(prompts)
        width = self.denoiser.config.joint_attention_dim
        if embeds.shape[-1] != width:
            raise DreamBoothInputError(
                f"The prompt embeddings have {embeds.shape[-1]} values per token, but the transformer reads {width}"
                " (`joint_attention_dim`): `--remote_text_encoder` serves FLUX.2 [dev] itself, not this model."
            )
        if self.caption_dropout:
            self.empty_prompt_embeds = self.encode_with_pipeline([""])[0].to(self.device)
        return {"prompt_embeds": embeds}

    def encode_with_pipeline(self, prompts: list[str]) -> torch.Tensor:
        encoder = self.text_encoders[0]
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device if encoder is None else next(encoder.parameters()).device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return prompt_embeds.float()

    def step_prompt_embeds(
        self, prompt_embeds: dict, is_prior: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """`--caption_dropout`: each subject example's embeddings become the empty prompt's with that probability."""
        if not self.caption_dropout:
            return prompt_embeds
        drop = torch.rand(len(is_prior), generator=generator, device=generator.device) < self.caption_dropout
        drop = (drop.to(is_prior.device) & ~is_prior).view(-1, 1, 1)
        embeds = prompt_embeds["prompt_embeds"]
        empty = self.empty_prompt_embeds.to(embeds.device, embeds.dtype)
        return {**prompt_embeds, "prompt_embeds": torch.where(drop, empty, embeds)}

    # Images

    def normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of patchified latents, from the VAE's batch-norm running statistics (as the pipeline's)."""
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mode, patchified and normalised, with zero spread: diffusers' FLUX.2 scripts train on
        `latent_dist.mode()`, not on samples."""
        vae = self.vae
        mode = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist.mode()
        latents = self.pipeline_class._patchify_latents(mode.float())
        mean, std = self.normalisation(latents)
        latents = (latents - mean) / std
        return latents, torch.zeros_like(latents)

    def decodable(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified latents back to the VAE's latents, as the pipeline does before decoding."""
        mean, std = self.normalisation(latents)
        return self.pipeline_class._unpatchify_latents(latents * std + mean)

    # Objective

    def guidance(self, batch_size: int) -> torch.Tensor | None:
        """`--guidance_scale` for each example when the transformer embeds guidance ([dev]), else None ([klein])."""
        if not self.denoiser.config.guidance_embeds:
            return None
        return torch.full((batch_size,), self.guidance_scale, device=self.device)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity on the packed noisy latents, unpacked to `(B, 4C, H, W)` by position id."""
        pipeline_class = self.pipeline_class
        embeds = prompt_embeds["prompt_embeds"]
        image_ids = pipeline_class._prepare_latent_ids(noisy).to(noisy.device)
        packed = pipeline_class._pack_latents(noisy)
        velocity = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # the transformer scales it back by 1000
            guidance=self.guidance(noisy.shape[0]),
            encoder_hidden_states=embeds,
            txt_ids=pipeline_class._prepare_text_ids(embeds).to(noisy.device),
            img_ids=image_ids,
            return_dict=False,
        )[0][:, : packed.shape[1]]
        velocity = pipeline_class._unpack_latents_with_ids(velocity, image_ids)
        return self.preconditioned(velocity, noisy, timesteps)


class Flux2DevFamily(Flux2Family):
    name = "flux2"
    family_options = ("text_encoder_out_layers", "remote_text_encoder", "fsdp_text_encoder")
    hub_tags = ("flux2", "flux2-diffusers")
    pipeline_class_names = ("Flux2Pipeline",)
    option_defaults = flux2_option_defaults([10, 20, 30])

    def configure(self, config: DreamBoothConfig) -> None:
        """FLUX.2's options; with `--remote_text_encoder`, every prompt is encoded by the endpoint, which computes
        the pipeline's default layers at 512 tokens, so other `--text_encoder_out_layers` or
        `--max_sequence_length` are refused rather than silently not followed."""
        if config.remote_text_encoder:
            defaults = self.option_defaults[config.adapter]
            for name in ("text_encoder_out_layers", "max_sequence_length"):
                if getattr(config, name) not in (None, defaults[name]):
                    raise DreamBoothInputError(
                        f"`--{name}` with `--remote_text_encoder`: the endpoint computes FLUX.2 [dev]'s defaults"
                        f" ({defaults[name]}). Remove one of the two."
                    )
            use_remote_text_encoder(self.pipeline, remote_text_encoder_for(config))
        super().configure(config)


class Flux2KleinFamily(Flux2Family):
    name = "flux2-klein"
    family_options = ("text_encoder_out_layers", "caption_dropout", "fsdp_text_encoder")
    hub_tags = ("flux2-klein", "flux2-klein-diffusers")
    pipeline_class_names = ("Flux2KleinPipeline",)
    drops_captions = True
    pipeline_class = Flux2KleinPipeline
    option_defaults = flux2_option_defaults([9, 18, 27])
