"""`--prior_preservation_mode model`: the prior target is the frozen base model's prediction, no class images."""

import json

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothTrainer

CLASS_PROMPT = "a photo of dog"


class RecordingTrainer(DreamBoothTrainer):
    """Keeps what each micro-step's doubled batch was: inputs, targets and the prior mask."""

    def _with_base_model_targets(self, noisy, timesteps, prompt_embeds, conditioning, target, class_prompts):
        result = super()._with_base_model_targets(noisy, timesteps, prompt_embeds, conditioning, target, class_prompts)
        self.records = getattr(self, "records", []) + [(noisy.detach().clone(), timesteps.clone(), result)]
        return result


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_the_prior_target_is_the_frozen_base_models_prediction(pipeline_dirs, instance_dir, tmp_path, adapter):
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        adapter=adapter,
        train_text_encoder=True,
        train_batch_size=2,
        max_train_steps=3,
        with_prior_preservation=True,
        prior_preservation_mode="model",
        class_prompt=CLASS_PROMPT,
        class_data_dir=str(tmp_path / "class"),  # ignored, with a warning
    )
    trainer = RecordingTrainer(config)
    pipeline = trainer.train()
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    ids = base.tokenizer([CLASS_PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    base_embeds = base.text_encoder(ids.input_ids)[0]

    assert len(trainer.records) == 3
    for noisy, timesteps, (both_noisy, both_timesteps, _, _, target, is_prior) in trainer.records:
        count = noisy.shape[0]
        assert is_prior.tolist() == [False] * count + [True] * count
        assert torch.equal(both_noisy, torch.cat([noisy, noisy]))
        assert torch.equal(both_timesteps, torch.cat([timesteps, timesteps]))
        with torch.no_grad():
            expected = base.unet(noisy, timesteps, encoder_hidden_states=base_embeds.expand(count, -1, -1)).sample
        torch.testing.assert_close(target[count:], expected, atol=1e-5, rtol=1e-5)
    # The trained model moved away from the base (so the check above did not compare the base with itself).
    changed = [not torch.equal(a, b) for a, b in zip(base.unet.parameters(), pipeline.unet.parameters())]
    assert adapter == "lora" or any(changed)
    assert not (tmp_path / "class").exists()
    written = [p for p in (tmp_path / "out").rglob("*.png") if "samples" not in p.relative_to(tmp_path).parts]
    assert written == []
    subject = json.loads((tmp_path / "out" / "dreambooth.json").read_text())
    assert subject["training"]["prior_preservation_mode"] == "model"
    assert subject["training"]["num_class_images"] is None


def test_model_mode_needs_the_prior_loss(pipeline_dirs, instance_dir, tmp_path):
    with pytest.raises(ValueError, match="add `--with_prior_preservation`"):
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path, prior_preservation_mode="model")
    # No `--class_data_dir` needed.
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path,
        with_prior_preservation=True,
        prior_preservation_mode="model",
        class_prompt=CLASS_PROMPT,
    )
    assert config.class_data_dir is None


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_model_mode_trains_every_family(pipeline_dirs, instance_dir, tmp_path, family):
    config = tiny_config(
        pipeline_dirs[family],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        max_train_steps=2,
        num_validation_images=0,
        with_prior_preservation=True,
        prior_preservation_mode="model",
        class_prompt=CLASS_PROMPT,
    )
    trainer = RecordingTrainer(config)
    trainer.train()
    # Every step doubled the batch: the instance half, then the class half with the base model's targets.
    for noisy, _, (both_noisy, _, _, _, target, is_prior) in trainer.records:
        count = noisy.shape[0]
        assert is_prior.tolist() == [False] * count + [True] * count
        assert target.shape[0] == both_noisy.shape[0] == 2 * count and torch.isfinite(target).all()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
