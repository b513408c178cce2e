"""Tiny FLUX.2 [dev] pipeline (`Flux2Pipeline`: Mistral3 text encoder, `Flux2Transformer2DModel`,
`AutoencoderKLFlux2`), configured like diffusers' `tests/pipelines/flux2` dummy components.

The real `tokenizer` component is a `PixtralProcessor`, which transformers loads only with torchvision; the pipeline
uses nothing of it but `apply_chat_template`, so the tiny one is a tokenizer (`PreTrainedTokenizerFast`) with a
Mistral-style chat template. The text encoders are as deep as the pipelines' default `text_encoder_out_layers`
read (30 layers of 16 values), so the default options run.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from . import DEFAULT_CORPUS, _seeded, build_llm_tokenizer

#: Width of the tiny text encoders; the transformer reads three of their layers stacked (`joint_attention_dim`).
TEXT_HIDDEN_SIZE = 16
#: Layers of the tiny text encoders: enough for the deepest default layer (30, FLUX.2 [dev]'s).
TEXT_LAYERS = 30
#: Mistral-style: `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`; message content is text or a list of parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


def tiny_flux2_transformer(seed: int, guidance_embeds: bool = True) -> Flux2Transformer2DModel:
    """One double- and one single-stream block, 2 heads of 16, reading 4 latent channels patchified (16 values)."""
    with _seeded(seed):
        return Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_HIDDEN_SIZE,
            timestep_guidance_channels=256,
            axes_dims_rope=[4, 4, 4, 4],
            guidance_embeds=guidance_embeds,
        ).eval()


def tiny_flux2_vae(seed: int) -> AutoencoderKLFlux2:
    """Two blocks (2x downsampling), 4 latent channels; its batch-norm statistics are set to non-trivial values so
    that the normalisation of latents is exercised."""
    with _seeded(seed):
        vae = AutoencoderKLFlux2(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> Flux2Pipeline:
    tokenizer = build_llm_tokenizer(
        tmp_dir / "tokenizer",
        special_tokens=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        chat_template=MISTRAL_CHAT_TEMPLATE,
        corpus=[*DEFAULT_CORPUS, SYSTEM_MESSAGE],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 37,
            "max_position_embeddings": 1024,
            "num_attention_heads": 4,
            "num_hidden_layers": TEXT_LAYERS,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=tokenizer.unk_token_id,
    )
    with _seeded(seed):
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flux2_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(seed),
    )
