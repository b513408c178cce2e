"""`torchvision.transforms`, benchmark-only stand-in (see the package's docstring): `Compose`, `Resize`,
`CenterCrop`, `RandomCrop`, `ToTensor`, `Normalize` and `InterpolationMode`, with PIL and torch, computed on PIL
images as torchvision computes them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from .functional import pil_to_tensor


class InterpolationMode(enum.Enum):
    """torchvision's interpolation names, with PIL's filter for each."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a sequence, as torchvision reads a crop size."""
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class Compose:
    """Apply the transforms in order."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, value: Any) -> Any:
        for step in self.steps:
            value = step(value)
        return value


class Resize:
    """An int resizes the shorter side to it, keeping the aspect ratio; a pair resizes to (height, width)."""

    def __init__(self, size: int | Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else self.size[0]
            if width <= height:
                target = (short, int(short * height / width))
            else:
                target = (int(short * width / height), short)
        else:
            target = (self.size[1], self.size[0])
        if target == image.size:
            return image
        return image.resize(target, PIL_FILTERS[self.interpolation])


class CenterCrop:
    """Crop the centre (height, width), rounding the offsets as torchvision does."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.height, self.width = _size_pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(round((height - self.height) / 2.0))
        left = int(round((width - self.width) / 2.0))
        return image.crop((left, top, left + self.width, top + self.height))


class RandomCrop:
    """Crop (height, width) at an offset drawn with `torch.randint`, as torchvision does."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.height, self.width = _size_pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(torch.randint(0, height - self.height + 1, size=(1,)).item())
        left = int(torch.randint(0, width - self.width + 1, size=(1,)).item())
        return image.crop((left, top, left + self.width, top + self.height))


class ToTensor:
    """A PIL image as a float CHW tensor in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_tensor(image).float().div(255)


class Normalize:
    """(x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
