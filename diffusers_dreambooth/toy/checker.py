"""The toy world's judge: a small CNN trained on the generator's ground truth, shipped beside the toy base model.

It names an image's shape, colour and background and says whether it shows the DreamBooth subject; its penultimate
features give a subject-similarity cosine, the toy world's stand-in for DINO. It is trained on rendered scenes that
are blurred, noised and colour-shifted a little, so it also judges the softer images a diffusion model draws.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from .world import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, SUBJECT, Scene, is_subject, sample_scene, subject_scene

logger = logging.getLogger(__name__)

HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "subject": ("no", "yes"),
}


@dataclass(frozen=True)
class Judgement:
    """What the checker sees in one image."""

    shape: str
    color: str
    background: str
    subject_probability: float

    @property
    def is_subject(self) -> bool:
        return self.subject_probability > 0.5


class ToyChecker(ModelMixin, ConfigMixin):
    """Four convolution stages and a pooled feature vector with one linear head per question (`HEADS`).

    Saved and loaded like any diffusers model (`save_pretrained` / `from_pretrained`, safetensors).
    """

    @register_to_config
    def __init__(self, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 128):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
            previous = width
        self.body = nn.Sequential(*layers)
        spatial = IMAGE_SIZE // 2 ** len(channels)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(previous * spatial**2, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Penultimate features and per-head logits for images in [-1, 1] (N, 3, 32, 32)."""
        features = self.features(self.body(pixels))
        return features, {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Unit-length penultimate features, one row per image: cosine of two rows = subject similarity."""
        features, _ = self(self._pixels(images))
        return F.normalize(features, dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`embed`, under the name `diffusers_dreambooth.evaluation` expects of a DINO-like embedder."""
        return self.embed(images)

    @torch.no_grad()
    def feature_maps(self, images: Sequence[Image.Image] | torch.Tensor) -> list[torch.Tensor]:
        """The output of each convolution stage (N, C, H, W), for the LPIPS-style distance of the DIV metric."""
        maps, hidden = [], self._pixels(images)
        for layer in self.body:
            hidden = layer(hidden)
            if isinstance(layer, nn.AvgPool2d):
                maps.append(hidden)
        return maps

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax over each head's labels, one row per image."""
        _, logits = self(self._pixels(images))
        return {name: value.softmax(-1) for name, value in logits.items()}

    def judge(self, images: Sequence[Image.Image] | torch.Tensor) -> list[Judgement]:
        """The most likely shape, colour and background of each image, and its probability of being the subject."""
        probabilities = self.probabilities(images)
        labels = {name: [HEADS[name][i] for i in probabilities[name].argmax(-1).tolist()] for name in HEADS}
        subject = probabilities["subject"][:, 1].tolist()
        return [
            Judgement(labels["shape"][i], labels["color"][i], labels["background"][i], subject[i])
            for i in range(len(subject))
        ]

    def _pixels(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.to(self.device, self.dtype)
        return images_to_tensor(images).to(self.device, self.dtype)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images as one float tensor in [-1, 1], NCHW, each resized to `IMAGE_SIZE` px if it is not (as DINO's
    and CLIP's processors resize: a pipeline may sample at another size than it was trained at)."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    resized = [image if image.size == size else image.resize(size, Image.Resampling.BICUBIC) for image in images]
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in resized])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def checker_scenes(count: int, rng: np.random.Generator, subject_share: float = 0.25) -> list[Scene]:
    """Training scenes: the plain and striped world, the subject on every background, and its near misses.

    Near misses (red and yellow striped circles, squares and triangles; stars with other stripes) come from
    `sample_scene` itself, which draws striped shapes in every colour pair except the subject's on a star.
    """
    scenes = []
    for _ in range(count):
        if rng.random() < subject_share:
            scene = subject_scene(rng, tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
            if rng.random() < 0.5:  # the subject's stripes in the other order are still the subject
                scene = Scene(**{**scene.__dict__, "color": SUBJECT.pattern[1], "pattern": SUBJECT.pattern[::-1]})
        else:
            scene = sample_scene(rng, pattern_p=0.4)
        scenes.append(scene)
    return scenes


def labels_of(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Ground-truth label indices per head; colour is -1 (ignored) for striped scenes, whose colour is two."""
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "color": torch.tensor([-1 if s.pattern else tuple(COLORS).index(s.color) for s in scenes]),
        "background": torch.tensor([tuple(BACKGROUNDS).index(s.background) for s in scenes]),
        "subject": torch.tensor([int(is_subject(s) or _is_reversed_subject(s)) for s in scenes]),
    }


def _is_reversed_subject(scene: Scene) -> bool:
    return scene.shape == SUBJECT.shape and scene.pattern == SUBJECT.pattern[::-1]


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, colour shift and noise of random strength per image, like the softness of generated images."""
    n = len(pixels)
    sigma = torch.rand(n, generator=generator) * 1.2
    radius = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(radius**2)[None] / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernels = kernels / kernels.sum(-1, keepdim=True)
    # Separable blur as one grouped convolution: every (image, channel) plane gets its image's kernel.
    planes = pixels.reshape(1, n * 3, *pixels.shape[-2:])
    weights = kernels.repeat_interleave(3, dim=0)
    planes = F.conv2d(F.pad(planes, (2, 2, 0, 0), mode="replicate"), weights.view(n * 3, 1, 1, 5), groups=n * 3)
    planes = F.conv2d(F.pad(planes, (0, 0, 2, 2), mode="replicate"), weights.view(n * 3, 1, 5, 1), groups=n * 3)
    pixels = planes.view_as(pixels)
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.15
    noise = torch.randn(pixels.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    return (pixels + shift + noise).clamp(-1, 1)


@dataclass
class CheckerTrainingConfig:
    """Options of the checker's training; the defaults are the shipped checker's."""

    seed: int = 0
    num_images: int = 24_000
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 2e-3
    log_every: int = 250


def train_checker(config: CheckerTrainingConfig | None = None) -> tuple[ToyChecker, dict[str, float]]:
    """Train a `ToyChecker` on rendered scenes; return it with its accuracy per head on 2,000 held-out scenes."""
    config = config or CheckerTrainingConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 3])
    scenes = checker_scenes(config.num_images, rng)
    pixels = images_to_tensor([scene.render() for scene in scenes])
    labels = labels_of(scenes)
    checker = ToyChecker()
    optimizer = torch.optim.AdamW(checker.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    checker.train()
    start = time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(len(scenes), (config.batch_size,), generator=generator)
        _, logits = checker(augment(pixels[index], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][index], ignore_index=-1) for name in HEADS)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0:
            elapsed = time.perf_counter() - start
            logger.info("checker step %d/%d loss %.4f (%.0fs)", step + 1, config.steps, loss.item(), elapsed)
    checker.eval()
    return checker, checker_accuracy(checker, np.random.default_rng([config.seed, 4]))


@torch.no_grad()
def checker_accuracy(checker: ToyChecker, rng: np.random.Generator, count: int = 2000) -> dict[str, float]:
    """Accuracy of each head on fresh, augmented scenes (colour on plain shapes only)."""
    scenes = checker_scenes(count, rng)
    pixels = augment(images_to_tensor([scene.render() for scene in scenes]), torch.Generator().manual_seed(1))
    labels = labels_of(scenes)
    _, logits = checker(pixels)
    accuracy = {}
    for name in HEADS:
        known = labels[name] >= 0
        accuracy[name] = float((logits[name].argmax(-1)[known] == labels[name][known]).float().mean())
    return accuracy
