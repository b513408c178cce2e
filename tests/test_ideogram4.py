"""Ideogram 4: the packed `[text | image]` sequence and its ids are `encode_prompt`'s for the batch's grid, latents
are packed and normalised as the pipeline unpacks them, sigma is the script's resolution-shifted logit-normal draw,
the prediction is the velocity the pipeline steps with, the defaults are those of diffusers' script, and its README
command (with `--disable_training_autocast`) trains on the tiny model."""

import math

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, Ideogram4PromptEnhancerHead
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline, validation
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.ideogram4 import Ideogram4Family, pack, unpack
from diffusers_dreambooth.safeguards import DreamBoothInputError

PROMPT = "a photo of sks dog"
SEQUENCE = 64  # tokens per prompt in these tests (the script's 2048 is slow on one CPU thread)


def generate(pipeline, prompt: str = PROMPT) -> torch.Tensor:
    output = pipeline(
        prompt=prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        guidance_scale=4.0,
        guidance_schedule=None,  # the default schedule has 48 steps
        max_sequence_length=SEQUENCE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return torch.from_numpy(output)


class TestIdeogram4(DreamBoothFamilyTester):
    family = "ideogram4"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    run_options = {"num_validation_images": 0, "max_sequence_length": SEQUENCE}
    # LoRA on the transformer only: Qwen3-VL is frozen, as in diffusers' Ideogram 4 script.
    lora_trains_text_encoder = False

    def generate(self, pipeline) -> torch.Tensor:
        return generate(pipeline)


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["ideogram4"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


class Recorder(torch.nn.Module):
    """A denoiser that records its keyword arguments and returns its input negated: a prediction of `x - noise`
    whose velocity is the input."""

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (-kwargs["hidden_states"],)


def test_predict_builds_encode_prompts_sequence_for_the_grid(pipeline):
    family = configured(pipeline, max_sequence_length=SEQUENCE)
    prompts = [PROMPT, "a dog"]
    embeds = family.encode_frozen_prompts(prompts)
    latents = torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([250.0, 700.0])
    recorder = Recorder()
    velocity = family.predict(recorder, latents, timesteps, embeds, None)
    torch.testing.assert_close(velocity, latents, rtol=0, atol=0)
    expected = pipeline.encode_prompt(prompts, grid_h=2, grid_w=3, max_sequence_length=SEQUENCE, device="cpu")
    kwargs = recorder.kwargs
    torch.testing.assert_close(kwargs["encoder_hidden_states"], expected[0], rtol=0, atol=0)
    for name, value in zip(("position_ids", "segment_ids", "indicator"), expected[1:]):
        assert torch.equal(kwargs[name], value), name
    torch.testing.assert_close(kwargs["timestep"], torch.tensor([0.75, 0.3]))  # the model's time is 1 - sigma
    hidden = kwargs["hidden_states"]
    assert not hidden[:, :SEQUENCE].any()  # zeros at the text positions, as the pipeline pads them
    # Image tokens in raster order, each the packed channels of one patch.
    torch.testing.assert_close(hidden[:, SEQUENCE + 4], latents[:, :, 1, 1], rtol=0, atol=0)


def test_latents_are_packed_and_normalised_as_the_pipeline_decodes_them(pipeline):
    family = configured(pipeline)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, std = family.encode_image_distribution(pixels)
    assert mean.shape == (1, *family.sample_shape(32)) == (1, 16, 8, 8) and not std.any()
    mode = pipeline.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(family.decodable(mean), mode, rtol=1e-5, atol=1e-5)
    # The pipeline's own decoding of a token sequence: de-normalise per packed channel, then unpatchify.
    vae = pipeline.vae
    tokens = mean.permute(0, 2, 3, 1).reshape(1, 64, 16)
    z = tokens * torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps) + vae.bn.running_mean
    z = z.view(1, 8, 8, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(1, 4, 16, 16)
    torch.testing.assert_close(z, mode, rtol=1e-5, atol=1e-5)
    latents = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(unpack(pack(latents)), latents, rtol=0, atol=0)
    assert family.resolution_multiple == 4


def test_prompt_embeddings_are_encode_prompts_text_part(pipeline):
    family = configured(pipeline, max_sequence_length=SEQUENCE)
    embeds = family.encode_frozen_prompts([PROMPT, "a dog"])
    expected, _, _, indicator = pipeline.encode_prompt(
        [PROMPT, "a dog"], grid_h=1, grid_w=1, max_sequence_length=SEQUENCE, device="cpu"
    )
    torch.testing.assert_close(embeds["prompt_embeds"], expected[:, :SEQUENCE], rtol=0, atol=0)
    assert torch.equal(embeds["prompt_embeds_mask"].bool(), indicator[:, :SEQUENCE] == 3)
    assert not torch.equal(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])


def test_sigma_is_the_resolution_shifted_logit_normal_and_the_target_the_velocity(pipeline):
    family = configured(pipeline, resolution=1024, logit_std=1.5)
    generator = torch.Generator().manual_seed(0)
    sigmas = family.sample_timesteps(20000, generator) / 1000
    logits = torch.logit(sigmas.double())
    # Mean 0 + 0.5 * log(1024**2 / 512**2), std 1.5: the pipeline's schedule at 1024 px.
    assert abs(logits.mean().item() - 0.5 * math.log(4)) < 0.05 and abs(logits.std().item() - 1.5) < 0.05
    latents, noise = torch.ones(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    noisy, target = family.noisy_input_and_target(latents, noise, torch.tensor([250.0]))
    torch.testing.assert_close(noisy, torch.full_like(latents, 0.75))
    torch.testing.assert_close(target, -latents)  # noise - x; the pipeline steps with `-(x - noise)`


def test_validation_samples_at_the_resolution_with_a_constant_guidance(pipeline):
    size = {"height": 512, "width": 512}
    assert configured(pipeline).sampling_inputs() == {**size, "guidance_schedule": None, "guidance_scale": 7.0}
    assert configured(pipeline, guidance_scale=3.0).sampling_inputs() == {**size, "guidance_schedule": None}


def test_validation_images_are_sampled(pipeline_dirs, instance_dir, tmp_path, monkeypatch):
    images = []
    original = validation.generate_validation_images

    def recorded(*args, **kwargs):
        images.extend(original(*args, **kwargs))
        return images

    monkeypatch.setattr(validation, "generate_validation_images", recorded)
    config = tiny_config(
        pipeline_dirs["ideogram4"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        max_train_steps=1,
        max_sequence_length=SEQUENCE,
        validation_prompt=PROMPT,
        validation_steps=1,
        validation_inference_steps=2,
        num_validation_images=1,
        # The card's final samples pass no family inputs yet, and the default guidance schedule fails at 2 steps.
        skip_final_inference=True,
    )
    DreamBoothTrainer(config).train()
    assert [image.size for image in images] == [(TINY_RESOLUTION, TINY_RESOLUTION)]  # at the training resolution


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_defaults_are_those_of_diffusers_ideogram4_script(pipeline, adapter):
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter)
    config = config.with_defaults(family.option_defaults[adapter])
    assert (config.learning_rate, config.resolution, config.adam_weight_decay) == (1e-4, 512, 1e-4)
    assert (config.weighting_scheme, config.max_sequence_length, config.logit_std) == ("logit_normal", 2048, 1.5)
    assert (config.rank, config.lora_scale_alpha) == (4, 4)
    assert family.denoiser_lora_targets(config) == ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def test_readme_command_trains_two_steps(pipeline_dirs, tmp_path):
    flags = readme_command("ideogram4", tmp_path)
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["ideogram4"],
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
    assert (tmp_path / "trained-ideogram4-lora" / "pytorch_lora_weights.safetensors").is_file()


class LossRecorder(DreamBoothTrainer):
    """Keeps every step's loss."""

    def _loss_values(self, losses) -> dict[str, float]:
        values = super()._loss_values(losses)
        self.losses = [*getattr(self, "losses", []), values["loss"]]
        return values


def bf16_run(pipeline_dirs, instance_dir, output_dir, **options) -> tuple[LossRecorder, list]:
    """Two LoRA steps in `--mixed_precision bf16` on CPU; whether autocast was on inside the transformer's forward
    (at its `final_layer`, within the forward accelerate wraps), and that layer's output, at every call."""
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["ideogram4"])
    calls = []
    pipe.transformer.final_layer.register_forward_hook(
        lambda module, args, output: calls.append((torch.is_autocast_enabled("cpu"), output.detach().clone()))
    )
    config = tiny_config(
        pipeline_dirs["ideogram4"],
        instance_dir,
        output_dir,
        adapter="lora",
        mixed_precision="bf16",
        max_sequence_length=SEQUENCE,
        skip_final_inference=True,
        **options,
    )
    trainer = LossRecorder(config, pipeline=pipe)
    trainer.train()
    return trainer, calls


def test_disable_training_autocast_trains_in_the_transformers_own_dtype(pipeline_dirs, instance_dir, tmp_path):
    """diffusers' script passes `AutocastKwargs(enabled=False)` to its Accelerator with the flag: the forward runs
    without autocast, the bf16 base computing in bf16 on bf16 inputs (the float32 LoRA in float32), as the pipeline
    samples it; under autocast, the same step computes otherwise, so its prediction and loss differ."""
    autocast, autocast_calls = bf16_run(pipeline_dirs, instance_dir, tmp_path / "autocast")
    plain, plain_calls = bf16_run(pipeline_dirs, instance_dir, tmp_path / "plain", disable_training_autocast=True)
    assert plain.global_step == autocast.global_step == 2
    assert [enabled for enabled, _ in autocast_calls] == [True, True]
    assert [enabled for enabled, _ in plain_calls] == [False, False]
    # Step 1 is the same: LoRA's B starts at zero, and the bf16 base gives bf16 either way. At step 2 the float32
    # LoRA computes in float32 without autocast, in bf16 under it.
    torch.testing.assert_close(plain_calls[0][1], autocast_calls[0][1], rtol=0, atol=0)
    (_, with_autocast), (_, without) = autocast_calls[1], plain_calls[1]
    assert without.dtype == torch.bfloat16 == plain.input_dtype  # the frozen base's dtype
    assert torch.isfinite(without.float()).all() and not torch.equal(without.float(), with_autocast.float())
    assert all(math.isfinite(loss) for loss in plain.losses) and plain.losses[1] != autocast.losses[1]
    assert not plain.accelerator.autocast_handler.enabled  # validation and card samples run without it too


def test_disable_training_autocast_validates_without_autocast(pipeline_dirs, instance_dir, tmp_path):
    """Validation of the live bf16 base with its float32 LoRA runs without autocast, as the script validates."""
    _, calls = bf16_run(
        pipeline_dirs,
        instance_dir,
        tmp_path / "out",
        disable_training_autocast=True,
        max_train_steps=1,
        validation_prompt=PROMPT,
        validation_steps=1,
        validation_inference_steps=2,
        num_validation_images=1,
    )
    assert [enabled for enabled, _ in calls] == [False] * len(calls) and len(calls) > 1
    image = tmp_path / "out" / "validation" / "step-1" / "0.png"
    assert image.is_file()


def test_disable_training_autocast_on_another_family_is_refused(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(pipeline_dirs["krea2"], instance_dir, tmp_path / "out", disable_training_autocast=True)
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    error = str(raised.value)
    assert "\n" not in error and "`--disable_training_autocast` is an option of ideogram4, not of krea2" in error


UPSAMPLE_TOKENS = 8  # new tokens per rewritten caption (the script's 1024): each runs the 36-layer encoder


def tiny_prompt_enhancer_head(pipeline, folder) -> str:
    """An `Ideogram4PromptEnhancerHead` fitting the tiny Qwen3-VL (its width and vocabulary), saved to `folder`."""
    text_config = pipeline.text_encoder.config.text_config
    torch.manual_seed(0)
    head = Ideogram4PromptEnhancerHead(hidden_size=text_config.hidden_size, vocab_size=text_config.vocab_size)
    head.save_pretrained(folder)
    return str(folder)


def upsampling_config(pipeline_dirs, instance_dir, tmp_path, head_folder: str, **options) -> DreamBoothConfig:
    """A LoRA run on the tiny Ideogram 4 with `--upsample_prompt` and the tiny head in `head_folder`, into `out`."""
    return tiny_config(
        pipeline_dirs["ideogram4"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        upsample_prompt=True,
        prompt_enhancer_head_id=head_folder,
        max_sequence_length=SEQUENCE,
        **options,
    )


def test_upsample_prompt_trains_on_the_enhancers_captions(
    pipeline_dirs, pipeline, instance_dir, tmp_path, monkeypatch
):
    """`--upsample_prompt`: the instance prompt is encoded as `upsample_prompt`'s caption of it (seeded by `--seed`,
    at the training resolution), two LoRA steps train, the LoRA loads in plain diffusers, and the head is not in the
    saved run."""
    head_folder = tiny_prompt_enhancer_head(pipeline, tmp_path / "head")
    monkeypatch.setattr(Ideogram4Family, "upsample_max_new_tokens", UPSAMPLE_TOKENS)
    config = upsampling_config(
        pipeline_dirs,
        instance_dir,
        tmp_path,
        head_folder,
        num_validation_images=0,
        skip_final_inference=True,
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    assert trainer.global_step == 2
    captions = trainer.family.captions
    assert list(captions) == [PROMPT] and captions[PROMPT] != PROMPT
    reference = DiffusionPipeline.from_pretrained(pipeline_dirs["ideogram4"])
    reference.register_modules(prompt_enhancer_head=Ideogram4PromptEnhancerHead.from_pretrained(head_folder))
    expected = reference.upsample_prompt(
        PROMPT,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        max_new_tokens=UPSAMPLE_TOKENS,
        generator=torch.Generator().manual_seed(0),
    )
    assert [captions[PROMPT]] == expected
    # What was cached for training is the caption's embedding.
    encoded, _, _, _ = reference.encode_prompt(
        expected, grid_h=1, grid_w=1, max_sequence_length=SEQUENCE, device="cpu"
    )
    cached = trainer.prompt_embeds[PROMPT]["prompt_embeds"]
    torch.testing.assert_close(cached, encoded[0, :SEQUENCE], rtol=0, atol=0)
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs["ideogram4"])
    plain.load_lora_weights(str(tmp_path / "out"))
    assert any("lora" in name for name, _ in plain.transformer.named_parameters())
    assert not any("prompt_enhancer" in path.name for path in (tmp_path / "out").rglob("*"))


def test_upsample_prompt_rewrites_the_validation_prompt_at_validation(
    pipeline_dirs, pipeline, instance_dir, tmp_path, monkeypatch
):
    """At each validation the pipeline itself rewrites the validation prompt (`prompt_upsampling=True`, from the
    validation generator), with the head beside the encoder that validation loaded again, and draws the image."""
    from diffusers import Ideogram4Pipeline

    head_folder = tiny_prompt_enhancer_head(pipeline, tmp_path / "head")
    monkeypatch.setattr(Ideogram4Family, "upsample_max_new_tokens", UPSAMPLE_TOKENS)
    rewritten, original = [], Ideogram4Pipeline.upsample_prompt

    def recording_upsample_prompt(self, prompt, **options):
        # The pipeline asks for up to `max_sequence_length` new tokens at validation; a real head stops at its end of
        # caption long before, the random tiny one never does, so its captions are cut as training's are.
        captions = original(self, prompt, **{**options, "max_new_tokens": UPSAMPLE_TOKENS})
        head = self.prompt_enhancer_head
        on_encoder = next(head.parameters()).device == self.text_encoder.device
        rewritten.append((prompt, options.get("generator") is not None, on_encoder, captions))
        return captions

    monkeypatch.setattr(Ideogram4Pipeline, "upsample_prompt", recording_upsample_prompt)
    validation_prompt = "a photo of sks dog on the moon"
    config = upsampling_config(
        pipeline_dirs,
        instance_dir,
        tmp_path,
        head_folder,
        validation_prompt=validation_prompt,
        validation_steps=2,
        num_validation_images=1,
        skip_final_inference=True,
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    at_validation = [call for call in rewritten if validation_prompt in call[0]]
    assert [call[:3] for call in at_validation] == [([validation_prompt], True, True)]
    assert at_validation[0][3][0] != validation_prompt  # a caption, not the prompt
    assert validation_prompt not in trainer.family.captions  # training captions are the instance prompt's alone
    assert (tmp_path / "out" / "validation" / "step-2" / "0.png").is_file()


def test_upsample_prompt_with_a_missing_head_stops_in_one_line(pipeline_dirs, instance_dir, tmp_path):
    missing = tmp_path / "no-head"
    config = tiny_config(
        pipeline_dirs["ideogram4"],
        instance_dir,
        tmp_path / "out",
        adapter="lora",
        upsample_prompt=True,
        prompt_enhancer_head_id=str(missing),
    )
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    error = str(raised.value)
    assert "\n" not in error and f"`--prompt_enhancer_head_id={missing}`" in error


def test_upsample_prompt_refuses_a_full_fine_tune_and_other_families(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["ideogram4"], instance_dir, tmp_path / "full", adapter="full", upsample_prompt=True
    )
    with pytest.raises(DreamBoothInputError, match="`--upsample_prompt` trains LoRA only"):
        DreamBoothTrainer(config).train()
    config = tiny_config(pipeline_dirs["krea2"], instance_dir, tmp_path / "krea2", upsample_prompt=True)
    with pytest.raises(DreamBoothInputError, match="`--upsample_prompt` is an option of ideogram4, not of krea2"):
        DreamBoothTrainer(config).train()
