"""A tiny `SanaPipeline`: Gemma 2, a Sana linear-attention transformer, a DC-AE with 32x compression (as Sana's) and
the flow-mode DPM-Solver++ that Sana checkpoints ship."""

from pathlib import Path

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

from . import _seeded
from ._gemma import build_gemma_tokenizer, tiny_gemma2

#: `scheduler/scheduler_config.json` of Sana_1600M_1024px_BF16_diffusers (and the other 1024 px Sana checkpoints).
SANA_SCHEDULER_CONFIG = dict(
    algorithm_type="dpmsolver++",
    flow_shift=3.0,
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    solver_order=2,
    solver_type="midpoint",
    use_flow_sigmas=True,
    final_sigmas_type="zero",
    lower_order_final=True,
)

_TEXT_HIDDEN_SIZE = 16
_BLOCKS = 6  # 2 ** (6 - 1) = 32 pixels per latent, as Sana's DC-AE


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> SanaPipeline:
    tokenizer = build_gemma_tokenizer(tmp_dir / "tokenizer")
    text_encoder = tiny_gemma2(tokenizer, seed, hidden_size=_TEXT_HIDDEN_SIZE)
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=_TEXT_HIDDEN_SIZE,
            sample_size=16,  # the pipeline's resolution binning: the 512 px aspect-ratio bins
            patch_size=1,
        )
    with _seeded(seed):
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=4,
            encoder_block_types=("ResBlock",) * (_BLOCKS - 1) + ("EfficientViTBlock",),
            decoder_block_types=("ResBlock",) * (_BLOCKS - 1) + ("EfficientViTBlock",),
            encoder_block_out_channels=(8,) * _BLOCKS,
            decoder_block_out_channels=(8,) * _BLOCKS,
            encoder_layers_per_block=(1,) * _BLOCKS,
            decoder_layers_per_block=(1,) * _BLOCKS,
            encoder_qkv_multiscales=((),) * (_BLOCKS - 1) + ((5,),),
            decoder_qkv_multiscales=((),) * (_BLOCKS - 1) + ((5,),),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ).eval()
    scheduler = DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
