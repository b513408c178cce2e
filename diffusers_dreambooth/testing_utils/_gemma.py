"""A tiny Gemma 2 text encoder and its tokenizer, shared by the Gemma-conditioned families' tiny pipelines (Sana,
Lumina 2)."""

from pathlib import Path

from tokenizers import processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from . import _seeded, build_llm_tokenizer

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"


def build_gemma_tokenizer(save_directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Gemma's `<bos>`, `<eos>` and `<pad>`, which prepends `<bos>` as Gemma's tokenizer does
    (Sana's `encode_prompt` keeps the first token and the last ones); pipelines pad it on the right."""
    tokenizer = build_llm_tokenizer(save_directory, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save_pretrained(save_directory)
    return PreTrainedTokenizerFast.from_pretrained(save_directory)


def tiny_gemma2(tokenizer: PreTrainedTokenizerFast, seed: int, hidden_size: int = 16) -> Gemma2Model:
    """A two-layer Gemma 2 `hidden_size` wide whose vocabulary and special ids match `tokenizer`."""
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        sliding_window=8,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        return Gemma2Model(config).eval()
