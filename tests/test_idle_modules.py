"""Frozen text encoders that a run releases (off a GPU every family's; on a GPU the LLM families', which set
`releases_frozen_text_encoders`) leave memory once their embeddings are cached, and come back, loaded from the base
model, exactly as they were whenever sampling needs them: validation, the final save, the finishing stages."""

import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.families.flux2 import Flux2Family
from diffusers_dreambooth.families.stable_diffusion import StableDiffusionFamily
from diffusers_dreambooth.families.stable_diffusion_3 import StableDiffusion3Family
from diffusers_dreambooth.idle_modules import IdleModules, releases_text_encoders

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PREDICT = StableDiffusion3Family.predict


def train_recording_encoders(pipeline_dirs, instance_dir, output_dir, monkeypatch, pipeline_given: bool):
    """A LoRA run on the tiny SD3 with validation at steps 2 and 4, on the CPU; returns the trained pipeline, which
    text encoders the pipeline held at each training step, and the validation images. With `pipeline_given` the
    trainer gets the pipeline loaded, so it cannot load its encoders again and keeps them."""
    held = []

    def recording_predict(family, *args, **kwargs):
        held.append(tuple(name for name in TEXT_ENCODERS if getattr(family.pipeline, name) is not None))
        return PREDICT(family, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion3Family, "predict", recording_predict)
    config = tiny_config(
        pipeline_dirs["sd3"],
        instance_dir,
        output_dir,
        adapter="lora",
        rank=4,
        max_train_steps=4,
        validation_prompt="a photo of sks dog on the moon",
        validation_steps=2,
        num_validation_images=1,
    )
    given = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"]) if pipeline_given else None
    pipeline = DreamBoothTrainer(config, pipeline=given).train()
    images = [np.asarray(Image.open(output_dir / "validation" / f"step-{step}" / "0.png")) for step in (2, 4)]
    return pipeline, held, images


def test_released_text_encoders_leave_memory_for_training_and_come_back_unchanged(
    pipeline_dirs, instance_dir, tmp_path, monkeypatch
):
    kept, kept_held, kept_images = train_recording_encoders(
        pipeline_dirs, instance_dir, tmp_path / "kept", monkeypatch, pipeline_given=True
    )
    released, released_held, released_images = train_recording_encoders(
        pipeline_dirs, instance_dir, tmp_path / "released", monkeypatch, pipeline_given=False
    )

    assert kept_held == [TEXT_ENCODERS] * 4
    assert released_held == [()] * 4  # no text encoder in memory at any training step
    for kept_image, released_image in zip(kept_images, released_images):  # validation reloaded them as they were
        np.testing.assert_array_equal(kept_image, released_image)
    for name in TEXT_ENCODERS:  # the returned pipeline is whole, and the reloaded encoders frozen
        encoder = getattr(released, name)
        assert all(not p.requires_grad for p in encoder.parameters())
        for key, value in getattr(kept, name).state_dict().items():
            torch.testing.assert_close(encoder.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "device", "released"),
    [
        (StableDiffusionFamily, "cpu", True),  # on the CPU, offloading frees nothing
        (StableDiffusionFamily, "cuda", False),  # on a GPU, CLIP waits on the CPU, reloading is not worth it
        (Flux2Family, "cuda", True),  # a 24B Mistral leaves memory altogether
        (Flux2Family, "cpu", True),
    ],
)
def test_text_encoders_are_released_off_a_gpu_and_for_llm_families(family, device, released):
    assert releases_text_encoders(family, torch.device(device)) is released


def test_a_released_encoder_is_not_also_offloaded_so_nothing_keeps_it_alive(pipeline_dirs):
    """On a GPU the idle modules go to the CPU; a released one must not, or the list would hold it after its release
    (and bring it back beside its reloaded copy)."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"])
    encoders = [getattr(pipeline, name) for name in TEXT_ENCODERS]
    released = weakref.ref(pipeline.text_encoder_3)
    idle = IdleModules(pipeline, torch.device("cuda"), [pipeline.vae, *encoders], ["text_encoder_3"], reload=None)
    assert [id(module) for module in idle.offloaded] == [id(pipeline.vae), id(encoders[0]), id(encoders[1])]
    idle.set_aside()  # on this CPU machine, moving to "cpu" is a no-op; the release is real
    del encoders
    gc.collect()
    assert pipeline.text_encoder_3 is None and released() is None


def test_in_a_run_nothing_keeps_a_released_encoder_alive(pipeline_dirs, instance_dir, tmp_path, monkeypatch):
    """The encoders a run releases are freed for its training steps: no cache, hook or list of the trainer holds
    them (their memory would stay, and the reloaded copy come on top of it)."""
    released, alive_at_steps = [], []
    set_aside = IdleModules.set_aside

    def recording_set_aside(idle):
        released.extend(weakref.ref(getattr(idle.pipeline, name)) for name in idle.released)
        set_aside(idle)

    def recording_predict(family, *args, **kwargs):
        gc.collect()
        alive_at_steps.append(sum(ref() is not None for ref in released))
        return PREDICT(family, *args, **kwargs)

    monkeypatch.setattr(IdleModules, "set_aside", recording_set_aside)
    monkeypatch.setattr(StableDiffusion3Family, "predict", recording_predict)
    config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / "out", adapter="lora", max_train_steps=2)
    DreamBoothTrainer(config).train()
    assert len(released) == 3 and alive_at_steps == [0, 0]
