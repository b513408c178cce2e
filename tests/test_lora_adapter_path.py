"""The LoRA adapter path, checked end to end on the tiny SD 1.x pipeline (issue #20).

Every module the targets name gets an adapter (B zero, A gaussian), every adapter parameter gets a gradient, each
trained module's learning rate is its own, and the saved adapter, loaded into a plain diffusers pipeline, draws the
training-time pipeline's images with a text-encoder LoRA and an alpha other than the rank (a scale other than 1).
"""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from safetensors.torch import load_file, save_file

from diffusers_dreambooth import DreamBoothTrainer

#: Attention (the default), the transformer blocks' feed-forward and 1x1 projections, and the resnets' convolutions
#: and time-embedding projections: the widest set the sweep in benchmarks/lora_binding.py tries.
ATTENTION_FF_CONV = (
    "to_k,to_q,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj"
)
DEFAULT_DENOISER_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
RANK, ALPHA = 4, 16  # scale 4, not diffusers' default of 1


class GradientRecordingTrainer(DreamBoothTrainer):
    """Records the adapters as they start, and for each trained parameter whether each backward reached it."""

    def _set_up_optimization(self) -> None:
        super()._set_up_optimization()
        self.initial = {}
        self.gradient_reached: dict[str, list[bool]] = {}
        for module_name, module in self.trained.items():
            for name, parameter in module.named_parameters():
                if parameter.requires_grad:
                    key = f"{module_name}.{name}"
                    self.initial[key] = parameter.detach().clone()
                    self.gradient_reached[key] = []
                    parameter.register_hook(lambda grad, key=key: self.gradient_reached[key].append(bool(grad.any())))


def lora_run(pipeline_dirs, tmp_path, trainer_class=DreamBoothTrainer, **overrides):
    instance_dir = write_subject_images(tmp_path / "instance", size=(TINY_RESOLUTION, TINY_RESOLUTION))
    options = {
        "adapter": "lora",
        "rank": RANK,
        "lora_alpha": ALPHA,
        "train_text_encoder": True,
        "learning_rate": 1e-2,
        "text_encoder_lr": 3e-3,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "num_validation_images": 0,
        **overrides,
    }
    trainer = trainer_class(tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **options))
    return trainer, trainer.train()


def generate(pipeline, **options) -> torch.Tensor:
    images = pipeline(
        "a photo of sks dog",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **options,
    ).images
    return torch.from_numpy(images)


def adapted_modules(module: torch.nn.Module) -> set[str]:
    return {name for name, child in module.named_modules() if hasattr(child, "lora_A")}


def modules_named(module: torch.nn.Module, targets) -> set[str]:
    """Linear and convolution layers whose name is, or ends with, one of `targets` (PEFT's matching)."""
    return {
        name
        for name, child in module.named_modules()
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d))
        and any(name == target or name.endswith(f".{target}") for target in targets)
    }


def scalings(module: torch.nn.Module) -> set[float]:
    return {value for child in module.modules() if hasattr(child, "scaling") for value in child.scaling.values()}


@pytest.mark.parametrize("targets", [None, ATTENTION_FF_CONV], ids=["attention", "attention-ff-conv"])
def test_every_targeted_module_has_an_adapter_that_starts_at_zero(pipeline_dirs, tmp_path, targets):
    trainer, pipeline = lora_run(
        pipeline_dirs, tmp_path, GradientRecordingTrainer, lora_target_modules=targets, max_train_steps=1
    )
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    denoiser_targets = targets.split(",") if targets else DEFAULT_DENOISER_TARGETS
    expected = modules_named(base.unet, denoiser_targets)
    assert len(expected) >= (50 if targets else 24)
    assert adapted_modules(pipeline.unet) == expected
    assert adapted_modules(pipeline.text_encoder) == modules_named(base.text_encoder, TEXT_ENCODER_TARGETS)
    # PEFT's "gaussian" init, as diffusers' scripts: B is zero, so the adapted model starts as the base; A ~ N(0, 1/r).
    initial_a = torch.cat([value.flatten() for key, value in trainer.initial.items() if "lora_A" in key])
    assert all(not value.any() for key, value in trainer.initial.items() if "lora_B" in key)
    assert abs(initial_a.std().item() - 1 / RANK) < 0.05 / RANK and abs(initial_a.mean().item()) < 0.05 / RANK
    assert scalings(pipeline.unet) == scalings(pipeline.text_encoder) == {ALPHA / RANK}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_every_adapter_parameter_gets_a_gradient_at_its_own_learning_rate(pipeline_dirs, tmp_path, use_dora):
    trainer, _ = lora_run(
        pipeline_dirs, tmp_path, GradientRecordingTrainer, lora_target_modules=ATTENTION_FF_CONV, use_dora=use_dora
    )
    reached = trainer.gradient_reached
    assert reached and all(len(steps) == 4 for steps in reached.values())
    assert all(key.split(".")[0] in ("unet", "text_encoder") and "lora_" in key for key in reached)
    # B starts at zero, so A's first gradient (B^T times the output's) is zero too; B moves, and A follows.
    assert [key for key, steps in reached.items() if "lora_B" in key and not steps[0]] == []
    assert [key for key, steps in reached.items() if "lora_A" in key and steps[0]] == []
    assert [key for key, steps in reached.items() if not all(steps[1:])] == []
    assert any("lora_magnitude_vector" in key for key in reached) == use_dora
    groups = trainer.optimizer.optimizer.param_groups
    assert [group["lr"] for group in groups] == [1e-2, 3e-3]
    assert [len(group["params"]) for group in groups] == [
        sum(key.startswith(f"{name}.") for key in reached) for name in ("unet", "text_encoder")
    ]


@pytest.mark.parametrize("targets", [None, ATTENTION_FF_CONV], ids=["attention", "attention-ff-conv"])
def test_saved_adapter_with_alpha_and_text_encoder_draws_the_same_images_in_plain_diffusers(
    pipeline_dirs, tmp_path, targets
):
    _, trained = lora_run(pipeline_dirs, tmp_path, lora_target_modules=targets)
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    plain.load_lora_weights(tmp_path / "out")

    for name in ("unet", "text_encoder"):
        loaded, training = getattr(plain, name), getattr(trained, name)
        assert adapted_modules(loaded) == adapted_modules(training), name
        assert scalings(loaded) == scalings(training) == {ALPHA / RANK}, name
    expected = generate(trained)
    torch.testing.assert_close(generate(plain), expected, atol=1e-5, rtol=0)
    # The check can see a wrong scale: the same adapters at a quarter of it (scale 1, alpha = rank) draw otherwise.
    assert (generate(plain, cross_attention_kwargs={"scale": RANK / ALPHA}) - expected).abs().max() > 1e-3
    assert (generate(DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])) - expected).abs().max() > 1e-3


def test_saved_dora_adapter_of_the_denoiser_draws_the_same_images_in_plain_diffusers(pipeline_dirs, tmp_path):
    _, trained = lora_run(pipeline_dirs, tmp_path, use_dora=True, train_text_encoder=False)
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    plain.load_lora_weights(tmp_path / "out")
    torch.testing.assert_close(generate(plain), generate(trained), atol=1e-5, rtol=0)


def magnitudes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DoRA magnitude vectors by module name, whatever the adapter is called (`default`, `default_0`, ...)."""
    return {
        name: child.lora_magnitude_vector[adapter].weight
        for name, child in module.named_modules()
        if hasattr(child, "lora_magnitude_vector")
        for adapter in child.lora_magnitude_vector
    }


def test_saved_dora_adapter_of_the_text_encoder_draws_the_same_images_in_plain_diffusers(pipeline_dirs, tmp_path):
    _, trained = lora_run(pipeline_dirs, tmp_path, use_dora=True)
    # The text encoder's magnitudes carry the parameter's `.weight` (what transformers' `load_adapter` maps onto it);
    # the denoiser's keep PEFT's key, which diffusers loads through PEFT.
    keys = [key for key in load_file(tmp_path / "out" / LORA_WEIGHT_NAME_SAFE) if "lora_magnitude_vector" in key]
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert all(key.endswith(".lora_magnitude_vector.weight") == key.startswith("text_encoder.") for key in keys)
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    plain.load_lora_weights(tmp_path / "out")

    for name in ("unet", "text_encoder"):
        loaded, training = magnitudes(getattr(plain, name)), magnitudes(getattr(trained, name))
        assert loaded.keys() == training.keys() and loaded, name
        for module_name, magnitude in training.items():
            torch.testing.assert_close(loaded[module_name], magnitude, atol=0, rtol=0, msg=f"{name}.{module_name}")
    torch.testing.assert_close(generate(plain), generate(trained), atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved_keys", ["current", "before-suffix"])
def test_dora_with_a_text_encoder_resumes_to_the_weights_of_an_unbroken_run(pipeline_dirs, tmp_path, saved_keys):
    options = {"use_dora": True, "checkpointing_steps": 1}
    lora_run(pipeline_dirs, tmp_path / "unbroken", max_train_steps=3, **options)
    lora_run(pipeline_dirs, tmp_path / "resumed", max_train_steps=2, **options)
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2" / LORA_WEIGHT_NAME_SAFE
    if saved_keys == "before-suffix":  # a checkpoint written before text-encoder magnitudes got `.weight` resumes too
        state_dict = {
            key.removesuffix(".weight") if "magnitude" in key else key: value
            for key, value in load_file(checkpoint).items()
        }
        assert any(key.endswith("lora_magnitude_vector") and key.startswith("text_encoder.") for key in state_dict)
        save_file(state_dict, checkpoint)
    lora_run(pipeline_dirs, tmp_path / "resumed", max_train_steps=3, resume_from_checkpoint="latest", **options)

    unbroken = load_file(tmp_path / "unbroken" / "out" / LORA_WEIGHT_NAME_SAFE)
    resumed = load_file(tmp_path / "resumed" / "out" / LORA_WEIGHT_NAME_SAFE)
    assert resumed.keys() == unbroken.keys()
    assert [key for key, value in unbroken.items() if not torch.equal(resumed[key], value)] == []
