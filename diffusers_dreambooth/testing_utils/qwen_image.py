"""A tiny `QwenImagePipeline`: a Qwen2.5-VL text encoder, the Qwen-Image MMDiT, the Qwen-Image (video-style) VAE
and Qwen-Image's shipped flow-matching scheduler config, as diffusers' Qwen-Image pipeline test builds them."""

import re
from pathlib import Path

from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from . import _seeded
from ._qwen2_tokenizer import build_qwen2_tokenizer

#: `scheduler/scheduler_config.json` of Qwen/Qwen-Image: exponential dynamic shift by resolution, with a terminal
#: sigma of 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)

_HIDDEN_SIZE = 16

#: The system prompt of `QwenImagePipeline`'s template. Its words (with their leading space) and punctuation, and
#: `user`, are single tokens here, so that the template before the prompt is 34 tokens as with Qwen's tokenizer:
#: the pipeline drops exactly those (`prompt_template_encode_start_idx`), and the embeddings are the prompt's.
_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the"
    " objects and background:"
)
_TEMPLATE_WORDS = (*re.findall(r"^\w+|\s\w+|[,:]", _SYSTEM_PROMPT), "system", "user")


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> QwenImagePipeline:
    tokenizer = build_qwen2_tokenizer(tmp_dir / "tokenizer", words=_TEMPLATE_WORDS)
    vocab_size = len(tokenizer) + 3  # the three vision markers after the text vocabulary
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": _HIDDEN_SIZE,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=_HIDDEN_SIZE,
        vocab_size=vocab_size,
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 2,
        vision_token_id=vocab_size - 1,
    )
    with _seeded(seed):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=_HIDDEN_SIZE,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
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
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
