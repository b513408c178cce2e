"""Model cards: golden renderings, Hub metadata, and no local path or token in what a run writes."""

import dataclasses
from pathlib import Path

import pytest
from conftest import tiny_config
from huggingface_hub import ModelCard

from diffusers_dreambooth import DreamBoothTrainer, Subject, SubjectMetadata
from diffusers_dreambooth.model_card import render_model_card

GOLDEN = Path(__file__).parent / "golden"

LORA_SDXL = SubjectMetadata(
    subjects=[Subject("sks", "dog", "a photo of sks dog", "a photo of dog")],
    adapter="lora",
    family="stable-diffusion-xl",
    pipeline_class="StableDiffusionXLPipeline",
    base_model="stabilityai/stable-diffusion-xl-base-1.0",
    lora_weight_name="pytorch_lora_weights.safetensors",
    sample_prompt="a photo of sks dog on the beach",
    sample_images=["samples/sample_0.png", "samples/sample_1.png"],
    training={
        "max_train_steps": 500,
        "learning_rate": 1e-4,
        "train_batch_size": 1,
        "resolution": 1024,
        "with_prior_preservation": True,
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        "train_text_encoder": False,
        "rank": 4,
        "lora_alpha": 4,
        "seed": 0,
    },
    evaluation={"DINO": 0.668, "CLIP-T": 0.305},
)

FULL_LOCAL_BASE = SubjectMetadata(
    subjects=[Subject("zwx", "backpack", "a zwx backpack")],
    adapter="full",
    family="stable-diffusion",
    pipeline_class="StableDiffusionPipeline",
    base_model="/home/someone/models/sd15",
    training={"max_train_steps": 800, "learning_rate": 5e-6, "with_prior_preservation": False, "seed": 1},
)


@pytest.mark.parametrize(
    ("metadata", "repo_id", "license", "golden"),
    [
        (LORA_SDXL, "user/sks-dog", "openrail++", "card_lora_sdxl.md"),
        (FULL_LOCAL_BASE, "user/zwx-backpack", None, "card_full_local_base.md"),
    ],
)
def test_card_matches_golden_file(metadata, repo_id, license, golden):
    card = render_model_card(metadata, repo_id, metadata.sample_images, metadata.sample_prompt, license=license)
    assert str(card) == (GOLDEN / golden).read_text()


def test_pivotal_tokens_show_in_the_cards_text_and_the_lora_targets_are_recorded():
    """`<s0>` outside code would render as an (unknown) HTML tag, that is, not at all."""
    training = {**LORA_SDXL.training, "identifier": "<s0>", "lora_target_modules": "to_k,to_q,conv1"}
    pivotal = dataclasses.replace(
        LORA_SDXL, subjects=[Subject("<s0>", "dog", "a photo of <s0> dog", "a photo of dog")], training=training
    )
    card = str(render_model_card(pivotal, "user/s0-dog", pivotal.sample_images, pivotal.sample_prompt))
    assert "# DreamBooth LoRA adapter: &lt;s0&gt; dog\n" in card
    assert "| identifier | &lt;s0&gt; |" in card and "| LoRA target modules | to_k,to_q,conv1 |" in card
    assert "**`<s0> dog`**" in card  # inside code it stays as written


def test_a_lora_run_records_non_default_target_modules(pipeline_dirs, instance_dir, tmp_path):
    targets = "to_k,to_q,to_v,to_out.0,conv1"
    options = dict(adapter="lora", num_validation_images=0, lora_target_modules=targets)
    DreamBoothTrainer(tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **options)).train()
    assert (
        SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json").training["lora_target_modules"] == targets
    )
    assert f"| LoRA target modules | {targets} |" in (tmp_path / "out" / "README.md").read_text()


def test_card_metadata_is_what_the_hub_expects():
    card = ModelCard(str(render_model_card(LORA_SDXL, "user/sks-dog", LORA_SDXL.sample_images, license="mit")))
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (data["library_name"], data["pipeline_tag"], data["license"]) == ("diffusers", "text-to-image", "mit")
    assert {"dreambooth", "lora", "stable-diffusion-xl"} <= set(data["tags"])
    assert data["instance_prompt"] == "a photo of sks dog"
    assert [w["output"]["url"] for w in data["widget"]] == LORA_SDXL.sample_images


def test_sd3_card_has_diffusers_sd3_tags_and_loads_with_its_pipeline_class():
    metadata = dataclasses.replace(
        LORA_SDXL,
        family="stable-diffusion-3",
        pipeline_class="StableDiffusion3Pipeline",
        base_model="stabilityai/stable-diffusion-3-medium-diffusers",
    )
    card = str(render_model_card(metadata, "user/sks-dog"))
    assert {"sd3", "sd3-diffusers", "lora"} <= set(ModelCard(card).data.to_dict()["tags"])
    assert "from diffusers import StableDiffusion3Pipeline\n" in card
    assert 'StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")' in card


def test_flux_card_has_diffusers_flux_tags_and_loads_with_its_pipeline_class():
    metadata = dataclasses.replace(
        LORA_SDXL, family="flux", pipeline_class="FluxPipeline", base_model="black-forest-labs/FLUX.1-dev"
    )
    card = str(render_model_card(metadata, "user/sks-dog"))
    assert {"flux", "flux-diffusers", "lora"} <= set(ModelCard(card).data.to_dict()["tags"])
    assert "from diffusers import FluxPipeline\n" in card
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")' in card


def test_a_local_base_model_path_never_reaches_the_card():
    card = str(render_model_card(FULL_LOCAL_BASE, "user/zwx-backpack"))
    assert "/home/someone" not in card and "base_model" not in card.split("---")[1]


def test_training_writes_samples_and_a_card_without_paths_or_token(pipeline_dirs, instance_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = tiny_config(
        pipeline_dirs["sd"], instance_dir, output_dir, num_validation_images=2, hub_token="hf_NeverWriteMe"
    )
    DreamBoothTrainer(config).train()
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["sample_0.png", "sample_1.png"]
    card = (output_dir / "README.md").read_text()
    assert "![sample 1](samples/sample_1.png)" in card
    assert "a photo of sks dog" in card
    assert str(tmp_path) not in card
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert b"hf_NeverWriteMe" not in path.read_bytes(), path
