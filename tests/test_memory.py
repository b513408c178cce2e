"""Issue #21: what only training needs is released after the last step, before the final save and the samples and
evaluation drawn after it; sampling decodes one image at a time. Memory itself is measured by
`benchmarks/peak_memory.py`, not here."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothTrainer, finishing
from diffusers_dreambooth.optimization import free_memory, release_optimizer_state


class RecordingTrainer(DreamBoothTrainer):
    """Records the training state as the last step left it, and what is still held when each stage runs."""

    def release_training_state(self) -> None:
        self.state_before_release = dict(self.optimizer.optimizer.state)
        self.ema_before_release = self.ema
        super().release_training_state()


def held_state(trainer: DreamBoothTrainer) -> dict:
    return {
        "optimizer_state": len(trainer.optimizer.optimizer.state),
        "gradients": sum(p.grad is not None for p in trainer.clipped_parameters),
        "ema": trainer.ema,
        "vae_slicing": trainer.pipeline.vae.use_slicing,
    }


def record_stages(monkeypatch, seen: dict) -> None:
    """Wrap the sampling stages (`finish_subject` looks them up per call) to record what the run holds then."""
    for name in ("write_samples", "write_evaluation"):
        stage = getattr(finishing, name)

        def recorded(job, stage=stage, name=name):
            seen[name] = held_state(seen["trainer"])
            decode = job.pipeline.vae.decode

            def decode_recorded(*args, **kwargs):
                seen.setdefault(f"{name} decode slicing", set()).add(job.pipeline.vae.use_slicing)
                return decode(*args, **kwargs)

            job.pipeline.vae.decode = decode_recorded
            try:
                return stage(job)
            finally:
                del job.pipeline.vae.decode

        monkeypatch.setattr(finishing, name, recorded)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_samples_and_evaluation_run_after_the_training_state_is_released(
    pipeline_dirs, square_instance_dir, tmp_path, monkeypatch, adapter
):
    from diffusers_dreambooth.toy import CHECKER_DIR

    config = tiny_config(
        pipeline_dirs["sd"],
        square_instance_dir,
        tmp_path / "out",
        adapter=adapter,
        use_ema=True,
        num_validation_images=2,
        evaluate=True,
        class_prompt="a photo of dog",
        evaluation_prompts=["a {subject} on the beach"],
        evaluation_images_per_prompt=2,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
    )
    trainer = RecordingTrainer(config)
    seen = {"trainer": trainer}
    record_stages(monkeypatch, seen)
    trainer.train()

    trained = set(map(id, trainer.trained_parameters))
    assert trained and {id(p) for p in trainer.state_before_release} >= trained  # the loop did keep Adam's moments
    assert trainer.ema_before_release is not None
    released = {"optimizer_state": 0, "gradients": 0, "ema": None, "vae_slicing": False}
    assert seen["write_samples"] == seen["write_evaluation"] == released
    assert held_state(trainer) == released
    assert trainer.frozen_denoiser is None
    # Kept: what the returned trainer still describes (parameter groups, learning rates), and the caches tests read.
    assert sum(len(group["params"]) for group in trainer.optimizer.optimizer.param_groups) == len(trained)
    assert trainer.instance_latents.mean[0] is not None
    # Each decode of both stages ran sliced (one image at a time), and slicing is off again afterwards.
    assert seen["write_samples decode slicing"] == seen["write_evaluation decode slicing"] == {True}
    assert (tmp_path / "out" / "samples" / "sample_1.png").is_file()


def test_the_saved_weights_are_the_ema_average_after_its_shadow_is_released(
    pipeline_dirs, square_instance_dir, tmp_path
):
    config = tiny_config(
        pipeline_dirs["sd"], square_instance_dir, tmp_path / "out", use_ema=True, max_train_steps=3, ema_decay=0.5
    )
    trainer = RecordingTrainer(config)
    trainer.train()
    average = trainer.ema_before_release.shadow_params
    for parameter, shadow in zip(trainer.trained_parameters, average, strict=True):
        torch.testing.assert_close(parameter.detach(), shadow, rtol=0, atol=0)
    saved = DiffusionPipeline.from_pretrained(tmp_path / "out").unet.state_dict()
    for name, value in trainer.pipeline.unet.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_release_optimizer_state_keeps_the_groups_and_the_optimizer_can_step_again():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 0.1}])
    weight.sum().backward()
    optimizer.step()
    assert optimizer.state[weight] and weight.grad is not None
    release_optimizer_state(optimizer)
    assert len(optimizer.state) == 0 and weight.grad is None
    assert optimizer.param_groups[0]["params"] == [weight] and optimizer.param_groups[0]["lr"] == 0.1
    weight.sum().backward()
    optimizer.step()  # starts a fresh state
    assert int(optimizer.state[weight]["step"]) == 1
    free_memory()  # gc, then the C heap's free pages (Linux) or the CUDA cache: never raises


def test_latents_are_cached_one_image_at_a_time(pipeline_dirs, square_instance_dir, tmp_path, monkeypatch):
    """Caching encodes `--sample_batch_size` images per call with the VAE's slicing on (its activations at full
    resolution grow with the batch), and caches what a batched encode gives, up to rounding."""
    from diffusers import AutoencoderKL

    calls = []
    encode = AutoencoderKL.encode

    def recorded(vae, x, *args, **kwargs):
        calls.append((x.shape[0], vae.use_slicing))
        return encode(vae, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", recorded)
    config = tiny_config(pipeline_dirs["sd"], square_instance_dir, tmp_path / "out", max_train_steps=1)
    trainer = DreamBoothTrainer(config)
    trainer.train()
    assert calls[0] == (4, True) and not trainer.pipeline.vae.use_slicing
    pixels = torch.stack([trainer._pixels(image, None)[0] for image in trainer.instance_images])
    with torch.no_grad():
        batched, _ = trainer.family.encode_image_distribution(pixels)  # slicing off again: one batched encode
    assert calls[-1] == (4, False)
    torch.testing.assert_close(torch.stack(trainer.instance_latents.mean), batched, rtol=0, atol=1e-5)


def test_images_are_drawn_sample_batch_size_at_a_time_as_one_call_would(pipeline_dirs):
    """Validation, samples and evaluation (whose class-prompt images are up to 32 in one request) call the pipeline
    with at most `--sample_batch_size` prompts; one generator runs through the calls, so a deterministic scheduler
    draws the images one call with every prompt would."""
    from diffusers_dreambooth.validation import generate_images

    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    call = type(pipeline).__call__

    def recorded(self, prompt, **kwargs):
        batches.append(len(prompt))
        return call(self, prompt=prompt, **kwargs)

    prompts = [f"a photo of sks dog {index}" for index in range(7)]
    chunked = tiny_config(pipeline_dirs["sd"], "dog", "out", sample_batch_size=3, validation_inference_steps=3)
    whole = tiny_config(pipeline_dirs["sd"], "dog", "out", sample_batch_size=7, validation_inference_steps=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipeline), "__call__", recorded)
        images = generate_images(pipeline, chunked, prompts, seed=0, output_type="np")
        assert batches == [3, 3, 1]
        reference = generate_images(pipeline, whole, prompts, seed=0, output_type="np")
        assert batches[3:] == [7]
    assert len(images) == 7
    for image, expected in zip(images, reference):
        np.testing.assert_allclose(image, expected, atol=1e-4)
