"""End-to-end training on tiny SD 1.x, SD 2.x (v-prediction) and SDXL pipelines, full and LoRA.

One tester class holds the assertions; a subclass per family sets only attributes (as diffusers' pipeline tests do).
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline, UNet2DConditionModel

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
from diffusers_dreambooth.checkpoints import list_checkpoints


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict, after: dict, keys=None) -> set[str]:
    keys = before.keys() if keys is None else keys
    return {k for k in keys if not torch.equal(before[k].float(), after[k].float())}


def generate(pipeline, prompt: str = "a photo of sks dog") -> torch.Tensor:
    output = pipeline(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    return torch.from_numpy(output)


class DreamBoothFamilyTester:
    """Assertions every family must pass; subclasses set `family`."""

    family: str

    def config(self, pipeline_dirs, instance_dir, tmp_path, **overrides) -> DreamBoothConfig:
        options = {"train_batch_size": 2, "max_train_steps": 4, "checkpointing_steps": 2, **overrides}
        return tiny_config(pipeline_dirs[self.family], instance_dir, tmp_path / "out", **options)

    def test_full_fine_tune_trains_the_denoiser_only(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(
            pipeline_dirs,
            instance_dir,
            tmp_path,
            with_prior_preservation=True,
            class_prompt="a photo of dog",
            class_data_dir=str(tmp_path / "class"),
            num_class_images=3,
        )
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()

        assert len(changed(state_of(base.unet), state_of(pipeline.unet))) > 0.9 * len(base.unet.state_dict())
        assert not changed(state_of(base.vae), state_of(pipeline.vae))
        assert not changed(state_of(base.text_encoder), state_of(pipeline.text_encoder))
        # The output is a plain diffusers pipeline folder that reproduces the trained pipeline's images.
        model_index = json.loads((tmp_path / "out" / "model_index.json").read_text())
        assert model_index["_class_name"] == type(base).__name__
        reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(generate(reloaded), generate(pipeline), atol=1e-5, rtol=0)
        assert not torch.allclose(generate(base), generate(pipeline), atol=1e-4)
        saved_config = json.loads((tmp_path / "out" / "dreambooth_config.json").read_text())
        assert saved_config["instance_prompt"] == "a photo of sks dog"
        # diffusers' README: a checkpoint's unet folder loads for inference.
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "checkpoint-4" / "unet")
        assert not changed(state_of(unet), state_of(pipeline.unet))

    def test_train_text_encoder_updates_every_text_encoder(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(pipeline_dirs, instance_dir, tmp_path, train_text_encoder=True, max_train_steps=2)
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()
        for name in ("text_encoder", "text_encoder_2"):
            if hasattr(base, name) and getattr(base, name) is not None:
                assert changed(state_of(getattr(base, name)), state_of(getattr(pipeline, name))), name
        assert not changed(state_of(base.vae), state_of(pipeline.vae))

    def test_lora_trains_adapters_and_loads_in_plain_diffusers(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(pipeline_dirs, instance_dir, tmp_path, adapter="lora", rank=4, train_text_encoder=True)
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()

        trained_unet = state_of(pipeline.unet)
        base_keys = [k for k in trained_unet if "lora_" not in k]
        lora_keys = [k for k in trained_unet if "lora_B" in k]
        assert lora_keys
        # PEFT wraps base layers (`to_q.weight` -> `to_q.base_layer.weight`): compare by original name.
        original = state_of(base.unet)
        assert all(torch.equal(original[k.replace(".base_layer", "")], trained_unet[k]) for k in base_keys)
        assert all(trained_unet[k].abs().sum() > 0 for k in lora_keys)  # lora_B starts at zero

        assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
        assert not (tmp_path / "out" / "unet").exists()
        plain = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        plain.load_lora_weights(tmp_path / "out")
        torch.testing.assert_close(generate(plain), generate(pipeline), atol=1e-5, rtol=0)
        assert not torch.allclose(generate(base), generate(pipeline), atol=1e-4)

    @pytest.mark.parametrize("adapter", ["full", "lora"])
    def test_resumed_run_matches_an_unbroken_one(self, pipeline_dirs, instance_dir, tmp_path, adapter):
        options = dict(adapter=adapter, max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear")
        unbroken = DreamBoothTrainer(self.config(pipeline_dirs, instance_dir, tmp_path, **options)).train()
        expected = state_of(unbroken.unet)

        # Simulate a run that died after its step-2 checkpoint: only checkpoint-2 is left.
        out = tmp_path / "out"
        for path in out.iterdir():
            if path.name != "checkpoint-2":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        config = self.config(pipeline_dirs, instance_dir, tmp_path, resume_from_checkpoint="latest", **options)
        resumed = DreamBoothTrainer(config).train()
        assert not changed(expected, state_of(resumed.unet))
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


class TestStableDiffusion(DreamBoothFamilyTester):
    family = "sd"


class TestStableDiffusionV(DreamBoothFamilyTester):
    family = "sd2"


class TestStableDiffusionXL(DreamBoothFamilyTester):
    family = "sdxl"


def test_lora_optimizer_state_holds_only_the_adapters_and_the_base_stays_in_the_training_dtype(
    pipeline_dirs, square_instance_dir, tmp_path
):
    config = tiny_config(
        pipeline_dirs["sd"], square_instance_dir, tmp_path / "out", adapter="lora", rank=4, mixed_precision="bf16"
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    trained = {id(p): name for name, p in trainer.family.denoiser.named_parameters() if p.requires_grad}
    state = trainer.optimizer.optimizer.state
    assert trained and {id(p) for p in state} == set(trained)
    assert all("lora_" in name for name in trained.values())
    assert {p.dtype for p in state} == {torch.float32}  # adapters train in float32 ...
    frozen = {p.dtype for p in trainer.family.denoiser.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # ... on a frozen base held in the training dtype
