"""Bad input images: each is loaded correctly, skipped with a warning, or stopped with an error naming the file.

The corpus is made here in `tmp_path` with PIL and numpy, one case per test.
"""

import logging
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffusers_dreambooth.data import (
    UnreadableImageError,
    check_image_folder,
    load_folder_images,
    load_image,
    to_training_image,
)
from diffusers_dreambooth.safeguards import DreamBoothInputError

EXIF_ORIENTATION = 0x0112
WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)
PROMPT = "a photo of sks dog"
RESOLUTION = 16


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Random RGB pixels: they compress badly, so half of the file is half of the pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_good(directory, name: str = "good.png") -> None:
    noise_image().save(directory / name)


def close_to(pixel, expected, tolerance: int = 8) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(pixel, expected)) <= tolerance


@pytest.fixture(autouse=True)
def strict_truncation(monkeypatch):
    """PIL's default: a truncated file is an error, whatever another test or library may have set."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


# Load correctly, to RGB


def test_rgba_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    image.putpixel((1, 1), (*RED, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    image.save(tmp_path / "cutout.png")

    loaded = load_image(tmp_path / "cutout.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 1)) == RED
    assert close_to(loaded.getpixel((2, 2)), (127, 127, 127), tolerance=1)


def test_la_transparent_pixels_become_white(tmp_path):
    image = Image.new("LA", (8, 6), (0, 0))
    image.putpixel((1, 1), (40, 255))
    image.save(tmp_path / "gray_alpha.png")

    loaded = load_image(tmp_path / "gray_alpha.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 1)) == (40, 40, 40)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 6), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "palette_alpha.png", transparency=0)

    loaded = load_image(tmp_path / "palette_alpha.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 1)) == BLUE


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)

    loaded = load_image(tmp_path / "cmyk.jpg")

    assert loaded.mode == "RGB"
    assert close_to(loaded.getpixel((8, 8)), RED)


def test_palette_png_loads_its_colors(tmp_path):
    image = Image.new("P", (8, 6), 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.putpixel((2, 3), 0)
    image.save(tmp_path / "palette.png")

    loaded = load_image(tmp_path / "palette.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == BLUE
    assert loaded.getpixel((2, 3)) == RED


def test_grayscale_loads_as_gray_rgb(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")

    loaded = load_image(tmp_path / "gray.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == (77, 77, 77)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "depth16.png")
    with Image.open(tmp_path / "depth16.png") as opened:
        assert opened.mode.startswith("I")

    loaded = load_image(tmp_path / "depth16.png")

    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128,) * 3, WHITE, (4, 4, 4)]


def test_32_bit_integer_image_in_memory_is_scaled_as_16_bit():
    # A `datasets` row gives an opened PIL image rather than a path.
    image = Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32))
    assert image.mode == "I"

    loaded = load_image(image)

    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (10, 10, 10), WHITE]


def test_1_bit_image_loads_as_black_and_white(tmp_path):
    image = Image.new("1", (8, 6), 0)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "bilevel.png")

    loaded = load_image(tmp_path / "bilevel.png")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((1, 1)) == WHITE


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_is_loaded_upright(tmp_path, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    noise_image(40, 24).save(tmp_path / "rotated.jpg", exif=exif)

    assert load_image(tmp_path / "rotated.jpg").size == (24, 40)


def test_animated_gif_uses_its_first_frame_with_a_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 6), RED), Image.new("RGB", (8, 6), BLUE)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    with caplog.at_level(logging.WARNING):
        loaded = load_image(tmp_path / "animated.gif")

    assert loaded.mode == "RGB"
    assert loaded.getpixel((3, 3)) == RED
    assert "animated.gif` is animated; using its first frame" in caplog.text


def test_animated_image_in_memory_uses_its_first_frame(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 6), RED), Image.new("RGB", (8, 6), BLUE)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    with Image.open(tmp_path / "animated.gif") as opened, caplog.at_level(logging.WARNING):
        opened.seek(1)
        loaded = to_training_image(opened, PROMPT, 6, "bilinear", "my_dataset[3]")

    assert loaded.image.getpixel((3, 3)) == RED
    assert "`my_dataset[3]` is animated; using its first frame" in caplog.text


# Load and upscale, with a warning


def test_image_smaller_than_the_resolution_is_upscaled_with_a_warning(tmp_path, caplog):
    noise_image(40, 30).save(tmp_path / "tiny.png")

    with caplog.at_level(logging.WARNING):
        (loaded,) = load_folder_images(tmp_path, PROMPT, 64, "bilinear")

    assert loaded.image.size == (85, 64)
    assert loaded.original_size == (30, 40)
    assert "tiny.png` is 40x30 pixels, smaller than the training resolution 64; it will be upscaled" in caplog.text


def test_image_at_the_resolution_gives_no_warning(tmp_path, caplog):
    noise_image(40, 30).save(tmp_path / "fine.png")

    with caplog.at_level(logging.WARNING):
        load_folder_images(tmp_path, PROMPT, 30, "bilinear")

    assert caplog.text == ""


# Skip with a warning; training goes on with the other images


def zero_bytes(path) -> None:
    path.write_bytes(b"")


def truncated(path) -> None:
    noise_image().save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def text_file(path) -> None:
    path.write_text("This is not a photo, just text with a .jpg name.\n")


def random_bytes(path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


UNREADABLE = [
    pytest.param(zero_bytes, "empty.png", id="zero-byte"),
    pytest.param(truncated, "cut.png", id="truncated-png"),
    pytest.param(truncated, "cut.jpg", id="truncated-jpeg"),
    pytest.param(text_file, "photo.jpg", id="text-named-jpg"),
    pytest.param(random_bytes, "noise.webp", id="unidentifiable"),
]


@pytest.mark.parametrize("make, name", UNREADABLE)
def test_load_image_raises_a_value_error_naming_an_unreadable_file(tmp_path, make, name):
    make(tmp_path / name)

    with pytest.raises(UnreadableImageError, match=re.escape(name)) as raised:
        load_image(tmp_path / name)

    assert isinstance(raised.value, ValueError)
    assert "not a readable image" in str(raised.value)


@pytest.mark.parametrize("make, name", UNREADABLE)
def test_folder_skips_an_unreadable_file_with_a_warning(tmp_path, caplog, make, name):
    write_good(tmp_path)
    make(tmp_path / name)

    with caplog.at_level(logging.WARNING):
        images = load_folder_images(tmp_path, PROMPT, RESOLUTION, "bilinear")

    assert [image.source for image in images] == [str(tmp_path / "good.png")]
    assert f"Skipping `{tmp_path / name}`: not a readable image (" in caplog.text
    assert "Remove or replace it." in caplog.text


def test_folder_with_a_limit_still_returns_limit_readable_images(tmp_path, caplog):
    for name in ("a.png", "c.png", "e.png"):
        write_good(tmp_path, name)
    zero_bytes(tmp_path / "b.png")
    text_file(tmp_path / "d.jpg")

    with caplog.at_level(logging.WARNING):
        images = load_folder_images(tmp_path, PROMPT, RESOLUTION, "bilinear", limit=3)

    assert [image.source for image in images] == [str(tmp_path / name) for name in ("a.png", "c.png", "e.png")]
    assert "b.png" in caplog.text and "d.jpg" in caplog.text


# Stop with an error naming the file or folder


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DreamBoothInputError, match=r"`.*no_such_folder` does not exist\. Create it or fix the path\."):
        load_folder_images(tmp_path / "no_such_folder", PROMPT, RESOLUTION, "bilinear")


@pytest.mark.parametrize("contents", [[], ["notes.txt", "readme.md"]], ids=["empty", "only-non-images"])
def test_folder_without_images_is_an_error(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_text("not an image")

    with pytest.raises(DreamBoothInputError, match=f"No images found in `{re.escape(str(tmp_path))}`"):
        load_folder_images(tmp_path, PROMPT, RESOLUTION, "bilinear")


def test_folder_where_every_file_is_unreadable_is_an_error(tmp_path):
    zero_bytes(tmp_path / "empty.png")
    text_file(tmp_path / "photo.jpg")

    with pytest.raises(DreamBoothInputError, match=re.escape(f"`{tmp_path}` could be read (empty.png, photo.jpg)")):
        load_folder_images(tmp_path, PROMPT, RESOLUTION, "bilinear")


def png_declaring_size(path, width: int, height: int) -> None:
    """A real 1x1 PNG whose header claims `width`x`height`: PIL's size check fires before any decoding."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    # Signature (8 bytes), IHDR length (4) and type (4), then width and height, then the rest of IHDR and its CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_an_error_naming_the_file(tmp_path):
    png_declaring_size(tmp_path / "bomb.png", 100_000, 100_000)

    too_large = r"bomb\.png` is too large to decode safely: .*10000000000 pixels"
    with pytest.raises(DreamBoothInputError, match=too_large) as raised:
        load_image(tmp_path / "bomb.png")

    assert "Downscale the photo" in str(raised.value)
    assert not isinstance(raised.value, UnreadableImageError)


def test_decompression_bomb_in_a_folder_stops_rather_than_skips(tmp_path):
    write_good(tmp_path)
    png_declaring_size(tmp_path / "bomb.png", 100_000, 100_000)

    with pytest.raises(ValueError, match=r"bomb\.png` is too large"):
        load_folder_images(tmp_path, PROMPT, RESOLUTION, "bilinear")
    with pytest.raises(DreamBoothInputError, match=r"bomb\.png` is too large"):
        check_image_folder(tmp_path)  # the same, before any model loads


def test_folder_check_before_loading_passes_a_folder_with_one_readable_photo_quietly(tmp_path, caplog):
    write_good(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        check_image_folder(tmp_path)  # `load_folder_images` warns about `empty.png` later, once
    assert caplog.text == ""
    (tmp_path / "good.png").unlink()
    with pytest.raises(DreamBoothInputError, match=re.escape(f"`{tmp_path}` could be read (empty.png)")):
        check_image_folder(tmp_path)


@pytest.mark.parametrize("side", [12, 200], ids=["warning-between-1x-and-2x-the-limit", "error-above-2x"])
def test_image_over_the_pixel_limit_is_an_error(tmp_path, monkeypatch, side):
    noise_image(side, side).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    with pytest.raises(ValueError, match=rf"big\.png` is too large to decode safely: .*{side * side} pixels"):
        load_image(tmp_path / "big.png")


def test_pixel_limit_warning_stays_a_warning_outside_image_loading(tmp_path, monkeypatch):
    noise_image(12, 12).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError):
        load_image(tmp_path / "big.png")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(tmp_path / "big.png").close()

    assert [warning.category for warning in caught] == [Image.DecompressionBombWarning]
