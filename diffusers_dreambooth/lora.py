"""Loading LoRA weights saved by `DreamBoothFamily.save_lora_weights` back into training adapters (resume)."""

from __future__ import annotations

import os

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from peft import set_peft_model_state_dict
from safetensors.torch import load_file


def load_lora_checkpoint(directory: str | os.PathLike, modules: dict[str, torch.nn.Module]) -> None:
    """Load `pytorch_lora_weights.safetensors` from `directory` into the `default` adapter of each module.

    `modules` maps pipeline attribute names (`unet`, `text_encoder`, ...) to modules that already hold an adapter
    of the same configuration; every adapter weight must be found in the file.
    """
    path = os.path.join(directory, LORA_WEIGHT_NAME_SAFE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA checkpoint `{path}` is missing; the checkpoint folder is incomplete.")
    state_dict = load_file(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not module_state:
            raise ValueError(f"LoRA checkpoint `{path}` holds no weights for `{name}`; was it trained with it?")
        result = set_peft_model_state_dict(module, module_state, adapter_name="default")
        unexpected = list(getattr(result, "unexpected_keys", []))
        missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
        if unexpected or missing:
            raise ValueError(
                f"LoRA checkpoint `{path}` does not match the `{name}` adapter being trained (missing keys:"
                f" {missing[:3]}, unexpected keys: {unexpected[:3]}); was it saved with other `--rank` or target"
                " modules?"
            )
