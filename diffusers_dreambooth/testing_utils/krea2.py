"""A tiny `Krea2Pipeline`: Qwen3-VL (three hidden states stacked per token), the Krea 2 single-stream transformer,
the Qwen-Image VAE and the resolution-aware flow-matching scheduler, as diffusers' Krea 2 pipeline test builds them."""

from pathlib import Path

from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

from . import _seeded
from ._qwen2_tokenizer import build_qwen2_tokenizer
from ._qwen3vl import tiny_qwen3_vl
from .qwen_image import _TEMPLATE_WORDS

#: The Krea 2 shift parameters the pipeline's docstring asks its scheduler config for.
KREA2_SCHEDULER_CONFIG = dict(
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400
)

_TEXT_HIDDEN_SIZE = 16


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> Krea2Pipeline:
    # Krea 2's template is Qwen-Image's: its system prompt is the 34 tokens the pipeline drops, and `assistant` one
    # token so that the suffix is the 5 it appends.
    tokenizer = build_qwen2_tokenizer(tmp_dir / "tokenizer", words=(*_TEMPLATE_WORDS, "assistant"))
    text_encoder = tiny_qwen3_vl(tokenizer, seed, hidden_size=_TEXT_HIDDEN_SIZE, num_layers=2)
    with _seeded(seed):
        transformer = Krea2Transformer2DModel(
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            timestep_embed_dim=8,
            text_hidden_dim=_TEXT_HIDDEN_SIZE,
            num_text_layers=3,
            text_num_attention_heads=2,
            text_num_key_value_heads=1,
            text_intermediate_size=16,
            num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1,
            axes_dims_rope=(4, 2, 2),
            rope_theta=1000.0,
        )
    with _seeded(seed):
        vae = AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.05, 0.0],  # not the identity, so that training must normalise as sampling does
            latents_std=[1.5, 0.8, 1.2, 1.0],
        ).eval()
    return Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KREA2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        text_encoder_select_layers=(0, 1, 2),
    )
