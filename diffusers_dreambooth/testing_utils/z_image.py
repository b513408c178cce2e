"""A tiny `ZImagePipeline`: a Qwen3 text encoder read through the tokenizer's chat template, the Z-Image
single-stream transformer, an AutoencoderKL with Z-Image's shift and scale, and Z-Image's shipped scheduler config,
as diffusers' Z-Image pipeline test builds them."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from . import _seeded
from ._qwen2_tokenizer import build_qwen2_tokenizer

#: `scheduler/scheduler_config.json` of Tongyi-MAI/Z-Image-Turbo: a static shift of 3.
Z_IMAGE_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

#: The part of Qwen3's chat template that `ZImagePipeline._encode_prompt` renders: user messages, the assistant
#: prompt, and the empty thinking block Qwen3 adds when thinking is off (the pipeline turns it on).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

_HIDDEN_SIZE = 16


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> ZImagePipeline:
    tokenizer = build_qwen2_tokenizer(tmp_dir / "tokenizer", chat_template=CHAT_TEMPLATE)
    config = Qwen3Config(
        hidden_size=_HIDDEN_SIZE,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        text_encoder = Qwen3Model(config).eval()
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=_HIDDEN_SIZE,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[512, 64, 64],  # 1024 px: 64 patches a side
        )
        # `torch.empty` in the constructor: fixed as diffusers' test fixes them, so that the model is deterministic.
        with torch.no_grad():
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
    # 8x downsampling as the real VAE, narrow and without mid-block attention: `ZImagePipeline` samples 1024 px
    # whatever the model, so class and validation images must stay cheap at that size.
    with _seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=(4, 4, 4, 4),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            mid_block_add_attention=False,
            scaling_factor=0.3611,  # Z-Image's
            shift_factor=0.1159,
        ).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
