"""The run's progress as a JSON-lines file, `output_dir/logs/progress.jsonl`, written by every run.

An accelerate tracker beside those of `--report_to`: one line with the run's options when training starts, then one
per optimizer step (`step`, `time`, `loss`, `instance_loss`, `prior_loss`, `lr`). The web app draws its progress bar,
speed, time left and loss curves from it, for runs it started and for runs started from the command line. A resumed
run appends to the same file; readers keep the last line of each step (`read_progress`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from .config import DreamBoothConfig

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"


class ProgressLog(GeneralTracker):
    """Appends the run's options and each step's logged values to `logging_dir/progress.jsonl` (main process)."""

    name = "progress"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, logging_dir: str | Path) -> None:
        super().__init__()
        self.path: Path | None = Path(logging_dir) / PROGRESS_FILE

    @property
    def tracker(self) -> ProgressLog:
        return self

    def _append(self, record: dict[str, Any]) -> None:
        self._append_raw(json.dumps(record) + "\n")

    def _append_raw(self, text: str) -> None:
        """Append `text`; a failing write (a full disk) warns once and stops the log, never the run."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(text)
        except OSError as error:
            logger.warning("Progress log `%s` stopped: %s. Training goes on.", self.path, error)
            self.path = None

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        if self.path is not None and self.path.is_file() and not self.path.read_bytes().endswith(b"\n"):
            self._append_raw("\n")  # a killed run's last line, cut short
        self._append({"time": time.time(), "config": values})

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        scalars = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        self._append({"step": step, "time": time.time(), **scalars})


def trackers_for(config: DreamBoothConfig, logging_dir: str | Path) -> list:
    """accelerate's `log_with` for the run: the progress log, and the trackers `--report_to` names."""
    trackers: list = [ProgressLog(logging_dir)]
    if config.report_to == "none":
        return trackers
    if config.report_to == "tensorboard" and not _tensorboard_available():
        logger.warning("`--report_to tensorboard` needs `pip install tensorboard`; training without it.")
        return trackers
    return [*trackers, config.report_to]


def read_progress(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The last options line and the steps of a progress file, one record per step (the latest, after a resume),
    in step order. A line being written (cut short) is skipped."""
    options: dict[str, Any] = {}
    steps: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return options, []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "config" in record:
            options = record["config"]
        elif isinstance(record.get("step"), int):
            steps[record["step"]] = record
    return options, [steps[step] for step in sorted(steps)]


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
