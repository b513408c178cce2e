"""Frozen components run once, to fill the caches, and never per step (counted with forward hooks)."""

import pytest
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothTrainer, train_dreambooth


def count_forward_calls(modules: dict) -> dict[str, list]:
    calls = {name: [] for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda *args, name=name: calls[name].append(1))
    return calls


def train_counting(pipeline_dirs, family, images, tmp_path, **options):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs[family])
    watched = {"vae_encoder": pipe.vae.encoder}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            watched[name] = getattr(pipe, name)
    calls = count_forward_calls(watched)
    train_dreambooth(
        pipe,
        instance_data_dir=str(images),
        instance_prompt="a photo of sks dog",
        output_dir=str(tmp_path / "out"),
        resolution=TINY_RESOLUTION,
        train_batch_size=2,
        max_train_steps=5,
        sample_batch_size=4,
        num_validation_images=0,  # no end-of-training samples: count the training steps' work only
        seed=0,
        report_to="none",
        **options,
    )
    return {name: len(hits) for name, hits in calls.items()}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_fixed_crops_and_frozen_text_encoders_are_encoded_once(pipeline_dirs, square_instance_dir, tmp_path, family):
    calls = train_counting(pipeline_dirs, family, square_instance_dir, tmp_path)
    # Four images in one caching batch, which the VAE encodes one by one (its slicing, for memory), and never again
    # in the steps; one call of each text encoder for the one prompt.
    assert calls.pop("vae_encoder") == 4
    assert calls == {name: 1 for name in calls}
    assert len(calls) == {"sd": 1, "sdxl": 2, "sd3": 3, "flux": 2}[family]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_class_images_are_encoded_once_too(pipeline_dirs, square_instance_dir, tmp_path, family):
    # Class images already on disk, so nothing is generated: what runs is the caching and the 5 steps.
    class_dir = write_subject_images(tmp_path / "class", count=4, size=(TINY_RESOLUTION, TINY_RESOLUTION), seed=3)
    calls = train_counting(
        pipeline_dirs,
        family,
        square_instance_dir,
        tmp_path,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(class_dir),
        num_class_images=4,
    )
    # The 4 subject photos and the 4 class images, each encoded once; both prompts in one text-encoder call.
    assert calls.pop("vae_encoder") == 8
    assert calls == {name: 1 for name in calls} and len(calls) == {"sd": 1, "sdxl": 2}[family]


def test_random_crops_are_encoded_every_step(pipeline_dirs, instance_dir, tmp_path):
    calls = train_counting(pipeline_dirs, "sd", instance_dir, tmp_path)
    assert calls == {"vae_encoder": 5, "text_encoder": 1}


def test_trained_text_encoder_runs_every_step(pipeline_dirs, square_instance_dir, tmp_path):
    calls = train_counting(pipeline_dirs, "sd", square_instance_dir, tmp_path, train_text_encoder=True)
    assert calls == {"vae_encoder": 4, "text_encoder": 5}  # the four photos cached, one at a time


@pytest.mark.parametrize(
    ("fixture", "options", "idle"),
    [
        ("square_instance_dir", {}, ["vae", "text_encoder"]),
        ("instance_dir", {}, ["text_encoder"]),  # random crops: the VAE encodes every step
        ("square_instance_dir", {"train_text_encoder": True}, ["vae"]),
        ("instance_dir", {"random_flip": True, "train_text_encoder": True}, []),
    ],
)
def test_modules_moved_off_the_gpu_are_those_no_step_runs(pipeline_dirs, request, tmp_path, fixture, options, idle):
    """On a GPU the trainer moves these to the CPU after caching (`_offload_idle_modules`); the choice is made on
    any device, so it is checked here against what the steps use."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    config = tiny_config(pipeline_dirs["sd"], request.getfixturevalue(fixture), tmp_path / "out", **options)
    trainer = DreamBoothTrainer(config, pipeline=pipe)
    trainer.train()
    names = {id(module): name for name, module in pipe.components.items()}
    assert [names[id(module)] for module in trainer.modules_idle_during_training()] == idle
