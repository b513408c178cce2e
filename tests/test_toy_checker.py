"""The toy world's judge and measures: the shipped checker, its training, the toy metrics and the pretraining code."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffusers_dreambooth.evaluation import load_evaluation_models
from diffusers_dreambooth.toy import CHECKER_DIR, SUBJECT, SUBJECT_PHOTOS_DIR, Scene, sample_scene, subject_scene
from diffusers_dreambooth.toy.checker import CheckerTrainingConfig, ToyChecker, checker_accuracy, train_checker
from diffusers_dreambooth.toy.metrics import (
    ToyAttributeEmbedder,
    all_three_accuracy,
    background_share,
    full_prompt_scenes,
    subject_share,
)
from diffusers_dreambooth.toy.pretrain import PretrainConfig, pretrain_toy_model


@pytest.fixture(scope="module")
def checker():
    return ToyChecker.from_pretrained(CHECKER_DIR).eval()


def test_shipped_checker_judges_fresh_scenes(checker):
    accuracy = checker_accuracy(checker, np.random.default_rng(123), count=400)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_shipped_checker_knows_the_subject_from_its_near_misses(checker):
    rng = np.random.default_rng(7)
    subjects = [subject_scene(rng, background).render() for background in ("white", "black", "green", "pink")]
    near_misses = [
        Scene("star", "red", "white", size=10.0),
        Scene("star", "yellow", "green", size=10.0),
        Scene("circle", "red", "white", size=10.0, pattern=("red", "yellow")),
        Scene("square", "yellow", "gray", size=8.0, pattern=("yellow", "red")),
        Scene("star", "blue", "white", size=12.0, pattern=("blue", "yellow")),
    ]
    assert subject_share(checker, subjects) == 1.0
    assert subject_share(checker, [scene.render() for scene in near_misses]) == 0.0
    # Penultimate features: photos of the subject are closer to each other than to a plain red star.
    photos = checker.embed([subject_scene(rng).render() for _ in range(4)])
    red_stars = checker.embed([Scene("star", "red", "white", size=11.0, rotation=r).render() for r in (0.1, 0.7)])
    within = (photos @ photos.T)[~torch.eye(4, dtype=bool)].mean()
    assert within > (photos @ red_stars.T).mean() + 0.2


def test_all_three_accuracy_and_background_share_on_rendered_scenes(checker):
    scenes = full_prompt_scenes()
    assert len(scenes) == 4 * 6 * 6 and len(set(scenes)) == len(scenes)
    images = [scene.render() for scene in scenes[::5]]
    assert all_three_accuracy(checker, images, scenes[::5]) == 1.0
    # A wrong ask lowers it: every scene shifted by one.
    assert all_three_accuracy(checker, images, scenes[1::5]) < 0.2
    greens = [Scene(shape, "blue", "green").render() for shape in ("circle", "star")]
    assert background_share(checker, greens, "green") == 1.0
    assert background_share(checker, greens, "white") == 0.0


def test_attribute_embedder_is_a_clip_for_the_toy_world(checker):
    embedder = ToyAttributeEmbedder(checker)
    texts = embedder.embed_texts(["a photo of a red star on a blue background", "a photo of a star", ""])
    assert texts.shape == (3, 4 + 6 + 6)
    assert torch.allclose(texts[0].norm(), torch.tensor(1.0)) and texts[2].abs().sum() == 0
    red_star = Scene("star", "red", "blue", size=11.0).render()
    green_circle = Scene("circle", "green", "white", size=11.0).render()
    images = embedder.embed_images([red_star, green_circle])
    similarity = images @ texts[0]
    assert similarity[0] > 0.9 > 0.3 > similarity[1]


def test_load_evaluation_models_accepts_the_checker_folder():
    dino, clip = load_evaluation_models(str(CHECKER_DIR), str(CHECKER_DIR))
    assert isinstance(dino, ToyChecker) and isinstance(clip, ToyAttributeEmbedder)
    photos = sorted(SUBJECT_PHOTOS_DIR.glob("*.png"))
    assert len(photos) == 4


def test_checker_training_learns_from_ground_truth():
    checker, accuracy = train_checker(CheckerTrainingConfig(num_images=600, steps=60, batch_size=32))
    # Sixty steps are far from the shipped checker, but well above chance (1/6 for colour and background).
    assert accuracy["background"] > 0.5 and accuracy["color"] > 0.4, accuracy
    assert isinstance(checker.judge([SUBJECT.render()])[0].subject_probability, float)


def test_pretraining_is_seeded_and_writes_a_diffusers_pipeline(tmp_path):
    tiny = PretrainConfig(num_images=64, vae_steps=2, vae_batch_size=8, steps=2, batch_size=8, warmup_steps=1)
    first = DiffusionPipeline.from_pretrained(pretrain_toy_model(tmp_path / "a", tiny))
    second = DiffusionPipeline.from_pretrained(pretrain_toy_model(tmp_path / "b", tiny))
    assert isinstance(first.scheduler, DDIMScheduler)
    assert (tmp_path / "a" / "pretrain_config.json").is_file()
    for name in ("unet", "vae", "text_encoder"):
        for (key, a), b in zip(getattr(first, name).state_dict().items(), getattr(second, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs between two runs with the same seed"
    assert first.vae.config.scaling_factor == second.vae.config.scaling_factor != 0.18215
    image = first("a photo of a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_sampled_world_never_draws_the_subject():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, pattern_p=1.0) for _ in range(500)]
    assert not any(scene.shape == "star" and set(scene.pattern) == set(SUBJECT.pattern) for scene in scenes)
