"""Z-Image (Tongyi-MAI): a single-stream DiT trained by rectified flow on 2x2 patches of AutoencoderKL latents,
conditioned on the penultimate hidden states of Qwen3, as diffusers' `train_dreambooth_lora_z_image.py` trains it.

- Prompts are `ZImagePipeline.encode_prompt`'s: the tokenizer's chat template (a user turn, the assistant prompt),
  at most `--max_sequence_length` (default 512, the script's) tokens, one unpadded feature sequence per prompt. They
  are cached padded to the longest prompt with a mask, and `predict` hands the transformer the pipeline's list of
  unpadded sequences again. Validation samples with the same `max_sequence_length`.
- Latents are the VAE posterior's mode by default (`--vae_encode_mode mode`, the script's), shifted and scaled by the
  VAE's `shift_factor` / `scaling_factor`.
- `--guidance_scale` is left unset: the script parses it (default 3.5) but validates with the pipeline's own
  guidance (5.0), as validation does here unless the option is given (README_z_image passes 5.0).
- The objective is the script's: timesteps from the `--weighting_scheme` density on the checkpoint's (statically
  shifted) schedule, the noisy input `(1 - sigma) * x + sigma * noise`, and the velocity `noise - x` as target. Like
  the pipeline, the transformer reads time the other way round, `(1000 - t) / 1000`, and predicts `x - noise`: its
  output is negated.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ImageConditioning
from .llm import LLMPromptFamily


class ZImageFamily(LLMPromptFamily):
    name = "z-image"
    hub_tags = ("z-image",)  # diffusers' script's card tags
    pipeline_class_names = ("ZImagePipeline",)
    family_options = ("fsdp_text_encoder",)
    denoiser_name = "transformer"
    # diffusers' script's `--lora_layers` default.
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    # diffusers' script is LoRA-only; full fine-tuning takes the same values.
    option_defaults = {
        adapter: {
            "learning_rate": 1e-4,
            "resolution": 512,
            "image_interpolation_mode": "bilinear",
            "adam_weight_decay": 1e-4,
            "weighting_scheme": "none",
            "precondition_outputs": 0,
            "max_sequence_length": 512,
            "vae_encode_mode": "mode",
        }
        for adapter in ("full", "lora")
    }

    def sampling_inputs(self) -> dict[str, Any]:
        """Validation reads prompts at the training `--max_sequence_length`."""
        return {"max_sequence_length": self.max_sequence_length}

    @classmethod
    def resolution_multiple_of(cls, configs) -> int:
        """One latent patch: the VAE's factor times the transformer's patch size (2)."""
        patch = configs["transformer"].get("all_patch_size", (2,))[0]
        return 2 ** (len(configs["vae"]["block_out_channels"]) - 1) * patch

    # Prompts

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`ZImagePipeline.encode_prompt`'s unpadded features, padded with zeros to the longest, and their mask."""
        features, _ = self.pipeline.encode_prompt(
            list(prompts),  # the pipeline writes the templated prompts into the list it is given
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        length = max(len(feature) for feature in features)
        embeds = features[0].new_zeros(len(features), length, features[0].shape[-1])
        mask = torch.zeros(len(features), length, dtype=torch.long, device=embeds.device)
        for i, feature in enumerate(features):
            embeds[i, : len(feature)] = feature
            mask[i, : len(feature)] = 1
        return {"prompt_embeds": embeds.float(), "prompt_attention_mask": mask}

    # Objective

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict,
        image_conditioning: ImageConditioning,
    ) -> torch.Tensor:
        """The velocity `noise - x`: the negated output of the transformer, given single-frame latents, the time
        `(1000 - t) / 1000` and each prompt's unpadded features, as `ZImagePipeline` gives them."""
        embeds, mask = prompt_embeds["prompt_embeds"], prompt_embeds["prompt_attention_mask"].bool()
        features = [embed[keep] for embed, keep in zip(embeds, mask)]
        output = denoiser(
            list(noisy.unsqueeze(2).unbind(0)),
            (1000 - timesteps) / 1000,
            features,
            return_dict=False,
        )[0]
        velocity = -torch.stack(output).squeeze(2)
        return self.preconditioned(velocity.to(noisy.dtype), noisy, timesteps)
