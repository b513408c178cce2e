"""Krea 2: packing and position ids are the pipeline's, latents are normalised as the pipeline un-normalises them,
prompt embeddings are `encode_prompt`'s, the objective is the velocity on the script's grid, the defaults are those
of diffusers' script, its README command trains on the tiny model, and `--validation_model_path` validates on a
stand-in for Krea 2 Turbo with the trained LoRA."""

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Krea2Pipeline
from family_tester import DreamBoothFamilyTester
from PIL import Image
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline, trainer
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.krea2 import Krea2Family
from diffusers_dreambooth.safeguards import DreamBoothInputError
from diffusers_dreambooth.testing_utils.krea2 import KREA2_SCHEDULER_CONFIG
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"
SEQUENCE = 64  # tokens per prompt in these tests (the script's 512 is slow on one CPU thread)


def generate(pipeline, prompt: str = PROMPT) -> torch.Tensor:
    output = pipeline(
        prompt=prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,  # the pipeline's default is 1024 px whatever the model
        max_sequence_length=SEQUENCE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return torch.from_numpy(output)


class TestKrea2(DreamBoothFamilyTester):
    family = "krea2"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    # No validation images: validation samples at the pipeline's default 1024 px, minutes on CPU.
    run_options = {"num_validation_images": 0, "max_sequence_length": SEQUENCE}
    # Class images are supplied: the pipeline would draw them at 1024 px too.
    generates_class_images = False
    # LoRA on the transformer only: Qwen3-VL is frozen, as in diffusers' Krea 2 script.
    lora_trains_text_encoder = False

    def generate(self, pipeline) -> torch.Tensor:
        return generate(pipeline)


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["krea2"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


class Recorder(torch.nn.Module):
    """A denoiser that records its keyword arguments and returns its packed input, as a perfect identity would."""

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (kwargs["hidden_states"],)


def test_predict_packs_with_the_pipelines_position_ids_and_unpacks(pipeline):
    family = configured(pipeline, max_sequence_length=SEQUENCE)
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
    timesteps = family.noise_scheduler.timesteps[torch.tensor([100, 600])]
    recorder = Recorder()
    prediction = family.predict(recorder, latents, timesteps, embeds, None)
    torch.testing.assert_close(prediction, latents, rtol=0, atol=0)  # an identity's output unpacks to the input
    kwargs = recorder.kwargs
    torch.testing.assert_close(kwargs["hidden_states"], pipeline._pack_latents(latents, 2, 4, 4, 6), rtol=0, atol=0)
    expected_ids = Krea2Pipeline.prepare_position_ids(embeds["prompt_embeds"].shape[1], 2, 3, "cpu")
    torch.testing.assert_close(kwargs["position_ids"], expected_ids)
    torch.testing.assert_close(kwargs["timestep"], timesteps / 1000)
    assert kwargs["encoder_attention_mask"].dtype == torch.bool


def test_prompt_embeddings_are_encode_prompts(pipeline):
    family = configured(pipeline, max_sequence_length=SEQUENCE)
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
    expected, mask = pipeline.encode_prompt([PROMPT, "a dog"], device="cpu", max_sequence_length=SEQUENCE)
    torch.testing.assert_close(embeds["prompt_embeds"], expected.float(), rtol=0, atol=0)
    assert torch.equal(embeds["prompt_embeds_mask"], mask)
    # The template's 34 system tokens are dropped, as with Qwen's tokenizer: the sequence is the prompt's.
    lengths = [len(pipeline.tokenizer(prompt).input_ids) + 5 for prompt in (PROMPT, "a dog")]  # + the suffix
    assert embeds["prompt_embeds"].shape[1] == SEQUENCE and mask.sum(dim=1).tolist() == lengths
    assert not torch.equal(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])


def test_latents_are_normalised_as_the_pipeline_undoes_them(pipeline):
    family = configured(pipeline)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    vae = pipeline.vae
    posterior = vae.encode(pixels.unsqueeze(2)).latent_dist
    # The pipeline decodes `latents * latents_std + latents_mean`.
    shape = (1, 4, 1, 1)
    decoded = mean * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(
        shape
    )
    torch.testing.assert_close(decoded, posterior.mean[:, :, 0], rtol=1e-5, atol=1e-5)
    assert mean.shape == (1, 4, 8, 8) == std.shape == (1, *family.sample_shape(32))
    assert family.resolution_multiple == 8  # the tiny VAE halves twice; Krea 2's thrice (16 px)


def test_objective_is_the_velocity_on_the_unshifted_grid(pipeline):
    family = configured(pipeline)
    # Krea 2's scheduler shifts at sampling only (`use_dynamic_shifting`): the training grid is linear.
    torch.testing.assert_close(family.noise_scheduler.sigmas, family.noise_scheduler.timesteps / 1000)
    latents, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    timesteps = family.noise_scheduler.timesteps[torch.tensor([250])]
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    sigma = timesteps.item() / 1000
    torch.testing.assert_close(noisy, torch.full_like(latents, 1 - sigma))
    torch.testing.assert_close(target, -latents)  # noise - x: the direction the pipeline's Euler steps take


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_krea2_script(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.resolution, config.adam_weight_decay) == (3e-4, 512, 1e-4)
    assert (config.weighting_scheme, config.max_sequence_length) == ("none", 512)
    assert (config.rank, config.lora_scale_alpha) == (32, 32)
    family = family_for_pipeline(pipeline)
    assert "to_gate" in family.denoiser_lora_targets(config) and "time_mod_proj" in family.denoiser_lora_targets(
        config
    )


@pytest.fixture(scope="module")
def turbo_dir(pipeline_dirs, tmp_path_factory) -> str:
    """A stand-in for Krea 2 Turbo: the tiny RAW with other transformer weights, marked distilled (the pipeline then
    shifts by its fixed 1.15), RAW's Qwen3-VL and VAE kept, as Turbo keeps them."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["krea2"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    pipe.register_to_config(is_distilled=True)
    folder = tmp_path_factory.mktemp("krea2-turbo")
    pipe.save_pretrained(folder)
    return str(folder)


def test_readme_command_trains_two_steps(pipeline_dirs, turbo_dir, tmp_path):
    flags = readme_command("krea2", tmp_path)
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["krea2"],
        "--validation_model_path": turbo_dir,
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
        "--max_sequence_length": str(SEQUENCE),
    }
    flags = [f for f in flags if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items()] + ["--num_validation_images=0"]
    trainer = DreamBoothTrainer(parse_config(flags))
    trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "trained-krea2-lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("distilled", [False, True], ids=["raw", "turbo"])
def test_dpm_solver_samples_krea2_as_its_own_scheduler_does(pipeline, distilled):
    """Validation's DPM-Solver++ follows the pipeline's resolution shift `mu` (RAW) or its fixed 1.15 (Turbo)."""

    def generate(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION, "max_sequence_length": SEQUENCE}
        return pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = pipeline.scheduler
    pipeline.register_to_config(is_distilled=distilled)
    try:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(**KREA2_SCHEDULER_CONFIG)
        reference = generate(200)  # the model's own scheduler, near the ODE's solution
        pipeline.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", pipeline.scheduler)
        assert (generate(25) - reference).abs().max() < 0.01
    finally:
        pipeline.scheduler = original
        pipeline.register_to_config(is_distilled=False)


#: Validation here samples at the tiny size (Krea 2's pipeline defaults to 1024 px, minutes on CPU).
SMALL = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION, "max_sequence_length": SEQUENCE}


def validation_image(pipeline_dirs, instance_dir, output_dir, **options) -> np.ndarray:
    """Two LoRA steps, validated after the second; its one validation image."""
    config = tiny_config(
        pipeline_dirs["krea2"],
        instance_dir,
        output_dir,
        adapter="lora",
        max_sequence_length=SEQUENCE,
        validation_prompt=PROMPT,
        validation_steps=2,
        num_validation_images=1,
        **options,
    )
    DreamBoothTrainer(config).train()
    return np.asarray(Image.open(output_dir / "validation" / "step-2" / "0.png"))


def test_validation_model_path_samples_that_checkpoint_with_the_trained_lora(
    pipeline_dirs, turbo_dir, instance_dir, tmp_path, monkeypatch
):
    """As diffusers' script: validation and the card samples are drawn by `--validation_model_path` carrying the
    adapter trained so far, in `--validation_num_inference_steps` at `--validation_guidance_scale`; exactly what
    plain diffusers draws with `load_lora_weights` on that checkpoint, and not what the trained RAW draws."""
    monkeypatch.setattr(Krea2Family, "sampling_inputs", lambda self: dict(SMALL))
    recipe = {"validation_num_inference_steps": 3, "validation_guidance_scale": 0.0}
    on_turbo = validation_image(
        pipeline_dirs, instance_dir, tmp_path / "turbo", validation_model_path=turbo_dir, **recipe
    )
    # The same steps and guidance on the trained RAW give other images: the checkpoint is Turbo's.
    same_steps = {"validation_inference_steps": 3, "guidance_scale": 0.0, "validation_scheduler": "pipeline"}
    on_raw = validation_image(pipeline_dirs, instance_dir, tmp_path / "raw", **same_steps)
    assert not np.array_equal(on_turbo, on_raw)

    turbo = Krea2Pipeline.from_pretrained(turbo_dir)
    turbo.set_progress_bar_config(disable=True)
    turbo.load_lora_weights(tmp_path / "turbo")  # the final LoRA: that of step 2, which validation drew
    generator = torch.Generator().manual_seed(0)  # the run's seed
    expected = turbo(PROMPT, num_inference_steps=3, guidance_scale=0.0, generator=generator, **SMALL).images[0]
    assert np.array_equal(on_turbo, np.asarray(expected))
    # The card samples, after the final save, are drawn on Turbo too, with the saved LoRA.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "turbo" / "samples" / "sample_0.png")), on_turbo)
    assert not (tmp_path / "turbo" / "_val_lora").exists()  # the adapter went through a temporary folder


@pytest.mark.parametrize("case", ["missing", "not a pipeline", "other base", "other checkpoint", "full"])
def test_bad_validation_model_path_stops_in_one_line_before_loading(
    case, pipeline_dirs, turbo_dir, instance_dir, tmp_path, monkeypatch
):
    def no_loading(config):
        raise AssertionError("the base model loaded")

    monkeypatch.setattr(trainer, "load_base_pipeline", no_loading)
    base, path, adapter = pipeline_dirs["krea2"], turbo_dir, "lora"
    if case == "missing":
        path = str(tmp_path / "no-turbo")
    elif case == "not a pipeline":
        path = str(instance_dir)
    elif case == "other base":
        base = pipeline_dirs["flux"]
    elif case == "other checkpoint":
        path = pipeline_dirs["flux"]
    else:
        adapter = "full"
    config = tiny_config(base, instance_dir, tmp_path / "out", adapter=adapter, validation_model_path=path)
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    error = str(raised.value)
    assert "\n" not in error and error.startswith(f"`--validation_model_path={path}`")
    expected = {
        "missing": "is neither a folder nor a Hub repo id",
        "not a pipeline": "is a folder without `model_index.json`",
        "other base": "`--pretrained_model_name_or_path` holds a `FluxPipeline`",
        "other checkpoint": "`--validation_model_path` holds a `FluxPipeline`",
        "full": "this run trains `--adapter full`",
    }
    assert expected[case] in error


def test_validation_model_path_on_a_loaded_pipeline_of_another_family_is_refused(
    pipeline_dirs, turbo_dir, instance_dir, tmp_path
):
    """A base given as a pipeline (or a Hub id) is checked once loaded, as every family's own options are."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    config = tiny_config(
        pipeline_dirs["flux"], instance_dir, tmp_path / "out", adapter="lora", validation_model_path=turbo_dir
    )
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config, pipeline=pipe).train()
    assert "`--validation_model_path` is an option of krea2, not of flux" in str(raised.value)
