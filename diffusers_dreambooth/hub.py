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
from .subject import SUBJECT_FILE_NAME, SubjectMetadata, check_relative_path

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
    samples = [Path(name) for name in metadata.sample_images]
    samples += [Path(metadata.sample_grid)] if metadata.sample_grid else []
    return [path for path in weights + samples if (folder / path).is_file()]


def push_subject_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and commit the subject in `folder` to it, with a card rendered for `repo_id`."""
    folder = Path(folder)
    metadata = SubjectMetadata.from_json_file(folder / SUBJECT_FILE_NAME)
    if not is_hub_id(metadata.base_model):
        if metadata.adapter == "lora":
            raise ValueError(
                f"This LoRA subject's base model `{metadata.base_model}` is a local folder, so nobody could load it"
                " from the Hub. Push the base model first and train from its repo id."
            )
        metadata.base_model = None
    card = subject_card(metadata, repo_id, token=token)
    operations = [CommitOperationAdd(path.as_posix(), str(folder / path)) for path in subject_files(folder, metadata)]
    subject_json = (json.dumps(asdict(metadata), indent=2, sort_keys=True) + "\n").encode()
    operations += [
        CommitOperationAdd(SUBJECT_FILE_NAME, subject_json),
        CommitOperationAdd("README.md", str(card).encode()),
    ]
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    logger.info("Pushing %d files of %s to %s", len(operations), folder, repo_id)
    return create_commit(
        repo_id, operations, commit_message=commit_message or "Upload DreamBooth subject", token=token
    )
