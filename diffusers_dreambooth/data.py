"""Subject and class images: loading, resizing, cropping, and the order in which they are trained.

Images are decoded once (EXIF orientation applied, converted to RGB), resized so the shorter side equals the
training resolution, and kept in memory: a DreamBooth subject is a handful of photos and a few hundred class images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

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


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name; hidden and partial files are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Image folder `{directory}` does not exist.")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image with its EXIF orientation applied."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    with Image.open(image) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


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
    rgb = load_image(image)
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
    """The images of a folder, all with the same prompt."""
    paths = list_images(directory)[:limit]
    if not paths:
        raise ValueError(
            f"No images found in `{directory}` (looked for {', '.join(IMAGE_EXTENSIONS)}). Put the photos there."
        )
    return [to_training_image(path, prompt, resolution, interpolation, str(path)) for path in paths]


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

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, salt=1))
        return torch.randperm(self.length, generator=generator)

    def items(self, batch_index: int, global_batch_size: int) -> list[int]:
        """Item ids of global batch number `batch_index`."""
        start = batch_index * global_batch_size
        stop = start + global_batch_size
        items = []
        for epoch in range(start // self.length, math.ceil(stop / self.length)):
            permutation = self.epoch_permutation(epoch).tolist()
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
