"""Qwen-Image: prompts (Qwen2.5-VL through `QwenImagePipeline.encode_prompt`), the normalised single-frame latents,
packing, the objective and its timesteps as diffusers' script draws them, defaults, the README command, and sampling
with its scheduler."""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.testing_utils.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"


class TestQwenImage(DreamBoothFamilyTester):
    family = "qwen_image"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    lora_trains_text_encoder = False  # Qwen2.5-VL stays frozen, as in diffusers' script


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["qwen_image"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


class Recorder(torch.nn.Module):
    """A transformer that records its inputs and returns `output`."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (self.output,)


# Prompts


@pytest.mark.parametrize("max_sequence_length", [None, 5])
@pytest.mark.parametrize("prompts", [[PROMPT, "a dog"], [PROMPT, PROMPT]], ids=["padded", "unpadded"])
def test_cached_embeddings_are_the_pipelines_encode_prompt(pipeline, prompts, max_sequence_length):
    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    family = configured(pipeline, **options)
    embeds = family.encode_frozen_prompts(prompts)
    expected, mask = pipeline.encode_prompt(prompts, max_sequence_length=max_sequence_length or 512)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    if mask is None:  # the pipeline's: no prompt padded
        assert embeds["prompt_embeds_mask"].all()
    else:
        torch.testing.assert_close(embeds["prompt_embeds_mask"], mask, rtol=0, atol=0)
    if max_sequence_length:
        assert embeds["prompt_embeds"].shape[1] == max_sequence_length
    # The transformer gets the mask as the pipeline passes it.
    kwargs = family.denoiser_kwargs({k: v.float() for k, v in embeds.items()}, None)
    if mask is None:
        assert kwargs["encoder_hidden_states_mask"] is None
    else:
        torch.testing.assert_close(kwargs["encoder_hidden_states_mask"], mask, rtol=0, atol=0)


def test_the_pipeline_drops_exactly_its_template_before_the_prompt(pipeline):
    """As with Qwen's own tokenizer, the template before the prompt is the 34 tokens the pipeline drops."""
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    assert len(pipeline.tokenizer(prefix).input_ids) == pipeline.prompt_template_encode_start_idx == 34
    ids = pipeline.tokenizer(pipeline.prompt_template_encode.format(PROMPT)).input_ids
    assert pipeline.tokenizer.decode(ids[34:]) == f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_validation_reads_prompts_at_the_training_length(pipeline):
    assert configured(pipeline).sampling_inputs() == {"max_sequence_length": 512}
    assert configured(pipeline, max_sequence_length=64).sampling_inputs() == {"max_sequence_length": 64}


# Latents, packing and the objective


def test_latents_are_the_pipelines_normalised_single_frame_latents(pipeline):
    family = configured(pipeline)
    assert family.vae_scale_factor == 4 == pipeline.vae_scale_factor and family.resolution_multiple == 8
    pixels = torch.rand(2, 3, 32, 16) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    vae = pipeline.vae
    with torch.no_grad():
        posterior = vae.encode(pixels.unsqueeze(2)).latent_dist
    # The pipeline decodes `latents / (1 / latents_std) + latents_mean`: training latents are its inverse.
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(mean, ((posterior.mean - latents_mean) * latents_std)[:, :, 0])
    torch.testing.assert_close(std, (posterior.std * latents_std)[:, :, 0])
    assert mean.shape == (2, 4, 8, 4) == (2, *family.sample_shape((32, 16)))
    assert not configured(pipeline, vae_encode_mode="mode").encode_image_distribution(pixels)[1].any()


def test_predict_packs_as_the_pipeline_and_unpacks_its_output(pipeline):
    family = configured(pipeline)
    noisy = torch.randn(2, 4, 8, 4)
    embeds = {k: v.float() for k, v in family.encode_frozen_prompts([PROMPT, "a dog"]).items()}
    packed = QwenImagePipeline._pack_latents(noisy.unsqueeze(2), 2, 4, 8, 4)
    recorder = Recorder(packed)  # outputs its input: unpacking must give the latents back
    timesteps = torch.tensor([1000.0, 250.0])
    prediction = family.predict(recorder, noisy, timesteps, embeds, None)
    torch.testing.assert_close(prediction, noisy, rtol=0, atol=0)
    torch.testing.assert_close(recorder.kwargs["hidden_states"], packed, rtol=0, atol=0)
    torch.testing.assert_close(recorder.kwargs["timestep"], timesteps / 1000)
    # `QwenImagePipeline.__call__`'s img_shapes: one frame of (H / 2) x (W / 2) patches per example.
    assert recorder.kwargs["img_shapes"] == [[(1, 4, 2)]] * 2
    assert recorder.kwargs["encoder_hidden_states"] is embeds["prompt_embeds"]


def test_timesteps_and_noise_are_the_scripts(pipeline):
    """diffusers' script loads the scheduler with `shift=3.0`, which the checkpoint's dynamic shifting ignores: the
    training grid is the unshifted one, sigma = t / 1000, drawn uniformly by default and unweighted."""
    family = configured(pipeline)
    script = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config, shift=3.0)
    torch.testing.assert_close(family.noise_scheduler.timesteps, script.timesteps)
    torch.testing.assert_close(family.noise_scheduler.sigmas, script.sigmas)
    torch.testing.assert_close(family.noise_scheduler.sigmas, family.noise_scheduler.timesteps / 1000)
    assert family.weighting_scheme == "none" and family.loss_weights(torch.tensor([500.0]), None) is None
    generator = torch.Generator().manual_seed(0)
    timesteps = family.sample_timesteps(3, generator)
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))  # the script's `none`: uniform u
    torch.testing.assert_close(timesteps, script.timesteps[(u * 1000).long()])
    latents, noise = torch.randn(2, 3, 4, 2, 2).unbind(0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(target, noise - latents)


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_qwen_image_script(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.resolution) == (1e-4, 1e-4, 512)
    assert (config.weighting_scheme, config.max_sequence_length, config.guidance_scale) == ("none", 512, None)
    assert (config.logit_mean, config.logit_std, config.mode_scale) == (0.0, 1.0, 1.29)
    family = configured(pipeline, adapter=adapter)
    assert family.denoiser_lora_targets(config) == ["to_k", "to_q", "to_v", "to_out.0"]
    assert family.hub_tags == ("qwen-image", "qwen-image-diffusers")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"snr_gamma": 5.0}, "--snr_gamma"), ({"train_text_encoder": True}, "--train_text_encoder")],
)
def test_options_qwen_image_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    trainer = DreamBoothTrainer(tiny_config(pipeline_dirs["qwen_image"], instance_dir, tmp_path / "out", **options))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0


def test_readme_command_trains_two_steps(pipeline_dirs, tmp_path):
    flags = readme_command("qwen_image", tmp_path)
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["qwen_image"],
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
    }
    flags = [f for f in flags if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items()] + ["--num_validation_images=1"]
    config = parse_config(flags)
    assert (config.lora_target_modules, config.max_sequence_length, config.cache_latents) == (
        "to_k,to_q,to_v",
        512,
        True,
    )
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "trained-qwen_image-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "to_q.lora_B" in n)


# Sampling

#: Qwen-Image's shipped scheduler: exponential dynamic shift (max 0.9 at 8192 tokens) and a terminal sigma of 0.02.
QWEN_IMAGE_SCHEDULERS = {"qwen-image": QWEN_IMAGE_SCHEDULER_CONFIG}


@pytest.mark.parametrize("scheduler_config", QWEN_IMAGE_SCHEDULERS.values(), ids=QWEN_IMAGE_SCHEDULERS.keys())
def test_dpm_solver_samples_qwen_image_as_its_own_scheduler_does(pipeline, scheduler_config):
    def sample(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
        return pipeline(prompt=PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = pipeline.scheduler
    try:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        reference = sample(200)
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", pipeline.scheduler)
        assert (sample(25) - reference).abs().max() < 0.01
    finally:
        pipeline.scheduler = original
