"""Every run writes `logs/progress.jsonl` (the web app's progress and loss curves, #18), whatever `--report_to`."""

import shutil

from conftest import tiny_config

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.progress import PROGRESS_FILE, ProgressLog, read_progress


def test_a_run_logs_its_options_and_every_step(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd"], instance_dir, tmp_path / "out", max_train_steps=3, with_prior_preservation=False
    )
    DreamBoothTrainer(config).train()
    options, steps = read_progress(tmp_path / "out" / "logs" / PROGRESS_FILE)
    assert options["max_train_steps"] == 3 and "hub_token" not in options
    assert [record["step"] for record in steps] == [1, 2, 3]
    assert all(record["loss"] > 0 and record["lr"] == 1e-3 for record in steps)
    assert steps[0]["time"] <= steps[1]["time"] <= steps[2]["time"]


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(pipeline_dirs, instance_dir, tmp_path):
    options = dict(max_train_steps=4, checkpointing_steps=2, report_to="none")
    out = tmp_path / "out"
    DreamBoothTrainer(tiny_config(pipeline_dirs["sd"], instance_dir, out, **options)).train()
    path = out / "logs" / PROGRESS_FILE
    _, unbroken = read_progress(path)
    shutil.rmtree(out / "checkpoint-4")
    with path.open("a") as file:
        file.write('{"step": 3, "time": 1')  # the line a killed run was writing
    resumed = DreamBoothTrainer(
        tiny_config(pipeline_dirs["sd"], instance_dir, out, resume_from_checkpoint="latest", **options)
    )
    resumed.train()
    options, steps = read_progress(path)
    assert options["resume_from_checkpoint"] == "latest"  # the resumed run's options, on a line of their own
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert steps[2]["time"] > unbroken[3]["time"]  # steps 3 and 4 are the resumed run's
    assert [record["loss"] for record in steps] == [record["loss"] for record in unbroken]


def test_a_failing_progress_log_warns_once_and_never_stops_the_run(tmp_path, caplog):
    log = ProgressLog(tmp_path / "logs")
    (tmp_path / "logs").write_text("a file where the folder should be")  # every write fails, as on a full disk
    log.store_init_configuration({"max_train_steps": 2})
    log.log({"loss": 0.5}, step=1)
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [
        f"Progress log `{tmp_path / 'logs' / PROGRESS_FILE}` stopped"
    ]
