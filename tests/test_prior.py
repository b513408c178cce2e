"""Class-image generation for prior preservation, with a real tiny Stable Diffusion pipeline."""

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_dreambooth.prior import generate_class_images, missing_class_images
from diffusers_dreambooth.testing_utils import get_dummy_pipeline

CLASS_PROMPT = "a photo of dog"


class RecordingPipeline(StableDiffusionPipeline):
    """The real pipeline, recording how many images each call asks for and the safety checker it runs with."""

    def __call__(self, *args, **kwargs):
        if self.before_call is not None:
            self.before_call()
        self.calls.append(len(kwargs["prompt"]))
        self.checkers_seen.append(self.safety_checker)
        return super().__call__(*args, **kwargs)


class ForbiddenSafetyChecker(torch.nn.Module):
    """Stands in for the NSFW filter; generation must neither run it nor lose it."""

    def __init__(self):
        super().__init__()
        self.called = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, *args, **kwargs):
        self.called = True
        raise AssertionError("the safety checker must not run on class images")


def recording_pipeline(tmp_dir) -> RecordingPipeline:
    components = get_dummy_pipeline("sd", tmp_dir).components
    pipeline = RecordingPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.calls, pipeline.checkers_seen, pipeline.before_call = [], [], None
    return pipeline


@pytest.fixture
def pipeline(tmp_path) -> RecordingPipeline:
    return recording_pipeline(tmp_path / "pipeline")


def first_call_waits_for(barrier: threading.Barrier, pipeline: RecordingPipeline):
    def before_call():
        if not pipeline.calls:
            barrier.wait()

    return before_call


def generate(pipeline, class_dir, num_class_images, **kwargs):
    options = dict(batch_size=2, seed=0, num_inference_steps=2)
    options.update(kwargs)
    return generate_class_images(pipeline, CLASS_PROMPT, class_dir, num_class_images, **options)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_same_image(actual, expected) -> None:
    """Equal up to one 8-bit level: batches of other sizes round floats differently (seeded noise is the same)."""
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01


def names(paths) -> list[str]:
    return sorted(path.name for path in paths)


def class_names(indices) -> list[str]:
    return [f"class_{index:05d}.png" for index in indices]


def test_generates_exactly_the_missing_images(pipeline, tmp_path):
    class_dir = tmp_path / "class" / "dog"

    written = generate(pipeline, class_dir, 3)

    assert names(written) == class_names(range(3))
    assert sorted(path.name for path in class_dir.iterdir()) == class_names(range(3))
    assert pipeline.calls == [2, 1]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (32, 32)
    assert len({pixels(path).tobytes() for path in written}) == 3


def test_second_call_with_the_same_count_generates_nothing(pipeline, tmp_path):
    generate(pipeline, tmp_path / "class", 3)
    calls = list(pipeline.calls)

    assert generate(pipeline, tmp_path / "class", 3) == []
    assert generate(pipeline, tmp_path / "class", 2) == []
    assert pipeline.calls == calls


def test_raising_the_count_tops_up_only_the_new_indices(pipeline, tmp_path):
    class_dir = tmp_path / "class"
    generate(pipeline, class_dir, 2)
    before = {path.name: path.read_bytes() for path in class_dir.iterdir()}
    pipeline.calls.clear()

    written = generate(pipeline, class_dir, 5)

    assert names(written) == class_names([2, 3, 4])
    assert pipeline.calls == [2, 1]
    assert {name: (class_dir / name).read_bytes() for name in before} == before


def test_user_images_of_any_name_count_toward_the_total(pipeline, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for name in ("my_dog.jpg", "another dog.PNG"):
        Image.new("RGB", (64, 48), (120, 80, 40)).save(class_dir / name, format="PNG")
    (class_dir / "notes.txt").write_text("not an image")

    written = generate(pipeline, class_dir, 5)

    assert names(written) == class_names(range(3))
    assert missing_class_images(class_dir, 5) == []
    assert generate(pipeline, class_dir, 4) == []


def test_images_depend_on_the_seed_not_on_the_batch(pipeline, tmp_path):
    generate(pipeline, tmp_path / "batched", 3, batch_size=4)
    generate(pipeline, tmp_path / "single", 3, batch_size=1)
    generate(pipeline, tmp_path / "other_seed", 3, seed=1)

    for name in class_names(range(3)):
        assert_same_image(pixels(tmp_path / "batched" / name), pixels(tmp_path / "single" / name))
        assert not np.array_equal(pixels(tmp_path / "batched" / name), pixels(tmp_path / "other_seed" / name))


def test_resume_regenerates_a_deleted_image_exactly(pipeline, tmp_path):
    class_dir = tmp_path / "class"
    generate(pipeline, class_dir, 3, batch_size=4)
    original = pixels(class_dir / "class_00001.png")
    (class_dir / "class_00001.png").unlink()
    pipeline.calls.clear()

    written = generate(pipeline, class_dir, 3, batch_size=4)

    assert names(written) == ["class_00001.png"]
    assert pipeline.calls == [1]
    assert_same_image(pixels(class_dir / "class_00001.png"), original)


def test_resume_after_an_interrupted_write_ignores_the_partial_file(pipeline, tmp_path):
    class_dir = tmp_path / "class"
    generate(pipeline, class_dir, 3)
    original = pixels(class_dir / "class_00002.png")
    (class_dir / "class_00002.png").unlink()
    (class_dir / ".class_00002.png.partial").write_bytes(b"\x89PNG truncated")

    assert missing_class_images(class_dir, 3) == [2]
    written = generate(pipeline, class_dir, 3)

    assert names(written) == ["class_00002.png"]
    assert_same_image(pixels(class_dir / "class_00002.png"), original)
    assert sorted(path.name for path in class_dir.iterdir()) == class_names(range(3))


def test_no_partial_files_are_left_behind(pipeline, tmp_path):
    generate(pipeline, tmp_path / "class", 3)

    assert not [path for path in (tmp_path / "class").iterdir() if path.name.startswith(".")]


def test_concurrent_processes_split_the_missing_indices(tmp_path):
    """Both processes list the folder before either writes, as when they start together."""
    pipelines = [recording_pipeline(tmp_path / f"pipeline_{rank}") for rank in range(2)]
    both_listed = threading.Barrier(2, timeout=60)
    for pipe in pipelines:
        pipe.before_call = first_call_waits_for(both_listed, pipe)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32)).save(class_dir / "user_photo.png")
    written = {}

    def run(rank):
        written[rank] = generate(pipelines[rank], class_dir, 6, process_index=rank, num_processes=2)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert names(written[0]) == class_names([0, 2, 4])
    assert names(written[1]) == class_names([1, 3])
    assert missing_class_images(class_dir, 6) == []


def test_processes_starting_at_different_times_still_produce_every_image(tmp_path):
    pipelines = [recording_pipeline(tmp_path / f"pipeline_{rank}") for rank in range(2)]
    class_dir = tmp_path / "class"

    # Both processes list the folder before either writes, as the trainer makes them (list, barrier, generate).
    missing = missing_class_images(class_dir, 4)
    first = generate(pipelines[0], class_dir, 4, process_index=0, num_processes=2, missing=missing)
    second = generate(pipelines[1], class_dir, 4, process_index=1, num_processes=2, missing=missing)

    assert not set(first) & set(second)
    assert names(first + second) == class_names(range(4))


def test_safety_checker_is_off_during_generation_and_restored(pipeline, tmp_path):
    checker = ForbiddenSafetyChecker()
    pipeline.safety_checker = checker

    generate(pipeline, tmp_path / "class", 3)

    assert pipeline.checkers_seen == [None, None]
    assert not checker.called
    assert pipeline.safety_checker is checker


def test_safety_checker_is_restored_when_generation_fails(pipeline, tmp_path):
    checker = ForbiddenSafetyChecker()
    pipeline.safety_checker = checker

    def fail():
        raise RuntimeError("out of memory")

    pipeline.before_call = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(pipeline, tmp_path / "class", 3)

    assert pipeline.safety_checker is checker
    assert not checker.called
