"""Sharing a trained subject: one Hub commit holding the weights, `dreambooth.json`, the card and the samples.

Only those files go up; checkpoints, logs, validation images and `dreambooth_config.json` (which holds local paths)
stay on disk. A local base-model path never reaches the Hub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, create_commit, create_repo

from .kohya import KOHYA_WEIGHT_NAME
from .model_card import is_hub_id, subject_card
from .subject import SUBJECT_FILE_NAME, SUPER_RESOLUTION_FOLDER, SubjectMetadata, check_relative_path

logger = logging.getLogger(__name__)


def subject_files(folder: Path, metadata: SubjectMetadata) -> list[Path]:
    """The files of a subject folder that belong on the Hub (weights and samples), relative to `folder`."""
    if metadata.adapter == "lora":
        weights = [Path(metadata.lora_weight_name)]
        kohya = folder / KOHYA_WEIGHT_NAME
        weights += [kohya.relative_to(folder)] if kohya.is_file() else []
    else:
        model_index = json.loads((folder / "model_index.json").read_text())
        components = [name for name, value in model_index.items() if isinstance(value, list) and value[0]]
        for name in components:
            check_relative_path(name, "model_index.json")
        weights = [Path("model_index.json")]
        weights += [p.relative_to(folder) for name in components for p in sorted((folder / name).rglob("*"))]
    if metadata.textual_inversion_weight_name:  # pivotal tuning's embeddings, beside either kind of weights
        weights.append(Path(metadata.textual_inversion_weight_name))
    samples = [Path(name) for name in metadata.sample_images]
    samples += [Path(metadata.sample_grid)] if metadata.sample_grid else []
    return [path for path in weights + samples if (folder / path).is_file()]


def default_repo_name(output_dir: str | Path) -> str:
    """The repo name a subject in `output_dir` is pushed to by default: the folder's name, or for a cascade's stage
    II (`<subject>/stage_2`), its cascade's, as the whole cascade is pushed."""
    folder = Path(output_dir).resolve()
    return folder.parent.name if _is_cascade_stage_2(folder) else folder.name


def _is_cascade_stage_2(folder: Path) -> bool:
    return folder.name == SUPER_RESOLUTION_FOLDER and (folder.parent / SUBJECT_FILE_NAME).is_file()


def push_subject_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and commit the subject in `folder` to it, with a card rendered for `repo_id`.

    A cascade goes as one repo: stage I at its root, the trained super-resolution stage in `stage_2/` (pushing the
    `stage_2` folder pushes its whole cascade).
    """
    folder = Path(folder)
    if _is_cascade_stage_2(folder.resolve()):
        folder = folder.resolve().parent
    metadata, operations = _stage_operations(folder, prefix="")
    stage_2 = folder / SUPER_RESOLUTION_FOLDER
    if (stage_2 / SUBJECT_FILE_NAME).is_file():
        operations += _stage_operations(stage_2, prefix=f"{SUPER_RESOLUTION_FOLDER}/")[1]
    card = subject_card(metadata, repo_id, token=token)
    operations.append(CommitOperationAdd("README.md", str(card).encode()))
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    logger.info("Pushing %d files of %s to %s", len(operations), folder, repo_id)
    return create_commit(
        repo_id, operations, commit_message=commit_message or "Upload DreamBooth subject", token=token
    )


def _stage_operations(folder: Path, prefix: str) -> tuple[SubjectMetadata, list[CommitOperationAdd]]:
    """The metadata of the subject in `folder` and the commit operations that upload it under `prefix`."""
    metadata = SubjectMetadata.from_json_file(folder / SUBJECT_FILE_NAME)
    if not is_hub_id(metadata.base_model):
        if metadata.adapter == "lora":
            raise ValueError(
                f"The LoRA subject in `{folder}` has a local folder as base model (`{metadata.base_model}`), so nobody"
                " could load it from the Hub. Push the base model first and train from its repo id."
            )
        metadata.base_model = None
    operations = [
        CommitOperationAdd(f"{prefix}{path.as_posix()}", str(folder / path))
        for path in subject_files(folder, metadata)
    ]
    subject_json = (json.dumps(asdict(metadata), indent=2, sort_keys=True) + "\n").encode()
    operations.append(CommitOperationAdd(f"{prefix}{SUBJECT_FILE_NAME}", subject_json))
    return metadata, operations
