"""`--use_ema`: an exponential moving average of the trained weights, kept by diffusers' `EMAModel`.

One `EMAModel` follows every trained parameter (the denoiser's, and the text encoders' with `--train_text_encoder`;
for `--adapter lora` the adapter weights only, so the average costs as much memory as the adapters). Each optimizer
step updates it with decay `min(ema_decay, (1 + n) / (10 + n))` after `n` updates (`EMAModel.get_decay`, no warm-up),
so short runs are not dominated by the initial weights. Checkpoints hold its state in `ema.safetensors` (the shadow
weights by parameter name, and the step count and decay settings as metadata): a resumed run continues the same
average, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

#: The EMA state's file in a checkpoint folder.
EMA_STATE_NAME = "ema.safetensors"


def make_ema(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """An `EMAModel` over `parameters` (a copy of them, on their device), updated with `ema.step(parameters)`."""
    return EMAModel(parameters, decay=decay, foreach=True)


def save_ema_state(ema: EMAModel, names: list[str], folder: str | Path) -> Path:
    """Write `ema`'s shadow weights (named as the trained parameters, `names`) and its counters to `folder`."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    if len(shadow) != len(names):
        raise ValueError(f"The EMA holds {len(shadow)} weights but {len(names)} parameter names were given.")
    path = Path(folder) / EMA_STATE_NAME
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in zip(names, shadow)}
    save_file(tensors, str(path), metadata={"ema_state": json.dumps(state)})
    return path


def load_ema_state(ema: EMAModel, names: list[str], folder: str | Path) -> None:
    """Restore `ema` from `save_ema_state`'s file in `folder`; raise if its weights are not those of this run."""
    path = Path(folder) / EMA_STATE_NAME
    tensors = load_file(str(path))
    if sorted(tensors) != sorted(names):
        missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise ValueError(
            f"`{path}` does not hold the EMA of this run's trained weights (missing: {missing[:3]}, unexpected:"
            f" {unexpected[:3]}). Resume with the options the checkpoint was trained with (`--adapter`,"
            " `--train_text_encoder`, `--rank`)."
        )
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["ema_state"])
    devices = [shadow.device for shadow in ema.shadow_params]
    state["shadow_params"] = [tensors[name].to(device) for name, device in zip(names, devices)]
    ema.load_state_dict(state)
