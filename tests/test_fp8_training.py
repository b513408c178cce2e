"""`--do_fp8_training` (#17): the denoiser's linear layers compute in FP8 through torchao, as in diffusers' FLUX.2,
Z-Image, Krea 2 and Ideogram 4 scripts. PyTorch runs FP8 matrix products on CPU, so the real layers train here."""

import math
import sys

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from test_drop_in_options import tiny_readme_command
from test_quantization import lora_state, one_line_error
from torchao.float8.float8_linear import Float8Linear

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.cli import parse_config


class LossRecorder(DreamBoothTrainer):
    """Keeps every step's loss."""

    def _loss_values(self, losses) -> dict[str, float]:
        values = super()._loss_values(losses)
        self.losses = [*getattr(self, "losses", []), values["loss"]]
        return values


def fp8_layers(denoiser: torch.nn.Module) -> list[str]:
    return [name for name, module in denoiser.named_modules() if isinstance(module, Float8Linear)]


@pytest.mark.parametrize("family", ["flux2_klein", "z_image", "ideogram4"])
def test_fp8_lora_trains_and_loads_on_the_plain_base(family, pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs[family],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        rank=4,
        do_fp8_training=True,
        max_train_steps=3,
        skip_final_inference=True,
    )
    trainer = DreamBoothTrainer(config)
    pipeline = trainer.train()
    denoiser = getattr(pipeline, trainer.family.denoiser_name)

    converted = fp8_layers(denoiser)
    assert converted and "proj_out" not in converted
    # LoRA wraps the FP8 layers: their frozen weights compute in FP8, the adapter's own layers in full precision.
    assert any(name.endswith(".base_layer") for name in converted)
    assert not any(".lora_" in name for name in converted)
    assert all("lora_" in name for name, p in denoiser.named_parameters() if p.requires_grad)
    assert trainer.global_step == 3

    plain = DiffusionPipeline.from_pretrained(pipeline_dirs[family])
    plain.load_lora_weights(tmp_path / "out")
    trained, loaded = lora_state(denoiser), lora_state(getattr(plain, trainer.family.denoiser_name))
    assert trained.keys() == loaded.keys() and trained
    assert all(torch.equal(trained[key], loaded[key]) for key in trained)
    assert all(torch.isfinite(value).all() for value in trained.values())


def test_fp8_full_fine_tune_saves_plain_weights(pipeline_dirs, instance_dir, tmp_path):
    """The trained FP8 model saves as an ordinary diffusers model: FP8 is how it computes, not what it stores."""
    config = tiny_config(
        pipeline_dirs["flux2_klein"],
        instance_dir,
        tmp_path / "out",
        do_fp8_training=True,
        max_train_steps=2,
        learning_rate=1e-2,
        skip_final_inference=True,
    )
    trained = DreamBoothTrainer(config).train().transformer
    assert fp8_layers(trained)
    saved = DiffusionPipeline.from_pretrained(tmp_path / "out").transformer
    assert not fp8_layers(saved)
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["flux2_klein"]).transformer
    name = next(name for name in fp8_layers(trained) if name.endswith("attn.to_q"))
    weight = f"{name}.weight"
    torch.testing.assert_close(saved.state_dict()[weight], trained.state_dict()[weight], rtol=0, atol=0)
    assert not torch.equal(saved.state_dict()[weight], base.state_dict()[weight])


def test_fp8_matches_full_precision_closely_on_the_first_step(pipeline_dirs, instance_dir, tmp_path):
    """FP8 compute is an approximation of the same step, not another computation: the first losses agree."""

    def first_loss(name: str, **options) -> float:
        config = tiny_config(
            pipeline_dirs["z_image"],
            instance_dir,
            tmp_path / name,
            adapter="lora",
            max_train_steps=1,
            skip_final_inference=True,
            **options,
        )
        trainer = LossRecorder(config)
        trainer.train()
        return trainer.losses[0]

    fp8, full = first_loss("fp8", do_fp8_training=True), first_loss("bf16")
    assert math.isfinite(fp8) and fp8 != full
    assert abs(fp8 - full) < 0.1 * full


@pytest.mark.parametrize(
    "name, extra",
    [
        ("flux2", []),  # README_flux2.md's FP8 command
        ("flux2_klein", []),
        ("z_image", []),  # README_z_image.md's FP8 command
        ("ideogram4", ["--gradient_checkpointing"]),
    ],
)
def test_readme_fp8_commands_train_two_steps(name, extra, pipeline_dirs, tmp_path):
    flags = tiny_readme_command(name, pipeline_dirs[name], tmp_path)
    flags = [f for f in flags if not f.startswith("--aspect_ratio_buckets")]
    flags += ["--do_fp8_training", "--skip_final_inference", *extra]
    trainer = DreamBoothTrainer(parse_config(flags))
    pipeline = trainer.train()
    assert trainer.global_step == 2 and fp8_layers(pipeline.transformer)
    assert (tmp_path / f"trained-{name}-lora" / LORA_WEIGHT_NAME_SAFE).is_file()


def test_without_torchao_fp8_stops_before_loading(monkeypatch, instance_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # what `import torchao.float8` meets without torchao
    config = tiny_config(tmp_path / "no-model", instance_dir, tmp_path / "out", adapter="lora", do_fp8_training=True)
    assert "`--do_fp8_training` needs torchao: `pip install torchao`" in one_line_error(config)


def test_on_a_gpu_without_fp8_units_fp8_stops_before_loading(monkeypatch, instance_dir, tmp_path):
    """No GPU here: the check reads what CUDA would report for an A100 (compute capability 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    config = tiny_config(tmp_path / "no-model", instance_dir, tmp_path / "out", adapter="lora", do_fp8_training=True)
    error = one_line_error(config)
    assert "`--do_fp8_training` needs a GPU with FP8 matrix units" in error and "A100-SXM4-80GB has 8.0" in error


@pytest.mark.parametrize("option", ["--quantize_base=nf4", "--bnb_quantization_config_path=4bit.json"])
def test_fp8_on_a_bitsandbytes_base_is_refused_in_one_line(option, capsys):
    flags = ["--instance_data_dir=dog", "--instance_prompt=a photo of sks dog", "--adapter=lora"]
    with pytest.raises(SystemExit) as raised:
        parse_config([*flags, "--do_fp8_training", option])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "`--do_fp8_training`" in error and option.split("=")[0] in error
