"""Subject and class images: loading, resizing, cropping, and the order in which they are trained.

Images are decoded once (EXIF orientation applied, converted to RGB), resized so the shorter side equals the
training resolution, and kept in memory: a DreamBooth subject is a handful of photos and a few hundred class images.

Bad input is decided before the first training step, never deep inside PIL or torch: transparent pixels become
white, 16-bit images are scaled to 8 bits, animated images give their first frame, images smaller than the
resolution are upscaled with a warning, unreadable files in a folder are skipped with a warning, and decompression
bombs, missing or empty folders (or folders where nothing is readable) stop with an error naming the file or folder.

With aspect-ratio bucketing (`--aspect_ratio_buckets`), each image is instead assigned the bucket (a height and width
of about `resolution**2` pixels, see `aspect_ratio_buckets`, or one of an explicit list) closest to its aspect ratio,
resized to cover it, and cropped to it rather than to a square; `BucketedTrainingOrder` then builds every batch from
one bucket.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .safeguards import DreamBoothInputError

if TYPE_CHECKING:
    from .config import DreamBoothConfig, SubjectData

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
    """One training image, resized so that its shorter side is the training resolution, or, with a `bucket`, so
    that it covers the bucket."""

    image: Image.Image
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resizing, for SDXL's size conditioning
    source: str  # file path or dataset row, for messages
    bucket: tuple[int, int] | None = None  # (height, width) it is cropped to; None: a `resolution` square
    subject: int = 0  # which subject of the run (`--concepts_list` entry) the image belongs to
    # Image-to-image (`--cond_image_column`): the example's condition image, resized to `image`'s size so that every
    # crop and flip cuts both alike; `crop_and_flip` returns it as 3 more channels.
    condition: Image.Image | None = None

    def crop_size(self, resolution: int) -> tuple[int, int]:
        """(height, width) of this image's training crop: its bucket, else the `resolution` square."""
        return self.bucket or (resolution, resolution)


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
        raise DreamBoothInputError(f"Image folder `{directory}` does not exist. Create it or fix the path.")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB image with its EXIF orientation applied, transparency on white, 16-bit scaled to 8-bit.

    Raises `UnreadableImageError` (a `ValueError`) naming the path if the file cannot be decoded, and a
    `DreamBoothInputError` if it is a decompression bomb (more pixels than `PIL.Image.MAX_IMAGE_PIXELS`).
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
        raise DreamBoothInputError(
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


def aspect_ratio_buckets(resolution: int, step: int, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """The bucket sizes `(height, width)` for `resolution`: SDXL-style sizes of at most `resolution**2` pixels.

    Widths go up from `resolution` in multiples of `step`; each gets the largest height, a multiple of `step`, that
    keeps `height * width <= resolution**2`, while `width / height <= max_aspect_ratio`. The portrait buckets are
    their transposes. At 1024 with a step of 64 this gives (width x height) 1024x1024, 1088x960, 1152x896, 1216x832,
    1280x768, 1344x768 and 1408x704 (SDXL's 1152x896, 1216x832 and 1344x768 among them) and their transposes.
    Sorted by aspect ratio (height / width: widest first), then by size.

    Args:
        resolution (`int`): the side of the square bucket; a multiple of `step`.
        step (`int`): what every side is a multiple of (at least the family's `resolution_multiple`).
        max_aspect_ratio (`float`, *optional*, defaults to `2.0`): the most elongated bucket's long / short side.
    """
    if resolution % step:
        raise ValueError(f"`--resolution={resolution}` must be a multiple of the bucket step {step}.")
    landscape = []
    width = resolution
    while True:
        height = resolution * resolution // width // step * step
        if height < step or width / height > max_aspect_ratio:
            break
        landscape.append((height, width))
        width += step
    buckets = set(landscape) | {(w, h) for h, w in landscape}
    return sorted(buckets, key=lambda size: (size[0] / size[1], size))


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to that of `size` `(height, width)` (in log ratio, so 2:1 and 1:2
    are as far from square); ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def resize_to_cover(image: Image.Image, size: tuple[int, int], interpolation: str = "bilinear") -> Image.Image:
    """Resize, keeping the aspect ratio, to the smallest size that covers `size` `(height, width)`."""
    width, height = image.size
    scale = max(size[0] / height, size[1] / width)
    covering = (max(size[1], round(width * scale)), max(size[0], round(height * scale)))
    if covering == image.size:
        return image
    return image.resize(covering, RESAMPLING[interpolation])


def to_training_image(
    image: str | Path | Image.Image,
    prompt: str,
    resolution: int,
    interpolation: str,
    source: str,
    buckets: list[tuple[int, int]] | None = None,
) -> TrainingImage:
    """Decode and resize one image; an image smaller than `resolution` (or than its bucket) is upscaled, with a
    warning. With `buckets`, the image gets the closest bucket and is resized to cover it."""
    rgb = decode_image(image, source)
    bucket = closest_bucket((rgb.height, rgb.width), buckets) if buckets else None
    if bucket is None and min(rgb.size) < resolution:
        logger.warning(
            "`%s` is %dx%d pixels, smaller than the training resolution %d; it will be upscaled and training quality"
            " suffers. Use a larger photo if you have one.",
            source,
            rgb.width,
            rgb.height,
            resolution,
        )
    elif bucket is not None and (rgb.height < bucket[0] or rgb.width < bucket[1]):
        logger.warning(
            "`%s` is %dx%d pixels, smaller than its aspect-ratio bucket %dx%d; it will be upscaled and training"
            " quality suffers. Use a larger photo if you have one.",
            source,
            rgb.width,
            rgb.height,
            bucket[1],
            bucket[0],
        )
    if bucket is None:
        resized = resize_to_resolution(rgb, resolution, interpolation)
    else:
        resized = resize_to_cover(rgb, bucket, interpolation)
    return TrainingImage(resized, prompt, (rgb.height, rgb.width), source, bucket)


def crop_and_flip(
    image: TrainingImage, resolution: int, center_crop: bool, random_flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A `(3, resolution, resolution)` tensor in [-1, 1] (`(3, *image.bucket)` for a bucketed image) and the crop's
    (top, left), as SDXL conditions on it; 6 channels for an image with a `condition`, cut alike (condition last).

    Random crop positions and flips are drawn from `generator`, so they are reproducible per step.
    """
    width, height = image.image.size
    crop_height, crop_width = image.crop_size(resolution)
    if center_crop or generator is None:
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    else:
        top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
    pictures = [im for im in (image.image, image.condition) if im is not None]
    crops = [picture.crop((left, top, left + crop_width, top + crop_height)) for picture in pictures]
    if random_flip and generator is not None and bool(torch.rand(1, generator=generator) < 0.5):
        crops = [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for crop in crops]
        left = width - left - crop_width
    arrays = [np.asarray(crop, dtype=np.float32) for crop in crops]
    pixels = torch.from_numpy(np.concatenate(arrays, axis=2)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (top, left)


def has_fixed_crop(image: TrainingImage, resolution: int, center_crop: bool, random_flip: bool) -> bool:
    """Whether every step sees the same pixels of this image, so its latents can be computed once."""
    crop_height, crop_width = image.crop_size(resolution)
    return not random_flip and (center_crop or image.image.size == (crop_width, crop_height))


def load_folder_images(
    directory: str | Path,
    prompt: str,
    resolution: int,
    interpolation: str,
    limit: int | None = None,
    buckets: list[tuple[int, int]] | None = None,
) -> list[TrainingImage]:
    """The images of a folder (the first `limit` readable ones by name), all with the same prompt; with `buckets`,
    each in its closest bucket.

    Unreadable files are skipped with a warning, so one bad photo does not stop training; a folder in which nothing
    is readable is an error.
    """
    paths = folder_image_paths(directory, limit)
    images, skipped = [], []
    for path in paths:
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(to_training_image(path, prompt, resolution, interpolation, str(path), buckets))
        except UnreadableImageError as error:
            logger.warning("Skipping `%s`: not a readable image (%s). Remove or replace it.", path, error.reason)
            skipped.append(path.name)
    if not images:
        raise nothing_readable_error(directory, skipped)
    return images


def check_image_folder(directory: str | Path) -> None:
    """Raise what `load_folder_images` would for `directory`, without keeping the images: a missing folder, one
    without image files, a decompression bomb, or nothing readable. Every image is decoded (only decoding finds a
    truncated file); unreadable ones are left for `load_folder_images` to warn about.

    Run before any model is loaded, so that a bad folder fails in seconds rather than after the model loads.
    """
    paths = folder_image_paths(directory)
    skipped = []
    for path in paths:
        try:
            decode_image(path, str(path))
        except UnreadableImageError:
            skipped.append(path.name)
    if len(skipped) == len(paths):
        raise nothing_readable_error(directory, skipped)


def folder_image_paths(directory: str | Path, limit: int | None = None) -> list[Path]:
    """`list_images(directory)`; an error naming the folder if it holds none (or `limit` is 0)."""
    paths = list_images(directory)
    if not paths or limit == 0:
        raise DreamBoothInputError(
            f"No images found in `{directory}` (looked for {', '.join(IMAGE_EXTENSIONS)}). Put the photos there."
        )
    return paths


def nothing_readable_error(directory: str | Path, skipped: list[str]) -> DreamBoothInputError:
    """The error for a folder whose image files (`skipped`, by name) are all unreadable."""
    return DreamBoothInputError(
        f"None of the images in `{directory}` could be read ({', '.join(skipped)}); they are empty, truncated"
        " or not images. Replace them with readable photos."
    )


def load_dataset_images(
    dataset_name: str,
    config_name: str | None,
    image_column: str,
    caption_column: str | None,
    instance_prompt: str | None,
    resolution: int,
    interpolation: str,
    cache_dir: str | None = None,
    buckets: list[tuple[int, int]] | None = None,
    cond_image_column: str | None = None,
) -> list[TrainingImage]:
    """The `train` split of a `datasets` dataset (Hub id or local folder), captions from `caption_column`, and with
    `cond_image_column` each image's condition image (resized to the image's training size)."""
    from datasets import load_dataset

    dataset = load_dataset(dataset_name, config_name, cache_dir=cache_dir)["train"]
    for column in (image_column, caption_column, cond_image_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"Column `{column}` not found in dataset `{dataset_name}`; its columns are"
                f" {', '.join(dataset.column_names)}. Set `--image_column`/`--caption_column`/`--cond_image_column`."
            )
    images = []
    for index, row in enumerate(dataset):
        prompt = row[caption_column] if caption_column else instance_prompt
        source = f"{dataset_name}[{index}]"
        images.append(to_training_image(row[image_column], prompt, resolution, interpolation, source, buckets))
        if cond_image_column:
            condition = decode_image(row[cond_image_column], f"{source}[{cond_image_column}]")
            images[-1].condition = condition.resize(images[-1].image.size, RESAMPLING[interpolation])
    return images


@dataclass(frozen=True)
class SubjectImages:
    """Where one subject's images sit in the run's lists: `num_instance` subject images from `instance_start`, and
    `num_class` class images from `class_start` (subjects of one class share them)."""

    instance_start: int
    num_instance: int
    class_start: int = 0
    num_class: int = 1


class TrainingOrder:
    """Which subject and class image each example of each step uses: a pure function of (seed, step).

    With one subject, items `k = 0 .. len - 1` pair subject image `k % num_instance` with class image
    `k % num_class`, as diffusers' DreamBooth dataset does. With several (`for_subjects`), item `k` belongs to
    subject `k % S` and is that subject's item `k // S`, so every subject gets an equal share of the examples
    whatever its number of photos, and its photos are paired with its own class images. The items of all epochs
    form one stream, each epoch in its own seeded permutation, cut into global batches of `global_batch_size`; so
    a resumed run, or a run on more processes, sees the same data.
    """

    def __init__(self, num_instance: int, num_class: int, seed: int) -> None:
        self._set_up([SubjectImages(0, num_instance, 0, num_class)], seed)

    @classmethod
    def for_subjects(cls, subjects: list[SubjectImages], seed: int) -> TrainingOrder:
        """The order of a run with several subjects; with one, the same order as `TrainingOrder(...)`."""
        order = cls.__new__(cls)
        order._set_up(list(subjects), seed)
        return order

    def _set_up(self, subjects: list[SubjectImages], seed: int) -> None:
        self.subjects = subjects
        self.seed = seed
        self.length = len(subjects) * max(max(s.num_instance, s.num_class) for s in subjects)
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
        subject, rank = self._subject_item(item)
        return subject.instance_start + rank % subject.num_instance

    def class_index(self, item: int) -> int:
        subject, rank = self._subject_item(item)
        return subject.class_start + rank % subject.num_class

    def _subject_item(self, item: int) -> tuple[SubjectImages, int]:
        count = len(self.subjects)
        return self.subjects[item % count], item // count

    def batch(self, batch_index: int, global_batch_size: int) -> tuple[list[int], list[int]]:
        """Subject and class image indices of global batch number `batch_index`, example by example."""
        items = self.items(batch_index, global_batch_size)
        return [self.instance_index(k) for k in items], [self.class_index(k) for k in items]


class BucketStream:
    """Global batches of image indices, each batch from one aspect-ratio bucket: a pure function of (seed, batch).

    Every epoch, each bucket's images are shuffled and cut into batches of `global_batch_size` (the last one of a
    bucket filled up by wrapping around that bucket's shuffled images, so every batch is full and every process gets
    a full slice), and the epoch's batches of all buckets are shuffled together.
    """

    def __init__(self, buckets: list[tuple[int, int]], global_batch_size: int, seed: int, salt: int) -> None:
        self.global_batch_size = global_batch_size
        self.seed, self.salt = seed, salt
        self.members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.members.setdefault(bucket, []).append(index)
        self.batches_per_epoch = sum(math.ceil(len(m) / global_batch_size) for m in self.members.values())
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of epoch `epoch`, in order; the two latest epochs are kept, not drawn again at every step."""
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, salt=self.salt))
            size, batches = self.global_batch_size, []
            for bucket in sorted(self.members):
                members = self.members[bucket]
                shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                count = math.ceil(len(shuffled) / size)
                filled = [shuffled[i % len(shuffled)] for i in range(count * size)]
                batches += [filled[start : start + size] for start in range(0, len(filled), size)]
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._epochs = {
                **{e: b for e, b in self._epochs.items() if e == epoch - 1},
                epoch: [batches[i] for i in order],
            }
        return self._epochs[epoch]

    def batch(self, batch_index: int) -> list[int]:
        return self.epoch_batches(batch_index // self.batches_per_epoch)[batch_index % self.batches_per_epoch]


class BucketedTrainingOrder:
    """`TrainingOrder` for `--aspect_ratio_buckets`: every global batch's subject images share one bucket, and so do
    its class images (possibly another bucket: the trainer then calls the denoiser once per shape).

    Subject and class images are two independent `BucketStream`s, so a subject photo is not tied to the class images
    of its own shape (there may be none: generated class images are all square). An epoch is one pass over the
    subject images' batches; `length` counts their examples, padding included. A pure function of (seed, batch), so
    resumed and multi-process runs see the same batches.

    Args:
        instance_buckets (`list[tuple[int, int]]`): the bucket of each subject image.
        class_buckets (`list[tuple[int, int]]`): the bucket of each class image (empty without class images).
        global_batch_size (`int`): examples per global micro-batch, `train_batch_size` times the processes.
        seed (`int`): the run's seed.
    """

    def __init__(
        self,
        instance_buckets: list[tuple[int, int]],
        class_buckets: list[tuple[int, int]],
        global_batch_size: int,
        seed: int,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.instance = BucketStream(instance_buckets, global_batch_size, seed, salt=3)
        self.classes = BucketStream(class_buckets, global_batch_size, seed, salt=4) if class_buckets else None
        self.length = self.instance.batches_per_epoch * global_batch_size

    def batch(self, batch_index: int, global_batch_size: int) -> tuple[list[int], list[int]]:
        """Subject and class image indices of global batch number `batch_index` (class: empty without class
        images); `global_batch_size` must be the one the order was built for."""
        if global_batch_size != self.global_batch_size:
            raise ValueError(
                f"This order cuts batches of {self.global_batch_size} examples, not {global_batch_size}; build it"
                " with the run's global batch size."
            )
        classes = self.classes.batch(batch_index) if self.classes is not None else []
        return self.instance.batch(batch_index), classes


def mix_seed(seed: int, *values: int, salt: int = 0) -> int:
    """A 63-bit seed derived from `seed` and integers, so each step/epoch/purpose has its own stream."""
    mixed = (seed * 0x9E3779B97F4A7C15 + salt) & ((1 << 64) - 1)
    for value in values:
        mixed = ((mixed ^ value) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    return mixed >> 1


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", salt: int = 2) -> torch.Generator:
    """A generator for the random draws of micro-step `step` (noise, timesteps, crops)."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, salt=salt))


def load_subject_photos(
    config: DreamBoothConfig, data: SubjectData, buckets: list[tuple[int, int]] | None = None
) -> list[TrainingImage]:
    """One subject's photos, from its folder or `--dataset_name`, with `{identifier}` filled in their captions."""
    from .identifiers import fill_identifier

    size, mode = config.resolution, config.image_interpolation_mode
    if data.instance_data_dir is not None:
        photos = load_folder_images(data.instance_data_dir, data.instance_prompt, size, mode, buckets=buckets)
    else:
        photos = load_dataset_images(
            config.dataset_name,
            config.dataset_config_name,
            config.image_column,
            config.caption_column,
            data.instance_prompt,
            size,
            mode,
            config.cache_dir,
            buckets=buckets,
            cond_image_column=config.cond_image_column,
        )
    for image in photos:  # per-image captions of `--caption_column` may name `{identifier}` too
        image.prompt = fill_identifier(image.prompt, data.identifier, "caption_column")
    return photos
