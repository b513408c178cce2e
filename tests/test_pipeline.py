"""`DreamBoothPipeline`: loads a trained subject from a folder, full or LoRA, and generates with `{subject}`."""

import json

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothPipeline, DreamBoothTrainer, Subject
from diffusers_dreambooth.hub import push_subject_folder, subject_files
from diffusers_dreambooth.subject import SubjectMetadata, fill_subject


def train(pipeline_dirs, instance_dir, output_dir, family="sd", **overrides):
    prior = dict(
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(output_dir.parent / "class"),
        num_class_images=2,
    )
    return DreamBoothTrainer(
        tiny_config(pipeline_dirs[family], instance_dir, output_dir, **prior, **overrides)
    ).train()


def images(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize(
    ("instance_prompt", "class_prompt", "identifier", "class_noun"),
    [
        ("a photo of sks dog", "a photo of dog", "sks", "dog"),
        ("a photo of sks dog", None, "sks", "dog"),
        ("photo of a TOK dog, studio light", "photo of a dog", "TOK", "dog"),
        ("a sks backpack on a table", "a backpack on a table", "sks", "backpack"),
        ("sks", "a dog", "sks", None),
    ],
)
def test_subject_is_read_from_the_prompts(instance_prompt, class_prompt, identifier, class_noun):
    subject = Subject.from_prompts(instance_prompt, class_prompt)
    assert (subject.identifier, subject.class_noun) == (identifier, class_noun)


def test_placeholder_is_filled_and_plain_prompts_pass_through():
    subjects = [Subject("sks", "dog", "a photo of sks dog"), Subject("zwx", "cat", "a photo of zwx cat")]
    assert fill_subject("a {subject} on the moon", subjects) == "a sks dog on the moon"
    assert fill_subject("{sks} and {zwx} at the beach", subjects) == "sks dog and zwx cat at the beach"
    assert fill_subject("{subject_2} next to {subject_1}", subjects) == "zwx cat next to sks dog"
    assert fill_subject("{subject_3}", subjects) == "{subject_3}"
    # Evaluating the second subject: `{subject}` is it, the numbered and named placeholders stay as they are.
    assert fill_subject("{subject} by {subject_1}", subjects, subjects[1]) == "zwx cat by sks dog"
    assert fill_subject("a dog on the moon", subjects) == "a dog on the moon"


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_trained_subject_loads_and_reproduces_the_trained_pipeline(pipeline_dirs, instance_dir, tmp_path, adapter):
    trained = train(pipeline_dirs, instance_dir, tmp_path / "out", adapter=adapter)
    metadata = json.loads((tmp_path / "out" / "dreambooth.json").read_text())
    assert metadata["adapter"] == adapter
    assert metadata["subjects"][0]["identifier"] == "sks" and metadata["subjects"][0]["class_noun"] == "dog"
    assert metadata["base_model"] == pipeline_dirs["sd"]
    assert metadata["training"]["with_prior_preservation"] and metadata["training"]["num_class_images"] == 2

    pipe = DreamBoothPipeline.from_pretrained(tmp_path / "out")
    assert pipe.instance_prompt == "a photo of sks dog"
    expected = images(trained, "a photo of sks dog on the moon")
    torch.testing.assert_close(images(pipe, "a photo of {subject} on the moon"), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(images(pipe, "a photo of sks dog on the moon"), expected, atol=1e-5, rtol=0)

    pipe.save_pretrained(tmp_path / "copy")
    again = DreamBoothPipeline.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(images(again, "a photo of {subject} on the moon"), expected, atol=1e-5, rtol=0)
    if adapter == "lora":
        assert not (tmp_path / "copy" / "unet").exists()
        plain = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
        plain.load_lora_weights(tmp_path / "copy")
    else:
        plain = DiffusionPipeline.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(images(plain, "a photo of sks dog on the moon"), expected, atol=1e-5, rtol=0)


def test_generation_arguments_reach_the_wrapped_pipeline(pipeline_dirs, instance_dir, tmp_path):
    train(pipeline_dirs, instance_dir, tmp_path / "out", family="sdxl", adapter="lora")
    pipe = DreamBoothPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    output = pipe(
        "a {subject}",
        negative_prompt="blurry {subject}",
        guidance_scale=3.0,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert output.images.shape == (2, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert pipe.fill_prompt(["a {subject}", "x"]) == ["a sks dog", "x"]


def test_a_plain_pipeline_folder_is_not_a_subject(pipeline_dirs):
    with pytest.raises(ValueError, match="dreambooth.json"):
        DreamBoothPipeline.from_pretrained(pipeline_dirs["sd"])


@pytest.mark.parametrize(
    "field, value",
    [("sample_images", ["../../outside.png"]), ("lora_weight_name", "/etc/passwd"), ("sample_grid", "..\\grid.png")],
)
def test_file_names_from_an_edited_subject_file_cannot_leave_its_folder(
    pipeline_dirs, instance_dir, tmp_path, field, value
):
    train(pipeline_dirs, instance_dir, tmp_path / "out", adapter="lora")
    path = tmp_path / "out" / "dreambooth.json"
    metadata = json.loads(path.read_text())
    path.write_text(json.dumps({**metadata, field: value}))
    with pytest.raises(ValueError, match=r"`dreambooth.json` names the file `.*`, which is outside its folder"):
        DreamBoothPipeline.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="outside its folder"):
        push_subject_folder(tmp_path / "out", "user/never-created")


def test_component_names_from_an_edited_model_index_cannot_leave_the_folder(pipeline_dirs, instance_dir, tmp_path):
    train(pipeline_dirs, instance_dir, tmp_path / "out", adapter="full")
    path = tmp_path / "out" / "model_index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "../..": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match=r"`model_index.json` names the file `../..`, which is outside its folder"):
        subject_files(tmp_path / "out", SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json"))
