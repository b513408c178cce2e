"""`--fsdp_text_encoder` (#17): over two CPU processes (gloo), the README commands of the scripts that take it train
with the LLM text encoder sharded by FSDP while prompts are encoded, to the very LoRA of the same run without it; the
combinations it cannot serve stop in one line, before any model loads."""

import pytest
from conftest import tiny_config
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from test_drop_in_options import tiny_readme_command
from test_launch import DOUBLE, SINGLE, launch

from diffusers_dreambooth import DreamBoothConfig, DreamBoothInputError, DreamBoothTrainer
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.text_encoder_sharding import check_text_encoder_sharding, decoder_layer_class

LORA = "pytorch_lora_weights.safetensors"


def sharded_and_plain_runs(family: str, pipeline_dirs, tmp_path, launcher: list[str]) -> tuple[dict, dict, str]:
    """The family's tiny README command, launched with and without `--fsdp_text_encoder`: both LoRAs, and the
    sharded run's console."""

    def command(folder: str) -> list[str]:  # Z-Image's README buckets are past the tiny transformer's positions
        flags = tiny_readme_command(family, pipeline_dirs[family], tmp_path / folder)
        return [flag for flag in flags if not flag.startswith("--aspect_ratio_buckets")]

    plain, sharded = command("plain"), command("sharded") + ["--fsdp_text_encoder"]
    env = {"ACCELERATE_USE_CPU": "1"}
    launch(launcher, plain, env=env)
    console = launch(launcher, sharded, env=env).stderr
    loras = [load_file(tmp_path / name / f"trained-{family}-lora" / LORA) for name in ("plain", "sharded")]
    return *loras, console


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux2_klein", "z_image", "ideogram4", "flux2"])
def test_two_processes_shard_the_text_encoder_and_train_the_same_lora(family, pipeline_dirs, tmp_path):
    plain, sharded, console = sharded_and_plain_runs(family, pipeline_dirs, tmp_path, DOUBLE)
    encoder = DiffusionPipeline.from_pretrained(pipeline_dirs[family]).text_encoder
    layers = [module for module in encoder.modules() if isinstance(module, decoder_layer_class(encoder))]
    in_layers = sum(parameter.numel() for layer in layers for parameter in layer.parameters())
    held = [line for line in console.splitlines() if "Sharded text_encoder over 2 processes with FSDP" in line]
    assert len(held) == 2, console[-3000:]  # one line per process
    for line in held:  # each holds half of every decoder layer (padded to an even size), the rest whole
        part, whole = (int(word) for word in line.split("holds ")[1].split(" parameters")[0].split(" of its "))
        assert whole == sum(parameter.numel() for parameter in encoder.parameters())
        assert 0 <= part - (whole - in_layers / 2) <= len(layers)
    assert plain.keys() == sharded.keys()
    for name in plain:  # the embeddings are the whole encoder's, so the steps are too
        assert (plain[name] == sharded[name]).all(), name


@pytest.mark.slow
def test_one_process_warns_and_runs_the_encoder_whole(pipeline_dirs, tmp_path):
    plain, sharded, console = sharded_and_plain_runs("flux2_klein", pipeline_dirs, tmp_path, SINGLE)
    assert "`--fsdp_text_encoder` with one process: there is nothing to shard" in console
    assert "Sharded text_encoder" not in console
    assert all((plain[name] == sharded[name]).all() for name in plain)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"quantize_text_encoders": True, "quantize_base": "nf4"}, "`--quantize_text_encoders`"),
        ({"remote_text_encoder": True}, "`--remote_text_encoder`"),
    ],
)
def test_what_cannot_be_sharded_is_refused_in_one_line(options, named):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt="a sks dog", adapter="lora", **options)
    config.fsdp_text_encoder = True
    with pytest.raises(DreamBoothInputError) as raised:
        check_text_encoder_sharding(config, pipeline_given=False)
    assert str(raised.value).startswith(f"`--fsdp_text_encoder` with {named}:") and "\n" not in str(raised.value)


def test_a_pipeline_object_is_refused_before_training(pipeline_dirs, instance_dir, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["flux2_klein"])
    config = tiny_config(pipeline_dirs["flux2_klein"], instance_dir, tmp_path / "out", fsdp_text_encoder=True)
    with pytest.raises(DreamBoothInputError, match="a pipeline passed to the trainer: it shards the encoder of"):
        DreamBoothTrainer(config, pipeline).train()
    assert not (tmp_path / "out").exists()


def test_families_whose_scripts_lack_the_flag_refuse_it(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(pipeline_dirs["sana"], instance_dir, tmp_path / "out", fsdp_text_encoder=True)
    with pytest.raises(DreamBoothInputError, match="`--fsdp_text_encoder` is an option of flux2, flux2-klein"):
        DreamBoothTrainer(config).train()


def test_the_flag_parses_as_in_diffusers_scripts(tmp_path):
    config = parse_config(["--instance_data_dir=dog", "--instance_prompt=a sks dog", "--fsdp_text_encoder"])
    assert config.fsdp_text_encoder


@pytest.mark.parametrize("family", ["flux2_klein", "z_image", "ideogram4", "flux2"])
def test_the_shard_unit_is_the_encoders_decoder_layer(family, pipeline_dirs):
    encoder = DiffusionPipeline.from_pretrained(pipeline_dirs[family]).text_encoder
    layer = decoder_layer_class(encoder)
    assert layer.__name__.endswith("DecoderLayer")
    layers = sum(isinstance(module, layer) for module in encoder.modules())
    assert layers == encoder.config.get_text_config().num_hidden_layers
