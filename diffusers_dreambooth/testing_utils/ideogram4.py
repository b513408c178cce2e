"""A tiny `Ideogram4Pipeline`: Qwen3-VL (the 13 tapped decoder layers concatenated per token), a conditional and an
unconditional Ideogram 4 transformer, the FLUX.2 VAE (batch-normalised 2x2 patches), as diffusers' Ideogram 4
pipeline test builds them (its VAE with two blocks here, so that one latent is two pixels)."""

from pathlib import Path

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Ideogram4Pipeline,
    Ideogram4Transformer2DModel,
)
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

from . import _seeded
from ._qwen3vl import build_qwen_tokenizer, tiny_qwen3_vl

_TEXT_HIDDEN_SIZE = 8
#: `encode_prompt` taps decoder layers up to 35, so the encoder needs 36.
_NUM_TEXT_LAYERS = max(QWEN3_VL_ACTIVATION_LAYERS) + 1


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> Ideogram4Pipeline:
    tokenizer = build_qwen_tokenizer(tmp_dir / "tokenizer")
    text_encoder = tiny_qwen3_vl(tokenizer, seed, hidden_size=_TEXT_HIDDEN_SIZE, num_layers=_NUM_TEXT_LAYERS)
    transformer_options = dict(
        in_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=len(QWEN3_VL_ACTIVATION_LAYERS) * _TEXT_HIDDEN_SIZE,
        rope_theta=10_000,
        mrope_section=(2, 1, 1),
        norm_eps=1e-5,
    )
    with _seeded(seed):
        transformer = Ideogram4Transformer2DModel(**transformer_options)
    with _seeded(seed + 1):
        unconditional_transformer = Ideogram4Transformer2DModel(**transformer_options)
    with _seeded(seed):
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            patch_size=(2, 2),
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        # Batch-norm statistics other than the identity, so that training must normalise as sampling does.
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        unconditional_transformer=unconditional_transformer,
    )
