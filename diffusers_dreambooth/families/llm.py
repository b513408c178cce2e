"""Flow-matching families whose prompts are read by a large language model (Flux.2, Qwen-Image, Z-Image, Sana,
Lumina 2, HiDream's Llama): what they share.

Each pipeline wraps the prompt in its own chat template or system prompt and picks its own hidden states (the last,
the penultimate, or several layers stacked). Rather than re-implement those, `encode_frozen_prompts` calls the
pipeline's `encode_prompt`, so training is conditioned on exactly the embeddings sampling uses. The LLMs stay frozen,
as in diffusers' scripts for these families: their embeddings are computed once and cached by the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..safeguards import DreamBoothInputError
from .flow_matching import FlowMatchingFamily

if TYPE_CHECKING:
    from ..config import DreamBoothConfig


class LLMPromptFamily(FlowMatchingFamily):
    """Base of the families with frozen LLM text encoders; subclasses implement `pipeline_prompt_embeds`."""

    text_encoder_lora_target_modules = ()
    releases_frozen_text_encoders = True

    def configure(self, config: DreamBoothConfig) -> None:
        """The flow-matching options; refuse training the LLM text encoders, which diffusers' scripts keep frozen."""
        for option in ("train_text_encoder", "train_text_encoder_ti"):
            if getattr(config, option):
                raise DreamBoothInputError(
                    f"`--{option}`: {self.name}'s text encoders are large language models, frozen in diffusers'"
                    f" script for it and here. Remove `--{option}`."
                )
        super().configure(config)

    def trained_text_encoder_names(self, adapter: str) -> tuple[str, ...]:
        return ()

    def token_limits(self, max_length: int | None = None) -> list[int]:
        """`--max_sequence_length` for every tokenizer: an LLM tokenizer's own limit is its context (tens of
        thousands of tokens)."""
        return [self.max_sequence_length] * len(self.tokenizer_names)

    @torch.no_grad()
    def encode_frozen_prompts(self, prompts: list[str], max_length: int | None = None) -> dict:
        """The pipeline's own embeddings of `prompts` (`pipeline_prompt_embeds`), in float32 on the denoiser's
        device; `max_length` (`--tokenizer_max_length`, CLIP's) does not apply to an LLM."""
        embeds = self.pipeline_prompt_embeds(prompts)
        return {name: value.to(self.device) for name, value in embeds.items()}

    def pipeline_prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning the pipeline's `encode_prompt` gives `prompts` (`--max_sequence_length` tokens at most),
        as tensors whose first dimension is the prompt: the keys `denoiser_kwargs` reads (embeddings and their
        attention mask, say)."""
        raise NotImplementedError

    def encode_prompt(self, token_ids: list[torch.Tensor], text_encoders: list[torch.nn.Module]) -> dict:
        raise RuntimeError(
            f"{self.name}'s text encoders are frozen: `encode_frozen_prompts` encodes its prompts once."
        )
