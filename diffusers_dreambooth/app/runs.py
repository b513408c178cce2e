"""The app's work folder and its training runs: every path a browser names is checked to stay inside the folder,
photos are reviewed with the trainer's own reasons, and a run trains in its own process through the same entry point
as `accelerate launch examples/train.py`, one at a time per server.

A run is a folder `runs/<name>/`: `photos/` (the subject's photos), `options.json` (the run's options, never the
token), `train.log` (the process's console), `exit_code` (once it ended) and `output/` (the trainer's
`--output_dir`: checkpoints, `logs/progress.jsonl`, validation images, the trained subject, samples, card).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from ..checkpoints import list_checkpoints
from ..config import DreamBoothConfig
from ..data import IMAGE_EXTENSIONS, UnreadableImageError, decode_image, load_subject_photos
from ..evaluation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, is_toy_checker
from ..progress import PROGRESS_FILE, read_progress
from ..safeguards import DreamBoothInputError
from ..subject import SUBJECT_FILE_NAME, Subject, SubjectMetadata
from ..toy import BASE_MODEL_DIR
from ..validation import CLASS_IMAGE_PREFIX
from .curves import CheckerCurves, MetricCurves, MetricRequest, by_step

#: The largest photo the app takes; the server refuses larger uploads before they reach it.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
#: How many photos a run takes (DreamBooth needs 3-5; more help little).
MAX_PHOTOS = 20
#: The bundled toy model, its checker and photos: readable by a run wherever the work folder is.
TOY_DIR = Path(BASE_MODEL_DIR).parent
#: `org/name`, as the Hub spells repo ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: What a run or file name may hold.
SAFE_NAME = re.compile(r"^[\w][\w .()+-]{0,127}$")
#: Options naming a file, folder or Hub repo that a run reads: inside the work folder, or a Hub id.
HUB_OPTIONS = (
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "pretrained_tokenizer_4_name_or_path",
    "pretrained_text_encoder_4_name_or_path",
    "validation_model_path",
    "evaluation_dino_model",
    "evaluation_clip_model",
    "dataset_name",
)
#: Every option naming a file or folder (beside those the app sets): inside the work folder unless a Hub id is read.
PATH_OPTIONS = (
    *HUB_OPTIONS,
    "cache_dir",
    "concepts_list",
    "validation_image",
    "validation_images",
    "bnb_quantization_config_path",
)


class AppInputError(ValueError):
    """What the browser sent cannot be used; the message says what and how to fix it, in one line."""


class ServerBusy(AppInputError):
    """A run is training; the server trains one at a time."""


def safe_name(name: str, what: str) -> str:
    """`name` if it can name a file or folder inside the work folder: no path separators, no `..`, not hidden."""
    name = str(name).strip()
    if not SAFE_NAME.match(name) or ".." in name:
        raise AppInputError(
            f"{what} `{name}` is not a plain name: use letters, digits, spaces and `_ - . ( ) +`, without `/`, `..`"
            " or a leading dot."
        )
    return name


def inside(root: Path, path: str | Path, what: str, also_readable: tuple[Path, ...] = ()) -> Path:
    """`path` (relative to `root`, or absolute) resolved, links followed, if it lies inside `root` (or, for what is
    only read, inside one of `also_readable`)."""
    resolved = (root / path).resolve()
    if not any(resolved.is_relative_to(folder.resolve()) for folder in (root, *also_readable)):
        raise AppInputError(f"{what} `{path}` is outside the work folder `{root}`; put it inside and name it there.")
    return resolved


def check_path_options(options: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """`options` with every path option resolved inside `work_dir` (a Hub id is left as it is where one can be read);
    raises `AppInputError` naming the option otherwise, and for `allow_pickle`, which no browser may turn on."""
    checked = dict(options)
    for name in PATH_OPTIONS:
        value = options.get(name)
        readable = () if name == "cache_dir" else (TOY_DIR,)  # the bundled toy model and checker are read, not written
        if isinstance(value, list) and name == "validation_images":
            checked[name] = [str(inside(work_dir, item, f"`{name}`", readable)) for item in value]
        elif isinstance(value, str) and not is_hub_id(name, value, work_dir):
            checked[name] = str(inside(work_dir, value, f"`{name}`", readable))
        elif value is not None and not isinstance(value, str):
            raise AppInputError(f"`{name}` names a file in the work folder here; the app trains one subject.")
    if "logging_dir" in options:
        safe_name(options["logging_dir"], "`logging_dir`")
    if options.get("resume_from_checkpoint") not in (None, "latest"):
        raise AppInputError("`resume_from_checkpoint` is `latest` here: Resume continues a run from its latest one.")
    if options.get("allow_pickle"):  # a pickle runs code on load: a server loads safetensors only
        raise AppInputError(
            "`allow_pickle`: the app loads safetensors weights only (a pickle can run code on the server). Convert the"
            " model's weights to safetensors, or train it with `examples/train.py`."
        )
    return checked


def is_hub_id(option: str, value: str, work_dir: Path) -> bool:
    """Whether `value` of `option` names a Hub repo: an option that reads one, `org/name`, no such local path."""
    return option in HUB_OPTIONS and bool(HUB_ID.match(value)) and not (work_dir / value).exists()


@dataclass
class PhotoReview:
    """The photos a run will train on, and those it skips or refuses, each with the trainer's reason."""

    accepted: list[Path] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def review_photos(paths: list[Path], names: list[str] | None = None) -> PhotoReview:
    """Check photos as the trainer reads them (`decode_image`), by their names as uploaded (`names`)."""
    review = PhotoReview()
    for path, name in zip(paths, names or [p.name for p in paths], strict=True):
        try:
            safe_name(name, "Photo")
        except AppInputError as error:
            review.rejected.append((name, str(error)))
            continue
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            review.rejected.append((name, f"skipped: the trainer reads {', '.join(IMAGE_EXTENSIONS)} files"))
        elif path.stat().st_size > MAX_UPLOAD_BYTES:
            review.rejected.append((name, f"larger than {MAX_UPLOAD_BYTES // 2**20} MB; downscale it"))
        else:
            try:
                decode_image(path, name)
            except (UnreadableImageError, DreamBoothInputError) as error:
                review.rejected.append((name, str(error)))
                continue
            review.accepted.append(path)
    extra = review.accepted[MAX_PHOTOS:]
    review.accepted = review.accepted[:MAX_PHOTOS]
    review.rejected += [(path.name, f"more than {MAX_PHOTOS} photos; this one is left out") for path in extra]
    return review


@dataclass
class RunStatus:
    """What the page shows of a run."""

    name: str
    state: str  # "running", "finished", "stopped" (a checkpoint to resume), "failed" or "new"
    step: int = 0
    total: int | None = None
    seconds_per_step: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    class_images: list[Path] = field(default_factory=list)  # of the class prompt, `--num_validation_class_images`
    identifier: str | None = None  # as the trainer resolved it (`auto`: its rare token)
    log_tail: str = ""
    exit_code: int | None = None

    @property
    def seconds_left(self) -> float | None:
        if self.total is None or self.seconds_per_step is None:
            return None
        return max(self.total - self.step, 0) * self.seconds_per_step


class Runs:
    """The runs of one work folder, and the one run this server trains at a time."""

    def __init__(self, work_dir: str | Path) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.runs_dir = self.work_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._running: str | None = None
        self._checker_curves = CheckerCurves()
        self._metric_curves = MetricCurves()
        self._progress_cache: dict[Path, tuple[Any, Any]] = {}

    # Folders

    def folder(self, name: str) -> Path:
        return inside(self.runs_dir, safe_name(name, "Run"), "Run")

    def output_dir(self, name: str) -> Path:
        return self.folder(name) / "output"

    def names(self) -> list[str]:
        """Runs in the work folder, newest first."""
        folders = [path for path in self.runs_dir.iterdir() if path.is_dir() and SAFE_NAME.match(path.name)]
        return [path.name for path in sorted(folders, key=lambda path: path.stat().st_mtime, reverse=True)]

    def add_photos(self, name: str, uploads: list[tuple[str, Path]]) -> PhotoReview:
        """Copy the accepted uploads (name as uploaded, file on the server) into the run's `photos/` folder."""
        review = review_photos([path for _, path in uploads], [upload_name for upload_name, _ in uploads])
        photos = self.folder(name) / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        names = {path: upload_name for upload_name, path in uploads}
        for path in review.accepted:
            shutil.copyfile(path, inside(photos, safe_name(names[path], "Photo"), "Photo"))
        return review

    # Training

    @property
    def running(self) -> str | None:
        """The run training now, if any."""
        with self._lock:
            if self._process is not None and self._process.poll() is not None:
                self._process = self._running = None
            return self._running

    def start(self, name: str, options: dict[str, Any], token: str | None = None, resume: bool = False) -> None:
        """Train `name` with `options` in a new process; `resume` continues from its latest checkpoint. The token
        reaches the process through its environment only. Raises `ServerBusy` while another run trains."""
        folder = self.folder(name)
        options = check_path_options(options, self.work_dir)
        options = {**options, "output_dir": str(folder / "output")}
        if resume:
            options["resume_from_checkpoint"] = "latest"
        DreamBoothConfig(**options)  # the trainer's own checks, in the page before a process starts
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise ServerBusy(f"The server is busy training `{self._running}`; stop it or wait until it ends.")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "options.json").write_text(json.dumps(options, indent=2, sort_keys=True))
            (folder / "exit_code").unlink(missing_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("HF_TOKEN", None)
            if token:
                env["HF_TOKEN"] = token
            log = (folder / "train.log").open("a", encoding="utf-8")
            self._process = subprocess.Popen(
                [*training_command(), "--config", str(folder / "options.json")],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the server does not reach the run; Stop does
            )
            self._running = name
            threading.Thread(target=self._wait, args=(self._process, folder, log), daemon=True).start()

    @staticmethod
    def _wait(process: subprocess.Popen, folder: Path, log) -> None:
        code = process.wait()
        log.close()
        (folder / "exit_code").write_text(str(code))

    def stop(self) -> str | None:
        """Stop the running run as Ctrl-C does (it saves a checkpoint, then exits); its name, or None if none ran.

        The signal goes to the training process itself: `accelerate launch` would kill it 5 s after forwarding one,
        which could cut a big model's checkpoint short."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                return None
            launcher = psutil.Process(self._process.pid)
            for process in launcher.children(recursive=True) or [launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGINT)
            return self._running

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the running run to end; its exit code."""
        process = self._process
        return None if process is None else process.wait(timeout)

    # What the page shows

    def status(self, name: str) -> RunStatus:
        folder = self.folder(name)
        output = folder / "output"
        options, steps = self._progress(output / "logs" / PROGRESS_FILE)
        code_file = folder / "exit_code"
        exit_code = int(code_file.read_text()) if code_file.is_file() else None
        if self.running == name:
            state = "running"
        elif (output / SUBJECT_FILE_NAME).is_file():
            state = "finished"
        elif list_checkpoints(output) if output.is_dir() else []:
            state = "stopped"
        else:
            state = "failed" if exit_code not in (None, 0) else "new"
        total = options.get("max_train_steps")
        rates = [b["time"] - a["time"] for a, b in zip(steps[-11:], steps[-10:])]
        images = [
            path for paths in by_step(list((output / "validation").glob("step-*/*.png"))).values() for path in paths
        ]
        return RunStatus(
            name=name,
            state=state,
            step=steps[-1]["step"] if steps else 0,
            total=total,
            seconds_per_step=sum(rates) / len(rates) if rates else None,
            steps=steps,
            validation_images=[path for path in images if not path.name.startswith(CLASS_IMAGE_PREFIX)],
            class_images=[path for path in images if path.name.startswith(CLASS_IMAGE_PREFIX)],
            identifier=run_identifier(options),
            log_tail=log_tail(folder / "train.log"),
            exit_code=exit_code,
        )

    def checker_curves(self, name: str, status: RunStatus) -> list[dict[str, Any]]:
        """For a run whose evaluation uses the toy world's checker: per validation step, the share of its images the
        checker calls the subject (`binding`: when the subject was learnt) and, with class-prompt images, the share of
        those (`drift`: whether the class turned into the subject). Empty for other runs."""
        checker_dir = self.options(name).get("evaluation_dino_model")
        if not checker_dir or not is_toy_checker(checker_dir):
            return []
        return self._checker_curves.rows(checker_dir, status.validation_images, status.class_images)

    def metric_curves(self, name: str, status: RunStatus, wait: bool = False) -> list[dict[str, Any]]:
        """For a run with `--evaluate`: DINO, CLIP-I and CLIP-T of each validation step's images (PRES of its class
        images), by the run's evaluation models, scored in the background (`wait`: now). Empty for other runs."""
        request = self.metric_request(name, status)
        return [] if request is None else self._metric_curves.rows(request, wait)

    def metric_error(self, name: str, status: RunStatus) -> str | None:
        """Why the run's evaluation models could not score its validation images, if they could not."""
        request = self.metric_request(name, status)
        return None if request is None else self._metric_curves.error(request)

    def metric_request(self, name: str, status: RunStatus) -> MetricRequest | None:
        """What scoring run `name`'s validation images needs, if it evaluates (`--evaluate`) and has some."""
        options = self.options(name)
        if not options.get("evaluate") or not status.validation_images:
            return None

        def load_photos() -> list[Image.Image]:
            config = DreamBoothConfig(**options)
            return [photo.image for photo in load_subject_photos(config, config.subject_data()[0])]

        return MetricRequest(
            dino_model=options.get("evaluation_dino_model", DEFAULT_DINO_MODEL),
            clip_model=options.get("evaluation_clip_model", DEFAULT_CLIP_MODEL),
            photos_key=str(self.folder(name)),
            load_photos=load_photos,
            identifier=status.identifier,
            subject_images=tuple(status.validation_images),
            class_images=tuple(status.class_images),
        )

    def _progress(self, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """`read_progress(path)`, read again only when the file changed (every open page polls it each second)."""
        stat = path.stat() if path.is_file() else None
        key = None if stat is None else (stat.st_mtime_ns, stat.st_size)
        if path not in self._progress_cache or self._progress_cache[path][0] != key:
            self._progress_cache[path] = (key, read_progress(path))
        return self._progress_cache[path][1]

    def metadata(self, name: str) -> SubjectMetadata | None:
        path = self.output_dir(name) / SUBJECT_FILE_NAME
        return SubjectMetadata.from_json_file(path) if path.is_file() else None

    def options(self, name: str) -> dict[str, Any]:
        path = self.folder(name) / "options.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def run_identifier(options: dict[str, Any]) -> str | None:
    """The identifier of a run's (first) subject as its progress log's options hold it, the trainer's `auto` or pivotal
    tokens resolved; None when they name no instance prompt (`--concepts_list`)."""
    prompt = options.get("instance_prompt")
    return (
        Subject.from_prompts(prompt, options.get("class_prompt"), options.get("identifier")).identifier
        if prompt
        else None
    )


def training_command() -> list[str]:
    """`accelerate launch` of the training entry point (`diffusers_dreambooth.cli.main`) as one local process."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1"]
    return [*launch, "--mixed_precision=no", "--dynamo_backend=no", "-m", "diffusers_dreambooth.cli"]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a run's console, progress-bar redraws folded to their latest state."""
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(max(file.seek(0, os.SEEK_END) - 64 * 1024, 0))
        text = file.read().decode("utf-8", errors="replace")
    folded = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in folded if line.strip()][-lines:])
