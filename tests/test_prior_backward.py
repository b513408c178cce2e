"""`--prior_backward separate`: a micro-batch's subject half, then its prior half (class images, or in model mode the
class-prompted copy), each run forward and backward in turn (half the activations held at once), for the same
gradients as the joint batch."""

import pytest
import torch
from conftest import tiny_config
from test_buckets import mixed_photos

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer


class GradientRecordingTrainer(DreamBoothTrainer):
    """Records the batch size of every denoiser call of the training loop, and the trained parameters' gradients at
    each optimizer step (after clipping, as the optimizer sees them)."""

    def _run_loop(self) -> None:
        self.denoiser_batches, self.gradients = [], []
        step = self.optimizer.step

        def recording_step(*args, **kwargs):
            self.gradients.append([p.grad.clone() for p in self.trained_parameters])
            return step(*args, **kwargs)

        self.optimizer.step = recording_step
        denoiser = self.prepared[self.family.denoiser_name]
        hook = denoiser.register_forward_pre_hook(lambda _, args: self.denoiser_batches.append(args[0].shape[0]))
        try:
            super()._run_loop()
        finally:
            hook.remove()
            self.optimizer.step = step


def first_step(pipeline_dir, instance_dir, tmp_path, prior_backward: str, **options) -> GradientRecordingTrainer:
    defaults = dict(
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(tmp_path / "class"),  # shared: both runs read the same class images
        num_class_images=2,
        max_train_steps=1,
    )
    config = tiny_config(
        pipeline_dir, instance_dir, tmp_path / prior_backward, prior_backward=prior_backward, **{**defaults, **options}
    )
    trainer = GradientRecordingTrainer(config)
    trainer.train()
    return trainer


MODEL_MODE = dict(prior_preservation_mode="model", num_class_images=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(adapter="lora", rank=4, train_batch_size=2),
        dict(adapter="full", train_text_encoder=True),  # the text encoder runs on each half, with its gradients
        # The prior half: the subject photos prompted with the class, the base model's prediction their target
        # (LoRA: the adapters off; full: a frozen copy).
        dict(adapter="lora", rank=4, train_batch_size=2, **MODEL_MODE),
        dict(adapter="full", **MODEL_MODE),
    ],
    ids=["lora", "full-text-encoder", "lora-model-mode", "full-model-mode"],
)
def test_separate_passes_give_the_joint_batchs_gradients(pipeline_dirs, instance_dir, tmp_path, options):
    joint = first_step(pipeline_dirs["sd"], instance_dir, tmp_path, "joint", **options)
    separate = first_step(pipeline_dirs["sd"], instance_dir, tmp_path, "separate", **options)

    batch = options.get("train_batch_size", 1)
    # LoRA's base-model prediction is the same denoiser called with its adapters off, before the prior half.
    base = [batch] if options.get("prior_preservation_mode") == "model" and options["adapter"] == "lora" else []
    assert joint.denoiser_batches == [*base, 2 * batch]
    assert separate.denoiser_batches == [batch, *base, batch]  # the subject half, then the prior half
    assert_same_gradients(joint, separate)


def assert_same_gradients(joint: GradientRecordingTrainer, separate: GradientRecordingTrainer) -> None:
    """The one step's gradients, equal up to float rounding (a half's activations are summed in another order)."""
    (joint_gradients,), (separate_gradients,) = joint.gradients, separate.gradients
    assert any(gradient.abs().sum() > 0 for gradient in joint_gradients)
    for expected, actual in zip(joint_gradients, separate_gradients, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed, joint_batches", [(0, [2, 2]), (1, [4])], ids=["two-buckets", "one-bucket"])
def test_separate_passes_with_buckets(pipeline_dirs, tmp_path, seed, joint_batches):
    """With `--aspect_ratio_buckets` a batch's subject and class halves are two shape groups (seed 0: wide or tall
    photos, square class images) or one (seed 1: wide class images too); either way each pass is one half, at its
    bucket, with SDXL's size conditioning, and the gradients are the joint batch's."""
    photos = mixed_photos(tmp_path / "photos", sizes=((88, 44), (88, 44), (44, 88), (44, 88)))
    mixed_photos(tmp_path / "class", sizes=((88, 44), (88, 44), (32, 32), (32, 32)), seed=5)
    options = dict(aspect_ratio_buckets=True, adapter="lora", rank=4, train_batch_size=2, num_class_images=4)
    joint, separate = (
        first_step(pipeline_dirs["sdxl"], photos, tmp_path, mode, seed=seed, **options)
        for mode in ("joint", "separate")
    )

    assert joint.denoiser_batches == joint_batches and separate.denoiser_batches == [2, 2]
    assert_same_gradients(joint, separate)


def test_separate_needs_prior_preservation(tmp_path):
    with pytest.raises(ValueError, match=r"`--prior_backward separate` .* add `--with_prior_preservation`"):
        DreamBoothConfig(
            instance_data_dir=str(tmp_path), instance_prompt="a photo of sks dog", prior_backward="separate"
        )
