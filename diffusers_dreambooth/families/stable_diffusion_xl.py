"""Stable Diffusion XL: two CLIP text encoders and size/crop micro-conditioning (SDXL paper, Sec. 2.2)."""

import torch

from .base import DreamBoothFamily, ImageConditioning


class StableDiffusionXLFamily(DreamBoothFamily):
    name = "stable-diffusion-xl"
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
