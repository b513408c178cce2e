"""Aspect-ratio bucketing (`--aspect_ratio_buckets`): the bucket set, each image's bucket and crop, batches of one
bucket, latents and SDXL's size conditioning at the bucket's shape, and exact resumption of bucketed runs."""

import shutil

import pytest
import torch
import yaml
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.data import (
    BucketedTrainingOrder,
    TrainingOrder,
    aspect_ratio_buckets,
    closest_bucket,
    crop_and_flip,
    has_fixed_crop,
    to_training_image,
)
from diffusers_dreambooth.input_checks import check_before_loading
from diffusers_dreambooth.losses import dreambooth_loss
from diffusers_dreambooth.safeguards import DreamBoothInputError

#: The tiny models' buckets at resolution 32 with the default step (32 / 16 = 2 pixels), landscape half.
TINY_LANDSCAPE = [(32, 32), (30, 34), (28, 36), (26, 38), (24, 40), (24, 42), (22, 44)]


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def mixed_photos(directory, sizes=((100, 40), (40, 100), (48, 40), (32, 32)), seed=0):
    """One photo per `(width, height)` in `sizes`, each with its own colour: wide, tall, nearly square, square."""
    for index, size in enumerate(sizes):
        write_subject_images(directory / f"s{index}", count=1, size=size, seed=seed + index)
        (directory / f"s{index}" / "photo_0.png").rename(directory / f"photo_{index}.png")
        (directory / f"s{index}").rmdir()
    return directory


# The bucket set


def test_buckets_at_1024_are_sdxl_sizes_up_to_2_to_1():
    buckets = aspect_ratio_buckets(1024, 64)

    landscape = [(h, w) for h, w in buckets if w >= h]
    assert sorted(landscape, key=lambda b: b[1]) == [
        (1024, 1024),
        (960, 1088),
        (896, 1152),
        (832, 1216),
        (768, 1280),
        (768, 1344),
        (704, 1408),
    ]
    assert {(w, h) for h, w in landscape} <= set(buckets) and len(buckets) == 13
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 for h, w in buckets)
    assert all(h * w >= 0.9 * 1024**2 for h, w in buckets)  # about resolution**2 pixels each
    assert buckets[0] == (704, 1408) and buckets[-1] == (1408, 704)  # widest first


def test_tiny_buckets_and_max_aspect_ratio():
    assert sorted((h, w) for h, w in aspect_ratio_buckets(32, 2) if w >= h) == sorted(TINY_LANDSCAPE)
    assert aspect_ratio_buckets(32, 2, max_aspect_ratio=1.0) == [(32, 32)]
    with pytest.raises(ValueError, match="multiple of the bucket step"):
        aspect_ratio_buckets(30, 4)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((900, 1600), (768, 1344)),  # 16:9 landscape (height, width)
        ((1600, 900), (1344, 768)),  # 9:16 portrait
        ((1000, 1000), (1024, 1024)),  # square
        ((400, 1600), (704, 1408)),  # 4:1, beyond the widest bucket
        ((3000, 4000), (896, 1152)),  # 4:3 (log ratio 0.288; 896x1152 is 0.251 away by 0.036, 832x1216 by 0.092)
    ],
)
def test_closest_bucket_for_wide_tall_and_square_images(size, expected):
    assert closest_bucket(size, aspect_ratio_buckets(1024, 64)) == expected


def test_bucketed_image_is_resized_to_cover_its_bucket_and_cropped_to_it():
    photo = Image.fromarray(torch.arange(40 * 100 * 3).reshape(40, 100, 3).remainder(251).byte().numpy())
    image = to_training_image(photo, "a photo", 32, "bilinear", "wide", aspect_ratio_buckets(32, 2))

    assert image.bucket == (22, 44) and image.original_size == (40, 100)
    assert image.image.size == (55, 22)  # x0.55: the height fits the bucket, the width overhangs by 11 pixels
    pixels, crop = crop_and_flip(image, 32, center_crop=True, random_flip=False, generator=None)
    assert pixels.shape == (3, 22, 44) and crop == (0, 5)
    generator = torch.Generator().manual_seed(0)
    lefts = {crop_and_flip(image, 32, False, False, generator)[1] for _ in range(40)}
    assert {top for top, _ in lefts} == {0} and {left for _, left in lefts} == set(range(12))
    # A flip mirrors the crop: its left edge in the flipped image is 55 - 5 - 44 = 6.
    flips = [crop_and_flip(image, 32, True, True, generator) for _ in range(8)]
    assert {crop for _, crop in flips} == {(0, 5), (0, 6)}
    for flipped, crop in flips:
        assert torch.equal(flipped, pixels if crop == (0, 5) else pixels.flip(-1))
    assert has_fixed_crop(image, 32, center_crop=True, random_flip=False)
    assert not has_fixed_crop(image, 32, center_crop=False, random_flip=False)


# Batches of one bucket


def test_bucketed_order_batches_hold_one_bucket_and_cover_every_image_each_epoch():
    buckets = [(22, 44)] * 5 + [(44, 22)] * 3 + [(32, 32)] * 1
    class_buckets = [(32, 32)] * 2 + [(22, 44)]
    order = BucketedTrainingOrder(buckets, class_buckets, global_batch_size=2, seed=0)

    per_epoch = 3 + 2 + 1  # ceil(5/2) + ceil(3/2) + ceil(1/2) batches
    assert order.length == per_epoch * 2
    for epoch in range(3):
        batches = [order.batch(b, 2) for b in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        instance = [ids for ids, _ in batches]
        assert all(len({buckets[i] for i in ids}) == 1 and len(ids) == 2 for ids in instance)
        assert {i for ids in instance for i in ids} == set(range(9))
        assert sum(len(ids) for ids in instance) == 12  # 9 images, 3 filled in by wrapping inside their bucket
        for _, class_ids in batches:
            assert len(class_ids) == 2 and len({class_buckets[i] for i in class_ids}) == 1
    with pytest.raises(ValueError, match="global batch size"):
        order.batch(0, 4)


def test_bucketed_order_is_a_pure_function_of_seed_and_batch():
    buckets = [(22, 44), (44, 22)] * 4

    def stream(seed, batches):
        order = BucketedTrainingOrder(buckets, [], global_batch_size=2, seed=seed)
        return [order.batch(b, 2) for b in batches]

    assert stream(0, range(20)) == stream(0, range(20))
    assert stream(0, range(20)) != stream(1, range(20))
    assert stream(0, [17, 3]) == [stream(0, range(20))[17], stream(0, range(20))[3]]  # any batch, in any order
    assert all(classes == [] for _, classes in stream(0, range(5)))


def test_unbucketed_order_batch_is_items_paired_as_before():
    order = TrainingOrder(num_instance=3, num_class=5, seed=0)
    items = order.items(2, 4)
    assert order.batch(2, 4) == ([k % 3 for k in items], [k % 5 for k in items])


def test_loss_over_shape_groups_equals_the_loss_over_one_batch():
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 6, 6, generator=generator), torch.randn(4, 4, 6, 6, generator=generator)
    is_prior = torch.tensor([False, False, True, True])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    whole = dreambooth_loss(pred, target, is_prior, 0.7, weights)
    split = dreambooth_loss([pred[:2], pred[2:]], [target[:2], target[2:]], is_prior, 0.7, weights)
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
    # Groups of different shapes: each example's error is its own mean.
    wide, tall = torch.ones(1, 4, 2, 8), torch.ones(1, 4, 8, 2)
    loss = dreambooth_loss([wide * 2, tall * 3], [wide, tall], torch.tensor([False, True]), 1.0)
    assert loss.instance_loss.item() == 1.0 and loss.prior_loss.item() == 4.0


# Options


def test_bucket_options_are_checked(tmp_path):
    base = dict(instance_data_dir=str(tmp_path), instance_prompt="a photo of sks dog")
    with pytest.raises(ValueError, match="bucket_max_aspect_ratio"):
        DreamBoothConfig(**base, aspect_ratio_buckets=True, bucket_max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="bucket_step"):
        DreamBoothConfig(**base, aspect_ratio_buckets=True, bucket_step=0)


SUBJECT_FLAGS = ["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], None),
        (["--aspect_ratio_buckets"], "auto"),  # the switch: buckets computed from --resolution
        (["--aspect_ratio_buckets=true"], "auto"),
        (["--use_aspect_ratio_buckets"], "auto"),  # diffusers' FLUX.2 klein and Z-Image name for the switch
        (["--aspect_ratio_buckets", "32,32; 32,64;64,32"], "32,32;32,64;64,32"),  # diffusers' list, height,width
        (["--use_aspect_ratio_buckets", "--aspect_ratio_buckets=32,32;32,64"], "32,32;32,64"),
    ],
)
def test_aspect_ratio_buckets_is_a_switch_or_diffusers_list(flags, expected):
    config = parse_config(SUBJECT_FLAGS + flags)
    assert config.aspect_ratio_buckets == expected
    sizes = None if expected in (None, "auto") else [tuple(map(int, pair.split(","))) for pair in expected.split(";")]
    assert config.bucket_sizes == sizes


@pytest.mark.parametrize("value, expected", [(True, "auto"), (False, None), ("32,32;32,64", "32,32;32,64")])
def test_config_files_take_the_switch_or_the_list(tmp_path, value, expected):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"instance_data_dir": "dog", "instance_prompt": "a photo of sks dog", "aspect_ratio_buckets": value}
        )
    )
    assert parse_config(["--config", str(path)]).aspect_ratio_buckets == expected


@pytest.mark.parametrize("value", ["32x32", "32,32;", "32,32,32", "0,32", "a,b"])
def test_a_malformed_bucket_list_is_one_error_naming_the_option(capsys, value):
    with pytest.raises(SystemExit) as raised:
        parse_config(SUBJECT_FLAGS + ["--aspect_ratio_buckets", value])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "`--aspect_ratio_buckets`" in error and "height,width" in error


def test_a_bucket_the_model_cannot_take_stops_before_loading_and_in_the_trainer(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos")
    config = tiny_config(pipeline_dirs["sd"], images, tmp_path / "out", aspect_ratio_buckets="32,32;24,47")
    with pytest.raises(DreamBoothInputError, match=r"`--aspect_ratio_buckets` pair `24,47` .* try `24,48`"):
        check_before_loading(config)  # reads the model folder's configs: nothing loads
    with pytest.raises(DreamBoothInputError, match="`24,47`"):
        DreamBoothTrainer(config).train()


def test_training_on_a_listed_bucket_set(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos")  # wide, tall, nearly square, square
    listed = [(32, 32), (24, 48), (48, 24)]  # height, width
    config = bucket_run(
        pipeline_dirs, "sd", images, tmp_path, aspect_ratio_buckets="32,32;24,48;48,24", max_train_steps=2
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    assert trainer.buckets == listed
    assert sorted(image.bucket for image in trainer.instance_images) == sorted(
        [(24, 48), (48, 24), (32, 32), (32, 32)]
    )
    assert trainer.global_step == 2


def test_bucket_step_must_fit_the_model(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos")
    config = tiny_config(pipeline_dirs["sd"], images, tmp_path / "out", aspect_ratio_buckets=True, bucket_step=3)
    with pytest.raises(ValueError, match="bucket_step=3"):
        DreamBoothTrainer(config).train()


def test_deepfloyd_if_refuses_buckets(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos")
    config = tiny_config(pipeline_dirs["if"], images, tmp_path / "out", aspect_ratio_buckets=True)
    with pytest.raises(ValueError, match="aspect_ratio_buckets"):
        DreamBoothTrainer(config).train()


# Training


def record_denoiser_calls(pipeline) -> list[dict]:
    """The sample shape and (SDXL) time ids of every forward of the pipeline's UNet."""
    calls = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        time_ids = kwargs.get("added_cond_kwargs", {}).get("time_ids")
        calls.append({"shape": tuple(sample.shape), "time_ids": None if time_ids is None else time_ids.tolist()})

    pipeline.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def bucket_run(pipeline_dirs, family, images, tmp_path, **overrides):
    options = dict(aspect_ratio_buckets=True, num_validation_images=0, train_batch_size=1, max_train_steps=4)
    return tiny_config(pipeline_dirs[family], images, tmp_path / "out", **{**options, **overrides})


def test_sdxl_time_ids_carry_the_true_size_crop_and_bucket(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos", sizes=((100, 40), (40, 100)))
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sdxl"])
    calls = record_denoiser_calls(pipeline)
    DreamBoothTrainer(bucket_run(pipeline_dirs, "sdxl", images, tmp_path, center_crop=True), pipeline).train()

    # 100x40 -> bucket 22x44 (height x width), resized to 55x22, centre crop at left 5; the tall photo transposed.
    expected = {
        (1, 4, 11, 22): [[40.0, 100.0, 0.0, 5.0, 22.0, 44.0]],
        (1, 4, 22, 11): [[100.0, 40.0, 5.0, 0.0, 44.0, 22.0]],
    }
    assert len(calls) == 4 and {call["shape"] for call in calls} == set(expected)
    for call in calls:
        assert call["time_ids"] == expected[call["shape"]]


def test_latents_have_the_bucket_shape_and_class_images_their_own(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos", sizes=((88, 44), (88, 44), (44, 88), (44, 88)))
    class_dir = write_subject_images(tmp_path / "class", count=2, size=(TINY_RESOLUTION, TINY_RESOLUTION), seed=5)
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    calls = record_denoiser_calls(pipeline)
    config = bucket_run(
        pipeline_dirs,
        "sd",
        images,
        tmp_path,
        train_batch_size=2,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(class_dir),
        num_class_images=2,
    )
    trainer = DreamBoothTrainer(config, pipeline)
    trainer.train()

    # Per step, one call for the subject pair (one bucket, wide or tall) and one for the square class pair.
    shapes = [call["shape"] for call in calls]
    assert len(shapes) == 8
    assert shapes[1::2] == [(2, 4, 16, 16)] * 4
    assert set(shapes[0::2]) == {(2, 4, 11, 22), (2, 4, 22, 11)}
    cached = {tuple(mean.shape) for mean in trainer.instance_latents.mean if mean is not None}
    assert cached == {(4, 11, 22), (4, 22, 11)}  # the photos fit their buckets exactly: latents cached per shape
    assert (
        "| aspect-ratio buckets (most elongated long/short side) | 2 |" in (tmp_path / "out" / "README.md").read_text()
    )


@pytest.mark.parametrize(
    "family, adapter, extra",
    [
        ("sd", "full", {}),
        ("sd", "lora", {}),
        ("sdxl", "full", {}),
        ("sdxl", "lora", {}),
        # Two bucketed micro-batches per step, and random flips: crops are encoded every step.
        ("sd", "full", {"gradient_accumulation_steps": 2, "random_flip": True}),
    ],
)
def test_bucketed_run_trains_and_resumes_exactly(pipeline_dirs, tmp_path, family, adapter, extra):
    images = mixed_photos(tmp_path / "photos")
    # Class photos of mixed shapes too: a batch's class bucket is sometimes its subject bucket, sometimes not.
    class_dir = mixed_photos(tmp_path / "class", seed=7)
    options = dict(
        adapter=adapter,
        train_batch_size=2,
        max_train_steps=4,
        checkpointing_steps=2,
        lr_scheduler="linear",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(class_dir),
        num_class_images=4,
        **extra,
    )
    if adapter == "lora":
        options["rank"] = 4
    base = state_of(DiffusionPipeline.from_pretrained(pipeline_dirs[family]).unet)
    unbroken = DreamBoothTrainer(bucket_run(pipeline_dirs, family, images, tmp_path, **options)).train()
    expected = state_of(unbroken.unet)
    moved = [k for k in expected if "lora_B" in k or k in base and not torch.equal(base[k], expected[k])]
    assert moved and all(torch.isfinite(expected[k]).all() for k in moved)

    out = tmp_path / "out"  # a run that died after its step-2 checkpoint
    for path in out.iterdir():
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    config = bucket_run(pipeline_dirs, family, images, tmp_path, resume_from_checkpoint="latest", **options)
    resumed = state_of(DreamBoothTrainer(config).train().unet)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.slow
def test_two_processes_match_one_with_buckets(pipeline_dirs, tmp_path):
    from safetensors.torch import load_file
    from test_launch import DOUBLE, SINGLE, diffusers_flags, launch

    images = mixed_photos(tmp_path / "photos")
    class_dir = mixed_photos(tmp_path / "class", seed=7)  # four class photos: none to generate
    flags = ["--aspect_ratio_buckets", "--num_validation_images=0"]
    launch(SINGLE, diffusers_flags(pipeline_dirs["sd"], images, class_dir, tmp_path / "one", batch_size=2) + flags)
    two = diffusers_flags(pipeline_dirs["sd"], images, class_dir, tmp_path / "two", batch_size=1) + flags
    launch(DOUBLE, two, env={"ACCELERATE_USE_CPU": "1"})
    one = load_file(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors")
    two = load_file(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4)


def test_flux_and_sd3_train_with_buckets(pipeline_dirs, tmp_path):
    images = mixed_photos(tmp_path / "photos")
    flux = DreamBoothTrainer(
        bucket_run(pipeline_dirs, "flux", images, tmp_path, train_batch_size=2, max_train_steps=2)
    )
    flux.train()  # Flux packs any even latent grid: 2x2-patch multiples of 4 pixels, here up to 40x24
    assert {image.bucket for image in flux.instance_images} == {(24, 40), (40, 24), (28, 36), (32, 32)}
    # The tiny SD3 transformer's positional embedding covers 8x8 patches, the 32-pixel square only.
    sd3 = bucket_run(pipeline_dirs, "sd3", images, tmp_path / "sd3", train_batch_size=2, max_train_steps=2)
    with pytest.raises(ValueError, match="pos_embed_max_size=8"):
        DreamBoothTrainer(sd3).train()
    sd3_24 = bucket_run(pipeline_dirs, "sd3", images, tmp_path / "sd3_24", resolution=24, max_train_steps=2)
    trainer = DreamBoothTrainer(sd3_24)
    trainer.train()
    assert max(max(bucket) for bucket in trainer.buckets) == 32  # 16 latents, 8 patches: within the embedding
