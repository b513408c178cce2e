"""Krea 2 (Krea AI): a single-stream MMDiT trained by rectified flow on 2x2 patches of Qwen-Image VAE latents,
conditioned on several hidden states of a Qwen3-VL text encoder, stacked per token.

The objective is that of diffusers' `train_dreambooth_lora_krea2.py`: timesteps from the `--weighting_scheme`
density on the scheduler's unshifted grid (Krea 2's scheduler shifts only at sampling, by resolution), the noisy
input `(1 - sigma) * x + sigma * noise`, the velocity `noise - x` as target and the transformer read at
`timestep / 1000`. Latents are the VAE posterior normalised by its `latents_mean` / `latents_std`, as the pipeline
undoes them before decoding. Prompts are encoded by the pipeline's own `encode_prompt` (its chat template padded in
the middle, the selected layers stacked), a fixed `--max_sequence_length` per prompt, with their mask.

RAW, the checkpoint trained, is not meant for inference: with `--validation_model_path` (Krea 2 Turbo), validation
and the card samples are drawn, as the script draws them, by that checkpoint with the adapter trained so far loaded
on it, in `--validation_num_inference_steps` steps at `--validation_guidance_scale`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, Krea2Pipeline
from diffusers.training_utils import free_memory

from ..pipeline_loading import readable_load_errors
from .base import ImageConditioning, height_and_width
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

#: The pixel size of one transformer token's side is the VAE's factor times this patch side.
PATCH_SIZE = 2


def qwen_vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side of the Qwen-Image VAE: one halving per `temperal_downsample` entry."""
    return 2 ** len(vae_config["temperal_downsample"])


class Krea2Family(LLMPromptFamily):
    name = "krea2"
    family_options = ("validation_model_path",)
    hub_tags = ("krea2", "krea2-diffusers")
    pipeline_class_names = ("Krea2Pipeline",)
    denoiser_name = "transformer"
    # diffusers' script's default `--lora_layers`: the Krea 2 authors' recommended set (patch embedding, final
    # projection, attention with its gate, MLP, text fusion and text/time embeddings).
    denoiser_lora_target_modules = (
        "img_in",
        "final_layer.linear",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "to_gate",
        "ff.up",
        "ff.down",
        "text_fusion.projector",
        "txt_in.linear_1",
        "txt_in.linear_2",
        "time_embed.linear_1",
        "time_embed.linear_2",
        "time_mod_proj",
    )
    # diffusers' script is LoRA-only; full fine-tuning takes the same values.
    option_defaults = {
        adapter: {
            "learning_rate": 3e-4,
            "rank": 32,  # the script's rank and alpha (alpha = rank by default)
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 512,
        }
        for adapter in ("full", "lora")
    }

    #: `--validation_model_path`, the call options sampling on it takes, and how it loads.
    validation_model_path = None
    validation_call: dict[str, Any] = {}
    validation_loading: dict[str, Any] = {}

    def configure(self, config: DreamBoothConfig) -> None:
        super().configure(config)
        self.validation_model_path = config.validation_model_path
        self.validation_call = {
            "num_inference_steps": config.validation_num_inference_steps,
            "guidance_scale": config.validation_guidance_scale,
        }
        self.validation_loading = {
            "cache_dir": config.cache_dir,
            "variant": config.variant,
            "use_safetensors": None if config.allow_pickle else True,
        }

    def validation_inputs(self) -> dict[str, Any]:
        """On `--validation_model_path`, its recipe: `--validation_num_inference_steps` (Turbo: 8) at
        `--validation_guidance_scale` (0, no classifier-free guidance); the training checkpoint samples as usual."""
        inputs = super().validation_inputs()
        return {**inputs, **self.validation_call} if self.validation_model_path else inputs

    @contextlib.contextmanager
    def validation_pipeline(self, lora_weights: str | Path | None = None) -> Iterator[DiffusionPipeline]:
        """`--validation_model_path` loaded with the trained Qwen3-VL and tokenizer (as the script validates on
        embeddings of the training encoder), the VAE, transformer and scheduler its own, in the frozen base's dtype,
        then the adapter trained so far (or the one saved in `lora_weights`) loaded with `load_lora_weights`, as a
        user loads it on Turbo. Dropped when the block ends; without the option, the trained pipeline itself."""
        if self.validation_model_path is None:
            yield self.pipeline
            return
        with tempfile.TemporaryDirectory(prefix="krea2-validation-lora-") as folder:
            if lora_weights is None:
                self.save_lora_weights(folder, {self.denoiser_name: self.denoiser})
            with readable_load_errors("validation_model_path", self.validation_model_path):
                pipeline = Krea2Pipeline.from_pretrained(
                    self.validation_model_path,
                    text_encoder=self.pipeline.text_encoder,
                    tokenizer=self.pipeline.tokenizer,
                    torch_dtype=self.denoiser.dtype,
                    **self.validation_loading,
                )
            pipeline.load_lora_weights(str(lora_weights or folder))
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        try:
            yield pipeline
        finally:
            del pipeline
            free_memory()

    # Components

    @property
    def vae_scale_factor(self) -> int:
        return qwen_vae_scale_factor(self.vae.config)

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One 2x2 patch of latents."""
        return qwen_vae_scale_factor(configs["vae"]) * PATCH_SIZE

    def sample_shape(self, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """`(z_dim, height / 8, width / 8)`: the Qwen-Image VAE's latents of one frame."""
        height, width = height_and_width(resolution)
        return (self.vae.config.z_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`Krea2Pipeline.encode_prompt`: `(prompt, max_sequence_length, layers, dim)` states and their mask."""
        embeds, mask = self.pipeline.encode_prompt(
            prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds.float(), "prompt_embeds_mask": mask}

    # Images

    @torch.no_grad()
    def encode_image_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Qwen-Image VAE's posterior of single-frame videos, normalised as `(z - latents_mean) / latents_std`."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(self.device, vae.dtype).unsqueeze(2)).latent_dist
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(shape)
        return ((posterior.mean[:, :, 0] - mean) / std).float(), (posterior.std[:, :, 0] / std).float()

    # Objective

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The transformer's velocity on the pipeline's packing of the noisy latents, unpacked to `(B, C, H, W)`."""
        batch, channels, height, width = noisy.shape
        embeds = prompt_embeds["prompt_embeds"]
        position_ids = Krea2Pipeline.prepare_position_ids(
            embeds.shape[1], height // PATCH_SIZE, width // PATCH_SIZE, noisy.device
        )
        packed = denoiser(
            hidden_states=self.pipeline._pack_latents(noisy, batch, channels, height, width),
            encoder_hidden_states=embeds,
            timestep=timesteps / 1000,
            position_ids=position_ids,
            encoder_attention_mask=prompt_embeds["prompt_embeds_mask"].bool(),
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor
        velocity = self.pipeline._unpack_latents(packed, height * factor, width * factor)[:, :, 0]
        return self.preconditioned(velocity, noisy, timesteps)
