"""A tiny Qwen3-VL text encoder and its tokenizer, shared by the Qwen3-VL-conditioned families' tiny pipelines
(Krea 2, Ideogram 4); the tokenizer is Ideogram 4's (Krea 2 uses Qwen-Image's)."""

from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel

from . import _seeded, build_llm_tokenizer

#: Qwen's chat-template markers and padding token.
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

#: The part of Qwen3-VL's chat template that Ideogram 4's `encode_prompt` renders: text-only user messages and the
#: assistant prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer(save_directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's chat markers (`<|im_end|>` ends a turn, `<|endoftext|>` pads) and the template."""
    return build_llm_tokenizer(
        save_directory,
        special_tokens=(IM_START, IM_END),
        chat_template=CHAT_TEMPLATE,
        eos_token=IM_END,
        pad_token=PAD,
    )


def tiny_qwen3_vl(tokenizer: PreTrainedTokenizerFast, seed: int, hidden_size: int, num_layers: int) -> Qwen3VLModel:
    """A Qwen3-VL `hidden_size` wide with `num_layers` decoder layers and a vocabulary matching `tokenizer`."""
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": 16,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "rope_theta": 10_000.0,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 8, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 8},
        vocab_size=len(tokenizer),
    )
    with _seeded(seed):
        return Qwen3VLModel(config).eval()
