"""Every ready-made config in `examples/configs/` parses into a `DreamBoothConfig` as `examples/train.py --config`
reads it (no training, no download), for the family and resolution its name promises."""

from pathlib import Path

import pytest

from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families import FAMILIES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "examples" / "configs"

#: file -> (family, base model, adapter, resolution): each family's native resolution.
EXPECTED = {
    "sd15-full.yaml": ("stable-diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5", "full", 512),
    "sd15-lora.yaml": ("stable-diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5", "lora", 512),
    "sd15-two-subjects.yaml": ("stable-diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5", "full", 512),
    "sd21-full.yaml": ("stable-diffusion", "stabilityai/stable-diffusion-2-1", "full", 768),
    "sdxl-lora.yaml": ("stable-diffusion-xl", "stabilityai/stable-diffusion-xl-base-1.0", "lora", 1024),
    "sd3-lora.yaml": ("stable-diffusion-3", "stabilityai/stable-diffusion-3-medium-diffusers", "lora", 512),
    "flux-lora.yaml": ("flux", "black-forest-labs/FLUX.1-dev", "lora", 512),
    "flux-kontext-lora.yaml": ("flux-kontext", "black-forest-labs/FLUX.1-Kontext-dev", "lora", 512),
    "flux2-lora.yaml": ("flux2", "black-forest-labs/FLUX.2-dev", "lora", 1024),
    "flux2-klein-lora.yaml": ("flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B", "lora", 768),
    "if-stage1-lora.yaml": ("deepfloyd-if", "DeepFloyd/IF-I-XL-v1.0", "lora", 64),
    "if-stage1-full.yaml": ("deepfloyd-if", "DeepFloyd/IF-I-XL-v1.0", "full", 64),
    "if-stage2-full.yaml": ("deepfloyd-if-super-resolution", "DeepFloyd/IF-II-L-v1.0", "full", 256),
    "sana-lora.yaml": ("sana", "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "lora", 1024),
    "lumina2-lora.yaml": ("lumina2", "Alpha-VLLM/Lumina-Image-2.0", "lora", 1024),
    "hidream-lora.yaml": ("hidream", "HiDream-ai/HiDream-I1-Dev", "lora", 1024),
    "qwen-image-lora.yaml": ("qwen-image", "Qwen/Qwen-Image", "lora", 1024),
    "z-image-lora.yaml": ("z-image", "Tongyi-MAI/Z-Image", "lora", 1024),
    "krea2-lora.yaml": ("krea2", "krea/Krea-2-Raw", "lora", 1024),
    "ideogram4-lora.yaml": ("ideogram4", "ideogram-ai/ideogram-v4", "lora", 1024),
    "playground-v2.5-lora.yaml": (
        "stable-diffusion-xl",
        "playgroundai/playground-v2.5-1024px-aesthetic",
        "lora",
        1024,
    ),
}


def test_every_config_file_is_expected_and_every_family_has_one():
    assert sorted(path.name for path in CONFIG_DIR.iterdir()) == sorted(EXPECTED)
    assert {family for family, *_ in EXPECTED.values()} == {family.name for family in FAMILIES}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_for_its_family(name):
    family_name, base_model, adapter, resolution = EXPECTED[name]
    config = parse_config(["--config", str(CONFIG_DIR / name)])
    assert config.pretrained_model_name_or_path == base_model
    assert (config.adapter, config.resolution) == (adapter, resolution)
    family = next(family for family in FAMILIES if family.name == family_name)
    # The family's defaults fill what the file leaves out, and take nothing the file sets.
    filled = config.with_defaults(family.option_defaults[adapter])
    assert filled.resolution == resolution and filled.learning_rate == config.learning_rate
    assert config.max_train_steps
    for subject in config.subject_data():
        assert subject.instance_data_dir and subject.instance_prompt
        if config.with_prior_preservation:
            assert subject.class_prompt and subject.class_data_dir and config.num_class_images
    if family_name.startswith("deepfloyd-if"):
        assert config.pre_compute_text_embeddings and config.tokenizer_max_length == 77
    if family_name == "deepfloyd-if-super-resolution":
        assert filled.sr_noise_level == 0 and config.output_dir.endswith("/stage_2")
        assert not config.validation_prompt and not config.with_prior_preservation


def test_flags_override_a_config_file():
    config = parse_config(["--config", str(CONFIG_DIR / "sd15-lora.yaml"), "--rank", "16"])
    assert config.rank == 16 and config.adapter == "lora"
