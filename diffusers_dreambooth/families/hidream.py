"""HiDream-I1 (HiDream.ai): a sparse mixture-of-experts transformer trained by rectified flow on 2x2 patches, read by
four frozen text encoders: CLIP-L and CLIP-G (their pooled projections, concatenated), T5, and Llama 3.1, whose every
layer's hidden states feed the transformer's blocks.

The objective is that of diffusers' `train_dreambooth_lora_hidream.py`: `FlowMatchEulerDiscreteScheduler` with a
shift of 3 (the script's, whatever the folder's scheduler), timesteps by `--weighting_scheme` (default uniform), the
noisy input `(1 - sigma) * x + sigma * noise` and the velocity `noise - x` as the target of the transformer's negated
output (it predicts the inverted velocity, which `HiDreamImagePipeline` negates too). Prompts are the pipeline's own
`encode_prompt` embeddings, computed once: the script keeps all four encoders frozen. The transformer runs with
`force_inference_output`, as the script loads it, so it returns image-shaped latents; for LoRA its routed experts
also run the inference path the script's do (without gradient through them), while full fine-tuning (no diffusers
script) runs them differentiably so that the experts train too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .base import ImageConditioning, latent_scale_factor
from .llm import LLMPromptFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig

#: The timestep shift of the script's training scheduler (`FlowMatchEulerDiscreteScheduler(shift=3.0)`).
TRAINING_SHIFT = 3.0


class HiDreamFamily(LLMPromptFamily):
    name = "hidream"
    family_options = ("pretrained_text_encoder_4_name_or_path", "pretrained_tokenizer_4_name_or_path")
    hub_tags = ("hidream", "hidream-diffusers")
    pipeline_class_names = ("HiDreamImagePipeline",)
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4")
    # The script's `--lora_layers` default: the attention projections of the image stream (not the text stream's
    # `to_q_t`, ...).
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out")
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 128,
        }
        for adapter in ("full", "lora")
    }

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, shift=TRAINING_SHIFT
        )
        # Image-shaped output in training mode too, as the script loads the transformer.
        self.denoiser.register_to_config(force_inference_output=True)

    def configure(self, config: DreamBoothConfig) -> None:
        """The flow-matching options; the routed experts run as the script's (LoRA) or with gradients (full)."""
        super().configure(config)
        for module in self.denoiser.modules():
            if hasattr(module, "_force_inference_output"):
                module._force_inference_output = config.adapter == "lora"

    @classmethod
    def resolution_multiple_of(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """One patch of latents."""
        return latent_scale_factor(configs["vae"]) * configs["transformer"]["patch_size"]

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`HiDreamImagePipeline.encode_prompt`'s T5 states, Llama states of every layer (moved to prompt-first,
        `(batch, layers, tokens, width)`) and pooled CLIP projections, at `--max_sequence_length` tokens."""
        t5, _, llama, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
        )
        return {
            "prompt_embeds_t5": t5.float(),
            "prompt_embeds_llama3": llama.transpose(0, 1).float(),
            "pooled_prompt_embeds": pooled.float(),
        }

    # Objective

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The velocity: the transformer's output negated, as the script and the pipeline negate it."""
        output = denoiser(
            hidden_states=noisy,
            timesteps=timesteps,
            encoder_hidden_states_t5=prompt_embeds["prompt_embeds_t5"],
            encoder_hidden_states_llama3=prompt_embeds["prompt_embeds_llama3"].transpose(0, 1),
            pooled_embeds=prompt_embeds["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        return self.preconditioned(-output, noisy, timesteps)
