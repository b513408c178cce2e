"""FLUX.1 Kontext: the shared end-to-end assertions on subject photos, and image-to-image training on (condition,
target) pairs as diffusers' `train_dreambooth_lora_flux_kontext.py` trains it: the packed condition sequence and its
ids are the pipeline's, only the target tokens are predicted, the condition reaches the loss, `--vae_encode_mode`,
`--validation_image`, the script's defaults and its README commands."""

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline
from family_tester import DreamBoothFamilyTester, state_of
from PIL import Image
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.flux_kontext import FluxKontextFamily

PROMPT = "a photo of sks dog"


class TestFluxKontext(DreamBoothFamilyTester):
    family = "flux_kontext"
    # FluxKontextPipeline samples at `max_area` (1024x1024 by default, whatever height and width say): the family's
    # `sampling_inputs` ask for the training resolution's area, and generation here for the tiny size.
    run_options = {"num_validation_images": 0}
    frozen_text_encoders = ("text_encoder_2",)  # T5, as diffusers' Flux scripts

    def generate(self, pipeline) -> torch.Tensor:
        # The prompt by name: FluxKontextPipeline's first argument is the image to edit.
        output = pipeline(
            prompt=PROMPT,
            num_inference_steps=2,
            max_area=TINY_RESOLUTION**2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        return torch.from_numpy(output)


@pytest.fixture(scope="module")
def pipeline(pipeline_dirs):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["flux_kontext"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def configured(pipeline, adapter: str = "lora", **options) -> FluxKontextFamily:
    family = family_for_pipeline(pipeline)
    data = {"dataset_name": "pairs", "caption_column": "text"} if options.get("cond_image_column") else {}
    data = data or {"instance_data_dir": "dog", "instance_prompt": PROMPT}
    config = DreamBoothConfig(adapter=adapter, resolution=TINY_RESOLUTION, **data, **options)
    family.configure(config.with_defaults(family.option_defaults[adapter]))
    return family


class Recorder(torch.nn.Module):
    """A denoiser that records its keyword arguments and returns its packed input, as a perfect identity would."""

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        self.kwargs = kwargs
        return (kwargs["hidden_states"],)


def prompt_embeds(family) -> dict:
    embeds = family.encode_frozen_prompts([PROMPT, PROMPT])
    return {key: value.float() for key, value in embeds.items()}


def write_pairs(directory, count: int = 4, seed: int = 0, condition_seed: int = 1):
    """A local `datasets` folder (one parquet file) of (condition, target) pairs with instructions."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng, condition_rng = np.random.default_rng(seed), np.random.default_rng(condition_seed)
    rows = {"target": [], "condition": [], "instruction": []}
    for index in range(count):
        target = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        rows["target"].append(Image.fromarray(target))
        rows["condition"].append(Image.fromarray(condition_rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)))
        rows["instruction"].append(f"make it sks style {index}")
    features = Features({"target": ImageFeature(), "condition": ImageFeature(), "instruction": Value("string")})
    directory.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(directory / "train.parquet"))
    return directory


def pair_config(pipeline_dirs, dataset_dir, output_dir, **options) -> DreamBoothConfig:
    pairs = dict(
        dataset_name=str(dataset_dir),
        image_column="target",
        cond_image_column="condition",
        caption_column="instruction",
        instance_prompt=None,
        adapter="lora",
        num_validation_images=0,
    )
    return tiny_config(pipeline_dirs["flux_kontext"], None, output_dir, **{**pairs, **options})


# Packing and ids


def test_condition_sequence_and_ids_are_the_pipelines(pipeline):
    family = configured(pipeline, cond_image_column="condition")
    generator = torch.Generator().manual_seed(0)
    target, condition = torch.randn(2, 16, 4, 6, generator=generator), torch.randn(2, 16, 4, 6, generator=generator)
    noisy, _ = family.noisy_input_and_target(
        torch.cat([target, condition], 1), torch.randn(2, 32, 4, 6), family.noise_scheduler.timesteps[[10, 500]]
    )
    recorder = Recorder()
    family.predict(recorder, noisy, torch.tensor([10.0, 500.0]), prompt_embeds(family), None)

    factor = pipeline.vae_scale_factor
    latents, image_latents, latent_ids, image_ids = pipeline.prepare_latents(
        condition, 2, 16, 4 * factor, 6 * factor, torch.float32, "cpu", latents=family.pack(noisy[:, :16])
    )
    torch.testing.assert_close(recorder.kwargs["hidden_states"], torch.cat([latents, image_latents], dim=1))
    torch.testing.assert_close(recorder.kwargs["img_ids"], torch.cat([latent_ids, image_ids], dim=0))
    assert (image_ids[:, 0] == 1).all() and (latent_ids[:, 0] == 0).all()


def test_prediction_is_the_target_part_only(pipeline):
    family = configured(pipeline, cond_image_column="condition")
    noisy = torch.randn(2, 32, 4, 6, generator=torch.Generator().manual_seed(1))
    prediction = family.predict(Recorder(), noisy, torch.tensor([10.0, 500.0]), prompt_embeds(family), None)
    torch.testing.assert_close(prediction, noisy[:, :16])  # the identity's output, target tokens only


def test_only_the_target_is_noised_and_regressed(pipeline):
    family = configured(pipeline, cond_image_column="condition")
    latents, noise = torch.randn(3, 32, 4, 4), torch.randn(3, 32, 4, 4)
    timesteps = family.noise_scheduler.timesteps[[0, 300, 999]]
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    sigmas = family.sigmas(timesteps)
    torch.testing.assert_close(noisy[:, :16], (1 - sigmas) * latents[:, :16] + sigmas * noise[:, :16])
    torch.testing.assert_close(noisy[:, 16:], latents[:, 16:])
    torch.testing.assert_close(target, noise[:, :16] - latents[:, :16])
    assert family.sample_shape(32) == (32, 16, 16)


def test_without_condition_images_it_predicts_as_flux(pipeline, pipeline_dirs):
    family = configured(pipeline)
    assert family.sample_shape(32) == (16, 16, 16)
    flux = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    flux_family = family_for_pipeline(flux)
    flux_family.configure(
        DreamBoothConfig(instance_data_dir="d", instance_prompt=PROMPT).with_defaults(
            flux_family.option_defaults["lora"]
        )
    )
    noisy, steps = torch.randn(2, 16, 4, 6), torch.tensor([10.0, 500.0])
    kontext_recorder, flux_recorder = Recorder(), Recorder()
    embeds = prompt_embeds(family)
    torch.testing.assert_close(
        family.predict(kontext_recorder, noisy, steps, embeds, None),
        flux_family.predict(flux_recorder, noisy, steps, embeds, None),
    )
    torch.testing.assert_close(kontext_recorder.kwargs["img_ids"], flux_recorder.kwargs["img_ids"])


# Latents


def test_vae_encode_mode_mode_uses_the_posterior_mode(pipeline):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    vae = pipeline.vae
    expected = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    family = configured(pipeline)  # the script's default: mode
    assert family.vae_encode_mode == "mode"
    mean, std = family.encode_image_distribution(pixels)
    torch.testing.assert_close(mean, expected)
    assert not std.any()
    _, std = configured(pipeline, vae_encode_mode="sample").encode_image_distribution(pixels)
    assert std.abs().min() > 0


def test_condition_pixels_encode_after_the_targets(pipeline):
    family = configured(pipeline, cond_image_column="condition")
    pixels = torch.rand(2, 6, 32, 32) * 2 - 1
    mean, _ = family.encode_image_distribution(pixels)
    torch.testing.assert_close(mean[:, :16], family.encode_image_distribution(pixels[:, :3])[0])
    torch.testing.assert_close(mean[:, 16:], family.encode_image_distribution(pixels[:, 3:])[0])


def test_other_families_refuse_condition_images(pipeline_dirs):
    flux = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    with pytest.raises(Exception, match="cond_image_column"):
        family_for_pipeline(flux).encode_image_distribution(torch.zeros(1, 6, 32, 32))


# Training on pairs


def test_pair_dataset_trains_and_the_condition_changes_the_result(pipeline_dirs, tmp_path):
    trained = []
    for condition_seed in (1, 2):
        data = write_pairs(tmp_path / f"pairs-{condition_seed}", condition_seed=condition_seed)
        config = pair_config(pipeline_dirs, data, tmp_path / f"out-{condition_seed}", random_flip=True)
        pipe = DreamBoothTrainer(config).train()
        trained.append({k: v for k, v in state_of(pipe.transformer).items() if "lora_B" in k})
        assert (tmp_path / f"out-{condition_seed}" / "pytorch_lora_weights.safetensors").is_file()
    assert any(value.abs().sum() > 0 for value in trained[0].values())
    # Same targets, captions and seed: only the condition images differ, and so does what was learnt.
    assert any(not torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_condition_images_are_cut_with_their_targets(pipeline_dirs, tmp_path):
    from diffusers_dreambooth.data import crop_and_flip, load_subject_photos

    config = pair_config(pipeline_dirs, write_pairs(tmp_path / "pairs"), tmp_path / "out")
    config = config.with_defaults(FluxKontextFamily.option_defaults["lora"])
    photos = load_subject_photos(config, config.subject_data()[0])
    assert photos[0].prompt == "make it sks style 0" and photos[0].condition.size == photos[0].image.size
    pixels, (top, left) = crop_and_flip(photos[0], 32, False, True, torch.Generator().manual_seed(3))
    alone = photos[0].condition
    photos[0].image, photos[0].condition = alone, None
    condition, crop = crop_and_flip(photos[0], 32, False, True, torch.Generator().manual_seed(3))
    assert crop == (top, left) and torch.equal(pixels[3:], condition)


def test_condition_images_need_a_dataset_and_no_prior_preservation(tmp_path):
    with pytest.raises(ValueError, match="cond_image_column"):
        DreamBoothConfig(instance_data_dir="dog", instance_prompt=PROMPT, cond_image_column="condition")
    with pytest.raises(ValueError, match="with_prior_preservation"):
        DreamBoothConfig(
            dataset_name="pairs",
            caption_column="text",
            cond_image_column="condition",
            with_prior_preservation=True,
            class_prompt="a dog",
            class_data_dir=str(tmp_path),
        )


def test_validation_image_is_edited(pipeline_dirs, tmp_path):
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(tmp_path / "cond.png")
    config = pair_config(
        pipeline_dirs,
        write_pairs(tmp_path / "pairs"),
        tmp_path / "out",
        validation_prompt="make it sks style",
        validation_image=str(tmp_path / "cond.png"),
        num_validation_images=1,
        validation_steps=2,
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    inputs = trainer.family.validation_inputs()
    assert inputs["image"].size == (TINY_RESOLUTION, TINY_RESOLUTION) and inputs["_auto_resize"] is False
    written = sorted((tmp_path / "out" / "validation").rglob("*.png"))
    assert written and Image.open(written[0]).size == (TINY_RESOLUTION, TINY_RESOLUTION)


# Defaults and commands


def test_defaults_are_the_scripts():
    for adapter in ("full", "lora"):
        defaults = FluxKontextFamily.option_defaults[adapter]
        assert defaults["learning_rate"] == 1e-4 and defaults["text_encoder_lr"] == 5e-6
        assert defaults["guidance_scale"] == 3.5 and defaults["max_sequence_length"] == 512
        assert defaults["vae_encode_mode"] == "mode" and defaults["weighting_scheme"] == "none"
        assert defaults["adam_weight_decay"] == 1e-4 and defaults["resolution"] == 512
    assert DreamBoothConfig(instance_data_dir="d", instance_prompt=PROMPT).vae_encode_mode is None


def tiny_command(flags: list[str], pipeline_dir: str, tmp_path) -> list[str]:
    """A README command on the tiny model: its model, data and output swapped, 2 steps at 32 px, no Hub, no
    tracker, its 1024-px buckets scaled to the tiny resolution, and no card samples (drawn at the pipeline's
    1024x1024, minutes on the tiny model here)."""
    swapped = {"--pretrained_model_name_or_path", "--max_train_steps", "--resolution", "--report_to", "--output_dir"}
    kept = [f for f in flags if f.split("=")[0] not in swapped and f != "--push_to_hub"]
    kept = ["--aspect_ratio_buckets=32,32;32,48;48,32" if f.startswith("--aspect_ratio_buckets") else f for f in kept]
    return kept + [
        f"--pretrained_model_name_or_path={pipeline_dir}",
        f"--output_dir={tmp_path / 'out'}",
        "--max_train_steps=2",
        "--resolution=32",
        "--report_to=none",
        "--skip_final_inference",
    ]


def test_readme_command_trains_two_steps(pipeline_dirs, tmp_path):
    write_subject_images(tmp_path / "dog")
    flags = tiny_command(readme_command("flux_kontext", tmp_path), pipeline_dirs["flux_kontext"], tmp_path)
    config = parse_config(flags)
    assert config.cond_image_column is None and config.bucket_sizes
    DreamBoothTrainer(config).train()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_readme_image_to_image_command_trains_two_steps(pipeline_dirs, tmp_path):
    # README_flux_kontext.md's image-to-image command (kontext-community/relighting), on a local pair dataset.
    data = write_pairs(tmp_path / "pairs")
    flags = [
        "--adapter=lora",
        f"--dataset_name={data}",
        "--image_column=target",
        "--cond_image_column=condition",
        "--caption_column=instruction",
        "--output_dir=kontext-i2i",
        "--mixed_precision=bf16",
        "--resolution=1024",
        "--train_batch_size=1",
        "--guidance_scale=1",
        "--gradient_accumulation_steps=4",
        "--gradient_checkpointing",
        "--optimizer=adamw",
        "--use_8bit_adam",
        "--cache_latents",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=200",
        "--max_train_steps=1000",
        "--rank=16",
        "--seed=0",
    ]
    config = parse_config(tiny_command(flags, pipeline_dirs["flux_kontext"], tmp_path))
    assert config.cond_image_column == "condition" and config.vae_encode_mode is None
    DreamBoothTrainer(config).train()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
