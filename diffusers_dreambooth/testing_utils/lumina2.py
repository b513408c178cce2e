"""A tiny `Lumina2Pipeline`: Gemma 2 (read at its penultimate layer), a Lumina 2 transformer on 2x2 patches and an
AutoencoderKL with 8x downsampling, the factor `Lumina2Pipeline` assumes whatever its VAE."""

from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

from . import _seeded
from ._gemma import build_gemma_tokenizer, tiny_gemma2

#: `scheduler/scheduler_config.json` of Alpha-VLLM/Lumina-Image-2.0: a fixed shift of 6.
LUMINA2_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=6.0)

_TEXT_HIDDEN_SIZE = 16


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> Lumina2Pipeline:
    tokenizer = build_gemma_tokenizer(tmp_dir / "tokenizer")
    text_encoder = tiny_gemma2(tokenizer, seed, hidden_size=_TEXT_HIDDEN_SIZE)
    with _seeded(seed):
        transformer = Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=16,
            num_layers=2,
            num_refiner_layers=1,
            num_attention_heads=2,
            num_kv_heads=1,
            multiple_of=16,
            norm_eps=1e-5,
            scaling_factor=1.0,
            axes_dim_rope=(4, 2, 2),
            axes_lens=(300, 64, 64),
            cap_feat_dim=_TEXT_HIDDEN_SIZE,
        )
    with _seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=(4, 4, 4, 4),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=1,
            sample_size=32,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**LUMINA2_SCHEDULER_CONFIG)
    return Lumina2Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
    )
