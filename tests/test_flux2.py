"""FLUX.2 [dev] and [klein]: packing and position ids are the pipelines', latents are normalised as the pipeline
encodes reference images (the inverse of its decoding), prompt embeddings are `encode_prompt`'s, the defaults are
those of diffusers' scripts, `--caption_dropout` ([klein]), loading the [dev] tokenizer without torchvision, and the
README commands train on the tiny models."""

import json
import shutil

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import tiny_readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothPipeline, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.pipeline_loading import load_base_pipeline
from diffusers_dreambooth.safeguards import DreamBoothInputError
from diffusers_dreambooth.validation import sampling_scheduler

PROMPT = "a photo of sks dog"
KEYS = ("flux2", "flux2_klein")


class Flux2Tester(DreamBoothFamilyTester):
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    # No validation images: FLUX.2 pipelines sample 256 px (128 latents) by default whatever the model.
    run_options = {"num_validation_images": 0}
    lora_trains_text_encoder = False  # the LLM text encoders are frozen

    def generate(self, pipeline) -> torch.Tensor:
        # `Flux2Pipeline`'s first argument is its condition image: the prompt goes by name.
        return generate(pipeline)


class TestFlux2(Flux2Tester):
    family = "flux2"


class TestFlux2Klein(Flux2Tester):
    family = "flux2_klein"


def generate(pipeline, prompt: str = PROMPT) -> torch.Tensor:
    output = pipeline(
        prompt=prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return torch.from_numpy(output)


@pytest.fixture(scope="module", params=KEYS)
def pipeline(request, pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs[request.param])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dev(pipeline_dirs):
    return DiffusionPipeline.from_pretrained(pipeline_dirs["flux2"])


@pytest.fixture(scope="module")
def klein(pipeline_dirs):
    return DiffusionPipeline.from_pretrained(pipeline_dirs["flux2_klein"])


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


def latents_and_noise(batch: int = 2, height: int = 4, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 16, height, width)  # 4 latent channels, patchified
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


# Packing, position ids, guidance


def test_predict_packs_with_the_pipelines_position_ids_and_unpacks(pipeline):
    family = configured(pipeline, guidance_scale=2.0)
    latents, _ = latents_and_noise()
    timesteps = family.noise_scheduler.timesteps[torch.tensor([100, 600])]
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
    recorder = Recorder()
    prediction = family.predict(recorder, latents, timesteps, embeds, None)
    kwargs = recorder.kwargs
    torch.testing.assert_close(prediction, latents, rtol=0, atol=0)  # an identity's output unpacks to the input
    torch.testing.assert_close(kwargs["hidden_states"], Flux2Pipeline._pack_latents(latents), rtol=0, atol=0)
    assert kwargs["hidden_states"].shape == (2, 4 * 6, 16)
    torch.testing.assert_close(kwargs["img_ids"], Flux2Pipeline._prepare_latent_ids(latents))
    # (t, h, w, l): rows and columns of the latents, time and layer 0; text tokens along l.
    assert kwargs["img_ids"][0, 7].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(kwargs["txt_ids"], Flux2Pipeline._prepare_text_ids(embeds["prompt_embeds"]))
    assert kwargs["txt_ids"][0, 5].tolist() == [0, 0, 0, 5]
    torch.testing.assert_close(kwargs["timestep"], timesteps / 1000)
    assert kwargs["encoder_hidden_states"] is embeds["prompt_embeds"]
    if pipeline.transformer.config.guidance_embeds:  # [dev]
        torch.testing.assert_close(kwargs["guidance"], torch.tensor([2.0, 2.0]))
    else:  # [klein]: no guidance embedding, as its script
        assert kwargs["guidance"] is None


def test_prediction_is_the_transformer_velocity_unpacked(pipeline):
    family = configured(pipeline)
    latents, _ = latents_and_noise()
    timesteps = family.noise_scheduler.timesteps[torch.tensor([100, 600])]
    with torch.no_grad():
        embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
        prediction = family.predict(pipeline.transformer, latents, timesteps, embeds, None)
        ids = Flux2Pipeline._prepare_latent_ids(latents)
        guidance = torch.full((2,), 3.5) if pipeline.transformer.config.guidance_embeds else None
        packed = pipeline.transformer(
            hidden_states=Flux2Pipeline._pack_latents(latents),
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds["prompt_embeds"],
            txt_ids=Flux2Pipeline._prepare_text_ids(embeds["prompt_embeds"]),
            img_ids=ids,
        ).sample
    torch.testing.assert_close(prediction, Flux2Pipeline._unpack_latents_with_ids(packed, ids))


# Latents


def test_latents_are_the_pipelines_normalised_patchified_mode_and_decoding_inverts_them(pipeline):
    family = configured(pipeline)
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    assert mean.shape == (2, *family.sample_shape((32, 48))) == (2, 16, 8, 12)
    assert not std.any()  # the posterior's mode, as diffusers' FLUX.2 scripts take it
    with torch.no_grad():
        # The pipeline encodes reference images exactly so: mode, patchify, normalise by the VAE's batch norm.
        expected = pipeline._encode_vae_image(pixels, generator=None)
        torch.testing.assert_close(mean, expected)
        mode = pipeline.vae.encode(pixels).latent_dist.mode()
    assert not torch.allclose(mean, Flux2Pipeline._patchify_latents(mode))  # the tiny VAE's statistics are not 0, 1
    # What the pipeline does to its latents before `vae.decode`, on ours, gives the VAE's latents back.
    torch.testing.assert_close(family.decodable(mean), mode, atol=1e-5, rtol=1e-5)
    bn_std = torch.sqrt(pipeline.vae.bn.running_var.view(1, -1, 1, 1) + pipeline.vae.config.batch_norm_eps)
    by_pipeline = Flux2Pipeline._unpatchify_latents(mean * bn_std + pipeline.vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(by_pipeline, mode, atol=1e-5, rtol=1e-5)


def test_resolution_is_a_multiple_of_one_latent_patch(pipeline):
    assert family_for_pipeline(pipeline).resolution_multiple == 4  # VAE factor 2 times the 2x2 patches


# Prompts


@pytest.mark.parametrize("layers", [None, [1, 2, 3], [30, 0, 30]])
def test_prompt_embeddings_are_encode_prompts(pipeline, layers):
    options = {} if layers is None else {"text_encoder_out_layers": layers}
    family = configured(pipeline, max_sequence_length=64, **options)
    prompts = [PROMPT, "a dog", ""]
    embeds = family.encode_frozen_prompts(prompts)
    kwargs = {} if layers is None else {"text_encoder_out_layers": tuple(layers)}
    with torch.no_grad():
        expected, text_ids = pipeline.encode_prompt(prompts, max_sequence_length=64, **kwargs)
    assert embeds.keys() == {"prompt_embeds"}
    assert embeds["prompt_embeds"].shape == (3, 64, 48)  # three layers of 16 values
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    inputs = {"text_encoder_out_layers": family.text_encoder_out_layers, "max_sequence_length": 64}
    assert family.sampling_inputs() == inputs


def test_dev_embeddings_follow_the_system_message_and_the_prompt(dev):
    family = configured(dev)
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])["prompt_embeds"]
    assert embeds.shape == (2, 512, 48)
    assert not torch.allclose(embeds[0], embeds[1])  # the prompt survives the system message and truncation


def test_text_encoder_layers_the_models_cannot_read_are_refused(dev):
    with pytest.raises(DreamBoothInputError, match="numbered 0 to 30"):
        configured(dev, text_encoder_out_layers=[10, 20, 31])
    with pytest.raises(DreamBoothInputError, match="reads 3 stacked hidden states"):
        configured(dev, text_encoder_out_layers=[10, 20])


# Options


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_flux2_scripts(pipeline, adapter):
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family_for_pipeline(pipeline).option_defaults[adapter])
    assert (config.learning_rate, config.adam_weight_decay, config.guidance_scale) == (1e-4, 1e-4, 3.5)
    assert (config.resolution, config.image_interpolation_mode) == (512, "bilinear")
    assert (config.weighting_scheme, config.precondition_outputs, config.max_sequence_length) == ("none", 0, 512)
    family = family_for_pipeline(pipeline)
    assert family.denoiser_lora_target_modules == ("to_k", "to_q", "to_v", "to_out.0")
    if isinstance(pipeline, Flux2KleinPipeline):
        # The klein pipeline's layers (its `encode_prompt` default), which validation samples with; diffusers'
        # klein script passes 10 20 30 instead.
        assert config.text_encoder_out_layers == [9, 18, 27]
        assert family.hub_tags == ("flux2-klein", "flux2-klein-diffusers")
    else:
        assert config.text_encoder_out_layers == [10, 20, 30]
        assert family.hub_tags == ("flux2", "flux2-diffusers")


def test_caption_dropout_is_refused_for_dev(dev):
    with pytest.raises(DreamBoothInputError, match="--caption_dropout"):
        configured(dev, caption_dropout=0.1)


def test_caption_dropout_swaps_subject_embeddings_for_the_empty_prompts(klein):
    family = configured(klein, caption_dropout=0.5, max_sequence_length=32)
    embeds = family.encode_frozen_prompts([PROMPT] * 8)
    empty = family.encode_frozen_prompts([""])["prompt_embeds"][0]
    torch.testing.assert_close(family.empty_prompt_embeds, empty)
    is_prior = torch.tensor([False] * 6 + [True] * 2)

    def dropped(seed: int) -> list[bool]:
        out = family.step_prompt_embeds(embeds, is_prior, torch.Generator().manual_seed(seed))["prompt_embeds"]
        assert all(torch.equal(row, empty) or torch.equal(row, embeds["prompt_embeds"][0]) for row in out)
        return [torch.equal(row, empty) for row in out]

    assert dropped(0) == dropped(0)  # deterministic per step
    draws = [dropped(seed) for seed in range(20)]
    assert not any(row[6] or row[7] for row in draws)  # class examples keep their prompt
    rate = sum(sum(row[:6]) for row in draws) / (20 * 6)
    assert 0.35 < rate < 0.65
    assert configured(klein).step_prompt_embeds(embeds, is_prior, torch.Generator()) is embeds


def test_caption_dropout_trains_and_changes_the_update(pipeline_dirs, instance_dir, tmp_path):
    def trained(name: str, **opts) -> torch.Tensor:
        options = dict(train_batch_size=2, num_validation_images=0, **opts)
        config = tiny_config(pipeline_dirs["flux2_klein"], instance_dir, tmp_path / name, **options)
        return DreamBoothTrainer(config).train().transformer.proj_out.weight

    dropped = trained("dropout", caption_dropout=0.9)
    torch.testing.assert_close(trained("again", caption_dropout=0.9), dropped, rtol=0, atol=0)
    assert not torch.allclose(trained("default"), dropped)


@pytest.mark.parametrize("key", KEYS)
def test_readme_commands_train_two_steps(key, pipeline_dirs, tmp_path):
    config = parse_config(tiny_readme_command(key, pipeline_dirs[key], tmp_path))
    trainer = DreamBoothTrainer(config)
    trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / f"trained-{key}-lora" / "pytorch_lora_weights.safetensors").is_file()


# Loading without torchvision


def test_the_dev_tokenizer_loads_alone_where_the_pixtral_processor_cannot(pipeline_dirs, instance_dir, tmp_path):
    """The real FLUX.2 [dev] names a `PixtralProcessor`, which transformers loads only with torchvision."""
    try:
        from transformers import PixtralProcessor

        PixtralProcessor.from_pretrained  # noqa: B018 (a placeholder raises without torchvision)
        pytest.skip("torchvision is installed: the processor loads")
    except ImportError:
        pass
    folder = tmp_path / "flux2-dev"
    shutil.copytree(pipeline_dirs["flux2"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="PixtralProcessor|Placeholder"):
        DiffusionPipeline.from_pretrained(folder)  # diffusers' own loading needs the processor
    config = tiny_config(folder, instance_dir, tmp_path / "out", adapter="lora", num_validation_images=0)
    pipeline = load_base_pipeline(config)
    assert type(pipeline) is Flux2Pipeline and pipeline.tokenizer.chat_template
    family = configured(pipeline)
    reference = configured(DiffusionPipeline.from_pretrained(pipeline_dirs["flux2"]))
    torch.testing.assert_close(
        family.encode_frozen_prompts([PROMPT]), reference.encode_frozen_prompts([PROMPT]), rtol=0, atol=0
    )
    trained = DreamBoothTrainer(config).train()
    # The trained LoRA loads on that base with `DreamBoothPipeline` too (card samples, a finishing redo, users).
    reloaded = DreamBoothPipeline.from_pretrained(tmp_path / "out").pipeline
    assert type(reloaded) is Flux2Pipeline and reloaded.tokenizer.chat_template
    for key, value in trained.transformer.state_dict().items():
        torch.testing.assert_close(reloaded.transformer.state_dict()[key.replace("default.", "default_0.")], value)


# Sampling

#: FLUX.2's scheduler: FLUX.1-dev's exponential dynamic shift; `Flux2Pipeline` passes its own empirical `mu`.
FLUX2_SCHEDULERS = {
    "flux2": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"),
}


@pytest.mark.parametrize("scheduler_config", FLUX2_SCHEDULERS.values(), ids=FLUX2_SCHEDULERS.keys())
def test_dpm_solver_samples_flux2_as_its_own_scheduler_does(dev, scheduler_config):
    def sample(steps: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
        return dev(prompt=PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **size).images

    original = dev.scheduler
    try:
        dev.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        reference = sample(200)
        dev.scheduler = sampling_scheduler("DPMSolverMultistepScheduler", dev.scheduler)
        assert (sample(25) - reference).abs().max() < 0.01
    finally:
        dev.scheduler = original


def test_text_encoder_out_layers_parse_train_and_reach_validation(pipeline_dirs, instance_dir, tmp_path, monkeypatch):
    flags = ["--instance_data_dir=dog", f"--instance_prompt={PROMPT}", "--text_encoder_out_layers", "1", "2", "3"]
    assert parse_config(flags).text_encoder_out_layers == [1, 2, 3]
    seen = []
    encode_prompt = Flux2KleinPipeline.encode_prompt

    def recording(self, *args, **kwargs):
        seen.append(tuple(kwargs["text_encoder_out_layers"]))
        return encode_prompt(self, *args, **kwargs)

    monkeypatch.setattr(Flux2KleinPipeline, "encode_prompt", recording)
    options = dict(text_encoder_out_layers=[1, 2, 3], validation_prompt=PROMPT, validation_steps=1, guidance_scale=1.0)
    config = tiny_config(
        pipeline_dirs["flux2_klein"], instance_dir, tmp_path / "out", num_validation_images=1, **options
    )
    DreamBoothTrainer(config).train()
    assert (tmp_path / "out" / "validation" / "step-1" / "0.png").is_file()
    # The cached embeddings, every validation sample and the card sample.
    assert len(seen) >= 3 and seen == [(1, 2, 3)] * len(seen)
