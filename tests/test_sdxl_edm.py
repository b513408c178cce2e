"""EDM-style SDXL training (diffusers' `train_dreambooth_lora_sdxl.py --do_edm_style_training`) and Playground v2.5
(an EDM scheduler): inputs, targets and weights on hand-computed numbers are the script's formulas, latents are
normalised with the VAE's `latents_mean`/`latents_std`, the README command trains, and a LoRA trained on the tiny
Playground-style pipeline loads in plain diffusers."""

import math

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler
from family_tester import DreamBoothFamilyTester, generate
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.base import ImageConditioning
from diffusers_dreambooth.safeguards import DreamBoothInputError
from diffusers_dreambooth.validation import sampling_scheduler


class TestSDXLEDM(DreamBoothFamilyTester):
    family = "sdxl_edm"


def family_of(path, **options):
    pipeline = DiffusionPipeline.from_pretrained(path)
    family = family_for_pipeline(pipeline)
    config = tiny_config(path, "unused", "unused", **options)
    family.configure(config)
    return family


class RecordingUNet(torch.nn.Module):
    """Returns a fixed output and records what it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output, self.calls = output, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, sample, timesteps, return_dict=False, **kwargs):
        self.calls.append((sample.clone(), timesteps.clone()))
        return (self.output,)


def conditioning(batch):
    return ImageConditioning(
        original_sizes=torch.full((batch, 2), 32),
        crops_top_left=torch.zeros(batch, 2, dtype=torch.long),
        target_size=(32, 32),
    )


def embeds(batch):
    return {"prompt_embeds": torch.zeros(batch, 77, 64), "pooled_prompt_embeds": torch.zeros(batch, 32)}


def test_an_edm_scheduler_trains_edm_style_with_its_preconditioning(pipeline_dirs):
    family = family_of(pipeline_dirs["sdxl_edm"])
    assert family.edm_mode == "edm" and isinstance(family.noise_scheduler, EDMEulerScheduler)
    timesteps = family.sample_timesteps(2, torch.Generator().manual_seed(0))
    schedule = family.noise_scheduler.timesteps
    assert all(t in schedule for t in timesteps)
    latents, noise = torch.full((2, 4, 2, 2), 0.5), torch.full((2, 4, 2, 2), 2.0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    # EDMEulerScheduler: timestep = 0.25 * log(sigma), so sigma = exp(4 t).
    sigma = torch.exp(4 * timesteps).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (0.5 + 2.0 * sigma).expand(2, 4, 2, 2))
    torch.testing.assert_close(noisy, family.noise_scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(target, latents)
    unet = RecordingUNet(torch.full((2, 4, 2, 2), 3.0))
    prediction = family.predict(unet, noisy, timesteps, embeds(2), conditioning(2))
    seen, seen_timesteps = unet.calls[0]
    sigma_data = 0.5
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    torch.testing.assert_close(seen, noisy * c_in)
    assert torch.equal(seen_timesteps, timesteps)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    torch.testing.assert_close(prediction, c_skip * noisy + c_out * 3.0)
    assert family.loss_weights(timesteps, None) is None  # the script skips weighting with an EDM scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_do_edm_style_training_on_sdxl_uses_euler_sigmas(pipeline_dirs, prediction_type):
    family = family_of(pipeline_dirs["sdxl"])
    assert family.edm_mode is None
    family.pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    family.configure(tiny_config(pipeline_dirs["sdxl"], "unused", "unused", do_edm_style_training=True))
    assert family.edm_mode == "euler" and isinstance(family.noise_scheduler, EulerDiscreteScheduler)
    scheduler = EulerDiscreteScheduler.from_config(family.pipeline.scheduler.config)
    timesteps = torch.tensor([999.0, 10.0])
    sigma = torch.stack([scheduler.sigmas[0], scheduler.sigmas[989]]).view(-1, 1, 1, 1)
    alphas = scheduler.alphas_cumprod[[999, 10]].view(-1, 1, 1, 1)
    torch.testing.assert_close(sigma, ((1 - alphas) / alphas) ** 0.5)
    latents, noise = torch.full((2, 4, 2, 2), 0.5), torch.full((2, 4, 2, 2), -1.0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (0.5 - sigma).expand(2, 4, 2, 2))
    assert torch.equal(target, latents)
    unet = RecordingUNet(torch.full((2, 4, 2, 2), 3.0))
    prediction = family.predict(unet, noisy, timesteps, embeds(2), conditioning(2))
    torch.testing.assert_close(unet.calls[0][0], noisy / torch.sqrt(sigma**2 + 1))
    if prediction_type == "epsilon":
        expected = noisy - 3.0 * sigma
    else:
        expected = -3.0 * sigma / torch.sqrt(sigma**2 + 1) + noisy / (sigma**2 + 1)
    torch.testing.assert_close(prediction, expected)
    torch.testing.assert_close(family.loss_weights(timesteps, None), sigma.flatten() ** -2)


def test_latents_are_normalised_with_the_vae_statistics(pipeline_dirs):
    family = family_of(pipeline_dirs["sdxl_edm"])
    vae = family.vae
    pixels = torch.rand(1, 3, TINY_RESOLUTION, TINY_RESOLUTION) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    posterior = vae.encode(pixels).latent_dist
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    latents_std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(mean, (posterior.mean - latents_mean) * 0.5 / latents_std)
    torch.testing.assert_close(std, posterior.std * 0.5 / latents_std)
    # The pipeline decodes `latents * latents_std / scaling_factor + latents_mean`: the inverse.
    torch.testing.assert_close(mean * latents_std / 0.5 + latents_mean, posterior.mean)


def test_min_snr_is_refused_with_edm_style_training(pipeline_dirs):
    with pytest.raises(DreamBoothInputError, match="--snr_gamma"):
        family_of(pipeline_dirs["sdxl_edm"], snr_gamma=5.0)


def test_validation_samples_an_edm_model_with_its_dpm_solver(pipeline_dirs):
    scheduler = DiffusionPipeline.from_pretrained(pipeline_dirs["sdxl_edm"]).scheduler
    assert isinstance(sampling_scheduler("DPMSolverMultistepScheduler", scheduler), EDMDPMSolverMultistepScheduler)
    with pytest.raises(DreamBoothInputError, match="EDM"):
        sampling_scheduler("DDPMScheduler", scheduler)


def test_edm_lora_loads_in_plain_diffusers_and_changes_images(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sdxl_edm"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        max_train_steps=3,
        learning_rate=1e-2,
        validation_scheduler="pipeline",
    )
    trained = DreamBoothTrainer(config).train()
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs["sdxl_edm"])
    base_images = generate(plain)
    plain.load_lora_weights(tmp_path / "out")
    assert isinstance(plain.scheduler, EDMDPMSolverMultistepScheduler)
    torch.testing.assert_close(generate(plain), generate(trained), atol=1e-5, rtol=0)
    assert not torch.allclose(generate(plain), base_images, atol=1e-4)
    assert not math.isnan(generate(plain).sum().item())


@pytest.mark.parametrize(
    "key, extra, mode",
    [("sdxl_edm", [], "edm"), ("sdxl", ["--do_edm_style_training"], "euler")],  # README_sdxl: "simply set" the flag
)
def test_readme_command_trains_two_steps(key, extra, mode, pipeline_dirs, tmp_path):
    flags = readme_command(key, tmp_path) + extra
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs[key],
        "--pretrained_vae_model_name_or_path": None,
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
    }
    flags = [f for f in flags if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items() if value] + ["--num_validation_images=1"]
    trainer = DreamBoothTrainer(parse_config(flags))
    trainer.train()
    assert trainer.global_step == 2 and trainer.family.edm_mode == mode
    assert (tmp_path / f"trained-{key}-lora" / "pytorch_lora_weights.safetensors").is_file()
