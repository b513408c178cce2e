"""Stable Diffusion 3: the flow-matching objective on hand-computed numbers, its prompts, T5-less pipelines, options.

The shared end-to-end assertions run for SD3 in `test_training.py` (`TestStableDiffusion3`).
"""

import json
import logging
import math

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from diffusers_dreambooth import DreamBoothConfig, DreamBoothPipeline, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"
SHIFT = 3.0  # the tiny pipeline's FlowMatchEulerDiscreteScheduler(shift=3.0), as SD3's


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "full", **options):
    """The SD3 family of `pipeline`, configured with `options` on top of its defaults for `adapter`."""
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


def shifted_sigmas(indices: torch.Tensor) -> torch.Tensor:
    """Sigma at positions `indices` of the 1000-step training schedule: t = (1000 - i) / 1000, shifted as SD3 does
    (shift * t / (1 + (shift - 1) * t), Esser et al., 2024, Sec. 5.3.2), shaped to scale latents."""
    t = (1000 - indices.double()) / 1000
    return (SHIFT * t / (1 + (SHIFT - 1) * t)).float().view(-1, 1, 1, 1)


def latents_and_noise(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 16, 4, 4, generator=generator), torch.randn(batch, 16, 4, 4, generator=generator)


# The objective


def test_noisy_input_interpolates_latents_and_noise_and_the_target_is_velocity_or_latents(pipeline):
    indices = torch.tensor([0, 250, 999])
    latents, noise = latents_and_noise()
    sigmas = shifted_sigmas(indices)
    assert sigmas.flatten().tolist() == pytest.approx([1.0, 0.9, 0.003 / 1.002], rel=1e-5)

    family = configured(pipeline, precondition_outputs=0)
    timesteps = family.noise_scheduler.timesteps[indices]
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(noisy[0], noise[0])  # sigma 1: pure noise
    torch.testing.assert_close(target, noise - latents)

    noisy_preconditioned, target = configured(pipeline).noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy_preconditioned, noisy)
    torch.testing.assert_close(target, latents)


def test_preconditioned_prediction_is_the_clean_latents_the_velocity_implies(pipeline):
    family = configured(pipeline)  # precondition_outputs=1, diffusers' default
    indices = torch.tensor([100, 600])
    timesteps = family.noise_scheduler.timesteps[indices]
    latents, noise = latents_and_noise(batch=2)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT, PROMPT]), family.text_encoders)
        prediction = family.predict(pipeline.transformer, noisy, timesteps, embeds, None)
        velocity = pipeline.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
        ).sample
    torch.testing.assert_close(prediction, noisy - shifted_sigmas(indices) * velocity)
    # A perfect velocity, noise - latents, would give back exactly the target.
    torch.testing.assert_close(noisy - shifted_sigmas(indices) * (noise - latents), target)
    assert not configured(pipeline, precondition_outputs=0).precondition_outputs


def test_logit_normal_timesteps_are_the_schedule_at_sigmoid_of_a_normal_draw(pipeline):
    family = configured(pipeline, weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8)
    timesteps = family.sample_timesteps(8, torch.Generator().manual_seed(3))
    u = torch.sigmoid(torch.normal(0.5, 0.8, (8,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(timesteps, family.noise_scheduler.timesteps[(u * 1000).long()])


def test_mode_timesteps_follow_the_mode_density(pipeline):
    family = configured(pipeline, weighting_scheme="mode", mode_scale=1.29)
    timesteps = family.sample_timesteps(8, torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.equal(timesteps, family.noise_scheduler.timesteps[(u * 1000).long()])


@pytest.mark.parametrize(
    ("scheme", "middle_half"),
    # Share of draws at schedule positions 250-749: P(|z| < logit(0.75)) for a standard logit-normal, 1/2 uniformly.
    [("logit_normal", 0.7275), ("none", 0.5), ("sigma_sqrt", 0.5), ("cosmap", 0.5)],
)
def test_timestep_density_of_each_scheme(pipeline, scheme, middle_half):
    family = configured(pipeline, weighting_scheme=scheme)
    timesteps = family.sample_timesteps(20000, torch.Generator().manual_seed(0))
    index = (family.noise_scheduler.timesteps[None, :] == timesteps[:, None]).int().argmax(dim=1)
    share = ((index >= 250) & (index < 750)).float().mean().item()
    assert share == pytest.approx(middle_half, abs=0.015)


def test_a_draw_at_the_end_of_the_density_stays_on_the_schedule(pipeline):
    # sigmoid(normal(40, 1)) rounds to 1.0 in float32: position 1000, one past the schedule's last (least noisy) step.
    family = configured(pipeline, weighting_scheme="logit_normal", logit_mean=40.0)
    timesteps = family.sample_timesteps(4, torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, family.noise_scheduler.timesteps[[-1] * 4])


@pytest.mark.parametrize(
    ("scheme", "weight"),
    [
        ("sigma_sqrt", lambda sigma: sigma**-2),
        ("cosmap", lambda sigma: 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))),
        ("logit_normal", None),
        ("mode", None),
        ("none", None),
    ],
)
def test_loss_weights_of_each_scheme(pipeline, scheme, weight):
    family = configured(pipeline, weighting_scheme=scheme)
    indices = torch.tensor([0, 250, 999])
    weights = family.loss_weights(family.noise_scheduler.timesteps[indices], snr_gamma=None)
    if weight is None:
        assert weights is None  # these schemes shape the timestep density, not the loss
    else:
        torch.testing.assert_close(weights, weight(shifted_sigmas(indices).flatten()))


# Prompts


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_embeddings_are_the_pipelines(pipeline_dirs, with_t5):
    options = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"], **options)
    family = configured(pipe, max_sequence_length=20)
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT, "a dog"]), family.text_encoders)
        expected, _, pooled, _ = pipe.encode_prompt(
            [PROMPT, "a dog"], None, None, do_classifier_free_guidance=False, max_sequence_length=20
        )
    # 77 CLIP tokens (32 + 48 wide, zero-padded to T5's 96), then 20 T5 tokens; pooled: 32 + 48.
    assert embeds["prompt_embeds"].shape == (2, 77 + 20, 96) and embeds["pooled_prompt_embeds"].shape == (2, 80)
    torch.testing.assert_close(embeds["prompt_embeds"], expected)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled)
    assert (embeds["prompt_embeds"][:, :77, 80:] == 0).all()
    assert bool((embeds["prompt_embeds"][:, 77:] == 0).all()) is not with_t5  # zeros stand in for a missing T5


# Training


def generate(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.from_numpy(pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images)


def test_pipeline_without_t5_trains_and_saves_without_it(pipeline_dirs, instance_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"], text_encoder_3=None, tokenizer_3=None)
    config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / "out", train_text_encoder=True)
    clip_before = pipe.text_encoder.text_model.final_layer_norm.weight.detach().clone()
    trainer = DreamBoothTrainer(config, pipeline=pipe)
    trainer.train()
    assert sorted(trainer.trained) == ["text_encoder", "text_encoder_2", "transformer"]
    assert not torch.equal(clip_before, pipe.text_encoder.text_model.final_layer_norm.weight)
    model_index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert model_index["text_encoder_3"] == [None, None] and model_index["tokenizer_3"] == [None, None]
    # diffusers loads a pipeline saved without T5 only when told so, as for one it saved itself; ours reads it.
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out", text_encoder_3=None, tokenizer_3=None)
    torch.testing.assert_close(generate(reloaded), generate(pipe), atol=1e-5, rtol=0)
    subject = DreamBoothPipeline.from_pretrained(tmp_path / "out")
    assert subject.pipeline.text_encoder_3 is None
    torch.testing.assert_close(generate(subject), generate(pipe), atol=1e-5, rtol=0)


def test_lora_text_encoder_training_adapts_the_clip_encoders_and_keeps_t5_frozen(
    pipeline_dirs, instance_dir, tmp_path
):
    config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / "out", adapter="lora", train_text_encoder=True)
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert sorted(trainer.trained) == ["text_encoder", "text_encoder_2", "transformer"]
    assert not any("lora_" in name for name, _ in pipe.text_encoder_3.named_parameters())
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), framework="pt") as file:
        components = {key.split(".")[0] for key in file.keys()}
    assert components == {"transformer", "text_encoder", "text_encoder_2"}


def test_lora_blocks_and_lora_layers_choose_the_adapted_modules(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd3"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        lora_layers="attn.to_q,attn.to_v",
        lora_blocks="1",
    )
    pipe = DreamBoothTrainer(config).train()
    adapted = {name for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v"}


@pytest.mark.parametrize(
    "options",
    [
        {"weighting_scheme": "sigma_sqrt"},
        {"weighting_scheme": "cosmap", "precondition_outputs": 0},
        {"weighting_scheme": "mode"},
        {"weighting_scheme": "none", "offset_noise": True},
        {"gradient_accumulation_steps": 2, "max_sequence_length": 16},
        {"gradient_checkpointing": True, "train_text_encoder": True},
        {"adapter": "lora", "mixed_precision": "bf16", "train_text_encoder": True},
    ],
    ids=lambda options: ",".join(options),
)
def test_option_trains(pipeline_dirs, instance_dir, tmp_path, options):
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["sd3"])
    config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / "out", train_batch_size=2, **options)
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert trainer.global_step == 2
    if config.adapter == "lora":
        assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "to_q.lora_B" in n)
    else:
        assert not torch.equal(base.transformer.pos_embed.proj.weight, pipe.transformer.pos_embed.proj.weight)
    assert all(torch.isfinite(p).all() for p in pipe.transformer.parameters())


def test_weighting_scheme_and_preconditioning_change_the_update(pipeline_dirs, instance_dir, tmp_path):
    def trained_weight(name: str, **options) -> torch.Tensor:
        config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / name, num_validation_images=0, **options)
        return DreamBoothTrainer(config).train().transformer.proj_out.weight

    default = trained_weight("default")
    assert not torch.allclose(default, trained_weight("sigma_sqrt", weighting_scheme="sigma_sqrt"))
    assert not torch.allclose(default, trained_weight("velocity", precondition_outputs=0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr_gamma"),
        ({"validation_scheduler": "DDPMScheduler"}, "DDPMScheduler"),
        ({"prior_generation_scheduler": "DDIMScheduler"}, "DDIMScheduler"),
        ({"adapter": "lora", "output_kohya_format": True}, "--output_kohya_format"),
        ({"adapter": "lora", "lora_blocks": "0,2"}, "--lora_blocks=0,2"),
        ({"resolution": 34}, "multiple of 4"),  # VAE factor 2 times patch size 2
    ],
)
def test_options_sd3_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    config = tiny_config(pipeline_dirs["sd3"], instance_dir, tmp_path / "out", **options)
    trainer = DreamBoothTrainer(config)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0 and not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_flow_matching_options_are_ignored_with_a_warning_on_ddpm_models(
    pipeline_dirs, instance_dir, tmp_path, caplog
):
    config = tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", weighting_scheme="mode")
    with caplog.at_level(logging.WARNING):
        DreamBoothTrainer(config).train()
    assert "`--weighting_scheme` ignored" in caplog.text
    config = tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "lora", adapter="lora", lora_blocks="1")
    with pytest.raises(ValueError, match="--lora_blocks"):
        DreamBoothTrainer(config).train()


# Sampling


#: The scheduler configurations SD3 checkpoints ship (SD3 Medium and every SD3.5: a fixed shift of 3), a fixed shift
#: of 1, and the resolution-dependent shift `StableDiffusion3Pipeline` also supports.
SD3_SCHEDULERS = {
    "sd3 and sd3.5": dict(shift=3.0),
    "shift 1": dict(shift=1.0),
    "dynamic shift": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
}


@pytest.mark.parametrize("scheduler_config", SD3_SCHEDULERS.values(), ids=SD3_SCHEDULERS.keys())
def test_dpm_solver_samples_the_flow_model_as_its_own_scheduler_does(pipeline, scheduler_config):
    def generate(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt").images

    original = pipeline.scheduler
    try:
        pipeline.scheduler = own = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        reference = generate(100)  # the model's own scheduler, near the ODE's solution
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", own)
        assert (generate(25) - reference).abs().max() < 0.01
        # DPM-Solver++ configured for DDPM, as `from_config` alone builds it, samples another process.
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(own.config)
        assert (generate(25) - reference).abs().max() > 0.1
    finally:
        pipeline.scheduler = original
