"""`--use_ema`: the average of the trained weights is saved, checkpointed, and resumed exactly."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.ema import EMA_STATE_NAME

RUN = dict(train_batch_size=2, max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", use_ema=True)


def trained_weights(trainer: DreamBoothTrainer) -> dict[str, torch.Tensor]:
    """The trained parameters by the names the EMA state uses."""
    return {n: p.detach().clone() for n, p in zip(trainer.trained_parameter_names, trainer.trained_parameters)}


def run(pipeline_dirs, instance_dir, tmp_path, **overrides) -> DreamBoothTrainer:
    trainer = DreamBoothTrainer(
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **{**RUN, **overrides})
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_the_average_is_the_final_weights_and_in_each_checkpoint(pipeline_dirs, instance_dir, tmp_path, adapter):
    trainer = run(pipeline_dirs, instance_dir, tmp_path, adapter=adapter, ema_decay=0.5)
    out = tmp_path / "out"
    final = trained_weights(trainer)
    ema_state = load_file(out / "checkpoint-4" / EMA_STATE_NAME)

    assert ema_state.keys() == final.keys()
    assert all(torch.equal(ema_state[name], final[name]) for name in final)
    assert (out / "checkpoint-2" / EMA_STATE_NAME).is_file()
    if adapter == "lora":  # the average covers the adapter weights only
        assert final and all("lora_" in name for name in final)
        saved = load_file(out / "pytorch_lora_weights.safetensors")
        assert len(saved) == len(final)
        # The training weights at step 4 (checkpoint-4's LoRA file) differ from the average that was saved.
        checkpointed = load_file(out / "checkpoint-4" / "pytorch_lora_weights.safetensors")
        assert any(not torch.equal(saved[key], checkpointed[key]) for key in saved)
    else:
        unet = DiffusionPipeline.from_pretrained(out).unet.state_dict()
        training_unet = load_file(out / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
        averaged = {name.removeprefix("unet."): value for name, value in final.items()}
        assert all(torch.equal(unet[key], averaged[key]) for key in averaged)
        assert any(not torch.equal(training_unet[key], averaged[key]) for key in averaged)
    subject = json.loads((out / "dreambooth.json").read_text())
    assert subject["training"]["ema_decay"] == 0.5


def test_the_average_follows_the_ema_formula(pipeline_dirs, instance_dir, tmp_path):
    # Two steps: decay 0 after the first (the average is the weights), then min(0.5, 2/11) = 2/11.
    trainer = run(pipeline_dirs, instance_dir, tmp_path, ema_decay=0.5, max_train_steps=2, checkpointing_steps=1)
    out = tmp_path / "out"
    step_1 = load_file(out / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors")
    step_2 = load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(
        load_file(out / "checkpoint-1" / EMA_STATE_NAME)["unet.conv_in.weight"], step_1["conv_in.weight"]
    )
    decay = 2 / 11
    expected = decay * step_1["conv_in.weight"] + (1 - decay) * step_2["conv_in.weight"]
    torch.testing.assert_close(trainer.pipeline.unet.conv_in.weight.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_resumed_ema_run_matches_an_unbroken_one(pipeline_dirs, instance_dir, tmp_path, adapter):
    expected = trained_weights(run(pipeline_dirs, instance_dir, tmp_path, adapter=adapter))

    # A run that died after its step-2 checkpoint: only checkpoint-2 is left.
    out = tmp_path / "out"
    for path in out.iterdir():
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = trained_weights(
        run(pipeline_dirs, instance_dir, tmp_path, adapter=adapter, resume_from_checkpoint="latest")
    )

    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
