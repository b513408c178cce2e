"""End-to-end training on tiny SD 1.x, SD 2.x (v-prediction), SDXL, SD3, Flux and DeepFloyd IF (stage I and the
stage II super-resolution) pipelines, full and LoRA: `family_tester.DreamBoothFamilyTester` per family.
"""

import torch
from conftest import tiny_config
from family_tester import DreamBoothFamilyTester

from diffusers_dreambooth import DreamBoothTrainer


class TestStableDiffusion(DreamBoothFamilyTester):
    family = "sd"


class TestStableDiffusionV(DreamBoothFamilyTester):
    family = "sd2"


class TestStableDiffusionXL(DreamBoothFamilyTester):
    family = "sdxl"


class TestStableDiffusion3(DreamBoothFamilyTester):
    family = "sd3"
    # The last block's text-stream output is discarded (`context_pre_only`), so its text queries get no gradient.
    lora_modules_without_gradient = ("transformer_blocks.1.attn.add_q_proj",)


class TestFlux(DreamBoothFamilyTester):
    family = "flux"
    frozen_text_encoders = ("text_encoder_2",)  # T5, as diffusers' Flux scripts
    # No card samples: FluxPipeline samples 128x128 latents whatever the model, 3.5 s a run here (test_flux.py checks
    # that samples are written).
    run_options = {"num_validation_images": 0}


class TestDeepFloydIF(DreamBoothFamilyTester):
    family = "if"
    lora_trains_text_encoder = False


class TestDeepFloydIFSuperResolution(DreamBoothFamilyTester):
    family = "if_sr"
    lora_trains_text_encoder = False
    # Stage I's output to upscale: 8x8 (the tiny stage II upscales 4x to TINY_RESOLUTION).
    call_options = {"image": torch.linspace(-1, 1, 3 * 8 * 8).reshape(1, 3, 8, 8)}
    generates_class_images = False


class StateKeepingTrainer(DreamBoothTrainer):
    """Keeps the optimizer's state as the last step left it (`train()` releases it before the final save)."""

    def release_training_state(self) -> None:
        self.last_optimizer_state = dict(self.optimizer.optimizer.state)
        super().release_training_state()


def test_lora_optimizer_state_holds_only_the_adapters_and_the_base_stays_in_the_training_dtype(
    pipeline_dirs, square_instance_dir, tmp_path
):
    config = tiny_config(
        pipeline_dirs["sd"], square_instance_dir, tmp_path / "out", adapter="lora", rank=4, mixed_precision="bf16"
    )
    trainer = StateKeepingTrainer(config)
    trainer.train()
    trained = {id(p): name for name, p in trainer.family.denoiser.named_parameters() if p.requires_grad}
    state = trainer.last_optimizer_state
    assert trained and {id(p) for p in state} == set(trained)
    assert all("lora_" in name for name in trained.values())
    assert {p.dtype for p in state} == {torch.float32}  # adapters train in float32 ...
    frozen = {p.dtype for p in trainer.family.denoiser.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # ... on a frozen base held in the training dtype
