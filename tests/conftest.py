"""Shared fixtures: tiny offline pipelines, subject photos, and a clean accelerate state per test."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libgomp's default spin-waiting makes 2-thread torch many times slower when anything else uses the CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_dreambooth import DreamBoothConfig  # noqa: E402
from diffusers_dreambooth.testing_utils import save_dummy_pipeline  # noqa: E402

TINY_RESOLUTION = 32

#: A short, deterministic run on the tiny pipelines; tests override what they check.
TINY_RUN = dict(
    instance_prompt="a photo of sks dog",
    resolution=TINY_RESOLUTION,
    train_batch_size=1,
    max_train_steps=2,
    learning_rate=1e-3,
    lr_warmup_steps=0,
    seed=0,
    report_to="none",
    prior_generation_steps=2,
    validation_inference_steps=2,
)


def tiny_config(pretrained: str, instance_dir, output_dir, **overrides) -> DreamBoothConfig:
    """`TINY_RUN` on the pipeline folder `pretrained`, subject photos in `instance_dir`, writing to `output_dir`."""
    paths = dict(
        pretrained_model_name_or_path=str(pretrained),
        instance_data_dir=None if instance_dir is None else str(instance_dir),
        output_dir=str(output_dir),
    )
    return DreamBoothConfig(**{**TINY_RUN, **paths, **overrides})


def save_tiny_evaluation_models(
    root: Path,
    image_size: int = 32,
    patch_size: int = 8,
    vit_hidden_size: int = 32,
    vit_layers: int = 2,
    clip_projection_dim: int = 16,
) -> dict[str, str]:
    """A tiny random ViT ("dino") and CLIP ("clip") under `root`, each saved with its processor like a Hub repo."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )

    from diffusers_dreambooth.testing_utils import build_clip_tokenizer, clip_text_config

    dino_dir, clip_dir = root / "dino", root / "clip"
    torch.manual_seed(0)
    vit_config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vit_hidden_size,
        num_hidden_layers=vit_layers,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(vit_config).save_pretrained(dino_dir)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(dino_dir)

    tokenizer = build_clip_tokenizer(root / "tokenizer")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    text_config = clip_text_config(
        tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    vision_config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=clip_projection_dim
    )
    CLIPModel(clip_config).save_pretrained(clip_dir)
    return {"dino": str(dino_dir), "clip": str(clip_dir)}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models run faster on one thread: on CPU, thread sync costs more than their small matmuls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each training run in a test builds its own Accelerator, as a new process would."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class SavedPipelines(dict):
    """Tiny pipeline folders by family key (`PIPELINE_FAMILIES`), each saved the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        self[family] = save_dummy_pipeline(family, self.root / family)
        return self[family]


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory) -> SavedPipelines:
    """Saved tiny pipelines, loadable with from_pretrained: `sd` (epsilon), `sd2` (v-prediction), `sdxl`, `sd3`,
    `flux`, DeepFloyd IF's stage I `if` and stage II `if_sr`, and the key of every family module of `testing_utils`."""
    return SavedPipelines(tmp_path_factory.mktemp("pipelines"))


def write_subject_images(directory: Path, count: int = 4, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """`count` noise-textured photos of `size` (width, height), with a distinct colour each."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 64, (size[1], size[0], 3), dtype=np.uint8)
        pixels[..., index % 3] += 160
        Image.fromarray(pixels).save(directory / f"photo_{index}.png")
    return directory


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    """Four non-square subject photos (48x40), so crops are random unless --center_crop."""
    return write_subject_images(tmp_path / "instance")


@pytest.fixture
def square_instance_dir(tmp_path) -> Path:
    """Four square subject photos at the training resolution, so their latents are cached."""
    return write_subject_images(tmp_path / "square_instance", size=(TINY_RESOLUTION, TINY_RESOLUTION))
