"""The optimizer a run steps with, and the memory a run hands back once it no longer needs it (issue #21).

After the last step the run keeps only what the stages after it need: the trained weights. `release_training_state`
drops the optimizer's per-parameter state (Adam's two moments: twice the trained weights, for a full fine-tune twice
the denoiser) and any gradient, before the final save and the samples and evaluation drawn after it. `free_memory`
returns freed memory at phase boundaries: on a GPU, the caching allocator's unused blocks (`torch.cuda.empty_cache`);
on Linux, the C heap's free pages (glibc's `malloc_trim`), which the process would otherwise keep resident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import sys

import torch
from accelerate.utils.memory import clear_device_cache

from .config import DreamBoothConfig
from .safeguards import DreamBoothInputError


def release_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Drop `optimizer`'s per-parameter state and every gradient of its parameters; its `param_groups` (parameters,
    learning rates) stay. Accelerate's wrapper is unwrapped. The optimizer can step again: its state starts anew."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()


def free_memory() -> None:
    """Collect garbage and give freed memory back: the accelerator's cache, and the C heap on Linux."""
    clear_device_cache(garbage_collection=True)  # accelerate's: gc, then the accelerator's cache (CUDA, XPU, MPS)
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None off Linux or with another C library (musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def check_optimizer_installed(config: DreamBoothConfig) -> None:
    """Raise `DreamBoothInputError` before any model loads when the optimizer's package is missing."""
    if config.optimizer.lower() == "prodigy":
        option, package = "--optimizer prodigy", "prodigyopt"
    elif config.use_8bit_adam:
        option, package = "--use_8bit_adam", "bitsandbytes"
    else:
        return
    if importlib.util.find_spec(package) is None:
        raise DreamBoothInputError(f"`{option}` needs {package}: `pip install {package}`, or remove the option.")


def make_optimizer(config: DreamBoothConfig, param_groups: list[dict], learning_rate: float) -> torch.optim.Optimizer:
    """The run's optimizer over `param_groups`: `--optimizer prodigy`, `--use_8bit_adam` (bitsandbytes), else AdamW."""
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer.lower() == "prodigy":
        from prodigyopt import Prodigy  # installed: `check_optimizer_installed`

        return Prodigy(
            param_groups,
            lr=learning_rate,
            betas=betas,
            beta3=config.prodigy_beta3,
            eps=config.adam_epsilon,
            decouple=config.prodigy_decouple,
            use_bias_correction=config.prodigy_use_bias_correction,
            safeguard_warmup=config.prodigy_safeguard_warmup,
        )
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=learning_rate, betas=betas, eps=config.adam_epsilon)
    # The fused kernel does the whole update in one pass (4.5x faster than the default loop on CPU for the toy UNet).
    devices = {p.device.type for group in param_groups for p in group["params"]}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, eps=config.adam_epsilon, fused=fused)
