"""Tiny FLUX.2 [klein] pipeline (`Flux2KleinPipeline`: Qwen3 text encoder, no guidance embedding), configured like
diffusers' `tests/pipelines/flux2/test_pipeline_flux2_klein.py` dummy components; the transformer and VAE are those
of the tiny FLUX.2 [dev] (`flux2.py`)."""

from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from transformers import Qwen3Config, Qwen3ForCausalLM

from . import _seeded, build_llm_tokenizer
from .flux2 import TEXT_HIDDEN_SIZE, TEXT_LAYERS, tiny_flux2_transformer, tiny_flux2_vae

#: Qwen's ChatML, with the empty thinking block `enable_thinking=False` adds after the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> Flux2KleinPipeline:
    tokenizer = build_llm_tokenizer(
        tmp_dir / "tokenizer",
        special_tokens=("<|im_start|>", "<think>", "</think>"),
        chat_template=QWEN3_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    config = Qwen3Config(
        intermediate_size=16,
        hidden_size=TEXT_HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        text_encoder = Qwen3ForCausalLM(config).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flux2_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(seed, guidance_embeds=False),
    )
