"""Checkpoint folders `output_dir/checkpoint-N`, laid out as diffusers' DreamBooth scripts lay them out.

A full fine-tune's checkpoint holds `unet/` (and `text_encoder/` when trained) as `save_pretrained` folders, so
`UNet2DConditionModel.from_pretrained("out/checkpoint-500/unet")` works for inference; a LoRA checkpoint holds
`pytorch_lora_weights.safetensors` for `load_lora_weights`. Beside them, accelerate's optimizer, scheduler and RNG
state, and `trainer_state.json`. A checkpoint is written under a temporary name and renamed when complete, so
`latest` never picks a partial one. The final outputs are staged the same way (`final_staging_dir`, `publish_final`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate.utils import broadcast_object_list

from .safeguards import DreamBoothInputError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"`{path}` is not a checkpoint folder; expected a name like `checkpoint-500`.")
    return int(match.group(1))


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The folder to resume from: `latest` is the newest checkpoint (None if there is none yet).

    A bare name such as `checkpoint-500` is looked up in `output_dir`, as in diffusers' scripts.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning(
                "`--resume_from_checkpoint latest`: no checkpoint in %s yet; starting a new run.", output_dir
            )
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path.name).is_dir():
        path = Path(output_dir) / path.name
    if not path.is_dir():
        raise DreamBoothInputError(
            f"`--resume_from_checkpoint={resume_from_checkpoint}` is not a checkpoint folder; pass `latest` or one"
            f" of: {', '.join(p.name for p in list_checkpoints(output_dir)) or 'no checkpoints yet'}."
        )
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Remove the oldest checkpoints so that one more can be saved within `total_limit`; return those removed."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) - total_limit + 1
    removed = checkpoints[: max(excess, 0)]
    for path in removed:
        logger.info("Removing checkpoint %s (--checkpoints_total_limit=%d)", path, total_limit)
        _remove_atomically(path)
    return removed


def _remove_atomically(path: Path) -> None:
    """Rename a checkpoint out of the `checkpoint-N` namespace first, so a crash mid-delete leaves no half folder
    that `latest` could pick; a leftover `.deleting` folder is removed by the next call."""
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def temporary_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` is written before `publish_checkpoint` renames it into place."""
    path = Path(output_dir) / f".checkpoint-{step}.partial"
    if path.exists():
        shutil.rmtree(path)
    return path


def publish_checkpoint(temporary: Path, step: int, state: dict) -> Path:
    """Write `trainer_state.json`, then rename the finished temporary folder to `checkpoint-{step}`."""
    (temporary / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    final = temporary.parent / f"checkpoint-{step}"
    if final.exists():
        _remove_atomically(final)
    os.replace(temporary, final)
    return final


def final_staging_dir(output_dir: str | Path) -> Path:
    """An empty folder in `output_dir` where the final outputs are written before `publish_final` moves them in."""
    path = Path(output_dir) / ".final.partial"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_final(staging: Path, output_dir: str | Path, last: str) -> None:
    """Move every entry of `staging` into `output_dir`, replacing older ones, with `last` (the file whose presence
    says the outputs are complete) moved after all others; then remove `staging`.

    Each move is a rename, so a crash leaves every file either old or new, never half written.
    """
    output_dir = Path(output_dir)
    entries = sorted(staging.iterdir(), key=lambda path: path.name == last)
    for entry in entries:
        destination = output_dir / entry.name
        if destination.is_dir() and not destination.is_symlink():
            _remove_atomically(destination)
        os.replace(entry, destination)
    staging.rmdir()


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"global_step": checkpoint_step(checkpoint)}


def run_seed(seed: int | None, resume_dir: Path | None) -> int:
    """The configured `seed`, else the resumed run's, else a random one shared by all processes."""
    if seed is not None:
        return seed
    if resume_dir is not None:
        saved = read_trainer_state(resume_dir).get("seed")
        if saved is not None:
            return saved
    seeds = [int.from_bytes(os.urandom(4), "little")]
    broadcast_object_list(seeds)
    logger.info("No `--seed` given; using seed %d (pass it to reproduce this run).", seeds[0])
    return seeds[0]
