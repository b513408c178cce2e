"""The bundled toy base model and the main job on it: `accelerate launch examples/train.py` with no arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_dreambooth import DreamBoothPipeline, DreamBoothTrainer
from diffusers_dreambooth.cli import names_a_subject, parse_toy_config
from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR, SUBJECT_PHOTOS_DIR, toy_dreambooth_config
from diffusers_dreambooth.toy.checker import ToyChecker
from diffusers_dreambooth.toy.metrics import generate, prior_accuracy, subject_share
from diffusers_dreambooth.toy.world import CLASS_PROMPT, SUBJECT_PROMPT

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
NUM_JUDGED = 32
#: Bounds of the fast binding/drift check, below what the shipped model reaches with the main job (RESULTS.md: binding
#: 0.94, drift 0, class images still stars 0.88; without the prior loss drift is far above 0.5). A broken identifier
#: binding gives 0, a broken prior loss the no-prior drift.
BINDING_AT_LEAST = 0.6
DRIFT_AT_MOST = 0.1
NO_PRIOR_DRIFT_AT_LEAST = 0.5
CLASS_STARS_AT_LEAST = 0.5


@pytest.fixture(scope="module")
def checker():
    return ToyChecker.from_pretrained(CHECKER_DIR).eval()


def test_toy_recipe_points_at_bundled_files():
    config = toy_dreambooth_config()
    assert Path(config.pretrained_model_name_or_path) == BASE_MODEL_DIR
    assert (BASE_MODEL_DIR / "model_index.json").is_file()
    assert len(list(SUBJECT_PHOTOS_DIR.glob("*.png"))) == 4
    assert config.with_prior_preservation and config.evaluate and config.class_prompt == CLASS_PROMPT


def test_toy_recipe_with_a_concepts_list_drops_the_bundled_subject(tmp_path):
    """Each entry names its own photos, prompts and class folder, so the recipe's one-subject fields step aside."""
    concepts = [
        {
            "instance_data_dir": str(SUBJECT_PHOTOS_DIR),
            "instance_prompt": SUBJECT_PROMPT,
            "class_prompt": CLASS_PROMPT,
            "class_data_dir": str(tmp_path / "stars"),
        },
        {
            "instance_data_dir": str(SUBJECT_PHOTOS_DIR),
            "instance_prompt": "a photo of zwx circle",
            "class_prompt": "a photo of a circle",
            "class_data_dir": str(tmp_path / "circles"),
        },
    ]
    config = toy_dreambooth_config(output_dir=tmp_path, concepts_list=concepts)
    assert config.instance_data_dir is None and config.instance_prompt is None and config.class_prompt is None
    subjects = config.subject_data()
    assert [s.instance_prompt for s in subjects] == [SUBJECT_PROMPT, "a photo of zwx circle"]
    assert [s.class_prompt for s in subjects] == [CLASS_PROMPT, "a photo of a circle"]
    assert [s.class_data_dir for s in subjects] == [str(tmp_path / "stars"), str(tmp_path / "circles")]


@pytest.mark.slow
def test_base_model_draws_what_full_prompts_ask(checker):
    """Shape, colour and background all right on the 144 full prompts: 0.97 for the shipped model (target 0.95)."""
    base = DiffusionPipeline.from_pretrained(BASE_MODEL_DIR)
    base.set_progress_bar_config(disable=True)
    assert prior_accuracy(base, checker) >= 0.95


@pytest.mark.slow
def test_main_job_trains_the_bundled_subject_and_keeps_the_class(tmp_path, checker):
    """`accelerate launch examples/train.py` with no arguments: subject, grid, card with metrics; stars stay stars."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(TRAIN_SCRIPT)]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    output_dir = tmp_path / "toy-sks-star"
    metadata = json.loads((output_dir / "dreambooth.json").read_text())
    assert set(metadata["evaluation"]) >= {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"}
    assert metadata["training"]["with_prior_preservation"] and metadata["training"]["max_train_steps"] == 1000
    assert Image.open(output_dir / "samples" / "grid.png").size == (4 * 128, 5 * 128)
    card = (output_dir / "README.md").read_text()
    assert "![sample grid](samples/grid.png)" in card and "| DINO |" in card
    assert len(list((output_dir / "class_images").glob("class_*.png"))) == 100

    trained = DreamBoothPipeline.from_pretrained(output_dir).pipeline
    trained.set_progress_bar_config(disable=True)
    # Identifier binding and language drift, the paper's prior-preservation ablation in small (RESULTS.md).
    assert subject_share(checker, generate(trained, [SUBJECT_PROMPT] * NUM_JUDGED, seed=1)) >= BINDING_AT_LEAST
    class_images = generate(trained, [CLASS_PROMPT] * NUM_JUDGED, seed=2)
    assert subject_share(checker, class_images) <= DRIFT_AT_MOST
    assert sum(j.shape == "star" for j in checker.judge(class_images)) / NUM_JUDGED >= CLASS_STARS_AT_LEAST


def test_the_lora_recipe_is_the_main_jobs_variant_with_adapter_lora():
    """`examples/train.py --adapter lora` (no base model named) trains `toy_dreambooth_config(adapter="lora")`."""
    config = toy_dreambooth_config(adapter="lora")
    assert config.adapter == "lora" and config.output_dir == "toy-sks-star-lora"
    assert config.class_data_dir == str(Path("toy-sks-star-lora") / "class_images")
    assert config.train_text_encoder_ti and not config.train_text_encoder and config.rank <= 32
    assert "conv1" in config.lora_target_modules.split(",") and config.max_train_steps == 1000
    assert parse_toy_config(["--adapter", "lora"]).to_dict() == config.to_dict()
    assert parse_toy_config([]).to_dict() == toy_dreambooth_config().to_dict()
    assert parse_toy_config(["--adapter=lora", "--max_train_steps=10"]).max_train_steps == 10
    assert not names_a_subject(["--adapter", "lora"]) and names_a_subject(["--pretrained_model_name_or_path=x"])


@pytest.mark.slow
def test_main_job_with_adapter_lora_binds_the_subject_and_keeps_the_class(tmp_path, checker):
    """`accelerate launch examples/train.py --adapter lora`: the toy LoRA recipe binds as the full main job does
    (RESULTS.md, issue #20); the saved adapter and embeddings load in `DreamBoothPipeline`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(TRAIN_SCRIPT)]
    subprocess.run([*command, "--adapter", "lora"], cwd=tmp_path, env=env, check=True, capture_output=True)
    output_dir = tmp_path / "toy-sks-star-lora"
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(output_dir / "samples" / "grid.png").size == (4 * 128, 5 * 128)

    subject = DreamBoothPipeline.from_pretrained(output_dir)
    trained = subject.pipeline
    trained.set_progress_bar_config(disable=True)
    prompt = subject.fill_prompt("a photo of {subject}")
    assert subject_share(checker, generate(trained, [prompt] * NUM_JUDGED, seed=1)) >= BINDING_AT_LEAST
    assert subject_share(checker, generate(trained, [CLASS_PROMPT] * NUM_JUDGED, seed=2)) <= DRIFT_AT_MOST


@pytest.mark.slow
def test_without_the_prior_loss_the_class_drifts_to_the_subject(tmp_path, checker):
    """The control for the main job's drift bound: the same run without prior preservation (500 steps, where the
    benchmark measured drift 0.88) draws the subject for "a photo of a star", so the bound fails if the prior loss
    stops working."""
    config = toy_dreambooth_config(
        tmp_path / "no-prior",
        max_train_steps=500,
        with_prior_preservation=False,
        evaluate=False,
        num_validation_images=0,
        sample_prompts=None,
    )
    trained = DreamBoothTrainer(config).train()
    assert subject_share(checker, generate(trained, [SUBJECT_PROMPT] * NUM_JUDGED, seed=1)) >= BINDING_AT_LEAST
    assert subject_share(checker, generate(trained, [CLASS_PROMPT] * NUM_JUDGED, seed=2)) >= NO_PRIOR_DRIFT_AT_LEAST
