"""`accelerate launch examples/train.py` end to end, with diffusers' flags, on one and on two CPU processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION
from diffusers import DiffusionPipeline
from hub_server import LocalHub
from PIL import Image
from safetensors.torch import load_file
from test_drop_in_options import README_COMMANDS, tiny_readme_command

from diffusers_dreambooth.quiet_imports import IMPORT_NOISE

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
AUDITED_RUN = Path(__file__).resolve().parent / "audited_run.py"


def launch(
    launcher_args: list[str], flags: list[str], env: dict | None = None, wrapper: list[str] = ()
) -> subprocess.CompletedProcess:
    """`accelerate launch [launcher_args] [wrapper] examples/train.py [flags]`; fails the test if the run fails."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, *wrapper, str(TRAIN_SCRIPT), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def diffusers_flags(pipeline_dir, instance_dir, class_dir, output_dir, batch_size: int) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={pipeline_dir}",
        f"--instance_data_dir={instance_dir}",
        f"--class_data_dir={class_dir}",
        f"--output_dir={output_dir}",
        "--with_prior_preservation",
        "--prior_loss_weight=1.0",
        "--instance_prompt=a photo of sks dog",
        "--class_prompt=a photo of dog",
        f"--resolution={TINY_RESOLUTION}",
        f"--train_batch_size={batch_size}",
        "--gradient_accumulation_steps=1",
        "--learning_rate=1e-3",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--num_class_images=4",
        "--max_train_steps=3",
        "--checkpointing_steps=2",
        "--seed=0",
        "--report_to=none",
    ]


SINGLE = ["--num_processes=1", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--cpu"]
# accelerate starts several CPU processes (gloo) through torchrun when told to use the CPU by the environment.
DOUBLE = [
    "--multi_gpu",
    "--num_processes=2",
    "--num_cpu_threads_per_process=1",
    "--num_machines=1",
    "--mixed_precision=no",
    "--dynamo_backend=no",
]


@pytest.mark.slow
def test_accelerate_launch_single_process_with_diffusers_flags(pipeline_dirs, instance_dir, tmp_path):
    flags = diffusers_flags(pipeline_dirs["sd"], instance_dir, tmp_path / "class", tmp_path / "out", batch_size=2)
    result = launch(SINGLE, flags + ["--adapter=lora", "--rank=4"])
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert not [fragment for fragment in IMPORT_NOISE.values() if fragment in result.stderr]  # #18's console
    assert (tmp_path / "out" / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / "class").glob("class_*.png"))) == 4
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    pipe.load_lora_weights(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("adapter, prior_backward", [("full", "joint"), ("lora", "joint"), ("full", "separate")])
def test_two_processes_match_one_with_the_same_global_batch(
    pipeline_dirs, instance_dir, tmp_path, adapter, prior_backward
):
    """Also `--prior_backward separate` on two processes: the gradients are averaged over processes once, after
    both halves' backward passes, and match one process's joint batch."""
    class_dir = tmp_path / "class"
    options = [f"--adapter={adapter}", "--rank=4"]
    one = diffusers_flags(pipeline_dirs["sd"], instance_dir, class_dir, tmp_path / "one", batch_size=2) + options
    launch(SINGLE, one)
    two = diffusers_flags(pipeline_dirs["sd"], instance_dir, class_dir, tmp_path / "two", batch_size=1) + options
    two.append(f"--prior_backward={prior_backward}")
    launch(DOUBLE, two, env={"ACCELERATE_USE_CPU": "1"})
    weights = "pytorch_lora_weights.safetensors" if adapter == "lora" else "unet/diffusion_pytorch_model.safetensors"
    one, two = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    if adapter == "full":
        base = load_file(Path(pipeline_dirs["sd"]) / weights)
        assert all(not torch.equal(one[name], base[name]) or name.endswith("bias") for name in one)
    else:
        assert any(name.endswith("lora_B.weight") and one[name].abs().sum() > 0 for name in one)
    assert one.keys() == two.keys()
    # Float tolerance: gloo sums the two halves' gradients in another order than one process does, and Adam turns
    # such rounding of near-zero gradients into differences of a few 1e-5 (one element of 2304 was off by 3.3e-5
    # with torch 2.13): a tenth of one step's learning rate (1e-3) bounds it, a wrong batch split is far above it.
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_two_processes_split_class_images_without_duplicates(pipeline_dirs, instance_dir, tmp_path):
    def flags(class_dir, output_dir):
        options = diffusers_flags(pipeline_dirs["sd"], instance_dir, class_dir, output_dir, batch_size=1)
        return [f for f in options if not f.startswith(("--num_class_images", "--max_train_steps"))] + [
            "--num_class_images=7",
            "--max_train_steps=1",
        ]

    launch(SINGLE, flags(tmp_path / "class_one", tmp_path / "one"))
    launch(DOUBLE, flags(tmp_path / "class_two", tmp_path / "two"), env={"ACCELERATE_USE_CPU": "1"})
    names = sorted(path.name for path in (tmp_path / "class_two").iterdir())
    assert names == [f"class_{index:05d}.png" for index in range(7)]
    for name in names:
        one = np.asarray(Image.open(tmp_path / "class_one" / name), dtype=np.int16)
        two = np.asarray(Image.open(tmp_path / "class_two" / name), dtype=np.int16)
        assert np.abs(one - two).max() <= 1, name  # same seed per image; batches of other sizes round differently


@pytest.mark.slow
def test_only_the_main_process_writes_checkpoints_cards_and_uploads(pipeline_dirs, instance_dir, tmp_path):
    output_dir, audit_log = tmp_path / "out", tmp_path / "audit"
    flags = diffusers_flags(pipeline_dirs["sd"], instance_dir, tmp_path / "class", output_dir, batch_size=1) + [
        "--checkpointing_steps=1",
        "--validation_prompt=a photo of sks dog",
        "--validation_steps=1",
        "--num_validation_images=1",
        "--validation_inference_steps=2",
        "--push_to_hub",
        "--hub_model_id=user/two-processes",
    ]
    with LocalHub(tmp_path / "hub_storage") as hub:
        hub_env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": hub.token,
        }
        audit_env = {"AUDIT_FOLDER": str(output_dir), "AUDIT_LOG": str(audit_log), "ACCELERATE_USE_CPU": "1"}
        launch(DOUBLE, flags, env={**hub_env, **audit_env}, wrapper=[str(AUDITED_RUN)])
        hub_address = hub.endpoint.removeprefix("http://")
        commits = hub.commits["user/two-processes"]

    main, other = (Path(f"{audit_log}.rank{rank}").read_text().splitlines() for rank in (0, 1))
    # The hook sees the main process's writes: checkpoints, the card, validation images, the upload.
    for name in ("checkpoint-1", "checkpoint-3"):
        assert f"rename {output_dir / f'.{name}.partial'} -> {output_dir / name}" in main
    assert f"write {output_dir / 'README.md'}" in main
    validation = output_dir / "validation" / "step-1"  # each image written aside, then renamed into place
    assert f"write {validation / '.0.png.partial'}" in main
    assert f"rename {validation / '.0.png.partial'} -> {validation / '0.png'}" in main
    assert f"connect {hub_address}" in main
    assert commits == 1
    # ... and none from the other process.
    assert [line for line in other if str(output_dir) in line or hub_address in line] == []


#: The families whose README commands `test_text_encoder_sharding.py` already trains on two processes.
ELSEWHERE = ("flux2", "flux2_klein", "z_image", "ideogram4")


@pytest.mark.slow
@pytest.mark.parametrize("family", [name for name in README_COMMANDS if name not in ELSEWHERE])
def test_each_familys_readme_command_trains_on_two_processes(family, pipeline_dirs, tmp_path):
    """#17's "several processes" for every family: its README command, on its tiny model, trains 2 steps over two
    CPU processes (gloo) and saves a LoRA that loads in plain diffusers, with the keys of the one-process run."""
    runs = {}
    for launcher, folder in ((SINGLE, "one"), (DOUBLE, "two")):
        flags = tiny_readme_command(family, pipeline_dirs[family], tmp_path / folder)
        # Without the README's Hub VAE (SDXL's) and buckets past the tiny transformers' positions (Z-Image's).
        flags = [f for f in flags if not f.startswith(("--aspect_ratio_buckets=", "--pretrained_vae_model_name"))]
        if family == "hidream":  # its README's Hub dataset: the photos instead (test_hidream.py trains on captions)
            flags = [f for f in flags if not f.startswith(("--dataset_name", "--caption_column"))]
            flags.append(f"--instance_data_dir={tmp_path / folder / 'dog'}")
        launch(launcher, flags, env={"ACCELERATE_USE_CPU": "1"} if launcher is DOUBLE else None)
        runs[folder] = tmp_path / folder / f"trained-{family}-lora"
    one, two = (load_file(runs[name] / "pytorch_lora_weights.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in two.items())  # it trained
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs[family])
    pipe.load_lora_weights(runs["two"])
