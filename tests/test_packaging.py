"""The built wheel carries the model-card template, and a card renders from the installed package alone."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_card_template_and_renders_from_it(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("diffusers_dreambooth-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "diffusers_dreambooth/model_cards/dreambooth.md" in archive.namelist()
        assert "diffusers_dreambooth/toy/world.py" in archive.namelist()
        for shipped in ("checker/config.json", "subject/subject_0.png", "base_model/unet/config.json"):
            assert f"diffusers_dreambooth/toy/pretrained/{shipped}" in archive.namelist(), shipped
        archive.extractall(tmp_path / "installed")
    code = """
import diffusers_dreambooth
from diffusers_dreambooth import Subject, SubjectMetadata
from diffusers_dreambooth.model_card import render_model_card
metadata = SubjectMetadata([Subject("sks", "dog", "a photo of sks dog")], "lora", "stable-diffusion",
                           "StableDiffusionPipeline", base_model="org/base", lora_weight_name="w.safetensors")
print(diffusers_dreambooth.__file__)
print(render_model_card(metadata, "user/sks-dog"))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path / "installed"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, card = result.stdout.split("\n", 1)
    assert module_file.startswith(str(tmp_path / "installed"))
    assert 'pipe.load_lora_weights("user/sks-dog")' in card and "base_model: org/base" in card
