"""A user's mistake stops `examples/train.py` with one `error:` line and exit status 2, as a bad flag does.

No traceback (those are for bugs), and each case fails before the base model loads: a wrong path costs seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RESOLUTION, write_subject_images
from test_bad_images import png_declaring_size

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def missing_folder(tmp_path: Path) -> tuple[dict, str]:
    return {"instance_data_dir": tmp_path / "no_such_folder"}, "`--instance_data_dir`: Image folder `"


def empty_folder(tmp_path: Path) -> tuple[dict, str]:
    (tmp_path / "empty").mkdir()
    return {"instance_data_dir": tmp_path / "empty"}, f"No images found in `{tmp_path / 'empty'}`"


def folder_without_readable_images(tmp_path: Path) -> tuple[dict, str]:
    folder = tmp_path / "unreadable"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a photo")
    (folder / "photo.png").write_bytes(b"")
    return {"instance_data_dir": folder}, f"None of the images in `{folder}` could be read (photo.png)"


def decompression_bomb(tmp_path: Path) -> tuple[dict, str]:
    folder = write_subject_images(tmp_path / "photos")
    png_declaring_size(folder / "bomb.png", 100_000, 100_000)  # just a header: past PIL's limit, nothing to decode
    return {"instance_data_dir": folder}, "bomb.png` is too large to decode safely"


def resolution_not_a_multiple(tmp_path: Path) -> tuple[dict, str]:
    return {"resolution": TINY_RESOLUTION + 1}, f"`--resolution={TINY_RESOLUTION + 1}` must be a multiple of 2"


def model_folder_without_model_index(tmp_path: Path) -> tuple[dict, str]:
    (tmp_path / "weights").mkdir()
    return {"pretrained_model_name_or_path": tmp_path / "weights"}, "is a folder without `model_index.json`"


def output_dir_is_a_file(tmp_path: Path) -> tuple[dict, str]:
    (tmp_path / "out").write_text("")
    return {"output_dir": tmp_path / "out"}, "is an existing file, not a folder. Pass a folder path"


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake",
    [
        missing_folder,
        empty_folder,
        folder_without_readable_images,
        decompression_bomb,
        resolution_not_a_multiple,
        model_folder_without_model_index,
        output_dir_is_a_file,
    ],
    ids=lambda mistake: mistake.__name__,
)
def test_a_mistake_is_one_error_line_with_exit_status_2(pipeline_dirs, tmp_path, mistake):
    changed, expected = mistake(tmp_path)
    output = run_with_a_mistake(pipeline_dirs, tmp_path, changed, expected)
    assert "Loading pipeline components" not in output  # failed before the base model loaded


#: Mistakes only the loaded model reveals: `--resolution` against another VAE, an option the family cannot train
#: with, and a push nobody could load (a LoRA on a local base).
MISTAKES_FOUND_AFTER_LOADING = {
    "resolution_with_another_vae": (
        lambda dirs: {"pretrained_vae_model_name_or_path": f"{dirs['sd']}/vae", "resolution": TINY_RESOLUTION + 1},
        "must be a multiple of 2",
    ),
    "option_of_another_family": (lambda dirs: {"adapter": "lora", "lora_blocks": "1"}, "`--lora_blocks`"),
    "push_of_a_lora_on_a_local_base": (
        lambda dirs: {"adapter": "lora", "push_to_hub": True},
        "nobody could load the pushed adapter",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MISTAKES_FOUND_AFTER_LOADING)
def test_a_mistake_found_once_the_model_is_loaded_is_one_error_line_too(pipeline_dirs, tmp_path, name):
    changed, expected = MISTAKES_FOUND_AFTER_LOADING[name]
    output = run_with_a_mistake(pipeline_dirs, tmp_path, changed(pipeline_dirs), expected)
    assert "Loading pipeline components" in output


def run_with_a_mistake(pipeline_dirs: dict[str, str], tmp_path: Path, changed: dict, expected: str) -> str:
    """Run `examples/train.py` on the tiny SD pipeline with the `changed` options; check that it exits with 2 and
    prints one `error:` line holding `expected` and no traceback. Returns stdout and stderr."""
    options = {
        "pretrained_model_name_or_path": pipeline_dirs["sd"],
        "instance_data_dir": write_subject_images(tmp_path / "instance"),
        "instance_prompt": "a photo of sks dog",
        "output_dir": tmp_path / "trained",
        "resolution": TINY_RESOLUTION,
        "max_train_steps": 1,
        "seed": 0,
        "report_to": "none",
    }
    flags = [f"--{name}={value}" for name, value in {**options, **changed}.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *flags], capture_output=True, text=True, env=env, timeout=300
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), errors
    assert expected in errors[0]
    return output


def test_help_prints_the_options_and_announces_no_training(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0 and "--prior_backward" in result.stdout
    assert "training the bundled subject" not in result.stderr
    assert list(tmp_path.iterdir()) == []
