"""What keeps a long run from losing work: stop requests (Ctrl-C, SIGTERM), a non-finite loss, a full disk.

A signal does not kill the run mid-step: the trainer finishes the step, saves a checkpoint, and raises
`TrainingInterrupted`, so `--resume_from_checkpoint latest` continues exactly where it stopped. A second Ctrl-C stops
at once (the last complete checkpoint stays whole: checkpoints are written under a temporary name, then renamed).

A mistake in the run's input raises `DreamBoothInputError` rather than a traceback deep inside training: the script
prints it as one line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Signals that ask a run to save a checkpoint and stop: Ctrl-C, and what job schedulers send before killing a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: What each refusal of pickle-only weights (base model, adapters, evaluation models) says: the risk, the two fixes.
PICKLE_REMEDY = (
    "pickle files can run code when loaded: convert them to safetensors, or pass `--allow_pickle` if you trust them."
)


class DreamBoothInputError(ValueError):
    """A mistake in the run's options or input files, such as a missing photo folder or a model folder that is not a
    pipeline; the message names the option or file and the fix.

    `examples/train.py` prints it as one line, `<prog>: error: <message>`, and exits with 2 as argparse does for a bad
    flag; any other exception is a bug and keeps its traceback. A `ValueError`, so `except ValueError` still catches
    it.
    """


class TrainingInterrupted(Exception):
    """Raised after a stop signal once the run's checkpoint is saved; `exit_code` is the shell's 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"saved {checkpoint}" if checkpoint is not None else "no checkpoint saved"
        super().__init__(
            f"Stopped by {signal.Signals(signum).name} after step {step}; {where}."
            " Run the same command with `--resume_from_checkpoint latest` to continue."
        )


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; nothing of that step was applied and nothing after it is saved."""


class DiskSpaceError(OSError):
    """A folder's disk has too little free space for what the run is about to write; nothing was written."""


class StopRequest:
    """Records the first stop signal received; a second one raises `KeyboardInterrupt` to stop immediately.

    Another signal within `SAME_REQUEST_SECONDS` of the first is the same request: `accelerate launch` answers the
    terminal's Ctrl-C (SIGINT, which the run gets too) by sending the run SIGTERM at once."""

    SAME_REQUEST_SECONDS = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum != self.signum:
            if time.monotonic() - self.received_at < self.SAME_REQUEST_SECONDS:
                return
        if self.signum is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopping without a checkpoint.")
        self.signum, self.received_at = signum, time.monotonic()
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to stop at once).",
            signal.Signals(signum).name,
        )


@contextlib.contextmanager
def stop_requests(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Catch `signals` while the block runs, into the yielded `StopRequest`; restore the old handlers after.

    Signal handlers can only be set from the main thread; elsewhere (a notebook's worker thread, say) the signals
    keep their usual effect.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request._handle) for signum in signals}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_free_space(directory: str | Path, needed_bytes: int, purpose: str) -> None:
    """Raise `DiskSpaceError` before writing `purpose` to `directory` if its disk has less than `needed_bytes` free."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise DiskSpaceError(
            f"Not enough free disk space for {purpose} in `{directory}`: {_readable_size(free)} free, about"
            f" {_readable_size(needed_bytes)} needed. Free some space (or remove old checkpoints), or choose another"
            " `--output_dir` / `--class_data_dir`."
        )


def _readable_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 1e3:.0f} kB"
