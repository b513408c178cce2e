"""Stable Diffusion 1.x (epsilon) and 2.x (v-prediction): one UNet, one CLIP text encoder.

The prediction type comes from the scheduler config, so both versions are this one family.
"""

from .base import DreamBoothFamily


class StableDiffusionFamily(DreamBoothFamily):
    name = "stable-diffusion"
    hub_tags = ("stable-diffusion",)
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    textual_inversion_keys = ("clip_l",)
