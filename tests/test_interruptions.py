"""Faults injected into real runs (issue #5): SIGKILL at any moment, Ctrl-C and SIGTERM, a NaN loss, a full disk.

The kill tests start `examples/train.py` as a real process on the tiny pipeline, stop it once it has saved a
checkpoint (or some class images), run the same command again, and compare with a run that was never stopped.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from PIL import Image
from safetensors.torch import load_file

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.safeguards import (
    DiskSpaceError,
    NonFiniteLossError,
    StopRequest,
    check_free_space,
    stop_requests,
)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
#: One thread in every child, so a resumed run computes bit for bit what an unbroken one does.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train_flags(pipeline_dir, instance_dir, output_dir, *extra: str) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={pipeline_dir}",
        f"--instance_data_dir={instance_dir}",
        f"--output_dir={output_dir}",
        "--instance_prompt=a photo of sks dog",
        f"--resolution={TINY_RESOLUTION}",
        "--train_batch_size=2",
        "--learning_rate=1e-3",
        "--lr_scheduler=linear",
        "--lr_warmup_steps=0",
        "--seed=0",
        "--report_to=none",
        "--num_validation_images=0",
        *extra,
    ]


def start(flags: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(TRAIN_SCRIPT), *flags]
    return subprocess.Popen(command, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(flags: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *flags], env=CHILD_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stop_when(process: subprocess.Popen, ready, signum: int, timeout: float = 300) -> tuple[int, str]:
    """Send `signum` to `process` as soon as `ready()` holds; return its exit code and stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before it could be stopped:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run never got to the point where it is stopped"
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


TRAINING_STEPS = ["--max_train_steps=80", "--checkpointing_steps=1", "--checkpoints_total_limit=3"]


@pytest.fixture(scope="module")
def unbroken_weights(pipeline_dirs, tmp_path_factory):
    """The final UNet of the run that the interrupted runs repeat, never stopped."""
    root = tmp_path_factory.mktemp("unbroken")
    instance_dir = write_subject_images(root / "instance")
    run(train_flags(pipeline_dirs["sd"], instance_dir, root / "out", *TRAINING_STEPS))
    return instance_dir, load_file(root / "out" / UNET_WEIGHTS)


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_every_earlier_checkpoint_loadable(pipeline_dirs, unbroken_weights, tmp_path):
    """SIGKILL while a checkpoint is being written (its `.checkpoint-N.partial` folder exists): the partial one is
    never listed, each whole checkpoint loads as diffusers' README does (`checkpoint-N/unet`), and resuming from
    `latest` ends where the unbroken run does."""
    from diffusers import UNet2DConditionModel

    instance_dir, expected = unbroken_weights
    for attempt in range(3):  # the save can finish in the instant between seeing its folder and the kill
        out = tmp_path / f"out-{attempt}"
        flags = train_flags(pipeline_dirs["sd"], instance_dir, out, *TRAINING_STEPS)

        def saving(out=out) -> bool:
            return (out / "checkpoint-3").is_dir() and any(out.glob(".checkpoint-*.partial"))

        code, stderr = stop_when(start(flags), saving, signal.SIGKILL)
        assert code == -signal.SIGKILL
        if list(out.glob(".checkpoint-*.partial")):
            break
    else:
        pytest.fail("no kill landed during a save in 3 attempts")

    saved = list_checkpoints(out)
    assert saved and all(not path.name.startswith(".") for path in saved)
    for checkpoint in saved:
        UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    run(flags + ["--resume_from_checkpoint=latest"])
    resumed = load_file(out / UNET_WEIGHTS)
    assert all(torch.equal(resumed[name], value) for name, value in expected.items())
    assert not list(out.glob(".checkpoint-*"))  # the resumed run's pruning or saving cleared the leftover


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_run_resumes_to_the_weights_of_an_unbroken_one(pipeline_dirs, unbroken_weights, tmp_path, signum):
    instance_dir, expected = unbroken_weights
    out = tmp_path / "out"
    flags = train_flags(pipeline_dirs["sd"], instance_dir, out, *TRAINING_STEPS)

    code, stderr = stop_when(start(flags), lambda: (out / "checkpoint-3").is_dir(), signum)

    saved = list_checkpoints(out)
    assert saved, stderr[-3000:]
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 3 <= stopped_at < 80
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # the step in progress finished and was saved, and the process said how to go on
        assert code == 128 + signum, stderr[-3000:]
        assert f"Stopped by {signum.name} after step {stopped_at}" in stderr
        assert "--resume_from_checkpoint latest" in stderr
        assert not list(out.glob(".checkpoint-*"))
    assert not (out / "model_index.json").exists()

    run(flags + ["--resume_from_checkpoint=latest"])
    resumed = load_file(out / UNET_WEIGHTS)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-78", "checkpoint-79", "checkpoint-80"]
    assert not list(out.glob(".checkpoint-*"))


@pytest.mark.slow
def test_class_image_generation_killed_and_rerun_writes_each_image_once(pipeline_dirs, instance_dir, tmp_path):
    count = 120
    class_flags = [
        "--with_prior_preservation",
        "--class_prompt=a photo of dog",
        f"--num_class_images={count}",
        "--prior_generation_steps=10",
        "--sample_batch_size=4",
        "--max_train_steps=1",
    ]
    unbroken_dir, killed_dir = tmp_path / "unbroken_class", tmp_path / "class"
    pipeline_dir = pipeline_dirs["sd"]
    run(train_flags(pipeline_dir, instance_dir, tmp_path / "a", f"--class_data_dir={unbroken_dir}", *class_flags))

    flags = train_flags(pipeline_dir, instance_dir, tmp_path / "b", f"--class_data_dir={killed_dir}", *class_flags)
    code, _ = stop_when(start(flags), lambda: len(list(killed_dir.glob("class_*.png"))) >= 10, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert len(list(killed_dir.glob("class_*.png"))) < count
    run(flags)

    names = sorted(path.name for path in killed_dir.iterdir() if not path.name.startswith("."))
    assert names == [f"class_{index:05d}.png" for index in range(count)]
    for name in names:
        killed = np.asarray(Image.open(killed_dir / name).convert("RGB"), dtype=np.int16)
        unbroken = np.asarray(Image.open(unbroken_dir / name).convert("RGB"), dtype=np.int16)
        # A batch that restarts at another index rounds floats differently: at most one 8-bit level apart.
        assert np.abs(killed - unbroken).max() <= 1, name


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_earlier_checkpoints(pipeline_dirs, instance_dir, tmp_path):
    # An absurd learning rate sends the weights to infinity after one update, so step 2's loss is NaN.
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        learning_rate=1e30,
        lr_scheduler="constant",
        max_train_steps=6,
        checkpointing_steps=1,
    )
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 2; stopping before applying it") as error:
        DreamBoothTrainer(config).train()
    assert "checkpoint-1" in str(error.value)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-1"]
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_an_infinite_loss_stops_the_run_before_its_first_update(pipeline_dirs, instance_dir, tmp_path):
    # A prior weight past float32's range makes the first step's loss infinite.
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(tmp_path / "class"),
        num_class_images=1,
        prior_loss_weight=1e39,
        max_train_steps=3,
        checkpointing_steps=1,
    )
    with pytest.raises(NonFiniteLossError, match=r"became inf at step 1;.*none \(none saved yet\)"):
        DreamBoothTrainer(config).train()
    assert list_checkpoints(tmp_path / "out") == []


def test_stop_requests_catch_the_first_signal_and_stop_at_once_on_the_second():
    previous = signal.getsignal(signal.SIGTERM)
    with stop_requests() as stop:
        assert isinstance(stop, StopRequest) and not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received twice"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_under_accelerate_launch_is_one_stop_request():
    """The terminal's SIGINT, then at once the SIGTERM `accelerate launch` sends its child: one request, saved."""
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGINT
        stop.received_at -= StopRequest.SAME_REQUEST_SECONDS  # later, another signal is a second request
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received twice"):
            os.kill(os.getpid(), signal.SIGTERM)


def test_free_space_check_names_the_folder_and_the_sizes(tmp_path):
    check_free_space(tmp_path, 1, "a checkpoint")
    with pytest.raises(DiskSpaceError, match=r"Not enough free disk space for a checkpoint in `.*missing`: .* free"):
        check_free_space(tmp_path / "missing", 10**18, "a checkpoint")


def small_disks_available() -> bool:
    """Whether this machine lets an unprivileged test mount a tmpfs in a private mount namespace (`unshare`)."""
    probe = ["unshare", "--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:
        return False


def run_on_a_small_disk(size: str, folder: Path, snapshot: Path, flags: list[str]) -> subprocess.CompletedProcess:
    """Run the training script with a fresh tmpfs of `size` mounted at `folder`; copy what it wrote to `snapshot`.

    The tmpfs lives in a private mount namespace and disappears with the run, hence the copy.
    """
    folder.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    train = shlex.join([sys.executable, str(TRAIN_SCRIPT), *flags])
    script = f"""mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))} || exit 90
{train}
status=$?
cp -a {shlex.quote(str(folder))}/. {shlex.quote(str(snapshot))}
exit $status"""
    command = ["unshare", "--mount", "--map-root-user", "bash", "-c", script]
    return subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=600)


needs_small_disks = pytest.mark.skipif(
    not small_disks_available(), reason="needs `unshare` to mount a small tmpfs (user or root mount namespaces)"
)


@needs_small_disks
def test_a_full_disk_stops_the_run_before_a_checkpoint_and_the_last_one_resumes(pipeline_dirs, instance_dir, tmp_path):
    # A 3 MB disk holds two checkpoints of the tiny UNet (about 1 MB each) but not the third's generous estimate.
    steps = ["--max_train_steps=5", "--checkpointing_steps=1"]
    output_dir, snapshot = tmp_path / "out", tmp_path / "what_the_full_disk_held"
    result = run_on_a_small_disk(
        "3m", output_dir, snapshot, train_flags(pipeline_dirs["sd"], instance_dir, output_dir, *steps)
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stop = re.search(r"Not enough free disk space for checkpoint-(\d+) in `([^`]+)`: .* free", result.stderr)
    assert stop is not None, result.stderr[-3000:]
    assert stop.group(2) == str(output_dir)
    kept = int(stop.group(1)) - 1
    held = sorted(p.name for p in snapshot.iterdir() if p.name != "logs")  # logs/progress.jsonl: the step log
    assert kept >= 1 and held == [f"checkpoint-{k}" for k in range(1, kept + 1)]

    # Nothing was lost: the same command resumes from the last checkpoint (now on a roomy disk) to an unbroken end.
    run(train_flags(pipeline_dirs["sd"], instance_dir, snapshot, *steps, "--resume_from_checkpoint=latest"))
    run(train_flags(pipeline_dirs["sd"], instance_dir, tmp_path / "unbroken", *steps))
    resumed, unbroken = load_file(snapshot / UNET_WEIGHTS), load_file(tmp_path / "unbroken" / UNET_WEIGHTS)
    assert resumed.keys() == unbroken.keys()
    assert all(torch.equal(resumed[name], unbroken[name]) for name in unbroken)


@needs_small_disks
def test_a_class_image_folder_on_a_full_disk_stops_before_generating(pipeline_dirs, instance_dir, tmp_path):
    class_dir, snapshot = tmp_path / "class", tmp_path / "what_the_full_disk_held"
    flags = train_flags(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        "--with_prior_preservation",
        "--class_prompt=a photo of dog",
        f"--class_data_dir={class_dir}",
        "--num_class_images=20",
        "--max_train_steps=1",
    )
    result = run_on_a_small_disk("32k", class_dir, snapshot, flags)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"Not enough free disk space for the class images in `{class_dir}`" in result.stderr
    assert not any(snapshot.iterdir()) and not any((tmp_path / "out").iterdir())
