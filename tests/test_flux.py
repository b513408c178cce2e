"""Flux: packing, prompts, the objective on hand-computed numbers, guidance, options and sampling.

The shared end-to-end assertions run for Flux in `test_training.py` (`TestFlux`).
"""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, SubjectMetadata, family_for_pipeline
from diffusers_dreambooth.toy import CHECKER_DIR
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_config(pipeline_dirs, instance_dir, output_dir, **options) -> DreamBoothConfig:
    """`tiny_config` on the tiny Flux, without card samples unless asked: FluxPipeline samples 128x128 latents whatever
    the model, 3.5 s a run here."""
    return tiny_config(pipeline_dirs["flux"], instance_dir, output_dir, **{"num_validation_images": 0, **options})


def configured(pipeline, adapter: str = "full", **options):
    """The Flux family of `pipeline`, configured with `options` on top of its defaults for `adapter`."""
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


def latents_and_noise(batch: int = 3, height: int = 4, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 16, height, width)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


class Recorder(torch.nn.Module):
    """A denoiser that records its keyword arguments and returns its packed input, as a perfect identity would."""

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (kwargs["hidden_states"],)


# Packing


def test_packing_is_the_pipelines_and_unpacking_inverts_it(pipeline):
    family = configured(pipeline)
    latents, _ = latents_and_noise()
    packed = family.pack(latents)
    assert packed.shape == (3, 2 * 3, 16 * 4)  # (4/2) * (6/2) patches of 2x2x16 values
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 16, 4, 6), rtol=0, atol=0)
    torch.testing.assert_close(family.unpack(packed, 4, 6), latents, rtol=0, atol=0)
    # The pipeline's own unpacking, from pixel sizes (latent size times the VAE's factor, 2 here).
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 8, 12, 2), latents, rtol=0, atol=0)


def test_predict_packs_and_gives_the_transformer_the_pipelines_inputs(pipeline):
    family = configured(pipeline, guidance_scale=2.0)
    latents, noise = latents_and_noise(batch=2)
    timesteps = family.noise_scheduler.timesteps[torch.tensor([100, 600])]
    embeds = family.encode_prompt(family.tokenize([PROMPT, PROMPT]), family.text_encoders)
    recorder = Recorder()
    with torch.no_grad():
        prediction = family.predict(recorder, latents, timesteps, embeds, None)
    kwargs = recorder.kwargs
    torch.testing.assert_close(prediction, latents, rtol=0, atol=0)  # an identity's output unpacks to the input
    torch.testing.assert_close(kwargs["timestep"], timesteps / 1000)
    torch.testing.assert_close(kwargs["guidance"], torch.tensor([2.0, 2.0]))
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32)  # 2x3 patches' rows, columns
    torch.testing.assert_close(kwargs["img_ids"], image_ids)
    assert kwargs["txt_ids"].shape == (77, 3) and not kwargs["txt_ids"].any()
    assert kwargs["encoder_hidden_states"] is embeds["prompt_embeds"]
    assert kwargs["pooled_projections"] is embeds["pooled_prompt_embeds"]


def test_prediction_is_the_transformer_velocity_unpacked(pipeline):
    family = configured(pipeline)  # guidance 3.5, diffusers' default
    latents, _ = latents_and_noise(batch=2)
    timesteps = family.noise_scheduler.timesteps[torch.tensor([100, 600])]
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT, "a dog"]), family.text_encoders)
        prediction = family.predict(pipeline.transformer, latents, timesteps, embeds, None)
        packed = pipeline.transformer(
            hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 4, 6),
            timestep=timesteps / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=embeds["pooled_prompt_embeds"],
            encoder_hidden_states=embeds["prompt_embeds"],
            txt_ids=torch.zeros(77, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
        ).sample
    torch.testing.assert_close(prediction, FluxPipeline._unpack_latents(packed, 8, 12, 2))


def test_guidance_is_given_only_to_a_transformer_that_embeds_it(pipeline):
    assert pipeline.transformer.config.guidance_embeds
    assert configured(pipeline).guidance(2).tolist() == [3.5, 3.5]
    config = dict(pipeline.transformer.config, guidance_embeds=False)
    schnell = FluxPipeline(**{**pipeline.components, "transformer": FluxTransformer2DModel.from_config(config)})
    family = configured(schnell, guidance_scale=2.0)
    assert family.guidance(2) is None
    latents, _ = latents_and_noise(batch=1)
    embeds = family.encode_prompt(family.tokenize([PROMPT]), family.text_encoders)
    recorder = Recorder()
    family.predict(recorder, latents, family.noise_scheduler.timesteps[:1], embeds, None)
    assert recorder.kwargs["guidance"] is None
    with torch.no_grad():  # and the real transformer without guidance embedding runs on it
        family.predict(schnell.transformer, latents, family.noise_scheduler.timesteps[:1], embeds, None)


# Prompts


@pytest.mark.parametrize(("adapter", "t5_tokens"), [("full", 77), ("lora", 512)])
def test_prompt_embeddings_are_the_pipelines(pipeline, adapter, t5_tokens):
    family = configured(pipeline, adapter=adapter)
    assert family.token_limits() == [77, t5_tokens]  # diffusers' Flux scripts: 77 full, 512 LoRA
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT, "a dog"]), family.text_encoders)
        expected, pooled, text_ids = pipeline.encode_prompt([PROMPT, "a dog"], max_sequence_length=t5_tokens)
    assert embeds["prompt_embeds"].shape == (2, t5_tokens, 32) and embeds["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert text_ids.shape == (t5_tokens, 3) and not text_ids.any()


# The objective


def test_noisy_input_interpolates_latents_and_noise_and_the_target_is_the_velocity(pipeline):
    family = configured(pipeline)
    indices = torch.tensor([0, 250, 999])
    # Dynamic shifting (FLUX.1's scheduler) leaves the training schedule unshifted: sigma = (1000 - i) / 1000.
    sigmas = torch.tensor([1.0, 0.75, 0.001]).view(-1, 1, 1, 1)
    timesteps = family.noise_scheduler.timesteps[indices]
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 750.0, 1.0]))
    latents, noise = latents_and_noise()
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(noisy[0], noise[0])  # sigma 1: pure noise
    torch.testing.assert_close(target, noise - latents)
    assert family.loss_weights(timesteps, snr_gamma=None) is None  # `none`: uniform weights


def test_default_timesteps_are_uniform_over_the_schedule(pipeline):
    family = configured(pipeline)
    assert family.weighting_scheme == "none"
    timesteps = family.sample_timesteps(8, torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(timesteps, family.noise_scheduler.timesteps[(u * 1000).long()])


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_flux_scripts(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.guidance_scale) == (1e-4, 1e-4, 3.5)
    assert (config.weighting_scheme, config.precondition_outputs) == ("none", 0)
    assert config.max_sequence_length == (77 if adapter == "full" else 512)


def test_lora_text_encoder_training_adapts_clip_and_keeps_t5_frozen(pipeline_dirs, instance_dir, tmp_path):
    options = {"adapter": "lora", "train_text_encoder": True}
    config = flux_config(pipeline_dirs, instance_dir, tmp_path / "out", **options)
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert sorted(trainer.trained) == ["text_encoder", "transformer"]
    assert not any("lora_" in name for name, _ in pipe.text_encoder_2.named_parameters())
    # `transformer_blocks.0.attn.to_q` -> `attn.to_q`: every block gets the same layers.
    adapted = {name.split(".", 2)[2] for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(trainer.family.denoiser_lora_target_modules)
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), framework="pt") as file:
        components = {key.split(".")[0] for key in file.keys()}
    assert components == {"transformer", "text_encoder"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr_gamma"),
        ({"validation_scheduler": "DDPMScheduler"}, "DDPMScheduler"),
        ({"adapter": "lora", "output_kohya_format": True}, "--output_kohya_format"),
        ({"adapter": "lora", "lora_blocks": "0"}, "--lora_blocks"),
        ({"resolution": 34}, "multiple of 4"),  # VAE factor 2 times Flux's 2x2 packing
    ],
)
def test_options_flux_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    config = flux_config(pipeline_dirs, instance_dir, tmp_path / "out", **options)
    trainer = DreamBoothTrainer(config)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "options",
    [
        {"weighting_scheme": "logit_normal"},
        {"weighting_scheme": "cosmap", "precondition_outputs": 1},
        {"gradient_accumulation_steps": 2, "max_sequence_length": 16, "offset_noise": True},
        {"gradient_checkpointing": True, "train_text_encoder": True},
        {"adapter": "lora", "mixed_precision": "bf16", "train_text_encoder": True},
        {"validation_prompt": PROMPT, "validation_steps": 1, "num_validation_images": 1},  # and card samples
    ],
    ids=lambda options: ",".join(options),
)
def test_option_trains(pipeline_dirs, instance_dir, tmp_path, options):
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    config = flux_config(pipeline_dirs, instance_dir, tmp_path / "out", train_batch_size=2, **options)
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert trainer.global_step == 2
    if config.adapter == "lora":
        assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "to_q.lora_B" in n)
    else:
        assert not torch.equal(base.transformer.x_embedder.weight, pipe.transformer.x_embedder.weight)
    assert all(torch.isfinite(p).all() for p in pipe.transformer.parameters())
    if config.num_validation_images:
        assert (tmp_path / "out" / "validation" / "step-1" / "0.png").is_file()
        assert (tmp_path / "out" / "samples" / "sample_0.png").is_file()


def test_training_guidance_changes_the_update(pipeline_dirs, instance_dir, tmp_path):
    def trained_weight(name: str, **options) -> torch.Tensor:
        config = flux_config(pipeline_dirs, instance_dir, tmp_path / name, **options)
        return DreamBoothTrainer(config).train().transformer.proj_out.weight

    default = trained_weight("default")
    torch.testing.assert_close(default, trained_weight("explicit", guidance_scale=3.5), rtol=0, atol=0)
    assert not torch.allclose(default, trained_weight("guidance-1", guidance_scale=1.0))


# Sampling


#: The scheduler configurations Flux checkpoints ship: FLUX.1-dev's (and Kontext's) resolution-dependent exponential
#: shift, FLUX.1-schnell's fixed shift of 1 (`FluxPipeline` still passes `mu`), a default
#: `FlowMatchEulerDiscreteScheduler()`, and the linear dynamic shift the scheduler also offers.
FLUX_SCHEDULERS = {
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15),
    "default": dict(),
    "linear dynamic shift": dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=2.0, max_shift=4.0),
}


@pytest.mark.parametrize("scheduler_config", FLUX_SCHEDULERS.values(), ids=FLUX_SCHEDULERS.keys())
def test_dpm_solver_samples_flux_as_its_own_scheduler_does(pipeline, scheduler_config):
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


def test_a_flux_base_with_a_fixed_shift_trains_samples_validates_and_evaluates(pipeline_dirs, instance_dir, tmp_path):
    """FLUX.1-schnell's scheduler: class images, validation, card samples and evaluation all sample it (they once
    asserted in DPM-Solver++ after the last step, losing the run)."""
    base = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    base.scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS["schnell"])
    base.save_pretrained(tmp_path / "schnell")
    config = tiny_config(
        tmp_path / "schnell",
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        with_prior_preservation=True,
        class_data_dir=str(tmp_path / "class"),
        class_prompt="a photo of dog",
        num_class_images=2,
        validation_prompt="a photo of sks dog",
        validation_steps=2,
        num_validation_images=1,
        evaluate=True,
        evaluation_prompts=["a photo of {subject}"],
        evaluation_images_per_prompt=2,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
    )
    DreamBoothTrainer(config).train()
    evaluation = SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json").evaluation
    assert all(isinstance(evaluation[metric], float) for metric in ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (tmp_path / "out" / "validation" / "step-2" / "0.png").is_file()
    assert (tmp_path / "out" / "samples" / "sample_0.png").is_file()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
