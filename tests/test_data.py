"""Image loading, resizing, cropping and the seeded training order."""

import json

import numpy as np
import pytest
import torch
from conftest import write_subject_images
from PIL import Image

from diffusers_dreambooth.data import (
    TrainingImage,
    TrainingOrder,
    crop_and_flip,
    has_fixed_crop,
    list_images,
    load_dataset_images,
    load_folder_images,
    load_image,
    mix_seed,
    resize_to_resolution,
    step_generator,
)
from diffusers_dreambooth.safeguards import DreamBoothInputError

EXIF_ORIENTATION = 0x0112
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def training_image(image: Image.Image) -> TrainingImage:
    return TrainingImage(image, "a photo of sks dog", (image.height, image.width), "memory")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Undo `crop_and_flip`'s scaling to [-1, 1], back to an (H, W, 3) uint8 array."""
    return ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_with_orientation(image: Image.Image, path, orientation: int, **kwargs) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, **kwargs)


def marked_image(width: int = 40, height: int = 24) -> Image.Image:
    """Blue, with a red top-left pixel to follow through rotations."""
    image = Image.new("RGB", (width, height), BLUE)
    image.putpixel((0, 0), RED)
    return image


# load_image


def test_load_image_applies_exif_orientation_6_rotating_clockwise(tmp_path):
    path = tmp_path / "rotated.png"
    save_with_orientation(marked_image(), path, orientation=6)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (24, 40)
    assert image.getpixel((23, 0)) == RED
    assert image.getpixel((0, 0)) == BLUE


def test_load_image_applies_exif_orientation_8_rotating_counter_clockwise(tmp_path):
    path = tmp_path / "rotated.png"
    save_with_orientation(marked_image(), path, orientation=8)

    image = load_image(path)

    assert image.size == (24, 40)
    assert image.getpixel((0, 39)) == RED
    assert image.getpixel((0, 0)) == BLUE


def test_load_image_applies_exif_orientation_of_a_jpeg(tmp_path):
    # JPEG is lossy: mark a whole quadrant rather than one pixel.
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 32, 16))
    path = tmp_path / "photo.jpg"
    save_with_orientation(image, path, orientation=6, quality=95)

    loaded = np.asarray(load_image(path)).astype(int)

    assert loaded.shape == (64, 32, 3)
    assert np.abs(loaded[8, 24] - RED).max() < 10
    assert np.abs(loaded[8, 8] - BLUE).max() < 10


def test_load_image_accepts_an_opened_image_and_applies_its_orientation(tmp_path):
    path = tmp_path / "rotated.png"
    save_with_orientation(marked_image(), path, orientation=6)

    with Image.open(path) as opened:
        image = load_image(opened)

    assert image.size == (24, 40)
    assert image.getpixel((23, 0)) == RED


def test_load_image_without_orientation_keeps_the_pixels(tmp_path):
    original = noise_image(20, 12)
    original.save(tmp_path / "plain.png")

    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "plain.png")), np.asarray(original))


def test_load_image_converts_palette_to_rgb(tmp_path):
    image = Image.new("P", (8, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((2, 3), 0)
    image.save(tmp_path / "palette.png")

    loaded = load_image(tmp_path / "palette.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (10, 200, 30)
    assert loaded.getpixel((2, 3)) == (0, 0, 0)


def test_load_image_converts_grayscale_to_rgb(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")

    loaded = load_image(tmp_path / "gray.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == (77, 77, 77)


def test_load_image_composites_alpha_on_white(tmp_path):
    # Cut-out product photos are transparent around the subject: white, not whatever colour hides under alpha 0.
    Image.new("RGBA", (8, 6), (10, 20, 30, 128)).save(tmp_path / "alpha.png")

    loaded = load_image(tmp_path / "alpha.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == (132, 137, 142)


def test_load_image_converts_cmyk_to_rgb(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.tiff")

    loaded = load_image(tmp_path / "cmyk.tiff")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == RED


# resize_to_resolution


@pytest.mark.parametrize(
    "size, resolution, expected",
    [
        ((48, 40), 32, (38, 32)),
        ((40, 48), 32, (32, 38)),
        ((100, 50), 32, (64, 32)),
        ((64, 64), 32, (32, 32)),
        ((16, 20), 32, (32, 40)),
    ],
)
def test_resize_to_resolution_makes_the_shorter_side_the_resolution(size, resolution, expected):
    assert resize_to_resolution(noise_image(*size), resolution).size == expected


def test_resize_to_resolution_returns_the_same_image_when_already_right():
    image = noise_image(38, 32)

    assert resize_to_resolution(image, 32) is image


def test_resize_to_resolution_uses_the_requested_interpolation():
    image = noise_image(64, 64)

    nearest = resize_to_resolution(image, 32, "nearest")

    np.testing.assert_array_equal(np.asarray(nearest), np.asarray(image.resize((32, 32), Image.Resampling.NEAREST)))
    assert not np.array_equal(np.asarray(nearest), np.asarray(resize_to_resolution(image, 32, "bilinear")))


# crop_and_flip


def test_center_crop_returns_the_center_pixels_in_minus_one_to_one():
    image = noise_image(48, 40)

    pixels, (top, left) = crop_and_flip(training_image(image), 32, center_crop=True, random_flip=False, generator=None)

    assert pixels.shape == (3, 32, 32)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert (top, left) == (4, 8)
    np.testing.assert_array_equal(to_uint8(pixels), np.asarray(image)[4:36, 8:40])


def test_crop_without_generator_is_the_center_crop():
    image = training_image(noise_image(48, 40))

    pixels, position = crop_and_flip(image, 32, center_crop=False, random_flip=True, generator=None)
    center, center_position = crop_and_flip(image, 32, center_crop=True, random_flip=False, generator=None)

    assert position == center_position == (4, 8)
    assert torch.equal(pixels, center)


def test_crop_of_a_square_image_at_the_resolution_is_the_whole_image():
    image = noise_image(32, 32)

    pixels, position = crop_and_flip(training_image(image), 32, False, False, seeded(0))

    assert position == (0, 0)
    np.testing.assert_array_equal(to_uint8(pixels), np.asarray(image))


def test_random_crop_is_reproducible_for_a_seed_and_matches_its_position():
    image = noise_image(48, 40)
    array = np.asarray(image)

    first, first_position = crop_and_flip(training_image(image), 32, False, False, seeded(3))
    again, again_position = crop_and_flip(training_image(image), 32, False, False, seeded(3))

    assert first_position == again_position
    assert torch.equal(first, again)
    top, left = first_position
    assert 0 <= top <= 8 and 0 <= left <= 16
    np.testing.assert_array_equal(to_uint8(first), array[top : top + 32, left : left + 32])


def test_random_crop_position_depends_on_the_seed():
    image = training_image(noise_image(48, 40))

    positions = {crop_and_flip(image, 32, False, False, seeded(seed))[1] for seed in range(10)}

    assert len(positions) > 5


def test_random_flip_mirrors_the_crop_and_its_left_offset():
    image = noise_image(48, 40)
    array = np.asarray(image)
    flipped_seeds, kept_seeds = [], []
    for seed in range(20):
        plain, (top, left) = crop_and_flip(training_image(image), 32, False, False, seeded(seed))
        pixels, position = crop_and_flip(training_image(image), 32, False, True, seeded(seed))
        crop = array[top : top + 32, left : left + 32]
        if torch.equal(pixels, plain):
            kept_seeds.append(seed)
            assert position == (top, left)
        else:
            flipped_seeds.append(seed)
            np.testing.assert_array_equal(to_uint8(pixels), np.fliplr(crop))
            assert position == (top, 48 - left - 32)
    assert flipped_seeds and kept_seeds


def test_center_crop_with_random_flip_flips_about_the_center():
    image = noise_image(48, 40)
    center = np.asarray(image)[4:36, 8:40]
    results = [crop_and_flip(training_image(image), 32, True, True, seeded(seed)) for seed in range(20)]
    flipped = [(pixels, position) for pixels, position in results if not np.array_equal(to_uint8(pixels), center)]

    assert 0 < len(flipped) < len(results)
    for pixels, position in flipped:
        np.testing.assert_array_equal(to_uint8(pixels), np.fliplr(center))
        assert position == (4, 48 - 8 - 32)


@pytest.mark.parametrize(
    "size, center_crop, random_flip, expected",
    [
        ((32, 32), False, False, True),
        ((32, 32), True, False, True),
        ((32, 32), False, True, False),
        ((32, 32), True, True, False),
        ((38, 32), False, False, False),
        ((38, 32), True, False, True),
        ((38, 32), False, True, False),
        ((38, 32), True, True, False),
    ],
)
def test_has_fixed_crop(size, center_crop, random_flip, expected):
    assert has_fixed_crop(training_image(noise_image(*size)), 32, center_crop, random_flip) is expected


# Folders


def test_list_images_sorts_and_skips_hidden_partial_and_other_files(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "d.jpeg", ".x.png", ".class_00001.png.partial", "notes.txt", "e.png.tmp"):
        noise_image(4, 4).save(tmp_path / name, format="PNG")
    (tmp_path / "folder.png").mkdir()

    assert [path.name for path in list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp", "d.jpeg"]


def test_list_images_of_a_missing_folder_raises(tmp_path):
    with pytest.raises(DreamBoothInputError, match="missing"):
        list_images(tmp_path / "missing")


def test_load_folder_images_resizes_and_records_original_sizes(instance_dir):
    images = load_folder_images(instance_dir, "a photo of sks dog", 32, "bilinear")

    assert [image.source for image in images] == [str(instance_dir / f"photo_{i}.png") for i in range(4)]
    assert all(image.prompt == "a photo of sks dog" for image in images)
    assert all(image.original_size == (40, 48) for image in images)
    assert all(image.image.size == (38, 32) and image.image.mode == "RGB" for image in images)


def test_load_folder_images_records_the_upright_original_size(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    save_with_orientation(marked_image(width=64, height=48), folder / "portrait.png", orientation=6)

    (image,) = load_folder_images(folder, "a dog", 32, "bilinear")

    assert image.original_size == (64, 48)
    assert image.image.size == (32, 43)


def test_load_folder_images_limit(tmp_path):
    write_subject_images(tmp_path / "photos", count=4)

    images = load_folder_images(tmp_path / "photos", "a dog", 32, "bilinear", limit=2)

    assert [image.source for image in images] == [str(tmp_path / "photos" / f"photo_{i}.png") for i in range(2)]


def test_load_folder_images_of_a_folder_without_images_names_the_folder(tmp_path):
    folder = tmp_path / "empty_subject"
    folder.mkdir()
    (folder / "readme.txt").write_text("photos go here")
    (folder / ".hidden.png").write_bytes(b"")

    with pytest.raises(ValueError, match="empty_subject"):
        load_folder_images(folder, "a dog", 32, "bilinear")


# Datasets


@pytest.fixture
def caption_dataset(tmp_path):
    """A local `imagefolder` dataset: two solid-colour images with a caption each."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = []
    for index, (colour, caption) in enumerate([(RED, "a red sks toy"), (BLUE, "a blue sks toy")]):
        Image.new("RGB", (48, 40), colour).save(folder / f"image_{index}.png")
        rows.append({"file_name": f"image_{index}.png", "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_load_dataset_images_takes_captions_from_the_caption_column(caption_dataset, tmp_path):
    images = load_dataset_images(
        str(caption_dataset), None, "image", "text", None, 32, "bilinear", cache_dir=str(tmp_path / "cache")
    )

    captions = {image.image.getpixel((5, 5)): image.prompt for image in images}
    assert captions == {RED: "a red sks toy", BLUE: "a blue sks toy"}
    assert all(image.image.size == (38, 32) and image.original_size == (40, 48) for image in images)
    assert sorted(image.source for image in images) == [f"{caption_dataset}[0]", f"{caption_dataset}[1]"]


def test_load_dataset_images_without_caption_column_uses_the_instance_prompt(caption_dataset, tmp_path):
    images = load_dataset_images(
        str(caption_dataset), None, "image", None, "a photo of sks toy", 32, "bilinear", str(tmp_path / "cache")
    )

    assert [image.prompt for image in images] == ["a photo of sks toy"] * 2


@pytest.mark.parametrize("image_column, caption_column", [("image", "caption"), ("picture", "text")])
def test_load_dataset_images_with_a_wrong_column_names_it_and_the_real_ones(
    caption_dataset, tmp_path, image_column, caption_column
):
    wrong = caption_column if image_column == "image" else image_column

    with pytest.raises(ValueError, match=f"`{wrong}` not found") as error:
        load_dataset_images(
            str(caption_dataset), None, image_column, caption_column, None, 32, "bilinear", str(tmp_path / "cache")
        )
    assert "image, text" in str(error.value)


# Training order


def test_training_order_covers_every_item_once_per_epoch():
    order = TrainingOrder(num_instance=5, num_class=7, seed=0)
    batch_size, num_batches = 3, 14  # 42 items: 6 epochs of 7

    batches = [order.items(batch, batch_size) for batch in range(num_batches)]
    stream = [item for batch in batches for item in batch]

    assert order.length == 7
    assert all(len(batch) == batch_size for batch in batches)
    epochs = [stream[start : start + order.length] for start in range(0, len(stream), order.length)]
    assert len(epochs) == 6
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert epochs[0] == order.epoch_permutation(0)


def test_training_order_batch_straddling_an_epoch_boundary():
    order = TrainingOrder(num_instance=4, num_class=2, seed=1)

    straddling = order.items(1, 3)  # items 3, 4, 5 of the stream: the last of epoch 0, two of epoch 1

    assert straddling == order.epoch_permutation(0)[3:] + order.epoch_permutation(1)[:2]


def test_training_order_batch_larger_than_an_epoch():
    order = TrainingOrder(num_instance=2, num_class=1, seed=0)

    batch = order.items(0, 5)

    assert len(batch) == 5
    assert sorted(batch[:2]) == sorted(batch[2:4]) == [0, 1]


def test_training_order_is_a_function_of_the_seed():
    def stream(seed):
        order = TrainingOrder(num_instance=6, num_class=6, seed=seed)
        return [order.items(batch, 4) for batch in range(9)]

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)


def test_training_order_does_not_depend_on_the_global_rng():
    order = TrainingOrder(num_instance=6, num_class=3, seed=0)
    torch.manual_seed(0)
    first = order.items(2, 4)
    torch.manual_seed(123)

    assert order.items(2, 4) == first


def test_training_order_pairs_items_with_images_modulo_their_counts():
    order = TrainingOrder(num_instance=3, num_class=5, seed=0)

    assert [order.instance_index(item) for item in range(5)] == [0, 1, 2, 0, 1]
    assert [order.class_index(item) for item in range(5)] == [0, 1, 2, 3, 4]
    assert order.instance_index(7) == 1 and order.class_index(7) == 2


# Seeds


def test_mix_seed_is_deterministic_63_bit_and_sensitive_to_every_input():
    seed = mix_seed(0, 5, salt=2)

    assert seed == mix_seed(0, 5, salt=2)
    assert 0 <= seed < 2**63
    assert len({seed, mix_seed(1, 5, salt=2), mix_seed(0, 6, salt=2), mix_seed(0, 5, salt=3), mix_seed(0, 5, 0)}) == 5


def test_step_generator_draws_repeat_for_a_step_and_differ_across_steps():
    def draws(seed, step):
        return torch.randn(8, generator=step_generator(seed, step))

    assert torch.equal(draws(0, 3), draws(0, 3))
    assert not torch.equal(draws(0, 3), draws(0, 4))
    assert not torch.equal(draws(0, 3), draws(1, 3))
    assert not torch.equal(
        torch.randn(8, generator=step_generator(0, 3, salt=2)), torch.randn(8, generator=step_generator(0, 3, salt=5))
    )
