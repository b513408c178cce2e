"""Checkpoint folders: listing, resolving `--resume_from_checkpoint`, rotation and atomic publishing."""

import json

import pytest
from conftest import tiny_config

from diffusers_dreambooth import DreamBoothInputError, DreamBoothTrainer
from diffusers_dreambooth.checkpoints import (
    TRAINER_STATE_NAME,
    checkpoint_step,
    final_staging_dir,
    list_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    publish_final,
    read_trainer_state,
    resolve_checkpoint,
    temporary_checkpoint_dir,
)


def make_checkpoints(output_dir, *steps):
    for step in steps:
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
        (output_dir / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"state")


def checkpoint_names(output_dir) -> list[str]:
    return [path.name for path in list_checkpoints(output_dir)]


def test_list_checkpoints_sorts_by_step_and_ignores_other_entries(tmp_path):
    make_checkpoints(tmp_path, 10, 9, 100, 2)
    for name in (".checkpoint-3.partial", "checkpoint-final", "checkpoint-", "checkpoint-4-old", "logs", "unet"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-5").write_text("a file, not a folder")

    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_list_checkpoints_of_a_missing_folder_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []


def test_checkpoint_step_parses_the_name_and_rejects_others(tmp_path):
    assert checkpoint_step(tmp_path / "checkpoint-500") == 500
    with pytest.raises(ValueError, match="checkpoint-500"):
        checkpoint_step(tmp_path / "unet")


def test_resolve_latest_is_the_highest_step(tmp_path):
    make_checkpoints(tmp_path, 9, 10, 2)
    (tmp_path / ".checkpoint-11.partial").mkdir()

    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"


def test_resolve_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_checkpoint(tmp_path, "latest") is None
    assert resolve_checkpoint(tmp_path / "not_created_yet", "latest") is None


def test_resolve_nothing_is_none(tmp_path):
    make_checkpoints(tmp_path, 2)

    assert resolve_checkpoint(tmp_path, None) is None


def test_resolve_a_bare_name_looks_in_the_output_dir(tmp_path):
    make_checkpoints(tmp_path, 2, 4)

    assert resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"


def test_resolve_an_absolute_path_outside_the_output_dir(tmp_path):
    make_checkpoints(tmp_path / "other_run", 7)
    make_checkpoints(tmp_path / "out", 2)

    resolved = resolve_checkpoint(tmp_path / "out", str(tmp_path / "other_run" / "checkpoint-7"))

    assert resolved == tmp_path / "other_run" / "checkpoint-7"


def test_resolve_a_missing_checkpoint_lists_the_existing_ones(tmp_path):
    make_checkpoints(tmp_path, 2, 4)

    with pytest.raises(DreamBoothInputError, match="checkpoint-3") as error:
        resolve_checkpoint(tmp_path, "checkpoint-3")
    assert "checkpoint-2, checkpoint-4" in str(error.value)


def test_resolve_a_missing_checkpoint_without_any_says_so(tmp_path):
    with pytest.raises(DreamBoothInputError, match="no checkpoints yet"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-3"))


def test_resolve_a_folder_that_is_not_a_checkpoint_raises(tmp_path):
    (tmp_path / "unet").mkdir()

    with pytest.raises(ValueError, match="checkpoint-500"):
        resolve_checkpoint(tmp_path, str(tmp_path / "unet"))


def test_prune_leaves_room_for_one_more_within_the_limit(tmp_path):
    make_checkpoints(tmp_path, 10, 2, 9)

    removed = prune_checkpoints(tmp_path, 2)

    assert [path.name for path in removed] == ["checkpoint-2", "checkpoint-9"]
    assert checkpoint_names(tmp_path) == ["checkpoint-10"]


def test_prune_below_the_limit_removes_nothing(tmp_path):
    make_checkpoints(tmp_path, 1, 2)

    assert prune_checkpoints(tmp_path, 3) == []
    assert checkpoint_names(tmp_path) == ["checkpoint-1", "checkpoint-2"]


def test_prune_without_a_limit_removes_nothing(tmp_path):
    make_checkpoints(tmp_path, 1, 2, 3, 4)

    assert prune_checkpoints(tmp_path, None) == []
    assert len(list_checkpoints(tmp_path)) == 4


def test_prune_ignores_partial_checkpoints(tmp_path):
    make_checkpoints(tmp_path, 1, 2)
    (tmp_path / ".checkpoint-3.partial").mkdir()

    prune_checkpoints(tmp_path, 2)

    assert checkpoint_names(tmp_path) == ["checkpoint-2"]
    assert (tmp_path / ".checkpoint-3.partial").is_dir()


def test_publish_renames_the_temporary_folder_and_writes_the_state(tmp_path):
    temporary = temporary_checkpoint_dir(tmp_path, 6)
    assert temporary == tmp_path / ".checkpoint-6.partial"
    temporary.mkdir()
    (temporary / "optimizer.bin").write_bytes(b"state")
    assert list_checkpoints(tmp_path) == []

    final = publish_checkpoint(temporary, 6, {"global_step": 6, "seed": 3})

    assert final == tmp_path / "checkpoint-6"
    assert not temporary.exists()
    assert (final / "optimizer.bin").read_bytes() == b"state"
    assert json.loads((final / TRAINER_STATE_NAME).read_text()) == {"global_step": 6, "seed": 3}
    assert read_trainer_state(final) == {"global_step": 6, "seed": 3}
    assert resolve_checkpoint(tmp_path, "latest") == final


def test_temporary_checkpoint_dir_clears_a_leftover_from_a_crash(tmp_path):
    leftover = tmp_path / ".checkpoint-6.partial"
    leftover.mkdir()
    (leftover / "half_written.bin").write_bytes(b"")

    assert not temporary_checkpoint_dir(tmp_path, 6).exists()


def test_publish_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    make_checkpoints(tmp_path, 6)
    temporary = temporary_checkpoint_dir(tmp_path, 6)
    temporary.mkdir()

    final = publish_checkpoint(temporary, 6, {"global_step": 6})

    assert sorted(path.name for path in final.iterdir()) == [TRAINER_STATE_NAME]


def test_read_trainer_state_falls_back_to_the_step_in_the_name(tmp_path):
    make_checkpoints(tmp_path, 40)

    assert read_trainer_state(tmp_path / "checkpoint-40") == {"global_step": 40}


@pytest.mark.slow
def test_total_limit_holds_during_training_and_after_a_resume(pipeline_dirs, instance_dir, tmp_path):
    def train(**overrides):
        options = {"max_train_steps": 6, "checkpointing_steps": 1, "checkpoints_total_limit": 2, **overrides}
        DreamBoothTrainer(tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **options)).train()

    train()
    assert checkpoint_names(tmp_path / "out") == ["checkpoint-5", "checkpoint-6"]
    assert read_trainer_state(tmp_path / "out" / "checkpoint-6") == {"global_step": 6, "seed": 0}

    train(resume_from_checkpoint="latest", max_train_steps=8)
    assert checkpoint_names(tmp_path / "out") == ["checkpoint-7", "checkpoint-8"]
    assert read_trainer_state(tmp_path / "out" / "checkpoint-8")["global_step"] == 8
    assert not [path for path in (tmp_path / "out").iterdir() if path.name.endswith(".partial")]


def test_publish_final_replaces_old_outputs_and_removes_the_staging_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "old.safetensors").write_text("old")
    (tmp_path / "dreambooth.json").write_text("old")
    (tmp_path / "checkpoint-2").mkdir()
    staging = final_staging_dir(tmp_path)
    (staging / "unet").mkdir()
    (staging / "unet" / "new.safetensors").write_text("new")
    (staging / "dreambooth.json").write_text("new")

    publish_final(staging, tmp_path, last="dreambooth.json")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "dreambooth.json", "unet"]
    assert [p.name for p in (tmp_path / "unet").iterdir()] == ["new.safetensors"]
    assert (tmp_path / "dreambooth.json").read_text() == "new"


def test_final_staging_dir_clears_a_leftover_from_a_crash(tmp_path):
    leftover = final_staging_dir(tmp_path)
    (leftover / "model_index.json").write_text("half")
    assert list(final_staging_dir(tmp_path).iterdir()) == []


def test_the_run_seed_is_the_configured_one_else_the_resumed_runs_else_a_fresh_one(tmp_path, caplog):
    from diffusers_dreambooth.checkpoints import run_seed

    temporary = temporary_checkpoint_dir(tmp_path, 2)
    temporary.mkdir()
    checkpoint = publish_checkpoint(temporary, 2, {"global_step": 2, "seed": 7})
    assert run_seed(5, checkpoint) == 5
    assert run_seed(None, checkpoint) == 7
    with caplog.at_level("INFO", logger="diffusers_dreambooth.checkpoints"):
        fresh = run_seed(None, None)
    assert 0 <= fresh < 2**32 and f"using seed {fresh}" in caplog.text
