"""Export of the LoRA this project trains to the kohya-ss single-file format of AUTOMATIC1111 and ComfyUI.

`DreamBoothFamily.save_lora_weights` writes `pytorch_lora_weights.safetensors` with PEFT key names
(`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, ...) and each component's `LoraConfig` in the
safetensors header. AUTOMATIC1111, ComfyUI, SD.Next and most other UIs expect kohya-ss names instead:
`lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and a per-module `.alpha` scalar (the LoRA delta is scaled by
alpha / rank), with `lora_te_` for the text encoder of SD 1.x / 2.x and `lora_te1_` / `lora_te2_` for SDXL's two.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from diffusers.utils import convert_all_state_dict_to_peft
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["KOHYA_WEIGHT_NAME", "export_kohya_lora"]

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"

# Pipeline components a Stable Diffusion LoRA can hold, and the prefix diffusers' converter gives each.
_COMPONENT_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_LORA_DOWN = ".lora_A.weight"
_LORA_UP = ".lora_B.weight"


def export_kohya_lora(lora_path: str | os.PathLike, output_path: str | os.PathLike | None = None) -> str:
    """Convert a diffusers / PEFT LoRA file to a kohya-ss LoRA file, for AUTOMATIC1111, ComfyUI and the like.

    Keys are renamed with diffusers' `convert_all_state_dict_to_peft` and `convert_state_dict_to_kohya`, and then
    corrected where those fall short of what kohya-ss loaders (diffusers' own `load_lora_weights` included) expect:

    - every module gets the `.alpha` of the adapter it was trained with, read from the `LoraConfig` that diffusers
      stores in the file's header (`lora_alpha`, `alpha_pattern`, `use_rslora`), so that the delta keeps its
      alpha / rank scale; without that metadata alpha is the rank (scale 1), as diffusers assumes when loading;
    - the text encoder of a single-encoder model (SD 1.x / 2.x) is named `lora_te_`; `lora_te1_` and `lora_te2_` are
      kept for SDXL, recognised by a `text_encoder_2` in the file;
    - text encoder modules are named under `text_model_`, as in CLIP checkpoints, even when saved from transformers'
      flattened CLIP text models.

    Args:
        lora_path: The LoRA file, or a folder holding `pytorch_lora_weights.safetensors` (a training output or
            checkpoint folder).
        output_path: Where to write the kohya file: a file, or an existing folder to write
            `pytorch_lora_weights_kohya.safetensors` into. By default that file is written beside the input.

    Returns:
        The path of the file written.

    Raises:
        FileNotFoundError: There is no LoRA file at `lora_path`.
        ValueError: The file holds no LoRA weights in diffusers / PEFT format, weights of a component that is not part
            of a Stable Diffusion pipeline, or a DoRA adapter (diffusers' kohya loader discards DoRA magnitudes).
    """
    source = _resolve_lora_file(lora_path)
    target = _resolve_output_file(source, output_path)
    state_dict, metadata = _load_lora_file(source)
    try:
        state_dict = convert_all_state_dict_to_peft(state_dict)
    except ValueError as error:
        raise ValueError(
            f"`{source}` holds no LoRA weights in diffusers / PEFT format (keys such as"
            " `unet.<module>.lora_A.weight`); is it a LoRA file written by `save_lora_weights`?"
        ) from error

    modules = _group_modules(state_dict, source)
    is_sdxl = "text_encoder_2" in {component for component, _ in modules}
    kohya_state_dict: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for (component, module), (down, up) in modules.items():
        name = f"text_model.{module}" if component in _TEXT_ENCODERS and not _has_clip_root(module) else module
        converted = convert_state_dict_to_kohya(
            {f"{component}.{name}{_LORA_DOWN}": down, f"{component}.{name}{_LORA_UP}": up}
        )
        kohya_name = _kohya_module_name(converted, component, is_sdxl, source)
        rank = down.shape[0]
        alpha = _module_alpha(metadata.get(component), module, rank)
        kohya_state_dict[f"{kohya_name}.lora_down.weight"] = down.contiguous()
        kohya_state_dict[f"{kohya_name}.lora_up.weight"] = up.contiguous()
        kohya_state_dict[f"{kohya_name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        alphas[kohya_name], ranks[kohya_name] = alpha, rank

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict, str(target), metadata=_kohya_metadata(ranks, alphas))
    return str(target)


def _resolve_lora_file(lora_path: str | os.PathLike) -> Path:
    """The LoRA file itself, or `pytorch_lora_weights.safetensors` in a folder; it must exist."""
    path = Path(lora_path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME_SAFE
        if not path.is_file():
            raise FileNotFoundError(
                f"No LoRA weights file `{path}`: `{lora_path}` holds no `{LORA_WEIGHT_NAME_SAFE}`."
            )
    elif not path.is_file():
        raise FileNotFoundError(f"LoRA weights file `{path}` does not exist.")
    return path


def _resolve_output_file(source: Path, output_path: str | os.PathLike | None) -> Path:
    """`output_path`, the default file name in it when it is a folder, or the default file beside `source`."""
    if output_path is None:
        target = source.parent / KOHYA_WEIGHT_NAME
    else:
        target = Path(output_path)
        if target.is_dir():
            target = target / KOHYA_WEIGHT_NAME
    if target.resolve() == source.resolve():
        raise ValueError(f"The kohya LoRA file would overwrite its source `{source}`; choose another output path.")
    return target


def _load_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors of a safetensors LoRA file, and diffusers' adapter metadata per component (`unet`, ...)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            state_dict = {key: file.get_tensor(key) for key in file.keys()}
            header = file.metadata() or {}
    except Exception as error:
        raise ValueError(f"`{path}` could not be read as a safetensors LoRA file: {error}") from error
    packed = json.loads(header[LORA_ADAPTER_METADATA_KEY]) if header.get(LORA_ADAPTER_METADATA_KEY) else {}
    metadata: dict[str, dict[str, Any]] = {}
    for component in _COMPONENT_PREFIXES:
        prefix = f"{component}."
        config = {key[len(prefix) :]: value for key, value in packed.items() if key.startswith(prefix)}
        if config:
            metadata[component] = config
    return state_dict, metadata


def _group_modules(
    state_dict: dict[str, torch.Tensor], source: Path
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module name) -> (lora_A, lora_B) weights; anything else in the file is an error."""
    if any("lora_magnitude_vector" in key for key in state_dict):
        raise ValueError(
            f"`{source}` holds a DoRA adapter (`lora_magnitude_vector` weights); only plain LoRA adapters can be"
            " exported to the kohya format, whose DoRA magnitudes diffusers' kohya loader discards."
        )
    downs: dict[tuple[str, str], torch.Tensor] = {}
    ups: dict[tuple[str, str], torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in _COMPONENT_PREFIXES or not rest.endswith((_LORA_DOWN, _LORA_UP)):
            unexpected.append(key)
        elif rest.endswith(_LORA_DOWN):
            downs[component, rest.removesuffix(_LORA_DOWN)] = value
        else:
            ups[component, rest.removesuffix(_LORA_UP)] = value
    if unexpected:
        raise ValueError(
            f"`{source}` holds weights that cannot be exported to the kohya format (expected `lora_A` / `lora_B`"
            f" weights of {', '.join(_COMPONENT_PREFIXES)}): {', '.join(sorted(unexpected)[:5])}"
        )
    unpaired = sorted(f"{component}.{module}" for component, module in downs.keys() ^ ups.keys())
    if unpaired:
        raise ValueError(f"`{source}` lacks the `lora_A` or `lora_B` weight of: {', '.join(unpaired[:5])}")
    return {key: (downs[key], ups[key]) for key in sorted(downs)}


def _has_clip_root(module: str) -> bool:
    """Whether a CLIP text model's module name is rooted as in CLIP checkpoints (`text_model.`, `text_projection`)."""
    return module.startswith(("text_model.", "text_projection"))


def _kohya_module_name(converted: dict[str, torch.Tensor], component: str, is_sdxl: bool, source: Path) -> str:
    """The module name in `convert_state_dict_to_kohya`'s output, with SD 1.x / 2.x's `lora_te_` prefix restored."""
    names = {key.split(".")[0] for key in converted if key.endswith(".lora_down.weight")}
    prefix = f"{_COMPONENT_PREFIXES[component]}_"
    if len(names) != 1 or not next(iter(names)).startswith(prefix):
        raise ValueError(f"`{source}`: diffusers converted `{component}` LoRA keys unexpectedly: {sorted(converted)}")
    name = names.pop()
    if component == "text_encoder" and not is_sdxl:
        name = "lora_te_" + name.removeprefix(prefix)
    return name


def _module_alpha(config: dict[str, Any] | None, module: str, rank: int) -> float:
    """kohya alpha giving `module` the scale it had under PEFT: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    if not config or config.get("lora_alpha") is None:
        return float(rank)
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"]))
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    return alpha


def _kohya_metadata(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, str]:
    """kohya-ss' header fields that UIs show: the network module, and its dim / alpha ("Dynamic" when mixed)."""
    rank_values, alpha_values = set(ranks.values()), set(alphas.values())
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank_values.pop()) if len(rank_values) == 1 else "Dynamic",
        "ss_network_alpha": f"{alpha_values.pop():g}" if len(alpha_values) == 1 else "Dynamic",
    }
