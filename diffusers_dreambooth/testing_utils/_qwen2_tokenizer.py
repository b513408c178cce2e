"""A tiny `Qwen2Tokenizer` (the class Qwen-Image's Qwen2.5-VL and Z-Image's Qwen3 ship), shared by their tiny
pipelines."""

from collections.abc import Iterable
from pathlib import Path

from transformers import Qwen2Tokenizer

from . import build_llm_tokenizer

#: Qwen's chat-template markers and padding token.
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def build_qwen2_tokenizer(
    save_directory: Path, chat_template: str | None = None, words: Iterable[str] = ()
) -> Qwen2Tokenizer:
    """A byte-level BPE saved as `Qwen2Tokenizer`, with Qwen's chat markers (`<|im_end|>` ends a turn,
    `<|endoftext|>` pads), `words` as single tokens, and, for pipelines that call `apply_chat_template`,
    `chat_template`."""
    return build_llm_tokenizer(
        save_directory,
        tokenizer_class=Qwen2Tokenizer,
        special_tokens=(IM_START, IM_END, *dict.fromkeys(words)),
        chat_template=chat_template,
        eos_token=IM_END,
        pad_token=PAD,
    )
