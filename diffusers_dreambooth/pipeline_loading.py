"""Loading the base pipeline that a run starts from."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from .config import DreamBoothConfig


def diffusers_pipeline_class(cls: type) -> type:
    """The first class in `cls`'s MRO that diffusers itself defines (what `model_index.json` must name)."""
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers.") and issubclass(base, DiffusionPipeline):
            return base
    raise TypeError(f"`{cls.__name__}` does not extend a diffusers pipeline class.")


def load_base_pipeline(config: DreamBoothConfig) -> DiffusionPipeline:
    """The base pipeline in float32 (trained weights start in full precision), with optional VAE/tokenizer swaps."""
    source = config.pretrained_model_name_or_path
    if not source:
        raise ValueError("`--pretrained_model_name_or_path` is required: a Hub repo id or a local diffusers folder.")
    local = Path(source)
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise ValueError(
            f"`--pretrained_model_name_or_path={source}` is a folder without `model_index.json`, so not a diffusers"
            " pipeline. Point it at a folder written by `save_pretrained` (or a Hub repo id)."
        )
    overrides = {}
    if config.pretrained_vae_model_name_or_path:
        overrides["vae"] = AutoencoderKL.from_pretrained(
            config.pretrained_vae_model_name_or_path, revision=config.revision, cache_dir=config.cache_dir
        )
    if config.tokenizer_name:
        from transformers import AutoTokenizer

        overrides["tokenizer"] = AutoTokenizer.from_pretrained(
            config.tokenizer_name, revision=config.revision, cache_dir=config.cache_dir
        )
    return DiffusionPipeline.from_pretrained(
        source,
        revision=config.revision,
        variant=config.variant,
        cache_dir=config.cache_dir,
        torch_dtype=torch.float32,
        **overrides,
    )
