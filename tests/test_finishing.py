"""After the last step the trained subject is saved whole before samples, evaluation, card and push; a failure in any
of them costs nothing trained, is reported with the command that redoes it, and that command redoes it."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from diffusers_dreambooth import DreamBoothPipeline, DreamBoothTrainer, finishing
from diffusers_dreambooth.finishing import FinishingError
from diffusers_dreambooth.subject import SubjectMetadata
from diffusers_dreambooth.toy import CHECKER_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]


def finishing_config(pipeline_dirs, instance_dir, output_dir, **options):
    """A full fine-tune that asks for samples (a grid), evaluation and the card; push only when a test asks."""
    defaults = dict(
        class_prompt="a photo of dog",
        num_validation_images=2,
        sample_prompts=["a photo of {subject}", "a photo of dog"],
        evaluate=True,
        evaluation_prompts=["a photo of {subject}"],
        evaluation_images_per_prompt=2,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
    )
    return tiny_config(pipeline_dirs["sd"], instance_dir, output_dir, **{**defaults, **options})


def assert_subject_loads_and_generates(output_dir: Path) -> None:
    pipe = DreamBoothPipeline.from_pretrained(output_dir)
    image = pipe("a photo of {subject}", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.asarray(image).std() > 0


def fail(stage: str):
    def failing(job):
        raise RuntimeError(f"{stage} broke")

    return failing


@pytest.mark.parametrize("stage", finishing.STAGES)
def test_a_failing_stage_after_the_save_costs_nothing_and_the_others_still_run(
    pipeline_dirs, square_instance_dir, tmp_path, monkeypatch, stage
):
    output_dir = tmp_path / "out"
    options = {}
    if stage == "evaluation":  # a real failure: the evaluation model's folder holds weights but no config
        (tmp_path / "broken-model").mkdir()
        (tmp_path / "broken-model" / "model.safetensors").write_bytes(b"not a model")
        options = dict(evaluation_dino_model=str(tmp_path / "broken-model"))
    elif stage == "push":  # a real failure: the test suite runs with `HF_HUB_OFFLINE=1`
        options = dict(push_to_hub=True, hub_model_id="user/sks-dog")
    else:
        monkeypatch.setattr(finishing, {"samples": "write_samples", "card": "write_card"}[stage], fail(stage))
    config = finishing_config(pipeline_dirs, square_instance_dir, output_dir, **options)

    with pytest.raises(FinishingError) as raised:
        DreamBoothTrainer(config).train()

    assert list(raised.value.failures) == [stage]
    assert f"python -m diffusers_dreambooth.finishing {output_dir} --stages {stage}" in str(raised.value)
    assert not (output_dir / ".final.partial").exists()
    assert_subject_loads_and_generates(output_dir)
    metadata = SubjectMetadata.from_json_file(output_dir / "dreambooth.json")
    assert bool(metadata.sample_images) == (stage != "samples")
    assert ("DINO" in metadata.evaluation) == (stage != "evaluation")
    assert (output_dir / "README.md").is_file() == (stage != "card")


def test_redoing_the_samples_from_the_saved_folder_draws_the_trainings_images(
    pipeline_dirs, square_instance_dir, tmp_path
):
    """A LoRA subject: the redo loads the base model and the adapter, as a user would, and draws the same images."""
    output_dir = tmp_path / "out"
    config = finishing_config(pipeline_dirs, square_instance_dir, output_dir, adapter="lora", evaluate=False)
    DreamBoothTrainer(config).train()
    samples = output_dir / "samples"
    trained = {path.name: np.asarray(Image.open(path), dtype=np.int16) for path in sorted(samples.iterdir())}
    for path in samples.iterdir():
        path.unlink()
    (output_dir / "README.md").unlink()

    finishing.main([str(output_dir), "--stages", "samples", "card", "--device", "cpu"])

    redone = {path.name: np.asarray(Image.open(path), dtype=np.int16) for path in sorted(samples.iterdir())}
    assert sorted(redone) == sorted(trained) == ["grid.png", "sample_0.png", "sample_1.png"]
    for name, image in trained.items():
        assert np.abs(redone[name] - image).max() <= 2, name
    card = (output_dir / "README.md").read_text()
    assert "![sample grid](samples/grid.png)" in card


def test_redoing_the_card_needs_neither_the_base_model_nor_the_photos(pipeline_dirs, square_instance_dir, tmp_path):
    """Only what a stage needs is loaded: the card of a LoRA subject is redone with its base model and photos gone."""
    base, output_dir = tmp_path / "base", tmp_path / "out"
    shutil.copytree(pipeline_dirs["sd"], base)
    config = finishing_config(
        {"sd": str(base)}, square_instance_dir, output_dir, adapter="lora", evaluate=False, num_validation_images=1
    )
    DreamBoothTrainer(config).train()
    card = (output_dir / "README.md").read_text()
    (output_dir / "README.md").unlink()
    shutil.rmtree(base)
    shutil.rmtree(square_instance_dir)

    finishing.main([str(output_dir), "--stages", "card"])

    assert (output_dir / "README.md").read_text() == card


def test_redo_names_a_folder_without_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        finishing.main([str(tmp_path)])
    assert raised.value.code == 2
    assert "holds no `dreambooth.json`" in capsys.readouterr().err


@pytest.mark.slow
def test_the_training_script_exits_non_zero_when_a_stage_fails(pipeline_dirs, square_instance_dir, tmp_path):
    output_dir = tmp_path / "out"
    flags = [
        f"--pretrained_model_name_or_path={pipeline_dirs['sd']}",
        f"--instance_data_dir={square_instance_dir}",
        "--instance_prompt=a photo of sks dog",
        f"--output_dir={output_dir}",
        "--resolution=32",
        "--max_train_steps=2",
        "--num_validation_images=1",
        "--validation_inference_steps=2",
        "--report_to=none",
        "--push_to_hub",
        "--hub_model_id=user/sks-dog",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "train.py"), *flags], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert "The trained subject is saved whole" in last_line and "--stages push" in last_line
    assert (output_dir / "samples" / "sample_0.png").is_file() and (output_dir / "README.md").is_file()
    assert_subject_loads_and_generates(output_dir)


def test_final_validation_prompt_draws_the_samples_and_skip_final_inference_drops_them(
    pipeline_dirs, square_instance_dir, tmp_path
):
    """diffusers' `--final_validation_prompt` (when `--validation_prompt` is unset) and `--skip_final_inference`."""
    options = dict(evaluate=False, sample_prompts=None, num_validation_images=1)
    prompt = "a photo of {subject} on the moon"
    config = finishing_config(pipeline_dirs, square_instance_dir, tmp_path / "out", final_validation_prompt=prompt)
    DreamBoothTrainer(dataclasses.replace(config, **options)).train()
    metadata = SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json")
    assert metadata.sample_prompt == "a photo of sks dog on the moon" and len(metadata.sample_images) == 1

    skipped = dataclasses.replace(config, **options, skip_final_inference=True)
    job = finishing.FinishingJob(None, skipped, tmp_path / "out", metadata, seed=0, subject_photos=[])
    assert job.requested_stages() == ["card"]
