"""A tiny `HiDreamImagePipeline`: two CLIP encoders with projection (CLIP-L, CLIP-G), T5, a two-layer Llama whose
hidden states (both layers) feed the two blocks of an MoE transformer on 2x2 patches, and an AutoencoderKL, as in
diffusers' `tests/pipelines/hidream_image/` dummy components; the scheduler is HiDream-I1-Full's."""

from pathlib import Path

from diffusers import AutoencoderKL, HiDreamImagePipeline, HiDreamImageTransformer2DModel, UniPCMultistepScheduler
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, LlamaConfig, LlamaForCausalLM

from . import (
    _dummy_t5_encoder,
    _dummy_vae,
    _seeded,
    build_clip_tokenizer,
    build_llm_tokenizer,
    build_t5_tokenizer,
    clip_text_config,
)

#: `scheduler/scheduler_config.json` of HiDream-ai/HiDream-I1-Full: UniPC in its flow mode with a shift of 3.
HIDREAM_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    flow_shift=3.0,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    predict_x0=True,
    solver_order=2,
    solver_type="bh2",
    final_sigmas_type="zero",
    lower_order_final=True,
    timestep_spacing="linspace",
)
#: Llama 3.1's text markers: `<|begin_of_text|>` starts a text, `<|end_of_text|>` ends it and pads (the script's).
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"

_CLIP_HIDDEN_SIZE = 32
_T5_HIDDEN_SIZE = 16
_LLAMA_HIDDEN_SIZE = 32
#: Context of the CLIP encoders: the pipeline pads CLIP ids to `min(max_sequence_length, 218)` (128 by default).
_CLIP_CONTEXT = 128


def build_llama_tokenizer(directory: Path):
    return build_llm_tokenizer(directory, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS, pad_token=LLAMA_EOS)


def tiny_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LLAMA_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_hidden_states=True,
    )
    with _seeded(seed):
        return LlamaForCausalLM(config).eval()


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> HiDreamImagePipeline:
    tokenizer = build_clip_tokenizer(tmp_dir / "tokenizer", model_max_length=_CLIP_CONTEXT)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp_dir / "tokenizer")
    tokenizer_3 = build_t5_tokenizer(tmp_dir / "tokenizer_3", model_max_length=512)
    tokenizer_4 = build_llama_tokenizer(tmp_dir / "tokenizer_4")
    clip_config = clip_text_config(
        tokenizer,
        hidden_size=_CLIP_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        hidden_act="gelu",
        projection_dim=_CLIP_HIDDEN_SIZE,
    )
    with _seeded(seed):
        text_encoder = CLIPTextModelWithProjection(clip_config).eval()
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(clip_config).eval()
    with _seeded(seed):
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_channels=[_T5_HIDDEN_SIZE, _LLAMA_HIDDEN_SIZE],
            text_emb_dim=2 * _CLIP_HIDDEN_SIZE,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(4, 2, 2),
            max_resolution=(32, 32),
            llama_layers=(0, 1),
        ).eval()
    vae: AutoencoderKL = _dummy_vae(seed, scaling_factor=0.3611, shift_factor=0.1159)
    return HiDreamImagePipeline(
        scheduler=UniPCMultistepScheduler(**HIDREAM_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=_dummy_t5_encoder(tokenizer_3, _T5_HIDDEN_SIZE, seed),
        tokenizer_3=tokenizer_3,
        text_encoder_4=tiny_llama(tokenizer_4, seed),
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
