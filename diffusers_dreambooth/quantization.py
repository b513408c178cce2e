"""Quantized bases (QLoRA): LoRA adapters in float32 on a frozen denoiser (and optionally frozen text encoders) held
in 4-bit NF4/FP4 or 8-bit bitsandbytes weights.

Two options choose the quantization, for every family:
- `--quantize_base {nf4,int8}` (ours), with `--quantize_text_encoders` to quantize the frozen text encoders too;
- `--bnb_quantization_config_path` (diffusers' FLUX.2, Qwen-Image, Z-Image and HiDream scripts): a JSON file of a
  `BitsAndBytesConfig`, e.g. `{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}`. As in those scripts, a 4-bit
  config computes in the training's weight dtype (`--mixed_precision`, else float32), whatever its
  `bnb_4bit_compute_dtype` says.

Only LoRA trains on a quantized base: a full fine-tune would update the quantized weights themselves, so it is refused
before any model loads (as are trained text encoders with `--quantize_text_encoders`). The frozen quantized base is
never saved: the LoRA file is, with the same keys as on an unquantized base, so it loads on the unquantized base with
plain diffusers' `load_lora_weights`.

How the base is quantized (the decision): diffusers 0.42's bitsandbytes quantizer refuses to run without a GPU
(`validate_environment` raises "No GPU found"), while bitsandbytes 0.50 runs `Linear4bit`/`Linear8bitLt` on the CPU.
So
- with CUDA, the real path: `load_base_pipeline` passes a `PipelineQuantizationConfig` to
  `DiffusionPipeline.from_pretrained(..., quantization_config=...)`, so the quantized components load quantized
  (their full-precision weights never sit in GPU memory);
- without CUDA, the loaded float32 pipeline's `nn.Linear` layers are swapped for bitsandbytes layers holding the same
  weights, quantized as they are built (`quantize_base`), after loading and before the adapters are added. peft's
  LoRA wraps those layers as it wraps `nn.Linear`. The layers skipped are those diffusers' and transformers'
  quantizers skip: `llm_int8_skip_modules`, the model's `_keep_in_fp32_modules`, and a text encoder's `lm_head`.
Either way the trainer calls `quantize_base` once (a no-op for components that loaded quantized) and casts the
frozen base with `cast_frozen_base` (quantized diffusers models refuse `.to(dtype)`).

`--do_fp8_training` (diffusers' FLUX.2, Z-Image, Krea 2 and Ideogram 4 scripts) is the other kind: the denoiser's
weights stay as they are, and its linear layers compute in FP8 (torchao's `convert_to_float8_training`, with the
scripts' filter and `pad_inner_dim`), LoRA or full. It needs torchao, and on a GPU FP8 matrix units (compute
capability 8.9: Ada, Hopper and later); PyTorch's CPU runs the same FP8 matrix products, which the tests use. It is
refused in one line before any model loads where it cannot run, and with a bitsandbytes base (whose layers it would
replace).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .safeguards import DreamBoothInputError

if TYPE_CHECKING:
    from diffusers import BitsAndBytesConfig, DiffusionPipeline

    from .config import DreamBoothConfig
    from .families import DreamBoothFamily

#: `--quantize_base` values and the `BitsAndBytesConfig` each stands for.
QUANTIZE_BASE_CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "int8": {"load_in_8bit": True},
}

#: Modules of transformers' text encoders that its bitsandbytes quantizer keeps in full precision.
_TEXT_ENCODER_SKIPS = ("lm_head",)


def check_quantization_options(config: DreamBoothConfig) -> None:
    """Raise `DreamBoothInputError` (one line naming the option) for a quantization the run cannot train with: a full
    fine-tune, both options at once, `--quantize_text_encoders` alone or with trained text encoders. Needs no files:
    `DreamBoothConfig` calls it when options are parsed; `check_quantization_file` checks the JSON file."""
    option = quantization_option(config)
    if config.do_fp8_training and option is not None:
        raise DreamBoothInputError(
            f"`--do_fp8_training` computes the denoiser's layers in FP8, but `{option}` replaces them with"
            " bitsandbytes layers; pass one of the two."
        )
    if config.quantize_base is not None and config.bnb_quantization_config_path is not None:
        raise DreamBoothInputError(
            "`--quantize_base` and `--bnb_quantization_config_path` both quantize the base model; pass one of them."
        )
    if option is None:
        if config.quantize_text_encoders:
            raise DreamBoothInputError(
                "`--quantize_text_encoders` quantizes the frozen text encoders like the base model, so it needs"
                " `--quantize_base nf4|int8` or `--bnb_quantization_config_path`."
            )
        return
    if config.adapter != "lora":
        raise DreamBoothInputError(
            f"`{option}` quantizes the base model, which then cannot be fine-tuned whole: train `--adapter lora` on"
            " it (QLoRA), or remove the option for a full fine-tune."
        )
    if config.quantize_text_encoders and (config.train_text_encoder or config.train_text_encoder_ti):
        raise DreamBoothInputError(
            "`--quantize_text_encoders` quantizes frozen text encoders, but `--train_text_encoder(_ti)` trains them;"
            " drop one of the two."
        )


def quantization_option(config: DreamBoothConfig) -> str | None:
    """The option that quantizes the base, as a flag for messages, or None."""
    if config.bnb_quantization_config_path is not None:
        return f"--bnb_quantization_config_path={config.bnb_quantization_config_path}"
    if config.quantize_base is not None:
        return f"--quantize_base={config.quantize_base}"
    return None


def check_quantization_file(config: DreamBoothConfig) -> None:
    """Raise `DreamBoothInputError` unless `--bnb_quantization_config_path` (if set) is a readable JSON object that
    `BitsAndBytesConfig` accepts, asking for 4-bit or 8-bit weights, and unless `--do_fp8_training` (if set) can run
    here. Runs before any model loads."""
    quantization_kwargs(config)
    if config.do_fp8_training:
        check_fp8_training()


def check_fp8_training() -> None:
    """Raise `DreamBoothInputError` where `--do_fp8_training` cannot run: without torchao, or on a GPU without FP8
    matrix units (compute capability below 8.9)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise DreamBoothInputError(
            "`--do_fp8_training` needs torchao: `pip install torchao`, or remove the flag."
        ) from None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise DreamBoothInputError(
            f"`--do_fp8_training` needs a GPU with FP8 matrix units (compute capability 8.9 or higher: Ada, Hopper);"
            f" {torch.cuda.get_device_name()} has {major}.{minor}. Remove the flag and train in `--mixed_precision"
            " bf16`."
        )


def fp8_convertible(module: torch.nn.Module, name: str) -> bool:
    """Which layers `--do_fp8_training` converts, as diffusers' scripts filter them: not the output projection, and
    only linear layers whose sizes are multiples of 16 (what FP8 matrix products take)."""
    if name == "proj_out":
        return False
    if isinstance(module, torch.nn.Linear):
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    return True


def convert_to_fp8_training(denoiser: torch.nn.Module) -> None:
    """Swap the denoiser's linear layers for torchao's `Float8Linear` (same weights and names), in place."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        denoiser, module_filter_fn=fp8_convertible, config=Float8LinearConfig(pad_inner_dim=True)
    )


def quantization_kwargs(config: DreamBoothConfig) -> dict[str, Any] | None:
    """The `BitsAndBytesConfig` arguments the run quantizes with (the compute dtype left out), or None."""
    if config.quantize_base is not None:
        return dict(QUANTIZE_BASE_CONFIGS[config.quantize_base])
    path = config.bnb_quantization_config_path
    if path is None:
        return None
    option = f"`--bnb_quantization_config_path={path}`"
    if not Path(path).is_file():
        raise DreamBoothInputError(f"{option} does not exist; pass a JSON file of a bitsandbytes config.")
    try:
        kwargs = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DreamBoothInputError(
            f'{option} is not a valid JSON file ({reason}); write e.g. {{"load_in_4bit": true,'
            ' "bnb_4bit_quant_type": "nf4"}.'
        ) from error
    if not isinstance(kwargs, dict):
        raise DreamBoothInputError(f"{option} must hold a JSON object of `BitsAndBytesConfig` arguments.")
    kwargs.pop("bnb_4bit_compute_dtype", None)  # the training's weight dtype, as in diffusers' scripts
    try:
        bnb_config = _bnb_config(kwargs, torch.float32)
    except (TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DreamBoothInputError(f"{option} is not a valid `BitsAndBytesConfig`: {reason}") from error
    if not (bnb_config.load_in_4bit or bnb_config.load_in_8bit):
        raise DreamBoothInputError(
            f'{option} quantizes nothing: set `"load_in_4bit": true` or `"load_in_8bit": true` in it.'
        )
    return kwargs


def _bnb_config(kwargs: dict[str, Any], compute_dtype: torch.dtype | None) -> BitsAndBytesConfig:
    """The bitsandbytes config of `kwargs`, 4-bit layers computing in `compute_dtype` (float32 when None)."""
    from diffusers import BitsAndBytesConfig

    compute_dtype = compute_dtype or torch.float32
    extra = {"bnb_4bit_compute_dtype": compute_dtype} if kwargs.get("load_in_4bit") else {}
    return BitsAndBytesConfig(**kwargs, **extra)


def quantized_component_names(config: DreamBoothConfig, family: type[DreamBoothFamily]) -> list[str]:
    """The pipeline components the run quantizes: the denoiser, and the text encoders with
    `--quantize_text_encoders`."""
    names = [family.denoiser_name]
    if config.quantize_text_encoders:
        names += list(family.text_encoder_names)
    return names


def loads_quantized() -> bool:
    """Whether quantized components load quantized through diffusers (it needs a GPU), not swapped after loading."""
    return torch.cuda.is_available()


def _loading_quantization(config: DreamBoothConfig) -> tuple[dict[str, Any], list[str]] | None:
    """(the `BitsAndBytesConfig` arguments with the compute dtype, the component names) of a run whose components
    load quantized, or None: no quantization, no GPU, or a pipeline of no family the trainer knows."""
    kwargs = quantization_kwargs(config)
    if kwargs is None or not loads_quantized():
        return None
    from diffusers import DiffusionPipeline

    from .families import family_class_named

    options = dict(revision=config.revision, cache_dir=config.cache_dir)
    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, **options)
    family = family_class_named(index.get("_class_name"))
    if family is None:  # not a family the trainer knows: `family_for_pipeline` says so once it is loaded
        return None
    compute = {"bnb_4bit_compute_dtype": _weight_dtype(config)} if kwargs.get("load_in_4bit") else {}
    return {**kwargs, **compute}, quantized_component_names(config, family)


def pipeline_quantization_loading(config: DreamBoothConfig) -> dict[str, Any]:
    """`DiffusionPipeline.from_pretrained`'s `quantization_config` argument for the run (empty without quantization
    or without a GPU): diffusers' bitsandbytes config for the denoiser, transformers' for text encoders."""
    loading = _loading_quantization(config)
    if loading is None:
        return {}
    from diffusers import PipelineQuantizationConfig

    kwargs, names = loading
    backend = "bitsandbytes_4bit" if kwargs.get("load_in_4bit") else "bitsandbytes_8bit"
    quantization = PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=names)
    return {"quantization_config": quantization}


def component_quantization_loading(config: DreamBoothConfig, name: str, library: str) -> dict[str, Any]:
    """`from_pretrained`'s `quantization_config` argument for the base component `name` (of `library`, `diffusers` or
    `transformers`) loaded alone, as `pipeline_quantization_loading` quantizes it in the pipeline (empty where that
    loads it unquantized)."""
    loading = _loading_quantization(config)
    if loading is None or name not in loading[1]:
        return {}
    if library == "transformers":
        from transformers import BitsAndBytesConfig
    else:
        from diffusers import BitsAndBytesConfig
    return {"quantization_config": BitsAndBytesConfig(**loading[0])}


def _weight_dtype(config: DreamBoothConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision or "no", torch.float32)


def quantize_base(
    pipeline: DiffusionPipeline, family: DreamBoothFamily, config: DreamBoothConfig, dtype: torch.dtype | None
) -> None:
    """Quantize the run's components in place (see the module docstring), computing in `dtype` (the mixed-precision
    dtype, else float32). Components that loaded quantized, and runs without quantization, are left as they are.
    With `--do_fp8_training`, the denoiser's linear layers are converted to FP8 compute instead."""
    if config.do_fp8_training:
        convert_to_fp8_training(family.denoiser)
    kwargs = quantization_kwargs(config)
    if kwargs is None:
        return
    bnb_config = _bnb_config(kwargs, dtype)
    for name in quantized_component_names(config, type(family)):
        module = getattr(pipeline, name, None)
        if module is not None:
            _swap_component(module, name, type(family), bnb_config)


def quantize_component(
    module: torch.nn.Module,
    name: str,
    family: type[DreamBoothFamily],
    config: DreamBoothConfig,
    dtype: torch.dtype | None,
) -> None:
    """Quantize the pipeline component `name` as `quantize_base` does, when the run quantizes it: for a component
    loaded again after its release."""
    kwargs = quantization_kwargs(config)
    if kwargs is not None and name in quantized_component_names(config, family):
        _swap_component(module, name, family, _bnb_config(kwargs, dtype))


def _swap_component(
    module: torch.nn.Module, name: str, family: type[DreamBoothFamily], bnb_config: BitsAndBytesConfig
) -> None:
    """Swap the component's linear layers for `bnb_config`'s bitsandbytes ones, unless it loaded quantized."""
    if is_quantized(module):
        return
    skip = set(bnb_config.llm_int8_skip_modules or ()) | set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if name != family.denoiser_name:
        skip.update(_TEXT_ENCODER_SKIPS)
    swap_linear_layers(module, bnb_config, skip)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds bitsandbytes layers (loaded quantized, or swapped by `quantize_base`)."""
    import bitsandbytes as bnb

    return getattr(module, "is_quantized", False) or any(
        isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for layer in module.modules()
    )


def swap_linear_layers(module: torch.nn.Module, bnb_config, skip: set[str]) -> int:
    """Replace every `nn.Linear` of `module` (not under a name or name part in `skip`) with the bitsandbytes layer
    of `bnb_config` holding its weights, quantized on its device. Returns the number of layers swapped."""
    swapped = 0
    for name, layer in list(module.named_modules()):
        if type(layer) is not torch.nn.Linear or _skipped(name, skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _quantized_linear(layer, bnb_config))
        swapped += 1
    return swapped


def _skipped(name: str, skip: set[str]) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith(f".{s}") or s in parts for s in skip)


def _quantized_linear(layer: torch.nn.Linear, bnb_config) -> torch.nn.Module:
    import bitsandbytes as bnb

    weight = layer.weight.data
    has_bias = layer.bias is not None
    if bnb_config.load_in_4bit:
        compute_dtype = bnb_config.bnb_4bit_compute_dtype
        quantized = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=bnb_config.bnb_4bit_use_double_quant,
            quant_type=bnb_config.bnb_4bit_quant_type,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            compress_statistics=bnb_config.bnb_4bit_use_double_quant,
            quant_type=bnb_config.bnb_4bit_quant_type,
            module=quantized,
        )
        # bitsandbytes repacks the weights in place for its CPU inference kernel, which needs in-features that are a
        # multiple of the block size and breaks training after it: the training kernel serves inference too.
        quantized.support_avx512bf16_for_cpu = False
    else:
        quantized = _flat_input_linear8bit()(
            layer.in_features,
            layer.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=bnb_config.llm_int8_threshold,
            device="meta",
        )
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        quantized.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    return quantized.to(weight.device)  # bitsandbytes quantizes the weights as they move to a device


@functools.cache
def _flat_input_linear8bit() -> type:
    import bitsandbytes as bnb

    class FlatInputLinear8bitLt(bnb.nn.Linear8bitLt):
        """`Linear8bitLt` on rows: bitsandbytes' CPU int8 kernel fails on some inputs of more than two dimensions
        (Krea 2's sampling), so the input is flattened to 2-D and the output given back its shape."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)

    return FlatInputLinear8bitLt


def cast_frozen_base(module: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Cast a module whose LoRA adapters are about to be added to the mixed-precision `dtype` (if any). bitsandbytes
    weights are integers, which `.to(dtype)` keeps; a model that loaded quantized refuses `.to(dtype)`, so its other
    parameters (norms, biases) stay as loaded."""
    if dtype is not None and not getattr(module, "is_quantized", False):
        module.to(dtype=dtype)
