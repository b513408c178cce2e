"""`--fsdp_text_encoder`: the frozen LLM text encoder sharded over the training processes with FSDP while the trainer
encodes every prompt.

diffusers' FLUX.2, FLUX.2 [klein], Z-Image and Ideogram 4 scripts take the flag for encoders too large for one GPU
(FLUX.2 [dev]'s Mistral 3 holds 24B parameters). As in those scripts, the pipeline first goes to the training device
whole (class images, if any are missing, are drawn with it); just before the prompts are encoded, each decoder layer
of the encoder becomes an FSDP unit of its own, which keeps this process's shard and frees the rest, and every process
encodes the same prompts in the same order, FSDP gathering one layer at a time from all of them. The layers, not the
whole encoder as diffusers' `wrap_with_fsdp` does: Ideogram 4's pipeline calls the encoder's embeddings and layers
directly, so only units that are themselves called gather their weights; the embeddings and norms (a few percent of
an LLM) stay whole. The cached
embeddings are then all training needs: the sharded encoder is dropped, and loaded again whole only while sampling
needs it (validation and the finishing stages), as every frozen LLM encoder is. With one process there is nothing to
shard over: the encoder runs whole, with a warning. With `--offload`, the shards wait on the CPU between layers
(FSDP's `CPUOffload`; on a GPU only, a CPU run has nowhere else to put them).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from .safeguards import DreamBoothInputError

if TYPE_CHECKING:
    from .config import DreamBoothConfig
    from .families import DreamBoothFamily

logger = logging.getLogger(__name__)


def check_text_encoder_sharding(config: DreamBoothConfig, pipeline_given: bool) -> None:
    """Refuse, before any model loads, what `--fsdp_text_encoder` cannot shard or cannot load again afterwards."""
    if not config.fsdp_text_encoder:
        return
    if pipeline_given:
        why = "a pipeline passed to the trainer: it shards the encoder of a base the trainer loads itself, which it"
        why += " can load again whole for sampling; train from `--pretrained_model_name_or_path` instead"
    elif config.quantize_text_encoders:
        why = "`--quantize_text_encoders`: FSDP shards float weights, not bitsandbytes' quantized ones;"
        why += " remove one of the two"
    elif config.remote_text_encoder:
        why = "`--remote_text_encoder`: the endpoint encodes the prompts, no text encoder loads; remove one of the two"
    else:
        return
    raise DreamBoothInputError(f"`--fsdp_text_encoder` with {why}.")


def shard_text_encoders(config: DreamBoothConfig, family: DreamBoothFamily, accelerator: Accelerator) -> None:
    """With `--fsdp_text_encoder` over several processes, shard each decoder layer of the family's text encoders with
    FSDP, in place (the family reads the option: `check_inputs` refused it otherwise)."""
    if not config.fsdp_text_encoder:
        return
    if accelerator.num_processes < 2:
        logger.warning(
            "`--fsdp_text_encoder` with one process: there is nothing to shard the text encoder over, so it runs"
            " whole. Launch several (`accelerate launch --num_processes N`) to shard it."
        )
        return
    from diffusers.training_utils import get_fsdp_kwargs_from_accelerator
    from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel

    device = accelerator.device
    device = torch.device("cpu") if device.type == "cpu" else device  # FSDP's own name for it ("cpu", not "cpu:0")
    options = {
        "device_id": device,
        "cpu_offload": CPUOffload(offload_params=True) if config.offload and device.type != "cpu" else None,
        "use_orig_params": True,
        "limit_all_gathers": True,
    }
    if getattr(accelerator.state, "fsdp_plugin", None):  # accelerate's FSDP config (`--use_fsdp`): its strategy
        options.update(get_fsdp_kwargs_from_accelerator(accelerator))
    for name in family.text_encoder_names:
        encoder = getattr(family.pipeline, name)
        parameters = sum(parameter.numel() for parameter in encoder.parameters())
        layer_class = decoder_layer_class(encoder)
        layers = [path for path, module in encoder.named_modules() if isinstance(module, layer_class)]
        for path in layers:
            parent, _, child = path.rpartition(".")
            holder = encoder.get_submodule(parent)
            setattr(holder, child, FullyShardedDataParallel(getattr(holder, child), **options))
        held = sum(unit._flat_param.numel() for unit in FullyShardedDataParallel.fsdp_modules(encoder))
        held += sum(p.numel() for n, p in encoder.named_parameters() if "_fsdp_wrapped_module" not in n)
        logger.info(
            "Sharded %s over %d processes with FSDP: this one holds %d of its %d parameters.",
            name,
            accelerator.num_processes,
            held,
            parameters,
        )


def decoder_layer_class(encoder: torch.nn.Module) -> type[torch.nn.Module]:
    """The class of the encoder's most numerous unsplittable block (`_no_split_modules`: its decoder layer), the FSDP
    unit that encoding gathers one at a time."""
    names = set(getattr(encoder, "_no_split_modules", None) or ())
    counts: dict[type[torch.nn.Module], int] = {}
    for module in encoder.modules():
        if type(module).__name__ in names:
            counts[type(module)] = counts.get(type(module), 0) + 1
    if not counts:
        raise DreamBoothInputError(
            f"`--fsdp_text_encoder`: {type(encoder).__name__} names no decoder layer (`_no_split_modules`) to shard"
            " by. Remove the flag."
        )
    return max(counts, key=counts.get)
