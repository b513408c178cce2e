"""The toy world: deterministic sampling, exact captions, pixels that show what the scene says, and imagefolder I/O."""

import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from diffusers_dreambooth.toy import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    SIZE_RANGE,
    SUBJECT,
    SUBJECT_CLASS,
    SUBJECT_IDENTIFIER,
    Scene,
    caption,
    full_caption,
    is_subject,
    make_dataset,
    sample_scene,
    subject_scene,
    write_image_folder,
    write_subject_photos,
)


def pixels(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The rendered scene as an int array (H, W, 3), so differences can go negative."""
    return np.asarray(scene.render(image_size), dtype=np.int64)


def near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 3) -> np.ndarray:
    """Mask of the pixels within `tolerance` of `rgb` in every channel."""
    return (np.abs(image - np.array(rgb)) <= tolerance).all(axis=-1)


def coverage(scene: Scene) -> np.ndarray:
    """Per pixel, the fraction the (plain) shape covers: where the pixel lies between background and shape colour."""
    background, color = np.array(BACKGROUNDS[scene.background]), np.array(COLORS[scene.color])
    direction = color - background
    return ((pixels(scene) - background) @ direction) / (direction @ direction)


def binomial_bounds(n: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    """Counts a fair Binomial(n, p) draw stays within, but for a 1-in-15,000 chance (4 sigma)."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def test_same_seed_same_dataset_other_seed_different():
    first, again, other = make_dataset(16, seed=0), make_dataset(16, seed=0), make_dataset(16, seed=1)
    assert [s for s, _, _ in first] == [s for s, _, _ in again]
    assert [t for _, _, t in first] == [t for _, _, t in again]
    for (_, image, _), (_, image_again, _) in zip(first, again):
        assert np.array_equal(np.asarray(image), np.asarray(image_again))
    assert [s for s, _, _ in first] != [s for s, _, _ in other]
    assert sum(not np.array_equal(np.asarray(a), np.asarray(b)) for (_, a, _), (_, b, _) in zip(first, other)) >= 15
    assert [t for _, _, t in first] != [t for _, _, t in other]


def test_caption_probabilities_leave_scenes_unchanged():
    plain = make_dataset(8, seed=5)
    never_dropped = make_dataset(8, seed=5, drop_color_p=0.0, drop_background_p=0.0, empty_p=0.0)
    assert [s for s, _, _ in plain] == [s for s, _, _ in never_dropped]
    assert [t for _, _, t in never_dropped] == [full_caption(s) for s, _, _ in never_dropped]


def test_every_value_appears_and_sampling_is_roughly_uniform():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(500)]
    for field, values in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS)):
        counts = {value: sum(getattr(s, field) == value for s in scenes) for value in values}
        low, high = binomial_bounds(500, 1 / len(values))
        assert all(low <= count <= high for count in counts.values()), (field, counts)
    assert all(s.pattern is None for s in scenes)
    sizes = np.array([s.size for s in scenes if s.shape != "square"])
    low, high = SIZE_RANGE
    assert low <= sizes.min() < low + 0.5 and high - 0.5 < sizes.max() <= high


def test_pattern_probability_and_no_subject_in_the_world():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, pattern_p=0.3) for _ in range(2000)]
    patterned = [s for s in scenes if s.pattern is not None]
    low, high = binomial_bounds(2000, 0.3)
    assert low <= len(patterned) <= high
    assert all(s.color == s.pattern[0] and s.pattern[0] != s.pattern[1] for s in patterned)
    assert {name for s in patterned for name in s.pattern} == set(COLORS)
    assert not any(is_subject(s) for s in scenes)
    assert not any(s.shape == "star" and set(s.pattern) == {"red", "yellow"} for s in patterned)
    # The subject's colours still occur as a texture, just never on a star.
    assert any(set(s.pattern) == {"red", "yellow"} for s in patterned)


def test_full_caption_format():
    assert full_caption(Scene("star", "red", "blue")) == "a photo of a red star on a blue background"
    assert full_caption(Scene("circle", "orange", "white")) == "a photo of an orange circle on a white background"
    striped = Scene("star", "red", "white", pattern=("red", "yellow"))
    assert full_caption(striped) == "a photo of a red and yellow striped star on a white background"


def test_caption_drop_rates():
    scene = Scene("star", "red", "blue")
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    for _ in range(4000):
        text = caption(scene, rng)
        counts[text] = counts.get(text, 0) + 1
    expected = {
        "": 0.1,
        "a photo of a red star on a blue background": 0.9 * 0.75 * 0.75,
        "a photo of a star on a blue background": 0.9 * 0.25 * 0.75,
        "a photo of a red star": 0.9 * 0.75 * 0.25,
        "a photo of a star": 0.9 * 0.25 * 0.25,
    }
    assert set(counts) == set(expected)
    for text, p in expected.items():
        low, high = binomial_bounds(4000, p)
        assert low <= counts[text] <= high, (text, counts[text], p)


def test_caption_of_patterned_scene_keeps_striped_when_colour_is_dropped():
    scene = Scene("square", "orange", "pink", pattern=("orange", "blue"))
    rng = np.random.default_rng(3)
    texts = {caption(scene, rng, drop_color_p=0.5, drop_background_p=0.5, empty_p=0.0) for _ in range(200)}
    assert texts == {
        "a photo of an orange and blue striped square on a pink background",
        "a photo of an orange and blue striped square",
        "a photo of a striped square on a pink background",
        "a photo of a striped square",
    }
    assert caption(scene, rng, empty_p=1.0) == ""
    with pytest.raises(ValueError, match="probability"):
        caption(scene, rng, drop_color_p=1.5)


def test_render_size_and_mode():
    scene = Scene("triangle", "green", "pink", rotation=0.3)
    image = scene.render()
    assert (image.size, image.mode) == ((IMAGE_SIZE, IMAGE_SIZE), "RGB")
    assert scene.render(64).size == (64, 64)
    # A larger render is the same picture: box-averaging it back to 32 px gives nearly the same pixels.
    shrunk = np.asarray(scene.render(64).resize((32, 32), Image.Resampling.BOX), dtype=np.int64)
    assert np.abs(shrunk - pixels(scene)).mean() < 2.0


def test_background_fills_corners_and_shape_colour_fills_centre():
    rng = np.random.default_rng(2)
    for _ in range(150):
        scene = sample_scene(rng, pattern_p=0.3)
        image = pixels(scene)
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert tuple(corner) == BACKGROUNDS[scene.background], scene
        if scene.pattern is None:
            centre = image[int(scene.y), int(scene.x)]
            assert np.abs(centre - COLORS[scene.color]).max() <= 2, scene
            # The shape colour is the most common non-background colour, and most of the shape is pure.
            shape_pixels = image[~near(image, BACKGROUNDS[scene.background], 0)]
            values, counts = np.unique(shape_pixels, axis=0, return_counts=True)
            assert tuple(values[counts.argmax()]) == COLORS[scene.color], scene
            assert counts.max() > 0.4 * len(shape_pixels), scene


def test_circle_centre_region_is_its_colour():
    for color, background in itertools.product(COLORS, BACKGROUNDS):
        scene = Scene("circle", color, background, x=13.3, y=18.6, size=7.0)
        region = pixels(scene)[17:21, 12:16]
        assert np.abs(region - COLORS[color]).max() <= 1


def test_colours_contrast_with_every_background_and_each_other():
    def distance(a, b):
        return float(np.linalg.norm(np.subtract(a, b)))

    assert min(distance(c, b) for c, b in itertools.product(COLORS.values(), BACKGROUNDS.values())) > 100
    assert min(distance(a, b) for a, b in itertools.combinations(COLORS.values(), 2)) > 90
    assert len(COLORS) == len(BACKGROUNDS) == 6


def test_patterned_scenes_show_both_stripe_colours():
    rng = np.random.default_rng(4)
    for _ in range(60):
        scene = sample_scene(rng, pattern_p=1.0, size_range=(7.0, 7.0))
        image = pixels(scene)
        for name in scene.pattern:
            assert near(image, COLORS[name]).sum() >= 3, scene
    # Equal stripes of each colour, mostly pure: blue and yellow differ in red by 220, so red measures the share.
    scene = Scene("square", "blue", "white", size=11.0, pattern=("blue", "yellow"), stripe_width=3.0)
    interior = pixels(scene)[8:24, 8:24]
    blue_share = (COLORS["yellow"][0] - interior[..., 0]) / (COLORS["yellow"][0] - COLORS["blue"][0])
    assert blue_share.mean() == pytest.approx(0.5, abs=0.03)
    assert (near(interior, COLORS["blue"]) | near(interior, COLORS["yellow"])).mean() > 0.5


def test_subject():
    assert (SUBJECT.shape, SUBJECT.color, SUBJECT.pattern) == ("star", "red", ("red", "yellow"))
    assert (SUBJECT_IDENTIFIER, SUBJECT_CLASS) == ("sks", "star")
    assert is_subject(SUBJECT)
    assert not is_subject(Scene("star", "red", "white"))
    assert not is_subject(Scene("star", "red", "white", pattern=("red", "blue")))
    assert not is_subject(Scene("circle", "red", "white", pattern=("red", "yellow")))
    rng = np.random.default_rng(0)
    photos = [subject_scene(rng, background) for background in ("white", "black", "pink")]
    assert all(is_subject(p) for p in photos)
    assert [p.background for p in photos] == ["white", "black", "pink"]
    assert len({(p.x, p.y, p.size, p.rotation) for p in photos}) == 3


def test_write_subject_photos(tmp_path):
    paths = write_subject_photos(tmp_path / "subject", count=5, seed=1, backgrounds=("white", "gray"))
    assert [p.name for p in paths] == [f"subject_{i}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "subject").iterdir()) == [p.name for p in paths]
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((IMAGE_SIZE, IMAGE_SIZE), "RGB")
            photo = np.asarray(image, dtype=np.int64)
        assert tuple(photo[0, 0]) == BACKGROUNDS[("white", "gray")[index % 2]]
        assert near(photo, COLORS["red"]).sum() >= 5 and near(photo, COLORS["yellow"]).sum() >= 5
    again = write_subject_photos(tmp_path / "again", count=5, seed=1, backgrounds=("white", "gray"))
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_shape_areas_differ_at_equal_size():
    """Square (4 s^2) > circle (pi s^2) > star (1.47 s^2) > triangle (1.30 s^2), as masks and as coverage."""
    size = 9.0
    exact = {"square": 4.0, "circle": math.pi, "star": 2.5 * math.sin(math.pi / 5), "triangle": 3 * math.sqrt(3) / 4}
    rng = np.random.default_rng(5)
    mask_area, covered_area = {}, {}
    for shape in SHAPES:
        masks, covered = [], []
        for _ in range(12):
            x, y = rng.uniform(13.0, 19.0, size=2)
            scene = Scene(shape, "blue", "white", x=x, y=y, size=size, rotation=rng.uniform(0, math.pi / 2))
            masks.append((~near(pixels(scene), BACKGROUNDS["white"], 0)).sum())
            covered.append(coverage(scene).sum())
        mask_area[shape], covered_area[shape] = float(np.mean(masks)), float(np.mean(covered))
    assert mask_area["square"] > mask_area["circle"] > max(mask_area["triangle"], mask_area["star"])
    for shape, factor in exact.items():
        assert covered_area[shape] == pytest.approx(factor * size**2, rel=0.01), shape


def test_scene_keeps_the_shape_inside_and_checks_names():
    clipped = Scene("circle", "red", "white", x=-5.0, y=40.0, size=8.0)
    assert (clipped.x, clipped.y) == (8.0, 24.0)
    turned = Scene("square", "red", "white", x=0.0, y=0.0, size=10.0, rotation=math.pi / 4)
    assert turned.x == pytest.approx(10.0 * math.sqrt(2))
    assert tuple(pixels(turned)[0, 0]) == BACKGROUNDS["white"]
    with pytest.raises(ValueError, match="does not fit"):
        Scene("square", "red", "white", size=12.0, rotation=math.pi / 4)
    with pytest.raises(ValueError, match="Unknown shape"):
        Scene("hexagon", "red", "white")
    with pytest.raises(ValueError, match="Unknown background"):
        Scene("star", "red", "teal")
    with pytest.raises(ValueError, match="first stripe colour"):
        Scene("star", "blue", "white", pattern=("red", "yellow"))
    with pytest.raises(ValueError, match="two different"):
        Scene("star", "red", "white", pattern=("red", "red"))


def test_image_folder_round_trip(tmp_path):
    from datasets import load_dataset

    data = make_dataset(12, seed=3, pattern_p=0.5)
    folder = write_image_folder(tmp_path / "world", data)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(12)]
    assert [r["text"] for r in rows] == [t for _, _, t in data]

    dataset = load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "cache"))["train"]
    assert len(dataset) == 12
    assert {"image", "text", "shape", "color", "background", "pattern"} <= set(dataset.column_names)
    for row, (scene, image, text) in zip(dataset, data):
        assert row["text"] == text
        assert (row["shape"], row["color"], row["background"]) == (scene.shape, scene.color, scene.background)
        assert row["pattern"] == (None if scene.pattern is None else list(scene.pattern))
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(image))

    uncaptioned = write_image_folder(tmp_path / "plain", [(s, i) for s, i, _ in data[:3]], captions=False)
    plain_rows = [json.loads(line) for line in (uncaptioned / "metadata.jsonl").read_text().splitlines()]
    assert all("text" not in r for r in plain_rows)
    full = write_image_folder(tmp_path / "full", [(s, i) for s, i, _ in data[:3]])
    assert [json.loads(line)["text"] for line in (full / "metadata.jsonl").read_text().splitlines()] == [
        full_caption(s) for s, _, _ in data[:3]
    ]
