"""Lumina 2: prompts (Gemma 2 through `Lumina2Pipeline.encode_prompt`, `--system_prompt`), Lumina's reversed time and
negated output against the pipeline's sampling, defaults, the README command, and sampling with its scheduler."""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from family_tester import DreamBoothFamilyTester
from test_sana import Recorder, tiny_readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.testing_utils.lumina2 import LUMINA2_SCHEDULER_CONFIG
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"
SYSTEM_PROMPT = "You are an assistant designed to generate superior images."


class TestLumina2(DreamBoothFamilyTester):
    family = "lumina2"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    lora_trains_text_encoder = False  # Gemma 2 stays frozen, as in diffusers' script


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["lumina2"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


# Prompts


@pytest.mark.parametrize("system_prompt", [None, SYSTEM_PROMPT])
@pytest.mark.parametrize("max_sequence_length", [None, 40])
def test_cached_embeddings_are_the_pipelines_encode_prompt(pipeline, system_prompt, max_sequence_length):
    options = {"system_prompt": system_prompt, "max_sequence_length": max_sequence_length}
    family = configured(pipeline, **{k: v for k, v in options.items() if v is not None})
    prompts = [PROMPT, "a dog"]
    embeds = family.encode_frozen_prompts(prompts)
    expected, mask, _, _ = pipeline.encode_prompt(
        prompts,
        do_classifier_free_guidance=False,
        system_prompt=system_prompt,
        max_sequence_length=max_sequence_length or 256,  # diffusers' script's default
    )
    assert embeds["prompt_embeds"].shape == (2, max_sequence_length or 256, 16)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds["prompt_attention_mask"], mask, rtol=0, atol=0)


def test_system_prompt_reaches_the_embeddings_and_validation(pipeline):
    default = configured(pipeline)
    given = configured(pipeline, system_prompt=SYSTEM_PROMPT)
    assert default.sampling_inputs() == {"system_prompt": None}  # the pipeline's own, in training and sampling
    assert given.sampling_inputs() == {"system_prompt": SYSTEM_PROMPT}
    expected, _, _, _ = pipeline.encode_prompt([PROMPT], do_classifier_free_guidance=False, max_sequence_length=256)
    torch.testing.assert_close(default.encode_frozen_prompts([PROMPT])["prompt_embeds"], expected, rtol=0, atol=0)
    assert not torch.allclose(given.encode_frozen_prompts([PROMPT])["prompt_embeds"], expected)


# The objective


def test_the_objective_is_what_the_pipelines_scheduler_integrates(pipeline):
    """The transformer output that gives zero training loss is `x - noise`; given it, the pipeline's sampling step
    (negated output, Euler) lands exactly on the next point of the same noise-to-image line, and the transformer is
    given the time `1 - t / 1000` the pipeline gives it."""
    family = configured(pipeline)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 1, 4, 4, 4, generator=generator).unbind(0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(4)
    t0, (sigma0, sigma1) = scheduler.timesteps[0], scheduler.sigmas[:2].tolist()
    noisy = (1 - sigma0) * latents + sigma0 * noise
    embeds = family.encode_frozen_prompts([PROMPT])
    recorder = Recorder(latents - noise)
    prediction = family.predict(recorder, noisy, t0.view(1), embeds, None)
    torch.testing.assert_close(recorder.kwargs["timestep"], 1 - t0.view(1) / 1000)
    torch.testing.assert_close(recorder.kwargs["encoder_attention_mask"], embeds["prompt_attention_mask"].long())
    # Zero loss: the prediction is the training target at this noise level.
    training_t = family.noise_scheduler.timesteps[:1]
    _, target = family.noisy_input_and_target(latents, noise, training_t)
    torch.testing.assert_close(prediction, target)
    stepped = scheduler.step(-recorder.output, t0, noisy).prev_sample  # Lumina2Pipeline negates the output
    torch.testing.assert_close(stepped, (1 - sigma1) * latents + sigma1 * noise)


def test_training_noise_levels_follow_the_shifted_schedule(pipeline):
    family = configured(pipeline)
    assert family.noise_scheduler.config.shift == 6.0  # Lumina-Image 2.0's
    indices = torch.tensor([0, 500, 999])
    timesteps = family.noise_scheduler.timesteps[indices]
    t = (1000 - indices.double()) / 1000
    sigmas = (6 * t / (1 + 5 * t)).float().view(-1, 1, 1, 1)
    latents, noise = torch.randn(2, 3, 4, 2, 2).unbind(0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(target, noise - latents)


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_lumina2_script(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.resolution) == (1e-4, 1e-4, 512)
    assert (config.weighting_scheme, config.max_sequence_length, config.system_prompt) == ("none", 256, None)
    family = configured(pipeline, adapter=adapter)
    assert family.denoiser_lora_targets(config) == ["to_k", "to_q", "to_v", "to_out.0"]
    assert family.resolution_multiple == 16  # 8x VAE, 2x2 patches


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr_gamma"),
        ({"train_text_encoder": True}, "--train_text_encoder"),
        ({"resolution": 40}, "multiple of 16"),
    ],
)
def test_options_lumina2_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    trainer = DreamBoothTrainer(tiny_config(pipeline_dirs["lumina2"], instance_dir, tmp_path / "out", **options))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0


def test_readme_command_trains_two_steps(pipeline_dirs, instance_dir, tmp_path):
    flags = tiny_readme_command("lumina2", pipeline_dirs["lumina2"], instance_dir, tmp_path / "out")
    trainer = DreamBoothTrainer(parse_config(flags))
    pipe = trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "to_q.lora_B" in n)


def test_validation_samples_with_the_training_system_prompt(pipeline_dirs, instance_dir, tmp_path):
    options = dict(validation_prompt=PROMPT, validation_steps=2, num_validation_images=1)
    images = {}
    for name, system_prompt in (("default", None), ("given", SYSTEM_PROMPT)):
        config = tiny_config(
            pipeline_dirs["lumina2"], instance_dir, tmp_path / name, system_prompt=system_prompt, **options
        )
        DreamBoothTrainer(config).train()
        images[name] = (tmp_path / name / "validation" / "step-2" / "0.png").read_bytes()
    assert images["default"] != images["given"]


# Sampling


#: Lumina-Image 2.0's scheduler (a fixed shift of 6; `Lumina2Pipeline` passes `mu` and its own `sigmas` anyway), and
#: a default `FlowMatchEulerDiscreteScheduler()`.
LUMINA2_SCHEDULERS = {"Lumina-Image-2.0": LUMINA2_SCHEDULER_CONFIG, "default": {}}


@pytest.mark.parametrize("scheduler_config", LUMINA2_SCHEDULERS.values(), ids=LUMINA2_SCHEDULERS.keys())
def test_dpm_solver_samples_lumina2_as_its_own_scheduler_does(pipeline, scheduler_config):
    def generate(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
        return pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = pipeline.scheduler
    try:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        reference = generate(200)  # the model's own scheduler, near the ODE's solution
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", pipeline.scheduler)
        assert (generate(25) - reference).abs().max() < 0.01
    finally:
        pipeline.scheduler = original
