"""A procedural world of simple 32x32 images with a known generator, for DreamBooth experiments on CPU.

Every image is one shape (circle, square, triangle or star) in one colour, or with a two-colour diagonal stripe
texture, on a plain background. Because the generator is known, a model trained on this world can be measured
exactly: what a prompt asked for is a `Scene`, and whether an image shows it can be checked pixel by pixel.

The DreamBooth subject (`SUBJECT`) is an object the plain world never contains: a star with a fixed red and yellow
stripe texture. Red stars exist, red and yellow striped circles exist, but no sampled star carries those stripes,
so a model can only learn the subject from its instance photos, and "star" stays a class with a known prior.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

#: Shape colours: saturated, and at least ~100 apart (RGB distance) from each other and from every background.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 210),
    "yellow": (250, 220, 30),
    "purple": (140, 40, 200),
    "orange": (240, 120, 20),
}

#: Backgrounds: the coloured ones are pale, so a blue shape on a blue background (or green on green) stays visible.
BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "blue": (150, 190, 240),
    "green": (160, 220, 160),
    "pink": (250, 180, 200),
}

IMAGE_SIZE = 32

#: Range of `Scene.size` that `sample_scene` draws from: big enough that a triangle's and a star's points show at
#: 32 px (a model trained on sizes from 7 px drew the smallest ones misshapen).
SIZE_RANGE: tuple[float, float] = (8.0, 13.0)

#: Range of `Scene.stripe_width` for sampled patterns. The toy VAE keeps one latent pixel per 4x4 pixels, so a
#: pattern survives encoding only if its period along x and y (2 * sqrt(2) * width for diagonal stripes) is well
#: above the latent grid's 8 px Nyquist limit: 3 px stripes (8.5 px) came back as a plain colour, 4.5 px give 12.7.
STRIPE_WIDTH_RANGE: tuple[float, float] = (4.5, 6.0)

#: Pixels kept free between a sampled shape and the image border.
BORDER_MARGIN = 1.0

#: Ratio of the star's inner to outer radius: fatter than a regular pentagram (0.38), so its body stays visible.
STAR_INNER_RATIO = 0.5

_SUPERSAMPLING = 4


@dataclass(frozen=True)
class Scene:
    """One image of the world, in pixel units of an `IMAGE_SIZE` image.

    `size` is the circle's radius, the square's half side, and the triangle's and star's outer radius (centre to
    tip), so at equal size a square covers more than a circle, which covers more than a triangle or a star.
    `pattern` is `None` for a plain shape, or two colour names for diagonal stripes `stripe_width` pixels wide that
    move and turn with the shape; then `color` is the first of them, the colour at the shape's centre.
    The centre is clipped so the whole shape lies inside the image, so the fields always describe what is drawn.
    """

    shape: str
    color: str
    background: str
    x: float = IMAGE_SIZE / 2
    y: float = IMAGE_SIZE / 2
    size: float = 10.0
    rotation: float = 0.0
    pattern: tuple[str, str] | None = None
    stripe_width: float = 5.0

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("color", self.color, COLORS)
        _check_name("background", self.background, BACKGROUNDS)
        if self.pattern is not None:
            pattern = tuple(self.pattern)
            if len(pattern) != 2 or pattern[0] == pattern[1]:
                raise ValueError(f"A pattern is two different colour names, got {self.pattern!r}.")
            for name in pattern:
                _check_name("pattern color", name, COLORS)
            if self.color != pattern[0]:
                raise ValueError(f"A patterned scene's color is its first stripe colour `{pattern[0]}`.")
            object.__setattr__(self, "pattern", pattern)
        if self.size <= 0 or self.stripe_width <= 0:
            raise ValueError("`size` and `stripe_width` must be positive.")
        extent = self.size * _unit_extent(self.shape, self.rotation)
        if extent > IMAGE_SIZE / 2:
            raise ValueError(f"A {self.shape} of size {self.size} does not fit in a {IMAGE_SIZE} px image.")
        object.__setattr__(self, "x", float(np.clip(self.x, extent, IMAGE_SIZE - extent)))
        object.__setattr__(self, "y", float(np.clip(self.y, extent, IMAGE_SIZE - extent)))
        object.__setattr__(self, "size", float(self.size))
        object.__setattr__(self, "rotation", float(self.rotation))
        object.__setattr__(self, "stripe_width", float(self.stripe_width))

    def render(self, image_size: int = IMAGE_SIZE) -> Image.Image:
        """The scene as an RGB image of `image_size` pixels, drawn 4x larger and box-filtered for smooth edges."""
        side = image_size * _SUPERSAMPLING
        scale = side / IMAGE_SIZE
        # Sample centres in scene pixel units: output pixel i covers [i, i + 1), as the scene's coordinates do.
        centres = (np.arange(side) + 0.5) / scale
        px, py = np.meshgrid(centres, centres)
        inside = self._contains(px, py)[..., None]
        pixels = np.where(inside, self._fill(px, py), np.array(BACKGROUNDS[self.background], dtype=np.uint8))
        return Image.fromarray(pixels.astype(np.uint8), "RGB").resize((image_size, image_size), Image.Resampling.BOX)

    def _contains(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Whether each point (scene pixel units) lies inside the shape, by an exact geometric test."""
        if self.shape == "circle":
            return (px - self.x) ** 2 + (py - self.y) ** 2 < self.size**2
        outline = _unit_outline(self.shape, self.rotation) * self.size + (self.x, self.y)
        # Even-odd rule: a point is inside when a ray to its right crosses the outline an odd number of times.
        inside = np.zeros(px.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(np.roll(outline, 1, axis=0), outline):
            if y0 == y1:
                continue
            crossing_x = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
            inside ^= ((y0 > py) != (y1 > py)) & (px < crossing_x)
        return inside

    def _fill(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """The shape's colour (or stripes) at each point, to be cut out by the shape's outline."""
        if self.pattern is None:
            return np.array(COLORS[self.color], dtype=np.uint8)
        dx, dy = px - self.x, py - self.y
        cos, sin = math.cos(self.rotation), math.sin(self.rotation)
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos
        # Distance along the shape's own diagonal; stripe 0 is centred on the shape's centre.
        stripe = np.floor((along + across) / math.sqrt(2) / self.stripe_width + 0.5).astype(np.int64) % 2
        palette = np.array([COLORS[name] for name in self.pattern], dtype=np.uint8)
        return palette[stripe]


def _check_name(field: str, value: str, allowed: Iterable[str]) -> None:
    """Raise a readable error when `value` is not one of the world's names for `field`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Unknown {field} `{value}`; the world has {', '.join(allowed)}.")


def _unit_outline(shape: str, rotation: float) -> np.ndarray:
    """Polygon vertices (x, y; y down) of `shape` at size 1 around the origin, turned by `rotation` radians."""
    if shape == "square":
        angles = math.pi / 4 + np.arange(4) * math.pi / 2
        radii = np.full(4, math.sqrt(2))
    elif shape == "triangle":
        angles = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        radii = np.ones(3)
    elif shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
    else:
        raise ValueError(f"`{shape}` has no polygon outline.")
    angles = angles + rotation
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _unit_extent(shape: str, rotation: float) -> float:
    """How far `shape` at size 1 reaches from its centre along x or y, whichever is further."""
    if shape == "circle":
        return 1.0
    return float(np.abs(_unit_outline(shape, rotation)).max())


def _article(word: str) -> str:
    """The article for `word`: "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[:1] in "aeiou" else "a"


def _describe(scene: Scene, with_color: bool = True, with_background: bool = True) -> str:
    """The caption of `scene` ("a photo of a red star on a blue background"), without colour or background if asked."""
    if scene.pattern is not None:
        adjective = f"{scene.pattern[0]} and {scene.pattern[1]} striped" if with_color else "striped"
    else:
        adjective = scene.color if with_color else ""
    thing = f"{adjective} {scene.shape}".strip()
    text = f"a photo of {_article(thing)} {thing}"
    if with_background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def full_caption(scene: Scene) -> str:
    """The caption naming everything: "a photo of a red and yellow striped star on a white background"."""
    return _describe(scene)


def caption(
    scene: Scene,
    rng: np.random.Generator,
    drop_color_p: float = 0.25,
    drop_background_p: float = 0.25,
    empty_p: float = 0.1,
) -> str:
    """A training caption for `scene`, with parts left out at random so a model learns each word on its own.

    The colour (for a patterned scene, its colours; "striped" stays) and the background are each dropped with their
    probability, and with `empty_p` the caption is "" so the model also learns the unconditional distribution that
    classifier-free guidance needs. Every call draws three numbers from `rng`, whatever the outcome.
    """
    for name, p in (("drop_color_p", drop_color_p), ("drop_background_p", drop_background_p), ("empty_p", empty_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"`{name}` is a probability, got {p}.")
    empty, drop_color, drop_background = rng.random(3) < (empty_p, drop_color_p, drop_background_p)
    if empty:
        return ""
    return _describe(scene, with_color=not drop_color, with_background=not drop_background)


def _placement(
    rng: np.random.Generator, shape: str, size_range: tuple[float, float]
) -> tuple[float, float, float, float]:
    """Random (x, y, size, rotation) that keep `shape` `BORDER_MARGIN` pixels inside the image.

    The size is drawn from `size_range`, then capped where the shape would not fit at its rotation (only a large
    square turned near 45 degrees is).
    """
    low, high = size_range
    if not 0 < low <= high:
        raise ValueError(f"`size_range` must be (low, high) with 0 < low <= high, got {size_range}.")
    rotation = float(rng.uniform(0.0, 2 * math.pi))
    unit_extent = _unit_extent(shape, rotation)
    size = min(float(rng.uniform(low, high)), (IMAGE_SIZE / 2 - BORDER_MARGIN) / unit_extent)
    extent = size * unit_extent
    x, y = rng.uniform(extent + BORDER_MARGIN, IMAGE_SIZE - extent - BORDER_MARGIN, size=2)
    return float(x), float(y), size, rotation


def sample_scene(
    rng: np.random.Generator,
    pattern_p: float = 0.0,
    *,
    size_range: tuple[float, float] = SIZE_RANGE,
    stripe_width_range: tuple[float, float] = STRIPE_WIDTH_RANGE,
) -> Scene:
    """A random scene: shape, colour, background, position, size and rotation all drawn uniformly.

    Only a big square turned near 45 degrees has its size capped, so that it fits in the image.
    With probability `pattern_p` the shape gets stripes of two different random colours ("texture" images, so a
    model can learn patterns at all); a star never gets the subject's two colours, in either order.
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = tuple(COLORS)[rng.integers(len(COLORS))]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    x, y, size, rotation = _placement(rng, shape, size_range)
    pattern = None
    stripe_width = Scene.stripe_width
    if rng.random() < pattern_p:
        while pattern is None or (shape == SUBJECT.shape and set(pattern) == set(SUBJECT.pattern)):
            first, second = rng.choice(len(COLORS), size=2, replace=False)
            pattern = (tuple(COLORS)[first], tuple(COLORS)[second])
        color = pattern[0]
        stripe_width = float(rng.uniform(*stripe_width_range))
    return Scene(shape, color, background, x, y, size, rotation, pattern, stripe_width)


SUBJECT_IDENTIFIER = "sks"
SUBJECT_CLASS = "star"

#: The DreamBooth subject: a star with red and yellow stripes 5 px wide, which the sampled world never shows.
SUBJECT = Scene(shape="star", color="red", background="white", size=12.0, pattern=("red", "yellow"), stripe_width=5.0)

#: Prompts for fine-tuning on the subject and for its class prior.
SUBJECT_PROMPT = f"a photo of {SUBJECT_IDENTIFIER} {SUBJECT_CLASS}"
CLASS_PROMPT = f"a photo of a {SUBJECT_CLASS}"


def subject_scene(
    rng: np.random.Generator, background: str = "white", *, size_range: tuple[float, float] = SIZE_RANGE
) -> Scene:
    """The subject on `background` at a random position, size and rotation, as one of its "photos"."""
    x, y, size, rotation = _placement(rng, SUBJECT.shape, size_range)
    return Scene(SUBJECT.shape, SUBJECT.color, background, x, y, size, rotation, SUBJECT.pattern, SUBJECT.stripe_width)


def is_subject(scene: Scene) -> bool:
    """Whether `scene` shows the subject: a star with exactly the subject's stripe colours, in order."""
    return scene.shape == SUBJECT.shape and scene.pattern == SUBJECT.pattern


def make_dataset(
    num_images: int,
    seed: int,
    pattern_p: float = 0.1,
    *,
    drop_color_p: float = 0.25,
    drop_background_p: float = 0.25,
    empty_p: float = 0.1,
) -> list[tuple[Scene, Image.Image, str]]:
    """`num_images` random (scene, image, caption) triples, the same for the same seed.

    Scenes and captions come from separate random streams, so changing the caption probabilities leaves the
    scenes and images as they were.
    """
    scene_rng, caption_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    dataset = []
    for _ in range(num_images):
        scene = sample_scene(scene_rng, pattern_p)
        text = caption(scene, caption_rng, drop_color_p, drop_background_p, empty_p)
        dataset.append((scene, scene.render(), text))
    return dataset


def _scene_fields(scene: Scene) -> dict[str, object]:
    """The ground truth of `scene` as JSON values."""
    return {
        "shape": scene.shape,
        "color": scene.color,
        "background": scene.background,
        "pattern": None if scene.pattern is None else list(scene.pattern),
        "x": scene.x,
        "y": scene.y,
        "size": scene.size,
        "rotation": scene.rotation,
        "stripe_width": scene.stripe_width,
    }


def write_image_folder(
    directory: str | Path,
    scenes_and_images: Iterable[tuple[Scene, Image.Image] | tuple[Scene, Image.Image, str]],
    captions: bool = True,
) -> Path:
    """Save images as PNGs with a `metadata.jsonl`, the layout `datasets.load_dataset("imagefolder")` reads.

    Each metadata row has `file_name`, the ground-truth scene fields and, with `captions`, a `text` column: the
    item's own caption when it has one (as `make_dataset` gives), else `full_caption`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, item in enumerate(scenes_and_images):
        scene, image = item[0], item[1]
        file_name = f"{index:05d}.png"
        image.save(directory / file_name)
        row: dict[str, object] = {"file_name": file_name}
        if captions:
            row["text"] = item[2] if len(item) > 2 else full_caption(scene)
        rows.append({**row, **_scene_fields(scene)})
    with open(directory / "metadata.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return directory


def subject_photo_scenes(count: int = 4, seed: int = 0, backgrounds: Sequence[str] = ("white",)) -> list[Scene]:
    """The scenes of `count` instance photos of the subject, cycling through `backgrounds`, seeded."""
    if not backgrounds:
        raise ValueError("`backgrounds` needs at least one background name.")
    rng = np.random.default_rng(seed)
    return [subject_scene(rng, backgrounds[index % len(backgrounds)]) for index in range(count)]


def write_subject_photos(
    directory: str | Path, count: int = 4, seed: int = 0, backgrounds: Sequence[str] = ("white",)
) -> list[Path]:
    """Save `count` instance photos of the subject (PNG, `IMAGE_SIZE`), cycling through `backgrounds`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(subject_photo_scenes(count, seed, backgrounds)):
        path = directory / f"subject_{index}.png"
        scene.render().save(path)
        paths.append(path)
    return paths
