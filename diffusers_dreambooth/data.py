"""Subject and class images: loading, resizing, cropping, and the order in which they are trained.

Images are decoded once (EXIF orientation applied, converted to RGB), resized so the shorter side equals the
training resolution, and kept in memory: a DreamBooth subject is a handful of photos and a few hundred class images.

Bad input is decided before the first training step, never deep inside PIL or torch: transparent pixels become
white, 16-bit images are scaled to 8 bits, animated images give their first frame, images smaller than the
resolution are upscaled with a warning, unreadable files in a folder are skipped with a warning, and decompression
bombs, missing or empty folders (or folders where nothing is readable) stop with an error naming the file or folder.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# What PIL raises for files it cannot identify or decode (truncated, corrupt, not an image, unsupported mode).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass
class TrainingImage:
    """One training image, resized so that its shorter side is the training resolution."""

    image: Image.Image
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resizing, for SDXL's size conditioning
    source: str  # file path or dataset row, for messages


class UnreadableImageError(ValueError):
    """A file that is not a readable image (empty, truncated, corrupt or not an image); folders skip these."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"`{source}` is not a readable image ({reason}). Remove or replace it.")
        self.source = source
        self.reason = reason


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name; hidden and partial files are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Image folder `{directory}` does not exist. Create it or fix the path.")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image with its EXIF orientation applied, transparency on white, 16-bit scaled to 8-bit.

    Raises `UnreadableImageError` (a `ValueError`) naming the path if the file cannot be decoded, and a `ValueError`
    if it is a decompression bomb (more pixels than `PIL.Image.MAX_IMAGE_PIXELS`).
    """
    source = str(getattr(image, "filename", "") or "in-memory image") if isinstance(image, Image.Image) else str(image)
    return decode_image(image, source)


def decode_image(image: str | Path | Image.Image, source: str) -> Image.Image:
    """`load_image` with `source` naming the image in warnings and errors (a dataset row has no path)."""
    if isinstance(image, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(first_frame(image, source)))
        except DECODE_ERRORS as error:
            raise UnreadableImageError(source, describe(error)) from error
    try:
        # Images between 1x and 2x PIL's pixel limit only warn; they are as dangerous, so make them errors too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image) as opened:
                frame = first_frame(opened, source)
                frame.load()  # decode every byte now, so a truncated file fails here rather than later
                return to_rgb(ImageOps.exif_transpose(frame))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"`{source}` is too large to decode safely: {error} Downscale the photo (for example to at most 4096"
            " pixels on its longer side) and retry, or, if you trust the file, raise `PIL.Image.MAX_IMAGE_PIXELS` in"
            " your script."
        ) from error
    except UnidentifiedImageError as error:
        empty = Path(image).is_file() and Path(image).stat().st_size == 0
        reason = "the file is empty" if empty else "PIL does not recognize its format"
        raise UnreadableImageError(source, reason) from error
    except DECODE_ERRORS as error:
        raise UnreadableImageError(source, describe(error)) from error


def first_frame(image: Image.Image, source: str) -> Image.Image:
    """The first frame of an animated or multi-frame image (with a warning), else the image itself."""
    if getattr(image, "is_animated", False):
        logger.warning("`%s` is animated; using its first frame.", source)
        if image.tell() != 0:
            image.seek(0)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels: transparency composited onto white, 16-bit grayscale scaled so that 65535 becomes 255."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def describe(error: BaseException) -> str:
    """The error's type and message on one line: the reason given in warnings and errors."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def resize_to_resolution(image: Image.Image, resolution: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so that the shorter side equals `resolution`, keeping the aspect ratio."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, RESAMPLING[interpolation])


def to_training_image(
    image: str | Path | Image.Image, prompt: str, resolution: int, interpolation: str, source: str
) -> TrainingImage:
    """Decode and resize one image; an image smaller than `resolution` is upscaled, with a warning."""
    rgb = decode_image(image, source)
    if min(rgb.size) < resolution:
        logger.warning(
            "`%s` is %dx%d pixels, smaller than the training resolution %d; it will be upscaled and training quality"
            " suffers. Use a larger photo if you have one.",
            source,
            rgb.width,
            rgb.height,
            resolution,
        )
    return TrainingImage(resize_to_resolution(rgb, resolution, interpolation), prompt, (rgb.height, rgb.width), source)


def crop_and_flip(
    image: TrainingImage, resolution: int, center_crop: bool, random_flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A `(3, resolution, resolution)` tensor in [-1, 1] and the crop's (top, left), as SDXL conditions on it.

    Random crop positions and flips are drawn from `generator`, so they are reproducible per step.
    """
    width, height = image.image.size
    if center_crop or generator is None:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    crop = image.image.crop((left, top, left + resolution, top + resolution))
    if random_flip and generator is not None and bool(torch.rand(1, generator=generator) < 0.5):
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (top, left)


def has_fixed_crop(image: TrainingImage, resolution: int, center_crop: bool, random_flip: bool) -> bool:
    """Whether every step sees the same pixels of this image, so its latents can be computed once."""
    return not random_flip and (center_crop or image.image.size == (resolution, resolution))


def load_folder_images(
    directory: str | Path, prompt: str, resolution: int, interpolation: str, limit: int | None = None
) -> list[TrainingImage]:
    """The images of a folder (the first `limit` readable ones by name), all with the same prompt.

    Unreadable files are skipped with a warning, so one bad photo does not stop training; a folder in which nothing
    is readable is an error.
    """
    paths = list_images(directory)
    if not paths or limit == 0:
        raise ValueError(
            f"No images found in `{directory}` (looked for {', '.join(IMAGE_EXTENSIONS)}). Put the photos there."
        )
    images, skipped = [], []
    for path in paths:
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(to_training_image(path, prompt, resolution, interpolation, str(path)))
        except UnreadableImageError as error:
            logger.warning("Skipping `%s`: not a readable image (%s). Remove or replace it.", path, error.reason)
            skipped.append(path.name)
    if not images:
        raise ValueError(
            f"None of the images in `{directory}` could be read ({', '.join(skipped)}); they are empty, truncated"
            " or not images. Replace them with readable photos."
        )
    return images


def load_dataset_images(
    dataset_name: str,
    config_name: str | None,
    image_column: str,
    caption_column: str | None,
    instance_prompt: str | None,
    resolution: int,
    interpolation: str,
    cache_dir: str | None = None,
) -> list[TrainingImage]:
    """The `train` split of a `datasets` dataset (Hub id or local folder), captions from `caption_column`."""
    from datasets import load_dataset

    dataset = load_dataset(dataset_name, config_name, cache_dir=cache_dir)["train"]
    for column in (image_column, caption_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"Column `{column}` not found in dataset `{dataset_name}`; its columns are"
                f" {', '.join(dataset.column_names)}. Set `--image_column`/`--caption_column`."
            )
    images = []
    for index, row in enumerate(dataset):
        prompt = row[caption_column] if caption_column else instance_prompt
        source = f"{dataset_name}[{index}]"
        images.append(to_training_image(row[image_column], prompt, resolution, interpolation, source))
    return images


class TrainingOrder:
    """Which subject and class image each example of each step uses: a pure function of (seed, step).

    Items `k = 0 .. len - 1` pair subject image `k % num_instance` with class image `k % num_class`, as diffusers'
    DreamBooth dataset does. The items of all epochs form one stream, each epoch in its own seeded permutation, cut
    into global batches of `global_batch_size`; so a resumed run, or a run on more processes, sees the same data.
    """

    def __init__(self, num_instance: int, num_class: int, seed: int) -> None:
        self.num_instance = num_instance
        self.num_class = num_class
        self.seed = seed
        self.length = max(num_instance, num_class)
        self._permutations: dict[int, list[int]] = {}

    def epoch_permutation(self, epoch: int) -> list[int]:
        """The order of epoch `epoch`'s items; the two latest epochs are kept, not drawn again at every step."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, salt=1))
            self._permutations = {
                **{e: p for e, p in self._permutations.items() if e == epoch - 1},
                epoch: torch.randperm(self.length, generator=generator).tolist(),
            }
        return self._permutations[epoch]

    def items(self, batch_index: int, global_batch_size: int) -> list[int]:
        """Item ids of global batch number `batch_index`."""
        start = batch_index * global_batch_size
        stop = start + global_batch_size
        items = []
        for epoch in range(start // self.length, math.ceil(stop / self.length)):
            permutation = self.epoch_permutation(epoch)
            lo = max(start - epoch * self.length, 0)
            hi = min(stop - epoch * self.length, self.length)
            items.extend(permutation[lo:hi])
        return items

    def instance_index(self, item: int) -> int:
        return item % self.num_instance

    def class_index(self, item: int) -> int:
        return item % self.num_class


def mix_seed(seed: int, *values: int, salt: int = 0) -> int:
    """A 63-bit seed derived from `seed` and integers, so each step/epoch/purpose has its own stream."""
    mixed = (seed * 0x9E3779B97F4A7C15 + salt) & ((1 << 64) - 1)
    for value in values:
        mixed = ((mixed ^ value) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    return mixed >> 1


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", salt: int = 2) -> torch.Generator:
    """A generator for the random draws of micro-step `step` (noise, timesteps, crops)."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, salt=salt))
