"""Quantized bases (QLoRA, #17): LoRA in float32 on a 4-bit NF4 or 8-bit bitsandbytes base, for every family.

Without a GPU the base's `nn.Linear` layers are swapped for bitsandbytes layers after loading (diffusers' quantizer
needs a GPU); the tests run that path on the tiny pipelines, and check the GPU path's loading arguments."""

import json
import pkgutil
import shutil

import bitsandbytes as bnb
import diffusers
import pytest
import torch
import transformers
from conftest import tiny_config, write_subject_images
from diffusers import DiffusionPipeline, PipelineQuantizationConfig
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

import diffusers_dreambooth.testing_utils as testing_utils
from diffusers_dreambooth import DreamBoothTrainer, quantization
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families import family_for_pipeline
from diffusers_dreambooth.safeguards import DreamBoothInputError

#: Existing families, and every family module of `testing_utils` (the new families of #17).
FAMILIES = ["sd", "sdxl", "sd3", "flux", "if"] + sorted(
    info.name for info in pkgutil.iter_modules(testing_utils.__path__) if not info.name.startswith("_")
)
LAYERS = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


class FixedBatchProbe(DreamBoothTrainer):
    """Records the loss of fixed micro-batches (same photo, noise and timesteps) before and after training."""

    def _run_loop(self) -> None:
        self.fixed_losses = [self.fixed_loss()]
        super()._run_loop()
        self.fixed_losses.append(self.fixed_loss())

    @torch.no_grad()
    def fixed_loss(self) -> float:
        return sum(self._micro_step(step).loss.item() for step in range(4)) / 4


@pytest.fixture
def one_photo(tmp_path):
    """One square photo at the training resolution: every batch is the same image."""
    return write_subject_images(tmp_path / "photo", count=1, size=(32, 32))


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `module` by layer name, whatever the adapter's name (`default`, `default_0`)."""
    state = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            layer, _, rest = key.partition(".lora_")
            state[f"{layer}.lora_{rest.split('.')[0]}"] = value
    return state


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_on_a_quantized_base_and_loads_on_the_unquantized_one(
    family, mode, pipeline_dirs, one_photo, tmp_path
):
    config = tiny_config(
        pipeline_dirs[family],
        one_photo,
        tmp_path / "out",
        adapter="lora",
        rank=4,
        quantize_base=mode,
        max_train_steps=30,
        learning_rate=1e-2,
        checkpointing_steps=100,
        center_crop=True,
        skip_final_inference=True,  # card samples at the pipelines' default sizes are what this test does not need
    )
    trainer = FixedBatchProbe(config)
    pipeline = trainer.train()
    denoiser = getattr(pipeline, trainer.family.denoiser_name)

    quantized = [layer for layer in denoiser.modules() if isinstance(layer, LAYERS[mode])]
    plain_layers = [name for name, layer in denoiser.named_modules() if type(layer) is torch.nn.Linear]
    assert quantized and all(".lora_" in name for name in plain_layers)  # LoRA's own layers are float32
    assert all(p.dtype == torch.float32 for name, p in denoiser.named_parameters() if p.requires_grad)
    assert all("lora_" in name for name, p in denoiser.named_parameters() if p.requires_grad)
    before, after = trainer.fixed_losses
    assert after < 0.98 * before, trainer.fixed_losses

    # Only the adapter is saved, and it loads on the unquantized base in plain diffusers.
    out = tmp_path / "out"
    assert (out / LORA_WEIGHT_NAME_SAFE).is_file()
    assert not (out / trainer.family.denoiser_name).exists()
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs[family])
    plain.load_lora_weights(out)
    plain_denoiser = getattr(plain, trainer.family.denoiser_name)
    assert not quantization.is_quantized(plain_denoiser)
    trained, loaded = lora_state(denoiser), lora_state(plain_denoiser)
    assert trained.keys() == loaded.keys() and trained
    assert all(torch.equal(trained[key], loaded[key]) for key in trained)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_resumed_quantized_run_matches_an_unbroken_one(mode, pipeline_dirs, instance_dir, tmp_path):
    options = dict(
        adapter="lora", rank=4, quantize_base=mode, max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear"
    )
    unbroken = DreamBoothTrainer(tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **options)).train()
    expected = lora_state(unbroken.unet)

    out = tmp_path / "out"  # a run that died after its step-2 checkpoint
    for path in out.iterdir():
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    config = tiny_config(pipeline_dirs["sd"], instance_dir, out, resume_from_checkpoint="latest", **options)
    resumed = DreamBoothTrainer(config).train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    actual = lora_state(resumed.unet)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_bnb_quantization_config_path_quantizes_as_the_json_says(pipeline_dirs, instance_dir, tmp_path):
    path = tmp_path / "4bit.json"  # diffusers' README_qwen.md's config
    path.write_text(
        json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"})
    )
    flags = [
        f"--pretrained_model_name_or_path={pipeline_dirs['sd3']}",
        f"--instance_data_dir={instance_dir}",
        "--instance_prompt=a photo of sks dog",
        f"--output_dir={tmp_path / 'out'}",
        "--adapter=lora",
        "--resolution=32",
        "--max_train_steps=2",
        "--report_to=none",
        f"--bnb_quantization_config_path={path}",
        "--quantize_text_encoders",
    ]
    pipeline = DreamBoothTrainer(parse_config(flags)).train()
    layers = [layer for layer in pipeline.transformer.modules() if isinstance(layer, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.quant_type == "nf4" for layer in layers)
    # Without mixed precision the weights compute in float32, as diffusers' scripts set the compute dtype.
    assert all(layer.compute_dtype == torch.float32 for layer in layers)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert any(isinstance(layer, bnb.nn.Linear4bit) for layer in getattr(pipeline, name).modules()), name
    assert (tmp_path / "out" / LORA_WEIGHT_NAME_SAFE).is_file()


def test_released_text_encoders_come_back_quantized(pipeline_dirs, instance_dir, tmp_path, monkeypatch):
    """A run that drops its frozen text encoders between samplings (the LLM families; off a GPU, every family: SD3
    here) loads them again quantized as they were, at each validation and for the returned pipeline: reloaded whole,
    FLUX.2's 24B Mistral would not fit the GPU its quantized copy was chosen for."""
    from diffusers_dreambooth import trainer as trainer_module

    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    at_validation = []

    def recording_validation(pipeline, *args, **kwargs):
        at_validation.append([quantization.is_quantized(getattr(pipeline, name)) for name in names])

    monkeypatch.setattr(trainer_module, "run_validation", recording_validation)
    config = tiny_config(
        pipeline_dirs["sd3"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        quantize_base="nf4",
        quantize_text_encoders=True,
        max_train_steps=2,
        validation_prompt="a photo of sks dog",
        validation_steps=1,
        num_validation_images=1,
    )
    pipeline = DreamBoothTrainer(config).train()
    assert at_validation == [[True] * 3] * 2
    assert all(quantization.is_quantized(getattr(pipeline, name)) for name in names)


def test_quantized_text_encoders_keep_their_output_head(pipeline_dirs):
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    config = tiny_config(pipeline_dirs["sd"], "dog", "out", adapter="lora", quantize_base="int8")
    quantization.quantize_base(pipeline, family_for_pipeline(pipeline), config, None)
    assert not quantization.is_quantized(pipeline.text_encoder)  # frozen text encoders stay unless asked
    assert quantization.is_quantized(pipeline.unet)
    skipped = quantization.swap_linear_layers(
        torch.nn.ModuleDict({"lm_head": torch.nn.Linear(64, 64)}), None, {"lm_head"}
    )
    assert skipped == 0


def test_on_a_gpu_the_pipeline_loads_quantized(pipeline_dirs, monkeypatch):
    config = tiny_config(
        pipeline_dirs["flux"],
        "dog",
        "out",
        adapter="lora",
        quantize_base="nf4",
        quantize_text_encoders=True,
        mixed_precision="bf16",
    )
    if not torch.cuda.is_available():  # the loaded pipeline's layers are swapped instead
        assert quantization.pipeline_quantization_loading(config) == {}
    monkeypatch.setattr(quantization, "loads_quantized", lambda: True)
    loading = quantization.pipeline_quantization_loading(config)["quantization_config"]
    assert isinstance(loading, PipelineQuantizationConfig)
    assert loading.quant_backend == "bitsandbytes_4bit"
    assert loading.components_to_quantize == ["transformer", "text_encoder", "text_encoder_2"]
    assert loading.quant_kwargs == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    int8 = tiny_config(pipeline_dirs["sd"], "dog", "out", adapter="lora", quantize_base="int8")
    loading = quantization.pipeline_quantization_loading(int8)["quantization_config"]
    assert loading.quant_backend == "bitsandbytes_8bit" and loading.components_to_quantize == ["unet"]
    # A component loaded again alone (a released text encoder) gets the same config, of its own library.
    encoder = quantization.component_quantization_loading(config, "text_encoder_2", "transformers")
    assert isinstance(encoder["quantization_config"], transformers.BitsAndBytesConfig)
    assert encoder["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert encoder["quantization_config"].bnb_4bit_quant_type == "nf4"
    denoiser = quantization.component_quantization_loading(config, "transformer", "diffusers")
    assert isinstance(denoiser["quantization_config"], diffusers.BitsAndBytesConfig)
    assert quantization.component_quantization_loading(int8, "text_encoder", "transformers") == {}


def one_line_error(config) -> str:
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not a valid JSON file"),
        ('["load_in_4bit"]', "must hold a JSON object"),
        ('{"load_in_4bit": true, "load_in_8bit": true}', "is not a valid `BitsAndBytesConfig`"),
        ('{"bnb_4bit_quant_type": "nf4"}', "quantizes nothing"),
    ],
)
def test_bad_quantization_files_stop_in_one_line_naming_the_option(
    content, expected, pipeline_dirs, instance_dir, tmp_path
):
    path = tmp_path / "bad.json"
    path.write_text(content)
    config = tiny_config(
        pipeline_dirs["sd"], instance_dir, tmp_path / "out", adapter="lora", bnb_quantization_config_path=str(path)
    )
    error = one_line_error(config)
    assert "`--bnb_quantization_config_path=" in error and expected in error


def test_a_missing_quantization_file_stops_before_loading(instance_dir, tmp_path):
    config = tiny_config(
        tmp_path / "no-model", instance_dir, tmp_path / "out", adapter="lora", bnb_quantization_config_path="4bit.json"
    )
    error = one_line_error(config)
    assert "`--bnb_quantization_config_path=4bit.json` does not exist" in error


@pytest.mark.parametrize(
    "options, option",
    [
        (dict(adapter="full", quantize_base="nf4"), "`--quantize_base=nf4`"),
        (dict(adapter="full", bnb_quantization_config_path="4bit.json"), "`--bnb_quantization_config_path=4bit.json`"),
        (dict(adapter="lora", quantize_base="nf4", bnb_quantization_config_path="4bit.json"), "`--quantize_base`"),
        (dict(adapter="lora", quantize_text_encoders=True), "`--quantize_text_encoders`"),
        (
            dict(adapter="lora", quantize_base="int8", quantize_text_encoders=True, train_text_encoder=True),
            "`--quantize_text_encoders`",
        ),
    ],
)
def test_what_cannot_train_on_a_quantized_base_is_refused_in_one_line(options, option, capsys):
    flags = ["--instance_data_dir=dog", "--instance_prompt=a photo of sks dog"]
    flags += [f"--{key}" if value is True else f"--{key}={value}" for key, value in options.items()]
    with pytest.raises(SystemExit) as raised:
        parse_config(flags)
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and option in error
    with pytest.raises(DreamBoothInputError):
        tiny_config("model", "dog", "out", **options)
