"""Loading the base pipeline that a run starts from."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from .config import DreamBoothConfig
from .quantization import component_quantization_loading, pipeline_quantization_loading
from .safeguards import PICKLE_REMEDY, DreamBoothInputError

logger = logging.getLogger(__name__)


def diffusers_pipeline_class(cls: type) -> type:
    """The first class in `cls`'s MRO that diffusers itself defines (what `model_index.json` must name)."""
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers.") and issubclass(base, DiffusionPipeline):
            return base
    raise TypeError(f"`{cls.__name__}` does not extend a diffusers pipeline class.")


def load_base_pipeline(config: DreamBoothConfig) -> DiffusionPipeline:
    """The base pipeline in float32 (trained weights start in full precision), with optional VAE/tokenizer swaps.

    Weights load from safetensors only unless `config.allow_pickle`; a failure says in one line what was found.
    """
    source = config.pretrained_model_name_or_path
    check_pipeline_source(source)
    use_safetensors = None if config.allow_pickle else True
    overrides = {}
    if config.pretrained_vae_model_name_or_path:
        with readable_load_errors("pretrained_vae_model_name_or_path", config.pretrained_vae_model_name_or_path):
            overrides["vae"] = AutoencoderKL.from_pretrained(
                config.pretrained_vae_model_name_or_path,
                revision=config.revision,
                cache_dir=config.cache_dir,
                use_safetensors=use_safetensors,
            )
    if config.tokenizer_name:
        from transformers import AutoTokenizer

        overrides["tokenizer"] = AutoTokenizer.from_pretrained(
            config.tokenizer_name, revision=config.revision, cache_dir=config.cache_dir
        )
    for name, path in separate_component_sources(config).items():
        overrides[name] = load_separate_component(config, name, path, torch.float32)
    if config.remote_text_encoder:  # FLUX.2 [dev]'s prompts are encoded remotely: its Mistral 3 never loads
        overrides["text_encoder"] = None
    with readable_load_errors("pretrained_model_name_or_path", source):
        return load_pipeline(
            source,
            revision=config.revision,
            cache_dir=config.cache_dir,
            variant=config.variant,
            dtype=torch.float32,
            use_safetensors=use_safetensors,
            **overrides,
            **pipeline_quantization_loading(config),
        )


def load_pipeline(
    source: str, revision: str | None = None, cache_dir: str | None = None, **kwargs
) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained`, where a processor component that cannot load here is replaced by its
    tokenizer alone (`processor_tokenizers`), set after loading since diffusers checks a passed component's class."""
    tokenizers = processor_tokenizers(source, revision, cache_dir, skip=kwargs)
    kwargs.update(dict.fromkeys(tokenizers))
    pipeline = DiffusionPipeline.from_pretrained(source, revision=revision, cache_dir=cache_dir, **kwargs)
    pipeline.register_modules(**tokenizers)
    return pipeline


def load_base_component(config: DreamBoothConfig, name: str, torch_dtype: torch.dtype) -> torch.nn.Module:
    """The base pipeline's component `name` loaded again, alone, as `load_base_pipeline` loaded it (its class as
    `model_index.json` names it, quantized on a GPU as the run quantizes it), in `torch_dtype`."""
    if name in (separate := separate_component_sources(config)):
        return load_separate_component(config, name, separate[name], torch_dtype)
    source = config.pretrained_model_name_or_path
    options = dict(revision=config.revision, cache_dir=config.cache_dir)
    library, class_name = DiffusionPipeline.load_config(source, **options)[name]
    component_class = getattr(importlib.import_module(library), class_name)
    with readable_load_errors("pretrained_model_name_or_path", source):
        return component_class.from_pretrained(
            source,
            subfolder=name,
            variant=config.variant,
            torch_dtype=torch_dtype,
            use_safetensors=None if config.allow_pickle else True,
            **component_quantization_loading(config, name, library),
            **options,
        )


def processor_tokenizers(
    source: str, revision: str | None = None, cache_dir: str | None = None, skip: Mapping[str, Any] = {}
) -> dict[str, Any]:
    """The tokenizer alone of each transformers processor component of the pipeline `source` that cannot be loaded
    here, by component name: what to pass to `from_pretrained` so that it loads.

    FLUX.2 [dev]'s `tokenizer` is a `PixtralProcessor`, which transformers loads only with torchvision; its pipeline
    reads only the tokenizer's `apply_chat_template` from it, so training and text-to-image sampling need no more.
    Components in `skip` (given otherwise) are left out. A full fine-tune then saves that tokenizer in its place.
    """
    import transformers
    from transformers import AutoTokenizer

    options = dict(revision=revision, cache_dir=cache_dir)
    tokenizers = {}
    for name, spec in DiffusionPipeline.load_config(source, **options).items():
        if name in skip or not isinstance(spec, list) or len(spec) != 2 or spec[0] != "transformers":
            continue
        if not (spec[1] or "").endswith("Processor"):
            continue
        try:  # a class whose backend is missing is a placeholder that raises on use
            getattr(transformers, spec[1]).from_pretrained  # noqa: B018
        except ImportError as error:
            reason = str(error).strip().splitlines()[0]
            logger.warning("`%s` (%s) cannot load here (%s): loading its tokenizer alone.", name, spec[1], reason)
            tokenizers[name] = AutoTokenizer.from_pretrained(source, subfolder=name, **options)
    return tokenizers


#: Components that a diffusers script loads from an option of their own rather than from the pipeline folder:
#: HiDream's Llama 3.1 text encoder and tokenizer (`train_dreambooth_lora_hidream.py`).
SEPARATE_COMPONENTS = {
    "text_encoder_4": "pretrained_text_encoder_4_name_or_path",
    "tokenizer_4": "pretrained_tokenizer_4_name_or_path",
}
#: The script's default for both, used where a HiDream pipeline folder names no Llama of its own.
HIDREAM_LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def separate_component_sources(config: DreamBoothConfig) -> dict[str, str]:
    """`{component: path}` of the `SEPARATE_COMPONENTS` to load from their option: those given, and for a HiDream
    folder whose `model_index.json` names no `text_encoder_4`/`tokenizer_4`, diffusers' default Llama."""
    given = {name: getattr(config, option) for name, option in SEPARATE_COMPONENTS.items()}
    sources = {name: path for name, path in given.items() if path}
    if len(sources) < len(SEPARATE_COMPONENTS):
        try:
            index = DiffusionPipeline.load_config(
                config.pretrained_model_name_or_path, revision=config.revision, cache_dir=config.cache_dir
            )
        except (OSError, ValueError):
            return sources  # loading the pipeline itself says why
        if index.get("_class_name") == "HiDreamImagePipeline":
            for name in SEPARATE_COMPONENTS:
                if name not in sources and not any(index.get(name) or [None]):
                    sources[name] = HIDREAM_LLAMA
    return sources


def load_separate_component(config: DreamBoothConfig, name: str, path: str, torch_dtype: torch.dtype) -> Any:
    """A `SEPARATE_COMPONENTS` entry from its own `path`, as the script loads it: the tokenizer with its end-of-text
    token as padding, the text encoder a causal LM returning its hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = dict(revision=config.revision, cache_dir=config.cache_dir)
    with readable_load_errors(SEPARATE_COMPONENTS[name], path):
        if name.startswith("tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(path, **options)
            tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
        return AutoModelForCausalLM.from_pretrained(
            path,
            output_hidden_states=True,
            output_attentions=True,
            dtype=torch_dtype,
            use_safetensors=None if config.allow_pickle else True,
            **options,
        )


def check_pipeline_source(source: str | None) -> None:
    """Raise `DreamBoothInputError` if `--pretrained_model_name_or_path` is unset, or a folder without
    `model_index.json`; a Hub id or a pipeline folder passes. Needs no weights, so it runs before loading."""
    if not source:
        raise DreamBoothInputError(
            "`--pretrained_model_name_or_path` is required: a Hub repo id or a local diffusers folder."
        )
    local = Path(source)
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise DreamBoothInputError(
            f"`--pretrained_model_name_or_path={source}` is a folder without `model_index.json`, so not a diffusers"
            " pipeline. Point it at a folder written by `save_pretrained` (or a Hub repo id)."
        )


@contextlib.contextmanager
def readable_load_errors(option: str, source: str) -> Iterator[None]:
    """Turn the loaders' multi-line `OSError`s into one line naming the option, what was found and what to do."""
    try:
        yield
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "safetensors" in reason:
            hint = f"Its weights are only in pickle files (`.bin`); {PICKLE_REMEDY}"
        elif not Path(source).exists() and huggingface_hub.is_offline_mode():
            hint = (
                "It is not a local folder and the Hub is offline (HF_HUB_OFFLINE): download it first where the Hub"
                f" is reachable (`hf download {source}`), or pass a local diffusers folder."
            )
        elif not Path(source).exists():
            hint = "It is not a local folder; check the Hub repo id (and `--revision`), your network and your token."
        else:
            hint = "Point it at a folder written by `save_pretrained`."
        raise DreamBoothInputError(f"Could not load `--{option}={source}`: {reason} {hint}") from error
