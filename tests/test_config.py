"""Options: diffusers' flags parse unchanged, files parse, bad combinations fail with the option's name."""

import dataclasses
import json

import pytest

from diffusers_dreambooth import DreamBoothConfig
from diffusers_dreambooth.cli import build_parser, parse_config
from diffusers_dreambooth.families.stable_diffusion import StableDiffusionFamily
from diffusers_dreambooth.families.stable_diffusion_3 import StableDiffusion3Family
from diffusers_dreambooth.families.stable_diffusion_xl import StableDiffusionXLFamily

# Every flag of diffusers' train_dreambooth.py, train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py
# (examples/dreambooth at diffusers 0.40.0.dev0).
DIFFUSERS_FLAGS = """
pretrained_model_name_or_path revision variant tokenizer_name instance_data_dir class_data_dir instance_prompt
class_prompt with_prior_preservation prior_loss_weight num_class_images output_dir seed resolution center_crop
train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam dataloader_num_workers adam_beta1
adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32
report_to validation_prompt num_validation_images validation_steps mixed_precision prior_generation_precision
local_rank enable_xformers_memory_efficient_attention set_grads_to_none offset_noise snr_gamma
pre_compute_text_embeddings tokenizer_max_length text_encoder_use_attention_mask skip_save_text_encoder
validation_images class_labels_conditioning validation_scheduler validation_epochs rank lora_dropout
image_interpolation_mode pretrained_vae_model_name_or_path dataset_name dataset_config_name cache_dir image_column
caption_column repeats do_edm_style_training output_kohya_format random_flip text_encoder_lr optimizer
prodigy_beta3 prodigy_decouple adam_weight_decay_text_encoder prodigy_use_bias_correction prodigy_safeguard_warmup
use_dora
""".split()

# The flags diffusers' train_dreambooth_sd3.py and train_dreambooth_lora_sd3.py add to those above.
DIFFUSERS_SD3_FLAGS = """
max_sequence_length weighting_scheme logit_mean logit_std mode_scale precondition_outputs lora_layers lora_blocks
cache_latents upcast_before_saving
""".split()

# The LoRA command of diffusers' README_sd3.md (minus --push_to_hub and --report_to, bf16 for fp16), with
# --adapter lora and the SD3 scripts' own flags at values other than their defaults.
SD3_README_COMMAND = [
    "--adapter=lora",
    "--pretrained_model_name_or_path=stabilityai/stable-diffusion-3-medium-diffusers",
    "--instance_data_dir=dog",
    "--output_dir=trained-sd3-lora",
    "--mixed_precision=bf16",
    "--instance_prompt=a photo of sks dog",
    "--resolution=512",
    "--train_batch_size=1",
    "--gradient_accumulation_steps=4",
    "--learning_rate=4e-4",
    "--lr_scheduler=constant",
    "--lr_warmup_steps=0",
    "--max_train_steps=500",
    "--validation_prompt=A photo of sks dog in a bucket",
    "--validation_epochs=25",
    "--seed=0",
    "--weighting_scheme=mode",
    "--mode_scale=1.1",
    "--precondition_outputs=0",
    "--max_sequence_length=128",
    "--cache_latents",
    "--upcast_before_saving",
    "--lora_layers=attn.to_k,attn.to_q,attn.to_v,attn.to_out.0",
    "--lora_blocks=0,12",
]

# The command from diffusers' DreamBooth README ("Training with prior-preservation loss"), minus --push_to_hub.
README_COMMAND = [
    "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
    "--instance_data_dir=dog",
    "--class_data_dir=path-to-class-images",
    "--output_dir=path-to-save-model",
    "--with_prior_preservation",
    "--prior_loss_weight=1.0",
    "--instance_prompt=a photo of sks dog",
    "--class_prompt=a photo of dog",
    "--resolution=512",
    "--train_batch_size=1",
    "--gradient_accumulation_steps=1",
    "--learning_rate=5e-6",
    "--lr_scheduler=constant",
    "--lr_warmup_steps=0",
    "--num_class_images=200",
    "--max_train_steps=800",
]

MINIMAL = ["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog"]


def test_every_diffusers_flag_is_an_option():
    known = {option for action in build_parser()._actions for option in action.option_strings}
    missing = [flag for flag in DIFFUSERS_FLAGS + DIFFUSERS_SD3_FLAGS if f"--{flag}" not in known]
    assert not missing


def test_sd3_readme_command_parses_unchanged():
    config = parse_config(SD3_README_COMMAND)
    assert (config.weighting_scheme, config.mode_scale, config.precondition_outputs) == ("mode", 1.1, 0)
    assert config.max_sequence_length == 128 and config.cache_latents and config.upcast_before_saving
    assert config.lora_target_modules == "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0"
    assert (config.lora_blocks, config.learning_rate) == ("0,12", 4e-4)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_sd3_defaults_follow_diffusers_sd3_scripts(adapter):
    config = parse_config(MINIMAL + ["--adapter", adapter])
    assert (config.weighting_scheme, config.precondition_outputs, config.max_sequence_length) == (None, None, None)
    sd3 = config.with_defaults(StableDiffusion3Family.option_defaults[adapter])
    assert (sd3.learning_rate, sd3.text_encoder_lr, sd3.adam_weight_decay) == (1e-4, 5e-6, 1e-4)
    assert (sd3.resolution, sd3.image_interpolation_mode) == (512, "bilinear")
    assert (sd3.weighting_scheme, sd3.precondition_outputs, sd3.max_sequence_length) == ("logit_normal", 1, 77)
    assert (sd3.logit_mean, sd3.logit_std, sd3.mode_scale) == (0.0, 1.0, 1.29)


def test_diffusers_readme_command_parses_unchanged():
    config = parse_config(README_COMMAND)
    assert config.with_prior_preservation
    assert config.class_prompt == "a photo of dog"
    assert config.learning_rate == 5e-6
    assert config.num_class_images == 200
    assert config.max_train_steps == 800
    assert config.adapter == "full"


def test_lora_is_chosen_with_adapter_flag_and_keeps_lora_script_defaults():
    config = parse_config(MINIMAL + ["--adapter", "lora", "--rank", "16", "--train_text_encoder"])
    assert (config.adapter, config.rank, config.lora_scale_alpha) == ("lora", 16, 16)
    assert config.output_dir == "lora-dreambooth-model"
    assert config.validation_epochs == 50 and config.validation_steps is None
    sd = config.with_defaults(StableDiffusionFamily.option_defaults["lora"])
    assert (sd.learning_rate, sd.resolution, sd.image_interpolation_mode) == (5e-4, 512, "lanczos")
    sdxl = config.with_defaults(StableDiffusionXLFamily.option_defaults["lora"])
    assert (sdxl.learning_rate, sdxl.text_encoder_lr, sdxl.resolution, sdxl.adam_weight_decay) == (
        1e-4,
        5e-6,
        1024,
        1e-4,
    )


def test_full_fine_tune_defaults_follow_train_dreambooth():
    config = parse_config(MINIMAL).with_defaults(StableDiffusionFamily.option_defaults["full"])
    assert (config.learning_rate, config.resolution, config.output_dir) == (5e-6, 512, "dreambooth-model")
    assert config.validation_steps == 100
    assert config.image_interpolation_mode == "bilinear"


def test_explicit_values_win_over_family_defaults():
    config = parse_config(MINIMAL + ["--learning_rate", "3e-6", "--resolution", "768"])
    resolved = config.with_defaults(StableDiffusionXLFamily.option_defaults["full"])
    assert (resolved.learning_rate, resolved.resolution) == (3e-6, 768)


def test_unknown_flag_exits_naming_it(capsys):
    with pytest.raises(SystemExit) as error:
        parse_config(MINIMAL + ["--learning_rat", "1e-4"])
    assert error.value.code == 2
    assert "--learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--with_prior_preservation", "--class_data_dir", "c"], "--class_prompt"),
        (["--with_prior_preservation", "--class_prompt", "a dog"], "--class_data_dir"),
        (["--train_text_encoder", "--pre_compute_text_embeddings"], "--pre_compute_text_embeddings"),
        (["--adapter", "lora", "--rank", "0"], "--rank"),
        (["--lr_scheduler", "cosine_annealing"], "cosine_annealing"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--report_to", "wandb", "--hub_token", "hf_x"], "--hub_token"),
        (["--do_fp8_training", "--quantize_base", "nf4"], "--do_fp8_training"),
        (["--dataset_name", "some/dataset"], "--dataset_name"),
        (["--adapter", "lora", "--lora_layers", "to_q", "--lora_target_modules", "to_k"], "--lora_layers"),
        (["--adapter", "lora", "--lora_blocks", "12;30"], "--lora_blocks"),
        (["--weighting_scheme", "uniform"], "--weighting_scheme"),
        (["--max_sequence_length", "0"], "--max_sequence_length"),
    ],
)
def test_conflicting_options_fail_with_their_names(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(MINIMAL + flags)
    assert message in capsys.readouterr().err


def test_missing_subject_data_is_named():
    with pytest.raises(ValueError, match="--instance_data_dir"):
        DreamBoothConfig(instance_prompt="a photo of sks dog")


def test_yaml_file_parses_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("instance_data_dir: dog\ninstance_prompt: a photo of sks dog\nadapter: lora\nrank: 8\n")
    config = parse_config(["--config", str(path), "--rank", "32"])
    assert (config.adapter, config.rank, config.instance_data_dir) == ("lora", 32, "dog")


def test_json_file_with_unknown_key_is_rejected(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"instance_data_dir": "dog", "instance_prompt": "x", "rnak": 4}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "rnak" in capsys.readouterr().err


def test_saved_config_round_trips_and_never_holds_the_token(tmp_path):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt="a photo of sks dog", hub_token="hf_secret")
    config.to_json_file(tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert "hf_secret" not in text and "hub_token" not in text
    assert DreamBoothConfig.from_dict(json.loads(text)) == DreamBoothConfig(
        instance_data_dir="dog", instance_prompt="a photo of sks dog"
    )


def test_help_lists_every_option():
    """`examples/train.py --help` formats every field's help (a stray `%` in one breaks the whole page)."""
    page = build_parser().format_help()
    assert all(f"--{field.name}" in page for field in dataclasses.fields(DreamBoothConfig))
