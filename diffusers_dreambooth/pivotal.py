"""Pivotal tuning (`--train_text_encoder_ti`): new tokens whose input embeddings train alongside the denoiser.

Textual Inversion (Gal et al., 2022) learns the embedding of a new word; pivotal tuning trains that embedding and the
denoiser (LoRA or full) together, as diffusers' `train_dreambooth_lora_sdxl_advanced.py` does with
`--train_text_encoder_ti`. Only the new rows of each text encoder's token embedding matrix change: their gradient
is the only one kept, and after every optimizer step the other rows are copied back (AdamW's weight decay would
otherwise shrink them), so the rest of each text encoder stays bit-for-bit the base model's.

The embeddings are saved as diffusers' advanced scripts save them: one safetensors file, one key per text encoder
(`clip_l` for `text_encoder`, `clip_g` for SDXL's `text_encoder_2`), each a `(num_tokens, hidden_size)` tensor that
`load_textual_inversion(tensor, token=[...], text_encoder=..., tokenizer=...)` of plain diffusers loads.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

#: The embeddings file of a pivotal-tuning run, beside the LoRA weights (or the full pipeline).
TEXTUAL_INVERSION_WEIGHT_NAME = "textual_inversion_emb.safetensors"


def new_token_names(count: int) -> list[str]:
    """The new tokens, named as diffusers' advanced scripts name them: `<s0>`, `<s1>`, ..."""
    return [f"<s{index}>" for index in range(count)]


class TokenEmbeddings:
    """The new tokens added to every tokenizer of a family, and their trainable rows in every text encoder.

    Args:
        text_encoders (`dict[str, torch.nn.Module]`): the text encoders by pipeline attribute name.
        tokenizers (`list`): their tokenizers, in the same order.
        keys (`list[str]`): the key of each text encoder in the saved file (`clip_l`, `clip_g`).
        tokens (`list[str]`): the new tokens; none may be in a tokenizer's vocabulary yet.
        generator (`torch.Generator`): draws the initial embeddings: normal, scaled by the standard deviation of
            each encoder's existing embeddings (as diffusers' `TokenEmbeddingsHandler.initialize_new_tokens`).
    """

    def __init__(
        self,
        text_encoders: dict[str, torch.nn.Module],
        tokenizers: list[Any],
        keys: list[str],
        tokens: list[str],
        generator: torch.Generator,
    ) -> None:
        self.tokens, self.keys = tokens, keys
        self.text_encoder_names = list(text_encoders)
        self.weights: list[torch.nn.Parameter] = []
        self.token_ids: list[torch.Tensor] = []
        self.frozen: list[torch.Tensor] = []
        for (name, encoder), tokenizer in zip(text_encoders.items(), tokenizers):
            present = [token for token in tokens if token in tokenizer.get_vocab()]
            if present:
                raise ValueError(
                    f"`--train_text_encoder_ti` adds the tokens {tokens}, but the base model's `{name}` tokenizer"
                    f" already has {present}. Train from a base model without them (a pipeline that had textual"
                    " inversions loaded cannot be trained again with new ones)."
                )
            tokenizer.add_tokens(tokens)
            ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
            rows = encoder.get_input_embeddings().weight.shape[0]
            if int(ids.max()) >= rows:
                encoder.resize_token_embeddings(int(ids.max()) + 1, mean_resizing=False)  # rows set below
            weight = encoder.get_input_embeddings().weight
            if weight.dtype != torch.float32:
                raise ValueError(
                    f"`--train_text_encoder_ti` trains `{name}`'s token embeddings in float32, but they are"
                    f" {weight.dtype}. Load the pipeline with `torch_dtype=torch.float32` (mixed precision still"
                    " applies to the denoiser)."
                )
            with torch.no_grad():
                old = torch.ones(weight.shape[0], dtype=torch.bool)
                old[ids] = False
                std = weight[old].std()
                initial = torch.randn((len(tokens), weight.shape[1]), generator=generator) * std
                weight[ids.to(weight.device)] = initial.to(weight.device)
            weight.requires_grad_(True)
            mask = (~old).to(weight.device, weight.dtype).unsqueeze(1)
            weight.register_hook(lambda grad, mask=mask: grad * mask)
            self.weights.append(weight)
            self.token_ids.append(ids.to(weight.device))
            self.frozen.append(weight.detach().clone())

    @property
    def identifier(self) -> str:
        """The new tokens written as one word (`<s0><s1>`), what `{identifier}` in the prompts becomes."""
        return "".join(self.tokens)

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Copy the base model's rows back over every row but the new tokens' (after each optimizer step)."""
        for weight, ids, frozen in zip(self.weights, self.token_ids, self.frozen):
            trained = weight[ids].clone()
            weight.copy_(frozen)
            weight[ids] = trained

    def reduce_gradients(self, accelerator: Any) -> None:
        """Average the embeddings' gradients over processes: they are not in an accelerate-prepared (DDP) module."""
        if accelerator.num_processes == 1:
            return
        for weight in self.weights:
            if weight.grad is not None:
                weight.grad = accelerator.reduce(weight.grad, reduction="mean")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{key: (num_tokens, hidden_size) tensor}`: the file diffusers' advanced scripts write."""
        return {
            key: weight[ids].detach().float().cpu().contiguous()
            for key, weight, ids in zip(self.keys, self.weights, self.token_ids)
        }

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, TEXTUAL_INVERSION_WEIGHT_NAME)
        save_file(self.state_dict(), path, metadata={"tokens": ",".join(self.tokens)})
        return path

    @torch.no_grad()
    def load(self, directory: str | os.PathLike) -> None:
        """Set the new rows from a checkpoint's embeddings file (resume)."""
        state = load_file(os.path.join(directory, TEXTUAL_INVERSION_WEIGHT_NAME))
        for key, weight, ids in zip(self.keys, self.weights, self.token_ids):
            weight[ids] = state[key].to(weight.device, weight.dtype)


def load_token_embeddings(
    pipeline: Any,
    path: str | os.PathLike,
    tokens: list[str],
    text_encoder_names: tuple[str, ...],
    tokenizer_names: tuple[str, ...],
    keys: tuple[str, ...],
) -> None:
    """Load a pivotal-tuning embeddings file into `pipeline` with diffusers' own `load_textual_inversion`."""
    state = load_file(path)
    for key, encoder_name, tokenizer_name in zip(keys, text_encoder_names, tokenizer_names):
        pipeline.load_textual_inversion(
            state[key],
            token=list(tokens),
            text_encoder=getattr(pipeline, encoder_name),
            tokenizer=getattr(pipeline, tokenizer_name),
        )
