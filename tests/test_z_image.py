"""Z-Image: prompts (Qwen3 through the chat template of `ZImagePipeline.encode_prompt`, a list of unpadded
features), latents, the objective and its reversed time against the script and the pipeline, defaults, the README
command, and sampling with its scheduler."""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.testing_utils.z_image import Z_IMAGE_SCHEDULER_CONFIG
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"


class TestZImage(DreamBoothFamilyTester):
    family = "z_image"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    lora_trains_text_encoder = False  # Qwen3 stays frozen, as in diffusers' script


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["z_image"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


class Recorder(torch.nn.Module):
    """A transformer that records its inputs and returns `output` (a list, as Z-Image's transformer does)."""

    def __init__(self, output: list[torch.Tensor]) -> None:
        super().__init__()
        self.output = output

    def forward(self, x, t, cap_feats, return_dict=True) -> tuple[list[torch.Tensor]]:
        self.x, self.t, self.cap_feats = x, t, cap_feats
        return (self.output,)


# Prompts


@pytest.mark.parametrize("max_sequence_length", [None, 12])
def test_cached_embeddings_are_the_pipelines_encode_prompt(pipeline, max_sequence_length):
    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    family = configured(pipeline, **options)
    prompts = [PROMPT, "a dog"]
    embeds = family.encode_frozen_prompts(prompts)
    expected, _ = pipeline.encode_prompt(
        list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length or 512
    )
    assert prompts == [PROMPT, "a dog"]  # the pipeline templates the list it is given in place; not ours
    lengths = [len(feature) for feature in expected]
    assert embeds["prompt_embeds"].shape == (2, max(lengths), 16)
    assert embeds["prompt_attention_mask"].sum(1).tolist() == lengths
    if max_sequence_length:
        assert lengths == [12, 12]
    else:
        assert lengths[0] > lengths[1]
    # `predict` hands the transformer the pipeline's unpadded features again.
    recorder = Recorder([torch.zeros(16, 1, 2, 2)] * 2)
    family.predict(recorder, torch.zeros(2, 16, 2, 2), torch.tensor([500.0, 500.0]), embeds, None)
    for feature, reference in zip(recorder.cap_feats, expected, strict=True):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)


def test_the_prompt_goes_through_the_chat_template(pipeline):
    rendered = pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert rendered == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert configured(pipeline).sampling_inputs() == {"max_sequence_length": 512}


# Latents and the objective


def test_latents_are_the_vaes_shifted_scaled_mode_by_default(pipeline):
    family = configured(pipeline)
    assert family.vae_encode_mode == "mode" and family.resolution_multiple == 16  # VAE factor 8, patch 2
    pixels = torch.rand(2, 3, 64, 32) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    vae = pipeline.vae
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
    # The script's `(mode - shift_factor) * scaling_factor`; the pipeline decodes its inverse.
    torch.testing.assert_close(mean, (mode - vae.config.shift_factor) * vae.config.scaling_factor)
    assert not std.any() and mean.shape == (2, 16, 8, 4) == (2, *family.sample_shape((64, 32)))
    assert configured(pipeline, vae_encode_mode="sample").encode_image_distribution(pixels)[1].all()


def test_timesteps_and_noise_are_the_scripts(pipeline):
    """The checkpoint's scheduler as it ships (a static shift of 3): sigma = 3s / (1 + 2s) of the linear grid."""
    family = configured(pipeline)
    script = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    torch.testing.assert_close(family.noise_scheduler.timesteps, script.timesteps)
    s = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(family.noise_scheduler.sigmas, 3 * s / (1 + 2 * s))
    generator = torch.Generator().manual_seed(0)
    timesteps = family.sample_timesteps(3, generator)
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(timesteps, script.timesteps[(u * 1000).long()])
    assert family.loss_weights(timesteps, None) is None


def test_prediction_is_the_negated_output_at_reversed_time(pipeline):
    """The transformer reads `(1000 - t) / 1000` and predicts `x - noise`; a transformer that outputs exactly that
    makes the prediction the training target, and the pipeline's Euler step lands on the line's next point."""
    family = configured(pipeline)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 2, 16, 4, 4, generator=generator).unbind(0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(4)
    t0, (sigma0, sigma1) = scheduler.timesteps[0], scheduler.sigmas[:2].tolist()
    noisy = (1 - sigma0) * latents + sigma0 * noise
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
    recorder = Recorder(list((latents - noise).unsqueeze(2).unbind(0)))
    prediction = family.predict(recorder, noisy, t0.repeat(2), embeds, None)
    torch.testing.assert_close(prediction, noise - latents)
    torch.testing.assert_close(recorder.t, (1000 - t0.repeat(2)) / 1000)
    assert [x.shape for x in recorder.x] == [(16, 1, 4, 4)] * 2
    torch.testing.assert_close(torch.stack(recorder.x).squeeze(2), noisy, rtol=0, atol=0)
    # `ZImagePipeline` steps its scheduler with the negated transformer output: the prediction.
    stepped = scheduler.step(prediction[:1], t0, noisy[:1]).prev_sample
    torch.testing.assert_close(stepped, (1 - sigma1) * latents[:1] + sigma1 * noise[:1], rtol=1e-4, atol=1e-4)


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_z_image_script(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.resolution) == (1e-4, 1e-4, 512)
    assert (config.weighting_scheme, config.max_sequence_length, config.vae_encode_mode) == ("none", 512, "mode")
    family = configured(pipeline, adapter=adapter)
    assert family.denoiser_lora_targets(config) == ["to_k", "to_q", "to_v", "to_out.0"]
    assert family.hub_tags == ("z-image",)
    # The script parses `--guidance_scale` (3.5) but samples validation at the pipeline's own guidance, as here.
    assert config.guidance_scale is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr_gamma"),
        ({"train_text_encoder": True}, "--train_text_encoder"),
        ({"resolution": 40}, "multiple of 16"),
    ],
)
def test_options_z_image_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    trainer = DreamBoothTrainer(tiny_config(pipeline_dirs["z_image"], instance_dir, tmp_path / "out", **options))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0


def test_readme_command_trains_two_steps(pipeline_dirs, tmp_path):
    """README_z_image.md's command, its 17 aspect-ratio buckets swapped for tiny ones (a 1568 px bucket is too slow
    here)."""
    flags = readme_command("z_image", tmp_path)
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["z_image"],
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
        "--aspect_ratio_buckets": "32,32;32,48;48,32",
    }
    flags = [f for f in flags if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items()] + ["--num_validation_images=1"]
    config = parse_config(flags)
    assert config.guidance_scale == 5.0 and config.gradient_checkpointing and config.cache_latents
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "trained-z_image-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "ff.net.2.lora_B" in n)


# Sampling

#: Z-Image's shipped scheduler: a static shift of 3, no dynamic shifting; the pipeline also passes its own sigmas.
Z_IMAGE_SCHEDULERS = {"z-image": Z_IMAGE_SCHEDULER_CONFIG}


@pytest.mark.parametrize("scheduler_config", Z_IMAGE_SCHEDULERS.values(), ids=Z_IMAGE_SCHEDULERS.keys())
def test_dpm_solver_samples_z_image_as_its_own_scheduler_does(pipeline, scheduler_config):
    """Validation's DPM-Solver++ integrates the ODE the pipeline's Euler scheduler does (the same shift, the
    pipeline's `sigmas` read as a step count). The tiny random model's velocity varies fast (25 Euler steps are 0.08
    off 200), so both are compared near convergence, at 200 steps."""

    def sample(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
        return pipeline(prompt=PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = pipeline.scheduler
    try:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        reference = sample(200)
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", pipeline.scheduler)
        assert pipeline.scheduler.config.flow_shift == scheduler_config["shift"]
        assert (sample(200) - reference).abs().max() < 0.02
    finally:
        pipeline.scheduler = original
