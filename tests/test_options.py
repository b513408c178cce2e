"""Training options beyond the basics, each on a short real run of the tiny SD pipeline."""

import importlib.util
import json

import pytest
import torch
from conftest import tiny_config, write_subject_images
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusers_dreambooth import DreamBoothTrainer


class StateKeepingTrainer(DreamBoothTrainer):
    """Keeps the optimizer's state as the last step left it (`train()` releases it before the final save)."""

    def release_training_state(self) -> None:
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self.last_optimizer_state = dict(optimizer.state)
        super().release_training_state()


def run(pipeline_dirs, instance_dir, tmp_path, family="sd", **overrides) -> DreamBoothTrainer:
    options = {"train_batch_size": 2, **overrides}
    trainer = StateKeepingTrainer(tiny_config(pipeline_dirs[family], instance_dir, tmp_path / "out", **options))
    trainer.train()
    return trainer


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is a test extra")
def test_validation_images_are_saved_and_logged_to_tensorboard(pipeline_dirs, instance_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(
        pipeline_dirs,
        instance_dir,
        tmp_path,
        max_train_steps=4,
        validation_prompt="a photo of sks dog",
        validation_steps=2,
        num_validation_images=2,
        validation_inference_steps=2,
        report_to="tensorboard",
    )
    for step in (2, 4):
        images = sorted((tmp_path / "out" / "validation" / f"step-{step}").glob("*.png"))
        assert [p.name for p in images] == ["0.png", "1.png"]
    events = EventAccumulator(str(tmp_path / "out" / "logs" / "dreambooth"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [(e.step, e.width) for e in events.Images("validation")] == [(2, 64), (4, 64)]


def test_validation_epochs_convert_to_steps(pipeline_dirs, instance_dir, tmp_path):
    # 4 images, batch 2: two steps per epoch, so validation every epoch runs at steps 2 and 4.
    run(
        pipeline_dirs,
        instance_dir,
        tmp_path,
        adapter="lora",
        max_train_steps=4,
        validation_prompt="a photo of sks dog",
        validation_epochs=1,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step-2", "step-4"]


def test_bf16_lora_keeps_the_base_in_bf16_and_adapters_in_fp32(pipeline_dirs, instance_dir, tmp_path):
    trainer = run(pipeline_dirs, instance_dir, tmp_path, adapter="lora", mixed_precision="bf16")
    unet = trainer.pipeline.unet
    dtypes = {name: p.dtype for name, p in unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_bf16_full_fine_tune_keeps_fp32_master_weights(pipeline_dirs, instance_dir, tmp_path):
    trainer = run(pipeline_dirs, instance_dir, tmp_path, mixed_precision="bf16")
    assert {p.dtype for p in trainer.pipeline.unet.parameters()} == {torch.float32}
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert reloaded.unet.dtype == torch.float32


@pytest.mark.parametrize(
    "options",
    [
        {"snr_gamma": 5.0},
        {"offset_noise": True},
        {"gradient_accumulation_steps": 2},
        {"gradient_checkpointing": True, "train_text_encoder": True},
        {"random_flip": True, "center_crop": True},
        {"lr_scheduler": "cosine", "lr_warmup_steps": 1, "scale_lr": True},
        {"offload": True, "cache_latents": True, "optimizer": "adamW"},  # as diffusers' FLUX.2 and Z-Image READMEs
    ],
    ids=lambda options: ",".join(options),
)
def test_option_trains(pipeline_dirs, instance_dir, tmp_path, options):
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    trainer = run(pipeline_dirs, instance_dir, tmp_path, **options)
    assert trainer.global_step == 2
    assert not torch.equal(base.unet.conv_in.weight, trainer.pipeline.unet.conv_in.weight)
    assert all(torch.isfinite(p).all() for p in trainer.pipeline.unet.parameters())


def test_snr_weighting_changes_the_update(pipeline_dirs, instance_dir, tmp_path):
    plain = run(pipeline_dirs, instance_dir, tmp_path / "plain").pipeline.unet.conv_in.weight
    weighted = run(pipeline_dirs, instance_dir, tmp_path / "snr", snr_gamma=1.0).pipeline.unet.conv_in.weight
    assert not torch.allclose(plain, weighted)


def test_dataset_captions_become_the_prompts(pipeline_dirs, tmp_path):
    folder = write_subject_images(tmp_path / "dataset", count=2)
    rows = [{"file_name": "photo_0.png", "text": "a photo of sks dog"}, {"file_name": "photo_1.png", "text": "sks"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = run(
        pipeline_dirs,
        None,
        tmp_path,
        instance_data_dir=None,
        dataset_name=str(folder),
        caption_column="text",
        instance_prompt=None,
    )
    assert sorted(image.prompt for image in trainer.instance_images) == ["a photo of sks dog", "sks"]


def test_lora_target_modules_and_dropout_reach_the_adapters(pipeline_dirs, instance_dir, tmp_path):
    trainer = run(
        pipeline_dirs, instance_dir, tmp_path, adapter="lora", lora_target_modules="to_q, to_v", lora_dropout=0.1
    )
    adapted = {
        name.rsplit(".", 1)[-1] for name, module in trainer.pipeline.unet.named_modules() if hasattr(module, "lora_A")
    }
    assert adapted == {"to_q", "to_v"}
    config = trainer.pipeline.unet.peft_config["default"]
    assert (config.lora_dropout, config.r, config.lora_alpha) == (0.1, 4, 4)


def test_output_kohya_format_writes_a_file_plain_diffusers_loads(pipeline_dirs, instance_dir, tmp_path):
    run(pipeline_dirs, instance_dir, tmp_path, adapter="lora", output_kohya_format=True)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    pipe.load_lora_weights(tmp_path / "out", weight_name="pytorch_lora_weights_kohya.safetensors")
    assert pipe.get_active_adapters()


def test_skip_save_text_encoder_leaves_it_out(pipeline_dirs, instance_dir, tmp_path):
    trainer = run(pipeline_dirs, instance_dir, tmp_path, train_text_encoder=True, skip_save_text_encoder=True)
    model_index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert model_index["text_encoder"] == [None, None]
    assert not (tmp_path / "out" / "text_encoder").exists()
    assert trainer.pipeline.text_encoder is not None


def test_8bit_adam_keeps_its_moments_in_8_bits_and_trains(pipeline_dirs, instance_dir, tmp_path):
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"]).unet.state_dict()
    trainer = run(pipeline_dirs, instance_dir, tmp_path, use_8bit_adam=True, max_train_steps=2)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__name__ == "AdamW8bit"
    # bitsandbytes keeps tensors under 4,096 elements (`min_8bit_size`) in 32 bits; the rest in 8.
    state = trainer.last_optimizer_state  # as the last step left it: `train()` then releases it
    large = [state[p] for p in trainer.trained_parameters if p.numel() >= 4096]
    assert large and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in large)
    trained = trainer.pipeline.unet.state_dict()
    assert any(not torch.equal(trained[name], base[name]) for name in base)


def test_resolution_not_divisible_by_the_vae_factor_is_rejected(pipeline_dirs, instance_dir, tmp_path):
    with pytest.raises(ValueError, match="--resolution=33"):
        run(pipeline_dirs, instance_dir, tmp_path, resolution=33)


def test_the_seed_alone_fixes_the_lora_initialisation(pipeline_dirs, instance_dir, tmp_path):
    """Whatever drew from torch's global generator before (class images, other code), the same seed trains the same
    adapters: a rerun, or several processes, start from identical LoRA weights."""
    torch.manual_seed(1)
    run(pipeline_dirs, instance_dir, tmp_path / "first", adapter="lora", rank=4, max_train_steps=1)
    torch.manual_seed(2)
    torch.rand(1000)
    run(pipeline_dirs, instance_dir, tmp_path / "second", adapter="lora", rank=4, max_train_steps=1)
    first, second = (
        load_file(tmp_path / run / "out" / "pytorch_lora_weights.safetensors") for run in ("first", "second")
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
