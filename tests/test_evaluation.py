"""The paper's metrics on tiny random DINO (ViT) and CLIP models saved offline, and images of the toy world."""

import shutil

import numpy as np
import pytest
import torch
from conftest import save_tiny_evaluation_models, tiny_config
from PIL import Image
from safetensors.torch import load_file

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
from diffusers_dreambooth.evaluation import (
    MAX_CLASS_IMAGES,
    ClipEmbedder,
    DinoEmbedder,
    EvaluationResult,
    FeatureMapDistance,
    FeatureMapModel,
    ImageEmbedder,
    TextImageEmbedder,
    diversity,
    evaluate_subject,
    load_evaluation_models,
    mean_pairwise_cosine,
    paper_prompts,
    prompt_fidelity,
    strip_identifier,
    subject_fidelity,
)
from diffusers_dreambooth.subject import SubjectMetadata
from diffusers_dreambooth.toy import CHECKER_DIR
from diffusers_dreambooth.toy.world import Scene, subject_scene

IMAGE_SIZE = 32
VIT_HIDDEN_SIZE = 32
VIT_LAYERS = 2
PATCH_SIZE = 8
CLIP_PROJECTION_DIM = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """A tiny random ViT ("dino") and CLIP ("clip"), each saved with its processor like a Hub repo."""
    return save_tiny_evaluation_models(
        tmp_path_factory.mktemp("evaluation_models"),
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vit_hidden_size=VIT_HIDDEN_SIZE,
        vit_layers=VIT_LAYERS,
        clip_projection_dim=CLIP_PROJECTION_DIM,
    )


@pytest.fixture(scope="module")
def dino(model_dirs) -> DinoEmbedder:
    return DinoEmbedder.from_pretrained(model_dirs["dino"])


@pytest.fixture(scope="module")
def clip(model_dirs) -> ClipEmbedder:
    return ClipEmbedder.from_pretrained(model_dirs["clip"])


def subject_photos(count: int = 4, seed: int = 0) -> list[Image.Image]:
    """The toy subject (a striped star) at random poses on white: the "real" photos."""
    rng = np.random.default_rng(seed)
    return [subject_scene(rng).render() for _ in range(count)]


def plain_scenes(count: int = 4, shape: str = "circle") -> list[Image.Image]:
    """Plain `shape`s in several colours and backgrounds, unlike the subject."""
    colors, backgrounds = ("green", "blue", "purple", "orange"), ("black", "gray", "blue", "green")
    return [
        Scene(shape=shape, color=colors[i % 4], background=backgrounds[i % 4], size=8.0 + i).render()
        for i in range(count)
    ]


def flat(color: tuple[int, int, int], size: int = 4) -> Image.Image:
    return Image.new("RGB", (size, size), color)


class PixelMaps:
    """Raw pixels as feature maps, (N, 3, H, W) and (N, H*W, 3): distances computable by hand."""

    def feature_maps(self, images):
        pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images])
        return [pixels.permute(0, 3, 1, 2), pixels.flatten(1, 2)]


class ConstantPlusPixelMaps(PixelMaps):
    """A first layer that never differs between images, so the layer mean halves the pixel layer's distance."""

    def feature_maps(self, images):
        pixels = super().feature_maps(images)[0]
        return [torch.ones_like(pixels), pixels]


def test_mean_pairwise_cosine_is_the_mean_of_all_row_products():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # a @ b.T = [[1, 0.6], [0, 0.8]]
    assert mean_pairwise_cosine(a, b) == pytest.approx(2.4 / 4)
    assert mean_pairwise_cosine(a[:1], b[1:]) == pytest.approx(0.6)


def test_mean_pairwise_cosine_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match=r"\(2, 2\) and \(1, 3\)"):
        mean_pairwise_cosine(torch.eye(2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one row"):
        mean_pairwise_cosine(torch.eye(2), torch.ones(0, 2))


def test_embedders_follow_the_protocols(dino, clip):
    assert isinstance(dino, ImageEmbedder) and isinstance(dino, FeatureMapModel)
    assert not isinstance(dino, TextImageEmbedder)
    assert isinstance(clip, TextImageEmbedder) and not isinstance(clip, FeatureMapModel)


def test_dino_embeddings_are_unit_cls_tokens(dino):
    images = subject_photos(3)
    embeddings = dino.embed_images(images)
    assert embeddings.shape == (3, VIT_HIDDEN_SIZE)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)

    with torch.no_grad():
        pixels = dino.processor(images=images, return_tensors="pt")["pixel_values"]
        cls_tokens = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(embeddings, torch.nn.functional.normalize(cls_tokens, dim=-1), atol=1e-5)


def test_dino_embeddings_do_not_depend_on_batching(model_dirs):
    images = subject_photos(3) + plain_scenes(2)
    whole = DinoEmbedder.from_pretrained(model_dirs["dino"]).embed_images(images)
    embedder = DinoEmbedder.from_pretrained(model_dirs["dino"])
    embedder.batch_size = 2
    assert torch.allclose(embedder.embed_images(images), whole, atol=1e-5)
    maps = embedder.feature_maps(images)
    assert [layer.shape[0] for layer in maps] == [5] * VIT_LAYERS


def test_dino_feature_maps_are_the_transformer_layers(dino):
    maps = dino.feature_maps(subject_photos(2))
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
    assert [tuple(layer.shape) for layer in maps] == [(2, tokens, VIT_HIDDEN_SIZE)] * VIT_LAYERS


def test_clip_embeds_images_and_texts_in_one_unit_space(clip):
    images = clip.embed_images(subject_photos(2))
    texts = clip.embed_texts(["a photo of a star", "a photo of a circle", "a red star"])
    assert images.shape == (2, CLIP_PROJECTION_DIM) and texts.shape == (3, CLIP_PROJECTION_DIM)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_clip_truncates_texts_longer_than_its_context(clip):
    long_text = "a photo of a red star on a white background " * 40
    embedding = clip.embed_texts([long_text])
    assert embedding.shape == (1, CLIP_PROJECTION_DIM) and torch.isfinite(embedding).all()


def test_load_evaluation_models_from_folders(model_dirs):
    dino, clip = load_evaluation_models(
        model_dirs["dino"], model_dirs["clip"], torch_dtype=torch.float32, device="cpu"
    )
    assert isinstance(dino, DinoEmbedder) and isinstance(clip, ClipEmbedder)
    assert dino.model.dtype == torch.float32 and clip.model.device.type == "cpu"


def pickled_copy(folder: str, destination) -> str:
    """A copy of a saved transformers model folder with its weights only in a pickle `pytorch_model.bin`."""
    shutil.copytree(folder, destination)
    torch.save(load_file(destination / "model.safetensors"), destination / "pytorch_model.bin")
    (destination / "model.safetensors").unlink()
    return str(destination)


def test_evaluation_models_load_safetensors_only_unless_pickles_are_allowed(model_dirs, tmp_path):
    dino_dir = pickled_copy(model_dirs["dino"], tmp_path / "dino")
    with pytest.raises(
        OSError, match=r"^The evaluation model `.*dino` has no safetensors weights.*--allow_pickle"
    ) as e:
        load_evaluation_models(dino_dir, model_dirs["clip"])
    assert "\n" not in str(e.value)
    dino, _ = load_evaluation_models(dino_dir, model_dirs["clip"], allow_pickle=True)
    reference = DinoEmbedder.from_pretrained(model_dirs["dino"])
    image = subject_photos(1)
    assert torch.equal(dino.embed_images(image), reference.embed_images(image))


def test_subject_fidelity_prefers_the_subject(dino, clip):
    real = subject_photos(4, seed=0)
    same_subject = subject_photos(4, seed=1)
    unrelated = plain_scenes(4)
    for embedder in (dino, clip):
        assert subject_fidelity(real[:1] * 2, real[:1], embedder) == pytest.approx(1.0, abs=1e-5)
        related = subject_fidelity(same_subject, real, embedder)
        assert related > subject_fidelity(unrelated, real, embedder)
        assert related <= 1.0 + 1e-6


def test_subject_fidelity_needs_images(dino):
    with pytest.raises(ValueError, match="got 0 and 1"):
        subject_fidelity([], subject_photos(1), dino)


def test_prompt_fidelity_is_the_mean_cosine_of_matched_pairs(clip):
    images = subject_photos(2)
    prompts = ["a photo of a star", "a star on a white background"]
    expected = (clip.embed_images(images) * clip.embed_texts(prompts)).sum(-1).mean().item()
    assert prompt_fidelity(images, prompts, clip) == pytest.approx(expected, abs=1e-6)
    assert -1.0 <= expected <= 1.0


def test_prompt_fidelity_rejects_a_length_mismatch(clip):
    with pytest.raises(ValueError, match="got 2 images and 3 prompts"):
        prompt_fidelity(subject_photos(2), ["a star"] * 3, clip)


def test_feature_map_distance_matches_lpips_formula_by_hand():
    distance = FeatureMapDistance(PixelMaps())
    red, dark_red, green = flat((255, 0, 0)), flat((128, 0, 0)), flat((0, 255, 0))
    # Unit channel vectors: red and dark red are both (1, 0, 0), green (0, 1, 0): |u - v|^2 = 2 at every position.
    result = distance([red, red, red], [dark_red, green, red])
    assert torch.allclose(result, torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)
    half = FeatureMapDistance(ConstantPlusPixelMaps())([red], [green])
    assert half.item() == pytest.approx(1.0)


def test_feature_map_distance_averages_over_positions():
    green = Image.new("RGB", (2, 1), (0, 255, 0))
    left_red = green.copy()
    left_red.putpixel((0, 0), (255, 0, 0))
    # One position of two differs (by 2), in each of the two layers of `PixelMaps`.
    assert FeatureMapDistance(PixelMaps())([left_red], [green]).item() == pytest.approx(1.0)


def test_feature_map_distance_is_symmetric_and_zero_on_identical_images(dino):
    distance = FeatureMapDistance(dino)
    a, b = subject_photos(3), plain_scenes(3)
    assert torch.allclose(distance(a, a), torch.zeros(3), atol=1e-6)
    forward, backward = distance(a, b), distance(b, a)
    assert torch.allclose(forward, backward, atol=1e-6)
    assert (forward > 0).all()


def test_feature_map_distance_checks_its_arguments(dino):
    with pytest.raises(TypeError, match="feature_maps"):
        FeatureMapDistance(object())
    with pytest.raises(ValueError, match="got 2 and 1"):
        FeatureMapDistance(dino)(subject_photos(2), subject_photos(1))


def test_diversity_is_zero_for_identical_images_and_grows_with_variety(dino):
    distance = FeatureMapDistance(dino)
    photo = subject_photos(1)[0]
    identical = diversity([[photo] * 3, [photo] * 2], distance)
    assert identical == pytest.approx(0.0, abs=1e-6)
    poses = diversity([subject_photos(3)], distance)
    varied = diversity([plain_scenes(3, "circle"), [*plain_scenes(2, "square"), photo]], distance)
    assert identical < poses < varied


def test_diversity_averages_pairs_per_group_then_over_groups():
    distance = FeatureMapDistance(PixelMaps())
    red, green = flat((255, 0, 0)), flat((0, 255, 0))
    # Group 1: pairs (r, r), (r, g), (r, g) -> 4/3; group 2: one pair (r, g) -> 2; mean of the group means: 5/3.
    assert diversity([[red, red, green], [red, green]], distance) == pytest.approx(5 / 3)


def test_diversity_needs_pairs_in_every_group(dino):
    distance = FeatureMapDistance(dino)
    with pytest.raises(ValueError, match="group 1 of `images_by_prompt` has 1 image"):
        diversity([subject_photos(2), subject_photos(1)], distance)
    with pytest.raises(ValueError, match="empty"):
        diversity([], distance)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a photo of sks dog", "a photo of dog"),
        ("a sks dog in the jungle", "a dog in the jungle"),
        ("sks dog", "dog"),
        ("a photo of sks, a dog", "a photo of , a dog"),
        ("a photo of asks dog and sksy", "a photo of asks dog and sksy"),
        ("a  photo of a dog", "a photo of a dog"),
    ],
)
def test_strip_identifier_removes_the_word_and_collapses_spaces(prompt, expected):
    assert strip_identifier(prompt, "sks") == expected


def test_strip_identifier_handles_non_word_identifiers():
    assert strip_identifier("a photo of <zwx> backpack", "<zwx>") == "a photo of backpack"
    with pytest.raises(ValueError, match="identifier"):
        strip_identifier("a photo of dog", " ")


def test_paper_prompts():
    objects = paper_prompts("sks dog")
    live = paper_prompts("sks dog", kind="live")
    for prompts in (objects, live):
        assert len(prompts) == 25 and len(set(prompts)) == 25
        assert all("sks dog" in prompt for prompt in prompts)
    assert objects[0] == "a sks dog in the jungle" and objects[-1] == "a cube shaped sks dog"
    assert objects[:10] == live[:10] and objects[20:] == live[20:]
    assert "a sks dog wearing a santa hat" in live and "a sks dog floating in an ocean of milk" in objects
    assert paper_prompts("{subject}")[2] == "a {subject} on the beach"
    with pytest.raises(ValueError, match="kind"):
        paper_prompts("sks dog", kind="animal")


class SceneGenerator:
    """A stand-in pipeline: the subject for prompts with "sks", other shapes otherwise; it records its calls."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prompts: list[str], seed: int) -> list[Image.Image]:
        self.calls.append((prompts, seed))
        rng = np.random.default_rng(seed)
        if "sks" in prompts[0]:
            return [subject_scene(rng).render() for _ in prompts]
        return [Scene("circle", "green", "black", size=float(rng.uniform(7, 13))).render() for _ in prompts]


def test_evaluate_subject(dino, clip):
    real = subject_photos(4, seed=7)
    prompts = ["a photo of sks star", "a sks star on a white background"]
    generate = SceneGenerator()
    result = evaluate_subject(
        generate, real, prompts, "a photo of a star", "sks", dino=dino, clip=clip, images_per_prompt=2, seed=3
    )

    assert generate.calls == [
        (["a photo of sks star"] * 2, 3),
        (["a sks star on a white background"] * 2, 4),
        (["a photo of a star"] * 4, 5),
    ]
    assert isinstance(result, EvaluationResult) and result.num_images == 4
    for name in ("dino", "clip_i", "clip_t", "pres"):
        value = getattr(result, name)
        assert isinstance(value, float) and -1.0 <= value <= 1.0 + 1e-6, (name, value)
    assert isinstance(result.div, float) and result.div > 0
    assert result.pres < result.dino
    assert result.as_dict() == {
        "DINO": result.dino,
        "CLIP-I": result.clip_i,
        "CLIP-T": result.clip_t,
        "PRES": result.pres,
        "DIV": result.div,
        "num_images": 4,
    }

    generated = [image for batch, seed in generate.calls[:2] for image in SceneGenerator()(batch, seed)]
    assert result.dino == pytest.approx(subject_fidelity(generated, real, dino), abs=1e-6)
    assert result.clip_i == pytest.approx(subject_fidelity(generated, real, clip), abs=1e-6)
    stripped = ["a photo of star"] * 2 + ["a star on a white background"] * 2
    assert result.clip_t == pytest.approx(prompt_fidelity(generated, stripped, clip), abs=1e-6)
    with_identifier = [prompt for prompt in prompts for _ in range(2)]
    assert result.clip_t != pytest.approx(prompt_fidelity(generated, with_identifier, clip), abs=1e-6)
    distance = FeatureMapDistance(dino)
    assert result.div == pytest.approx(diversity([generated[:2], generated[2:]], distance), abs=1e-6)


def test_evaluate_subject_caps_the_class_images(dino, clip):
    generate = SceneGenerator()
    prompts = paper_prompts("sks star")[:9]
    evaluate_subject(generate, subject_photos(1), prompts, "a star", "sks", dino=dino, clip=clip)
    assert len(generate.calls) == 10
    assert generate.calls[-1] == (["a star"] * MAX_CLASS_IMAGES, 9)


def test_evaluate_subject_checks_its_arguments(dino, clip):
    real, generate = subject_photos(2), SceneGenerator()
    with pytest.raises(ValueError, match="pass `distance`"):
        evaluate_subject(generate, real, ["a sks star"], "a star", "sks", dino=clip, clip=clip)
    with pytest.raises(ValueError, match=r"identifier 'zwx'.*\['a sks star'\]"):
        evaluate_subject(generate, real, ["a sks star"], "a star", "zwx", dino=dino, clip=clip)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_subject(generate, real, ["a sks star"], "a star", "sks", dino=dino, clip=clip, images_per_prompt=1)
    assert generate.calls == [], "arguments are checked before anything is generated"
    with pytest.raises(ValueError, match="one image per prompt; it returned 1 for 2"):
        evaluate_subject(
            lambda batch, seed: generate(batch, seed)[:1],
            real,
            ["a sks star"],
            "a star",
            "sks",
            dino=dino,
            clip=clip,
            images_per_prompt=2,
        )


def test_evaluate_subject_takes_any_distance(dino, clip):
    result = evaluate_subject(
        SceneGenerator(),
        subject_photos(2),
        ["a sks star"],
        "a star",
        "sks",
        dino=clip,
        clip=clip,
        distance=FeatureMapDistance(PixelMaps()),
        images_per_prompt=2,
    )
    assert result.div > 0


def test_trainer_evaluates_after_training_and_writes_the_grid(pipeline_dirs, square_instance_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = tiny_config(
        pipeline_dirs["sd"],
        square_instance_dir,
        output_dir,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(tmp_path / "class"),
        num_class_images=2,
        num_validation_images=2,
        validation_inference_steps=2,
        sample_prompts=["a photo of {subject}", "a photo of {subject} on the beach", "a photo of dog"],
        evaluate=True,
        evaluation_prompts=["a photo of {subject}", "{subject} on the beach"],
        evaluation_images_per_prompt=2,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
    )
    DreamBoothTrainer(config).train()
    metadata = SubjectMetadata.from_json_file(output_dir / "dreambooth.json")
    for metric in ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"):
        assert isinstance(metadata.evaluation[metric], float), metric
    assert metadata.evaluation["prompts"] == 2 and metadata.evaluation["DINO model"] == "the toy world's checker"
    assert metadata.sample_grid_prompts[1] == "a photo of sks dog on the beach"
    grid = Image.open(output_dir / metadata.sample_grid)
    assert grid.size == (2 * 128, 3 * 128)  # 32 px samples scaled up to 128 px cells, one row per prompt
    card = (output_dir / "README.md").read_text()
    assert "## Evaluation" in card and "| DINO model | the toy world's checker |" in card
    assert "![sample grid](samples/grid.png)" in card and "`a photo of sks dog on the beach`" in card
    assert str(tmp_path) not in card


def test_evaluate_needs_a_class_prompt(tmp_path):
    with pytest.raises(ValueError, match="--class_prompt"):
        DreamBoothConfig(instance_data_dir="x", instance_prompt="a photo of sks dog", evaluate=True)
