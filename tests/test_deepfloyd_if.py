"""DeepFloyd IF: stage I's pixel-space objective and prompts, stage II's (low-res, high-res) pairs against what
`IFSuperResolutionPipeline` feeds its UNet, the noise-augmentation level, refusals, and the trained cascade.

The shared end-to-end assertions run for both stages in `test_training.py` (`TestDeepFloydIF*`).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_dreambooth import DreamBoothConfig, DreamBoothPipeline, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.deepfloyd_if import DEFAULT_SR_NOISE_LEVEL, low_resolution_condition

PROMPT = "a photo of sks dog"
LOW_RESOLUTION = TINY_RESOLUTION // 4  # the tiny stage I's 8x8, upscaled 4x by the tiny stage II


@pytest.fixture(scope="module")
def stage_1(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["if"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stage_2(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["if_sr"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "full", **options):
    """The family of `pipeline`, configured with `options` on top of its defaults for `adapter`."""
    family = family_for_pipeline(pipeline)
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, adapter=adapter, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


def images(batch: int = 2, size: int = TINY_RESOLUTION, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def unet_inputs(pipeline):
    """Record the arguments of every UNet call of `pipeline` (a forward pre-hook); remove the hook when done."""
    calls = []
    handle = pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    return calls, handle


# Stage I


def test_stage_1_diffuses_pixels_and_regresses_the_epsilon_half(stage_1):
    family = configured(stage_1)
    assert family.vae is None and family.sample_shape(64) == (3, 64, 64)
    pixels = images()
    mean, std = family.encode_image_distribution(pixels)
    torch.testing.assert_close(mean, pixels)
    assert not std.any()

    noise, timesteps = torch.randn_like(pixels), torch.tensor([10, 900])
    noisy, target = family.noisy_input_and_target(mean, noise, timesteps)
    torch.testing.assert_close(noisy, stage_1.scheduler.add_noise(pixels, noise, timesteps))
    torch.testing.assert_close(target, noise)
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT, PROMPT]), family.text_encoders)
        prediction = family.predict(stage_1.unet, noisy, timesteps, embeds, None)
        output = stage_1.unet(noisy, timesteps, encoder_hidden_states=embeds["prompt_embeds"]).sample
    assert output.shape[1] == 6  # epsilon, then the learned variance
    torch.testing.assert_close(prediction, output[:, :3])


def test_prompt_embeddings_are_the_pipelines_with_t5_reading_its_attention_mask(stage_1):
    family = configured(stage_1)
    prompt = "  A Photo of SKS dog "
    ids = family.tokenize([prompt])
    assert ids[0].shape == (1, 77)  # IF's pipelines always use 77 tokens
    with torch.no_grad():
        ours = family.encode_prompt(ids, family.text_encoders)["prompt_embeds"]
        theirs, _ = stage_1.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False)
        unmasked = stage_1.text_encoder(ids[0])[0]
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, unmasked)  # the mask matters: padding would be attended to without it


def test_trained_pipeline_samples_with_a_fixed_variance(stage_1):
    family = family_for_pipeline(DiffusionPipeline.from_pretrained(stage_1.name_or_path))
    assert family.pipeline.scheduler.config.variance_type == "learned_range"
    family.sample_as_trained()
    assert family.pipeline.scheduler.config.variance_type == "fixed_small"


def test_a_t5_lora_and_a_kohya_export_are_refused_naming_the_option(stage_1):
    with pytest.raises(ValueError, match="`--train_text_encoder` with `--adapter lora`"):
        configured(stage_1, adapter="lora", train_text_encoder=True)
    with pytest.raises(ValueError, match="`--output_kohya_format`"):
        configured(stage_1, adapter="lora", output_kohya_format=True)


# Stage II


def test_sr_input_built_from_a_pair_is_the_pipelines_upscale_and_noise_augmentation(stage_2):
    level = 100  # a level with visible noise, so that a wrong noise or scale would show
    family = configured(stage_2, sr_noise_level=level)
    high_res = images(batch=1)
    mean, std = family.encode_image_distribution(high_res)
    assert mean.shape == std.shape == (1, 6, TINY_RESOLUTION, TINY_RESOLUTION)
    torch.testing.assert_close(mean[:, :3], high_res)  # the target image, exactly
    assert not std[:, :3].any()

    # The pipeline, given the same image at stage I's resolution: it draws the initial noise, then the augmentation's.
    low_res = F.interpolate(high_res, size=LOW_RESOLUTION, mode="bicubic", antialias=True).clamp(-1, 1)
    calls, handle = unet_inputs(stage_2)
    stage_2(
        prompt=PROMPT,
        image=low_res,
        noise_level=level,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    handle.remove()
    (args, kwargs), *_ = calls
    generator = torch.Generator().manual_seed(0)
    torch.randn(1, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=generator)
    augmentation_noise = torch.randn(1, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=generator)
    torch.testing.assert_close(args[0][:, 3:], mean[:, 3:] + std[:, 3:] * augmentation_noise, atol=1e-6, rtol=0)
    assert kwargs["class_labels"].tolist() == [level]

    # Training: the high-res half is diffused and its noise regressed; the augmented half is passed as it is, and the
    # UNet gets the level as `class_labels`.
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise, timesteps = torch.randn(mean.shape, generator=generator), torch.tensor([500])
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy[:, :3], stage_2.scheduler.add_noise(high_res, noise[:, :3], timesteps))
    torch.testing.assert_close(noisy[:, 3:], latents[:, 3:])
    torch.testing.assert_close(target, noise[:, :3])
    with torch.no_grad():
        embeds = family.encode_prompt(family.tokenize([PROMPT]), family.text_encoders)
        prediction = family.predict(stage_2.unet, noisy, timesteps, embeds, None)
        output = stage_2.unet(
            noisy, timesteps, encoder_hidden_states=embeds["prompt_embeds"], class_labels=torch.tensor([level])
        ).sample
    torch.testing.assert_close(prediction, output[:, :3])


def test_low_resolution_condition_keeps_only_what_stage_1_resolves():
    flat = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(low_resolution_condition(flat, 8), flat)
    checkerboard = (torch.arange(32).view(-1, 1) + torch.arange(32)).remainder(2).float().expand(1, 3, 32, 32) * 2 - 1
    assert low_resolution_condition(checkerboard, 8).abs().max() < 0.05  # finer than 8x8: averaged away


def test_noise_level_defaults_to_the_papers_low_level(stage_2):
    family = configured(stage_2)
    assert family.sr_noise_level == DEFAULT_SR_NOISE_LEVEL == 0
    variances = 1 - stage_2.image_noising_scheduler.alphas_cumprod
    # The paper's 1e-5 (and its former 1e-3 read as a time, 1 step of 1000) fall at or below IF's lowest levels.
    assert variances[0] == pytest.approx(4.13e-5, rel=1e-2) and variances[0] == variances.min()
    _, std = family.encode_image_distribution(images(batch=1))
    assert std[:, 3:].max() == pytest.approx(variances[0] ** 0.5)
    with pytest.raises(ValueError, match="sr_noise_level=1000"):
        configured(stage_2, sr_noise_level=1000)


def test_stage_2_resolution_must_have_a_whole_low_resolution_side(pipeline_dirs, square_instance_dir, tmp_path):
    config = tiny_config(pipeline_dirs["if_sr"], square_instance_dir, tmp_path / "out", resolution=30)
    with pytest.raises(ValueError, match="`--resolution=30` must be a multiple of 4"):
        DreamBoothTrainer(config).train()


def test_stage_2_refuses_what_needs_sampling_from_a_prompt(pipeline_dirs, square_instance_dir, tmp_path):
    stage_2 = DiffusionPipeline.from_pretrained(pipeline_dirs["if_sr"])
    with pytest.raises(ValueError, match="`--validation_prompt` needs `--validation_images`"):
        configured(stage_2, validation_prompt=PROMPT)
    with pytest.raises(ValueError, match="`--validation_images`: cannot read `missing.png`"):
        configured(stage_2, validation_prompt=PROMPT, validation_images=["missing.png"])
    with pytest.raises(ValueError, match="`--evaluate`"):
        configured(stage_2, evaluate=True, class_prompt="a photo of dog")
    with pytest.raises(ValueError, match="`--validation_images` is diffusers' option for DeepFloyd IF stage II"):
        configured(DiffusionPipeline.from_pretrained(pipeline_dirs["if"]), validation_images=["low_res.png"])
    config = tiny_config(
        pipeline_dirs["if_sr"],
        square_instance_dir,
        tmp_path / "out",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(tmp_path / "class"),
        num_class_images=2,
    )
    with pytest.raises(ValueError, match="cannot generate them from `--class_prompt` alone"):
        DreamBoothTrainer(config).train()


def test_diffusers_stage_2_command_runs_unchanged_and_validates_by_upscaling(pipeline_dirs, tmp_path, caplog):
    """diffusers' README command for IF stage II (tiny sizes and paths aside): it trains, and each validation image
    is one `--validation_images` file upscaled at the trained noise level."""
    instance_dir = write_subject_images(tmp_path / "dog", size=(TINY_RESOLUTION, TINY_RESOLUTION))
    low_res = write_subject_images(tmp_path / "low_res", count=2, size=(LOW_RESOLUTION, LOW_RESOLUTION), seed=1)
    command = [
        f"--pretrained_model_name_or_path={pipeline_dirs['if_sr']}",
        f"--instance_data_dir={instance_dir}",
        f"--output_dir={tmp_path / 'out'}",
        "--instance_prompt=a sks dog",
        f"--resolution={TINY_RESOLUTION}",
        "--train_batch_size=2",
        "--gradient_accumulation_steps=2",
        "--learning_rate=5e-6",
        "--max_train_steps=2",
        "--validation_prompt=a sks dog",
        "--validation_steps=2",
        "--checkpointing_steps=500",
        "--pre_compute_text_embeddings",
        "--tokenizer_max_length=77",
        "--text_encoder_use_attention_mask",
        "--validation_images",
        *sorted(str(path) for path in low_res.iterdir()),
        "--class_labels_conditioning=timesteps",
        "--validation_inference_steps=2",  # not in diffusers' command: keeps the test fast
        "--report_to=none",
    ]
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["if_sr"])
    sampling_calls = []  # the UNet's inputs while the pipeline samples (eval mode), not in training steps
    pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: None if module.training else sampling_calls.append(kwargs), with_kwargs=True
    )
    with caplog.at_level("WARNING"):
        DreamBoothTrainer(parse_config(command), pipeline=pipeline).train()
    assert "`--class_labels_conditioning timesteps` is accepted but not followed" in caplog.text
    validation = sorted((tmp_path / "out" / "validation" / "step-2").glob("*.png"))
    assert [Image.open(path).size for path in validation] == [(TINY_RESOLUTION, TINY_RESOLUTION)] * 2
    # Each validation call upscaled at the trained noise level (the UNet's class labels), not IF's default 250.
    assert sampling_calls
    assert all(kwargs["class_labels"].tolist() == [DEFAULT_SR_NOISE_LEVEL] * 2 for kwargs in sampling_calls)


# The cascade


@pytest.fixture(scope="module")
def cascade(pipeline_dirs, tmp_path_factory):
    """Stage I fully fine-tuned into `out/` at 8x8, stage II as a LoRA into `out/stage_2/` at 32x32."""
    root = tmp_path_factory.mktemp("cascade")
    photos = write_subject_images(root / "photos", size=(TINY_RESOLUTION, TINY_RESOLUTION))
    out = root / "out"
    options = dict(
        max_train_steps=3,
        learning_rate=1e-2,
        num_validation_images=1,
        validation_inference_steps=1,
        pre_compute_text_embeddings=True,  # as the example configs, after diffusers' IF docs
    )
    DreamBoothTrainer(tiny_config(pipeline_dirs["if"], photos, out, resolution=LOW_RESOLUTION, **options)).train()
    config = tiny_config(pipeline_dirs["if_sr"], photos, out / "stage_2", adapter="lora", rank=4, **options)
    DreamBoothTrainer(config).train()
    return out


def generate(pipeline, **options):
    generator = torch.Generator().manual_seed(0)
    return pipeline(PROMPT, num_inference_steps=2, generator=generator, output_type="pt", **options).images


def test_cascade_generates_at_the_super_resolution_size_as_plain_diffusers_would(cascade, pipeline_dirs):
    subject = DreamBoothPipeline.from_pretrained(cascade)
    subject.set_progress_bar_config(disable=True)
    assert subject.super_resolution is not None
    assert subject.super_resolution.metadata.training["sr_noise_level"] == DEFAULT_SR_NOISE_LEVEL
    images = generate(subject)
    assert images.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    torch.testing.assert_close(generate(subject), images, atol=0, rtol=0)  # a seeded generator fixes the output

    # Plain diffusers on the saved folders: the full stage I, the stage II LoRA on its base, at the trained level.
    plain_1 = DiffusionPipeline.from_pretrained(cascade)
    plain_2 = DiffusionPipeline.from_pretrained(pipeline_dirs["if_sr"])
    plain_2.load_lora_weights(cascade / "stage_2")
    plain_2.scheduler = type(plain_2.scheduler).from_config(plain_2.scheduler.config, variance_type="fixed_small")
    for plain in (plain_1, plain_2):
        plain.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    low_res = plain_1(PROMPT, num_inference_steps=2, generator=generator, output_type="pt").images
    assert low_res.shape[-1] == LOW_RESOLUTION
    expected = plain_2(
        prompt=PROMPT, image=low_res, noise_level=0, num_inference_steps=2, generator=generator, output_type="pt"
    ).images
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_cascade_saves_and_reloads_both_stages(cascade, tmp_path):
    subject = DreamBoothPipeline.from_pretrained(cascade)
    subject.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "stage_2" / "pytorch_lora_weights.safetensors").is_file()
    reloaded = DreamBoothPipeline.from_pretrained(tmp_path / "copy")
    for pipeline in (subject, reloaded):
        pipeline.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(reloaded), generate(subject), atol=0, rtol=0)


def test_cards_name_each_stage(cascade):
    stage_1 = (cascade / "README.md").read_text()
    stage_2 = (cascade / "stage_2" / "README.md").read_text()
    assert "IFPipeline" in stage_1 and "- if-diffusers" in stage_1
    assert "IFSuperResolutionPipeline" in stage_2 and "- super-resolution" in stage_2
    assert "noise-augmentation level" in stage_2
    # The plain-diffusers snippets: stage II upscales an image at the trained level, its LoRA with a fixed variance.
    assert "image=low_res, noise_level=0" in stage_2 and 'variance_type="fixed_small"' in stage_2
    assert "image=low_res" not in stage_1
    metadata = json.loads((cascade / "stage_2" / "dreambooth.json").read_text())
    assert metadata["family"] == "deepfloyd-if-super-resolution" and metadata["training"]["sr_noise_level"] == 0
    assert json.loads((cascade / "dreambooth.json").read_text())["family"] == "deepfloyd-if"
    assert (cascade / "samples" / "sample_0.png").is_file()  # stage I samples from prompts; stage II has none
    assert not (cascade / "stage_2" / "samples").exists()
