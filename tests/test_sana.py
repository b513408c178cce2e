"""Sana: prompts (Gemma 2 through `SanaPipeline.encode_prompt`, `--complex_human_instruction`), the DC-AE latents,
the objective against the pipeline's sampling, defaults, the README command, and sampling with its scheduler."""

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import COMMON, README_COMMANDS

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.testing_utils.sana import SANA_SCHEDULER_CONFIG
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"
INSTRUCTION = "Describe the image in detail:\nUser Prompt: "


class TestSana(DreamBoothFamilyTester):
    family = "sana"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    lora_trains_text_encoder = False  # Gemma 2 stays frozen, as in diffusers' script


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sana"])
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

    def forward(self, hidden_states, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (self.output,)


# Prompts


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
@pytest.mark.parametrize("max_sequence_length", [None, 20])
def test_cached_embeddings_are_the_pipelines_encode_prompt(pipeline, instruction, max_sequence_length):
    options = {"complex_human_instruction": instruction, "max_sequence_length": max_sequence_length}
    family = configured(pipeline, **{k: v for k, v in options.items() if v is not None})
    prompts = [PROMPT, "a dog"]
    embeds = family.encode_frozen_prompts(prompts)
    lines = None if instruction is None else instruction.split("\n")
    expected, mask, _, _ = pipeline.encode_prompt(
        prompts,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length or 300,  # diffusers' script's default
        complex_human_instruction=lines,
    )
    assert embeds["prompt_embeds"].shape == (2, max_sequence_length or 300, 16)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds["prompt_attention_mask"], mask, rtol=0, atol=0)


def test_complex_human_instruction_reaches_the_embeddings_and_validation(pipeline):
    plain = configured(pipeline)
    instructed = configured(pipeline, complex_human_instruction=INSTRUCTION)
    assert plain.sampling_inputs() == {"complex_human_instruction": None}  # not the pipeline's long default
    assert instructed.sampling_inputs() == {
        "complex_human_instruction": ["Describe the image in detail:", "User Prompt: "]
    }
    without = plain.encode_frozen_prompts([PROMPT])["prompt_embeds"]
    with_instruction = instructed.encode_frozen_prompts([PROMPT])["prompt_embeds"]
    assert not torch.allclose(without, with_instruction)
    # The pipeline joins the lines with newlines before the prompt: the option's text, as given.
    tokenizer = pipeline.tokenizer
    count = len(tokenizer.encode(INSTRUCTION))
    ids = tokenizer(INSTRUCTION + PROMPT, padding="max_length", max_length=count + 300 - 2).input_ids
    assert len(ids) == count + 298


# Latents and the objective


def test_latents_are_the_dc_aes_scaled(pipeline):
    family = configured(pipeline)
    assert family.vae_scale_factor == 32 and family.resolution_multiple == 32  # DC-AE f32, patch size 1
    pixels = torch.rand(2, 3, 64, 32) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    with torch.no_grad():
        expected = pipeline.vae.encode(pixels).latent * pipeline.vae.config.scaling_factor
    torch.testing.assert_close(mean, expected)
    assert mean.shape == (2, 4, 2, 1) == (2, *family.sample_shape((64, 32))) and not std.any()


def test_training_noise_is_the_scripts_flow_matching_schedule(pipeline):
    family = configured(pipeline)
    # diffusers' script: FlowMatchEulerDiscreteScheduler from the DPM-Solver config: unshifted, sigma = t / 1000.
    assert isinstance(family.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipeline.scheduler, DPMSolverMultistepScheduler) and pipeline.scheduler.config.flow_shift == 3.0
    indices = torch.tensor([0, 250, 999])
    timesteps = family.noise_scheduler.timesteps[indices]
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 750.0, 1.0]))
    latents, noise = torch.randn(2, 3, 4, 1, 1).unbind(0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(target, noise - latents)


def test_the_objective_is_what_the_pipelines_scheduler_integrates(pipeline):
    """A transformer that outputs the training target exactly (zero loss) makes the pipeline's flow-mode DPM-Solver++
    step land exactly on the next point of the same noise-to-image line."""
    family = configured(pipeline)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 1, 4, 2, 2, generator=generator).unbind(0)
    scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(4)
    t0, (sigma0, sigma1) = scheduler.timesteps[0], scheduler.sigmas[:2].tolist()
    noisy = (1 - sigma0) * latents + sigma0 * noise
    embeds = family.encode_frozen_prompts([PROMPT])
    recorder = Recorder(noise - latents)
    prediction = family.predict(recorder, noisy, t0.view(1).float(), embeds, None)
    torch.testing.assert_close(prediction, noise - latents)  # the velocity target: zero loss
    # The timestep and mask that SanaPipeline gives its transformer.
    torch.testing.assert_close(
        recorder.kwargs["timestep"], t0.view(1).float() * pipeline.transformer.config.timestep_scale
    )
    assert recorder.kwargs["encoder_attention_mask"] is embeds["prompt_attention_mask"]
    stepped = scheduler.step(prediction, t0, noisy).prev_sample
    torch.testing.assert_close(stepped, (1 - sigma1) * latents + sigma1 * noise, rtol=1e-4, atol=1e-4)


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_sana_script(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.resolution) == (1e-4, 1e-4, 512)
    assert (config.weighting_scheme, config.max_sequence_length, config.complex_human_instruction) == (
        "none",
        300,
        None,
    )
    family = configured(pipeline, adapter=adapter)
    assert family.denoiser_lora_targets(config) == ["to_k", "to_q", "to_v"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr_gamma"),
        ({"train_text_encoder": True}, "--train_text_encoder"),
        ({"resolution": 48}, "multiple of 32"),
    ],
)
def test_options_sana_cannot_use_fail_before_training(pipeline_dirs, instance_dir, tmp_path, options, message):
    trainer = DreamBoothTrainer(tiny_config(pipeline_dirs["sana"], instance_dir, tmp_path / "out", **options))
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.global_step == 0


def tiny_readme_command(name: str, pretrained: str, instance_dir, output_dir) -> list[str]:
    """`README_COMMANDS[name]` as diffusers' README runs it, on the tiny model: model, data and output swapped, two
    steps at the tiny resolution, no Hub push, no tracker."""
    swapped = ("--pretrained_model_name_or_path", "--instance_data_dir", "--output_dir", "--resolution")
    flags = [
        flag
        for flag in COMMON + README_COMMANDS[name]
        if flag.split("=")[0] not in (*swapped, "--push_to_hub", "--report_to", "--max_train_steps")
    ]
    return flags + [
        f"--pretrained_model_name_or_path={pretrained}",
        f"--instance_data_dir={instance_dir}",
        f"--output_dir={output_dir}",
        f"--resolution={TINY_RESOLUTION}",
        "--max_train_steps=2",
        "--report_to=none",
    ]


def test_readme_command_trains_two_steps(pipeline_dirs, instance_dir, tmp_path):
    flags = tiny_readme_command("sana", pipeline_dirs["sana"], instance_dir, tmp_path / "out")
    config = parse_config(flags)
    assert (config.max_sequence_length, config.cache_latents, config.mixed_precision) == (256, True, "bf16")
    trainer = DreamBoothTrainer(config)
    pipe = trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert all(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "to_q.lora_B" in n)


def test_validation_samples_with_the_training_instruction(pipeline_dirs, instance_dir, tmp_path):
    options = dict(validation_prompt=PROMPT, validation_steps=2, num_validation_images=1)
    images = {}
    for name, instruction in (("none", None), ("given", INSTRUCTION)):
        config = tiny_config(
            pipeline_dirs["sana"], instance_dir, tmp_path / name, complex_human_instruction=instruction, **options
        )
        pipe = DreamBoothTrainer(config).train()
        images[name] = (tmp_path / name / "validation" / "step-2" / "0.png").read_bytes()
        assert pipe is not None
    assert images["none"] != images["given"]


# Sampling


#: The scheduler configurations Sana checkpoints ship: flow-mode DPM-Solver++ with the 1024 px models' shift of 3,
#: and the shift of 1 of the 512 px ones.
SANA_SCHEDULERS = {
    "1024px": SANA_SCHEDULER_CONFIG,
    "512px": {**SANA_SCHEDULER_CONFIG, "flow_shift": 1.0},
}


@pytest.mark.parametrize("scheduler_config", SANA_SCHEDULERS.values(), ids=SANA_SCHEDULERS.keys())
def test_dpm_solver_samples_sana_as_its_own_scheduler_does(pipeline, scheduler_config):
    """Sana ships DPM-Solver++ in its flow mode: validation's stand-in is the same solver with the same shift, so it
    samples exactly as the pipeline's own."""

    def generate(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
        return pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = pipeline.scheduler
    try:
        pipeline.scheduler = DPMSolverMultistepScheduler(**scheduler_config)
        own = generate(25)
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", pipeline.scheduler)
        assert pipeline.scheduler.config.flow_shift == scheduler_config["flow_shift"]
        torch.testing.assert_close(generate(25), own, rtol=0, atol=1e-6)
    finally:
        pipeline.scheduler = original


def test_enable_vae_tiling_tiles_the_dc_ae_from_validation_on_as_the_script(
    pipeline_dirs, square_instance_dir, tmp_path
):
    instance_dir = square_instance_dir  # fixed crops: their latents are cached
    options = dict(validation_prompt=PROMPT, validation_steps=2, num_validation_images=1)
    runs = {}
    for name, tiling in (("untiled", False), ("tiled", True)):
        config = tiny_config(pipeline_dirs["sana"], instance_dir, tmp_path / name, enable_vae_tiling=tiling, **options)
        trainer = DreamBoothTrainer(config)
        vae = trainer.train().vae
        runs[name] = (trainer, vae, (tmp_path / name / "validation" / "step-2" / "0.png").read_bytes())
    trainer, vae, image = runs["tiled"]
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (1024, 1024)
    assert not runs["untiled"][1].use_tiling
    # Training latents were encoded before (untiled), and these 32 px images are below a tile: the same run.
    cached = zip(trainer.instance_latents.mean, runs["untiled"][0].instance_latents.mean, strict=True)
    assert all(torch.equal(ours, theirs) for ours, theirs in cached)
    assert image == runs["untiled"][2]
    with pytest.raises(ValueError, match="`--enable_vae_tiling` is an option of sana"):
        DreamBoothTrainer(
            tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "sd", enable_vae_tiling=True)
        ).train()
