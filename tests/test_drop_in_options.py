"""Drop-in (#17): the options of diffusers' newer DreamBooth LoRA scripts parse, and the commands of their READMEs run
through `parse_config` unchanged (`--adapter lora` added); an option this trainer cannot honour stops with one line
naming it, before any model loads."""

import dataclasses

import pytest
from conftest import TINY_RESOLUTION, write_subject_images

from diffusers_dreambooth import DreamBoothConfig
from diffusers_dreambooth.cli import build_parser, parse_config
from diffusers_dreambooth.config import UNSUPPORTED_OPTIONS

# The flags each script parses beyond those of train_dreambooth(_lora)(_sdxl|_sd3).py, which test_config.py lists
# (examples/dreambooth at diffusers 0.38.0.dev0).
NEWER_SCRIPT_FLAGS = {
    "train_dreambooth_lora_flux.py": "guidance_scale text_encoder_lr weighting_scheme max_sequence_length",
    "train_dreambooth_lora_flux2.py": """bnb_quantization_config_path do_fp8_training text_encoder_out_layers
        skip_final_inference final_validation_prompt lora_alpha aspect_ratio_buckets guidance_scale lora_layers
        offload remote_text_encoder enable_npu_flash_attention fsdp_text_encoder""",
    "train_dreambooth_lora_flux2_klein.py": """bnb_quantization_config_path do_fp8_training text_encoder_out_layers
        skip_final_inference final_validation_prompt aspect_ratio_buckets use_aspect_ratio_buckets caption_dropout
        offload enable_npu_flash_attention fsdp_text_encoder""",
    "train_dreambooth_lora_flux_kontext.py": """vae_encode_mode cond_image_column validation_image
        aspect_ratio_buckets enable_npu_flash_attention""",
    "train_dreambooth_lora_qwen_image.py": """pretrained_tokenizer_4_name_or_path
        pretrained_text_encoder_4_name_or_path bnb_quantization_config_path skip_final_inference
        final_validation_prompt offload""",
    "train_dreambooth_lora_z_image.py": """bnb_quantization_config_path do_fp8_training skip_final_inference
        final_validation_prompt aspect_ratio_buckets use_aspect_ratio_buckets offload enable_npu_flash_attention
        fsdp_text_encoder""",
    "train_dreambooth_lora_sana.py": "complex_human_instruction offload enable_vae_tiling enable_npu_flash_attention",
    "train_dreambooth_lora_lumina2.py": "system_prompt final_validation_prompt offload",
    "train_dreambooth_lora_hidream.py": """pretrained_tokenizer_4_name_or_path pretrained_text_encoder_4_name_or_path
        bnb_quantization_config_path skip_final_inference final_validation_prompt aspect_ratio_buckets offload""",
    "train_dreambooth_lora_krea2.py": """bnb_quantization_config_path do_fp8_training validation_model_path
        validation_num_inference_steps validation_guidance_scale skip_final_inference final_validation_prompt
        lora_alpha lora_layers upcast_before_saving offload""",
    "train_dreambooth_lora_ideogram4.py": """bnb_quantization_config_path do_fp8_training upsample_prompt
        prompt_enhancer_head_id skip_final_inference final_validation_prompt lora_alpha aspect_ratio_buckets
        disable_training_autocast upcast_before_saving offload enable_npu_flash_attention fsdp_text_encoder""",
}

#: The flags every README command below shares: the dog example with the paths in `tmp_path`.
COMMON = [
    "--adapter=lora",
    "--instance_prompt=a photo of sks dog",
    "--train_batch_size=1",
    "--gradient_accumulation_steps=4",
    "--report_to=wandb",
    "--lr_scheduler=constant",
    "--max_train_steps=500",
    "--validation_prompt=A photo of sks dog in a bucket",
    "--validation_epochs=25",
    "--seed=0",
    "--push_to_hub",
]

Z_IMAGE_BUCKETS = (
    "672,1568;688,1504;720,1456;752,1392;800,1328;832,1248;880,1184;944,1104;1024,1024;1104,944;1184,880;1248,832;"
    "1328,800;1392,752;1456,720;1504,688;1568,672"
)

# Each README's training command (examples/dreambooth/README_*.md), beyond `COMMON`; SDXL's `fp16` is `bf16` here,
# as this machine has no GPU. Where a README also documents optional flags (buckets, LoRA layers, memory options),
# they are added at the README's values.
README_COMMANDS = {
    "flux2": [
        "--pretrained_model_name_or_path=black-forest-labs/FLUX.2-dev",
        "--gradient_checkpointing",
        "--cache_latents",
        "--resolution=1024",
        "--guidance_scale=1",
        "--use_8bit_adam",
        "--optimizer=adamW",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=100",
        "--lora_layers=attn.to_k,attn.to_q,attn.to_v,attn.to_out.0",
        "--offload",
    ],
    "flux2_klein": [
        "--pretrained_model_name_or_path=black-forest-labs/FLUX.2-klein-base-4B",
        "--gradient_checkpointing",
        "--cache_latents",
        "--resolution=768",
        "--guidance_scale=1",
        "--use_8bit_adam",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=100",
        "--rank=16",
        "--use_aspect_ratio_buckets",
    ],
    "flux_kontext": [
        "--pretrained_model_name_or_path=black-forest-labs/FLUX.1-Kontext-dev",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--guidance_scale=1",
        "--gradient_checkpointing",
        "--optimizer=adamw",
        "--use_8bit_adam",
        "--cache_latents",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
        "--aspect_ratio_buckets=1024,1024;768,1360;1360,768;880,1168;1168,880;1248,832;832,1248",
    ],
    "qwen_image": [
        "--pretrained_model_name_or_path=Qwen/Qwen-Image",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--use_8bit_adam",
        "--learning_rate=2e-4",
        "--lr_warmup_steps=0",
        "--lora_layers=to_k,to_q,to_v",
        "--max_sequence_length=512",
        "--offload",
        "--cache_latents",
    ],
    "z_image": [
        "--pretrained_model_name_or_path=Tongyi-MAI/Z-Image",
        "--mixed_precision=bf16",
        "--gradient_checkpointing",
        "--cache_latents",
        "--resolution=1024",
        "--guidance_scale=5.0",
        "--use_8bit_adam",
        "--optimizer=adamW",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=100",
        "--lora_layers=to_k,to_q,to_v,to_out.0,ff.net.0.proj,ff.net.2",
        f"--aspect_ratio_buckets={Z_IMAGE_BUCKETS}",
    ],
    "sana": [
        "--pretrained_model_name_or_path=Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--use_8bit_adam",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
        "--max_sequence_length=256",
        "--cache_latents",
        "--offload",
    ],
    "lumina2": [
        "--pretrained_model_name_or_path=Alpha-VLLM/Lumina-Image-2.0",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--use_8bit_adam",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
        "--final_validation_prompt=A photo of sks dog on the moon",
        "--offload",
    ],
    "hidream": [
        "--pretrained_model_name_or_path=HiDream-ai/HiDream-I1-Dev",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--use_8bit_adam",
        "--rank=8",
        "--learning_rate=2e-4",
        "--lr_scheduler=constant_with_warmup",
        "--lr_warmup_steps=100",
        "--cache_latents",
        "--gradient_checkpointing",
        "--skip_final_inference",
    ],
    # README_krea2.md's command: trained on RAW, validated on Turbo (`--validation_model_path`).
    "krea2": [
        "--pretrained_model_name_or_path=krea/Krea-2-Raw",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--gradient_checkpointing",
        "--cache_latents",
        "--rank=32",
        "--lora_alpha=32",
        "--optimizer=adamW",
        "--use_8bit_adam",
        "--learning_rate=3e-4",
        "--lr_warmup_steps=0",
        "--validation_model_path=krea/Krea-2-Turbo",
    ],
    # README_ideogram4.md's command (its FP8 command adds `--do_fp8_training --gradient_checkpointing`).
    "ideogram4": [
        "--pretrained_model_name_or_path=ideogram-ai/ideogram-v4",
        "--resolution=1024",
        "--rank=16",
        "--optimizer=adamw",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
        "--mixed_precision=bf16",
        "--disable_training_autocast",
    ],
    "sdxl": [
        "--pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0",
        "--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
    ],
    # README_sdxl.md's "Conducting EDM-style training": Playground v2.5 (an EDM scheduler, so EDM-style training)
    # with the `--do_edm_style_training` its SDXL section adds.
    "sdxl_edm": [
        "--pretrained_model_name_or_path=playgroundai/playground-v2.5-1024px-aesthetic",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--learning_rate=1e-4",
        "--use_8bit_adam",
        "--lr_warmup_steps=0",
        "--do_edm_style_training",
    ],
    "flux": [
        "--pretrained_model_name_or_path=black-forest-labs/FLUX.1-dev",
        "--mixed_precision=bf16",
        "--resolution=512",
        "--guidance_scale=1",
        "--optimizer=prodigy",
        "--learning_rate=1.",
        "--lr_warmup_steps=0",
        "--weighting_scheme=none",
    ],
}

#: A value for each option `UNSUPPORTED_OPTIONS` refuses, as diffusers' READMEs and scripts pass it.
REFUSED = {
    "enable_npu_flash_attention": [],
}


def readme_command(name: str, tmp_path) -> list[str]:
    paths = [f"--instance_data_dir={tmp_path / 'dog'}", f"--output_dir={tmp_path / f'trained-{name}-lora'}"]
    if name == "hidream":  # its README trains on a captioned dataset
        paths = ["--dataset_name=linoyts/3d_icon", "--caption_column=prompt", paths[1]]
    return paths + COMMON + README_COMMANDS[name]


def tiny_readme_command(name: str, pipeline_dir: str, tmp_path) -> list[str]:
    """`readme_command(name)` on the tiny model: its base swapped, 2 steps at the tiny resolution, no Hub, no
    tracker, no validation images; two subject photos written to its `dog` folder."""
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dir,
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
    }
    flags = [f for f in readme_command(name, tmp_path) if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    return flags + [f"{key}={value}" for key, value in swapped.items()] + ["--num_validation_images=0"]


def refused_error(flags: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        parse_config(flags)
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    return error


@pytest.mark.parametrize("script", NEWER_SCRIPT_FLAGS)
def test_every_flag_of_the_newer_scripts_is_an_option(script):
    known = {option for action in build_parser()._actions for option in action.option_strings}
    assert [flag for flag in NEWER_SCRIPT_FLAGS[script].split() if f"--{flag}" not in known] == []


@pytest.mark.parametrize("name", README_COMMANDS)
def test_readme_commands_parse_unchanged(name, tmp_path):
    config = parse_config(readme_command(name, tmp_path))
    assert config.adapter == "lora" and config.max_train_steps == 500 and config.push_to_hub


def test_readme_values_reach_the_config(tmp_path):
    z_image = parse_config(readme_command("z_image", tmp_path))
    assert z_image.optimizer == "adamW" and z_image.guidance_scale == 5.0
    assert z_image.bucket_sizes[0] == (672, 1568) and len(z_image.bucket_sizes) == 17  # height, width
    assert z_image.lora_target_modules == "to_k,to_q,to_v,to_out.0,ff.net.0.proj,ff.net.2"
    assert parse_config(readme_command("flux2_klein", tmp_path)).aspect_ratio_buckets == "auto"
    assert parse_config(readme_command("hidream", tmp_path)).skip_final_inference
    assert parse_config(readme_command("sana", tmp_path)).max_sequence_length == 256


def test_readme_options_once_refused_reach_the_config(tmp_path):
    """Validation on Krea 2 Turbo and Ideogram 4's training without autocast are real (#17): the README commands
    train with them (test_krea2.py, test_ideogram4.py and test_fp8_training.py's README tests)."""
    krea2 = parse_config(readme_command("krea2", tmp_path))
    assert (krea2.validation_model_path, krea2.validation_num_inference_steps) == ("krea/Krea-2-Turbo", 8)
    assert krea2.validation_guidance_scale == 0.0
    assert parse_config(readme_command("ideogram4", tmp_path)).disable_training_autocast


def test_readme_quantization_command_parses(tmp_path):
    """README_qwen.md's quantization section: the LoRA trains on the base quantized as the JSON file says (#17)."""
    config = parse_config(readme_command("qwen_image", tmp_path) + ["--bnb_quantization_config_path=4bit.json"])
    assert config.bnb_quantization_config_path == "4bit.json" and config.adapter == "lora"


def test_kontext_image_to_image_options_reach_the_config():
    """README_flux_kontext.md's image-to-image flags are real (#17): FLUX.1 Kontext trains on the pairs they name."""
    flags = ["--dataset_name=pairs", "--image_column=output", "--cond_image_column=file_name"]
    flags += ["--caption_column=instruction", "--vae_encode_mode=sample", "--validation_image=cond.png"]
    config = parse_config(flags)
    assert (config.cond_image_column, config.vae_encode_mode, config.validation_image) == (
        "file_name",
        "sample",
        "cond.png",
    )


@pytest.mark.parametrize("option", UNSUPPORTED_OPTIONS)
def test_each_refused_option_stops_with_one_line_naming_it(option, capsys):
    flags = ["--instance_data_dir=dog", "--instance_prompt=a photo of sks dog", f"--{option}", *REFUSED[option]]
    error = refused_error(flags, capsys)
    assert f"`--{option}" in error and "is not supported" in error


def test_refused_options_at_their_defaults_are_accepted():
    defaults = {field.name: field.default for field in dataclasses.fields(DreamBoothConfig)}
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt="a photo of sks dog")
    assert all(getattr(config, option) == defaults[option] for option in UNSUPPORTED_OPTIONS)
    assert set(REFUSED) == set(UNSUPPORTED_OPTIONS)
